//! The status document: per VMI interface, KubeVirt's `status.interfaces`
//! field names plus nicplug's phase and message. Written atomically (temp
//! file + rename) and only when it changed.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::hypervisor::{DomainLifecycle, DomainState, GuestView};
use crate::model::network_status::NetworkStatus;
use crate::model::{IpCidr, Mac};
use crate::plan::{Phase, Uplink};

/// A point in time on two clocks: wall time for people, CLOCK_MONOTONIC
/// nanoseconds for comparing with other processes on the same machine
/// (benchmark harnesses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timestamp {
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub monotonic_ns: u64,
}

impl Timestamp {
    pub fn now() -> Self {
        Self {
            time: SystemTime::now(),
            monotonic_ns: monotonic_ns(),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// When an interface entered a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    pub phase: Phase,
    #[serde(flatten)]
    pub at: Timestamp,
}

/// One VMI interface: KubeVirt's `status.interfaces` fields, then nicplug's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The VMI interface (and network) name.
    pub name: String,
    /// The interface name inside the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The first of `ip_addresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_interface_name: Option<String>,
    /// Comma-joined sources of this entry, as KubeVirt writes them
    /// (`domain, guest-agent, multus-status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_source: Option<String>,
    /// `up` or `down`, as the domain has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_count: Option<u32>,
    /// The device's PCI address in the domain (`0000:05:00.0`): the guest's
    /// predictable NIC name follows it (`enp5s0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When nicplug first saw the pod interface of this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_interface_seen: Option<Timestamp>,
    /// When each phase was entered, oldest first (the latest entry per phase).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transitions: Vec<PhaseTransition>,
    /// nicplug's DHCPv4 server for the VM on this interface; absent when
    /// nicplug serves none (an L2 network, an interface KubeVirt plumbed,
    /// a device not attached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpStatus>,
    /// The VM's uplink on plumbing of nicplug's: whether the pod link is on
    /// the bridge, and which rule said CNI was done with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<Uplink>,
}

/// Whether the VM gets DHCP (v4, and v6 with router advertisements) from
/// nicplug on an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DhcpStatus {
    /// The server is listening on the interface's tap.
    pub served: bool,
    /// Why not, when not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The address (with prefix) offered: the pod interface's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// When the guest last took its lease (the last ACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_lease: Option<Timestamp>,
    /// The IPv6 address (with prefix) leased by DHCPv6 IA_NA: the pod
    /// interface's, when IPAM gave it one.
    #[serde(
        default,
        rename = "ipv6Address",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_address: Option<String>,
    /// When the guest last took its IPv6 lease (the last Reply binding it).
    #[serde(
        default,
        rename = "ipv6LastLease",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_last_lease: Option<Timestamp>,
}

impl InterfaceStatus {
    pub fn new(name: impl Into<String>, phase: Phase) -> Self {
        Self {
            name: name.into(),
            interface_name: None,
            mac: None,
            ip_address: None,
            ip_addresses: Vec::new(),
            pod_interface_name: None,
            info_source: None,
            link_state: None,
            queue_count: None,
            pci_address: None,
            phase,
            message: None,
            pod_interface_seen: None,
            phase_transitions: Vec::new(),
            dhcp: None,
            uplink: None,
        }
    }

    /// When the current phase was entered.
    pub fn phase_since(&self) -> Option<&Timestamp> {
        self.phase_transitions
            .iter()
            .rev()
            .find(|t| t.phase == self.phase)
            .map(|t| &t.at)
    }
}

/// An interface the guest agent reports that matches no domain device
/// (loopback excluded), like KubeVirt's guest-only entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestInterfaceStatus {
    pub interface_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
}

/// KubeVirt caps guest-only interfaces at this many.
pub const MAX_GUEST_ONLY: usize = 10;

/// The `apiVersion` of the status document. A reader checks it before it
/// trusts any other field; fields are only ever added within a version.
/// The schema is `docs/status.schema.json`.
pub const API_VERSION: &str = "nicplug.kubevirt.io/v1";

/// `kind` of the status document.
pub const KIND: &str = "NicplugStatus";

/// The VMI the agent follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmiRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// The libvirt domain the agent plugs into and its state as the last pass
/// found it (`unknown` while libvirt does not answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainRef {
    pub name: String,
    pub state: DomainLifecycle,
}

