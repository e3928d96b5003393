//! The agent's apply logic (ordering, rollback, backoff, isolation between
//! interfaces) against in-memory fakes of both seams. The fakes model the
//! kernel and libvirt only as far as the plan reads them back; the real
//! implementations are tested against the real things in `tests/`.

use std::sync::Mutex;

use super::*;
use crate::health::Readiness;
use crate::hypervisor::domain_xml::{RootPorts, parse_devices};
use crate::hypervisor::{GuestInterface, GuestView, QemuVersion};
use crate::model::network_status::NetworkStatus;
use crate::model::{IfName, IpCidr, Mac, PodLinkRecord, PodRoute};
use crate::netns::{CniDone, Link, LinkKind, TapInfo, TapSpec};
use crate::plan::Uplink;

#[derive(Default)]
struct FakeNet {
    links: Mutex<Vec<Link>>,
    calls: Mutex<Vec<String>>,
    fail: Mutex<Option<&'static str>>,
}

impl FakeNet {
    fn with_pod_links(names: &[&str]) -> Self {
        let mut links = vec![link(1, "lo", LinkKind::Other(String::new()))];
        for (i, name) in names.iter().enumerate() {
            links.push(Link {
                addresses: vec![format!("169.254.{i}.5/24").parse::<IpCidr>().unwrap()],
                ..link(10 + i as u32, name, LinkKind::Veth)
            });
        }
        Self {
            links: Mutex::new(links),
            ..Default::default()
        }
    }

    fn call(&self, op: &'static str, target: &IfName) -> Result<(), NetnsError> {
        self.calls.lock().unwrap().push(format!("{op} {target}"));
        if *self.fail.lock().unwrap() == Some(op) {
            return Err(NetnsError::NotFound(target.clone()));
        }
        Ok(())
    }

    fn edit(&self, name: &IfName, f: impl FnOnce(&mut Link)) {
        let mut links = self.links.lock().unwrap();
        f(links
            .iter_mut()
            .find(|l| &l.name == name)
            .expect("link exists"));
    }

    fn index_of(&self, name: &IfName) -> Option<u32> {
        self.links
            .lock()
            .unwrap()
            .iter()
            .find(|l| &l.name == name)
            .map(|l| l.index)
    }

    fn get(&self, name: &str) -> Option<Link> {
        self.links
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.name.as_str() == name)
            .cloned()
    }

    fn add(&self, link: Link) {
        let mut links = self.links.lock().unwrap();
        let index = links.iter().map(|l| l.index).max().unwrap_or(0) + 1;
        links.push(Link { index, ..link });
    }
}

fn link(index: u32, name: &str, kind: LinkKind) -> Link {
    Link::fixture(index, name, kind)
}

impl PodNetwork for FakeNet {
    async fn links(&self) -> Result<Vec<Link>, NetnsError> {
        Ok(self.links.lock().unwrap().clone())
    }

    async fn set_alias(&self, name: &IfName, alias: Option<&str>) -> Result<(), NetnsError> {
        self.call("set_alias", name)?;
        self.edit(name, |l| l.alias = alias.map(String::from));
        Ok(())
    }

    async fn ensure_bridge(&self, name: &IfName, mac: Mac) -> Result<(), NetnsError> {
        self.call("ensure_bridge", name)?;
        if self.index_of(name).is_none() {
            self.add(Link {
                mac: Some(mac),
                ..link(0, name.as_str(), LinkKind::Bridge)
            });
        }
        Ok(())
    }

    async fn enslave_pod_link(
        &self,
        pod: &IfName,
        bridge: &IfName,
        mac: Mac,
        recorded: &[IpCidr],
        _recorded_routes: &[PodRoute],
    ) -> Result<(), NetnsError> {
        self.call("enslave_pod_link", pod)?;
        let master = self.index_of(bridge);
        self.edit(pod, |l| {
            l.addresses.retain(|a| !recorded.contains(a));
            // The kernel drops a link's routes with its addresses.
            l.routes.clear();
            l.mac = Some(mac);
            l.master = master;
            l.learning = Some(false);
        });
        Ok(())
    }

    async fn ensure_tap(&self, spec: &TapSpec, bridge: &IfName) -> Result<(), NetnsError> {
        self.call("ensure_tap", &spec.name)?;
        let master = self.index_of(bridge);
        if self.index_of(&spec.name).is_none() {
            self.add(Link {
                mtu: spec.mtu,
                master,
                tap: Some(TapInfo {
                    owner: Some(spec.owner.uid),
                    group: Some(spec.owner.gid),
                    multi_queue: spec.multi_queue,
                    vnet_hdr: true,
                    persist: true,
                    // The fake kernel does not say who holds it.
                    held: None,
                }),
                ..link(0, spec.name.as_str(), LinkKind::Tun)
            });
        }
        Ok(())
    }

    async fn release_pod_link(
        &self,
        pod: &IfName,
        record: &PodLinkRecord,
    ) -> Result<(), NetnsError> {
        self.call("release_pod_link", pod)?;
        self.edit(pod, |l| {
            l.master = None;
            l.learning = None;
            l.mac = Some(record.mac);
            l.mtu = record.mtu;
            l.addresses = record.addresses.clone();
            l.routes = record.routes.clone();
            l.alias = record.previous_alias.clone();
        });
        Ok(())
    }

