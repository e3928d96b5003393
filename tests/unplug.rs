//! End-to-end on the rig: hot-unplug, live link state, and clean-up that
//! leaves the pod namespace exactly as CNI made it. Needs root; see
//! docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::time::{Duration, Instant};

use e2e::*;
use support::{CniNet, CniResult, Rig, RigOptions};

const PLUG: Duration = Duration::from_secs(20);

/// Plugs `network` (spec first, then CNI ADD) and returns the VM's MAC.
fn plug(rig: &Rig, nicplug: &Nicplug<'_>, net: &CniNet, network: &str, spec: &[&str]) -> String {
    nicplug.set_spec(spec);
    let cni = rig.cni_add(net, &pod_iface(network));
    nicplug.wait_phase(network, Phase::Attached, PLUG);
    assert!(
        rig.wait_guest_mac(&cni.mac, PLUG).is_some(),
        "guest sees {}",
        cni.mac
    );
    cni.mac
}

#[test]
fn unplug_by_state_absent_then_cni_del_restores_the_pod() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(10);
    let before_plug = rig.pod_links_snapshot();
    let mac = plug(&rig, &nicplug, &net, "blue", &["blue"]);
    assert_plumbing(&rig, "blue", 1500);

    let changed = Instant::now();
    nicplug.set_spec_states(&[("blue", "absent")]);
    nicplug.wait_phase("blue", Phase::Detached, PLUG);
    eprintln!(
        "timing: spec absent -> all plumbing gone {:?}",
        changed.elapsed()
    );
    assert!(!device_aliases(&rig).contains(&"ua-blue".to_string()));
    assert!(
        !rig.domain_config_xml().contains("ua-blue"),
        "gone from the persistent definition too"
    );
    assert!(rig.wait_guest_mac_gone(&mac, PLUG), "guest released {mac}");
    assert_no_plumbing(&rig, "blue");

    rig.cni_del(&net, &pod_iface("blue"));
    assert_eq!(
        rig.pod_links_snapshot(),
        before_plug,
        "pod namespace as before the plug"
    );
    assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
}

#[test]
fn unplug_by_leaving_the_spec_and_plug_again() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(11);
    let before_plug = rig.pod_links_snapshot();
    for round in 0..3 {
        let mac = plug(&rig, &nicplug, &net, "green", &["green"]);
        if round == 2 {
            // Traffic flows after re-plugs.
            let guest = rig.wait_guest_mac(&mac, PLUG).unwrap();
            let addr = net.addr(60);
            set_guest_address(&rig, &guest.name, None, &addr);
            assert!(
                rig.ping_from_node(&net, &addr),
                "ping after re-plug {round}"
            );
        }
        nicplug.set_spec(&[]);
        nicplug.wait_gone("green", PLUG);
        assert!(rig.wait_guest_mac_gone(&mac, PLUG));
        assert_no_plumbing(&rig, "green");
        rig.cni_del(&net, &pod_iface("green"));
        assert_eq!(rig.pod_links_snapshot(), before_plug, "round {round}");
    }
}

/// Someone broke the pod link's record while the network was plugged, then
/// the network left the spec. Without the record nicplug cannot give the pod
/// link back, so it touches nothing and says why; once the record is whole
/// again, the unplug goes on and leaves nothing.
#[test]
fn a_departed_network_with_a_broken_record_is_held_until_it_is_whole() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(12);
    let mac = plug(&rig, &nicplug, &net, "blue", &["blue"]);
    let pod = pod_iface("blue");
    let record = pod_link(&rig, &pod).unwrap()["ifalias"]
        .as_str()
        .unwrap()
        .to_string();
    rig.pod_ip(&["link", "set", "dev", &pod, "alias", "nicplug/v2 mac=broken"]);
    let held = settled_pod_link_state(&rig);
    nicplug.set_spec(&[]);
    nicplug.wait_phase("blue", Phase::Failed, PLUG);
    let entry = nicplug.entry("blue").unwrap();
    let message = entry["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("pod interface {pod} has a corrupt nicplug record")),
        "{entry}"
    );
    assert!(rig.wait_guest_mac(&mac, PLUG).is_some(), "the device stays");
    assert_eq!(pod_link_state(&rig), held, "nothing was touched");

    rig.pod_ip(&["link", "set", "dev", &pod, "alias", &record]);
    nicplug.wait_gone("blue", PLUG);
    assert!(rig.wait_guest_mac_gone(&mac, PLUG));
    assert_no_plumbing(&rig, "blue");
    rig.cni_del(&net, &pod);
}

