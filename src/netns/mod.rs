//! The pod network namespace seam: what nicplug reads from and does to the
//! links of the namespace it runs in.
//!
//! [`PodNetwork`] is the whole protocol. Every operation is idempotent: it
//! reads before it writes and treats "already so" as success, so a reconcile
//! that is interrupted at any point can simply be run again. The real
//! implementation ([`netlink::Netlink`]) speaks rtnetlink and uses
//! `/dev/net/tun` ioctls for taps; plan/apply tests use a fake.

use std::future::Future;

use crate::model::{IfName, IpCidr, Mac, Owner, PodLinkRecord, PodRoute};

pub mod netlink;
pub mod selinux;
pub mod tap;
pub mod watch;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netlink request {op} on {link} failed")]
    Netlink {
        op: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot add route {route} to {link}")]
    Route {
        route: String,
        link: IfName,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {0} not found")]
    NotFound(IfName),
    #[error("tap {tap}: {op} failed")]
    Tap {
        tap: IfName,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("link {link} exists but is a {found}, not a {expected}")]
    WrongKind {
        link: IfName,
        found: String,
        expected: &'static str,
    },
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    /// A tap of the right name exists but differs from its spec, and a
    /// process (QEMU) holds it open, so it cannot be recreated safely.
    #[error("tap {tap} is in use but {mismatch}")]
    TapInUse { tap: IfName, mismatch: String },
    /// SELinux is enabled and QEMU runs in another context than nicplug: a
    /// tap nicplug creates would carry nicplug's context and QEMU would be
    /// denied opening it (`tun_socket relabelfrom/relabelto`).
    #[error(
        "tap {tap}: QEMU runs in SELinux context {qemu} but nicplug in {own}; a tap nicplug creates would be denied to QEMU (run the sidecar with the launcher pod's seLinuxOptions)"
    )]
    SelinuxContext {
        tap: IfName,
        own: String,
        qemu: String,
    },
    #[error("network namespace: {op} failed")]
    Namespace {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot write {value} to {path}")]
    Sysctl {
        path: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
    /// Several independent sub-steps of one operation failed; every other
    /// sub-step was done. Each failure is shown with its whole cause chain,
    /// since a list has no single source.
    #[error("{op} of {link} is incomplete, {} sub-steps failed: {}", .errors.len(), chains(.errors))]
    Incomplete {
        op: &'static str,
        link: IfName,
        errors: Vec<NetnsError>,
    },
}

/// `a: cause: cause; b: cause`, for [`NetnsError::Incomplete`].
fn chains(errors: &[NetnsError]) -> String {
    errors
        .iter()
        .map(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The kind of a link, from IFLA_INFO_KIND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    /// A tun/tap device.
    Tun,
    Veth,
    /// Any other kind, by its IFLA_INFO_KIND ("" when the kernel gives none).
    Other(String),
}

impl LinkKind {
    /// The kind as `ip link` names it, for messages.
    pub fn name(&self) -> &str {
        match self {
            LinkKind::Bridge => "bridge",
            LinkKind::Tun => "tun",
            LinkKind::Veth => "veth",
            LinkKind::Other(kind) if kind.is_empty() => "link without a kind",
            LinkKind::Other(kind) => kind,
        }
    }
}

/// Tap-specific attributes (IFLA_TUN_*), when the link is a tun/tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapInfo {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub multi_queue: bool,
    pub vnet_hdr: bool,
    pub persist: bool,
    /// Whether a process holds it open: the kernel turns a tap's carrier on
    /// when a file descriptor attaches and off when the last one lets go.
    /// False for a tap no QEMU holds, such as one made again after it was
    /// deleted under a live device; `None` when the dump did not say.
    pub held: Option<bool>,
}

/// Whether CNI is done configuring a pod link (see `plan::CNI_SETTLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniProgress {
    /// A network-status source is configured and has no entry for the link
    /// yet: Multus writes it once CNI ADD returned.
    AwaitingNetworkStatus,
    /// No network-status to tell, and the link appeared or its addresses or
    /// routes changed within the settle window.
    Settling,
    Done(CniDone),
}

/// Which rule said CNI is done with a pod link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CniDone {
    /// Multus' network-status lists the link: CNI ADD returned.
    NetworkStatus,
    /// Without a network-status source: the link stayed as it was for the
    /// settle window.
    SettleWindow,
}

/// One link as observed in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: IfName,
    pub kind: LinkKind,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Index of the bridge this link is enslaved to.
    pub master: Option<u32>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub alias: Option<String>,
    pub addresses: Vec<IpCidr>,
    /// The addresses still in IPv6 duplicate address detection (tentative):
    /// CNI waits for them to settle before it adds its routes.
    pub tentative: Vec<IpCidr>,
    /// Whether CNI may still be configuring it (set by the agent from
    /// Multus' network-status and what its earlier passes saw, not by the
    /// netns layer).
    pub cni: CniProgress,
    /// The routes of every table whose output link this is and that the
    /// kernel does not recreate by itself when the addresses come back
    /// (not `proto kernel`, `ra` or `redirect`), in the kernel's dump order.
    pub routes: Vec<PodRoute>,
    /// Routes through this link that a record cannot carry (multipath,
    /// metrics, nexthop objects, ...), described: a pod link with one is
    /// not plumbed, since release could not give the route back.
    pub unrecordable_routes: Vec<String>,
    /// Bridge-port learning, when the link is a bridge port.
    pub learning: Option<bool>,
    pub tap: Option<TapInfo>,
}