    async fn delete_link(&self, name: &IfName) -> Result<(), NetnsError> {
        self.call("delete_link", name)?;
        self.links.lock().unwrap().retain(|l| &l.name != name);
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum AttachMode {
    Works,
    Fails,
    /// No DEVICE_ADDED within the timeout, and the device never appears.
    TimesOut,
    /// No DEVICE_ADDED within the timeout, but the device is there.
    EventLost,
    /// Another agent attached the same alias first: the call fails, the
    /// device is there.
    LosesRace,
}

#[derive(Clone, Copy, PartialEq)]
enum DetachMode {
    Works,
    /// The guest never answers: no DEVICE_REMOVED, the device stays.
    Ignored,
    /// DEVICE_REMOVAL_FAILED.
    Refused,
}

struct FakeHyp {
    domain: Mutex<DomainState>,
    /// Attach behaviour per alias; `Works` when absent.
    modes: Mutex<HashMap<String, AttachMode>>,
    detach_mode: Mutex<DetachMode>,
    attaches: Mutex<Vec<String>>,
    detaches: Mutex<Vec<String>>,
    agent_connected: Mutex<bool>,
    /// An earlier guest agent query is still running.
    agent_busy: Mutex<bool>,
    /// Domain reads fail as with libvirt gone; each read is counted.
    unreachable: Mutex<bool>,
    domain_reads: Mutex<u32>,
    /// Cancelled after this many domain reads, so a loop that spins stops.
    stop_after_reads: Mutex<Option<(u32, CancellationToken)>>,
    /// No domain defined (a migration target before the domain arrives).
    absent: Mutex<bool>,
    /// The job libvirt's worker finds right before a device change; domain
    /// reads keep saying `domain`'s (a read from before the migration began).
    migration_job: Mutex<Migration>,
    /// Every live link state change: (alias, up).
    link_changes: Mutex<Vec<(String, bool)>>,
}

impl FakeHyp {
    fn new(free_ports: usize) -> Self {
        Self {
            domain: Mutex::new(DomainState {
                running: true,
                persistent: true,
                migration: Migration::None,
                arrived_by_migration: false,
                interfaces: vec![],
                root_ports: RootPorts::with_free(4, free_ports),
                qemu: Some(QemuVersion(10_000_002)),
                devices_unknown: false,
            }),
            modes: Mutex::default(),
            detach_mode: Mutex::new(DetachMode::Works),
            attaches: Mutex::default(),
            detaches: Mutex::default(),
            agent_connected: Mutex::new(true),
            agent_busy: Mutex::new(false),
            unreachable: Mutex::new(false),
            domain_reads: Mutex::new(0),
            stop_after_reads: Mutex::new(None),
            absent: Mutex::new(false),
            migration_job: Mutex::new(Migration::None),
            link_changes: Mutex::default(),
        }
    }

    fn device(&self, alias: &str) -> Option<crate::hypervisor::DomainInterface> {
        self.domain
            .lock()
            .unwrap()
            .interface_by_alias(alias)
            .cloned()
    }

    fn refuse_during_migration(&self) -> Result<(), HypervisorError> {
        match *self.migration_job.lock().unwrap() {
            Migration::None | Migration::Departed => Ok(()),
            migration => Err(HypervisorError::Migrating { migration }),
        }
    }

    fn set_mode(&self, alias: &str, mode: AttachMode) {
        self.modes.lock().unwrap().insert(alias.into(), mode);
    }
}

impl Hypervisor for FakeHyp {
    async fn domain(&self, _domain: &str) -> Result<Option<DomainState>, HypervisorError> {
        let reads = {
            let mut reads = self.domain_reads.lock().unwrap();
            *reads += 1;
            *reads
        };
        if let Some((limit, stop)) = &*self.stop_after_reads.lock().unwrap()
            && reads >= *limit
        {
            stop.cancel();
        }
        if *self.unreachable.lock().unwrap() {
            return Err(HypervisorError::Connect {
                uri: "qemu:///system".into(),
                message: "Failed to connect socket: No such file or directory".into(),
            });
        }
        if *self.absent.lock().unwrap() {
            return Ok(None);
        }
        Ok(Some(self.domain.lock().unwrap().clone()))
    }

    async fn attach(
        &self,
        _domain: &str,
        device: &crate::hypervisor::InterfaceDevice,
        _persistent: bool,
        timeout: Duration,
    ) -> Result<(), HypervisorError> {
        self.refuse_during_migration()?;
        let alias = device.alias();
        let alias = alias.as_str();
        let device_xml = device.to_xml().unwrap();
        self.attaches.lock().unwrap().push(alias.into());
        let mode = self
            .modes
            .lock()
            .unwrap()
            .get(alias)
            .copied()
            .unwrap_or(AttachMode::Works);
        if mode == AttachMode::Fails {
            return Err(HypervisorError::Libvirt {
                op: "attach the device",
                message: "internal error: boom".into(),
            });
        }
        if mode != AttachMode::TimesOut {
            let xml = format!("<domain><devices>{device_xml}</devices></domain>");
            let device = parse_devices(&xml).unwrap().interfaces.remove(0);
            let mut domain = self.domain.lock().unwrap();
            domain.interfaces.push(device);
            let DomainState {
                interfaces,
                root_ports,
                ..
            } = &mut *domain;
            root_ports.refresh(interfaces);
        }
        match mode {
            AttachMode::Works => Ok(()),
            AttachMode::LosesRace => Err(HypervisorError::Libvirt {
                op: "attach the device",
                message: "operation failed: non unique alias detected: ua-blue".into(),
            }),
            _ => Err(HypervisorError::AttachTimeout {
                alias: alias.into(),
                timeout,
            }),
        }
    }

    async fn detach(
        &self,
        _domain: &str,
        alias: &str,
        _persistent: bool,
        timeout: Duration,
    ) -> Result<(), HypervisorError> {
        self.refuse_during_migration()?;
        self.detaches.lock().unwrap().push(alias.into());
        let mut domain = self.domain.lock().unwrap();
        if domain.interface_by_alias(alias).is_none() {
            return Ok(());
        }
        match *self.detach_mode.lock().unwrap() {
            DetachMode::Works => {
                domain
                    .interfaces
                    .retain(|i| i.alias.as_deref() != Some(alias));
                let DomainState {
                    interfaces,
                    root_ports,
                    ..
                } = &mut *domain;
                root_ports.refresh(interfaces);
                Ok(())
            }
            DetachMode::Ignored => Err(HypervisorError::DetachTimeout {
                alias: alias.into(),
                timeout,
            }),
            DetachMode::Refused => Err(HypervisorError::DetachFailed {
                alias: alias.into(),
            }),
        }
    }

    async fn set_link_state(
        &self,
        _domain: &str,
        device: &crate::hypervisor::DomainInterface,
        up: bool,
        _persistent: bool,
    ) -> Result<(), HypervisorError> {
        self.refuse_during_migration()?;
        let alias = device.alias.clone();
        self.link_changes
            .lock()
            .unwrap()
            .push((alias.clone().unwrap_or_default(), up));
        let mut domain = self.domain.lock().unwrap();
        let device = domain
            .interfaces
            .iter_mut()
            .find(|i| i.alias == alias)
            .unwrap();
        device.link_up = up;
        Ok(())
    }

    /// A guest that sees every attached device (as eth0, eth1, ...), unless
    /// its agent is switched off.
    async fn guest_interfaces(&self, _domain: &str) -> Result<Option<GuestView>, HypervisorError> {
        if *self.agent_busy.lock().unwrap() {
            return Ok(None);
        }
        if !*self.agent_connected.lock().unwrap() {
            return Ok(Some(GuestView::NotConnected(
                "QEMU guest agent is not connected".into(),
            )));
        }
        let domain = self.domain.lock().unwrap();
        Ok(Some(GuestView::Interfaces(
            domain
                .interfaces
                .iter()
                .enumerate()
                .map(|(i, d)| GuestInterface {
                    name: format!("eth{i}"),
                    mac: d.mac,
                    addresses: vec![],
                })
                .collect(),
        )))
    }

    async fn qemu_owner(&self, _domain: &str) -> Result<Option<Owner>, HypervisorError> {
        Ok(Some(Owner { uid: 107, gid: 107 }))
    }
}

fn vmi(networks: &[&str]) -> Vmi {
    vmi_with(networks, "")
}

/// A VMI whose interfaces all carry `extra` (e.g. `,"state":"absent"`).
fn vmi_with(networks: &[&str], extra: &str) -> Vmi {
    let ifaces: Vec<String> = networks
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","bridge":{{}}{extra}}}"#))
        .collect();
    let nets: Vec<String> = networks
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","multus":{{"networkName":"{n}"}}}}"#))
        .collect();
    Vmi::parse(&format!(
        r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[{}]}}}},"networks":[{}]}}}}"#,
        ifaces.join(","),
        nets.join(",")
    ))
    .unwrap()
}

fn pod(network: &str) -> String {
    crate::model::names::hashed_pod_iface(network).to_string()
}

/// Lets the pod links the passes have seen settle (see `plan::CNI_SETTLE`):
/// under a paused clock, at once.
async fn cni_settled() {
    tokio::time::sleep(crate::plan::CNI_SETTLE).await;
}

/// An agent whose Multus network-status lists the pod interfaces of the
/// tests' networks, as it does once CNI ADD returned: pod links join the
/// bridge in the pass that sees them.
fn agent(net: FakeNet, hyp: FakeHyp) -> Agent<FakeNet, FakeHyp> {
    Agent::new(net, hyp, with_cni_done(AgentConfig::default()))
}

/// `config` with a network-status that lists the pod interfaces of the
/// tests' networks.
fn with_cni_done(mut config: AgentConfig) -> AgentConfig {
    config.report.network_status = Some(watch::channel(Some(cni_done_entries())).1);
    config
}

/// Multus' entries for the pod interfaces of the tests' networks.
fn cni_done_entries() -> Vec<NetworkStatus> {
    ["blue", "red", "green"]
        .map(|network| NetworkStatus {
            name: format!("default/{network}"),
            interface: Some(pod(network)),
            ips: vec![],
            mac: None,
            default: false,
            dns: None,
        })
        .to_vec()
}

/// An agent without a network-status source: it waits out the settle
/// window for CNI ([`cni_settled`]).
fn agent_without_network_status(net: FakeNet, hyp: FakeHyp) -> Agent<FakeNet, FakeHyp> {
    Agent::new(net, hyp, AgentConfig::default())
}

fn phases(agent: &Agent<FakeNet, FakeHyp>) -> Vec<(String, Phase)> {
    agent
        .status()
        .interfaces
        .iter()
        .map(|i| (i.name.clone(), i.phase))
        .collect()
}

