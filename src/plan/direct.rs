//! The bindings whose device uses a pod link as CNI made it: nothing is
//! built (no bridge, no tap, no record on the pod link, no DHCP server of
//! nicplug's), the pod link stays as CNI made it, and an unplug only
//! detaches. Each renders what KubeVirt renders at VM start:
//!
//! - macvtap: the pod link is a macvtap that macvtap-cni made on the node's
//!   lower link and moved into the pod; the device opens it as its tap
//!   (`<interface type='ethernet'>`, target the pod link, `managed='no'`:
//!   libvirt opens `/dev/tapN` itself and hands QEMU the descriptor). The
//!   LAN's DHCP serves the guest.
//! - passt: the pod network's primary link (`eth0`, or OVN's primary user
//!   network link `ovn-udn1`); the device is an `<interface type='user'>`
//!   with a passt backend, and libvirt starts passt in the pod for it
//!   (stopping it with the detach). passt gives the guest the pod's address
//!   (DHCP, NDP, DHCPv6) and carries its traffic through the pod's sockets.

use super::{
    Binding, Budget, DomainInterface, DomainState, IfName, InterfaceDevice, InterfacePlan, Link,
    MIGRATING_IN, Mac, Migration, Observed, Phase, SpecInterface, SpecState, Step, Vmi,
    cni_settling, hotplug_position, link_state_step, off_preferred_port,
};
use crate::hypervisor::DeviceBackend;

/// A binding whose device uses the pod link as CNI made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direct {
    Macvtap,
    Passt,
}

/// The pod network's link when OVN-Kubernetes gives the pod a primary user
/// defined network: KubeVirt's passt plugin binds it instead of `eth0`.
const OVN_PRIMARY_UDN: &str = "ovn-udn1";
/// The pod network's link otherwise.
const PRIMARY_POD_IFACE: &str = "eth0";

impl Direct {
    pub(super) fn of(binding: &Binding) -> Option<Self> {
        match binding {
            Binding::Macvtap => Some(Self::Macvtap),
            Binding::Passt => Some(Self::Passt),
            Binding::Bridge | Binding::Plugin(_) | Binding::Other(_) => None,
        }
    }

    /// The pod link the device uses, as KubeVirt picks it.
    pub(super) fn pod_iface(self, spec_pod_iface: IfName, observed: &Observed<'_>) -> IfName {
        match self {
            Self::Macvtap => spec_pod_iface,
            Self::Passt => {
                let udn = IfName::new(OVN_PRIMARY_UDN).expect("a valid name");
                if observed.link(&udn).is_some() {
                    udn
                } else {
                    IfName::new(PRIMARY_POD_IFACE).expect("a valid name")
                }
            }
        }
    }

    /// Why `pod` cannot back the device, if it cannot.
    fn check(self, pod: &Link) -> Result<(), String> {
        match self {
            Self::Macvtap if !pod.is_macvtap() => Err(format!(
                "pod interface {} is a {}, not a macvtap: the network's CNI must be macvtap-cni for binding macvtap",
                pod.name,
                pod.kind.name()
            )),
            Self::Macvtap if !pod.up => Err(format!(
                "pod interface {} is down: macvtap-cni sets it up, nicplug does not change CNI's link",
                pod.name
            )),
            Self::Passt if !pod.up => Err(format!(
                "pod interface {} is down: passt needs the pod's link up, and nicplug does not change CNI's link",
                pod.name
            )),
            Self::Passt if !pod.routes.iter().any(|r| r.destination.prefix == 0) => Err(format!(
                "pod interface {} has no default route: passt takes the guest's gateway from it, and exits without one",
                pod.name
            )),
            Self::Macvtap | Self::Passt => Ok(()),
        }
    }

    /// Whether `device`, on a network that left the spec, is this binding's.
    fn owns(self, device: &DomainInterface, observed: &Observed<'_>) -> Option<IfName> {
        let (link, ours) = match self {
            Self::Macvtap => {
                let link = IfName::new(device.target_dev.as_deref()?).ok()?;
                let ours = observed.link(&link).is_some_and(Link::is_macvtap);
                (link, ours)
            }
            Self::Passt => (
                IfName::new(device.source_dev.as_deref()?).ok()?,
                device.is_passt(),
            ),
        };
        ours.then_some(link)
    }
}

