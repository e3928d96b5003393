use super::*;
use crate::hypervisor::domain_xml::{
    DomainInterface, Occupant, PciAddress, RootPortIndex, RootPorts,
};
use crate::model::IpCidr;
use crate::netns::TapInfo;

/// The QEMU of the default stack (bookworm-backports), and Debian 12's.
const QEMU_10: QemuVersion = QemuVersion(10_000_002);
const QEMU_7: QemuVersion = QemuVersion(7_002_000);

const OWNER: Owner = Owner {
    uid: 64055,
    gid: 64055,
};
const POD: &str = "pod9a6a0c3b4d8";
const BRIDGE: &str = "k6t-9a6a0c3b4d8";
const TAP: &str = "tap9a6a0c3b4d8";

fn name(s: &str) -> IfName {
    IfName::new(s).unwrap()
}

fn vmi(extra: &str) -> Vmi {
    Vmi::parse(&format!(
        r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[
            {{"name":"default","masquerade":{{}}}},
            {{"name":"dyniface1","bridge":{{}}{extra}}}]}}}},
            "networks":[{{"name":"default","pod":{{}}}},{{"name":"dyniface1","multus":{{"networkName":"nad1"}}}}]}}}}"#
    ))
    .unwrap()
}

fn link(index: u32, name: &str, kind: LinkKind) -> Link {
    Link::fixture(index, name, kind)
}

fn eth0() -> Link {
    link(2, "eth0", LinkKind::Veth)
}

fn fresh_pod_link() -> Link {
    Link {
        addresses: vec!["169.254.1.5/24".parse::<IpCidr>().unwrap()],
        ..link(3, POD, LinkKind::Veth)
    }
}

pub(super) fn domain(ports: usize, interfaces: Vec<DomainInterface>) -> DomainState {
    DomainState {
        running: true,
        persistent: true,
        migration: Migration::None,
        arrived_by_migration: false,
        interfaces,
        root_ports: RootPorts::with_free(4, ports),
        qemu: Some(QEMU_10),
        devices_unknown: false,
    }
}

pub(super) fn observed<'a>(links: &'a [Link], domain: Option<&'a DomainState>) -> Observed<'a> {
    Observed {
        migrated_in: &[],
        links,
        domain,
        tap_owner: Some(OWNER),
        clean_kubevirt_leftovers: false,
        kubevirt_plumbs: false,
    }
}

pub(super) fn step_names(plan: &InterfacePlan) -> Vec<&'static str> {
    plan.steps.iter().map(Step::name).collect()
}

/// The links of a fully plumbed network, as the real netns layer leaves them.
fn plumbed_links() -> Vec<Link> {
    let original = fresh_pod_link();
    let record = PodLinkRecord {
        network: Some("dyniface1".into()),
        mac: original.mac.unwrap(),
        mtu: 1400,
        addresses: original.addresses.clone(),
        routes: vec![],
        previous_alias: None,
    };
    let bridge_mac = Mac::locally_administered_from(POD);
    let bridge = Link {
        mac: Some(bridge_mac),
        ..link(10, BRIDGE, LinkKind::Bridge)
    };
    let pod = Link {
        mac: Some(bridge_mac),
        master: Some(10),
        alias: Some(record.to_alias().unwrap()),
        addresses: vec![],
        learning: Some(false),
        ..original
    };
    let tap = Link {
        master: Some(10),
        tap: Some(TapInfo {
            owner: Some(OWNER.uid),
            group: Some(OWNER.gid),
            multi_queue: false,
            vnet_hdr: true,
            persist: true,
            // QEMU holds it: the device is live.
            held: Some(true),
        }),
        ..link(11, TAP, LinkKind::Tun)
    };
    vec![eth0(), pod, bridge, tap]
}

#[test]
fn fresh_pod_link_gets_the_whole_plug_sequence() {
    let vmi = vmi("");
    let links = [eth0(), fresh_pod_link()];
    let dom = domain(4, vec![]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    // The pod network is not managed: listed, no message, nothing to do.
    assert_eq!(plans[0].phase, Phase::NotManaged);
    assert!(plans[0].message.is_none());
    assert!(plans[0].steps.is_empty());
    let p = &plans[1];
    assert_eq!(p.phase, Phase::Attached);
    assert_eq!(
        step_names(p),
        [
            "record-pod-link",
            "ensure-bridge",
            "enslave-pod-link",
            "ensure-tap",
            "attach-device"
        ]
    );
    // The VM gets the pod link's original MAC; the record keeps MAC, MTU, IPs.
    assert_eq!(p.mac, fresh_pod_link().mac);
    let Step::RecordPodLink { alias, .. } = &p.steps[0] else {
        panic!()
    };
    assert_eq!(
        alias,
        "nicplug/v1 net=dyniface1 mac=0a:58:00:00:00:03 mtu=1400 addr=169.254.1.5/24"
    );
    let Step::EnsureTap { spec, .. } = &p.steps[3] else {
        panic!()
    };
    assert_eq!(spec.owner, OWNER);
    assert_eq!(spec.mtu, 1400);
    assert!(!spec.multi_queue);
    let Step::Attach { device, .. } = &p.steps[4] else {
        panic!()
    };
    let xml = device.to_xml().unwrap();
    assert!(xml.contains("<alias name='ua-dyniface1'/>"));
    assert!(xml.contains("<target dev='tap9a6a0c3b4d8' managed='no'/>"));
    assert_eq!(
        step_names_of(&p.rollback),
        ["delete-link", "release-pod-link", "delete-link"]
    );
}

fn step_names_of(steps: &[Step]) -> Vec<&'static str> {
    steps.iter().map(Step::name).collect()
}