/// Without network-status the device goes in on the first pass and the pod
/// link joins the bridge once the settle window passed (the first pass's
/// links too: nicplug may have started in the middle of a CNI ADD); Ready
/// waits for it, since no traffic flows before.
#[tokio::test(start_paused = true)]
async fn attaches_in_one_pass_and_then_has_nothing_to_do() {
    let vmi = vmi(&["blue"]);
    let mut agent =
        agent_without_network_status(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    let original_mac = agent.net.get(&pod("blue")).unwrap().mac;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Attached)]);
    let status = &agent.status().interfaces[0];
    assert_eq!(status.mac, original_mac.map(|m| m.to_string()));
    assert_eq!(status.link_state.as_deref(), Some("up"));
    assert_eq!(
        status.uplink,
        Some(Uplink {
            ready: false,
            cni_done: None
        })
    );
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("in the last 500 ms"),
        "{status:?}"
    );
    assert_eq!(agent.net.calls.lock().unwrap().len(), 3, "no enslave yet");
    cni_settled().await;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(agent.net.calls.lock().unwrap().len(), 4);
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Ready)]);
    assert_eq!(
        agent.status().interfaces[0].uplink,
        Some(Uplink {
            ready: true,
            cni_done: Some(CniDone::SettleWindow)
        })
    );

    agent.reconcile(&vmi).await.unwrap();
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(
        agent.net.calls.lock().unwrap().len(),
        4,
        "converged state changes nothing"
    );
    assert_eq!(agent.hyp.attaches.lock().unwrap().len(), 1);
}

/// With Multus' network-status listing the pod interface, CNI is done: the
/// pod link joins the bridge in the pass that attaches, no window waited,
/// and the interface is Ready at once. Listed only later: it waits for the
/// entry, however long the link stayed as it was.
#[tokio::test(start_paused = true)]
async fn network_status_says_when_cni_is_done() {
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Ready)]);
    assert_eq!(agent.net.calls.lock().unwrap().len(), 4, "enslaved at once");
    assert_eq!(
        agent.status().interfaces[0].uplink,
        Some(Uplink {
            ready: true,
            cni_done: Some(CniDone::NetworkStatus)
        })
    );

    let (tx, rx) = watch::channel(Some(Vec::new()));
    let config = AgentConfig {
        report: ReportConfig {
            network_status: Some(rx),
            ..Default::default()
        },
        ..AgentConfig::default()
    };
    let mut agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("red")]),
        FakeHyp::new(4),
        config,
    );
    let red = vmi(&["red"]);
    for _ in 0..3 {
        agent.reconcile(&red).await.unwrap();
        cni_settled().await;
    }
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Attached);
    assert_eq!(
        status.message.as_deref(),
        Some(
            format!(
                "waiting for CNI to finish pod interface {}: Multus' network-status has no entry for it yet (the settle window decides after 10 s)",
                pod("red")
            )
            .as_str()
        )
    );
    assert_eq!(agent.net.calls.lock().unwrap().len(), 3, "no enslave");
    tx.send_replace(Some(cni_done_entries()));
    agent.reconcile(&red).await.unwrap();
    assert_eq!(phases(&agent), [("red".to_string(), Phase::Ready)]);
    assert_eq!(agent.net.calls.lock().unwrap().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn failed_attach_rolls_back_and_retries_with_backoff() {
    let vmi = vmi(&["blue"]);
    let pod_name = pod("blue");
    let mut agent = agent(FakeNet::with_pod_links(&[&pod_name]), FakeHyp::new(4));
    let before = agent.net.get(&pod_name).unwrap();
    agent.hyp.set_mode("ua-blue", AttachMode::Fails);

    agent.reconcile(&vmi).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Failed);
    assert_eq!(
        status.message.as_deref(),
        Some("attach-device: libvirt: attach the device failed: internal error: boom")
    );
    // Rolled back: no tap, no bridge, the pod link exactly as before.
    let links = agent.net.links.lock().unwrap().clone();
    assert_eq!(links.len(), 2, "{links:?}");
    assert_eq!(agent.net.get(&pod_name).unwrap(), before);

    // Within the backoff nothing is tried again.
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(agent.hyp.attaches.lock().unwrap().len(), 1);
    assert_eq!(phases(&agent)[0].1, Phase::Failed);

    // After it, the retry plugs.
    agent.hyp.set_mode("ua-blue", AttachMode::Works);
    tokio::time::advance(Duration::from_millis(1100)).await;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(agent.hyp.attaches.lock().unwrap().len(), 2);
    assert_eq!(phases(&agent)[0].1, Phase::Attached);
    // The guest is asked again shortly after the plug.
    tokio::time::advance(Duration::from_millis(150)).await;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Ready);
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_and_is_capped() {
    let vmi = vmi(&["blue"]);
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.hyp.set_mode("ua-blue", AttachMode::Fails);
    let mut delays = Vec::new();
    for _ in 0..9 {
        agent.reconcile(&vmi).await.unwrap();
        let retry = agent.tracked["blue"].retry_at.unwrap();
        let delay = retry - Instant::now();
        delays.push(delay.as_secs());
        tokio::time::advance(delay).await;
    }
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
}

#[tokio::test]
async fn timed_out_attach_without_device_rolls_back() {
    let vmi = vmi(&["blue"]);
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.hyp.set_mode("ua-blue", AttachMode::TimesOut);
    agent.reconcile(&vmi).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Failed);
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("no DEVICE_ADDED event for ua-blue")
    );
    assert_eq!(agent.net.links.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn lost_event_with_device_present_keeps_the_plumbing() {
    let vmi = vmi(&["blue"]);
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.hyp.set_mode("ua-blue", AttachMode::EventLost);
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Ready);
    assert_eq!(
        agent.net.links.lock().unwrap().len(),
        4,
        "bridge and tap stay under the live device"
    );
}

#[tokio::test]
async fn one_failing_interface_does_not_block_the_others() {
    let vmi = vmi(&["red", "green", "blue"]);
    let pods = [pod("red"), pod("green"), pod("blue")];
    let mut agent = agent(
        FakeNet::with_pod_links(&pods.iter().map(String::as_str).collect::<Vec<_>>()),
        FakeHyp::new(4),
    );
    agent.hyp.set_mode("ua-green", AttachMode::Fails);
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(
        phases(&agent),
        [
            ("red".to_string(), Phase::Ready),
            ("green".to_string(), Phase::Failed),
            ("blue".to_string(), Phase::Ready),
        ]
    );
    // Attached in spec order: guest NIC order follows the spec.
    assert_eq!(
        *agent.hyp.attaches.lock().unwrap(),
        ["ua-red", "ua-green", "ua-blue"]
    );
}

