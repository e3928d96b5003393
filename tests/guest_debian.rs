//! End-to-end on the rig with a real distribution guest (`Guest::Debian`:
//! debootstrapped Debian with systemd, udev, systemd-networkd and
//! qemu-guest-agent, `scripts/build-guest-debian`): what a real guest does
//! with a NIC nicplug hot-plugs, with no action inside the guest: its
//! predictable name from nicplug's placement, and its address from nicplug's
//! DHCP server through systemd-networkd. One boot (the slowest rig of the
//! suite); needs root, see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::time::{Duration, Instant};

use e2e::*;
use support::{CniNet, Guest, Rig, RigOptions};

const PLUG: Duration = Duration::from_secs(60);

fn debian_rig() -> Rig {
    let rig = Rig::start(RigOptions {
        guest: Guest::Debian,
        ..RigOptions::default()
    });
    eprintln!(
        "timing: Debian guest boot to a connected guest agent {:?}",
        rig.boot_to_agent.get()
    );
    rig
}

/// Waits until the guest reports `mac` under the name `want` (udev renames
/// the kernel's `eth<N>` shortly after the device appears); returns how long
/// that took.
fn wait_guest_name(rig: &Rig, mac: &str, want: &str) -> Duration {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < PLUG {
        if let Ok(ifaces) = rig.try_guest_interfaces()
            && let Some(iface) = ifaces.into_iter().find(|i| i.mac == mac)
        {
            if iface.name == want {
                return t0.elapsed();
            }
            last = Some(iface.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "the guest names {mac} {last:?}, not {want}, after {PLUG:?}\n--- console ---\n{}",
        rig.console_tail(30)
    );
}

/// Waits until the guest reports `address` on the NIC with `mac`.
fn wait_guest_address(rig: &Rig, mac: &str, address: &str) {
    assert!(
        rig.wait_guest_address(mac, address, PLUG),
        "the guest never got {address} on {mac}\n--- console ---\n{}",
        rig.console_tail(30)
    );
}

/// What systemd-networkd says of link `name`: its state file, which names
/// the `.network` file it applied (empty while networkd has not written one).
fn networkd_link_state(rig: &Rig, name: &str) -> String {
    let (_, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!("cat /run/systemd/netif/links/$(cat /sys/class/net/{name}/ifindex) 2>/dev/null"),
    ]);
    out
}

#[test]
fn debian_names_hot_plugged_nics_by_their_placement() {
    if !support::require_root() {
        return;
    }
    let rig = debian_rig();
    let (code, out) = rig.guest_exec(&["/bin/sh", "-c", "ls /sys/class/net"]);
    assert_eq!(code, 0);
    rig.log(&format!("guest links before any plug: {}", out.trim()));
    // What systemd still does when the agent answers (for docs/testing.md).
    let (_, jobs) = rig.guest_exec(&["/bin/sh", "-c", "systemctl list-jobs 2>&1"]);
    eprintln!("guest: systemd jobs when the agent first answers:\n{jobs}");

    let mut nicplug = Nicplug::new(&rig, &[]);
    // No periodic guest refresh within the test: the udev name must reach
    // the status through the look nicplug takes after the confirmation.
    nicplug.args = vec!["--guest-refresh".into(), "600s".into()];
    nicplug.start();
    // Three networks in the spec; the pod interfaces of the first and the
    // third appear (the second's never does): they go on root ports 1 and 3,
    // so the guest calls them enp1s0 and enp3s0.
    let spec = ["red", "green", "blue"];
    nicplug.set_spec(&spec);
    // red is dual-stack: networkd takes IPv6 from nicplug's router
    // advertisements (M flag) and DHCPv6.
    let red_net = CniNet::dual_stack(50);
    let blue_net = CniNet::new(52);
    let capture = NodeCapture::start(&rig.node_ns);
    let mut macs = Vec::new();
    for (network, net, port) in [("blue", &blue_net, 3), ("red", &red_net, 1)] {
        let t0 = Instant::now();
        let cni = rig.cni_add(net, &pod_iface(network));
        nicplug.wait_phase(network, Phase::Attached, PLUG);
        let attached = t0.elapsed();
        let want = format!("enp{port}s0");
        let named = wait_guest_name(&rig, &cni.mac, &want);
        eprintln!(
            "timing: {network}: pod interface -> Attached {attached:?}, guest reports it as {want} {:?} later",
            named
        );
        let entry = nicplug.entry(network).unwrap();
        assert_eq!(entry["pciAddress"], format!("0000:{port:02x}:00.0"));
        // systemd-networkd takes the new NIC with the rig's .network file.
        let t1 = Instant::now();
        loop {
            let state = networkd_link_state(&rig, &want);
            if state.contains("NETWORK_FILE=/etc/systemd/network/50-dhcp-en.network") {
                break;
            }
            assert!(
                t1.elapsed() < PLUG,
                "networkd never configured {want}: {state}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "timing: {network}: {want} named -> systemd-networkd applied its .network {:?}",
            t1.elapsed()
        );
        // networkd asks DHCP on its own and gets the pod interface's address
        // from nicplug's server.
        let address = cni.ips[0].split('/').next().unwrap().to_string();
        wait_guest_address(&rig, &cni.mac, &address);
        eprintln!(
            "timing: {network}: Attached -> the guest holds its DHCP address {address} {:?}",
            t0.elapsed() - attached
        );
        let dhcp = &nicplug.entry(network).unwrap()["dhcp"];
        assert_eq!(dhcp["served"], true, "{dhcp}");
        assert_eq!(dhcp["address"], cni.ips[0], "{dhcp}");
        assert!(
            rig.ping_from_node(net, &address),
            "ping {address} over {want}"
        );
        if net.ipv6 {
            let cidr6 = cni
                .ips
                .iter()
                .find(|ip| ip.contains(':'))
                .unwrap_or_else(|| panic!("no IPv6 in {:?}", cni.ips));
            let address6 = cidr6.split('/').next().unwrap().to_string();
            wait_guest_address(&rig, &cni.mac, &address6);
            eprintln!(
                "timing: {network}: Attached -> the guest holds its DHCPv6 address {address6} {:?}",
                t0.elapsed() - attached
            );
            let (_, routes) =
                rig.guest_exec(&["/bin/sh", "-c", &format!("ip -6 route show dev {want}")]);
            eprintln!("guest: IPv6 routes of {want}:\n{routes}");
            // The default router is the pod link's gateway, from the
            // advertisement nicplug sent for it.
            assert!(
                routes.contains(&format!("default via {}", net.addr6(1))),
                "no default route via the gateway on {want}:\n{routes}"
            );
            let mut dhcp = nicplug.entry(network).unwrap()["dhcp"].clone();
            let t2 = Instant::now();
            while dhcp["ipv6LastLease"].is_null() && t2.elapsed() < PLUG {
                std::thread::sleep(Duration::from_millis(100));
                dhcp = nicplug.entry(network).unwrap()["dhcp"].clone();
            }
            assert_eq!(dhcp["ipv6Address"], cidr6.as_str(), "{dhcp}");
            assert!(dhcp["ipv6LastLease"]["time"].is_string(), "{dhcp}");
            assert!(
                rig.ping_from_node(net, &address6),
                "ping {address6} over {want}"
            );
            // SIGKILL and restart: the new nicplug derives the same IPv6
            // lease and server identity from the record; networkd, made to
            // ask again from scratch, gets the same address.
            nicplug.kill();
            nicplug.start();
            nicplug.wait_phase(network, Phase::Ready, PLUG);
            let (code, out) =
                rig.guest_exec(&["/bin/sh", "-c", &format!("networkctl reconfigure {want}")]);
            assert_eq!(code, 0, "{out}");
            let t3 = Instant::now();
            loop {
                let dhcp = &nicplug.entry(network).unwrap()["dhcp"];
                if dhcp["ipv6LastLease"]["time"].is_string() {
                    assert_eq!(dhcp["ipv6Address"], cidr6.as_str(), "{dhcp}");
                    break;
                }
                assert!(
                    t3.elapsed() < PLUG,
                    "no IPv6 lease after the restart: {dhcp}\n{}",
                    nicplug.log_tail(30)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            wait_guest_address(&rig, &cni.mac, &address6);
            eprintln!(
                "timing: {network}: after a restart, networkctl reconfigure -> DHCPv6 lease again {:?}",
                t3.elapsed()
            );
            let (code, metrics) = nicplug.api("/metrics", PLUG).unwrap();
            assert_eq!(code, 200);
            let counter = format!("nicplug_dhcpv6_leases_total{{network=\"{network}\"}} ");
            let leases: u64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&counter))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {counter}in {metrics}"));
            assert!(leases >= 1, "{metrics}");
        }
        macs.push((network, cni.mac, want));
    }
    // The status shows the guest's name once the guest agent reports it:
    // Ready may come while the NIC is still `eth<N>` (udev renames it a
    // moment later); nicplug asks the guest once more a little after the
    // confirmation (`agent::guest::RENAME_LOOKS`).
    nicplug.wait_phase("red", Phase::Ready, PLUG);
    let t0 = Instant::now();
    while nicplug.entry("red").unwrap()["interfaceName"] != "enp1s0" {
        assert!(
            t0.elapsed() < PLUG,
            "status never says enp1s0: {:?}",
            nicplug.entry("red")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "timing: red Ready -> status interfaceName enp1s0 {:?}",
        t0.elapsed()
    );

    // nicplug's servers answer through the taps only: nothing of theirs
    // (DHCPv4, DHCPv6, router advertisements) reached the node side.
    let frames = capture.stop();
    assert_eq!(dhcp_server_frames(&frames), Vec::<String>::new());

    // Unplug blue and plug it again: the same port, the same name.
    nicplug.set_spec_states(&[("red", "up"), ("green", "up"), ("blue", "absent")]);
    nicplug.wait_phase("blue", Phase::Detached, PLUG);
    let (_, blue_mac, _) = &macs[0];
    assert!(rig.wait_guest_mac_gone(blue_mac, PLUG));
    nicplug.set_spec(&spec);
    nicplug.wait_phase("blue", Phase::Attached, PLUG);
    wait_guest_name(&rig, blue_mac, "enp3s0");
    // Where the boot's time went (kernel vs. userspace).
    let (_, analyze) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        "systemd-analyze 2>&1; systemd-analyze blame 2>&1 | head -n 8",
    ]);
    eprintln!("guest boot (systemd-analyze):\n{analyze}");
    assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
}
