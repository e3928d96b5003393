//! The API over real sockets: routes, the owner-only unix socket, stale and
//! live sockets, TCP only on request, and the `nicplug status` client.
//! No root needed; as root, a non-owner connection attempt is also checked.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use nicplug::api::client::{ClientError, Format, fetch, fetch_with, status_command, watch_status};
use nicplug::api::{ApiError, ApiState, Readiness, Server, serve};
use nicplug::health::Part;
use nicplug::hypervisor::DomainLifecycle;
use nicplug::metrics::{Metrics, PlugStage, UnplugStage};
use nicplug::plan::Phase;
use nicplug::status::{
    AgentStatus, Dependency, DomainRef, InterfaceStatus, PhaseTransition, StatusDocument,
    Timestamp, VmiRef,
};

/// A unique directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "nicplug-api-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sample_doc() -> StatusDocument {
    StatusDocument {
        interfaces: vec![
            InterfaceStatus {
                interface_name: Some("eth1".into()),
                mac: Some("02:00:00:aa:bb:01".into()),
                ip_address: Some("10.10.0.5".into()),
                ip_addresses: vec!["10.10.0.5".into()],
                pod_interface_name: Some("pod9a6a0c3b4d8".into()),
                info_source: Some("domain, guest-agent".into()),
                link_state: Some("up".into()),
                queue_count: Some(1),
                pod_interface_seen: Some(Timestamp {
                    time: SystemTime::now() - Duration::from_secs(50),
                    monotonic_ns: 1,
                }),
                phase_transitions: vec![PhaseTransition {
                    phase: Phase::Attached,
                    at: Timestamp {
                        time: SystemTime::now() - Duration::from_secs(45),
                        monotonic_ns: 2,
                    },
                }],
                ..InterfaceStatus::new("dyniface1", Phase::Attached)
            },
            InterfaceStatus {
                message: Some("no free PCIe root port for hotplug: 4 of 4 in use".into()),
                ..InterfaceStatus::new("dyniface2", Phase::Failed)
            },
        ],
        guest_agent_connected: Some(true),
        agent: AgentStatus {
            ready: true,
            vmi: Some(VmiRef {
                namespace: "ns1".into(),
                name: "vm1".into(),
                uid: None,
            }),
            domain: Some(DomainRef {
                name: "ns1_vm1".into(),
                state: DomainLifecycle::Running,
            }),
            dependencies: ["libvirt", "netlink", "spec", "guestAgent"]
                .iter()
                .map(|name| Dependency {
                    name: name.to_string(),
                    ready: true,
                    reason: None,
                    required: *name != "guestAgent",
                })
                .collect(),
            last_reconcile: Some(Timestamp {
                time: SystemTime::now() - Duration::from_secs(2),
                monotonic_ns: 3,
            }),
            ..AgentStatus::default()
        },
        ..StatusDocument::default()
    }
}

struct Fixture {
    state: ApiState,
    status_tx: watch::Sender<StatusDocument>,
}

fn fixture() -> Fixture {
    let (status_tx, status) = watch::channel(sample_doc());
    Fixture {
        state: ApiState {
            status,
            readiness: Arc::new(Readiness::new()),
            metrics: Arc::new(Metrics::new()),
        },
        status_tx,
    }
}

/// A server running in the background; `stop` cancels it and returns how it
/// ended.
struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ApiError>>,
}

impl Running {
    fn start(server: Server) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self { shutdown, task }
    }

    async fn stop(self) -> Result<(), ApiError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops in time")
            .expect("server task does not panic")
    }
}

/// One request with any method, over any stream; status, headers, body.
async fn request<S>(stream: S, method: Method, path: &str) -> (u16, HeaderMap, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("response");
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    driver.abort();
    (code, headers, String::from_utf8(body.to_vec()).unwrap())
}