#[tokio::test]
async fn netns_failure_mid_plumbing_rolls_back() {
    let vmi = vmi(&["blue"]);
    let pod_name = pod("blue");
    let mut agent = agent(FakeNet::with_pod_links(&[&pod_name]), FakeHyp::new(4));
    let before = agent.net.get(&pod_name).unwrap();
    *agent.net.fail.lock().unwrap() = Some("ensure_tap");
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Failed);
    assert!(agent.hyp.attaches.lock().unwrap().is_empty());
    assert_eq!(agent.net.get(&pod_name).unwrap(), before);
    assert_eq!(agent.net.links.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn status_file_follows_the_phases() {
    let dir = std::env::temp_dir().join(format!("nicplug-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("status.json");
    let vmi = vmi(&["blue", "red"]);
    let mut config = with_cni_done(AgentConfig::default());
    config.report.status_file = Some(path.clone());
    let mut agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("blue")]),
        FakeHyp::new(4),
        config,
    );
    agent.reconcile(&vmi).await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(doc["interfaces"][0]["phase"], "Ready");
    assert_eq!(doc["interfaces"][0]["podInterfaceName"], pod("blue"));
    assert_eq!(doc["interfaces"][1]["phase"], "Pending");
    assert_eq!(
        doc["interfaces"][1]["message"],
        format!("waiting for pod interface {}", pod("red"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Lets spawned detach tasks finish (they are immediate with the fake).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn absent_detaches_then_removes_every_trace() {
    let pod_name = pod("blue");
    let mut agent = agent(FakeNet::with_pod_links(&[&pod_name]), FakeHyp::new(4));
    let before = agent.net.links.lock().unwrap().clone();
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Ready);

    let absent = vmi_with(&["blue"], r#","state":"absent""#);
    agent.reconcile(&absent).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Detaching);
    // The tap and bridge stay until the device is gone.
    assert_eq!(agent.net.links.lock().unwrap().len(), 4);
    settle().await;
    agent.reconcile(&absent).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Detached);
    assert_eq!(
        *agent.net.links.lock().unwrap(),
        before,
        "pod namespace as before the plug"
    );
    assert!(agent.hyp.device("ua-blue").is_none());

    // And again: nothing left to do.
    let calls = agent.net.calls.lock().unwrap().len();
    agent.reconcile(&absent).await.unwrap();
    assert_eq!(agent.net.calls.lock().unwrap().len(), calls);
}

#[tokio::test]
async fn leaving_the_spec_unplugs_and_the_entry_goes() {
    let mut agent = agent(
        FakeNet::with_pod_links(&[&pod("blue"), &pod("red")]),
        FakeHyp::new(4),
    );
    agent.reconcile(&vmi(&["blue", "red"])).await.unwrap();
    agent.reconcile(&vmi(&["red"])).await.unwrap();
    assert_eq!(
        phases(&agent),
        [
            ("red".to_string(), Phase::Ready),
            ("blue".to_string(), Phase::Detaching)
        ]
    );
    settle().await;
    agent.reconcile(&vmi(&["red"])).await.unwrap();
    assert_eq!(phases(&agent), [("red".to_string(), Phase::Ready)]);
    assert!(
        agent
            .net
            .get(&format!("tap{}", &pod("blue")[3..]))
            .is_none()
    );
    assert!(
        agent.net.get(&pod("blue")).unwrap().alias.is_none(),
        "record removed on release"
    );
    assert!(agent.hyp.device("ua-red").is_some());
}

#[tokio::test(start_paused = true)]
async fn ignored_detach_is_pending_keeps_plumbing_and_retries_with_backoff() {
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    *agent.hyp.detach_mode.lock().unwrap() = DetachMode::Ignored;
    let absent = vmi_with(&["blue"], r#","state":"absent""#);
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    for _ in 0..5 {
        agent.reconcile(&absent).await.unwrap();
    }
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::DetachPending);
    assert_eq!(
        status.message.as_deref(),
        Some("guest has not released the device")
    );
    assert_eq!(agent.hyp.detaches.lock().unwrap().len(), 1, "no hot loop");
    assert_eq!(
        agent.net.links.lock().unwrap().len(),
        4,
        "tap and bridge stay under the device"
    );

    // After the backoff it tries again; a guest that now answers completes it.
    *agent.hyp.detach_mode.lock().unwrap() = DetachMode::Works;
    tokio::time::advance(Duration::from_millis(1100)).await;
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    agent.reconcile(&absent).await.unwrap();
    assert_eq!(agent.hyp.detaches.lock().unwrap().len(), 2);
    assert_eq!(phases(&agent)[0].1, Phase::Detached);
    assert_eq!(agent.net.links.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn refused_detach_fails_with_the_reason() {
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    *agent.hyp.detach_mode.lock().unwrap() = DetachMode::Refused;
    let absent = vmi_with(&["blue"], r#","state":"absent""#);
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    agent.reconcile(&absent).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Failed);
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("DEVICE_REMOVAL_FAILED"),
        "{status:?}"
    );
    assert_eq!(agent.net.links.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn link_state_follows_the_spec() {
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    agent
        .reconcile(&vmi_with(&["blue"], r#","state":"down""#))
        .await
        .unwrap();
    assert!(!agent.hyp.device("ua-blue").unwrap().link_up);
    assert_eq!(
        agent.status().interfaces[0].link_state.as_deref(),
        Some("down")
    );
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    assert!(agent.hyp.device("ua-blue").unwrap().link_up);
    assert_eq!(
        agent.status().interfaces[0].link_state.as_deref(),
        Some("up")
    );
}

#[tokio::test]
async fn pod_interface_removed_under_the_device_unplugs_and_waits() {
    let pod_name = pod("blue");
    let mut agent = agent(FakeNet::with_pod_links(&[&pod_name]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    // CNI DEL while the spec still lists the network.
    agent
        .net
        .links
        .lock()
        .unwrap()
        .retain(|l| l.name.as_str() != pod_name);
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    settle().await;
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    assert!(agent.hyp.device("ua-blue").is_none());
    assert_eq!(agent.net.links.lock().unwrap().len(), 1, "only lo is left");
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Pending);
    // No error loop: further passes change nothing.
    let calls = agent.net.calls.lock().unwrap().len();
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    assert_eq!(agent.net.calls.lock().unwrap().len(), calls);
}

#[tokio::test]
async fn without_a_guest_agent_it_stays_attached_and_says_why() {
    let hyp = FakeHyp::new(4);
    *hyp.agent_connected.lock().unwrap() = false;
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), hyp);
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Attached);
    assert_eq!(
        status.message.as_deref(),
        Some("guest agent is not connected: QEMU guest agent is not connected")
    );
    assert_eq!(agent.status().guest_agent_connected, Some(false));
    // The agent connects (an AGENT_LIFECYCLE event marks the view stale).
    *agent.hyp.agent_connected.lock().unwrap() = true;
    agent
        .report
        .guest_stale_flag()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Ready);
    assert_eq!(status.interface_name.as_deref(), Some("eth0"));
    assert_eq!(
        status.info_source.as_deref(),
        Some("domain, guest-agent, multus-status")
    );
}

#[tokio::test]
async fn phases_are_timed_and_measured() {
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let mut config = with_cni_done(AgentConfig::default());
    config.report.metrics = Some(metrics.clone());
    let mut agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("blue")]),
        FakeHyp::new(4),
        config,
    );
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let status = &agent.status().interfaces[0];
    let phases: Vec<Phase> = status.phase_transitions.iter().map(|t| t.phase).collect();
    assert_eq!(phases, [Phase::Plumbed, Phase::Attached, Phase::Ready]);
    let seen = status.pod_interface_seen.expect("pod interface seen");
    assert!(status.phase_transitions[0].at.monotonic_ns >= seen.monotonic_ns);
    let text = metrics.encode();
    assert!(
        text.contains("nicplug_plug_stage_seconds_count{stage=\"ready\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("nicplug_interfaces{phase=\"Ready\"} 1"),
        "{text}"
    );

    let absent = vmi_with(&["blue"], r#","state":"absent""#);
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    agent.reconcile(&absent).await.unwrap();
    let text = metrics.encode();
    assert!(
        text.contains("nicplug_unplug_stage_seconds_count{stage=\"removed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("nicplug_unplug_stage_seconds_count{stage=\"cleaned\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn outcomes_for_operators_once_per_change() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut config = with_cni_done(AgentConfig::default());
    config.report.outcomes = Some(tx);
    let mut agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("blue")]),
        FakeHyp::new(4),
        config,
    );
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let plugged = rx.try_recv().unwrap();
    assert_eq!(
        (plugged.interface.as_str(), plugged.kind),
        ("blue", OutcomeKind::Plugged)
    );
    assert!(
        plugged.message.contains("plumbed") && plugged.message.contains("ready"),
        "{}",
        plugged.message
    );
    assert!(rx.try_recv().is_err(), "one outcome per change");

    agent.reconcile(&vmi(&[])).await.unwrap();
    settle().await;
    agent.reconcile(&vmi(&[])).await.unwrap();
    let unplugged = rx.try_recv().unwrap();
    assert_eq!(unplugged.kind, OutcomeKind::Unplugged);
    assert!(
        unplugged.message.starts_with("unplugged in "),
        "{}",
        unplugged.message
    );
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn an_attach_lost_to_another_agent_keeps_the_plumbing_under_its_device() {
    let vmi = vmi(&["blue"]);
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.hyp.set_mode("ua-blue", AttachMode::LosesRace);
    agent.reconcile(&vmi).await.unwrap();
    let calls = agent.net.calls.lock().unwrap().clone();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("delete_link") || c.starts_with("release_pod_link")),
        "no rollback under a live device: {calls:?}"
    );
    assert!(
        agent
            .net
            .get(&format!("tap{}", &pod("blue")[3..]))
            .is_some()
    );
    assert_eq!(phases(&agent)[0].1, Phase::Ready);
}

#[tokio::test]
async fn a_failed_clean_up_step_does_not_stop_the_others() {
    let pod_name = pod("blue");
    let mut agent = agent(FakeNet::with_pod_links(&[&pod_name]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let absent = vmi_with(&["blue"], r#","state":"absent""#);
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    *agent.net.fail.lock().unwrap() = Some("delete_link");
    agent.reconcile(&absent).await.unwrap();
    let calls = agent.net.calls.lock().unwrap().clone();
    let teardown: Vec<&str> = calls
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(teardown, ["delete_link", "release_pod_link", "delete_link"]);
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Failed);
    let message = status.message.as_deref().unwrap();
    assert_eq!(message.matches("delete-link").count(), 2, "{message}");
    // The pod link is back as it was, although tap and bridge are not gone.
    assert_eq!(agent.net.get(&pod_name).unwrap().master, None);
}

/// An agent on pod link "blue" that sends outcomes and keeps metrics.
fn agent_with_outcomes_and_metrics() -> (
    Agent<FakeNet, FakeHyp>,
    tokio::sync::mpsc::UnboundedReceiver<Outcome>,
    Arc<crate::metrics::Metrics>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let mut config = with_cni_done(AgentConfig::default());
    config.report.outcomes = Some(tx);
    config.report.metrics = Some(metrics.clone());
    let agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("blue")]),
        FakeHyp::new(4),
        config,
    );
    (agent, rx, metrics)
}

fn outcome_kinds(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Outcome>) -> Vec<OutcomeKind> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|o| o.kind)
        .collect()
}

