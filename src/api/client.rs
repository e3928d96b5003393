//! `nicplug status`: asks a running agent over its unix socket and prints
//! the status document as a table (or as JSON or YAML), once or on every
//! change (`--watch`, a long poll on `/status`: see the API module).

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
    #[error("cannot write the status document as YAML: {message}")]
    Yaml { message: String },
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
    let answer = fetch_with(socket, path, None, REQUEST_TIMEOUT).await?;
    Ok((answer.code, answer.body))
}

/// An answer of the API.
#[derive(Debug, Clone)]
pub struct Answer {
    pub code: u16,
    pub etag: Option<String>,
    pub body: String,
}

/// A GET with an optional `If-None-Match`, the whole exchange bounded by
/// `timeout`.
pub async fn fetch_with(
    socket: &Path,
    path: &str,
    if_none_match: Option<&str>,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    match tokio::time::timeout(timeout, fetch_inner(socket, path, if_none_match)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ClientError::Timeout {
            socket: socket.to_path_buf(),
            path: path.to_owned(),
            timeout,
        }),
    }
}

async fn fetch_inner(
    socket: &Path,
    path: &str,
    if_none_match: Option<&str>,
) -> Result<Answer, ClientError> {
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
    let mut request = Request::get(path).header(header::HOST, "localhost");
    if let Some(tag) = if_none_match {
        request = request.header(header::IF_NONE_MATCH, tag);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            path: path.to_owned(),
            source,
        })?;
    let result = async {
        let response = sender.send_request(request).await?;
        let code = response.status().as_u16();
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Answer {
            code,
            etag,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
    .await
    .map_err(http_err);
    drop(sender);
    driver.abort();
    result
}

/// How `nicplug status` prints the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The header and the table of [`render_table`].
    Table,
    /// Pretty JSON, as the agent sent it (fields this client does not know
    /// survive).
    Json,
    /// The same as YAML.
    Yaml,
}

/// One document as `nicplug status` prints it.
#[derive(Debug, Clone)]
pub struct Printed {
    pub text: String,
    /// `agent.ready` of the document: the exit code follows it.
    pub ready: bool,
    etag: Option<String>,
}

const STATUS_PATH: &str = "/status";

/// How long one `--watch` request waits for a change.
const WATCH_WAIT: Duration = Duration::from_secs(60);

fn printed(answer: Answer, format: Format) -> Result<Printed, ClientError> {
    if answer.code != 200 {
        return Err(ClientError::Status {
            path: STATUS_PATH.into(),
            code: answer.code,
            body: answer.body,
        });
    }
    let decode = |source| ClientError::Decode {
        path: STATUS_PATH.into(),
        source,
    };
    let value: serde_json::Value = serde_json::from_str(&answer.body).map_err(decode)?;
    let doc: StatusDocument = serde_json::from_value(value.clone()).map_err(decode)?;
    let text = match format {
        Format::Table => render_table(&doc, SystemTime::now()),
        Format::Json => {
            let mut text = serde_json::to_string_pretty(&value).map_err(decode)?;
            text.push('\n');
            text
        }
        Format::Yaml => serde_saphyr::to_string(&value).map_err(|e| ClientError::Yaml {
            message: e.to_string(),
        })?,
    };
    Ok(Printed {
        text,
        ready: doc.agent.ready,
        etag: answer.etag,
    })
}

/// The output of `nicplug status`.
pub async fn status_command(socket: &Path, format: Format) -> Result<Printed, ClientError> {
    let answer = fetch_with(socket, STATUS_PATH, None, REQUEST_TIMEOUT).await?;
    printed(answer, format)
}

/// `nicplug status --watch`: hands every new document to `each`, the first
/// at once, then each one the agent publishes (a long poll: nothing is
/// asked more often than the agent publishes, and at most every
/// [`WATCH_WAIT`] while nothing changes). Returns when the agent cannot be
/// reached any more.
pub async fn watch_status(
    socket: &Path,
    format: Format,
    mut each: impl FnMut(&Printed),
) -> Result<(), ClientError> {
    let first = status_command(socket, format).await?;
    each(&first);
    let mut etag = first.etag;
    let path = format!("{STATUS_PATH}?wait={}", WATCH_WAIT.as_secs());
    loop {
        let answer =
            fetch_with(socket, &path, etag.as_deref(), WATCH_WAIT + REQUEST_TIMEOUT).await?;
        if answer.code == 304 {
            continue;
        }
        let next = printed(answer, format)?;
        each(&next);
        etag = next.etag.clone();
    }
}