async fn unix_request(socket: &Path, method: Method, path: &str) -> (u16, HeaderMap, String) {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    request(stream, method, path).await
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_over_the_unix_socket() {
    let dir = TempDir::new("routes");
    let socket = dir.0.join("run").join("nicplug.sock");
    let fx = fixture();
    let readiness = fx.state.readiness.clone();
    let metrics = fx.state.metrics.clone();
    let server = Server::bind(fx.state.clone(), &socket, None).await.unwrap();
    assert_eq!(server.socket_path(), socket);
    let running = Running::start(server);

    // /status is the document.
    let (code, headers, body) = unix_request(&socket, Method::GET, "/status").await;
    assert_eq!(code, 200);
    assert_eq!(headers["content-type"], "application/json");
    let doc: StatusDocument = serde_json::from_str(&body).unwrap();
    assert_same(&doc, &fx.status_tx.borrow());
    // and follows the watch channel.
    fx.status_tx.send_modify(|d| d.interfaces.truncate(1));
    let (_, body) = fetch(&socket, "/status").await.unwrap();
    let doc: StatusDocument = serde_json::from_str(&body).unwrap();
    assert_eq!(doc.interfaces.len(), 1);

    assert_eq!(
        fetch(&socket, "/healthz").await.unwrap(),
        (200, "ok\n".into())
    );

    // /readyz names what is missing until everything is there.
    assert_eq!(
        fetch(&socket, "/readyz").await.unwrap(),
        (
            503,
            "not ready: libvirt (not connected yet), netlink (not subscribed yet), spec (no VMI read yet)\n"
                .into()
        )
    );
    readiness.set(Part::Libvirt, Ok(()));
    readiness.set(Part::Spec, Ok(()));
    assert_eq!(
        fetch(&socket, "/readyz").await.unwrap(),
        (503, "not ready: netlink (not subscribed yet)\n".into())
    );
    readiness.set(Part::Netlink, Ok(()));
    assert_eq!(
        fetch(&socket, "/readyz").await.unwrap(),
        (200, "ok\n".into())
    );
    readiness.set(Part::Libvirt, Err("not available".into()));
    assert_eq!(fetch(&socket, "/readyz").await.unwrap().0, 503);

    // /metrics parses and has the histograms.
    metrics.observe_plug(PlugStage::Attached, 0.25);
    metrics.observe_unplug(UnplugStage::Cleaned, 1.0);
    metrics.set_interfaces_per_phase(&[("Attached".into(), 1)]);
    let (code, headers, body) = unix_request(&socket, Method::GET, "/metrics").await;
    assert_eq!(code, 200);
    // Without an Accept header: the classic text format.
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{headers:?}"
    );
    assert!(!body.contains("# EOF"), "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let histogram = |metric: &str, stage: &str| {
        scrape.samples.iter().any(|s| {
            s.metric == metric
                && s.labels.get("stage") == Some(stage)
                && matches!(&s.value, prometheus_parse::Value::Histogram(b) if b.len() == 18)
        })
    };
    assert!(
        histogram("nicplug_plug_stage_seconds", "attached"),
        "{body}"
    );
    assert!(
        histogram("nicplug_unplug_stage_seconds", "cleaned"),
        "{body}"
    );
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "nicplug_interfaces"
                && s.labels.get("phase") == Some("Attached")
                && s.value == prometheus_parse::Value::Gauge(1.0))
    );

    // Unknown path: 404; other method: 405 naming GET.
    let (code, _, body) = unix_request(&socket, Method::GET, "/nope").await;
    assert_eq!(code, 404);
    assert!(body.starts_with("not found"), "{body}");
    let (code, _, _) = unix_request(&socket, Method::POST, "/nope").await;
    assert_eq!(code, 404);
    for path in ["/status", "/healthz", "/readyz", "/metrics"] {
        let (code, headers, body) = unix_request(&socket, Method::POST, path).await;
        assert_eq!(code, 405, "{path}");
        assert!(
            headers["allow"].to_str().unwrap().contains("GET"),
            "{headers:?}"
        );
        assert!(body.contains("method not allowed"), "{body}");
    }

    running.stop().await.unwrap();
    assert!(!socket.exists(), "socket removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_until_cancelled_and_removes_the_socket() {
    let dir = TempDir::new("serve");
    let socket = dir.0.join("nicplug.sock");
    let fx = fixture();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let socket = socket.clone();
        let shutdown = shutdown.clone();
        async move { serve(fx.state, &socket, None, shutdown).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while fetch(&socket, "/healthz").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(!socket.exists());
}

/// Runs `python3` as nobody, trying to connect to `socket`: Ok(true) when it
/// connected, Ok(false) on permission denied.
fn nobody_can_connect(socket: &Path) -> Result<bool, String> {
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let script = "import socket, sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        try:\n    s.connect(sys.argv[1])\n\
        except PermissionError:\n    sys.exit(13)\n\
        sys.exit(0)\n";
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-c",
            script,
        ])
        .arg(socket)
        .output()
        .map_err(|e| format!("cannot run setpriv: {e}"))?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(13) => Ok(false),
        _ => Err(format!(
            "probe as nobody failed: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_owner_only() {
    // Case 1: serve creates the directory: 0700 dir, 0600 socket.
    let dir = TempDir::new("perm");
    let socket = dir.0.join("sub").join("nicplug.sock");
    let server = Server::bind(fixture().state, &socket, None).await.unwrap();
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o600);
    let running = Running::start(server);
    assert_eq!(fetch(&socket, "/healthz").await.unwrap().0, 200);
    // No staging leftovers next to the socket.
    let entries: Vec<_> = std::fs::read_dir(socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("nicplug.sock")]);

    // Case 2: an existing world-searchable directory is left alone, and the
    // socket's own mode keeps others out.
    let open_dir = TempDir::new("perm-open");
    std::fs::create_dir_all(&open_dir.0).unwrap();
    std::fs::set_permissions(&open_dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let open_socket = open_dir.0.join("nicplug.sock");
    let open_server = Server::bind(fixture().state, &open_socket, None)
        .await
        .unwrap();
    assert_eq!(mode(&open_dir.0), 0o755);
    assert_eq!(mode(&open_socket), 0o600);
    let open_running = Running::start(open_server);

    if nix::unistd::geteuid().is_root() {
        // Prove the probe can succeed, so its "denied" means something.
        std::fs::set_permissions(&open_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(nobody_can_connect(&open_socket), Ok(true));
        std::fs::set_permissions(&open_socket, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(nobody_can_connect(&open_socket), Ok(false));
        // And through the 0700 directory of case 1.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(nobody_can_connect(&socket), Ok(false));
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    } else {
        eprintln!(
            "SKIPPED: not root, cannot check that another user is refused \
             (modes were checked)"
        );
    }
    running.stop().await.unwrap();
    open_running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_socket_is_refused_stale_socket_replaced() {
    let dir = TempDir::new("live");
    let socket = dir.0.join("nicplug.sock");
    let first = Running::start(Server::bind(fixture().state, &socket, None).await.unwrap());

    let err = Server::bind(fixture().state, &socket, None)
        .await
        .expect_err("second server on a live socket");
    assert!(matches!(err, ApiError::InUse { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "another server is already listening on {}; is nicplug already running?",
            socket.display()
        )
    );
    // The first server is unharmed.
    assert_eq!(fetch(&socket, "/healthz").await.unwrap().0, 200);
    first.stop().await.unwrap();

    // A stale socket: bound once, nobody listening any more.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let fx = fixture();
    let second = Running::start(Server::bind(fx.state, &socket, None).await.unwrap());
    assert_eq!(fetch(&socket, "/healthz").await.unwrap().0, 200);
    assert_eq!(mode(&socket), 0o600);
    second.stop().await.unwrap();
    assert!(!socket.exists());

    // A regular file is never replaced.
    std::fs::write(&socket, "keep me").unwrap();
    let err = Server::bind(fixture().state, &socket, None)
        .await
        .expect_err("not a socket");
    assert!(matches!(err, ApiError::NotASocket { .. }), "{err:?}");
    assert!(err.to_string().contains(&socket.display().to_string()));
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "keep me");
}

/// Inodes of this process's sockets.
fn own_socket_inodes() -> HashSet<u64> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            t.parse().ok()
        })
        .collect()
}

