//! `nicplug status`: asks a running agent over its unix socket and prints
//! the status document as a table (or as JSON).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::status::StatusDocument;

/// The whole exchange (connect, request, body) must finish within this; the
/// agent answers from memory, so anything slower means it is stuck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The OS reason goes into the message (not the source chain) so the
    /// hint can follow it: `cannot connect to nicplug at P: <reason>; <hint>`.
    #[error("cannot connect to nicplug at {}: {error}; {}", .path.display(), connect_hint(.error))]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("request {path} to nicplug at {} failed", .socket.display())]
    Http {
        socket: PathBuf,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("cannot build request for {path}")]
    Request {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("nicplug at {} did not answer {path} within {timeout:?}", .socket.display())]
    Timeout {
        socket: PathBuf,
        path: String,
        timeout: Duration,
    },
    #[error("nicplug answered {path} with {code}: {}", .body.trim())]
    Status {
        path: String,
        code: u16,
        body: String,
    },
    #[error("nicplug answered {path} with something that is not a status document")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn connect_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "the socket is owner-only; run as the user nicplug runs as"
        }
        _ => "is nicplug running?",
    }
}

/// One HTTP/1.1 GET of `path` over the unix socket; the status code and the
/// body (lossily decoded as UTF-8).
pub async fn fetch(socket: &Path, path: &str) -> Result<(u16, String), ClientError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fetch_inner(socket, path)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ClientError::Timeout {
            socket: socket.to_path_buf(),
            path: path.to_owned(),
            timeout: REQUEST_TIMEOUT,
        }),
    }
}

async fn fetch_inner(socket: &Path, path: &str) -> Result<(u16, String), ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|error| ClientError::Connect {
            path: socket.to_path_buf(),
            error,
        })?;
    let http_err = |source| ClientError::Http {
        socket: socket.to_path_buf(),
        path: path.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    // The connection future drives the socket; it ends when the response is
    // read and `sender` is dropped.
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "api client connection ended");
        }
    });
    let request = Request::get(path)
        .header(header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            path: path.to_owned(),
            source,
        })?;
    let result = async {
        let response = sender.send_request(request).await?;
        let code = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }
    .await
    .map_err(http_err);
    drop(sender);
    driver.abort();
    result
}

/// The output of `nicplug status`: the document as pretty JSON when `json`
/// (as the agent sent it, so fields this client does not know survive),
/// else the table of [`render_table`].
pub async fn status_command(socket: &Path, json: bool) -> Result<String, ClientError> {
    const PATH: &str = "/status";
    let (code, body) = fetch(socket, PATH).await?;
    if code != 200 {
        return Err(ClientError::Status {
            path: PATH.into(),
            code,
            body,
        });
    }
    let decode = |source| ClientError::Decode {
        path: PATH.into(),
        source,
    };
    if json {
        let value: serde_json::Value = serde_json::from_str(&body).map_err(decode)?;
        let mut text = serde_json::to_string_pretty(&value).map_err(decode)?;
        text.push('\n');
        Ok(text)
    } else {
        let doc: StatusDocument = serde_json::from_str(&body).map_err(decode)?;
        Ok(render_table(&doc, SystemTime::now()))
    }
}