#[test]
fn converged_plans_nothing() {
    let vmi = vmi("");
    let links = plumbed_links();
    let device = DomainInterface {
        alias: Some("ua-dyniface1".into()),
        mac: fresh_pod_link().mac,
        target_dev: Some(TAP.into()),
        link_up: true,
        ..Default::default()
    };
    let dom = domain(3, vec![device]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(plans[1].phase, Phase::Attached);
    assert!(plans.iter().all(|p| p.steps.is_empty()), "{plans:?}");
}

#[test]
fn plumbed_but_not_attached_only_attaches() {
    let vmi = vmi("");
    let links = plumbed_links();
    let dom = domain(4, vec![]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(step_names(&plans[1]), ["attach-device"]);
    // MAC comes from the record, not from the (swapped) current pod link MAC.
    assert_eq!(plans[1].mac, fresh_pod_link().mac);
}

#[test]
fn half_plumbed_resumes_where_it_stopped() {
    let vmi = vmi("");
    let mut links = plumbed_links();
    links.retain(|l| l.name.as_str() != TAP);
    let dom = domain(4, vec![]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(step_names(&plans[1]), ["ensure-tap", "attach-device"]);
}

#[test]
fn spec_mac_and_multiqueue_and_link_down() {
    let mut vmi = vmi(r#","macAddress":"02:00:00:AA:BB:01","state":"down""#);
    vmi.multiqueue = Some(4);
    let links = [eth0(), fresh_pod_link()];
    let dom = domain(4, vec![]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    let p = &plans[1];
    assert_eq!(p.mac.unwrap().to_string(), "02:00:00:aa:bb:01");
    let Step::EnsureTap { spec, .. } = &p.steps[3] else {
        panic!()
    };
    assert!(spec.multi_queue);
    let Step::Attach { device, .. } = &p.steps[4] else {
        panic!()
    };
    let xml = device.to_xml().unwrap();
    assert!(xml.contains("queues='4'"));
    assert!(xml.contains("<link state='down'/>"));
}

#[test]
fn waits_for_the_pod_interface_and_the_domain() {
    let vmi = vmi("");
    let links = [eth0()];
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Pending);
    assert!(p.steps.is_empty());
    assert_eq!(
        p.message.as_deref(),
        Some("waiting for pod interface pod9a6a0c3b4d8")
    );

    let links = [eth0(), fresh_pod_link()];
    let stopped = DomainState {
        running: false,
        ..domain(4, vec![])
    };
    let p = &plan(&vmi, &observed(&links, Some(&stopped)))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Pending, 0));
}

#[test]
fn leftovers_without_pod_interface_are_removed() {
    let vmi = vmi("");
    let mut links = plumbed_links();
    links.retain(|l| l.name.as_str() != POD);
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Pending);
    assert_eq!(step_names(p), ["delete-link", "delete-link"]);
}

#[test]
fn no_free_root_port_fails_without_calling_libvirt() {
    let vmi = vmi("");
    let links = [eth0(), fresh_pod_link()];
    let dom = domain(0, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Failed);
    assert_eq!(
        p.message.as_deref(),
        Some("no free PCIe root port for hotplug: 4 of 4 in use")
    );
    assert!(p.steps.is_empty());
}

#[test]
fn root_ports_are_shared_in_spec_order() {
    let vmi = Vmi::parse(
        r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{"interfaces":[
            {"name":"a","bridge":{}},{"name":"b","bridge":{}}]}},
            "networks":[{"name":"a","multus":{"networkName":"a"}},{"name":"b","multus":{"networkName":"b"}}]}}"#,
    )
    .unwrap();
    let a = Link {
        name: crate::model::names::hashed_pod_iface("a"),
        ..fresh_pod_link()
    };
    let b = Link {
        index: 4,
        name: crate::model::names::hashed_pod_iface("b"),
        mac: Some(Mac::from_bytes([0x0a, 0x58, 0, 0, 0, 4])),
        ..fresh_pod_link()
    };
    let links = [eth0(), a, b];
    let dom = domain(1, vec![]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(plans[0].phase, Phase::Attached);
    assert_eq!(plans[1].phase, Phase::Failed);
    assert!(
        plans[1]
            .message
            .as_deref()
            .unwrap()
            .contains("4 of 4 in use")
    );
}

#[test]
fn an_existing_device_is_adopted_untouched() {
    let vmi = vmi("");
    let links = kubevirt_layout_links();
    let device = DomainInterface {
        alias: Some("ua-dyniface1".into()),
        link_up: true,
        ..Default::default()
    };
    let dom = domain(3, vec![device]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Attached);
    assert!(p.steps.is_empty());
    // Without the device (KubeVirt mid-way), nicplug still keeps out.
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Pending, 0));
}

#[test]
fn pod_link_of_another_master_is_not_taken() {
    let vmi = vmi("");
    let links = [
        eth0(),
        Link {
            master: Some(2),
            ..fresh_pod_link()
        },
    ];
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Failed);
    assert!(p.steps.is_empty());
}

#[test]
fn unknown_qemu_user_and_bad_mac_fail_with_reasons() {
    let links = [eth0(), fresh_pod_link()];
    let dom = domain(4, vec![]);
    let obs = Observed {
        tap_owner: None,
        ..observed(&links, Some(&dom))
    };
    let p = &plan(&vmi(""), &obs)[1];
    assert_eq!(p.phase, Phase::Failed);
    assert!(p.message.as_deref().unwrap().contains("--tap-owner"));
}

#[test]
fn corrupt_record_is_reported_not_overwritten() {
    let links = [
        eth0(),
        Link {
            alias: Some("nicplug/v1 garbage".into()),
            ..fresh_pod_link()
        },
    ];
    let dom = domain(4, vec![]);
    let p = &plan(&vmi(""), &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Failed);
    assert!(p.steps.is_empty());
}

#[test]
fn ordinal_names_when_the_pod_uses_them() {
    let vmi = vmi("");
    let links = [
        eth0(),
        Link {
            name: name("net1"),
            ..fresh_pod_link()
        },
    ];
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.pod_iface.as_ref().unwrap().as_str(), "net1");
    let Step::EnsureBridge { bridge, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(bridge.as_str(), "k6t-net1");
}