#[tokio::test]
async fn absent_then_leaving_the_spec_is_one_unplug() {
    let (mut agent, mut rx, metrics) = agent_with_outcomes_and_metrics();
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let absent = vmi_with(&["blue"], r#","state":"absent""#);
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    agent.reconcile(&absent).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Detached);
    agent.reconcile(&vmi(&[])).await.unwrap();
    agent.reconcile(&vmi(&[])).await.unwrap();
    assert_eq!(
        outcome_kinds(&mut rx),
        [OutcomeKind::Plugged, OutcomeKind::Unplugged]
    );
    let text = metrics.encode();
    let cleaned = text
        .lines()
        .find(|l| l.starts_with("nicplug_unplug_stage_seconds_count") && l.contains("cleaned"))
        .unwrap_or_else(|| panic!("no cleaned count in\n{text}"));
    assert!(cleaned.ends_with(" 1"), "{cleaned}");
}

#[tokio::test(start_paused = true)]
async fn a_freed_root_port_ends_the_backoff_of_who_waits_for_one() {
    let mut agent = agent(
        FakeNet::with_pod_links(&[&pod("blue"), &pod("red")]),
        FakeHyp::new(1),
    );
    agent.reconcile(&vmi(&["blue", "red"])).await.unwrap();
    let red = agent.status().interfaces[1].clone();
    assert_eq!(red.phase, Phase::Failed);
    assert_eq!(
        red.message.as_deref(),
        Some("no free PCIe root port for hotplug: 4 of 4 in use")
    );
    // blue goes: its port frees; red does not wait out its backoff.
    let spec = vmi_with(&["blue"], r#","state":"absent""#);
    let mut spec_red = vmi(&["red"]);
    spec_red.interfaces.insert(0, spec.interfaces[0].clone());
    agent.reconcile(&spec_red).await.unwrap();
    settle().await;
    agent.reconcile(&spec_red).await.unwrap();
    assert_eq!(
        phases(&agent),
        [
            ("blue".to_string(), Phase::Detached),
            ("red".to_string(), Phase::Ready)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_interface_attached_while_the_guest_agent_is_not_up_yet_is_polled_fast() {
    let hyp = FakeHyp::new(4);
    *hyp.agent_connected.lock().unwrap() = false;
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), hyp);
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Attached);
    // The guest's agent connects (the guest finished booting).
    *agent.hyp.agent_connected.lock().unwrap() = true;
    let next = agent.report.next_wake().expect("a guest poll is due");
    assert!(
        next <= Instant::now() + Duration::from_secs(2),
        "the next guest poll is {:?} away, not a fast poll",
        next - Instant::now()
    );
    tokio::time::sleep_until(next).await;
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Ready);
}

#[tokio::test]
async fn a_device_of_a_shut_off_domain_is_not_attached() {
    let vmi = vmi(&["blue"]);
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.reconcile(&vmi).await.unwrap();
    agent.hyp.domain.lock().unwrap().running = false;
    agent.reconcile(&vmi).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Pending);
    assert_eq!(status.message.as_deref(), Some("the domain is not running"));
}

#[tokio::test(start_paused = true)]
async fn with_libvirt_gone_passes_back_off_and_readiness_says_why() {
    let readiness = Arc::new(Readiness::new());
    let config = AgentConfig {
        readiness: Some(readiness.clone()),
        ..with_cni_done(AgentConfig::default())
    };
    // red fails first (no root port), so its retry time passes during the outage.
    let agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("blue"), &pod("red")]),
        FakeHyp::new(1),
        config,
    );
    let stop = CancellationToken::new();
    *agent.hyp.stop_after_reads.lock().unwrap() = Some((200, stop.clone()));
    let hyp = agent.hyp.clone();
    let (spec_tx, spec_rx) = watch::channel(Some(vmi(&["blue", "red"])));
    let wake = Arc::new(Notify::new());
    let run = tokio::spawn(agent.run(spec_rx, wake, stop.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!readiness.missing().contains(&"netlink"));
    assert!(!readiness.missing().contains(&"libvirt"));
    *hyp.unreachable.lock().unwrap() = true;
    let reads_before = *hyp.domain_reads.lock().unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let reads = *hyp.domain_reads.lock().unwrap() - reads_before;
    assert!(
        (2..=12).contains(&reads),
        "{reads} passes in 20 s of outage (backoff from 250 ms to 5 s)"
    );
    // (The spec part is the spec source's to set, not the loop's.)
    let not_ready = readiness.not_ready();
    let libvirt = not_ready.iter().find(|(part, _)| *part == "libvirt");
    assert!(
        libvirt.is_some_and(|(_, why)| why.contains("No such file")),
        "{not_ready:?}"
    );
    assert!(!readiness.missing().contains(&"netlink"));
    *hyp.unreachable.lock().unwrap() = false;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!readiness.missing().contains(&"libvirt"));
    stop.cancel();
    run.await.unwrap().unwrap();
    drop(spec_tx);
}

/// Properties over generated specs and pod namespaces: applying the plan to
/// the fakes converges (planning again finds nothing to do), and no step
/// ever names a link nicplug does not own.
mod properties {
    use super::*;
    use crate::plan::Observed;
    use proptest::prelude::*;

    const NETWORKS: [&str; 4] = ["red", "blue", "green", "yellow"];

    #[derive(Debug, Clone)]
    struct NetCase {
        in_spec: bool,
        state: &'static str,
        mac: Option<u8>,
        pod_link: bool,
    }

    fn net_case() -> impl Strategy<Value = NetCase> {
        (
            any::<bool>(),
            prop_oneof![Just("up"), Just("down"), Just("absent")],
            proptest::option::of(0u8..3),
            any::<bool>(),
        )
            .prop_map(|(in_spec, state, mac, pod_link)| NetCase {
                in_spec,
                state,
                mac,
                pod_link,
            })
    }

