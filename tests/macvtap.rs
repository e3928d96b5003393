//! End-to-end: a NIC on KubeVirt's macvtap binding plugin, hot-plugged into
//! the rig's running VM. The pod interface is made as macvtap-cni makes it
//! (a macvtap on the node's lower link, moved into the pod netns); the
//! guest reaches a host on the lower link's LAN. Needs root; see
//! docs/testing.md.

mod e2e;
mod support;

use std::time::Duration;

use nicplug::plan::Phase;

use e2e::*;
use support::{MacvtapLan, Rig, RigOptions};

const WAIT: Duration = Duration::from_secs(60);
const NETWORK: &str = "lan";

fn spec(rig: &Rig, state: &str) -> serde_json::Value {
    with_binding(vmi_doc_states(rig, &[(NETWORK, state)]), NETWORK, "macvtap")
}

/// The devices of the live domain on `target`.
fn devices_on(rig: &Rig, target: &str) -> usize {
    nicplug::hypervisor::domain_xml::parse_devices(&rig.domain_xml())
        .unwrap()
        .interfaces
        .iter()
        .filter(|i| i.target_dev.as_deref() == Some(target))
        .count()
}

/// `ip -d link show` of the macvtap, but its root qdisc: libvirt sets
/// `noqueue` on every tap it opens for a device (KubeVirt's own attach
/// does the same), nicplug does not, and nothing puts it back.
fn as_cni_made_it(rig: &Rig, pod: &str) -> String {
    let details = rig.pod_link_details(pod);
    let mut words: Vec<&str> = details.split(' ').collect();
    if let Some(at) = words.iter().position(|w| *w == "qdisc") {
        words.drain(at..at + 2);
    }
    words.join(" ")
}

/// Gives the guest NIC with `mac` the LAN address `.2` and pings it from
/// the node's host on the lower link.
fn ping_over_the_lan(rig: &Rig, lan: &MacvtapLan, mac: &str) -> Result<(), String> {
    let addr = lan.addr(2);
    set_guest_nic_address(rig, mac, &addr)?;
    for _ in 0..5 {
        let mut ping = rig.node_cmd("/bin/busybox");
        ping.args(["ping", "-c1", "-W1", "-I", &lan.peer, &addr]);
        if ping.output().is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
    }
    Err(format!(
        "the node's LAN host cannot ping the guest at {addr}"
    ))
}

#[test]
fn a_macvtap_nic_is_hot_plugged_reaches_the_lan_and_is_given_back_as_cni_made_it() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let lan = MacvtapLan::new(60);
    let pod = pod_iface(NETWORK);
    let mut nicplug = nicplug_with_network_status(&rig);
    nicplug.start();
    nicplug.write_vmi(&spec(&rig, "up"));
    nicplug.wait_phase(NETWORK, Phase::Pending, WAIT);
    let mac = rig.macvtap_add(&lan, &pod, None);
    let cni_made = as_cni_made_it(&rig, &pod);

    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    let entry = nicplug.entry(NETWORK).unwrap();
    assert_eq!(entry["mac"], mac.as_str(), "{entry}");
    assert_eq!(entry["podInterfaceName"], pod.as_str(), "{entry}");
    assert!(entry.get("uplink").is_none(), "{entry}");
    let reason = entry["dhcp"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("macvtap"), "{entry}");
    // KubeVirt's rendering: the macvtap itself is the device's tap.
    let xml = rig.domain_xml();
    assert!(
        xml.contains(&format!("<target dev='{pod}' managed='no'/>")),
        "{xml}"
    );
    assert_eq!(devices_on(&rig, &pod), 1);
    // Nothing of nicplug's in the pod: no bridge, no tap.
    let links = rig.pod_ip(&["-o", "link", "show"]);
    assert!(
        !links.contains("k6t-") && !links.contains(": tap"),
        "{links}"
    );
    ping_over_the_lan(&rig, &lan, &mac).unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

    // Unplug: the device goes, the macvtap stays exactly as CNI made it.
    nicplug.write_vmi(&spec(&rig, "absent"));
    nicplug.wait_phase(NETWORK, Phase::Detached, WAIT);
    assert!(
        rig.wait_guest_mac_gone(&mac, WAIT),
        "the guest still has {mac}"
    );
    assert_eq!(devices_on(&rig, &pod), 0);
    assert_eq!(as_cni_made_it(&rig, &pod), cni_made);

    // And back: the same macvtap carries the NIC again.
    nicplug.write_vmi(&spec(&rig, "up"));
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    ping_over_the_lan(&rig, &lan, &mac).unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

    // Leaving the spec: detached, the entry goes, the macvtap stays.
    nicplug.set_spec(&[]);
    nicplug.wait_gone(NETWORK, WAIT);
    assert_eq!(devices_on(&rig, &pod), 0);
    assert_eq!(as_cni_made_it(&rig, &pod), cni_made);
    rig.macvtap_del(&pod);
}