#[test]
fn absent_without_device_tears_down() {
    let vmi = vmi(r#","state":"absent""#);
    let links = plumbed_links();
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(
        step_names(p),
        ["delete-link", "release-pod-link", "delete-link"]
    );
}

fn attached_device(link_up: bool) -> DomainInterface {
    DomainInterface {
        alias: Some("ua-dyniface1".into()),
        mac: fresh_pod_link().mac,
        target_dev: Some(TAP.into()),
        link_up,
        xml: "<interface type='ethernet'><alias name='ua-dyniface1'/></interface>".into(),
        ..Default::default()
    }
}

#[test]
fn absent_with_device_detaches_before_any_teardown() {
    let vmi = vmi(r#","state":"absent""#);
    let links = plumbed_links();
    let dom = domain(3, vec![attached_device(true)]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Detaching);
    assert_eq!(
        step_names(p),
        [
            "detach-device",
            "delete-link",
            "release-pod-link",
            "delete-link"
        ]
    );
    assert!(p.rollback.is_empty());
}

#[test]
fn link_state_change_is_one_update() {
    let links = plumbed_links();
    let dom = domain(3, vec![attached_device(true)]);
    let p = &plan(&vmi(r#","state":"down""#), &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Attached);
    assert_eq!(step_names(p), ["set-link-state"]);
    let Step::SetLinkState { up, device, .. } = &p.steps[0] else {
        panic!()
    };
    assert!(!up);
    assert_eq!(device.alias.as_deref(), Some("ua-dyniface1"));
    let dom = domain(3, vec![attached_device(false)]);
    let p = &plan(&vmi(r#","state":"down""#), &observed(&links, Some(&dom)))[1];
    assert!(p.steps.is_empty());
}

#[test]
fn departed_network_with_record_is_unplugged() {
    let vmi = Vmi::parse(r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{}}}}"#).unwrap();
    let links = plumbed_links();
    let dom = domain(3, vec![attached_device(true)]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(plans.len(), 1);
    let p = &plans[0];
    assert!(p.departed);
    assert_eq!(p.name, "dyniface1");
    assert_eq!(step_names(p)[0], "detach-device");
    // Without the device only the teardown is left.
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[0];
    assert_eq!(
        step_names(p),
        ["delete-link", "release-pod-link", "delete-link"]
    );
}

#[test]
fn a_departed_network_of_a_stopped_domain_stays_planned() {
    let vmi = Vmi::parse(r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{}}}}"#).unwrap();
    let links = plumbed_links();
    // The definition still has the device: the plumbing stays under it.
    let stopped = DomainState {
        running: false,
        ..domain(3, vec![attached_device(true)])
    };
    let plans = plan(&vmi, &observed(&links, Some(&stopped)));
    assert_eq!(plans.len(), 1, "{plans:?}");
    let p = &plans[0];
    assert!(p.departed && p.steps.is_empty(), "{p:?}");
    assert_eq!(p.phase, Phase::Detaching);
    assert_eq!(
        p.message.as_deref(),
        Some("the network left the spec; the domain is not running here")
    );
    // No device uses it: it goes.
    let stopped = DomainState {
        running: false,
        ..domain(4, vec![])
    };
    let p = &plan(&vmi, &observed(&links, Some(&stopped)))[0];
    assert_eq!(
        step_names(p),
        ["delete-link", "release-pod-link", "delete-link"]
    );
    // An arriving domain brings its devices with it: nothing is planned.
    let incoming = migrating(Migration::Incoming, false, vec![]);
    assert!(plan(&vmi, &observed(&links, Some(&incoming))).is_empty());
}

#[test]
fn departed_devices_nicplug_cannot_prove_are_left_alone() {
    let vmi = Vmi::parse(r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{}}}}"#).unwrap();
    // A device of another party: no bridge, no record.
    let links = [eth0()];
    let dom = domain(3, vec![attached_device(true)]);
    assert!(plan(&vmi, &observed(&links, Some(&dom))).is_empty());
    // KubeVirt's layout for that device.
    let links = [
        eth0(),
        link(3, "9a6a0c3b4d8-nic", LinkKind::Veth),
        link(10, BRIDGE, LinkKind::Bridge),
    ];
    assert!(plan(&vmi, &observed(&links, Some(&dom))).is_empty());
    // nicplug's bridge and tap with the pod link already gone (CNI DEL came first).
    let tap = plumbed_links().pop().unwrap();
    let links = [eth0(), link(10, BRIDGE, LinkKind::Bridge), tap];
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(
        step_names(&plans[0]),
        ["detach-device", "delete-link", "delete-link"]
    );
}

#[test]
fn a_departed_network_whose_record_does_not_parse_is_reported_and_left_alone() {
    let vmi = Vmi::parse(r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{}}}}"#).unwrap();
    let mut links = plumbed_links();
    links[1].alias = Some("nicplug/v1 mac=garbage".into());
    let dom = domain(3, vec![attached_device(true)]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(plans.len(), 1, "{plans:?}");
    let p = &plans[0];
    assert_eq!(p.name, "dyniface1");
    assert_eq!(p.phase, Phase::Failed);
    assert!(p.departed && p.steps.is_empty(), "{p:?}");
    let message = p.message.as_deref().unwrap();
    assert!(
        message.starts_with("the network left the spec, but pod interface ")
            && message.contains("corrupt nicplug record"),
        "{message}"
    );
}

#[test]
fn addresses_cni_adds_after_the_record_join_it_before_removal() {
    // CNI's IPAM configured the address after nicplug had already recorded
    // and enslaved the link.
    let vmi = vmi("");
    let mut links = plumbed_links();
    let late: IpCidr = "169.254.9.9/24".parse().unwrap();
    links[1].addresses.push(late);
    let dom = domain(4, vec![]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(
        step_names(p),
        ["record-pod-link", "enslave-pod-link", "attach-device"]
    );
    let Step::RecordPodLink { alias, .. } = &p.steps[0] else {
        panic!()
    };
    let record = PodLinkRecord::from_alias(alias).unwrap();
    assert_eq!(
        record.addresses,
        vec!["169.254.1.5/24".parse().unwrap(), late]
    );
    let Step::EnslavePodLink { addresses, .. } = &p.steps[1] else {
        panic!()
    };
    assert_eq!(addresses, &record.addresses, "removes exactly the record's");
    let Step::ReleasePodLink { record, .. } = &p.rollback[1] else {
        panic!()
    };
    assert!(
        record.addresses.contains(&late),
        "a rollback restores it too"
    );
}

#[test]
fn an_address_cni_adds_after_the_attach_is_recorded_and_removed() {
    let vmi = vmi("");
    let mut links = plumbed_links();
    let late: IpCidr = "169.254.9.9/24".parse().unwrap();
    links[1].addresses.push(late);
    let dom = domain(3, vec![attached_device(true)]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Attached);
    assert_eq!(step_names(p), ["record-pod-link", "enslave-pod-link"]);
    let Step::EnslavePodLink { addresses, .. } = &p.steps[1] else {
        panic!()
    };
    assert!(addresses.contains(&late), "{addresses:?}");
}

#[test]
fn an_incoming_migration_gets_nothing_attached_or_detached() {
    // Migration target: pod interfaces present, the domain paused for the
    // incoming migration (not running here), devices arriving with it.
    let links = plumbed_links();
    let incoming = DomainState {
        running: false,
        ..domain(3, vec![attached_device(true)])
    };
    let p = &plan(
        &vmi(r#","state":"absent""#),
        &observed(&links, Some(&incoming)),
    )[1];
    assert!(p.steps.is_empty(), "{p:?}");
    let empty = DomainState {
        running: false,
        ..domain(4, vec![])
    };
    let p = &plan(
        &vmi(""),
        &observed(&[eth0(), fresh_pod_link()], Some(&empty)),
    )[1];
    assert!(p.steps.is_empty());
    assert_eq!(p.phase, Phase::Pending);
    let departed = Vmi::parse(r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{}}}}"#).unwrap();
    let plans = plan(&departed, &observed(&links, Some(&incoming)));
    assert!(plans.iter().all(|p| p.steps.is_empty()), "{plans:?}");
    // When the domain arrives running with its devices, they are adopted.
    let running = domain(3, vec![attached_device(true)]);
    let p = &plan(&vmi(""), &observed(&links, Some(&running)))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Attached, 0));
}

/// KubeVirt's layout: renamed pod link, dummy podH, its own bridge and tap.
fn kubevirt_layout_links() -> Vec<Link> {
    vec![
        eth0(),
        Link {
            master: Some(10),
            ..link(3, "9a6a0c3b4d8-nic", LinkKind::Veth)
        },
        link(4, POD, LinkKind::Other("dummy".into())),
        link(10, BRIDGE, LinkKind::Bridge),
        Link {
            master: Some(10),
            ..link(11, TAP, LinkKind::Tun)
        },
    ]
}