/// What the agent needs, ready or not with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dependency {
    /// `libvirt`, `netlink`, `spec`, `plumbing` or `guestAgent`.
    pub name: String,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the agent's readiness (`/readyz`, `agent.ready`) depends on
    /// it. The guest agent does not: a guest without one still gets NICs.
    pub required: bool,
}

/// The agent itself: what it follows, whether it can work, when it last
/// looked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// nicplug's version.
    pub version: String,
    /// Every required dependency is ready (what `/readyz` answers).
    pub ready: bool,
    /// `None` until a spec was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmi: Option<VmiRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainRef>,
    pub dependencies: Vec<Dependency>,
    /// When the last reconcile pass completed (observed, planned, applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile: Option<Timestamp>,
    /// Why the passes since the last completed one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_error: Option<String>,
}

impl Default for AgentStatus {
    fn default() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: false,
            vmi: None,
            domain: None,
            dependencies: Vec::new(),
            last_reconcile: None,
            reconcile_error: None,
        }
    }
}

impl AgentStatus {
    pub fn dependency(&self, name: &str) -> Option<&Dependency> {
        self.dependencies.iter().find(|d| d.name == name)
    }
}

fn api_version() -> String {
    API_VERSION.to_string()
}

fn kind() -> String {
    KIND.to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDocument {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    #[serde(default)]
    pub agent: AgentStatus,
    /// Every spec interface in spec order (the primary network as
    /// `NotManaged`), then networks that left the spec while unplugging.
    pub interfaces: Vec<InterfaceStatus>,
    /// Interfaces only the guest knows, at most [`MAX_GUEST_ONLY`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_interfaces: Vec<GuestInterfaceStatus>,
    /// Whether the guest agent answers (`None` while nothing is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent_connected: Option<bool>,
}

impl Default for StatusDocument {
    fn default() -> Self {
        Self {
            api_version: api_version(),
            kind: kind(),
            agent: AgentStatus::default(),
            interfaces: Vec::new(),
            guest_interfaces: Vec::new(),
            guest_agent_connected: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write status file {path}")]
pub struct StatusError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Writes the document to `path` atomically: readers see the old or the new
/// document, never a partial one.
pub fn write_atomically(path: &Path, doc: &StatusDocument) -> Result<(), StatusError> {
    let err = |source| StatusError {
        path: path.to_path_buf(),
        source,
    };
    let mut json = serde_json::to_vec_pretty(doc).map_err(|e| err(e.into()))?;
    json.push(b'\n');
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        // No fsync: the rename alone makes the replacement atomic for
        // readers, and after a crash the next pass rewrites the document;
        // an fsync would put disk latency on the hot-plug path.
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubevirt_field_names_and_atomic_replace() {
        let doc = StatusDocument {
            interfaces: vec![InterfaceStatus {
                pod_interface_name: Some("pod9a6a0c3b4d8".into()),
                mac: Some("02:00:00:aa:bb:01".into()),
                link_state: Some("up".into()),
                info_source: Some("domain".into()),
                phase_transitions: vec![PhaseTransition {
                    phase: Phase::Attached,
                    at: Timestamp::now(),
                }],
                ..InterfaceStatus::new("dyniface1", Phase::Attached)
            }],
            ..StatusDocument::default()
        };
        let dir = std::env::temp_dir().join(format!("nicplug-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("status.json");
        write_atomically(&path, &doc).unwrap();
        write_atomically(&path, &doc).unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let iface = &value["interfaces"][0];
        assert_eq!(iface["podInterfaceName"], "pod9a6a0c3b4d8");
        assert_eq!(iface["infoSource"], "domain");
        assert_eq!(iface["linkState"], "up");
        assert_eq!(iface["phase"], "Attached");
        assert!(iface.get("message").is_none());
        assert_eq!(iface["phaseTransitions"][0]["phase"], "Attached");
        assert!(
            iface["phaseTransitions"][0]["time"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        assert!(
            iface["phaseTransitions"][0]["monotonicNs"]
                .as_u64()
                .unwrap()
                > 0
        );
        // The document reads back (the CLI and tests parse it).
        let back: StatusDocument = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(back.interfaces[0].name, "dyniface1");
        // only the status file is left, no temp files
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// What the status reads besides the plan: the live domain, the guest
/// agent's answer and Multus' network-status annotation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sources<'a> {
    pub domain: Option<&'a DomainState>,
    /// `None` until the guest agent was asked.
    pub guest: Option<&'a GuestView>,
    pub multus: Option<&'a [NetworkStatus]>,
}

/// KubeVirt leaves IPv6 link-local addresses out of `ipAddresses`.
fn reportable(cidr: &IpCidr) -> bool {
    match cidr.addr {
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        std::net::IpAddr::V4(_) => true,
    }
}

/// Fills KubeVirt's fields of `status` (built from the plan) from the
/// sources, matching guest data to the device by MAC, and promotes
/// `Attached` to `Ready` once the guest agent reports the device's MAC.
pub fn enrich(status: &mut InterfaceStatus, sources: &Sources<'_>) {
    let mut info = Vec::new();
    let alias = format!("ua-{}", status.name);
    let device = sources.domain.and_then(|d| d.interface_by_alias(&alias));
    if let Some(device) = device {
        info.push("domain");
        status.link_state = Some(if device.link_up { "up" } else { "down" }.into());
        status.queue_count = Some(device.queues.unwrap_or(1));
        status.pci_address = device.pci.map(|a| a.to_string());
        if let Some(mac) = device.mac {
            status.mac = Some(mac.to_string());
        }
    }
    let mac: Option<Mac> = status.mac.as_deref().and_then(|m| m.parse().ok());
    match sources.guest {
        Some(GuestView::Interfaces(guest)) => {
            if let Some(iface) = mac.and_then(|mac| guest.iter().find(|g| g.mac == Some(mac))) {
                info.push("guest-agent");
                status.interface_name = Some(iface.name.clone());
                status.ip_addresses = iface
                    .addresses
                    .iter()
                    .filter(|a| reportable(a))
                    .map(|a| a.addr.to_string())
                    .collect();
            }
        }
        Some(GuestView::NotConnected(reason)) if status.phase == Phase::Attached => {
            status.message = Some(format!("guest agent is not connected: {reason}"));
        }
        _ => {}
    }
    let pod = status.pod_interface_name.as_deref();
    if let Some(entry) = sources.multus.and_then(|m| {
        m.iter()
            .find(|e| pod.is_some() && e.interface.as_deref() == pod)
    }) {
        info.push("multus-status");
        if status.ip_addresses.is_empty() {
            status.ip_addresses = entry.ips.clone();
        }
        if status.mac.is_none() {
            status.mac = entry
                .mac
                .as_deref()
                .and_then(|m| m.parse::<Mac>().ok())
                .map(|m| m.to_string());
        }
    }
    status.ip_address = status.ip_addresses.first().cloned();
    status.info_source = (!info.is_empty()).then(|| info.join(", "));
}

/// Interfaces the guest agent reports that match no domain device by MAC
/// (loopback excluded), at most [`MAX_GUEST_ONLY`].
pub fn guest_only(sources: &Sources<'_>) -> Vec<GuestInterfaceStatus> {
    let Some(GuestView::Interfaces(guest)) = sources.guest else {
        return Vec::new();
    };
    let known = |mac: &Mac| {
        sources
            .domain
            .is_some_and(|d| d.interfaces.iter().any(|i| i.mac.as_ref() == Some(mac)))
    };
    guest
        .iter()
        .filter(|g| g.name != "lo")
        .filter(|g| g.mac.is_some_and(|m| m.octets() != [0; 6] && !known(&m)))
        .take(MAX_GUEST_ONLY)
        .map(|g| GuestInterfaceStatus {
            interface_name: g.name.clone(),
            mac: g.mac.map(|m| m.to_string()),
            ip_addresses: g
                .addresses
                .iter()
                .filter(|a| reportable(a))
                .map(|a| a.addr.to_string())
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod merge_tests {
    use super::*;
    use crate::hypervisor::{DomainInterface, GuestInterface};

    fn domain() -> DomainState {
        DomainState {
            running: true,
            persistent: true,
            interfaces: vec![DomainInterface {
                alias: Some("ua-blue".into()),
                mac: Some("02:00:00:AA:BB:01".parse().unwrap()),
                link_up: true,
                queues: Some(4),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn guest(mac: &str) -> GuestView {
        GuestView::Interfaces(vec![
            GuestInterface {
                name: "lo".into(),
                mac: "00:00:00:00:00:00".parse().ok(),
                addresses: vec!["127.0.0.1/8".parse().unwrap()],
            },
            GuestInterface {
                name: "eth1".into(),
                mac: mac.parse().ok(),
                addresses: vec![
                    "fe80::1/64".parse().unwrap(),
                    "169.254.2.50/24".parse().unwrap(),
                    "2001:db8::5/64".parse().unwrap(),
                ],
            },
            GuestInterface {
                name: "dummy0".into(),
                mac: "02:99:00:00:00:01".parse().ok(),
                addresses: vec![],
            },
        ])
    }

    fn multus() -> Vec<NetworkStatus> {
        crate::model::network_status::parse(
            r#"[{"name":"ns/blue-nad","interface":"pod9a6a0c3b4d8","ips":["169.254.2.2"],"mac":"76:44:89:E5:FF:34"}]"#,
        )
        .unwrap()
    }

    fn attached() -> InterfaceStatus {
        InterfaceStatus {
            pod_interface_name: Some("pod9a6a0c3b4d8".into()),
            mac: Some("02:00:00:aa:bb:01".into()),
            ..InterfaceStatus::new("blue", Phase::Attached)
        }
    }

    #[test]
    fn all_three_sources_in_kubevirts_shape() {
        let (dom, guest, multus) = (domain(), guest("02-00-00-aa-bb-01"), multus());
        let sources = Sources {
            domain: Some(&dom),
            guest: Some(&guest),
            multus: Some(&multus),
        };
        let mut status = attached();
        enrich(&mut status, &sources);
        // The fields only: the phase is the planner's to decide.
        assert_eq!(status.phase, Phase::Attached);
        assert_eq!(status.interface_name.as_deref(), Some("eth1"));
        assert_eq!(status.ip_address.as_deref(), Some("169.254.2.50"));
        assert_eq!(status.ip_addresses, ["169.254.2.50", "2001:db8::5"]);
        assert_eq!(
            status.info_source.as_deref(),
            Some("domain, guest-agent, multus-status")
        );
        assert_eq!(status.link_state.as_deref(), Some("up"));
        assert_eq!(status.queue_count, Some(4));
        assert_eq!(status.mac.as_deref(), Some("02:00:00:aa:bb:01"));
        let extra = guest_only(&sources);
        assert_eq!(extra.len(), 1);
        assert_eq!(extra[0].interface_name, "dummy0");
    }

    #[test]
    fn missing_sources_degrade_gracefully() {
        let dom = domain();
        let not_connected = GuestView::NotConnected("QEMU guest agent is not connected".into());
        let mut status = attached();
        enrich(
            &mut status,
            &Sources {
                domain: Some(&dom),
                guest: Some(&not_connected),
                multus: None,
            },
        );
        assert_eq!(status.phase, Phase::Attached);
        assert_eq!(status.info_source.as_deref(), Some("domain"));
        assert!(
            status
                .message
                .as_deref()
                .unwrap()
                .starts_with("guest agent is not connected")
        );

        // The guest has not reported the MAC yet: Attached, no guest fields.
        let other = guest("02:00:00:00:00:77");
        let mut status = attached();
        enrich(
            &mut status,
            &Sources {
                domain: Some(&dom),
                guest: Some(&other),
                multus: None,
            },
        );
        assert_eq!(status.phase, Phase::Attached);
        assert!(status.interface_name.is_none());

        // Only Multus knows the interface (no device yet): its IPs and MAC.
        let multus = multus();
        let mut status = InterfaceStatus {
            pod_interface_name: Some("pod9a6a0c3b4d8".into()),
            ..InterfaceStatus::new("blue", Phase::Pending)
        };
        enrich(
            &mut status,
            &Sources {
                domain: None,
                guest: None,
                multus: Some(&multus),
            },
        );
        assert_eq!(status.info_source.as_deref(), Some("multus-status"));
        assert_eq!(status.ip_address.as_deref(), Some("169.254.2.2"));
        assert_eq!(status.mac.as_deref(), Some("76:44:89:e5:ff:34"));
        assert_eq!(status.phase, Phase::Pending);
    }

    #[test]
    fn guest_only_entries_are_capped() {
        let many = GuestView::Interfaces(
            (0..20)
                .map(|i| GuestInterface {
                    name: format!("vlan{i}"),
                    mac: format!("02:00:00:00:01:{i:02x}").parse().ok(),
                    addresses: vec![],
                })
                .collect(),
        );
        let dom = domain();
        let sources = Sources {
            domain: Some(&dom),
            guest: Some(&many),
            multus: None,
        };
        assert_eq!(guest_only(&sources).len(), MAX_GUEST_ONLY);
    }
}
