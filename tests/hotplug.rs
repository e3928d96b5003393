//! End-to-end: nicplug inside a real launcher-pod rig (libvirt daemon in the
//! pod netns, TCG guest with qemu-guest-agent), pod interfaces put in by the
//! real CNI bridge plugin, as Multus would. Needs root; see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::time::{Duration, Instant};

use e2e::*;
use support::{CniNet, Rig, RigOptions};

#[test]
fn hotplug_one_nic_reaches_the_guest() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    nicplug.set_spec(&["dyniface1"]);
    nicplug.wait_phase("dyniface1", Phase::Pending, Duration::from_secs(10));

    let net = CniNet::new(1);
    let created = Instant::now();
    let cni = rig.cni_add(&net, "pod9a6a0c3b4d8");
    nicplug.wait_phase("dyniface1", Phase::Attached, Duration::from_secs(20));
    let attached = created.elapsed();
    let guest = rig.wait_guest_mac(&cni.mac, Duration::from_secs(30));
    let seen = created.elapsed();
    eprintln!(
        "timing: pod interface -> status Attached {attached:?}, -> guest agent reports the MAC {seen:?}"
    );
    assert!(guest.is_some(), "guest never reported {}", cni.mac);

    assert!(device_aliases(&rig).contains(&"ua-dyniface1".to_string()));
    assert_eq!(
        device_mac(&rig, "ua-dyniface1").as_deref(),
        Some(cni.mac.as_str()),
        "VM gets the pod link's original MAC"
    );
    // The persistent definition has it too (LIVE|CONFIG).
    assert!(rig.domain_config_xml().contains("ua-dyniface1"));
    assert_plumbing(&rig, "dyniface1", 1500);
    let status = nicplug.status().unwrap();
    let entry = &status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "dyniface1")
        .unwrap()
        .clone();
    assert_eq!(entry["podInterfaceName"], "pod9a6a0c3b4d8");
    assert_eq!(entry["mac"], cni.mac.as_str());
    assert_eq!(nicplug.phase("default"), Some(Phase::NotManaged));
    assert_guest_reachable(&rig, &net, &cni.mac);

    // A stop leaves what was plugged in place.
    assert!(nicplug.stop(), "nicplug exits cleanly on SIGTERM");
    assert!(device_aliases(&rig).contains(&"ua-dyniface1".to_string()));
    assert!(pod_link(&rig, "tap9a6a0c3b4d8").is_some());
    assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
}

#[test]
fn hotplug_two_nics_in_one_update() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let (red, blue) = (CniNet::new(2), CniNet::new(3));
    nicplug.set_spec(&["red", "blue"]);
    let red_cni = rig.cni_add(&red, &pod_iface("red"));
    let blue_cni = rig.cni_add(&blue, &pod_iface("blue"));
    nicplug.wait_phase("red", Phase::Attached, Duration::from_secs(20));
    nicplug.wait_phase("blue", Phase::Attached, Duration::from_secs(20));
    assert_plumbing(&rig, "red", 1500);
    assert_plumbing(&rig, "blue", 1500);
    assert_guest_reachable(&rig, &red, &red_cni.mac);
    assert_guest_reachable(&rig, &blue, &blue_cni.mac);
    let aliases = device_aliases(&rig);
    assert_eq!(
        aliases.iter().filter(|a| a.starts_with("ua-")).count(),
        2,
        "{aliases:?}"
    );
}

#[test]
fn pod_interface_before_spec_update() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(4);
    let cni = rig.cni_add(&net, &pod_iface("early"));
    // Not in the spec: nicplug leaves the pod interface alone.
    std::thread::sleep(Duration::from_millis(500));
    assert!(pod_link(&rig, &format!("k6t-{}", suffix("early"))).is_none());
    assert_eq!(
        pod_addresses(&rig, &pod_iface("early")).len(),
        1 + usize::from(has_ipv6_ll(&rig, &pod_iface("early")))
    );

    nicplug.set_spec(&["early"]);
    nicplug.wait_phase("early", Phase::Attached, Duration::from_secs(20));
    assert_plumbing(&rig, "early", 1500);
    assert_guest_reachable(&rig, &net, &cni.mac);
}