#[test]
fn kubevirts_leftovers_go_only_in_coexistence_mode_and_only_when_unused() {
    let absent = super::tests::vmi(r#","state":"absent""#);
    let links = kubevirt_layout_links();
    let gone = domain(4, vec![]);
    // Without coexistence: KubeVirt's plumbing is KubeVirt's.
    let p = &plan(&absent, &observed(&links, Some(&gone)))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Detached, 0));
    // With it: tap and bridge go once the device is gone; the renamed pod
    // link and the dummy stay.
    let coexist = Observed {
        clean_kubevirt_leftovers: true,
        kubevirt_plumbs: true,
        ..observed(&links, Some(&gone))
    };
    let p = &plan(&absent, &coexist)[1];
    assert_eq!(step_names(p), ["delete-link", "delete-link"]);
    // While the device is there, it is detached first (someone else may
    // already have: "device not found" counts as done).
    let attached = domain(3, vec![attached_device(true)]);
    let coexist = Observed {
        clean_kubevirt_leftovers: true,
        kubevirt_plumbs: true,
        ..observed(&links, Some(&attached))
    };
    let p = &plan(&absent, &coexist)[1];
    assert_eq!(
        step_names(p),
        ["detach-device", "delete-link", "delete-link"]
    );

    // A network gone from the spec whose dummy CNI DEL already removed.
    let empty = Vmi::parse(r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{}}}}"#).unwrap();
    let mut leftovers = kubevirt_layout_links();
    leftovers.retain(|l| l.name.as_str() != POD);
    let coexist = Observed {
        clean_kubevirt_leftovers: true,
        kubevirt_plumbs: true,
        ..observed(&leftovers, Some(&gone))
    };
    let plans = plan(&empty, &coexist);
    assert_eq!(plans.len(), 1);
    assert!(plans[0].departed);
    assert_eq!(step_names(&plans[0]), ["delete-link", "delete-link"]);
    // Never while a device still uses the tap, and never outside coexistence.
    let coexist = Observed {
        clean_kubevirt_leftovers: true,
        kubevirt_plumbs: true,
        ..observed(&leftovers, Some(&attached))
    };
    assert!(
        plan(&empty, &coexist)
            .iter()
            .all(|p| !p.steps.iter().any(|s| matches!(s, Step::DeleteLink { .. })))
    );
    assert!(plan(&empty, &observed(&leftovers, Some(&gone))).is_empty());
}

#[test]
fn plumbing_missing_under_a_live_device_is_rebuilt() {
    let vmi = vmi("");
    let dom = domain(3, vec![attached_device(true)]);
    // The bridge was deleted: pod link and tap fell off it.
    let mut links: Vec<Link> = plumbed_links()
        .into_iter()
        .filter(|l| l.name.as_str() != BRIDGE)
        .collect();
    for l in &mut links {
        l.master = None;
    }
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(
        step_names(p),
        ["ensure-bridge", "enslave-pod-link", "ensure-tap"]
    );
    assert_eq!(p.phase, Phase::Attached);
    assert!(
        p.message.as_deref().unwrap().contains("bridge k6t-"),
        "{p:?}"
    );
    // The tap was deleted: QEMU's handle on it is dead. The tap is made
    // again; on QEMU 7.2 the device is detached, to be attached again on the
    // new tap.
    let links: Vec<Link> = plumbed_links()
        .into_iter()
        .filter(|l| l.name.as_str() != TAP)
        .collect();
    let qemu_7 = DomainState {
        qemu: Some(QEMU_7),
        ..dom.clone()
    };
    let p = &plan(&vmi, &observed(&links, Some(&qemu_7)))[1];
    assert_eq!(step_names(p), ["ensure-tap", "detach-device"]);
    assert_eq!(p.phase, Phase::Detaching);
    // QEMU 10 exits when that device is unplugged: it stays, Failed, and
    // the message says what to do.
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(step_names(p), ["ensure-tap"]);
    assert_eq!(p.phase, Phase::Failed);
    let message = p.message.as_deref().unwrap();
    assert!(
        message.contains("not detaching it, since QEMU 10.0.2 exits")
            && message.contains("migrate or restart the VM"),
        "{message}"
    );
    // The tap made again is held by no QEMU (no carrier): still dead, on
    // the next pass as on this one; a QEMU of unknown version counts as 10.
    let mut links = plumbed_links();
    links.last_mut().unwrap().tap.as_mut().unwrap().held = Some(false);
    let p = &plan(&vmi, &observed(&links, Some(&qemu_7)))[1];
    assert_eq!(step_names(p), ["detach-device"]);
    let unknown = DomainState {
        qemu: None,
        ..dom.clone()
    };
    for dom in [&dom, &unknown] {
        let p = &plan(&vmi, &observed(&links, Some(dom)))[1];
        assert!(p.steps.is_empty(), "{p:?}");
        assert_eq!(p.phase, Phase::Failed);
        assert!(
            p.message
                .as_deref()
                .unwrap()
                .contains("QEMU's handle on tap")
        );
    }
    // A device KubeVirt attached (no record naming the network) is not ours to repair.
    let mut links = plumbed_links();
    links.retain(|l| l.name.as_str() != TAP);
    links[1].alias = None;
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert!(p.steps.is_empty(), "{p:?}");
}