#[test]
fn pod_interface_removed_first_unplugs_and_waits() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(12);
    let mac = plug(&rig, &nicplug, &net, "red", &["red"]);
    // Multus deletes the pod interface while the spec still lists it.
    rig.cni_del(&net, &pod_iface("red"));
    nicplug.wait_phase("red", Phase::Pending, PLUG);
    assert!(rig.wait_guest_mac_gone(&mac, PLUG));
    assert!(!device_aliases(&rig).contains(&"ua-red".to_string()));
    let names = pod_link_names(&rig);
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("k6t-") || n.starts_with("tap")),
        "{names:?}"
    );
    // No error loop, and the interface comes back with its pod interface.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(nicplug.phase("red"), Some(Phase::Pending));
    let cni = rig.cni_add(&net, &pod_iface("red"));
    nicplug.wait_phase("red", Phase::Attached, PLUG);
    assert!(rig.wait_guest_mac(&cni.mac, PLUG).is_some());
}

#[test]
fn link_down_and_up_reach_the_guest() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(13);
    let mac = plug(&rig, &nicplug, &net, "yellow", &["yellow"]);
    wait_carrier(&rig, &mac, "1");

    nicplug.set_spec_states(&[("yellow", "down")]);
    wait_carrier(&rig, &mac, "0");
    assert_eq!(nicplug.entry("yellow").unwrap()["linkState"], "down");
    assert!(rig.domain_xml().contains("<link state='down'/>"));
    assert!(
        rig.domain_config_xml().contains("<link state='down'/>"),
        "persisted"
    );

    nicplug.set_spec_states(&[("yellow", "up")]);
    wait_carrier(&rig, &mac, "1");
    let deadline = Instant::now() + PLUG;
    while nicplug.entry("yellow").unwrap()["linkState"] != "up" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(nicplug.entry("yellow").unwrap()["linkState"], "up");
}

/// A rig whose guest has no native PCIe port services and no ACPI hotplug
/// driver: it never acknowledges an unplug request (and only finds a
/// plugged device when told to rescan the bus).
fn guest_ignoring_unplug() -> Rig {
    Rig::start(RigOptions {
        kernel_cmdline_extra: "pcie_ports=compat acpiphp.disable=1".into(),
        ..RigOptions::default()
    })
}

/// nicplug with `--detach-timeout SECONDS`, and `network` (CNI network
/// `index`) plugged to Attached.
fn plugged_with_detach_timeout<'a>(
    rig: &'a Rig,
    seconds: &str,
    index: u8,
    network: &str,
) -> (Nicplug<'a>, CniResult) {
    let mut nicplug = Nicplug::new(rig, &[]);
    nicplug.args = vec!["--detach-timeout".into(), seconds.into()];
    nicplug.start();
    nicplug.set_spec(&[network]);
    let cni = rig.cni_add(&CniNet::new(index), &pod_iface(network));
    nicplug.wait_phase(network, Phase::Attached, PLUG);
    (nicplug, cni)
}

#[test]
fn guest_ignoring_unplug_stays_detach_pending_without_hot_loop() {
    if !support::require_root() {
        return;
    }
    let rig = guest_ignoring_unplug();
    let (nicplug, cni) = plugged_with_detach_timeout(&rig, "2", 14, "stuck");
    let (code, out) = rig.guest_exec(&["/bin/sh", "-c", "echo 1 > /sys/bus/pci/rescan"]);
    assert_eq!(code, 0, "{out}");
    assert!(rig.wait_guest_mac(&cni.mac, PLUG).is_some());
    // Wholly plumbed (the pod link joins the bridge once CNI is done) before
    // the unplug that the guest ignores.
    assert_plumbing(&rig, "stuck", 1500);

    nicplug.set_spec_states(&[("stuck", "absent")]);
    nicplug.wait_phase("stuck", Phase::DetachPending, PLUG);
    assert_eq!(
        nicplug.entry("stuck").unwrap()["message"],
        "guest has not released the device"
    );
    // Watch it for a while: the device stays, so do tap and bridge, and the
    // detach is retried with backoff, not in a loop.
    std::thread::sleep(Duration::from_secs(8));
    assert!(device_aliases(&rig).contains(&"ua-stuck".to_string()));
    assert_plumbing(&rig, "stuck", 1500);
    let attempts = nicplug.log().matches("detaching").count();
    // 2 s timeout, then retries after 1, 2, 4 s of backoff: at most 4 in 10 s.
    assert!(
        (2..=4).contains(&attempts),
        "{attempts} detach attempts:\n{}",
        nicplug.log()
    );
    assert_eq!(nicplug.phase("stuck"), Some(Phase::DetachPending));
}

