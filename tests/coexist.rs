//! End-to-end on the rig: living beside KubeVirt's own hotplug. Devices and
//! plumbing made by "another party" (KubeVirt's naming and layout, built here
//! by hand) are adopted and never touched; a detach someone else did first
//! counts as done; a domain that is not running here gets nothing.
//! Needs root; see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::time::{Duration, Instant};

use e2e::*;
use support::{CniNet, Rig, RigOptions};

const WAIT: Duration = Duration::from_secs(20);

fn device_xml(rig: &Rig, network: &str, mac: &str) -> std::path::PathBuf {
    let path = rig.dir.join(format!("{network}.xml"));
    std::fs::write(
        &path,
        format!(
            "<interface type='ethernet'><target dev='tap{}' managed='no'/><model type='virtio-non-transitional'/>\
             <mac address='{mac}'/><alias name='ua-{network}'/></interface>",
            suffix(network)
        ),
    )
    .unwrap();
    path
}

#[test]
fn adopts_a_device_kubevirt_attached_and_touches_nothing() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mac = kubevirt_layout(&rig, &CniNet::new(50), "kvnet", rig.qemu_uid());
    let xml = device_xml(&rig, "kvnet", &mac);
    rig.virsh(&[
        "attach-device",
        &rig.domain,
        xml.to_str().unwrap(),
        "--live",
        "--config",
    ]);
    assert!(rig.wait_guest_mac(&mac, WAIT).is_some());
    let before = settled_pod_link_state(&rig);

    let mut nicplug = Nicplug::new(&rig, &["kvnet"]);
    nicplug.start();
    nicplug.wait_phase("kvnet", Phase::Ready, WAIT);
    let entry = nicplug.entry("kvnet").unwrap();
    assert_eq!(entry["mac"], mac.as_str());
    assert_eq!(entry["infoSource"], "domain, guest-agent");
    // KubeVirt serves DHCP for what it plumbs: nicplug starts no server.
    assert_eq!(entry["dhcp"]["served"], false, "{entry}");
    assert!(
        entry["dhcp"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("did not plumb")),
        "{entry}"
    );
    // A while later: nothing created, renamed, re-addressed or re-aliased.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pod_link_state(&rig), before, "KubeVirt's layout untouched");
    let aliases = device_aliases(&rig);
    assert_eq!(aliases.iter().filter(|a| *a == "ua-kvnet").count(), 1);
    assert!(
        !nicplug.log().contains("step done"),
        "no step ran:\n{}",
        nicplug.log()
    );
    assert!(!nicplug.log().contains("dhcp server started"));
}

#[test]
fn a_detach_someone_else_did_first_counts_as_done() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(51);
    let before = pod_link_state(&rig);
    let mut nicplug = Nicplug::new(&rig, &["racy"]);
    nicplug.start();
    let cni = rig.cni_add(&net, &pod_iface("racy"));
    nicplug.wait_phase("racy", Phase::Ready, WAIT);

    // KubeVirt's launcher detaches on `state: absent` too, here first (while
    // nicplug is stopped, so the order is certain).
    assert!(nicplug.stop());
    nicplug.set_spec_states(&[("racy", "absent")]);
    rig.virsh(&[
        "detach-device-alias",
        &rig.domain,
        "ua-racy",
        "--live",
        "--config",
    ]);
    let deadline = Instant::now() + WAIT;
    while device_aliases(&rig).contains(&"ua-racy".to_string()) {
        assert!(
            Instant::now() < deadline,
            "the other party's detach never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nicplug.start();
    nicplug.wait_phase("racy", Phase::Detached, WAIT);
    assert_no_plumbing(&rig, "racy");
    assert!(rig.wait_guest_mac_gone(&cni.mac, WAIT));
    rig.cni_del(&net, &pod_iface("racy"));
    assert_eq!(pod_link_state(&rig), before);
    assert!(!nicplug.log().contains("WARN"), "{}", nicplug.log());

    // And the race itself: both detach at once, whoever wins.
    let cni = rig.cni_add(&net, &pod_iface("racy"));
    nicplug.set_spec(&["racy"]);
    nicplug.wait_phase("racy", Phase::Ready, WAIT);
    nicplug.set_spec_states(&[("racy", "absent")]);
    let _ = rig.virsh_try(&[
        "detach-device-alias",
        &rig.domain,
        "ua-racy",
        "--live",
        "--config",
    ]);
    nicplug.wait_phase("racy", Phase::Detached, WAIT);
    assert_no_plumbing(&rig, "racy");
    assert!(rig.wait_guest_mac_gone(&cni.mac, WAIT));
}

#[test]
fn migration_target_like_start_creates_nothing_then_adopts() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    // The domain is not running here yet; KubeVirt's virt-handler has built
    // the plumbing of every spec network already (as on a migration target).
    rig.virsh(&["destroy", &rig.domain]);
    let mac = kubevirt_layout(&rig, &CniNet::new(52), "moved", rig.qemu_uid());
    let plain = CniNet::new(53);
    rig.cni_add(&plain, &pod_iface("plain"));
    // The kernel adds the link's IPv6 link-local address a moment after CNI
    // returns: take the snapshot once it is there.
    let settled = support::poll(Duration::from_secs(10), Duration::from_millis(20), || {
        pod_addresses(&rig, &pod_iface("plain"))
            .iter()
            .any(|a| a.starts_with("fe80:"))
            .then_some(())
    });
    assert!(
        settled.is_some(),
        "no IPv6 link-local address on the pod link"
    );
    let before = pod_link_state(&rig);

    let mut nicplug = Nicplug::new(&rig, &["moved", "plain"]);
    nicplug.start();
    nicplug.wait_phase("plain", Phase::Pending, WAIT);
    assert_eq!(
        nicplug.entry("plain").unwrap()["message"],
        "the domain is not running"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (code, body) = rt
        .block_on(nicplug::api::client::fetch(&nicplug.api_socket, "/readyz"))
        .unwrap();
    assert_eq!(code, 200, "ready while the domain is elsewhere: {body}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pod_link_state(&rig), before, "nothing created");

    // The domain arrives with its device (from the migration stream; here
    // from its persistent definition) and starts running here.
    let xml = device_xml(&rig, "moved", &mac);
    rig.virsh(&[
        "attach-device",
        &rig.domain,
        xml.to_str().unwrap(),
        "--config",
    ]);
    rig.virsh(&["start", &rig.domain]);
    nicplug.wait_phase("moved", Phase::Attached, Duration::from_secs(60));
    let aliases = device_aliases(&rig);
    assert_eq!(
        aliases.iter().filter(|a| *a == "ua-moved").count(),
        1,
        "{aliases:?}"
    );
    // The network without a device in the arriving domain is plugged now.
    nicplug.wait_phase("plain", Phase::Attached, Duration::from_secs(60));
}
