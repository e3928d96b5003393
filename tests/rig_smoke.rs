//! Proves the rig and the whole hot-plug data path by hand, without nicplug:
//! CNI ADD -> bridge + tap in the pod netns -> attach-device -> guest sees the NIC ->
//! ping from the node -> detach -> teardown -> CNI DEL -> pod netns as before.
//!
//! Run: `cargo test --test rig_smoke -- --test-threads=1` (as root).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{CniNet, Rig, RigOptions, require_root};

/// KubeVirt's hash of the network name `dyniface1` (see docs/reference).
const HASH: &str = "9a6a0c3b4d8";

#[test]
fn data_path_by_hand() {
    if !require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let boot = rig.elapsed();
    assert_eq!(
        rig.free_root_ports(),
        4,
        "the rig promises 4 spare root ports"
    );
    assert_ne!(
        rig.qemu_uid(),
        0,
        "QEMU must run as Debian's libvirt-qemu, not root"
    );

    let net = CniNet::new(1);
    let pod_if = format!("pod{HASH}");
    let bridge = format!("k6t-{HASH}");
    let tap = format!("tap{HASH}");
    let alias = "ua-dyniface1";
    let mut times: Vec<(&str, Duration)> = vec![("rig start", boot)];
    let mut lap = Instant::now();
    let mut mark = |what: &'static str, times: &mut Vec<(&str, Duration)>| {
        times.push((what, lap.elapsed()));
        lap = Instant::now();
    };

    let before = rig.pod_links_snapshot();
    let cni = rig.cni_add(&net, &pod_if);
    mark("cni ADD", &mut times);
    assert_eq!(cni.ips.len(), 1, "one link-local address: {:?}", cni.raw);
    assert!(cni.ips[0].starts_with(&net.addr(0)[..net.addr(0).len() - 1]));
    assert!(
        rig.pod_ip(&["-br", "addr", "show", "dev", &pod_if])
            .contains(&cni.ips[0])
    );

    // Plumbing, KubeVirt's way minus the rename/dummy: bridge, pod link into it, tap.
    let uid = rig.qemu_uid().to_string();
    let port_mac = format!(
        "02:{}:{}:{}:{}:{}",
        &HASH[0..2],
        &HASH[2..4],
        &HASH[4..6],
        &HASH[6..8],
        &HASH[8..10]
    );
    rig.pod_ip(&["link", "add", &bridge, "type", "bridge"]);
    rig.pod_ip(&["addr", "flush", "dev", &pod_if]);
    rig.pod_ip(&["link", "set", &pod_if, "address", &port_mac]);
    rig.pod_ip(&["link", "set", &pod_if, "master", &bridge]);
    rig.pod_ip(&[
        "tuntap", "add", "dev", &tap, "mode", "tap", "user", &uid, "vnet_hdr",
    ]);
    rig.pod_ip(&["link", "set", &tap, "master", &bridge]);
    for l in [&tap, &pod_if, &bridge] {
        rig.pod_ip(&["link", "set", l, "up"]);
    }
    mark("plumbing (ip)", &mut times);

    let iface_xml = format!(
        "<interface type='ethernet'>\n  <target dev='{tap}' managed='no'/>\n  \
         <model type='virtio-non-transitional'/>\n  <mac address='{}'/>\n  \
         <alias name='{alias}'/>\n</interface>\n",
        cni.mac
    );
    let xml_path = rig.dir.join("iface.xml");
    std::fs::write(&xml_path, &iface_xml).unwrap();
    let xml_arg = xml_path.display().to_string();
    rig.virsh(&["attach-device", &rig.domain, &xml_arg, "--live", "--config"]);
    mark("virsh attach-device", &mut times);
    assert!(rig.domain_xml().contains(alias));
    assert!(
        rig.domain_config_xml().contains(alias),
        "--config must persist it"
    );
    assert_eq!(rig.free_root_ports(), 3);

    let gi = rig
        .wait_guest_mac(&cni.mac, Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "guest never reported {}; interfaces {:?}\nconsole:\n{}",
                cni.mac,
                rig.try_guest_interfaces(),
                rig.console_tail(30)
            )
        });
    mark("guest agent reports MAC", &mut times);

    let guest_addr = net.addr(50);
    let (code, out) = rig.guest_exec(&[
        "/bin/ip",
        "addr",
        "add",
        &format!("{guest_addr}/24"),
        "dev",
        &gi.name,
    ]);
    assert_eq!(code, 0, "ip addr add in guest: {out}");
    let (code, out) =
        rig.guest_exec(&["/bin/sh", "-c", &format!("ip -o addr show dev {}", gi.name)]);
    assert_eq!(code, 0);
    assert!(out.contains(&guest_addr), "guest address missing: {out}");
    mark("guest address set (guest-exec)", &mut times);

    assert!(
        rig.ping_from_node(&net, &guest_addr),
        "node cannot ping the guest at {guest_addr}; pod links:\n{}",
        rig.pod_ip(&["-d", "link"])
    );
    mark("ping node -> guest", &mut times);
    let seen = rig
        .wait_guest_mac(&cni.mac, Duration::from_secs(5))
        .unwrap();
    assert!(seen.has_ip(&guest_addr), "agent reports {:?}", seen.ips);

    // Unplug.
    rig.virsh(&[
        "detach-device-alias",
        &rig.domain,
        alias,
        "--live",
        "--config",
    ]);
    let gone = support::poll(Duration::from_secs(20), Duration::from_millis(50), || {
        (!rig.domain_xml().contains(alias)).then_some(())
    });
    assert!(gone.is_some(), "device still in the live domain after 20 s");
    mark("detach (device gone from live XML)", &mut times);
    assert!(rig.wait_guest_mac_gone(&cni.mac, Duration::from_secs(10)));
    assert!(!rig.domain_config_xml().contains(alias));
    assert_eq!(rig.free_root_ports(), 4);

    rig.pod_ip(&["link", "del", &tap]);
    rig.pod_ip(&["link", "set", &pod_if, "nomaster"]);
    rig.pod_ip(&["link", "del", &bridge]);
    rig.pod_ip(&["link", "set", &pod_if, "address", &cni.mac]);
    rig.pod_ip(&["addr", "add", &cni.ips[0], "dev", &pod_if]);
    mark("teardown plumbing", &mut times);
    rig.cni_del(&net, &pod_if);
    mark("cni DEL", &mut times);

    let after = rig.pod_links_snapshot();
    assert_eq!(before, after, "pod netns differs after unplug + CNI DEL");

    // The guest's /init restarts qemu-ga when it dies (later tests stop it on purpose).
    let old_pid = rig.guest_exec(&["/bin/cat", "/run/qemu-ga.pid"]).1;
    let r = rig.agent(
        &serde_json::json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", "sleep 0.3; kill $(cat /run/qemu-ga.pid)"]}}),
        5,
    );
    assert!(r.is_ok(), "{r:?}");
    std::thread::sleep(Duration::from_millis(500));
    let back = support::poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let (code, pid) = rig.guest_exec_try(&["/bin/cat", "/run/qemu-ga.pid"])?;
        (code == 0 && !pid.trim().is_empty() && pid != old_pid).then_some(())
    });
    assert!(
        back.is_some(),
        "qemu-ga did not come back after being killed"
    );
    mark("qemu-ga killed and back", &mut times);

    eprintln!("\n=== rig_smoke timings ===");
    for (what, d) in &times {
        eprintln!("{:>8} ms  {what}", d.as_millis());
    }
}