    fn spec(cases: &[NetCase], states: bool) -> Vmi {
        let mut ifaces = Vec::new();
        let mut nets = Vec::new();
        let mut macs = Vec::new();
        for (name, case) in NETWORKS.iter().zip(cases).filter(|(_, c)| c.in_spec) {
            let mut extra = String::new();
            if states {
                extra.push_str(&format!(r#","state":"{}""#, case.state));
            }
            // Unique within a spec (the VMI reader refuses duplicates); one
            // spec may reuse a MAC the other gave a network that is leaving.
            if let Some(m) = case.mac.filter(|m| !macs.contains(m)) {
                macs.push(m);
                extra.push_str(&format!(r#","macAddress":"02:00:00:00:00:0{m}""#));
            }
            ifaces.push(format!(r#"{{"name":"{name}","bridge":{{}}{extra}}}"#));
            nets.push(format!(
                r#"{{"name":"{name}","multus":{{"networkName":"{name}"}}}}"#
            ));
        }
        Vmi::parse(&format!(
            r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[{}]}}}},"networks":[{}]}}}}"#,
            ifaces.join(","),
            nets.join(",")
        ))
        .unwrap()
    }

    /// Links nicplug must never touch.
    fn decoys() -> Vec<Link> {
        vec![
            Link {
                addresses: vec!["169.254.200.1/24".parse().unwrap()],
                ..link(50, "eth0", LinkKind::Veth)
            },
            Link {
                alias: Some("not a record".into()),
                ..link(51, pod("decoy").as_str(), LinkKind::Veth)
            },
            link(52, "k6t-foreign", LinkKind::Bridge),
            Link {
                master: Some(52),
                ..link(53, "tapforeign", LinkKind::Tun)
            },
            Link {
                addresses: vec!["169.254.201.1/24".parse().unwrap()],
                ..link(54, "veth-other", LinkKind::Veth)
            },
        ]
    }

    fn owned(name: &IfName) -> bool {
        NETWORKS.iter().any(|n| {
            let pod = crate::model::names::hashed_pod_iface(n);
            let names = crate::model::PlumbingNames::for_pod_iface(&pod);
            [&names.pod, &names.bridge, &names.tap].contains(&name)
        })
    }

    fn links_named(step: &Step) -> Vec<&IfName> {
        match step {
            Step::RecordPodLink { pod, .. } | Step::ReleasePodLink { pod, .. } => vec![pod],
            Step::EnsureBridge { bridge, .. } => vec![bridge],
            Step::EnslavePodLink { pod, bridge, .. } => vec![pod, bridge],
            Step::EnsureTap { spec, bridge } => vec![&spec.name, bridge],
            Step::DeleteLink { name } => vec![name],
            Step::Attach { .. }
            | Step::Detach { .. }
            | Step::SetLinkState { .. }
            | Step::RefreshLink { .. } => vec![],
        }
    }

    /// Plans against the fakes' current state.
    fn plan_now(agent: &Agent<FakeNet, FakeHyp>, vmi: &Vmi) -> Vec<InterfacePlan> {
        let links = agent.net.links.lock().unwrap().clone();
        let domain = agent.hyp.domain.lock().unwrap().clone();
        crate::plan::plan(
            vmi,
            &Observed {
                links: &links,
                domain: Some(&domain),
                tap_owner: Some(Owner { uid: 107, gid: 107 }),
                clean_kubevirt_leftovers: false,
                kubevirt_plumbs: false,
                migrated_in: &[],
            },
        )
    }

    async fn converge(agent: &mut Agent<FakeNet, FakeHyp>, vmi: &Vmi) {
        for _ in 0..6 {
            for plan in plan_now(agent, vmi) {
                for step in &plan.steps {
                    for name in links_named(step) {
                        assert!(owned(name), "{} names {name}: {plan:?}", step.name());
                    }
                }
            }
            agent.reconcile(vmi).await.unwrap();
            settle().await;
            cni_settled().await;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn plans_converge_and_touch_only_what_nicplug_owns(
            before in proptest::collection::vec(net_case(), 4),
            after in proptest::collection::vec(net_case(), 4),
            free_ports in 0usize..=4,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut net = FakeNet::with_pod_links(&[]);
                for (i, (name, case)) in NETWORKS.iter().zip(&before).enumerate() {
                    if case.pod_link {
                        net.links.get_mut().unwrap().push(Link {
                            addresses: vec![format!("169.254.{i}.5/24").parse().unwrap()],
                            ..link(10 + i as u32, pod(name).as_str(), LinkKind::Veth)
                        });
                    }
                }
                net.links.get_mut().unwrap().extend(decoys());
                // No backoff: an interface that failed (a MAC another one held)
                // retries as soon as it can.
                let config = AgentConfig {
                    backoff_base: Duration::ZERO,
                    ..AgentConfig::default()
                };
                let mut agent = Agent::new(net, FakeHyp::new(free_ports), config);
                // A first spec plugs some, then another changes, unplugs or
                // drops them: departed networks and leftovers included.
                let first = spec(&before, false);
                converge(&mut agent, &first).await;
                let second = spec(&after, true);
                converge(&mut agent, &second).await;
                let left: Vec<_> = plan_now(&agent, &second)
                    .into_iter()
                    .filter(|p| !p.steps.is_empty())
                    .collect();
                assert!(left.is_empty(), "not converged: {left:?}");
                let links = agent.net.links.lock().unwrap().clone();
                for decoy in decoys() {
                    assert!(links.contains(&decoy), "decoy changed: {decoy:?} in {links:?}");
                }
            });
        }
    }
}

#[tokio::test]
async fn domain_events_wake_the_loop_and_device_events_make_the_guest_view_stale() {
    let agent = agent(FakeNet::with_pod_links(&[]), FakeHyp::new(4));
    let stale = agent.report.guest_stale_flag();
    let (tx, rx) = broadcast::channel(4);
    let wake = Arc::new(Notify::new());
    let task = tokio::spawn(agent.forward_domain_events(rx, wake.clone()));
    let domain = "ns_vm".to_string();
    tx.send(DomainEvent::Lifecycle {
        domain: domain.clone(),
    })
    .unwrap();
    wake.notified().await;
    assert!(!stale.load(std::sync::atomic::Ordering::SeqCst));
    tx.send(DomainEvent::DeviceRemoved {
        domain,
        alias: "ua-blue".into(),
    })
    .unwrap();
    wake.notified().await;
    assert!(stale.swap(false, std::sync::atomic::Ordering::SeqCst));
    // Events missed (a lagging receiver) may have been anything.
    for _ in 0..6 {
        tx.send(DomainEvent::ConnectionClosed).unwrap();
    }
    wake.notified().await;
    while !stale.load(std::sync::atomic::Ordering::SeqCst) {
        wake.notified().await;
    }
    drop(tx);
    task.await.unwrap();
}

#[tokio::test]
async fn an_interface_whose_detach_is_in_flight_stays_listed_until_a_pass_sees_it_gone() {
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    // The network leaves the spec: the detach task starts (and is not run
    // before the next pass: the fakes never yield).
    agent.reconcile(&vmi(&[])).await.unwrap();
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Detaching)]);
    // A pass that sees nothing of it (its record and bridge missing from
    // the dump) must not report it gone while the detach is in flight.
    let suffix = &pod("blue")[3..];
    agent.net.links.lock().unwrap().retain(|l| {
        l.name.as_str() != format!("k6t-{suffix}") && l.name.as_str() != format!("tap{suffix}")
    });
    let pod_name = crate::model::names::hashed_pod_iface("blue");
    agent.net.edit(&pod_name, |l| l.alias = None);
    agent.reconcile(&vmi(&[])).await.unwrap();
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Detaching)]);
    // Once the detach finished and a pass sees nothing left, it goes.
    settle().await;
    agent.reconcile(&vmi(&[])).await.unwrap();
    agent.reconcile(&vmi(&[])).await.unwrap();
    assert!(phases(&agent).is_empty(), "{:?}", phases(&agent));
}

/// QEMU closes the tap with the netdev before libvirt drops the device from
/// the live XML, so a pass between the two sees the device on a tap no one
/// holds: the detach's progress, not a dead tap (on QEMU 10 that would be a
/// failure that ends the unplug's timing).
#[tokio::test]
async fn a_tap_let_go_while_its_detach_is_in_flight_is_the_detach_not_a_failure() {
    let (mut agent, mut rx, metrics) = agent_with_outcomes_and_metrics();
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    agent.reconcile(&vmi(&[])).await.unwrap();
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Detaching)]);
    let tap = IfName::new(format!("tap{}", &pod("blue")[3..])).unwrap();
    agent.net.edit(&tap, |l| {
        if let Some(info) = &mut l.tap {
            info.held = Some(false);
        }
    });
    agent.reconcile(&vmi(&[])).await.unwrap();
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Detaching)]);
    settle().await;
    agent.reconcile(&vmi(&[])).await.unwrap();
    agent.reconcile(&vmi(&[])).await.unwrap();
    assert!(phases(&agent).is_empty(), "{:?}", phases(&agent));
    assert_eq!(
        outcome_kinds(&mut rx),
        [OutcomeKind::Plugged, OutcomeKind::Unplugged]
    );
    let text = metrics.encode();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("nicplug_failures_total{")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("nicplug_unplug_stage_seconds_count")
                && l.contains("cleaned")
                && l.ends_with(" 1")),
        "{text}"
    );
}

