//! One server task per interface, kept equal to what each reconcile pass
//! wants (level-triggered, like everything else in the agent): a pass
//! computes the desired servers ([`Desired`]) and [`Servers::reconcile`]
//! starts the missing ones, stops those no longer wanted or whose lease
//! changed, and restarts a task that died (its tap went away, the socket
//! was refused) after a backoff of 1 s doubling to 60 s, so a missing
//! capability costs one attempt a minute, not a retry storm.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
// The agent loop's clock: a retry time is one of its deadlines (and under
// a paused test clock a std::time deadline would never come).
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::frame;
use super::lease::LeaseConfig;
use super::server::{Outcome, answer};
use super::socket::TapSocket;
use crate::metrics::Metrics;
use crate::model::{IfName, Mac};
use crate::status::{DhcpStatus, Timestamp};

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A guest can send requests as fast as it likes: each kind of outcome is
/// logged at INFO at most this often per interface, the rest at DEBUG.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A server one interface should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub network: String,
    pub tap: IfName,
    /// The Ethernet source of replies: the bridge's MAC (nicplug's own).
    pub server_mac: Mac,
    pub lease: LeaseConfig,
}

/// What a task reports back.
#[derive(Debug, Default)]
struct Shared {
    serving: bool,
    /// Why it is not serving (the socket was refused, the tap is gone).
    reason: Option<String>,
    last_lease: Option<Timestamp>,
    dead: bool,
}

struct Running {
    desired: Desired,
    handle: JoinHandle<()>,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Retry {
    failures: u32,
    at: Option<Instant>,
    reason: Option<String>,
    last_lease: Option<Timestamp>,
}

/// A task wakes the agent loop at most this often for acknowledged leases
/// (a guest can send REQUESTs as fast as it likes; each wake is a pass).
const WAKE_EVERY: Duration = Duration::from_secs(1);

/// The running servers.
#[derive(Default)]
pub struct Servers {
    running: HashMap<String, Running>,
    retry: HashMap<String, Retry>,
    metrics: Option<Arc<Metrics>>,
    /// Notified when a task's state changed (started, died, a lease).
    changed: Arc<Notify>,
}

impl Servers {
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            running: HashMap::new(),
            retry: HashMap::new(),
            metrics,
            changed: Arc::new(Notify::new()),
        }
    }

    /// What the agent loop waits on besides its other triggers.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// When the next server that died may be started again (only times
    /// still ahead: a past one would wake the loop at once, forever).
    pub fn next_retry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.retry
            .values()
            .filter_map(|r| r.at)
            .filter(|at| *at > now)
            .min()
    }

    /// Makes the running servers equal `desired`.
    pub fn reconcile(&mut self, desired: Vec<Desired>) {
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| {
                !desired
                    .iter()
                    .any(|d| &d.network == *name && *d == r.desired)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(running) = self.running.remove(&name) {
                running.handle.abort();
                info!(iface = %name, "dhcp server stopped");
            }
        }
        self.retry
            .retain(|name, _| desired.iter().any(|d| &d.network == name));
        for want in desired {
            let name = want.network.clone();
            if let Some(running) = self.running.get(&name) {
                let shared = lock(&running.shared);
                if !shared.dead {
                    continue;
                }
                let retry = self.retry.entry(name.clone()).or_default();
                retry.failures += 1;
                let delay = RETRY_FIRST
                    .saturating_mul(1 << (retry.failures - 1).min(6))
                    .min(RETRY_MAX);
                retry.at = Some(Instant::now() + delay);
                retry.reason.clone_from(&shared.reason);
                retry.last_lease = shared.last_lease;
                drop(shared);
                self.running.remove(&name);
                continue;
            }
            let retry = self.retry.entry(name.clone()).or_default();
            if retry.at.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            let shared = Arc::new(Mutex::new(Shared {
                last_lease: retry.last_lease,
                ..Shared::default()
            }));
            let span = info_span!("interface", iface = %name);
            let handle = tokio::spawn(
                serve(
                    want.clone(),
                    shared.clone(),
                    self.metrics.clone(),
                    self.changed.clone(),
                )
                .instrument(span),
            );
            self.running.insert(
                name,
                Running {
                    desired: want,
                    handle,
                    shared,
                },
            );
        }
    }

    /// The status of `network`'s server, `None` when it has none.
    pub fn status(&self, network: &str) -> Option<DhcpStatus> {
        let running = self.running.get(network);
        let retry = self.retry.get(network);
        if running.is_none() && retry.is_none() {
            return None;
        }
        let address =
            running.map(|r| format!("{}/{}", r.desired.lease.address, r.desired.lease.prefix));
        let (serving, reason, last_lease) = match running {
            Some(r) => {
                let s = lock(&r.shared);
                let reason = s
                    .reason
                    .clone()
                    .or_else(|| (!s.serving).then(|| "starting".to_string()));
                (s.serving && !s.dead, reason, s.last_lease)
            }
            None => {
                let r = retry.expect("checked above");
                (false, r.reason.clone(), r.last_lease)
            }
        };
        Some(DhcpStatus {
            served: serving,
            reason: if serving { None } else { reason },
            address,
            last_lease,
        })
    }

    /// Stops every server (shutdown).
    pub fn stop_all(&mut self) {
        for (_, running) in self.running.drain() {
            running.handle.abort();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a socket could not be opened, for the status.
fn refused(tap: &IfName, error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "not served: opening a packet socket on {tap} needs CAP_NET_RAW, which nicplug does not have"
        ),
        _ => format!("not served: cannot open a packet socket on {tap}: {error}"),
    }
}