fn has_ipv6_ll(rig: &Rig, name: &str) -> bool {
    pod_addresses(rig, name)
        .iter()
        .any(|a| a.starts_with("fe80"))
}

#[test]
fn sigkill_between_plumbing_and_attach_then_restart() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &["crash"]);
    nicplug.start();
    nicplug.wait_phase("crash", Phase::Pending, Duration::from_secs(10));

    // Freeze the libvirt daemon: nicplug plumbs (netlink only), publishes
    // Plumbed, and then blocks in the attach call it cannot finish.
    let daemon = rig.daemon_pid();
    // SAFETY: signalling the rig's own libvirtd by its pid.
    unsafe { libc::kill(daemon, libc::SIGSTOP) };
    let net = CniNet::new(5);
    let cni = rig.cni_add(&net, &pod_iface("crash"));
    let plumbed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        nicplug.wait_phase("crash", Phase::Plumbed, Duration::from_secs(10))
    }));
    nicplug.kill();
    // SAFETY: as above.
    unsafe { libc::kill(daemon, libc::SIGCONT) };
    plumbed.expect("nicplug reached Plumbed before the kill");
    assert!(
        pod_link(&rig, &format!("tap{}", suffix("crash"))).is_some(),
        "killed with plumbing in place"
    );

    nicplug.start();
    nicplug.wait_phase("crash", Phase::Attached, Duration::from_secs(20));
    let aliases = device_aliases(&rig);
    assert_eq!(
        aliases.iter().filter(|a| *a == "ua-crash").count(),
        1,
        "exactly one device: {aliases:?}"
    );
    // The MAC came from the record in the pod link's alias: the link itself
    // already carried the bridge's MAC when the second run started.
    assert_eq!(
        device_mac(&rig, "ua-crash").as_deref(),
        Some(cni.mac.as_str())
    );
    assert_plumbing(&rig, "crash", 1500);
    let names: Vec<String> = rig
        .pod_ip(&["-j", "link"])
        .lines()
        .collect::<String>()
        .split("\"ifname\":\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap().to_string())
        .collect();
    for name in [
        pod_iface("crash"),
        format!("k6t-{}", suffix("crash")),
        format!("tap{}", suffix("crash")),
    ] {
        assert_eq!(names.iter().filter(|n| **n == name).count(), 1, "{names:?}");
    }
    assert_guest_reachable(&rig, &net, &cni.mac);
}

#[test]
fn malformed_vmi_keeps_the_last_good_spec() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &["first"]);
    nicplug.start();
    let (first, second) = (CniNet::new(6), CniNet::new(7));
    rig.cni_add(&first, &pod_iface("first"));
    nicplug.wait_phase("first", Phase::Attached, Duration::from_secs(20));

    nicplug.write_vmi_text("{\"kind\": \"VirtualMachineInstance\", \"metadata\": {");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !nicplug.log().contains("invalid VMI document in") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = nicplug.log();
    assert!(
        log.contains(&format!(
            "invalid VMI document in {}",
            nicplug.vmi_path.display()
        )),
        "{log}"
    );
    assert!(nicplug.is_running(), "nicplug keeps running");
    // The last good spec still holds: nothing was unplugged.
    let phase = nicplug.phase("first");
    assert!(
        matches!(phase, Some(Phase::Attached | Phase::Ready)),
        "{phase:?}"
    );

    // A later good document is applied.
    nicplug.set_spec(&["first", "second"]);
    let cni = rig.cni_add(&second, &pod_iface("second"));
    nicplug.wait_phase("second", Phase::Attached, Duration::from_secs(20));
    assert!(
        rig.wait_guest_mac(&cni.mac, Duration::from_secs(30))
            .is_some()
    );
}

/// Multus' network-status as a pod's annotation holds it before a hot-plug:
/// the pod network only.
fn network_status_of(entries: &[serde_json::Value]) -> String {
    let mut all =
        vec![serde_json::json!({"name": "kindnet", "interface": "eth0", "default": true})];
    all.extend(entries.iter().cloned());
    serde_json::Value::Array(all).to_string()
}