/// A table for people: one line per interface, then the messages, then the
/// interfaces only the guest knows, then the guest agent's state. Unknown
/// values are `-`; the age is how long the interface has been in its phase.
pub fn render_table(doc: &StatusDocument, now: SystemTime) -> String {
    let mut rows = vec![
        [
            "NAME",
            "POD IFACE",
            "GUEST IFACE",
            "MAC",
            "IPS",
            "LINK",
            "PHASE",
            "AGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for iface in &doc.interfaces {
        let ips = if iface.ip_addresses.is_empty() {
            iface.ip_address.clone().into_iter().collect()
        } else {
            iface.ip_addresses.clone()
        };
        let age = iface
            .phase_since()
            .map(|since| match now.duration_since(since.time) {
                Ok(d) => human_duration(d),
                // The phase started "after" now: a wall clock step.
                Err(_) => "0s".to_owned(),
            });
        rows.push(vec![
            cell(Some(&iface.name)),
            cell(iface.pod_interface_name.as_deref()),
            cell(iface.interface_name.as_deref()),
            cell(iface.mac.as_deref()),
            cell(Some(&ips.join(","))),
            cell(iface.link_state.as_deref()),
            cell(Some(&iface.phase.to_string())),
            cell(age.as_deref()),
        ]);
    }
    let mut out = table(&rows);

    let messages: Vec<String> = doc
        .interfaces
        .iter()
        .filter_map(|i| {
            let message = i.message.as_deref().filter(|m| !m.trim().is_empty())?;
            Some(format!("{}: {}\n", clean(&i.name), clean(message)))
        })
        .collect();
    if !messages.is_empty() {
        out.push('\n');
        out.extend(messages);
    }

    if !doc.guest_interfaces.is_empty() {
        let mut rows = vec![
            ["GUEST-ONLY IFACE", "MAC", "IPS"]
                .map(String::from)
                .to_vec(),
        ];
        for g in &doc.guest_interfaces {
            rows.push(vec![
                cell(Some(&g.interface_name)),
                cell(g.mac.as_deref()),
                cell(Some(&g.ip_addresses.join(","))),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }

    if let Some(connected) = doc.guest_agent_connected {
        out.push('\n');
        out.push_str(if connected {
            "guest agent: connected\n"
        } else {
            "guest agent: not connected\n"
        });
    }
    out
}

/// Columns padded to their widest cell, three spaces apart (as kubectl), no
/// trailing spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, value) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("   ");
            }
            line.push_str(value);
            let pad = widths[c].saturating_sub(value.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn cell(value: Option<&str>) -> String {
    match value.map(clean) {
        Some(v) if !v.is_empty() => v,
        _ => "-".to_owned(),
    }
}

/// Guest interface names and addresses come from the guest agent, i.e. from
/// whoever controls the guest: control characters (terminal escapes,
/// newlines) are replaced so they cannot rewrite the operator's terminal or
/// break the table.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// kubectl's `HumanDuration` (apimachinery `util/duration`): the precision
/// falls as the age grows, e.g. `45s`, `119s`, `3m12s`, `125m`, `3h5m`, `4d`.
pub fn human_duration(d: Duration) -> String {
    let seconds = d.as_secs();
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{days}d")
        } else {
            format!("{days}d{h}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        let d = days % 365;
        return if d == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{d}d")
        };
    }
    format!("{years}y")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::plan::Phase;
    use crate::status::{GuestInterfaceStatus, InterfaceStatus, PhaseTransition, Timestamp};

    fn at(now: SystemTime, ago: u64) -> Timestamp {
        Timestamp {
            time: now - Duration::from_secs(ago),
            monotonic_ns: 0,
        }
    }

    #[test]
    fn kubectl_ages() {
        let cases = [
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (192, "3m12s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (2 * 3600 + 5 * 60, "125m"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (3 * 3600, "3h"),
            (30 * 3600, "30h"),
            (4 * 86400, "4d"),
            (4 * 86400 + 3 * 3600, "4d3h"),
            (100 * 86400, "100d"),
            (3 * 365 * 86400 + 86400, "3y1d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(Duration::from_secs(secs)), want, "{secs}");
        }
    }

    #[test]
    fn table_golden() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        let doc = StatusDocument {
            interfaces: vec![
                InterfaceStatus {
                    interface_name: Some("eth1".into()),
                    mac: Some("02:00:00:aa:bb:01".into()),
                    ip_address: Some("10.10.0.5/24".into()),
                    ip_addresses: vec!["10.10.0.5/24".into(), "fd00::5/64".into()],
                    pod_interface_name: Some("pod9a6a0c3b4d8".into()),
                    link_state: Some("up".into()),
                    phase_transitions: vec![
                        PhaseTransition {
                            phase: Phase::Plumbed,
                            at: at(now, 200),
                        },
                        PhaseTransition {
                            phase: Phase::Attached,
                            at: at(now, 192),
                        },
                    ],
                    ..InterfaceStatus::new("dyniface1", Phase::Attached)
                },
                InterfaceStatus {
                    pod_interface_name: Some("pod5e1f0a2c7b3".into()),
                    message: Some(
                        "no free PCIe root port for hotplug: 4 of 4 in use\nretrying".into(),
                    ),
                    phase_transitions: vec![PhaseTransition {
                        phase: Phase::Failed,
                        at: at(now, 3 * 3600 + 5 * 60),
                    }],
                    ..InterfaceStatus::new("dyniface2", Phase::Failed)
                },
                InterfaceStatus::new("default", Phase::Unsupported),
            ],
            guest_interfaces: vec![GuestInterfaceStatus {
                interface_name: "docker0\x1b[2J".into(),
                mac: None,
                ip_addresses: vec!["172.17.0.1/16".into()],
            }],
            guest_agent_connected: Some(true),
        };
        let want = "\
NAME        POD IFACE        GUEST IFACE   MAC                 IPS                       LINK   PHASE         AGE
dyniface1   pod9a6a0c3b4d8   eth1          02:00:00:aa:bb:01   10.10.0.5/24,fd00::5/64   up     Attached      3m12s
dyniface2   pod5e1f0a2c7b3   -             -                   -                         -      Failed        3h5m
default     -                -             -                   -                         -      Unsupported   -

dyniface2: no free PCIe root port for hotplug: 4 of 4 in use retrying

GUEST-ONLY IFACE   MAC   IPS
docker0 [2J        -     172.17.0.1/16

guest agent: connected
";
        assert_eq!(render_table(&doc, now), want);
    }

    #[test]
    fn table_of_empty_document() {
        let doc = StatusDocument::default();
        assert_eq!(
            render_table(&doc, SystemTime::now()),
            "NAME   POD IFACE   GUEST IFACE   MAC   IPS   LINK   PHASE   AGE\n"
        );
        let doc = StatusDocument {
            guest_agent_connected: Some(false),
            ..StatusDocument::default()
        };
        assert!(render_table(&doc, SystemTime::now()).ends_with("\nguest agent: not connected\n"));
    }

    #[test]
    fn connect_error_names_socket_and_hint() {
        let e = ClientError::Connect {
            path: PathBuf::from(crate::api::DEFAULT_SOCKET),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("cannot connect to nicplug at /var/run/nicplug/nicplug.sock: "),
            "{text}"
        );
        assert!(text.ends_with("; is nicplug running?"), "{text}");
    }
}