/// Serves one interface until the task is aborted or the socket fails.
async fn serve(
    desired: Desired,
    shared: Arc<Mutex<Shared>>,
    metrics: Option<Arc<Metrics>>,
    changed: Arc<Notify>,
) {
    let Desired {
        network,
        tap,
        server_mac,
        lease,
    } = desired;
    let socket = match TapSocket::open(&tap) {
        Ok(socket) => socket,
        Err(e) => {
            let reason = refused(&tap, &e);
            warn!(%tap, error = %e, "dhcp server cannot start");
            let mut s = lock(&shared);
            s.reason = Some(reason);
            s.dead = true;
            changed.notify_one();
            return;
        }
    };
    lock(&shared).serving = true;
    changed.notify_one();
    let mut woken_at: Option<Instant> = None;
    info!(%tap, address = %lease.address, prefix = lease.prefix, server = %lease.server, "dhcp server started");
    let mut logged: HashMap<&'static str, Instant> = HashMap::new();
    let mut log = |kind: &'static str, text: String| {
        let now = Instant::now();
        if logged
            .get(kind)
            .is_none_or(|at| now.duration_since(*at) >= LOG_EVERY)
        {
            logged.insert(kind, now);
            info!(outcome = kind, "{text}");
        } else {
            debug!(outcome = kind, "{text}");
        }
    };
    loop {
        let frame_bytes = match socket.receive().await {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(%tap, error = %e, "dhcp server socket failed");
                let mut s = lock(&shared);
                s.serving = false;
                s.reason = Some(format!(
                    "not served: the packet socket on {tap} failed: {e}"
                ));
                s.dead = true;
                changed.notify_one();
                return;
            }
        };
        let received = match frame::parse(&frame_bytes) {
            Ok(received) => received,
            Err(e) => {
                log(
                    "malformed",
                    format!("frame from the guest is no DHCP request: {e}"),
                );
                continue;
            }
        };
        if received.source != lease.client {
            log(
                "foreign",
                format!("request from {} ignored: not the VM's MAC", received.source),
            );
            continue;
        }
        let (reply, outcome) = answer(&received.message, &lease);
        match &outcome {
            Outcome::Acked => {
                lock(&shared).last_lease = Some(Timestamp::now());
                if woken_at.is_none_or(|at| at.elapsed() >= WAKE_EVERY) {
                    woken_at = Some(Instant::now());
                    changed.notify_one();
                }
                if let Some(metrics) = &metrics {
                    metrics.inc_dhcp_lease(&network);
                }
                log("ack", format!("lease {} acknowledged", lease.address));
            }
            Outcome::Offered => log("offer", format!("offered {}", lease.address)),
            Outcome::Nacked { requested } => log(
                "nak",
                format!(
                    "request for {requested} refused (NAK): the lease is {}",
                    lease.address
                ),
            ),
            Outcome::Informed => log("inform", "configuration sent (INFORM)".into()),
            Outcome::Released => log("release", "the guest released its lease".into()),
            Outcome::Declined => log(
                "decline",
                format!(
                    "the guest declined {}: it saw the address in use",
                    lease.address
                ),
            ),
            Outcome::Ignored(why) => log("ignored", format!("request ignored: {why}")),
        }
        if let Some(reply) = reply {
            let bytes = frame::build(
                &reply.message,
                server_mac,
                lease.server,
                lease.client,
                reply.destination,
            );
            if let Err(e) = socket.send(&bytes, lease.client).await {
                log("send", format!("cannot send the reply: {e}"));
            }
        }
    }
}
