//! The operator-facing HTTP API: the status document, liveness, readiness
//! and Prometheus metrics.
//!
//! | route          | answers                                                    |
//! | -------------- | ---------------------------------------------------------- |
//! | `GET /status`  | the [`StatusDocument`] as JSON, with an `ETag`             |
//! |                | (`?wait=SECONDS` + `If-None-Match`: long poll, below)      |
//! | `GET /healthz` | `200 ok` while the process serves requests                 |
//! | `GET /readyz`  | `200 ok` while libvirt, netlink and the spec are available,  |
//! |                | else `503 not ready: <part (reason)>, ..`                  |
//! | `GET /metrics` | OpenMetrics text when the `Accept` header asks for it,     |
//! |                | else Prometheus' classic text format                       |
//!
//! Anything else is `404`; another method on these paths is `405`.
//!
//! # Watching the status
//!
//! `GET /status?wait=60` with `If-None-Match: <the ETag of the document the
//! client has>` answers as soon as the agent publishes a different document
//! (`200`, the new document and its ETag), or `304` once the wait (at most
//! [`MAX_WAIT`]) is over without a change. The agent publishes only when the
//! document changed, so `nicplug status --watch` redraws on every change
//! and never polls faster than that.
//!
//! # Where it listens
//!
//! Always on a unix socket ([`DEFAULT_SOCKET`] unless told otherwise), which
//! `nicplug status` talks to. The status names pod links, MACs and guest
//! addresses, so the socket is owner-only (mode 0600), and it gets that mode
//! without a window in which it is more open:
//!
//! 1. The parent directory is created with mode 0700 when missing (an
//!    existing one is left as it is).
//! 2. An existing file at the path is probed: a live server answering there
//!    is an error (two agents would fight over the VM), a refused connection
//!    means a stale socket from an earlier run, which is replaced; a file
//!    that is not a socket is never touched.
//! 3. The socket is bound inside a fresh 0700 directory next to the target,
//!    chmod-ed to 0600 there, then renamed onto the target path. Nobody else
//!    can reach it before the mode is final, and the process-wide umask
//!    (shared with every other thread) is never changed.
//! 4. On shutdown (or when the serving future is dropped) the socket file is
//!    removed, unless another process has replaced it meanwhile.
//!
//! A TCP listener (for a kubelet probe or a Prometheus scrape) exists only
//! when an address is given; there is no default one, because over TCP the
//! API is open to anything on the pod network.

pub mod client;

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{self, Metrics};
use crate::status::StatusDocument;

/// Where the agent listens unless `--api-socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/nicplug/nicplug.sock";

/// How long shutdown waits for open requests before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest `?wait=` of a status long poll.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// How long probing an existing socket may take before it counts as live.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub use crate::health::Readiness;

/// What the handlers read. The status comes through a watch channel so the
/// reconcile loop publishes each new document without waiting for readers.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub status: watch::Receiver<StatusDocument>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot create socket directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("another server is already listening on {path}; is nicplug already running?")]
    InUse { path: PathBuf },
    #[error("cannot check whether a server listens on {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on unix socket {path}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on tcp {addr}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("api server on {listener} failed")]
    Serve {
        listener: String,
        #[source]
        source: std::io::Error,
    },
}

/// The routes; see the module doc.
pub fn router(state: ApiState) -> Router {
    router_until(state, CancellationToken::new())
}

/// The server's shutdown, for handlers that wait (the status long poll):
/// open connections outlive the accept loop, so they must end by
/// themselves.
#[derive(Clone)]
struct Stopping(CancellationToken);

/// [`router`] whose long polls end when `stop` is cancelled.
fn router_until(state: ApiState, stop: CancellationToken) -> Router {
    Router::new()
        .route("/status", get(status).fallback(method_not_allowed))
        .route("/healthz", get(healthz).fallback(method_not_allowed))
        .route("/readyz", get(readyz).fallback(method_not_allowed))
        .route("/metrics", get(metrics).fallback(method_not_allowed))
        .fallback(not_found)
        .layer(axum::Extension(Stopping(stop)))
        .with_state(state)
}

/// The ETag of a serialized document: a hash of its bytes.
pub fn etag(body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}

/// `wait=SECONDS` of a query string, capped at [`MAX_WAIT`].
fn wait_of(query: Option<&str>) -> Option<Duration> {
    let value = query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("wait="))?;
    let seconds: f64 = value
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)?;
    Some(Duration::from_secs_f64(seconds).min(MAX_WAIT))
}

async fn status(
    State(state): State<ApiState>,
    axum::Extension(Stopping(stop)): axum::Extension<Stopping>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> Response {
    let known = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut rx = state.status.clone();
    let serialize = |rx: &mut watch::Receiver<StatusDocument>| {
        // Serialize while holding the borrow: it is short and keeps the
        // document from being cloned.
        serde_json::to_vec(&*rx.borrow_and_update())
    };
    let mut json = serialize(&mut rx);
    if let (Some(wait), Some(known)) = (wait_of(uri.query()), known.as_deref()) {
        let deadline = tokio::time::Instant::now() + wait;
        while json.as_ref().is_ok_and(|body| etag(body) == known) {
            let changed = tokio::select! {
                changed = tokio::time::timeout_at(deadline, rx.changed()) => changed,
                _ = stop.cancelled() => return StatusCode::NOT_MODIFIED.into_response(),
            };
            match changed {
                Ok(Ok(())) => json = serialize(&mut rx),
                // Timed out, or the agent is shutting down.
                _ => return StatusCode::NOT_MODIFIED.into_response(),
            }
        }
    }
    match json {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json".to_string()),
                (header::ETAG, etag(&body)),
            ],
            body,
        )
            .into_response(),
        Err(e) => {
            warn!(error = %e, "cannot serialize the status document");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialize the status document\n",
            )
                .into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let not_ready = state.readiness.not_ready();
    if not_ready.is_empty() {
        "ok\n".into_response()
    } else {
        let parts: Vec<String> = not_ready
            .iter()
            .map(|(part, reason)| format!("{part} ({reason})"))
            .collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", parts.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<ApiState>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            state.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, metrics::TEXT_CONTENT_TYPE)],
            state.metrics.encode_text(),
        )
            .into_response()
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found; try /status, /healthz, /readyz or /metrics\n",
    )
}