#[test]
fn a_device_whose_tap_died_is_not_unplugged_where_qemu_would_exit() {
    let absent = vmi(r#","state":"absent""#);
    let mut links = plumbed_links();
    links.last_mut().unwrap().tap.as_mut().unwrap().held = Some(false);
    let dom = domain(3, vec![attached_device(true)]);
    let p = &plan(&absent, &observed(&links, Some(&dom)))[1];
    assert!(p.steps.is_empty(), "nothing is touched: {p:?}");
    assert_eq!(p.phase, Phase::Failed);
    assert!(p.message.as_deref().unwrap().contains("not detaching it"));
    let qemu_7 = DomainState {
        qemu: Some(QEMU_7),
        ..dom
    };
    let p = &plan(&absent, &observed(&links, Some(&qemu_7)))[1];
    assert_eq!(step_names(p)[0], "detach-device");
    assert_eq!(p.phase, Phase::Detaching);
}

#[test]
fn a_mac_that_is_not_a_unique_unicast_address_is_refused() {
    let vmi_with_mac = |mac: &str| vmi(&format!(r#","macAddress":"{mac}""#));
    let dom = domain(4, vec![]);
    // The spec's MACs are checked when the VMI is read; the pod link's come
    // from CNI.
    for mac in [[0u8; 6], [0x01, 0, 0x5e, 0, 0, 1], [0xff; 6]] {
        let links = [
            eth0(),
            Link {
                mac: Some(Mac::from_bytes(mac)),
                ..fresh_pod_link()
            },
        ];
        let p = &plan(&vmi(""), &observed(&links, Some(&dom)))[1];
        assert_eq!(p.phase, Phase::Failed, "{mac:?}");
        let message = p.message.as_deref().unwrap();
        assert!(message.contains("not a unicast address"), "{p:?}");
        assert!(!step_names(p).contains(&"attach-device"));
    }
    let links = [eth0(), fresh_pod_link()];
    // Another device of the domain has the MAC already.
    let other = DomainInterface {
        alias: Some("ua-other".into()),
        mac: Some("02:00:00:00:00:09".parse().unwrap()),
        ..Default::default()
    };
    let dom = domain(4, vec![other]);
    let p = &plan(
        &vmi_with_mac("02:00:00:00:00:09"),
        &observed(&links, Some(&dom)),
    )[1];
    assert_eq!(p.phase, Phase::Failed);
    assert!(
        p.message.as_deref().unwrap().contains("already used"),
        "{p:?}"
    );
}

#[test]
fn a_shut_off_domain_with_the_device_in_its_definition_is_pending() {
    let dom = DomainState {
        running: false,
        ..domain(3, vec![attached_device(false)])
    };
    let p = &plan(&vmi(""), &observed(&plumbed_links(), Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Pending);
    assert!(p.steps.is_empty(), "no link state change either: {p:?}");
}

#[test]
fn running_out_of_root_ports_says_so_and_marks_the_wait() {
    let links = [eth0(), fresh_pod_link()];
    let dom = domain(0, vec![]);
    let p = &plan(&vmi(""), &observed(&links, Some(&dom)))[1];
    assert!(p.needs_root_port);
    assert_eq!(
        p.message.as_deref(),
        Some("no free PCIe root port for hotplug: 4 of 4 in use")
    );
}

#[test]
fn the_guest_reporting_the_devices_mac_makes_attached_ready() {
    use crate::hypervisor::{GuestInterface, GuestView};
    let device = attached_device(true);
    let seen = GuestView::Interfaces(vec![GuestInterface {
        name: "eth1".into(),
        mac: device.mac,
        addresses: vec![],
    }]);
    let other = GuestView::Interfaces(vec![]);
    let down = GuestView::NotConnected("QEMU guest agent is not connected".into());
    assert_eq!(
        confirmed_phase(Phase::Attached, Some(&device), Some(&seen), None),
        Phase::Ready
    );
    for guest in [Some(&other), Some(&down), None] {
        assert_eq!(
            confirmed_phase(Phase::Attached, Some(&device), guest, None),
            Phase::Attached
        );
    }
    // Only an attached device is confirmed.
    assert_eq!(
        confirmed_phase(Phase::Attached, None, Some(&seen), None),
        Phase::Attached
    );
    assert_eq!(
        confirmed_phase(Phase::Detaching, Some(&device), Some(&seen), None),
        Phase::Detaching
    );
    // Seen, but the pod link not on the bridge yet: no traffic flows, not Ready.
    let waiting = Uplink {
        ready: false,
        cni_done: None,
    };
    assert_eq!(
        confirmed_phase(Phase::Attached, Some(&device), Some(&seen), Some(waiting)),
        Phase::Attached
    );
    let joined = Uplink {
        ready: true,
        cni_done: Some(CniDone::NetworkStatus),
    };
    assert_eq!(
        confirmed_phase(Phase::Attached, Some(&device), Some(&seen), Some(joined)),
        Phase::Ready
    );
}

#[test]
fn primary_networks_are_not_managed_and_other_bindings_unsupported() {
    let vmi = Vmi::parse(include_str!("../../fixtures/vmi/two-secondaries.json")).unwrap();
    let links = [eth0()];
    let dom = domain(4, vec![]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    let phase = |n: &str| plans.iter().find(|p| p.name == n).unwrap();
    assert_eq!(phase("default").phase, Phase::NotManaged);
    assert!(phase("default").message.is_none());
    let sriov = phase("sriovnet");
    assert_eq!(sriov.phase, Phase::Unsupported);
    assert!(
        sriov
            .message
            .as_deref()
            .unwrap()
            .contains("not hot-pluggable"),
        "{sriov:?}"
    );
}

/// A domain in the middle of a migration, as this pod's daemon sees it.
fn migrating(migration: Migration, running: bool, devices: Vec<DomainInterface>) -> DomainState {
    DomainState {
        running,
        migration,
        ..domain(3, devices)
    }
}

#[test]
fn a_migration_target_prepares_the_plumbing_and_attaches_nothing() {
    let vmi = vmi("");
    // Before the domain arrives: the whole plumbing, no attach.
    let links = [eth0(), fresh_pod_link()];
    let p = &plan(&vmi, &observed(&links, None))[1];
    assert_eq!(p.phase, Phase::Prepared);
    assert_eq!(
        step_names(p),
        [
            "record-pod-link",
            "ensure-bridge",
            "enslave-pod-link",
            "ensure-tap"
        ]
    );
    assert_eq!(p.rollback.len(), 3, "a failed preparation is undone");
    // Prepared already: nothing to do, still Prepared.
    let links = plumbed_links();
    let p = &plan(&vmi, &observed(&links, None))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Prepared, 0), "{p:?}");
    // The domain arriving with its device: the same, and the status gets
    // the MAC the VM keeps (the source's, not this pod link's).
    let mut device = attached_device(true);
    device.mac = Some("02:00:00:00:00:42".parse().unwrap());
    let incoming = migrating(Migration::Incoming, false, vec![device.clone()]);
    let p = &plan(&vmi, &observed(&links, Some(&incoming)))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Prepared, 0), "{p:?}");
    assert_eq!(p.mac, device.mac);
    // Once it runs here, the device is adopted: nothing attached.
    let running = domain(3, vec![device]);
    let p = &plan(&vmi, &observed(&links, Some(&running)))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Attached, 0), "{p:?}");
}

#[test]
fn a_target_tap_gets_the_queue_mode_of_the_incoming_device() {
    let links = [eth0(), fresh_pod_link()];
    let device = DomainInterface {
        queues: Some(4),
        ..attached_device(true)
    };
    let incoming = migrating(Migration::Incoming, false, vec![device]);
    let p = &plan(&vmi(""), &observed(&links, Some(&incoming)))[1];
    let Some(Step::EnsureTap { spec, .. }) = p.steps.last() else {
        panic!("{p:?}")
    };
    assert!(spec.multi_queue);
    // Before the domain is there, the spec says: single queue here.
    let p = &plan(&vmi(""), &observed(&links, None))[1];
    let Some(Step::EnsureTap { spec, .. }) = p.steps.last() else {
        panic!("{p:?}")
    };
    assert!(!spec.multi_queue);
}

#[test]
fn a_target_without_a_tap_owner_fails_with_the_reason() {
    let links = [eth0(), fresh_pod_link()];
    let view = Observed {
        tap_owner: None,
        ..observed(&links, None)
    };
    let p = &plan(&vmi(""), &view)[1];
    assert_eq!(p.phase, Phase::Failed);
    assert_eq!(
        p.message.as_deref(),
        Some("cannot tell which user QEMU runs as; pass --tap-owner")
    );
}

/// A source finishing its migration reads like a target for a moment
/// (paused for the migration, its job over, not yet shut off): whatever a
/// preparation cannot do then, it tears nothing down under the devices.
#[test]
fn a_domain_paused_for_a_migration_never_loses_its_plumbing() {
    let links = plumbed_links();
    let view = Observed {
        tap_owner: None,
        ..observed(&links, None)
    };
    let paused = migrating(Migration::Incoming, false, vec![attached_device(true)]);
    let view = Observed {
        domain: Some(&paused),
        ..view
    };
    let p = &plan(&vmi(""), &view)[1];
    assert!(p.steps.is_empty(), "{p:?}");
    assert_eq!(p.phase, Phase::Pending);
    assert_eq!(
        p.message.as_deref(),
        Some("cannot tell which user QEMU runs as; pass --tap-owner")
    );
    // Its pod link gone too: still nothing removed while the domain is here.
    let links: Vec<Link> = links
        .into_iter()
        .filter(|l| l.name.as_str() != POD)
        .collect();
    let p = &plan(&vmi(""), &observed(&links, Some(&paused)))[1];
    assert!(p.steps.is_empty(), "{p:?}");
}