/// This process's listening TCP sockets, from the kernel's tables (not from
/// the server's own bookkeeping).
fn own_tcp_listeners() -> usize {
    let own = own_socket_inodes();
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // st == 0A is LISTEN; field 9 is the inode.
                    let listening = fields.get(3) == Some(&"0A");
                    let inode: u64 = fields.get(9)?.parse().ok()?;
                    Some(listening && own.contains(&inode))
                })
                .collect::<Vec<_>>()
        })
        .filter(|own_listener| *own_listener)
        .count()
}

// The only test in this binary that opens TCP listeners, so the process-wide
// count below is not disturbed by the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_only_when_asked() {
    let dir = TempDir::new("tcp");
    let socket = dir.0.join("nicplug.sock");
    let before = own_tcp_listeners();
    assert_eq!(before, 0, "no TCP listener before any server");

    // With an address: it listens and answers there.
    let server = Server::bind(
        fixture().state,
        &socket,
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let addr = server.tcp_addr().expect("tcp address");
    assert_ne!(addr.port(), 0);
    assert_eq!(own_tcp_listeners(), 1, "the detector sees the listener");
    let running = Running::start(server);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (code, _, body) = request(stream, Method::GET, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    running.stop().await.unwrap();
    assert_eq!(own_tcp_listeners(), 0, "TCP listener closed on shutdown");

    // Without: only the unix socket.
    let server = Server::bind(fixture().state, &socket, None).await.unwrap();
    assert_eq!(server.tcp_addr(), None);
    let running = Running::start(server);
    assert_eq!(fetch(&socket, "/healthz").await.unwrap().0, 200);
    assert_eq!(own_tcp_listeners(), 0, "no TCP listener without an address");
    running.stop().await.unwrap();

    // A bad address is named in the error.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Server::bind(fixture().state, &socket, Some(addr))
        .await
        .expect_err("port in use");
    assert_eq!(err.to_string(), format!("cannot listen on tcp {addr}"));
    // and the unix socket it had bound is gone again.
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_prints_table_and_json() {
    let dir = TempDir::new("cli");
    let socket = dir.0.join("nicplug.sock");
    let fx = fixture();
    let running = Running::start(Server::bind(fx.state.clone(), &socket, None).await.unwrap());

    let printed = status_command(&socket, Format::Table).await.unwrap();
    assert!(printed.ready);
    let table = printed.text;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with(
            "vmi ns1/vm1   domain ns1_vm1 running   libvirt ok   netlink ok   spec ok   guest agent connected   reconciled "
        ) && lines[0].ends_with("s ago"),
        "{table}"
    );
    assert_eq!(lines[1], "", "{table}");
    assert!(
        lines[2].starts_with("NAME ") && lines[2].ends_with("PHASE      AGE"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("dyniface1   pod9a6a0c3b4d8   eth1 "),
        "{table}"
    );
    assert!(
        lines[3].ends_with("Attached   45s") || lines[3].ends_with("Attached   46s"),
        "{table}"
    );
    assert!(lines[4].starts_with("dyniface2 "), "{table}");
    assert!(
        table.ends_with("\ndyniface2: no free PCIe root port for hotplug: 4 of 4 in use\n"),
        "{table}"
    );

    // YAML: the same document.
    let yaml = status_command(&socket, Format::Yaml).await.unwrap().text;
    let from_yaml: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(
        from_yaml,
        serde_json::to_value(&*fx.status_tx.borrow()).unwrap()
    );

    // Not ready: the header says what and why, and `ready` is false (exit 3).
    fx.status_tx.send_modify(|d| {
        d.agent.ready = false;
        d.agent.dependencies[0].ready = false;
        d.agent.dependencies[0].reason =
            Some("cannot connect to libvirt at qemu:///system: gone".into());
    });
    let printed = status_command(&socket, Format::Table).await.unwrap();
    assert!(!printed.ready);
    assert!(
        printed.text.contains("   libvirt NOT READY   "),
        "{}",
        printed.text
    );
    assert!(
        printed
            .text
            .contains("\nnot ready: libvirt: cannot connect to libvirt at qemu:///system: gone\n"),
        "{}",
        printed.text
    );
    fx.status_tx.send_replace(sample_doc());

    let json = status_command(&socket, Format::Json).await.unwrap().text;
    let doc: StatusDocument = serde_json::from_str(&json).unwrap();
    assert_same(&doc, &fx.status_tx.borrow());
    assert!(
        json.contains("\n  \"interfaces\": ["),
        "pretty JSON: {json}"
    );

    running.stop().await.unwrap();

    // No server: a clear error naming the socket.
    let err = status_command(&socket, Format::Table)
        .await
        .expect_err("no server");
    assert!(matches!(err, ClientError::Connect { .. }));
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot connect to nicplug at {}: ",
            socket.display()
        )),
        "{text}"
    );
    assert!(text.ends_with("; is nicplug running?"), "{text}");
}

