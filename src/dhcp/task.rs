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
use super::frame6::{self, ALL_NODES, ALL_NODES_MAC, Request6};
use super::lease::LeaseConfig;
use super::lease6::Lease6Config;
use super::ra;
use super::server::{Outcome, answer};
use super::server6::answer6;
use super::socket::TapSocket;
use crate::metrics::Metrics;
use crate::model::{IfName, Mac};
use crate::status::{DhcpStatus, Timestamp};

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// A guest can send requests as fast as it likes: each kind of outcome is
/// logged at INFO at most this often per interface, the rest at DEBUG.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Unsolicited router advertisements: the first few close together (RFC
/// 4861 6.2.4: at most 16 s apart, at most 3), then every 200 s, the
/// minimum interval RFC 4861 allows for the 600 s default maximum. The guest
/// also gets one at once for each router solicitation.
const RA_INITIAL: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(4),
    Duration::from_secs(8),
];
const RA_EVERY: Duration = Duration::from_secs(200);

/// What a server reads from the guest: a burst of this many frames, then
/// [`FRAMES_PER_SECOND`]. A guest sends a handful per lease; one that sends
/// more is read no faster than that, and the kernel drops the rest from the
/// socket's queue, so a flood costs nicplug (one thread for the whole agent)
/// next to nothing.
pub const FRAME_BURST: u32 = 64;
pub const FRAMES_PER_SECOND: u32 = 32;

/// The guest's frame budget, as a generic cell rate: each frame takes
/// 1/[`FRAMES_PER_SECOND`] s, and up to [`FRAME_BURST`] may be taken ahead.
#[derive(Debug)]
struct FrameBudget {
    /// When the next frame's share is free.
    next_share: Instant,
}

impl FrameBudget {
    const SHARE: Duration = Duration::from_nanos(1_000_000_000 / FRAMES_PER_SECOND as u64);

    fn new(now: Instant) -> Self {
        Self { next_share: now }
    }

    /// Takes one frame's share at `now`; over budget, takes nothing and
    /// says when the next share is free.
    fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let ahead = Self::SHARE * (FRAME_BURST - 1);
        let share = self.next_share.max(now);
        if share > now + ahead {
            return Err(share - ahead);
        }
        self.next_share = share + Self::SHARE;
        Ok(())
    }
}

/// A server one interface should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub network: String,
    pub tap: IfName,
    /// The Ethernet source of replies: the bridge's MAC (nicplug's own).
    pub server_mac: Mac,
    /// DHCPv4, when the pod link had an IPv4 address.
    pub lease: Option<LeaseConfig>,
    /// DHCPv6 and router advertisements, when it had an IPv6 address of
    /// IPAM's. At least one of the two is set.
    pub lease6: Option<Lease6Config>,
}