#[tokio::test]
async fn an_attach_waits_while_the_domain_migrates_away_then_goes_ahead() {
    let vmi = vmi(&["blue"]);
    let mut agent =
        agent_without_network_status(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    // The domain read predates the migration; only the fresh job read knows.
    *agent.hyp.migration_job.lock().unwrap() = Migration::Outgoing;
    agent.reconcile(&vmi).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Pending);
    assert_eq!(
        status.message.as_deref(),
        Some(
            "the domain is migrating to another pod: this change waits until the migration finished"
        )
    );
    assert!(agent.hyp.attaches.lock().unwrap().is_empty());
    assert!(agent.migrating, "passes repeat while it runs");
    // The plumbing is built (it touches no device; the pod link joins the
    // bridge once CNI may be done with it); the attach waits, pass after
    // pass, and nothing is undone.
    let plumbed = agent.net.calls.lock().unwrap().len();
    assert_eq!(plumbed, 3);
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(agent.net.calls.lock().unwrap().len(), plumbed);
    assert!(agent.hyp.attaches.lock().unwrap().is_empty());
    assert_eq!(phases(&agent)[0].1, Phase::Pending);
    // The migration failed: the domain runs here still, the plug happens.
    *agent.hyp.migration_job.lock().unwrap() = Migration::None;
    agent.reconcile(&vmi).await.unwrap();
    assert!(matches!(
        phases(&agent)[0].1,
        Phase::Attached | Phase::Ready
    ));
    assert_eq!(agent.hyp.attaches.lock().unwrap().len(), 1);
    agent.reconcile(&vmi).await.unwrap();
    assert!(!agent.migrating, "no more migration polls");
}

#[tokio::test(start_paused = true)]
async fn a_target_is_ready_once_every_interface_is_prepared() {
    let vmi = vmi(&["blue", "red"]);
    let hyp = FakeHyp::new(4);
    *hyp.absent.lock().unwrap() = true;
    let mut agent = agent_without_network_status(FakeNet::with_pod_links(&[&pod("blue")]), hyp);
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(phases(&agent)[0], ("blue".to_string(), Phase::Pending));
    cni_settled().await;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(
        phases(&agent),
        [
            ("blue".to_string(), Phase::Prepared),
            ("red".to_string(), Phase::Pending)
        ]
    );
    assert!(agent.hyp.attaches.lock().unwrap().is_empty());
    // (The spec part is the run loop's; reconcile alone leaves it unset.)
    let not_ready: Vec<_> = agent
        .readiness
        .not_ready()
        .into_iter()
        .filter(|(part, _)| *part != "spec")
        .collect();
    assert_eq!(not_ready.len(), 1, "{not_ready:?}");
    assert_eq!(not_ready[0].0, "plumbing");
    assert!(
        not_ready[0].1.contains("red (waiting for pod interface"),
        "{not_ready:?}"
    );
    // Both pod interfaces there: prepared, ready.
    let hyp = FakeHyp::new(4);
    *hyp.absent.lock().unwrap() = true;
    let mut agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("blue"), &pod("red")]),
        hyp,
        AgentConfig::default(),
    );
    agent.reconcile(&vmi).await.unwrap();
    cni_settled().await;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(agent.readiness.missing(), ["spec"]);
    assert_eq!(
        agent.status().agent.domain.as_ref().unwrap().state,
        DomainLifecycle::Absent
    );
    // The domain arrives running with its devices: adopted, nothing attached.
    *agent.hyp.absent.lock().unwrap() = false;
    for (network, mac) in [("blue", "02:00:00:00:00:42"), ("red", "02:00:00:00:00:43")] {
        let device = crate::hypervisor::InterfaceDevice {
            network: network.into(),
            link: IfName::new(format!("tap{}", &pod(network)[3..])).unwrap(),
            backend: crate::hypervisor::DeviceBackend::Tap,
            model: "virtio".into(),
            mac: mac.parse().unwrap(),
            mtu: 1500,
            queues: None,
            link_up: true,
            address: None,
        };
        let xml = format!(
            "<domain><devices>{}</devices></domain>",
            device.to_xml().unwrap()
        );
        let mut domain = agent.hyp.domain.lock().unwrap();
        domain
            .interfaces
            .push(parse_devices(&xml).unwrap().interfaces.remove(0));
    }
    agent.reconcile(&vmi).await.unwrap();
    assert!(agent.hyp.attaches.lock().unwrap().is_empty());
    for (name, phase) in phases(&agent) {
        assert!(
            matches!(phase, Phase::Attached | Phase::Ready),
            "{name}: {phase}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_target_whose_preparation_fails_is_not_ready_and_rolled_back() {
    let vmi = vmi(&["blue"]);
    let pod_name = pod("blue");
    let hyp = FakeHyp::new(4);
    *hyp.absent.lock().unwrap() = true;
    let mut agent = agent(FakeNet::with_pod_links(&[&pod_name]), hyp);
    let before = agent.net.get(&pod_name).unwrap();
    *agent.net.fail.lock().unwrap() = Some("ensure_tap");
    agent.reconcile(&vmi).await.unwrap();
    cni_settled().await;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Failed);
    assert_eq!(agent.net.get(&pod_name).unwrap(), before, "rolled back");
    assert!(agent.readiness.missing().contains(&"plumbing"));
}

