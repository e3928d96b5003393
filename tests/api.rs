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

use nicplug::api::client::{ClientError, fetch, status_command};
use nicplug::api::{ApiError, ApiState, Readiness, Server, serve};
use nicplug::metrics::{Metrics, PlugStage, UnplugStage};
use nicplug::plan::Phase;
use nicplug::status::{InterfaceStatus, PhaseTransition, StatusDocument, Timestamp};

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
    readiness.set_libvirt(true);
    readiness.set_spec(true);
    assert_eq!(
        fetch(&socket, "/readyz").await.unwrap(),
        (503, "not ready: netlink (not subscribed yet)\n".into())
    );
    readiness.set_netlink(true);
    assert_eq!(
        fetch(&socket, "/readyz").await.unwrap(),
        (200, "ok\n".into())
    );
    readiness.set_libvirt(false);
    assert_eq!(fetch(&socket, "/readyz").await.unwrap().0, 503);

    // /metrics parses and has the histograms.
    metrics.observe_plug(PlugStage::Attached, 0.25);
    metrics.observe_unplug(UnplugStage::Cleaned, 1.0);
    metrics.set_interfaces_per_phase(&[("Attached".into(), 1)]);
    let (code, headers, body) = unix_request(&socket, Method::GET, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{headers:?}"
    );
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

    let table = status_command(&socket, false).await.unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME ") && lines[0].ends_with("PHASE      AGE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("dyniface1   pod9a6a0c3b4d8   eth1 "),
        "{table}"
    );
    assert!(
        lines[1].ends_with("Attached   45s") || lines[1].ends_with("Attached   46s"),
        "{table}"
    );
    assert!(lines[2].starts_with("dyniface2 "), "{table}");
    assert!(
        table.contains("\ndyniface2: no free PCIe root port for hotplug: 4 of 4 in use\n"),
        "{table}"
    );
    assert!(table.ends_with("guest agent: connected\n"), "{table}");

    let json = status_command(&socket, true).await.unwrap();
    let doc: StatusDocument = serde_json::from_str(&json).unwrap();
    assert_same(&doc, &fx.status_tx.borrow());
    assert!(
        json.contains("\n  \"interfaces\": ["),
        "pretty JSON: {json}"
    );

    running.stop().await.unwrap();

    // No server: a clear error naming the socket.
    let err = status_command(&socket, false).await.expect_err("no server");
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