#[test]
fn a_target_in_kubevirts_layout_is_adopted_and_nothing_built() {
    let links = kubevirt_layout_links();
    let p = &plan(&vmi(""), &observed(&links, None))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Prepared, 0), "{p:?}");
    // KubeVirt mid-way (no tap yet): not prepared, and left alone.
    let links: Vec<Link> = links
        .into_iter()
        .filter(|l| l.name.as_str() != TAP)
        .collect();
    let p = &plan(&vmi(""), &observed(&links, None))[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Pending, 0), "{p:?}");
}

#[test]
fn an_unplug_reaching_a_target_waits_for_the_arriving_device() {
    let absent = super::tests::vmi(r#","state":"absent""#);
    let links = plumbed_links();
    let incoming = migrating(Migration::Incoming, false, vec![attached_device(true)]);
    let p = &plan(&absent, &observed(&links, Some(&incoming)))[1];
    assert!(p.steps.is_empty(), "the arriving QEMU holds the tap: {p:?}");
    assert_eq!(
        p.message.as_deref(),
        Some("the domain is migrating here: this change waits until the migration finished")
    );
    // Without a domain (or one without the device), the plumbing goes.
    let p = &plan(&absent, &observed(&links, None))[1];
    assert_eq!(p.phase, Phase::Detached);
    assert_eq!(
        step_names(p),
        ["delete-link", "release-pod-link", "delete-link"]
    );
}

#[test]
fn an_arriving_domain_whose_devices_are_not_known_is_prepared_from_the_spec() {
    // libvirt 11 does not give an arriving domain's XML until the migration
    // is over: the target prepares what the spec asks and removes nothing.
    let unknown = DomainState {
        devices_unknown: true,
        ..migrating(Migration::Incoming, false, vec![])
    };
    let links = [eth0(), fresh_pod_link()];
    let p = &plan(&vmi(""), &observed(&links, Some(&unknown)))[1];
    assert_eq!(p.phase, Phase::Prepared);
    assert_eq!(step_names(p).last(), Some(&"ensure-tap"));
    assert!(!step_names(p).contains(&"attach-device"));
    let absent = super::tests::vmi(r#","state":"absent""#);
    let p = &plan(&absent, &observed(&plumbed_links(), Some(&unknown)))[1];
    assert!(
        p.steps.is_empty(),
        "the arriving QEMU may hold the tap: {p:?}"
    );
}

#[test]
fn a_domain_migrating_away_gets_no_change_at_all() {
    let links = plumbed_links();
    let leaving = migrating(Migration::Outgoing, true, vec![attached_device(true)]);
    let held = |vmi: &Vmi, links: &[Link], dom: &DomainState| {
        let p = plan(vmi, &observed(links, Some(dom))).remove(1);
        assert!(p.steps.is_empty() && p.rollback.is_empty(), "{p:?}");
        p
    };
    // Nothing to change: adopted as usual, no message.
    let p = held(&vmi(""), &links, &leaving);
    assert_eq!((p.phase, p.message), (Phase::Attached, None));
    // An unplug, a link state change, a repair: all wait.
    for extra in [r#","state":"absent""#, r#","state":"down""#] {
        let p = held(&vmi(extra), &links, &leaving);
        assert_eq!(p.phase, Phase::Attached);
        assert_eq!(
            p.message.as_deref(),
            Some(
                "the domain is migrating to another pod: this change waits until the migration finished"
            )
        );
    }
    let without_tap: Vec<Link> = links
        .iter()
        .filter(|l| l.name.as_str() != TAP)
        .cloned()
        .collect();
    assert!(held(&vmi(""), &without_tap, &leaving).repairs.is_empty());
    // A new NIC: not plugged here while the domain may leave (also not
    // while it is paused at the switch-over).
    let bare = migrating(Migration::Outgoing, true, vec![]);
    let paused = migrating(Migration::Outgoing, false, vec![]);
    for dom in [&bare, &paused] {
        let p = held(&vmi(""), &[eth0(), fresh_pod_link()], dom);
        assert_eq!(p.phase, Phase::Pending);
    }
    // The pod interface gone under the device: no unplug either.
    let no_pod: Vec<Link> = links
        .iter()
        .filter(|l| l.name.as_str() != POD)
        .cloned()
        .collect();
    assert_eq!(held(&vmi(""), &no_pod, &leaving).phase, Phase::Attached);
    // A failed migration: the domain is just running again, changes go ahead.
    let back = domain(3, vec![attached_device(true)]);
    let p = &plan(&vmi(r#","state":"absent""#), &observed(&links, Some(&back)))[1];
    assert_eq!(step_names(p)[0], "detach-device");
}

#[test]
fn a_domain_that_migrated_away_leaves_no_tap_or_bridge_and_its_mac_off_the_wire() {
    let links = plumbed_links();
    let gone = migrating(Migration::Departed, false, vec![attached_device(true)]);
    let p = &plan(&vmi(""), &observed(&links, Some(&gone)))[1];
    assert_eq!(p.phase, Phase::Pending);
    assert_eq!(
        p.message.as_deref(),
        Some("the domain migrated to another pod")
    );
    // The pod link is not given back: its original MAC is the VM's.
    assert_eq!(
        p.steps,
        [
            Step::DeleteLink { name: name(TAP) },
            Step::DeleteLink { name: name(BRIDGE) }
        ]
    );
    // Once they are gone, nothing more.
    let rest: Vec<Link> = links
        .into_iter()
        .filter(|l| l.kind != LinkKind::Bridge && l.kind != LinkKind::Tun)
        .collect();
    let p = &plan(&vmi(""), &observed(&rest, Some(&gone)))[1];
    assert!(p.steps.is_empty(), "{p:?}");
    // KubeVirt's layout stays KubeVirt's.
    let links = kubevirt_layout_links();
    let p = &plan(&vmi(""), &observed(&links, Some(&gone)))[1];
    assert!(p.steps.is_empty(), "{p:?}");
    // A network that also left the spec: its tap and bridge go the same way.
    let departed = Vmi::parse(r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm"},"spec":{"domain":{"devices":{}}}}"#).unwrap();
    let plans = plan(&departed, &observed(&plumbed_links(), Some(&gone)));
    assert_eq!(plans.len(), 1, "{plans:?}");
    assert_eq!((plans[0].phase, plans[0].departed), (Phase::Detached, true));
    assert_eq!(step_names(&plans[0]), ["delete-link", "delete-link"]);
}

#[test]
fn beside_kubevirt_a_target_prepares_nothing_and_adopts_kubevirts_layout() {
    // virt-handler plumbs every spec network at a start and on a target.
    let links = [eth0(), fresh_pod_link()];
    let view = Observed {
        kubevirt_plumbs: true,
        ..observed(&links, None)
    };
    let p = &plan(&vmi(""), &view)[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Pending, 0), "{p:?}");
    assert_eq!(
        p.message.as_deref(),
        Some("KubeVirt plumbs this network before the domain arrives")
    );
    let links = kubevirt_layout_links();
    let view = Observed {
        kubevirt_plumbs: true,
        ..observed(&links, None)
    };
    let p = &plan(&vmi(""), &view)[1];
    assert_eq!((p.phase, p.steps.len()), (Phase::Prepared, 0), "{p:?}");
}

/// A VMI with the pod network first, then bridge networks `names` (`name=absent`
/// marks one absent).
fn vmi_with(names: &[&str]) -> Vmi {
    let ifaces: Vec<String> = names
        .iter()
        .map(|n| match n.split_once('=') {
            Some((n, state)) => format!(r#"{{"name":"{n}","bridge":{{}},"state":"{state}"}}"#),
            None => format!(r#"{{"name":"{n}","bridge":{{}}}}"#),
        })
        .collect();
    let nets: Vec<String> = names
        .iter()
        .map(|n| n.split('=').next().unwrap())
        .map(|n| format!(r#"{{"name":"{n}","multus":{{"networkName":"{n}"}}}}"#))
        .collect();
    Vmi::parse(&format!(
        r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[
            {{"name":"default","masquerade":{{}}}},{}]}}}},
            "networks":[{{"name":"default","pod":{{}}}},{}]}}}}"#,
        ifaces.join(","),
        nets.join(",")
    ))
    .unwrap()
}