#[test]
fn drop_cleans_up_on_panic() {
    if !require_root() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel::<(String, String, i32, i32, PathBuf)>();
    let worker = std::thread::spawn(move || {
        // Transient domain here, so both definition paths are exercised.
        let rig = Rig::start(RigOptions {
            root_ports: 1,
            vcpus: 1,
            persistent: false,
            ..RigOptions::default()
        });
        assert!(rig.free_root_ports() == 1);
        tx.send((
            rig.pod_ns.clone(),
            rig.node_ns.clone(),
            rig.daemon_pid(),
            rig.qemu_pid(),
            rig.dir.clone(),
        ))
        .unwrap();
        panic!("deliberate panic with a live rig");
    });
    assert!(worker.join().is_err(), "the worker should have panicked");
    let (pod, node, daemon, qemu, dir) = rx.recv().expect("rig started");
    assert!(daemon > 0 && qemu > 0);

    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for ns in [&pod, &node] {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} left behind"
        );
    }
    let gone = |pid: i32| {
        support::poll(Duration::from_secs(5), Duration::from_millis(50), || {
            (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })
        .is_some()
    };
    assert!(gone(daemon), "libvirtd {daemon} still running");
    assert!(gone(qemu), "QEMU {qemu} still running");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn failed_start_cleans_up() {
    if !require_root() {
        return;
    }
    let before = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap()
        .stdout;
    // The guest kernel panics (no such init) -> panic=-1 reboots -> on_reboot destroy.
    let err = std::panic::catch_unwind(|| {
        Rig::start(RigOptions {
            root_ports: 1,
            vcpus: 1,
            kernel_cmdline_extra: "rdinit=/nonexistent".into(),
            ..RigOptions::default()
        })
    })
    .err()
    .expect("Rig::start must fail when the guest cannot boot");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("Rig::start failed"), "{msg}");
    assert!(
        msg.contains("Kernel panic") || msg.contains("rdinit"),
        "console tail expected: {msg}"
    );
    let after = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(
        String::from_utf8_lossy(&before),
        String::from_utf8_lossy(&after)
    );
}