/// The plan of a spec interface on a direct binding, whose device uses
/// pod link `pod_iface`.
pub(super) fn plan(
    kind: Direct,
    vmi: &Vmi,
    spec: &SpecInterface,
    pod_iface: IfName,
    observed: &Observed<'_>,
    budget: &mut Budget,
) -> InterfacePlan {
    let mut plan = InterfacePlan::new(&spec.name, Phase::Pending);
    plan.pod_iface = Some(pod_iface.clone());
    let pod = observed.link(&pod_iface);
    let Some(domain) = observed.domain else {
        return prepare(kind, spec, &pod_iface, pod, None, plan);
    };
    match domain.migration {
        Migration::Incoming => return prepare(kind, spec, &pod_iface, pod, Some(domain), plan),
        // The target pod has its own pod link; this one stays CNI's.
        Migration::Departed => return plan.with_message("the domain migrated to another pod"),
        Migration::None | Migration::Outgoing => {}
    }
    let alias = spec.alias();
    let device = domain.interface_by_alias(&alias);
    plan.mac = device.and_then(|d| d.mac);
    if spec.state == SpecState::Absent {
        return detach(plan, &alias, device, domain, Phase::Detached);
    }
    if !domain.running {
        // In the definition, not in a guest that runs here.
        return plan.with_message("the domain is not running");
    }
    if let Some(device) = device {
        let gone = pod.is_none().then_some(&pod_iface);
        let mut plan = adopt(vmi, spec, device, domain, gone, plan);
        if kind == Direct::Passt
            && plan.steps.is_empty()
            && device.link_up
            && observed.migrated_in.contains(&spec.name)
        {
            // The guest still has the source pod's address: a carrier flap
            // makes its DHCP client take the target pod's from passt.
            plan.steps.push(Step::RefreshLink {
                device: device.clone(),
            });
        }
        return plan;
    }
    let Some(pod) = pod else {
        return plan.with_message(waiting_for(&pod_iface));
    };
    if let Err(why) = kind.check(pod) {
        plan.phase = Phase::Failed;
        return plan.with_message(why);
    }
    if let Some(waiting) = cni_settling(pod) {
        return plan.with_message(waiting);
    }
    attach(kind, vmi, spec, pod, domain, budget, plan)
}

/// A device of a network that left the spec, on a pod link of a direct
/// binding: it is detached, and the pod link stays CNI's (a macvtap goes
/// with CNI DEL; libvirt stops a device's passt with the detach).
pub(super) fn departed(
    network: &str,
    device: &DomainInterface,
    observed: &Observed<'_>,
    domain: &DomainState,
) -> Option<InterfacePlan> {
    let link = [Direct::Macvtap, Direct::Passt]
        .into_iter()
        .find_map(|kind| kind.owns(device, observed))?;
    let mut plan = InterfacePlan::new(network, Phase::Detaching);
    plan.departed = true;
    plan.pod_iface = Some(link);
    plan.mac = device.mac;
    let alias = format!("ua-{network}");
    let plan = detach(plan, &alias, Some(device), domain, Phase::Detached);
    Some(plan.with_message("the network left the spec"))
}

fn waiting_for(pod: &IfName) -> String {
    format!("waiting for pod interface {}", pod.as_str())
}

/// The device for `pod`, on the root port the spec's position names.
fn attach(
    kind: Direct,
    vmi: &Vmi,
    spec: &SpecInterface,
    pod: &Link,
    domain: &DomainState,
    budget: &mut Budget,
    mut plan: InterfacePlan,
) -> InterfacePlan {
    let mac = match kind {
        Direct::Macvtap => macvtap_mac(spec, pod, budget),
        Direct::Passt => passt_mac(vmi, spec, budget),
    };
    let mac = match mac {
        Ok(mac) => mac,
        Err(why) => {
            plan.phase = Phase::Failed;
            return plan.with_message(why);
        }
    };
    plan.mac = Some(mac);
    let multiqueue = vmi.multiqueue.filter(|_| spec.model == "virtio");
    let (backend, queues) = match kind {
        Direct::Macvtap => (DeviceBackend::Tap, multiqueue),
        // libvirt gives a passt device one queue.
        Direct::Passt => (
            DeviceBackend::Passt {
                forwards: spec.ports.clone(),
            },
            None,
        ),
    };
    let device = InterfaceDevice {
        network: spec.name.clone(),
        link: pod.name.clone(),
        backend,
        model: spec.model.clone(),
        mac,
        mtu: pod.mtu,
        queues,
        link_up: spec.state != SpecState::Down,
        address: None,
    };
    if let Err(e) = device.validate() {
        plan.phase = Phase::Failed;
        return plan.with_message(e.to_string());
    }
    let position = hotplug_position(vmi, &spec.name).unwrap_or(usize::MAX);
    let Some(placement) = budget.pool.take(position) else {
        let total = domain.root_ports.total();
        plan.phase = Phase::Failed;
        plan.needs_root_port = true;
        return plan.with_message(format!(
            "no free PCIe root port for hotplug: {total} of {total} in use"
        ));
    };
    if placement.fallback.is_some() {
        plan.message = Some(placement.to_string());
    }
    budget.macs.push(mac);
    plan.steps.push(Step::Attach {
        device: InterfaceDevice {
            address: Some(placement.address()),
            ..device
        },
        persistent: domain.persistent,
    });
    plan.phase = Phase::Attached;
    plan
}