/// What a task reports back.
#[derive(Debug, Default)]
struct Shared {
    serving: bool,
    /// Why it is not serving (the socket was refused, the tap is gone).
    reason: Option<String>,
    last_lease: Option<Timestamp>,
    last_lease6: Option<Timestamp>,
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
    last_lease6: Option<Timestamp>,
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
                retry.last_lease6 = shared.last_lease6;
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
                last_lease6: retry.last_lease6,
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
        let desired = running.map(|r| &r.desired);
        let address = desired
            .and_then(|d| d.lease.as_ref())
            .map(|l| format!("{}/{}", l.address, l.prefix));
        let ipv6_address = desired
            .and_then(|d| d.lease6.as_ref())
            .map(|l| format!("{}/{}", l.address, l.prefix));
        let (serving, reason, last_lease, ipv6_last_lease) = match running {
            Some(r) => {
                let s = lock(&r.shared);
                let reason = s
                    .reason
                    .clone()
                    .or_else(|| (!s.serving).then(|| "starting".to_string()));
                (s.serving && !s.dead, reason, s.last_lease, s.last_lease6)
            }
            None => {
                let r = retry.expect("checked above");
                (false, r.reason.clone(), r.last_lease, r.last_lease6)
            }
        };
        Some(DhcpStatus {
            served: serving,
            reason: if serving { None } else { reason },
            address,
            last_lease,
            ipv6_address,
            ipv6_last_lease,
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
        lease6,
    } = desired;
    let socket = match TapSocket::open(&tap, lease6.is_some()) {
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
    // An absent family leaves its field out (tracing records `None` as
    // nothing).
    info!(
        %tap,
        address = lease.as_ref().map(|l| format!("{}/{}", l.address, l.prefix)),
        ipv6_address = lease6.as_ref().map(|l| format!("{}/{}", l.address, l.prefix)),
        "dhcp server started"
    );
    let mut served = Served {
        network: &network,
        shared: &shared,
        metrics: metrics.as_deref(),
        changed: &changed,
        woken_at: None,
        logged: HashMap::new(),
    };
    let started = Instant::now();
    let mut budget = FrameBudget::new(started);
    let mut advertised = 0;
    let mut next_ra = lease6.as_ref().map(|_| started);
    loop {
        let received = tokio::select! {
            received = socket.receive() => received,
            () = sleep_until(next_ra) => {
                advertised += 1;
                next_ra = Some(match RA_INITIAL.get(advertised) {
                    Some(after) => started + *after,
                    None => Instant::now() + RA_EVERY,
                });
                if let Some(lease6) = &lease6 {
                    send(&socket, &advertisement(lease6, server_mac, None), &mut served).await;
                }
                continue;
            }
        };
        let frame_bytes = match received {
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
        if let Err(free_at) = budget.take(Instant::now()) {
            served.log(
                "throttled",
                format!(
                    "the guest sends more than {FRAMES_PER_SECOND} frames a second to the DHCP server; the excess is dropped"
                ),
            );
            tokio::time::sleep_until(free_at).await;
            continue;
        }
        let reply = if frame6::is_ipv6(&frame_bytes) {
            lease6
                .as_ref()
                .and_then(|l| reply6(&frame_bytes, l, server_mac, &mut served))
        } else {
            lease
                .as_ref()
                .and_then(|l| reply4(&frame_bytes, l, server_mac, &mut served))
        };
        if let Some(reply) = reply {
            send(&socket, &reply, &mut served).await;
        }
    }
}

async fn send(socket: &TapSocket, frame: &[u8], served: &mut Served<'_>) {
    if let Err(e) = socket.send(frame).await {
        served.log("send", format!("cannot send to the VM: {e}"));
    }
}

/// Sleeps until `at`; never returns without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a serving task reports to, and its log rate limit.
struct Served<'a> {
    network: &'a str,
    shared: &'a Mutex<Shared>,
    metrics: Option<&'a Metrics>,
    changed: &'a Notify,
    woken_at: Option<Instant>,
    logged: HashMap<&'static str, Instant>,
}

impl Served<'_> {
    /// Logs `text` at INFO at most every [`LOG_EVERY`] per kind, else DEBUG.
    fn log(&mut self, kind: &'static str, text: String) {
        let now = Instant::now();
        if self
            .logged
            .get(kind)
            .is_none_or(|at| now.duration_since(*at) >= LOG_EVERY)
        {
            self.logged.insert(kind, now);
            info!(outcome = kind, "{text}");
        } else {
            debug!(outcome = kind, "{text}");
        }
    }

    /// What parsed, or `None` with the error logged.
    fn parsed<T>(
        &mut self,
        result: Result<T, frame::FrameError>,
        kind: &'static str,
        what: &str,
    ) -> Option<T> {
        result
            .map_err(|e| self.log(kind, format!("frame from the guest is no {what}: {e}")))
            .ok()
    }

    /// `Some` when `source` is the VM's MAC; else the frame is logged and
    /// dropped (another guest process spoofing, or a nested VM).
    fn sent_by_the_vm(&mut self, source: Mac, client: Mac) -> Option<()> {
        if source == client {
            return Some(());
        }
        self.log(
            "foreign",
            format!("request from {source} ignored: not the VM's MAC"),
        );
        None
    }

    /// The guest took a lease of `address`.
    fn leased(&mut self, address: std::net::IpAddr) {
        {
            let mut s = lock(self.shared);
            let at = Some(Timestamp::now());
            if address.is_ipv4() {
                s.last_lease = at;
            } else {
                s.last_lease6 = at;
            }
        }
        if self.woken_at.is_none_or(|at| at.elapsed() >= WAKE_EVERY) {
            self.woken_at = Some(Instant::now());
            self.changed.notify_one();
        }
        if let Some(metrics) = self.metrics {
            if address.is_ipv4() {
                metrics.inc_dhcp_lease(self.network);
            } else {
                metrics.inc_dhcpv6_lease(self.network);
            }
        }
    }

    /// Logs (and counts) what one request for the lease of `address` did.
    fn outcome(&mut self, outcome: &Outcome, address: std::net::IpAddr) {
        let kind = |v4: &'static str, v6: &'static str| if address.is_ipv4() { v4 } else { v6 };
        match outcome {
            Outcome::Acked => {
                self.leased(address);
                self.log(
                    kind("ack", "reply6"),
                    format!("lease {address} acknowledged"),
                );
            }
            Outcome::Offered => self.log(kind("offer", "advertise6"), format!("offered {address}")),
            Outcome::Nacked { requested } => self.log(
                kind("nak", "renew6-other"),
                format!("request for {requested} refused: the lease is {address}"),
            ),
            Outcome::Informed => self.log(kind("inform", "inform6"), "configuration sent".into()),
            Outcome::Confirmed { on_link } => self.log(
                "confirm6",
                format!(
                    "the guest's addresses are {}on this link",
                    if *on_link { "" } else { "not " }
                ),
            ),
            Outcome::Released => self.log(
                kind("release", "release6"),
                "the guest released its lease".into(),
            ),
            Outcome::Declined => self.log(
                kind("decline", "decline6"),
                format!("the guest declined {address}: it saw the address in use"),
            ),
            Outcome::Ignored(why) => self.log(
                kind("ignored", "ignored6"),
                format!("request ignored: {why}"),
            ),
        }
    }
}

/// The frame answering a DHCPv4 frame of the guest's, if any.
fn reply4(
    bytes: &[u8],
    lease: &LeaseConfig,
    server_mac: Mac,
    served: &mut Served<'_>,
) -> Option<Vec<u8>> {
    let received = served.parsed(frame::parse(bytes), "malformed", "DHCP request")?;
    served.sent_by_the_vm(received.source, lease.client)?;
    let (reply, outcome) = answer(&received.message, lease);
    served.outcome(&outcome, lease.address.into());
    let reply = reply?;
    Some(frame::build(
        &reply.message,
        server_mac,
        lease.server,
        lease.client,
        reply.destination,
    ))
}

/// The frame answering an IPv6 frame of the guest's (DHCPv6 or a router
/// solicitation), if any.
fn reply6(
    bytes: &[u8],
    lease: &Lease6Config,
    server_mac: Mac,
    served: &mut Served<'_>,
) -> Option<Vec<u8>> {
    let received = served.parsed(
        frame6::parse6(bytes),
        "malformed6",
        "DHCPv6 request or router solicitation",
    )?;
    served.sent_by_the_vm(received.source, lease.client)?;
    match &received.request {
        Request6::RouterSolicitation => {
            let to = (!received.from.is_unspecified()).then_some(received.from);
            Some(advertisement(lease, server_mac, to))
        }
        Request6::Dhcp(message) => {
            let (reply, outcome) = answer6(message, lease);
            served.outcome(&outcome, lease.address.into());
            Some(frame6::build_dhcp6(
                &reply?,
                server_mac,
                lease.server,
                lease.client,
                received.from,
            ))
        }
    }
}

/// One router advertisement, to `to` (a solicitation's source) or to all
/// nodes; either way it only leaves through the tap, to the VM.
fn advertisement(lease: &Lease6Config, server_mac: Mac, to: Option<std::net::Ipv6Addr>) -> Vec<u8> {
    let (source, body) = ra::advertisement(lease, server_mac);
    let (mac, ip) = match to {
        Some(ip) => (lease.client, ip),
        None => (ALL_NODES_MAC, ALL_NODES),
    };
    frame6::build_icmp6(body, server_mac, source, mac, ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_then_nothing_ahead_of_it() {
        let t0 = Instant::now();
        let mut budget = FrameBudget::new(t0);
        for n in 0..FRAME_BURST {
            assert_eq!(budget.take(t0), Ok(()), "frame {n} of the burst");
        }
        let free_at = budget.take(t0).unwrap_err();
        assert_eq!(free_at, t0 + FrameBudget::SHARE);
        assert!(budget.take(free_at - Duration::from_nanos(1)).is_err());
        assert_eq!(budget.take(free_at), Ok(()));
        // One second on, a second's worth of frames and no more.
        let later = free_at + Duration::from_secs(1);
        let taken = (0..2 * FRAMES_PER_SECOND)
            .filter(|_| budget.take(later).is_ok())
            .count();
        assert_eq!(taken, FRAMES_PER_SECOND as usize);
    }

    #[test]
    fn an_idle_guest_gets_its_whole_burst_back_and_no_more() {
        let t0 = Instant::now();
        let mut budget = FrameBudget::new(t0);
        assert_eq!(budget.take(t0), Ok(()));
        let idle = t0 + Duration::from_secs(3600);
        let taken = (0..2 * FRAME_BURST)
            .filter(|_| budget.take(idle).is_ok())
            .count();
        assert_eq!(taken, FRAME_BURST as usize);
    }
}