/// A fresh pod link (CNI just made it) for each network.
fn fresh_links(names: &[&str]) -> Vec<Link> {
    let mut links = vec![eth0()];
    for (i, n) in names.iter().enumerate() {
        let index = 20 + i as u32;
        links.push(Link {
            index,
            name: crate::model::names::hashed_pod_iface(n),
            mac: Some(Mac::from_bytes([0x0a, 0x58, 0, 0, 1, index as u8])),
            ..fresh_pod_link()
        });
    }
    links
}

/// Root ports `1..=n`: the primary NIC on port 1, the rest free.
fn domain_with_primary(ports: u8, mut devices: Vec<DomainInterface>) -> DomainState {
    devices.insert(0, on_port("default", 1));
    let mut dom = DomainState {
        running: true,
        persistent: true,
        migration: Migration::None,
        arrived_by_migration: false,
        interfaces: devices,
        root_ports: RootPorts::with_free(ports as usize, ports as usize),
        qemu: Some(QEMU_10),
        devices_unknown: false,
    };
    let DomainState {
        interfaces,
        root_ports,
        ..
    } = &mut dom;
    root_ports.refresh(interfaces);
    dom
}

/// A device `ua-<network>` on root port `bus`.
fn on_port(network: &str, bus: u8) -> DomainInterface {
    DomainInterface {
        alias: Some(format!("ua-{network}")),
        mac: Some(Mac::from_bytes([0x02, 0, 0, 0, 9, bus])),
        link_up: true,
        pci: Some(PciAddress::on_root_port(RootPortIndex(bus))),
        ..Default::default()
    }
}

/// The root port each plan attaches its device on.
fn attach_buses(plans: &[InterfacePlan]) -> Vec<(String, u8)> {
    plans
        .iter()
        .filter_map(|p| {
            p.steps.iter().find_map(|s| match s {
                Step::Attach { device, .. } => Some((p.name.clone(), device.address?.bus)),
                _ => None,
            })
        })
        .collect()
}

#[test]
fn interfaces_are_placed_on_root_ports_by_spec_position() {
    let nets = ["red", "green", "blue"];
    let vmi = vmi_with(&nets);
    let links = fresh_links(&nets);
    // Port 1 holds the primary NIC, port 2 a disk: the pool is 3, 4, 5, 6.
    let mut dom = domain_with_primary(6, vec![]);
    dom.root_ports.ports[1].occupant = Occupant::OtherDevice;
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(
        attach_buses(&plans),
        [("red".into(), 3), ("green".into(), 4), ("blue".into(), 5)]
    );
    assert!(plans.iter().all(|p| p.message.is_none()), "{plans:?}");
    // The same spec and domain: the same addresses, whatever else is plugged.
    let only_blue = [links[0].clone(), links[3].clone()];
    let plans = plan(&vmi, &observed(&only_blue, Some(&dom)));
    assert_eq!(attach_buses(&plans), [("blue".into(), 5)]);
}