/// The MAC the spec or the macvtap gives (the two must agree: a macvtap
/// passes the guest only frames for its own MAC).
fn macvtap_mac(spec: &SpecInterface, pod: &Link, budget: &Budget) -> Result<Mac, String> {
    let Some(pod_mac) = pod.mac else {
        return Err(format!("pod interface {} has no MAC", pod.name));
    };
    if let Some(spec_mac) = spec.mac
        && spec_mac != pod_mac
    {
        return Err(format!(
            "macAddress {spec_mac} is not the MAC of macvtap {} ({pod_mac}): the macvtap would drop the guest's traffic (macvtap-cni sets the spec's MAC when Multus passes it)",
            pod.name
        ));
    }
    if pod_mac.is_multicast() || pod_mac.octets() == [0; 6] {
        return Err(format!(
            "the MAC of macvtap {} ({pod_mac}) is not a unicast address",
            pod.name
        ));
    }
    if budget.macs.contains(&pod_mac) {
        return Err(format!(
            "the MAC of macvtap {} ({pod_mac}) is already used by another device of the domain",
            pod.name
        ));
    }
    Ok(pod_mac)
}

/// The spec's MAC, else one derived from the VMI and the network (stable
/// across unplugs and nicplug restarts). Never the pod link's: passt
/// speaks to the guest from that MAC.
fn passt_mac(vmi: &Vmi, spec: &SpecInterface, budget: &Budget) -> Result<Mac, String> {
    let mac = spec.mac.unwrap_or_else(|| {
        Mac::locally_administered_from(&format!(
            "passt/{}/{}/{}",
            vmi.namespace, vmi.name, spec.name
        ))
    });
    if budget.macs.contains(&mac) {
        return Err(format!(
            "MAC {mac} is already used by another device of the domain"
        ));
    }
    Ok(mac)
}

/// A device nicplug or KubeVirt attached: adopted as it is; its link state
/// follows the spec.
fn adopt(
    vmi: &Vmi,
    spec: &SpecInterface,
    device: &DomainInterface,
    domain: &DomainState,
    pod_gone: Option<&IfName>,
    mut plan: InterfacePlan,
) -> InterfacePlan {
    plan.phase = Phase::Attached;
    if let Some(pod) = pod_gone {
        plan.message = Some(format!(
            "pod interface {} is gone: the NIC carries no traffic until it is unplugged or the VM restarts",
            pod.as_str()
        ));
    } else if let Some(message) = off_preferred_port(vmi, spec, device, domain) {
        plan.message = Some(message);
    }
    plan.steps.extend(link_state_step(spec, device, domain));
    plan
}

/// Detaches the device if there is one; `done` once there is none. Nothing
/// else is nicplug's to remove.
fn detach(
    mut plan: InterfacePlan,
    alias: &str,
    device: Option<&DomainInterface>,
    domain: &DomainState,
    done: Phase,
) -> InterfacePlan {
    match device {
        Some(_) if !domain.running => plan.with_message("the domain is not running here"),
        Some(_) => {
            plan.phase = Phase::Detaching;
            plan.steps.push(Step::Detach {
                alias: alias.to_string(),
                persistent: domain.persistent,
            });
            plan
        }
        None => {
            plan.phase = done;
            plan
        }
    }
}