#[test]
fn a_device_kubevirt_rendered_is_adopted_and_a_restart_plugs_no_second() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let lan = MacvtapLan::new(61);
    let pod = pod_iface(NETWORK);
    let mac = rig.macvtap_add(&lan, &pod, Some("02:6b:76:00:00:61"));
    assert_eq!(mac, "02:6b:76:00:00:61", "macvtap-cni sets the spec's MAC");
    // As virt-launcher renders the interface at VM start.
    let device = format!(
        "<interface type='ethernet'><target dev='{pod}' managed='no'/><model type='virtio-non-transitional'/><mac address='{mac}'/><alias name='ua-{NETWORK}'/></interface>"
    );
    rig.attach_live("kubevirt-macvtap.xml", &device);
    let mut doc = spec(&rig, "up");
    doc["spec"]["domain"]["devices"]["interfaces"][1]["macAddress"] = mac.clone().into();
    let mut nicplug = nicplug_with_network_status(&rig);
    nicplug.start();
    nicplug.write_vmi(&doc);
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    assert_eq!(devices_on(&rig, &pod), 1);
    ping_over_the_lan(&rig, &lan, &mac).unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

    // A restarted nicplug finds the device and adopts it again.
    assert_restart_adopts(&mut nicplug, NETWORK, || devices_on(&rig, &pod));
}

#[test]
fn a_crash_right_after_the_attach_or_the_detach_converges() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let lan = MacvtapLan::new(62);
    let pod = pod_iface(NETWORK);
    let mut nicplug = nicplug_with_network_status(&rig);
    nicplug.env = abort_after("attach-device");
    nicplug.start();
    nicplug.write_vmi(&spec(&rig, "up"));
    nicplug.wait_phase(NETWORK, Phase::Pending, WAIT);
    let mac = rig.macvtap_add(&lan, &pod, None);
    let cni_made = as_cni_made_it(&rig, &pod);
    abort_after_then_restart(&mut nicplug, "attach-device");
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    assert_eq!(devices_on(&rig, &pod), 1, "{}", nicplug.log());
    ping_over_the_lan(&rig, &lan, &mac).unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

    assert!(nicplug.stop());
    nicplug.env = abort_after("detach-device");
    nicplug.start();
    nicplug.write_vmi(&spec(&rig, "absent"));
    abort_after_then_restart(&mut nicplug, "detach-device");
    nicplug.wait_phase(NETWORK, Phase::Detached, WAIT);
    assert!(
        rig.wait_guest_mac_gone(&mac, WAIT),
        "the guest still has {mac}"
    );
    assert_eq!(devices_on(&rig, &pod), 0, "{}", nicplug.log());
    assert_eq!(as_cni_made_it(&rig, &pod), cni_made);
}

#[test]
fn live_migration_moves_a_macvtap_nic_onto_the_target_pods_own_macvtap() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::root_launcher());
    let lan = MacvtapLan::new(63);
    let pod = pod_iface(NETWORK);
    // macAddress, so that macvtap-cni gives both pods' macvtaps the VM's MAC.
    let mac = "02:6b:76:00:00:63";
    let mut doc = spec(&rig, "up");
    doc["spec"]["domain"]["devices"]["interfaces"][1]["macAddress"] = mac.into();
    rig.macvtap_add(&lan, &pod, Some(mac));
    let cni_made = as_cni_made_it(&rig, &pod);
    let mut source = nicplug_with_network_status(&rig);
    source.start();
    source.write_vmi(&doc);
    source.wait_phase(NETWORK, Phase::Ready, WAIT);
    ping_over_the_lan(&rig, &lan, mac).unwrap_or_else(|e| panic!("{e}\n{}", source.log()));

    // The target pod on another "node" LAN (a macvtap of the same MAC on the
    // same lower link is refused by the kernel, as on two real nodes it
    // never meets): its own macvtap from CNI is all it needs.
    let target = rig.start_target();
    let target_lan = MacvtapLan::new(64);
    target.macvtap_add(&target_lan, &pod, Some(mac));
    let target_made = as_cni_made_it(&target, &pod);
    let mut nicplug = nicplug_with_network_status(&target);
    nicplug.start();
    nicplug.write_vmi(&doc);
    nicplug.wait_phase(NETWORK, Phase::Prepared, WAIT);
    let entry = nicplug.entry(NETWORK).unwrap();
    assert!(entry.get("message").is_none(), "the MACs agree: {entry}");
    assert_eq!(as_cni_made_it(&target, &pod), target_made, "nothing built");

    let took = rig
        .migrate_to(&target, &[])
        .expect("the migration succeeds");
    eprintln!("timing: macvtap NIC migration (virsh migrate) {took:?}");
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    assert_eq!(devices_on(&target, &pod), 1);
    assert!(
        !nicplug.log().contains("attached mac"),
        "the target attached: {}",
        nicplug.log()
    );
    ping_over_the_lan(&target, &target_lan, mac)
        .unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));
    // The source keeps its macvtap for CNI DEL and detached nothing.
    assert_source_left_alone(&source, NETWORK);
    assert_eq!(as_cni_made_it(&rig, &pod), cni_made);
    drop(nicplug);
    drop(target);
}