/// The header of the table: what the agent follows and whether it can
/// work, e.g. `vmi ns1/vm1   domain ns1_vm1 running   libvirt ok   netlink
/// ok   spec ok   guest agent connected   reconciled 2s ago`, then one
/// `not ready:` line per dependency that is not (with the reason). The
/// `plumbing` part (a migration target's) shows only when it is not ready.
pub fn render_header(doc: &StatusDocument, now: SystemTime) -> String {
    let agent = &doc.agent;
    let mut parts = Vec::new();
    parts.push(match &agent.vmi {
        Some(v) => format!("vmi {}/{}", clean(&v.namespace), clean(&v.name)),
        None => "vmi -".to_string(),
    });
    parts.push(match &agent.domain {
        Some(d) => format!("domain {} {}", clean(&d.name), d.state),
        None => "domain -".to_string(),
    });
    let mut reasons = Vec::new();
    for dep in &agent.dependencies {
        if dep.name == "plumbing" && dep.ready {
            // Only a migration target waits for it: said only when it does.
            continue;
        }
        let label = if dep.name == "guestAgent" {
            "guest agent"
        } else {
            dep.name.as_str()
        };
        let state = match (dep.required, dep.ready) {
            (_, true) if dep.name == "guestAgent" => "connected",
            (false, false) => "not connected",
            (_, true) => "ok",
            (true, false) => "NOT READY",
        };
        parts.push(format!("{} {state}", clean(label)));
        if dep.required && !dep.ready {
            reasons.push(format!(
                "not ready: {}: {}\n",
                clean(label),
                clean(dep.reason.as_deref().unwrap_or("no reason given"))
            ));
        }
    }
    parts.push(match &agent.last_reconcile {
        Some(at) => match now.duration_since(at.time) {
            Ok(d) => format!("reconciled {} ago", human_duration(d)),
            Err(_) => "reconciled 0s ago".to_string(),
        },
        None => "never reconciled".to_string(),
    });
    let mut out = parts.join("   ");
    out.push('\n');
    out.extend(reasons);
    if let Some(error) = agent.reconcile_error.as_deref() {
        out.push_str(&format!("last pass failed: {}\n", clean(error)));
    }
    out
}

/// A table for people: the header ([`render_header`]), one line per
/// interface, then the messages, then the interfaces only the guest knows.
/// Unknown values are `-`; the age is how long the interface has been in
/// its phase.
pub fn render_table(doc: &StatusDocument, now: SystemTime) -> String {
    let mut out = render_header(doc, now);
    out.push('\n');
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
    out.push_str(&table(&rows));

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
    use crate::status::{
        Dependency, GuestInterfaceStatus, InterfaceStatus, PhaseTransition, Timestamp,
    };

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
                InterfaceStatus::new("default", Phase::NotManaged),
            ],
            guest_interfaces: vec![GuestInterfaceStatus {
                interface_name: "docker0\x1b[2J".into(),
                mac: None,
                ip_addresses: vec!["172.17.0.1/16".into()],
            }],
            guest_agent_connected: Some(true),
            ..StatusDocument::default()
        };
        let want = "\
vmi -   domain -   never reconciled

NAME        POD IFACE        GUEST IFACE   MAC                 IPS                       LINK   PHASE        AGE
dyniface1   pod9a6a0c3b4d8   eth1          02:00:00:aa:bb:01   10.10.0.5/24,fd00::5/64   up     Attached     3m12s
dyniface2   pod5e1f0a2c7b3   -             -                   -                         -      Failed       3h5m
default     -                -             -                   -                         -      NotManaged   -

dyniface2: no free PCIe root port for hotplug: 4 of 4 in use retrying

GUEST-ONLY IFACE   MAC   IPS
docker0 [2J        -     172.17.0.1/16
";
        assert_eq!(render_table(&doc, now), want);
    }

    #[test]
    fn the_header_names_a_targets_plumbing_only_while_it_waits() {
        let dependency = |name: &str, reason: Option<&str>| Dependency {
            name: name.into(),
            ready: reason.is_none(),
            reason: reason.map(Into::into),
            required: true,
        };
        let mut doc = StatusDocument::default();
        doc.agent.dependencies = vec![dependency("libvirt", None), dependency("plumbing", None)];
        let header = render_header(&doc, SystemTime::now());
        assert!(
            header.contains("libvirt ok") && !header.contains("plumbing"),
            "{header}"
        );
        doc.agent.dependencies[1] = dependency(
            "plumbing",
            Some("not prepared for the domain: blue (waiting)"),
        );
        let header = render_header(&doc, SystemTime::now());
        assert!(header.contains("plumbing NOT READY"), "{header}");
        assert!(
            header.contains("not ready: plumbing: not prepared for the domain: blue (waiting)\n"),
            "{header}"
        );
    }

    #[test]
    fn table_of_empty_document() {
        let doc = StatusDocument::default();
        assert_eq!(
            render_table(&doc, SystemTime::now()),
            "vmi -   domain -   never reconciled\n\nNAME   POD IFACE   GUEST IFACE   MAC   IPS   LINK   PHASE   AGE\n"
        );
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