impl Link {
    /// A macvtap (macvtap-cni's pod link): QEMU reaches it through
    /// `/dev/tap<index>`.
    pub fn is_macvtap(&self) -> bool {
        matches!(&self.kind, LinkKind::Other(kind) if kind == "macvtap")
    }
}

#[cfg(test)]
impl Link {
    /// A plain up link for unit tests: MTU 1400, MAC 0a:58:00:00:00:<index>.
    pub(crate) fn fixture(index: u32, name: &str, kind: LinkKind) -> Self {
        Self {
            index,
            name: IfName::new(name).expect("valid test link name"),
            kind,
            mac: Some(Mac::from_bytes([0x0a, 0x58, 0, 0, 0, index as u8])),
            mtu: 1400,
            master: None,
            up: true,
            alias: None,
            addresses: vec![],
            tentative: vec![],
            cni: CniProgress::Done(CniDone::SettleWindow),
            routes: vec![],
            unrecordable_routes: vec![],
            learning: None,
            tap: None,
        }
    }
}

/// What a tap must look like for QEMU to open it with the device XML nicplug
/// attaches: single-queue taps must not carry IFF_MULTI_QUEUE (facts.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    pub name: IfName,
    pub owner: Owner,
    pub mtu: u32,
    pub multi_queue: bool,
}

/// Operations on the pod network namespace. All are idempotent.
pub trait PodNetwork: Send + Sync {
    /// Every link of the namespace with its addresses.
    fn links(&self) -> impl Future<Output = Result<Vec<Link>, NetnsError>> + Send;

    /// Sets (or with `None` clears) a link's ifalias.
    fn set_alias(
        &self,
        link: &IfName,
        alias: Option<&str>,
    ) -> impl Future<Output = Result<(), NetnsError>> + Send;

    /// Creates bridge `name` with `mac` if it does not exist, and sets it up.
    /// Before it is up, it gets no IPv6 of its own (address generation off,
    /// no DAD, no router advertisements) and no multicast snooping (whose
    /// snooper-group joins send IGMP/MLD reports), so the bridge itself never
    /// speaks on the pod network. VLAN filtering and learning are left at the
    /// kernel's defaults.
    fn ensure_bridge(
        &self,
        name: &IfName,
        mac: Mac,
    ) -> impl Future<Output = Result<(), NetnsError>> + Send;

    /// Removes the addresses `recorded` (those of the pod link's record, the
    /// crash-safe state) from `pod`, then the `recorded_routes` the kernel
    /// kept (IPv6 routes outlive the addresses; a bridge port routes
    /// nothing), sets its MAC to `mac`, enslaves it to
    /// `bridge` with learning off, and sets it up. An address that is not in
    /// `recorded` (CNI added it after the record was written) stays: the
    /// planner records it and removes it on its next pass, so it is never
    /// lost.
    fn enslave_pod_link(
        &self,
        pod: &IfName,
        bridge: &IfName,
        mac: Mac,
        recorded: &[IpCidr],
        recorded_routes: &[PodRoute],
    ) -> impl Future<Output = Result<(), NetnsError>> + Send;

    /// Creates persistent tap `spec.name` through /dev/net/tun if it does not
    /// exist (owner, group, queue mode), turns its IPv6 off as for the
    /// bridge, sets its MTU, enslaves it to `bridge` and sets it up.
    fn ensure_tap(
        &self,
        spec: &TapSpec,
        bridge: &IfName,
    ) -> impl Future<Output = Result<(), NetnsError>> + Send;

    /// Releases `pod` from its bridge and restores the recorded MAC, MTU,
    /// addresses and routes (after the addresses, whose connected routes
    /// make the gateways reachable), then the previous alias (the record goes last, so an
    /// interrupted release is finished by the next reconcile). Every sub-step
    /// is tried even when another fails, and every failure is reported
    /// ([`NetnsError::Incomplete`]); the alias is only restored when all
    /// others succeeded, so the record stays for the retry. A pod link that
    /// no longer exists is success (nothing is left to give back).
    fn release_pod_link(
        &self,
        pod: &IfName,
        record: &PodLinkRecord,
    ) -> impl Future<Output = Result<(), NetnsError>> + Send;

    /// Deletes a link by name in one request; a link that does not exist is
    /// success.
    fn delete_link(&self, name: &IfName) -> impl Future<Output = Result<(), NetnsError>> + Send;
}

/// Whether the process at `proc_dir` (`/proc/<pid>`) is in this process'
/// network namespace. Another process' namespace link is readable only with
/// ptrace access (same uid, or root): one nicplug cannot read is not taken
/// for ours; our own unreadable (no /proc) is no evidence against. Finding "our" QEMU by its command line alone is fooled by
/// another launcher's QEMU on the same host when process ids are shared
/// (test rigs side by side; a pod with a host PID namespace).
pub fn in_our_netns(proc_dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &std::path::Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (
        ino(std::path::Path::new("/proc/self/ns/net")),
        ino(&proc_dir.join("ns/net")),
    ) {
        (Some(ours), Some(theirs)) => ours == theirs,
        (Some(_), None) => false,
        (None, _) => true,
    }
}

#[cfg(test)]
mod netns_tests {
    #[test]
    fn we_share_our_own_netns_and_not_a_missing_one() {
        assert!(super::in_our_netns(std::path::Path::new("/proc/self")));
        // Not readable (no such process): not ours.
        assert!(!super::in_our_netns(std::path::Path::new("/proc/0")));
    }
}