/// Equal as the API transports them (times to the millisecond).
fn assert_same(got: &StatusDocument, want: &StatusDocument) {
    assert_eq!(
        serde_json::to_value(got).unwrap(),
        serde_json::to_value(want).unwrap()
    );
    assert_eq!(got.interfaces.len(), want.interfaces.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_prompt_with_an_idle_keep_alive_client() {
    let dir = TempDir::new("idle");
    let socket = dir.0.join("nicplug.sock");
    let running = Running::start(Server::bind(fixture().state, &socket, None).await.unwrap());
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let req = Request::get("/healthz")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    // The connection stays open (keep-alive) while the server stops.
    let started = std::time::Instant::now();
    running.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "idle connection held shutdown for {:?}",
        started.elapsed()
    );
    assert!(!socket.exists());
    drop(sender);
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_long_poll_answers_on_change_only() {
    let dir = TempDir::new("watch");
    let socket = dir.0.join("nicplug.sock");
    let fx = fixture();
    let running = Running::start(Server::bind(fx.state.clone(), &socket, None).await.unwrap());

    let first = fetch_with(&socket, "/status", None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(first.code, 200);
    let etag = first.etag.clone().expect("an ETag");
    // Same document: 304 once the wait is over.
    let same = fetch_with(
        &socket,
        "/status?wait=0.2",
        Some(&etag),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(same.code, 304);
    // A change while waiting: answered with the new document.
    let tx = fx.status_tx.clone();
    let changer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_modify(|d| d.interfaces.truncate(1));
    });
    let changed = fetch_with(
        &socket,
        "/status?wait=30",
        Some(&etag),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    changer.await.unwrap();
    assert_eq!(changed.code, 200);
    assert_ne!(changed.etag.as_deref(), Some(etag.as_str()));
    let doc: StatusDocument = serde_json::from_str(&changed.body).unwrap();
    assert_eq!(doc.interfaces.len(), 1);

    // watch_status hands over the first document and every change.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = {
        let seen = seen.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            watch_status(&socket, Format::Json, |p| {
                seen.lock().unwrap().push(p.text.clone());
            })
            .await
        })
    };
    let wait_for = |n: usize| {
        let seen = seen.clone();
        async move {
            for _ in 0..500 {
                if seen.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "watch saw {} documents, not {n}",
                seen.lock().unwrap().len()
            );
        }
    };
    wait_for(1).await;
    fx.status_tx.send_modify(|d| d.interfaces.clear());
    wait_for(2).await;
    let last: StatusDocument = serde_json::from_str(seen.lock().unwrap().last().unwrap()).unwrap();
    assert!(last.interfaces.is_empty());
    // Nothing changes: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.lock().unwrap().len(), 2);
    running.stop().await.unwrap();
    // The agent gone: the watch ends with an error.
    let ended = tokio::time::timeout(Duration::from_secs(80), watcher)
        .await
        .expect("watch ends")
        .unwrap();
    assert!(ended.is_err());
}