/// QEMU gone in the middle of an unplug (what the soak once met): the detach
/// waiting for the guest ends with the domain, not at its timeout; the
/// stopped domain's definition has no device any more (the detach removed
/// it there at once), so the plumbing goes and the entry with it; and the
/// loop does not spin while the domain is down.
#[test]
fn a_domain_that_stops_mid_unplug_ends_the_detach_and_leaves_nothing() {
    if !support::require_root() {
        return;
    }
    // The detach waits for a guest that never acknowledges it.
    let rig = guest_ignoring_unplug();
    let (nicplug, _) = plugged_with_detach_timeout(&rig, "120", 16, "halt");

    nicplug.set_spec(&[]);
    nicplug.wait_phase("halt", Phase::Detaching, PLUG);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(nicplug.phase("halt"), Some(Phase::Detaching));
    let offset = nicplug.log_len();
    let stopped = Instant::now();
    rig.virsh(&["destroy", &rig.domain]);
    nicplug.wait_gone("halt", PLUG);
    eprintln!(
        "timing: domain destroyed -> entry gone {:?}",
        stopped.elapsed()
    );
    assert_no_plumbing(&rig, "halt");
    // Idle with the domain down: a few passes at most (events of the stop,
    // the teardown's own netlink events), never one every few milliseconds.
    std::thread::sleep(Duration::from_secs(3));
    let passes = nicplug
        .log_since(offset)
        .matches("nicplug::agent: reconcile")
        .count();
    assert!(
        passes < 60,
        "{passes} passes since the domain stopped:\n{}",
        nicplug.log_tail(40)
    );
}

#[test]
fn thirty_plug_unplug_cycles_leak_nothing() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(15);
    let before = rig.pod_links_snapshot();
    let mut samples = Vec::new();
    let mut unplug_times = Vec::new();
    for cycle in 0..30 {
        nicplug.set_spec(&["cycle"]);
        let cni = rig.cni_add(&net, &pod_iface("cycle"));
        nicplug.wait_phase("cycle", Phase::Attached, PLUG);
        assert!(
            rig.wait_guest_mac(&cni.mac, PLUG).is_some(),
            "cycle {cycle}"
        );
        let changed = Instant::now();
        nicplug.set_spec(&[]);
        nicplug.wait_gone("cycle", PLUG);
        unplug_times.push(changed.elapsed());
        rig.cni_del(&net, &pod_iface("cycle"));
        assert_eq!(rig.pod_links_snapshot(), before, "cycle {cycle}");
        if cycle == 4 || cycle == 29 {
            samples.push(process_footprint(nicplug.pid().unwrap()));
        }
    }
    unplug_times.sort();
    eprintln!(
        "timing: spec change -> unplugged and clean, median {:?}",
        unplug_times[unplug_times.len() / 2]
    );
    let (fds5, rss5) = samples[0];
    let (fds30, rss30) = samples[1];
    eprintln!(
        "footprint after 5 cycles: {fds5} fds, {rss5} kB RSS; after 30: {fds30} fds, {rss30} kB RSS"
    );
    assert!(
        fds30 <= fds5,
        "file descriptors grew from {fds5} to {fds30}"
    );
    // Allocator noise is a few hundred kB; a per-cycle leak would be far more.
    assert!(
        rss30 <= rss5 + 1024,
        "RSS grew from {rss5} kB to {rss30} kB"
    );
}

/// Open file descriptors and resident memory (kB) of a process.
fn process_footprint(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let rss = rss_kb(pid);
    (fds, rss)
}