/// A migration target: the target pod's own pod link (from CNI) is all the
/// arriving device needs; libvirt opens the macvtap, or starts passt, when
/// the domain comes.
fn prepare(
    kind: Direct,
    spec: &SpecInterface,
    pod_iface: &IfName,
    pod: Option<&Link>,
    domain: Option<&DomainState>,
    mut plan: InterfacePlan,
) -> InterfacePlan {
    let device = domain.and_then(|d| d.interface_by_alias(&spec.alias()));
    plan.mac = device.and_then(|d| d.mac).or(spec.mac);
    if spec.state == SpecState::Absent {
        if device.is_some() {
            return plan.with_message(MIGRATING_IN);
        }
        plan.phase = Phase::Detached;
        return plan;
    }
    let Some(pod) = pod else {
        return plan.with_message(waiting_for(pod_iface));
    };
    if let Err(why) = kind.check(pod) {
        plan.phase = Phase::Failed;
        return plan.with_message(why);
    }
    if let Some(waiting) = cni_settling(pod) {
        return plan.with_message(waiting);
    }
    plan.phase = Phase::Prepared;
    match (kind, plan.mac, pod.mac) {
        (Direct::Macvtap, Some(vm), Some(macvtap)) if vm != macvtap => plan.with_message(format!(
            "the device's MAC {vm} is not the MAC of macvtap {} ({macvtap}): the guest gets no unicast traffic here (set macAddress in the spec, so macvtap-cni gives every pod the same MAC)",
            pod.name
        )),
        _ => plan,
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan as plan_all;
    use super::super::tests::{domain, observed, step_names};
    use super::*;
    use crate::model::vmi::BindingPlugins;
    use crate::netns::{CniProgress, LinkKind};

    const POD: &str = "pod9a6a0c3b4d8";
    const MACVTAP_MAC: &str = "02:aa:bb:cc:dd:01";

    /// The spec of a VM with a masquerade primary and `dyniface1` on a
    /// binding plugin named `plugin` (`extra` goes into the interface).
    fn vmi(plugin: &str, extra: &str) -> Vmi {
        Vmi::parse(&format!(
            r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[
                {{"name":"default","masquerade":{{}}}},
                {{"name":"dyniface1","binding":{{"name":"{plugin}"}}{extra}}}]}}}},
                "networks":[{{"name":"default","pod":{{}}}},{{"name":"dyniface1","multus":{{"networkName":"lan"}}}}]}}}}"#
        ))
        .unwrap()
        .resolve_plugins(&BindingPlugins::default())
    }

    fn macvtap() -> Link {
        Link {
            mac: Some(MACVTAP_MAC.parse().unwrap()),
            mtu: 1500,
            ..Link::fixture(7, POD, LinkKind::Other("macvtap".into()))
        }
    }

    fn device(link_up: bool) -> DomainInterface {
        DomainInterface {
            alias: Some("ua-dyniface1".into()),
            mac: Some(MACVTAP_MAC.parse().unwrap()),
            target_dev: Some(POD.into()),
            link_up,
            xml: "<interface type='ethernet'><alias name='ua-dyniface1'/></interface>".into(),
            ..Default::default()
        }
    }

    fn plan_of(vmi: &Vmi, links: &[Link], domain: Option<&DomainState>) -> InterfacePlan {
        plan_all(vmi, &observed(links, domain)).remove(1)
    }

    #[test]
    fn a_macvtap_pod_link_is_attached_as_kubevirt_renders_it_and_nothing_is_built() {
        let vmi = vmi("macvtap", "");
        let dom = domain(4, vec![]);
        let p = plan_of(&vmi, &[macvtap()], Some(&dom));
        assert_eq!(p.phase, Phase::Attached, "{p:?}");
        let [Step::Attach { device, persistent }] = p.steps.as_slice() else {
            panic!("only the attach: {:?}", p.steps);
        };
        assert!(persistent);
        assert_eq!(device.link.as_str(), POD, "the device opens the macvtap");
        assert_eq!(device.mac, MACVTAP_MAC.parse().unwrap());
        assert_eq!(device.mtu, 1500);
        assert_eq!(device.alias(), "ua-dyniface1");
        // The first hot-plug interface goes on the first root port.
        assert_eq!(device.address.unwrap().bus, 1);
        let xml = device.to_xml().unwrap();
        assert!(xml.starts_with("<interface type='ethernet'>"), "{xml}");
        assert!(
            xml.contains(&format!("<target dev='{POD}' managed='no'/>")),
            "{xml}"
        );
        assert!(p.rollback.is_empty());
        assert!(p.uplink.is_none(), "no uplink of nicplug's to wait for");
    }

    #[test]
    fn the_legacy_core_macvtap_binding_is_the_same_device() {
        let vmi = Vmi::parse(
            r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm","namespace":"ns"},"spec":{"domain":{"devices":{"interfaces":[
                {"name":"default","masquerade":{}},{"name":"dyniface1","macvtap":{}}]}},
                "networks":[{"name":"default","pod":{}},{"name":"dyniface1","multus":{"networkName":"lan"}}]}}"#,
        )
        .unwrap();
        let dom = domain(4, vec![]);
        let p = plan_of(&vmi, &[macvtap()], Some(&dom));
        assert_eq!(step_names(&p), ["attach-device"]);
    }

    #[test]
    fn plugin_names_are_mapped_and_an_unknown_one_is_unsupported_by_name() {
        let dom = domain(4, vec![]);
        let p = plan_of(&vmi("lan-tap", ""), &[macvtap()], Some(&dom));
        assert_eq!(p.phase, Phase::Unsupported);
        let message = p.message.unwrap();
        assert!(message.contains("lan-tap"), "{message}");
        assert!(
            message.contains("--binding-plugin lan-tap=KIND"),
            "{message}"
        );

        let mut plugins = BindingPlugins::default();
        let (name, kind) = crate::model::vmi::parse_plugin_mapping("lan-tap=macvtap").unwrap();
        plugins.insert(&name, kind);
        let mapped = vmi("lan-tap", "").resolve_plugins(&plugins);
        let p = plan_of(&mapped, &[macvtap()], Some(&dom));
        assert_eq!(step_names(&p), ["attach-device"]);
        assert!(crate::model::vmi::parse_plugin_mapping("lan-tap=slirp").is_err());
        assert!(crate::model::vmi::parse_plugin_mapping("lan-tap").is_err());
    }

    #[test]
    fn nothing_is_attached_before_cni_is_done_or_to_a_link_that_is_no_macvtap() {
        let vmi = vmi("macvtap", "");
        let dom = domain(4, vec![]);
        let settling = Link {
            cni: CniProgress::Settling,
            ..macvtap()
        };
        let p = plan_of(&vmi, &[settling], Some(&dom));
        assert_eq!(p.phase, Phase::Pending);
        assert!(p.steps.is_empty());
        assert!(p.message.unwrap().contains("waiting for CNI"));

        let veth = Link {
            kind: LinkKind::Veth,
            ..macvtap()
        };
        let p = plan_of(&vmi, &[veth], Some(&dom));
        assert_eq!(p.phase, Phase::Failed);
        assert!(p.steps.is_empty());
        assert!(p.message.unwrap().contains("is a veth, not a macvtap"));

        let p = plan_of(&vmi, &[], Some(&dom));
        assert_eq!(p.phase, Phase::Pending);
        assert_eq!(
            p.message.as_deref(),
            Some("waiting for pod interface pod9a6a0c3b4d8")
        );
    }

    #[test]
    fn a_spec_mac_other_than_the_macvtaps_is_refused_with_both() {
        let vmi = vmi("macvtap", r#","macAddress":"02:00:00:00:00:09""#);
        let dom = domain(4, vec![]);
        let p = plan_of(&vmi, &[macvtap()], Some(&dom));
        assert_eq!(p.phase, Phase::Failed);
        assert!(p.steps.is_empty());
        let message = p.message.unwrap();
        assert!(
            message.contains("02:00:00:00:00:09") && message.contains(MACVTAP_MAC),
            "{message}"
        );
        // The same MAC is fine.
        let vmi = self::vmi("macvtap", &format!(r#","macAddress":"{MACVTAP_MAC}""#));
        let p = plan_of(&vmi, &[macvtap()], Some(&dom));
        assert_eq!(step_names(&p), ["attach-device"]);
    }

    #[test]
    fn an_attached_device_is_adopted_and_its_link_state_follows_the_spec() {
        let dom = domain(4, vec![device(true)]);
        let p = plan_of(&vmi("macvtap", ""), &[macvtap()], Some(&dom));
        assert_eq!(p.phase, Phase::Attached);
        assert!(p.steps.is_empty());
        let p = plan_of(
            &vmi("macvtap", r#","state":"down""#),
            &[macvtap()],
            Some(&dom),
        );
        assert_eq!(step_names(&p), ["set-link-state"]);
        // The macvtap went (CNI DEL) under the device: said, not acted on.
        let p = plan_of(&vmi("macvtap", ""), &[], Some(&dom));
        assert_eq!(p.phase, Phase::Attached);
        assert!(p.message.unwrap().contains("is gone"));
    }

    #[test]
    fn absent_or_leaving_the_spec_detaches_and_touches_nothing_else() {
        let dom = domain(4, vec![device(true)]);
        let p = plan_of(
            &vmi("macvtap", r#","state":"absent""#),
            &[macvtap()],
            Some(&dom),
        );
        assert_eq!(p.phase, Phase::Detaching);
        assert_eq!(step_names(&p), ["detach-device"]);
        let gone = domain(4, vec![]);
        let p = plan_of(
            &vmi("macvtap", r#","state":"absent""#),
            &[macvtap()],
            Some(&gone),
        );
        assert_eq!(p.phase, Phase::Detached);
        assert!(p.steps.is_empty());

        // Left the spec: the device of a macvtap goes, the macvtap stays.
        let only_primary = Vmi::parse(
            r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm","namespace":"ns"},"spec":{"domain":{"devices":{"interfaces":[
                {"name":"default","masquerade":{}}]}},"networks":[{"name":"default","pod":{}}]}}"#,
        )
        .unwrap();
        let p = plan_of(&only_primary, &[macvtap()], Some(&dom));
        assert_eq!(p.name, "dyniface1");
        assert!(p.departed);
        assert_eq!(step_names(&p), ["detach-device"]);
        // A device whose target is no macvtap of the pod is not this rule's.
        assert_eq!(plan_all(&only_primary, &observed(&[], Some(&dom))).len(), 1);
    }

    #[test]
    fn a_migration_target_is_prepared_by_cnis_macvtap_alone() {
        let vmi = vmi("macvtap", "");
        let p = plan_of(&vmi, &[macvtap()], None);
        assert_eq!(p.phase, Phase::Prepared);
        assert!(p.steps.is_empty());
        let p = plan_of(&vmi, &[], None);
        assert_eq!(p.phase, Phase::Pending);
        // The arriving device's MAC is not the target macvtap's: said.
        let other = DomainInterface {
            mac: Some("02:00:00:00:00:77".parse().unwrap()),
            ..device(true)
        };
        let incoming = DomainState {
            running: false,
            migration: Migration::Incoming,
            ..domain(4, vec![other])
        };
        let p = plan_of(&vmi, &[macvtap()], Some(&incoming));
        assert_eq!(p.phase, Phase::Prepared);
        assert!(p.message.unwrap().contains("no unicast traffic"));
    }

    #[test]
    fn no_dhcp_server_for_a_macvtap_interface() {
        let vmi = vmi("macvtap", "");
        let dom = domain(4, vec![device(true)]);
        let mut status = crate::status::InterfaceStatus::new("dyniface1".to_string(), Phase::Ready);
        status.pod_interface_name = Some(POD.into());
        let (desired, unserved) =
            crate::dhcp::desired_servers(&vmi, &[macvtap()], Some(&dom), &[status], &|_| {
                crate::dhcp::Dns::default()
            });
        assert!(desired.is_empty());
        let reason = unserved[0].1.reason.as_deref().unwrap();
        assert!(reason.contains("macvtap"), "{reason}");
    }

    /// A VM whose pod network is on the passt plugin (`extra` goes into
    /// that interface), beside a masquerade-free spec.
    fn passt_vmi(extra: &str, network: &str) -> Vmi {
        Vmi::parse(&format!(
            r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[
                {{"name":"default","binding":{{"name":"passt"}}{extra}}}]}}}},
                "networks":[{{"name":"default",{network}}}]}}}}"#
        ))
        .unwrap()
        .resolve_plugins(&BindingPlugins::default())
    }

    fn pod_network() -> &'static str {
        r#""pod":{}"#
    }

    fn eth0(name: &str) -> Link {
        Link {
            routes: vec![crate::model::PodRoute::new(
                "0.0.0.0/0".parse().unwrap(),
                Some("169.254.71.1".parse().unwrap()),
            )],
            ..Link::fixture(2, name, LinkKind::Veth)
        }
    }

    fn passt_plan(vmi: &Vmi, links: &[Link], domain: Option<&DomainState>) -> InterfacePlan {
        plan_all(vmi, &observed(links, domain)).remove(0)
    }

    fn attached_device(p: &InterfacePlan) -> &InterfaceDevice {
        let [Step::Attach { device, .. }] = p.steps.as_slice() else {
            panic!("only the attach: {:?}", p.steps);
        };
        device
    }

    #[test]
    fn a_passt_pod_network_is_attached_as_kubevirts_sidecar_renders_it() {
        let vmi = passt_vmi("", pod_network());
        let dom = domain(4, vec![]);
        let p = passt_plan(&vmi, &[eth0("eth0")], Some(&dom));
        assert_eq!(p.phase, Phase::Attached, "{p:?}");
        assert_eq!(p.pod_iface.as_ref().unwrap().as_str(), "eth0");
        let device = attached_device(&p);
        assert_eq!(device.link.as_str(), "eth0");
        assert_eq!(device.queues, None);
        // Not the pod link's MAC (passt speaks to the guest from it), and
        // the same at every pass.
        assert_ne!(Some(device.mac), eth0("eth0").mac);
        assert!(device.mac.is_locally_administered() && !device.mac.is_multicast());
        let again = passt_plan(&vmi, &[eth0("eth0")], Some(&dom));
        assert_eq!(attached_device(&again).mac, device.mac);
        let xml = device.to_xml().unwrap();
        for part in [
            "<interface type='user'>",
            "<source dev='eth0'/>",
            "<backend type='passt'/>",
            "<portForward proto='tcp'/>",
            "<portForward proto='udp'/>",
            "<alias name='ua-default'/>",
            "<model type='virtio-non-transitional'/>",
        ] {
            assert!(xml.contains(part), "{part} in {xml}");
        }
        assert!(!xml.contains("<mtu"), "{xml}");
        assert!(p.rollback.is_empty() && p.uplink.is_none());

        // The spec's MAC is taken as it is.
        let vmi = passt_vmi(r#","macAddress":"02:00:00:00:00:0a""#, pod_network());
        let p = passt_plan(&vmi, &[eth0("eth0")], Some(&dom));
        assert_eq!(
            attached_device(&p).mac,
            "02:00:00:00:00:0a".parse().unwrap()
        );
    }

    #[test]
    fn passt_forwards_the_listed_ports_by_protocol_and_refuses_others() {
        let vmi = passt_vmi(
            r#","ports":[{"name":"http","port":80},{"port":53,"protocol":"udp"},{"port":443,"protocol":"TCP"}]"#,
            pod_network(),
        );
        let dom = domain(4, vec![]);
        let p = passt_plan(&vmi, &[eth0("eth0")], Some(&dom));
        let xml = attached_device(&p).to_xml().unwrap();
        assert!(
            xml.contains(
                "  <portForward proto='tcp'>\n    <range start='80'/>\n    <range start='443'/>\n  </portForward>\n  <portForward proto='udp'>\n    <range start='53'/>\n  </portForward>\n"
            ),
            "{xml}"
        );

        let vmi = passt_vmi(r#","ports":[{"port":9,"protocol":"SCTP"}]"#, pod_network());
        let p = passt_plan(&vmi, &[eth0("eth0")], Some(&dom));
        assert_eq!(p.phase, Phase::Failed);
        assert!(p.steps.is_empty());
        assert!(
            p.message
                .unwrap()
                .contains("\"SCTP\": passt forwards TCP and UDP only")
        );

        let bad = Vmi::parse(
            r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm","namespace":"ns"},"spec":{"domain":{"devices":{"interfaces":[
                {"name":"default","binding":{"name":"passt"},"ports":[{"port":70000}]}]}},"networks":[{"name":"default","pod":{}}]}}"#,
        )
        .unwrap_err();
        assert_eq!(
            bad.to_string(),
            "spec.domain.devices.interfaces[0].ports[0].port: port 70000 is not in 1..=65535"
        );
    }

    #[test]
    fn passt_is_for_the_pod_network_and_binds_ovns_primary_network_first() {
        let dom = domain(4, vec![]);
        let on_multus = passt_vmi("", r#""multus":{"networkName":"lan"}"#);
        let p = passt_plan(&on_multus, &[eth0("eth0")], Some(&dom));
        assert_eq!(p.phase, Phase::Unsupported);
        assert!(p.message.unwrap().contains("pod network only"));

        let vmi = passt_vmi("", pod_network());
        let p = passt_plan(&vmi, &[eth0("eth0"), eth0("ovn-udn1")], Some(&dom));
        assert_eq!(attached_device(&p).link.as_str(), "ovn-udn1");

        // The legacy core binding is the same device.
        let core = Vmi::parse(
            r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm","namespace":"ns"},"spec":{"domain":{"devices":{"interfaces":[
                {"name":"default","passt":{}}]}},"networks":[{"name":"default","pod":{}}]}}"#,
        )
        .unwrap();
        let p = passt_plan(&core, &[eth0("eth0")], Some(&dom));
        assert_eq!(step_names(&p), ["attach-device"]);
    }

    #[test]
    fn passt_waits_for_the_pod_link_and_refuses_one_without_a_default_route() {
        let vmi = passt_vmi("", pod_network());
        let dom = domain(4, vec![]);
        let p = passt_plan(&vmi, &[], Some(&dom));
        assert_eq!(p.phase, Phase::Pending);
        assert_eq!(p.message.as_deref(), Some("waiting for pod interface eth0"));
        let no_route = Link {
            routes: vec![],
            ..eth0("eth0")
        };
        let p = passt_plan(&vmi, &[no_route], Some(&dom));
        assert_eq!(p.phase, Phase::Failed);
        assert!(p.steps.is_empty());
        assert!(p.message.unwrap().contains("has no default route"));
        // A migration target: the arriving domain's passt is libvirt's to
        // start; the pod link is all it needs.
        let p = passt_plan(&vmi, &[eth0("eth0")], None);
        assert_eq!(p.phase, Phase::Prepared);
        assert!(p.steps.is_empty());
    }

    #[test]
    fn a_passt_device_is_adopted_detached_and_detached_when_it_leaves_the_spec() {
        let device = DomainInterface {
            alias: Some("ua-default".into()),
            mac: Some("02:00:00:00:00:0b".parse().unwrap()),
            source_dev: Some("eth0".into()),
            backend: Some("passt".into()),
            link_up: true,
            xml: "<interface type='user'><alias name='ua-default'/></interface>".into(),
            ..Default::default()
        };
        let dom = domain(4, vec![device]);
        let p = passt_plan(&passt_vmi("", pod_network()), &[eth0("eth0")], Some(&dom));
        assert_eq!(p.phase, Phase::Attached);
        assert!(p.steps.is_empty());
        let p = passt_plan(
            &passt_vmi(r#","state":"absent""#, pod_network()),
            &[eth0("eth0")],
            Some(&dom),
        );
        assert_eq!(step_names(&p), ["detach-device"]);

        let masquerade = Vmi::parse(
            r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm","namespace":"ns"},"spec":{"domain":{"devices":{"interfaces":[
                {"name":"blue","bridge":{}}]}},"networks":[{"name":"blue","multus":{"networkName":"lan"}}]}}"#,
        )
        .unwrap();
        let plans = plan_all(&masquerade, &observed(&[eth0("eth0")], Some(&dom)));
        let p = plans.iter().find(|p| p.name == "default").unwrap();
        assert!(p.departed);
        assert_eq!(p.pod_iface.as_ref().unwrap().as_str(), "eth0");
        assert_eq!(step_names(p), ["detach-device"]);
    }

    #[test]
    fn no_dhcp_server_for_a_passt_interface() {
        let vmi = passt_vmi("", pod_network());
        let mut status = crate::status::InterfaceStatus::new("default".to_string(), Phase::Ready);
        status.pod_interface_name = Some("eth0".into());
        let (desired, unserved) =
            crate::dhcp::desired_servers(&vmi, &[eth0("eth0")], None, &[status], &|_| {
                crate::dhcp::Dns::default()
            });
        assert!(desired.is_empty());
        let reason = unserved[0].1.reason.as_deref().unwrap();
        assert!(reason.contains("passt serves"), "{reason}");
    }
}