/// Whether the pod link is on its bridge right now (no waiting).
fn on_the_bridge(rig: &Rig, network: &str) -> bool {
    pod_link(rig, &pod_iface(network))
        .is_some_and(|p| p["master"] == format!("k6t-{}", suffix(network)).as_str())
}

/// Ready means traffic flows: at the moment the status says Ready, the pod
/// link is on the bridge already. Without a network-status source CNI is
/// done once the pod interface stayed as it was for the settle window.
#[test]
fn ready_comes_with_the_uplink_without_network_status() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &["blue"]);
    nicplug.start();
    nicplug.wait_phase("blue", Phase::Pending, Duration::from_secs(10));
    let net = CniNet::new(6);
    let cni = rig.cni_add(&net, &pod_iface("blue"));
    nicplug.wait_phase("blue", Phase::Ready, Duration::from_secs(30));
    assert!(on_the_bridge(&rig, "blue"), "Ready before the enslave");
    let entry = nicplug.entry("blue").unwrap();
    assert_eq!(
        entry["uplink"],
        serde_json::json!({"ready": true, "cniDone": "settleWindow"})
    );
    assert_guest_reachable(&rig, &net, &cni.mac);
}

/// With Multus' network-status, CNI is done when the entry for the pod
/// interface is there (Multus writes it after CNI ADD returned): until it
/// is, the pod link is left to CNI however long it stays as it is, and the
/// interface is Attached with the reason; once it is, the pod link joins
/// the bridge and the interface is Ready, the ping answers.
#[test]
fn network_status_is_cnis_done_signal() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    // Not the rig's own (its CNI ADD writes that one at once): this Multus
    // is slow.
    let status_file = rig.dir.join("slow-network-status.json");
    std::fs::write(&status_file, network_status_of(&[])).unwrap();
    let mut nicplug = Nicplug::new(&rig, &["blue"]);
    nicplug.args = vec!["--network-status".into(), status_file.display().to_string()];
    nicplug.start();
    nicplug.wait_phase("blue", Phase::Pending, Duration::from_secs(10));
    let net = CniNet::new(7);
    let cni = rig.cni_add(&net, &pod_iface("blue"));
    nicplug.wait_phase("blue", Phase::Attached, Duration::from_secs(30));
    // Well past the settle window, with the guest seeing the NIC: still
    // CNI's, since Multus has not said CNI is done.
    assert!(
        rig.wait_guest_mac(&cni.mac, Duration::from_secs(30))
            .is_some()
    );
    std::thread::sleep(2 * nicplug::plan::CNI_SETTLE);
    assert!(
        !on_the_bridge(&rig, "blue"),
        "enslaved before network-status said CNI is done"
    );
    let entry = nicplug.entry("blue").unwrap();
    assert_eq!(entry["phase"], "Attached", "{entry}");
    assert_eq!(entry["uplink"], serde_json::json!({"ready": false}));
    assert!(
        entry["message"]
            .as_str()
            .unwrap()
            .contains("Multus' network-status has no entry for it yet"),
        "{entry}"
    );
    // Multus writes the entry: done.
    let written = serde_json::json!({
        "name": format!("default/{}", net.name),
        "interface": pod_iface("blue"),
        "ips": cni.ips.iter().map(|ip| ip.split('/').next().unwrap()).collect::<Vec<_>>(),
        "mac": cni.mac,
    });
    std::fs::write(&status_file, network_status_of(&[written])).unwrap();
    nicplug.wait_phase("blue", Phase::Ready, Duration::from_secs(30));
    assert!(on_the_bridge(&rig, "blue"), "Ready before the enslave");
    assert_eq!(
        nicplug.entry("blue").unwrap()["uplink"],
        serde_json::json!({"ready": true, "cniDone": "networkStatus"})
    );
    assert_plumbing(&rig, "blue", 1500);
    assert_guest_reachable(&rig, &net, &cni.mac);
}
