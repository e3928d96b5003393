//! The agent's apply logic (ordering, rollback, backoff, isolation between
//! interfaces) against in-memory fakes of both seams. The fakes model the
//! kernel and libvirt only as far as the plan reads them back; the real
//! implementations are tested against the real things in `tests/`.

use std::sync::Mutex;

use super::*;
use crate::hypervisor::domain_xml::{RootPorts, parse_devices};
use crate::hypervisor::{GuestInterface, GuestView};
use crate::model::{IfName, IpCidr, Mac, PodLinkRecord};
use crate::netns::{Link, LinkKind, TapInfo, TapSpec};

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
    ) -> Result<(), NetnsError> {
        self.call("enslave_pod_link", pod)?;
        let master = self.index_of(bridge);
        self.edit(pod, |l| {
            l.addresses.clear();
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
}

impl FakeHyp {
    fn new(free_ports: usize) -> Self {
        Self {
            domain: Mutex::new(DomainState {
                running: true,
                persistent: true,
                interfaces: vec![],
                root_ports: RootPorts {
                    total: 4,
                    free: free_ports,
                },
            }),
            modes: Mutex::default(),
            detach_mode: Mutex::new(DetachMode::Works),
            attaches: Mutex::default(),
            detaches: Mutex::default(),
            agent_connected: Mutex::new(true),
        }
    }

    fn device(&self, alias: &str) -> Option<crate::hypervisor::DomainInterface> {
        self.domain
            .lock()
            .unwrap()
            .interface_by_alias(alias)
            .cloned()
    }

    fn set_mode(&self, alias: &str, mode: AttachMode) {
        self.modes.lock().unwrap().insert(alias.into(), mode);
    }
}

impl Hypervisor for FakeHyp {
    async fn domain(&self, _domain: &str) -> Result<Option<DomainState>, HypervisorError> {
        Ok(Some(self.domain.lock().unwrap().clone()))
    }

    async fn attach(
        &self,
        _domain: &str,
        device_xml: &str,
        alias: &str,
        _persistent: bool,
        timeout: Duration,
    ) -> Result<(), HypervisorError> {
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
            domain.root_ports.free -= 1;
        }
        match mode {
            AttachMode::Works => Ok(()),
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
                domain.root_ports.free += 1;
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
        interface_xml: &str,
        up: bool,
        _persistent: bool,
    ) -> Result<(), HypervisorError> {
        let xml = format!("<domain><devices>{interface_xml}</devices></domain>");
        let alias = parse_devices(&xml).unwrap().interfaces[0].alias.clone();
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

fn agent(net: FakeNet, hyp: FakeHyp) -> Agent<FakeNet, FakeHyp> {
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

#[tokio::test]
async fn plugs_in_one_pass_and_then_has_nothing_to_do() {
    let vmi = vmi(&["blue"]);
    let mut agent = agent(FakeNet::with_pod_links(&[&pod("blue")]), FakeHyp::new(4));
    let original_mac = agent.net.get(&pod("blue")).unwrap().mac;
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(phases(&agent), [("blue".to_string(), Phase::Ready)]);
    let status = &agent.status().interfaces[0];
    assert_eq!(status.mac, original_mac.map(|m| m.to_string()));
    assert_eq!(status.link_state.as_deref(), Some("up"));
    assert_eq!(agent.net.calls.lock().unwrap().len(), 4);

    agent.reconcile(&vmi).await.unwrap();
    agent.reconcile(&vmi).await.unwrap();
    assert_eq!(
        agent.net.calls.lock().unwrap().len(),
        4,
        "converged state changes nothing"
    );
    assert_eq!(agent.hyp.attaches.lock().unwrap().len(), 1);
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
    let mut config = AgentConfig::default();
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
        .guest_stale_flag()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    agent.reconcile(&vmi(&["blue"])).await.unwrap();
    let status = &agent.status().interfaces[0];
    assert_eq!(status.phase, Phase::Ready);
    assert_eq!(status.interface_name.as_deref(), Some("eth0"));
    assert_eq!(status.info_source.as_deref(), Some("domain, guest-agent"));
}

#[tokio::test]
async fn phases_are_timed_and_measured() {
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let mut config = AgentConfig::default();
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
    let mut config = AgentConfig::default();
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