#[tokio::test]
async fn a_detach_that_meets_a_migration_changes_nothing_and_waits() {
    let pod_name = pod("blue");
    let mut agent = agent(FakeNet::with_pod_links(&[&pod_name]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let plumbed = agent.net.links.lock().unwrap().clone();
    *agent.hyp.migration_job.lock().unwrap() = Migration::Outgoing;
    let absent = vmi_with(&["blue"], r#","state":"absent""#);
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    assert!(agent.hyp.device("ua-blue").is_some(), "still attached");
    assert!(agent.hyp.detaches.lock().unwrap().is_empty());
    assert_eq!(
        *agent.net.links.lock().unwrap(),
        plumbed,
        "nothing torn down"
    );
    assert_ne!(phases(&agent)[0].1, Phase::Failed, "no failure, no backoff");
    assert!(agent.migrating);
    // Over (it failed: the domain stays here): the unplug goes ahead.
    *agent.hyp.migration_job.lock().unwrap() = Migration::None;
    agent.reconcile(&absent).await.unwrap();
    settle().await;
    agent.reconcile(&absent).await.unwrap();
    assert_eq!(phases(&agent)[0].1, Phase::Detached);
    assert!(agent.hyp.device("ua-blue").is_none());
}

/// A guest poller (refresh 600 s) that had its first look at a running
/// domain and was told a device is coming, 20 ms later.
async fn poller_expecting_a_device() -> (FakeHyp, DomainState, super::guest::GuestPoller) {
    let hyp = FakeHyp::new(4);
    let domain = hyp.domain.lock().unwrap().clone();
    let mut poller = super::guest::GuestPoller::new(Duration::from_secs(600));
    assert!(poller.refresh(&hyp, "d", Some(&domain)).await, "first look");
    poller.expect_device();
    tokio::time::advance(Duration::from_millis(20)).await;
    (hyp, domain, poller)
}

/// After the guest confirmed a device, it is asked twice more a little
/// later (a real guest's udev renames the NIC shortly after it appeared),
/// then only at the refresh period again.
#[tokio::test(start_paused = true)]
async fn the_guest_is_asked_again_for_the_name_udev_gives_a_new_nic() {
    use super::guest::RENAME_LOOKS;
    let (hyp, domain, mut poller) = poller_expecting_a_device().await;
    assert!(poller.refresh(&hyp, "d", Some(&domain)).await, "fast poll");
    // The guest reported the MAC: nothing waits any more.
    poller.settle(false);
    let confirmed = tokio::time::Instant::now();
    let mut last = Duration::ZERO;
    for look in RENAME_LOOKS {
        assert_eq!(poller.next_wake(), Some(confirmed + look));
        assert!(
            !poller.refresh(&hyp, "d", Some(&domain)).await,
            "not due yet"
        );
        tokio::time::advance(look - last).await;
        last = look;
        assert!(
            poller.refresh(&hyp, "d", Some(&domain)).await,
            "the look at {look:?}"
        );
        poller.settle(false);
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        !poller.refresh(&hyp, "d", Some(&domain)).await,
        "no more looks"
    );
    assert!(poller.next_wake().unwrap() > tokio::time::Instant::now() + Duration::from_secs(60));
}

/// The soak once saw QEMU go away in the middle of an unplug of four
/// networks: from the first look for udev's rename after the plug (due 2 s
/// after the guest confirmed it) on, passes ran back to back, ~2 ms apart,
/// because a look the poller skips for a domain that does not run stays due.
#[tokio::test(start_paused = true)]
async fn a_domain_that_stops_does_not_spin_the_loop() {
    let (status_tx, status) = watch::channel(StatusDocument::default());
    let mut config = with_cni_done(AgentConfig::default());
    config.report.status_tx = Some(status_tx);
    let agent = Agent::new(
        FakeNet::with_pod_links(&[&pod("blue")]),
        FakeHyp::new(4),
        config,
    );
    let stop = CancellationToken::new();
    *agent.hyp.stop_after_reads.lock().unwrap() = Some((200, stop.clone()));
    let hyp = agent.hyp.clone();
    let (_spec_tx, spec_rx) = watch::channel(Some(vmi(&["blue"])));
    let run = tokio::spawn(agent.run(spec_rx, Arc::new(Notify::new()), stop.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let phases: Vec<Phase> = status.borrow().interfaces.iter().map(|i| i.phase).collect();
    assert_eq!(phases, [Phase::Ready], "plugged and confirmed");
    // QEMU goes away.
    hyp.domain.lock().unwrap().running = false;
    let reads_before = *hyp.domain_reads.lock().unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let reads = *hyp.domain_reads.lock().unwrap() - reads_before;
    assert!(
        reads <= 4,
        "{reads} passes in 20 s of a stopped domain (the looks at 2 s and 8 s, nothing else due)"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// A query that did not answer in time goes on in the background; while it
/// does, the poll it was for stays due, and must not make every pass (and
/// the loop's next wake-up) ask again at once.
#[tokio::test(start_paused = true)]
async fn a_guest_query_still_running_is_tried_again_later_not_at_once() {
    let (hyp, domain, mut poller) = poller_expecting_a_device().await;
    *hyp.agent_busy.lock().unwrap() = true;
    assert!(!poller.refresh(&hyp, "d", Some(&domain)).await, "busy");
    let now = tokio::time::Instant::now();
    let next = poller.next_wake().expect("the fast poll is still due");
    assert!(
        next >= now + Duration::from_millis(50),
        "next wake {:?} after a busy attempt",
        next.checked_duration_since(now)
    );
    *hyp.agent_busy.lock().unwrap() = false;
    tokio::time::sleep_until(next).await;
    assert!(
        poller.refresh(&hyp, "d", Some(&domain)).await,
        "asked again"
    );
}

/// A wedged guest agent keeps the query that timed out running for as long
/// as libvirt waits (its own agent timeout, or for good): the retries back
/// off, so a frozen agent costs a handful of passes, not ten a second.
#[tokio::test(start_paused = true)]
async fn retries_behind_a_query_that_never_ends_back_off() {
    let (hyp, domain, mut poller) = poller_expecting_a_device().await;
    *hyp.agent_busy.lock().unwrap() = true;
    let start = tokio::time::Instant::now();
    let mut attempts = 0;
    while let Some(next) = poller.next_wake() {
        if next > start + Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep_until(next).await;
        assert!(!poller.refresh(&hyp, "d", Some(&domain)).await, "busy");
        attempts += 1;
    }
    assert!(
        attempts <= 10,
        "{attempts} attempts in 10 s behind a query that never ends"
    );
    // The agent answers again: asked at the next retry, and the backoff is
    // over.
    *hyp.agent_busy.lock().unwrap() = false;
    tokio::time::sleep_until(poller.next_wake().unwrap()).await;
    assert!(poller.refresh(&hyp, "d", Some(&domain)).await);
    *hyp.agent_busy.lock().unwrap() = true;
    poller.mark_stale();
    let now = tokio::time::Instant::now();
    assert!(!poller.refresh(&hyp, "d", Some(&domain)).await);
    assert!(
        poller.next_wake().unwrap() <= now + Duration::from_millis(100),
        "the first retry after an answer is quick again"
    );
}

/// The soak once saw QEMU go away while four networks were unplugged: the
/// entries of two of them went from the status while their taps and
/// bridges stayed in the pod. A departed network is listed for as long as
/// its plumbing is there: kept (and said why) under a device the stopped
/// domain still has, torn down where it has none.
#[tokio::test]
async fn networks_that_leave_the_spec_of_a_stopped_domain_are_not_forgotten() {
    let (blue, red) = (pod("blue"), pod("red"));
    let mut agent = agent(FakeNet::with_pod_links(&[&blue, &red]), FakeHyp::new(4));
    agent.reconcile(&vmi(&["blue", "red"])).await.unwrap();
    assert_eq!(
        phases(&agent),
        [
            ("blue".to_string(), Phase::Ready),
            ("red".to_string(), Phase::Ready)
        ]
    );
    // QEMU is gone; the definition keeps red's device, blue's detach had
    // already removed it from there.
    {
        let mut domain = agent.hyp.domain.lock().unwrap();
        domain.running = false;
        domain
            .interfaces
            .retain(|i| i.alias.as_deref() != Some("ua-blue"));
    }
    agent.reconcile(&vmi(&[])).await.unwrap();
    agent.reconcile(&vmi(&[])).await.unwrap();
    let bridge = |pod: &str| agent.net.get(&format!("k6t-{}", &pod[3..]));
    let tap = |pod: &str| agent.net.get(&format!("tap{}", &pod[3..]));
    assert_eq!(phases(&agent), [("red".to_string(), Phase::Detaching)]);
    let message = agent.status().interfaces[0]
        .message
        .clone()
        .unwrap_or_default();
    assert!(message.contains("not running"), "{message}");
    assert!(
        bridge(&red).is_some() && tap(&red).is_some(),
        "kept under the device"
    );
    assert!(
        bridge(&blue).is_none() && tap(&blue).is_none(),
        "no device uses them"
    );
    assert!(
        agent.net.get(&blue).unwrap().alias.is_none(),
        "blue's pod link released"
    );
    assert!(agent.hyp.detaches.lock().unwrap().is_empty());
}

/// A VM whose pod network is on the passt plugin, and a pod whose `eth0`
/// has its default route.
fn passt_vmi_and_pod() -> (Vmi, FakeNet) {
    let vmi = Vmi::parse(
        r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm","namespace":"ns"},"spec":{"domain":{"devices":{"interfaces":[
            {"name":"default","binding":{"name":"passt"}}]}},"networks":[{"name":"default","pod":{}}]}}"#,
    )
    .unwrap()
    .resolve_plugins(&crate::model::vmi::BindingPlugins::default());
    let net = FakeNet::with_pod_links(&["eth0"]);
    net.edit(&IfName::new("eth0").unwrap(), |l| {
        l.routes = vec![crate::model::PodRoute::new(
            "0.0.0.0/0".parse().unwrap(),
            Some("169.254.0.1".parse().unwrap()),
        )];
    });
    (vmi, net)
}

/// The passt device of `passt_vmi_and_pod`, as it arrives with the domain.
fn arriving_passt_device() -> crate::hypervisor::DomainInterface {
    let xml = "<domain><devices><interface type='user'><source dev='eth0'/><backend type='passt'/><mac address='02:00:00:00:00:51'/><alias name='ua-default'/></interface></devices></domain>";
    parse_devices(xml).unwrap().interfaces.remove(0)
}

#[tokio::test(start_paused = true)]
async fn a_passt_nic_that_arrived_with_a_migration_has_its_link_refreshed_once() {
    for migrated in [true, false] {
        let (vmi, net) = passt_vmi_and_pod();
        let hyp = FakeHyp::new(4);
        *hyp.absent.lock().unwrap() = true;
        let mut agent = agent_without_network_status(net, hyp);
        agent.reconcile(&vmi).await.unwrap();
        cni_settled().await;
        agent.reconcile(&vmi).await.unwrap();
        assert_eq!(phases(&agent)[0], ("default".to_string(), Phase::Prepared));
        // The domain arrives (or, the second time, starts here) with the device.
        *agent.hyp.absent.lock().unwrap() = false;
        {
            let mut domain = agent.hyp.domain.lock().unwrap();
            domain.arrived_by_migration = migrated;
            domain.interfaces.push(arriving_passt_device());
        }
        agent.reconcile(&vmi).await.unwrap();
        agent.reconcile(&vmi).await.unwrap();
        let changes = agent.hyp.link_changes.lock().unwrap().clone();
        let refreshed = [
            ("ua-default".to_string(), false),
            ("ua-default".to_string(), true),
        ];
        if migrated {
            assert_eq!(changes, refreshed, "down and up, once");
        } else {
            assert!(changes.is_empty(), "a VM that started here: {changes:?}");
        }
        assert!(agent.hyp.attaches.lock().unwrap().is_empty());
        assert!(matches!(
            phases(&agent)[0].1,
            Phase::Attached | Phase::Ready
        ));
        assert!(agent.hyp.device("ua-default").unwrap().link_up);
    }
}