async fn method_not_allowed() -> (StatusCode, &'static str) {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed; use GET\n",
    )
}

/// Binds the listeners, serves until `shutdown`, then removes the socket.
pub async fn serve(
    state: ApiState,
    socket: &Path,
    tcp: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    Server::bind(state, socket, tcp).await?.run(shutdown).await
}

/// Bound listeners that are not serving yet: binding and serving are apart so
/// a caller learns about a busy socket before spawning anything, and can read
/// the TCP port it got for `:0`.
#[derive(Debug)]
pub struct Server {
    state: ApiState,
    unix: UnixListener,
    socket: SocketFile,
    tcp: Option<TcpListener>,
}

impl Server {
    pub async fn bind(
        state: ApiState,
        socket: &Path,
        tcp: Option<SocketAddr>,
    ) -> Result<Self, ApiError> {
        let (unix, socket) = bind_unix(socket).await?;
        let tcp = match tcp {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ApiError::BindTcp { addr, source })?,
            ),
            None => None,
        };
        let tcp_addr = tcp
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "off".to_string(), |a| a.to_string());
        info!(
            socket = %socket.path.display(),
            tcp = %tcp_addr,
            "api listening"
        );
        Ok(Self {
            state,
            unix,
            socket,
            tcp,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// The bound TCP address (with the real port when `:0` was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then lets open requests finish
    /// for up to five seconds. The socket file is removed when this returns
    /// or is dropped.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ApiError> {
        let Self {
            state,
            unix,
            socket,
            tcp,
        } = self;
        let app = router_until(state, shutdown.clone());
        let unix_name = socket.path.display().to_string();
        let unix_server = {
            let app = app.clone();
            let stop = shutdown.clone();
            async move {
                axum::serve(unix, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .map_err(|source| ApiError::Serve {
                        listener: unix_name,
                        source,
                    })
            }
        };
        let tcp_server = {
            let stop = shutdown.clone();
            async move {
                let Some(listener) = tcp else {
                    return Ok(());
                };
                let name = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "tcp".into());
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .map_err(|source| ApiError::Serve {
                        listener: name,
                        source,
                    })
            }
        };
        let drain_deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        let result = tokio::select! {
            r = async { tokio::try_join!(unix_server, tcp_server) } => r.map(|_| ()),
            () = drain_deadline => {
                warn!(timeout_s = DRAIN_TIMEOUT.as_secs(), "api requests still open at shutdown, dropping them");
                Ok(())
            }
        };
        drop(socket);
        info!("api stopped");
        result
    }
}

/// The socket file this process created; removed on drop unless something
/// else now sits at the path (identified by device and inode).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "cannot remove api socket");
                }
            }
            Ok(_) => debug!(path = %self.path.display(), "api socket was replaced, leaving it"),
            Err(_) => {}
        }
    }
}

/// Distinguishes the private bind directories of several servers in one
/// process (tests).
static BIND_SEQ: AtomicU64 = AtomicU64::new(0);

async fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), ApiError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|source| ApiError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    probe_existing(path).await?;

    let bind_err = |source| ApiError::BindUnix {
        path: path.to_path_buf(),
        source,
    };
    let private = parent.join(format!(
        ".nicplug.{}.{}",
        std::process::id(),
        BIND_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    // A leftover from a crashed process that had our pid: ours to remove.
    if private.exists() {
        let _ = std::fs::remove_dir_all(&private);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(bind_err)?;
    let staged = private.join("s");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })();
    if let Err(e) = std::fs::remove_dir_all(&private) {
        warn!(path = %private.display(), error = %e, "cannot remove private bind directory");
    }
    let listener = bound.map_err(bind_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    let socket = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let listener = UnixListener::from_std(listener).map_err(bind_err)?;
    Ok((listener, socket))
}

/// Fails when a server answers at `path` or the path is not a socket; a
/// stale socket passes (the rename replaces it).
async fn probe_existing(path: &Path) -> Result<(), ApiError> {
    use std::os::unix::fs::FileTypeExt;

    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiError::Probe {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ApiError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {}
    }
    let in_use = || ApiError::InUse {
        path: path.to_path_buf(),
    };
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::UnixStream::connect(path)).await {
        // No answer in time: something holds it, with a full backlog.
        Err(_elapsed) => Err(in_use()),
        Ok(Ok(_stream)) => Err(in_use()),
        Ok(Err(e)) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "replacing stale api socket");
                Ok(())
            }
            std::io::ErrorKind::NotFound => Ok(()),
            std::io::ErrorKind::WouldBlock => Err(in_use()),
            _ => Err(ApiError::Probe {
                path: path.to_path_buf(),
                source: e,
            }),
        },
    }
}