#[test]
fn a_new_network_does_not_take_the_port_of_an_unplugged_one() {
    // green was on port 3 and is absent now; a fourth network arrives.
    let vmi = vmi_with(&["red", "green=absent", "blue", "white"]);
    let links = fresh_links(&["red", "green", "blue", "white"]);
    let links = [links[0].clone(), links[4].clone()];
    let dom = domain_with_primary(5, vec![on_port("red", 2), on_port("blue", 4)]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(attach_buses(&plans), [("white".into(), 5)]);
    // green comes back: its port is free, it gets it again.
    let vmi = vmi_with(&["red", "green", "blue", "white"]);
    let links = fresh_links(&["red", "green", "blue", "white"]);
    let links = [links[0].clone(), links[2].clone()];
    let dom = domain_with_primary(
        5,
        vec![on_port("red", 2), on_port("blue", 4), on_port("white", 5)],
    );
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(attach_buses(&plans), [("green".into(), 3)]);
    assert!(plans.iter().all(|p| p.message.is_none()), "{plans:?}");
}

#[test]
fn a_taken_preferred_port_falls_back_and_says_so() {
    // Another agent (or KubeVirt) put green on red's port 2.
    let vmi = vmi_with(&["red", "green", "blue"]);
    let links = fresh_links(&["red"]);
    let dom = domain_with_primary(5, vec![on_port("green", 2)]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    // Port 3 is green's preferred port (free) and port 4 blue's: red gets
    // port 5, which nobody prefers.
    assert_eq!(attach_buses(&plans), [("red".into(), 5)]);
    let red = plans.iter().find(|p| p.name == "red").unwrap();
    assert_eq!(red.phase, Phase::Attached);
    assert_eq!(
        red.message.as_deref(),
        Some("placed on root port 5: preferred port 2 is taken")
    );
    // Green stays where it is, and says it is not on its preferred port.
    let green = plans.iter().find(|p| p.name == "green").unwrap();
    assert!(green.steps.is_empty(), "{green:?}");
    assert_eq!(
        green.message.as_deref(),
        Some("on root port 2, not its preferred port 3")
    );
}

#[test]
fn more_networks_than_ports_take_what_is_free_then_fail_clearly() {
    let nets = ["a", "b", "c"];
    let vmi = vmi_with(&nets);
    let links = fresh_links(&nets);
    // Ports 2 and 3 free: a and b get them, c has none.
    let dom = domain_with_primary(3, vec![]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(attach_buses(&plans), [("a".into(), 2), ("b".into(), 3)]);
    let c = plans.iter().find(|p| p.name == "c").unwrap();
    assert_eq!(c.phase, Phase::Failed);
    assert!(c.needs_root_port);
    assert_eq!(
        c.message.as_deref(),
        Some("no free PCIe root port for hotplug: 3 of 3 in use")
    );
    // a is absent and unplugged: c is beyond the pool and takes a's port
    // (the only free one), saying why.
    let vmi = vmi_with(&["a=absent", "b", "c"]);
    let links = [links[0].clone(), links[3].clone()];
    let dom = domain_with_primary(3, vec![on_port("b", 3)]);
    let plans = plan(&vmi, &observed(&links, Some(&dom)));
    assert_eq!(attach_buses(&plans), [("c".into(), 2)]);
    let c = plans.iter().find(|p| p.name == "c").unwrap();
    assert_eq!(
        c.message.as_deref(),
        Some(
            "placed on root port 2: it is hot-plug interface 3 of the spec, the domain has 2 hot-plug root ports"
        )
    );
}

/// The plug of a pod link CNI is still at work on: the device goes in, the
/// pod link is left as it is, and the message says what nicplug waits for.
fn assert_attached_leaving_the_pod_link(p: &InterfacePlan, waiting_for: &str) {
    assert_eq!(p.phase, Phase::Attached);
    assert_eq!(
        step_names(p),
        [
            "record-pod-link",
            "ensure-bridge",
            "ensure-tap",
            "attach-device"
        ]
    );
    let message = p.message.as_deref().unwrap_or_default();
    assert!(
        message.starts_with("waiting for CNI") && message.contains(waiting_for),
        "{message}"
    );
}

/// CNI adds a dual-stack link's addresses, waits for IPv6 duplicate address
/// detection, then adds its routes: taking the addresses meanwhile fails its
/// route and the CNI ADD. Seen on the rig: "failed to add route ... via
/// 169.254.51.1: network is unreachable". The device goes in; the pod link
/// stays as CNI is making it.
#[test]
fn a_pod_link_cni_is_still_settling_is_left_alone() {
    let vmi = vmi("");
    let dom = domain(4, vec![]);
    let ipam_v6: IpCidr = "fe80::33:2/64".parse().unwrap();
    let mut pod = fresh_pod_link();
    let kernels = IpCidr::new(pod.mac.unwrap().eui64_link_local().into(), 64).unwrap();
    pod.addresses.extend([kernels, ipam_v6]);
    pod.tentative = vec![ipam_v6];
    let links = [eth0(), pod.clone()];
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_attached_leaving_the_pod_link(p, "fe80::33:2/64 in duplicate address detection");
    // CNI waits for the kernel's own address too once it added IPv6.
    pod.tentative = vec![kernels];
    let links = [eth0(), pod.clone()];
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert!(!step_names(p).contains(&"enslave-pod-link"));
    // Settled: the pod link joins the bridge too.
    pod.tentative.clear();
    let links = [eth0(), pod];
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert!(step_names(p).contains(&"enslave-pod-link"));
}

#[test]
fn the_kernels_own_tentative_link_local_alone_does_not_hold_a_plug() {
    // An IPv4-only network: CNI does not wait for the kernel's address.
    let vmi = vmi("");
    let dom = domain(4, vec![]);
    let mut pod = fresh_pod_link();
    let kernels = IpCidr::new(pod.mac.unwrap().eui64_link_local().into(), 64).unwrap();
    pod.addresses.push(kernels);
    pod.tentative = vec![kernels];
    let links = [eth0(), pod];
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(step_names(p)[0], "record-pod-link");
}

#[test]
fn late_addresses_are_taken_only_once_cni_settled_them() {
    let vmi = vmi("");
    let mut links = plumbed_links();
    let late4: IpCidr = "169.254.9.9/24".parse().unwrap();
    let late6: IpCidr = "fe80::9:9/64".parse().unwrap();
    links[1].addresses.extend([late4, late6]);
    links[1].tentative = vec![late6];
    let dom = domain(3, vec![attached_device(true)]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Attached);
    // Recorded at once, not taken away yet.
    assert_eq!(step_names(p), ["record-pod-link"]);
    links[1].tentative.clear();
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(step_names(p), ["record-pod-link", "enslave-pod-link"]);
    // The same while the agent saw the addresses change a moment ago.
    links[1].cni = CniProgress::Settling;
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(step_names(p), ["record-pod-link"]);
}

/// A pod link CNI just made (with or without its addresses yet): the device
/// is attached at once, but the pod link keeps its MAC and addresses until
/// CNI is done. The bridge plugin announces the addresses with the MAC the
/// link has then: with the bridge's, neighbours would send the VM's traffic
/// into the pod namespace.
#[test]
fn a_pod_link_cni_just_made_gets_the_device_and_joins_the_bridge_later() {
    let vmi = vmi("");
    let mut pod = fresh_pod_link();
    pod.cni = CniProgress::Settling;
    for addresses in [pod.addresses.clone(), vec![]] {
        let links = [
            eth0(),
            Link {
                addresses,
                ..pod.clone()
            },
        ];
        let p = &plan(&vmi, &observed(&links, Some(&domain(4, vec![]))))[1];
        assert_attached_leaving_the_pod_link(
            p,
            "appeared or its addresses or routes changed in the last 500 ms",
        );
    }
    // Attached, the pod link recorded, not on the bridge yet.
    let plumbed = plumbed_links();
    let waiting = Link {
        alias: plumbed[1].alias.clone(),
        ..pod
    };
    let links = [
        eth0(),
        waiting.clone(),
        plumbed[2].clone(),
        plumbed[3].clone(),
    ];
    let dom = domain(3, vec![attached_device(true)]);
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(p.phase, Phase::Attached);
    assert!(p.steps.is_empty() && p.repairs.is_empty(), "{p:?}");
    assert!(p.message.as_deref().unwrap().starts_with("waiting for CNI"));
    // CNI's late address is recorded at once (DHCP serves from the record),
    // still not taken.
    let late: IpCidr = "169.254.9.9/24".parse().unwrap();
    let mut waiting = waiting;
    waiting.addresses.push(late);
    let links = [
        eth0(),
        waiting.clone(),
        plumbed[2].clone(),
        plumbed[3].clone(),
    ];
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(step_names(p), ["record-pod-link"]);
    let Step::RecordPodLink { alias, .. } = &p.steps[0] else {
        panic!()
    };
    let recorded = PodLinkRecord::from_alias(alias).unwrap();
    assert!(recorded.addresses.contains(&late), "{recorded:?}");
    // Settled: the first enslave, which is no repair.
    let settled = Link {
        cni: CniProgress::Done(CniDone::SettleWindow),
        alias: Some(alias.clone()),
        ..waiting
    };
    let links = [eth0(), settled, plumbed[2].clone(), plumbed[3].clone()];
    let p = &plan(&vmi, &observed(&links, Some(&dom)))[1];
    assert_eq!(step_names(p), ["enslave-pod-link"]);
    assert!(p.repairs.is_empty() && p.message.is_none(), "{p:?}");
    let Step::EnslavePodLink { addresses, .. } = &p.steps[0] else {
        panic!()
    };
    assert_eq!(addresses, &recorded.addresses, "takes what CNI gave it");
}
