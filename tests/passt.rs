//! End-to-end: a NIC on KubeVirt's passt binding plugin, hot-plugged into
//! the rig's running VM on the pod network (`eth0`, as the node's primary
//! CNI made it). libvirt starts passt in the pod for the device; the guest
//! takes passt's DHCP lease (the pod's own address) and reaches the node
//! side through passt's sockets, and the node reaches the guest through
//! passt's port forwards. Needs root; see docs/testing.md.

mod e2e;
mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nicplug::plan::Phase;
use serde_json::{Value, json};

use e2e::*;
use support::{CniNet, Rig, RigOptions};

const WAIT: Duration = Duration::from_secs(60);
/// The pod network, as KubeVirt names it.
const NETWORK: &str = "default";
/// The port the guest listens on, forwarded by passt.
const FORWARDED: u16 = 7001;

/// The udhcpc script of the guest: configures what passt's DHCP server
/// hands out (the pod's address and its gateway).
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "$router" dev "$interface"
    ;;
esac
"#;

/// The node-side host the guest connects to: on the pod network's node
/// bridge, not the gateway (passt maps the gateway's address to the pod
/// itself).
const NODE_HOST: u8 = 254;

/// Gives the guest NIC with `mac` passt's lease; returns the guest's name
/// of the NIC and the address it got.
fn lease_through_passt(rig: &Rig, mac: &str) -> Result<(String, String), String> {
    let guest = rig
        .wait_guest_mac(mac, Duration::from_secs(20))
        .ok_or_else(|| format!("the guest does not report {mac}"))?;
    let script = format!(
        "cat > /tmp/passt-udhcpc.sh <<'EOF'\n{UDHCPC_SCRIPT}EOF\nchmod +x /tmp/passt-udhcpc.sh; \
         ip link set {0} up; udhcpc -i {0} -s /tmp/passt-udhcpc.sh -n -q -t 10 -T 1 </dev/null >/tmp/passt-udhcpc.log 2>&1; \
         echo exit=$?; ip -4 -o addr show dev {0}",
        guest.name
    );
    let (_, out) = rig.guest_exec(&["/bin/sh", "-c", &script]);
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .ok_or_else(|| format!("udhcpc on {} got no lease from passt: {out}", guest.name))?;
    Ok((guest.name, addr))
}

/// The guest opens a TCP connection to the node-side host and sends a
/// line: what the host received.
fn guest_to_node(rig: &Rig, net: &CniNet, port: u16) -> Result<String, String> {
    let mut listen = rig.node_cmd("/bin/busybox");
    listen
        .args(["timeout", "15", "nc", "-l", "-p", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let listener = listen.spawn().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let (code, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!(
            "echo hello-from-the-guest | nc -w 3 {} {port}; echo exit=$?",
            net.addr(NODE_HOST)
        ),
    ]);
    let got = listener.wait_with_output().map_err(|e| e.to_string())?;
    let received = String::from_utf8_lossy(&got.stdout).into_owned();
    if received.contains("hello-from-the-guest") {
        Ok(received)
    } else {
        Err(format!(
            "the node host received {received:?} ({}); the guest's nc: {code} {out}",
            String::from_utf8_lossy(&got.stderr)
        ))
    }
}

/// The node connects to the pod's address at `port`; passt forwards it to
/// the guest, where `nc -l` answers.
fn node_to_guest(rig: &Rig, pod_addr: &str, port: u16) -> Result<(), String> {
    let (code, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!(
            "(echo hello-from-the-guest | timeout 15 nc -l -p {port} > /tmp/passt-in.txt 2>&1 &) ; echo started"
        ),
    ]);
    if code != 0 {
        return Err(format!("guest listener: {out}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut connect = rig.node_cmd("/bin/busybox");
    connect.args(["sh", "-c"]).arg(format!(
        "echo hello-from-the-node | /bin/busybox nc -w 3 {pod_addr} {port}"
    ));
    let out = support::util::output(&mut connect);
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let got = rig
        .guest_exec(&["/bin/sh", "-c", "cat /tmp/passt-in.txt"])
        .1;
    if answer.contains("hello-from-the-guest") && got.contains("hello-from-the-node") {
        Ok(())
    } else {
        Err(format!(
            "node got {answer:?} ({}), guest got {got:?}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The rig's VMI with its pod network on the passt plugin, in `state`,
/// forwarding [`FORWARDED`] (explicit ports: passt's "every port" needs
/// about 131,000 sockets, above this machine's open-file limit of 20,000).
fn spec(rig: &Rig, state: &str) -> Value {
    let mut doc = vmi_doc_states(rig, &[]);
    doc["spec"]["domain"]["devices"]["interfaces"][0] = json!({
        "name": NETWORK,
        "binding": {"name": "passt"},
        "ports": [{"name": "echo", "port": FORWARDED}],
        "state": state,
    });
    doc
}

/// The rig's VMI without its pod network's interface.
fn spec_without_pod_network(rig: &Rig) -> Value {
    let mut doc = vmi_doc_states(rig, &[]);
    doc["spec"]["domain"]["devices"]["interfaces"] = json!([]);
    doc["spec"]["networks"] = json!([]);
    doc
}

/// The pod with its pod network: `eth0` from the node's primary CNI, and
/// the node-side host the guest talks to. Returns the network and the pod's
/// address.
fn pod_with_pod_network(rig: &Rig, index: u8) -> (CniNet, String) {
    let net = CniNet::pod_network(index);
    let added = rig.cni_add(&net, "eth0");
    rig.node_ip(&[
        "addr",
        "add",
        &format!("{}/24", net.addr(NODE_HOST)),
        "dev",
        &net.bridge,
    ]);
    let addr = added.ips[0].split('/').next().unwrap().to_string();
    (net, addr)
}

/// The passt processes libvirt runs for the rig's domain (their pid files,
/// under the rig's private `/run/libvirt`), alive.
fn passt_pids(rig: &Rig) -> Vec<i32> {
    let dir = rig.dir.join("run/qemu/passt");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return vec![];
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|text| text.trim().parse().ok())
        .filter(|pid: &i32| Path::new(&format!("/proc/{pid}")).exists())
        .collect()
}

/// Whether process `pid` ends within `timeout`.
fn wait_process_gone(pid: i32, timeout: Duration) -> bool {
    support::poll(timeout, Duration::from_millis(50), || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .is_some()
}

/// The guest's count of carrier changes on the NIC with `mac`.
fn carrier_changes(rig: &Rig, mac: &str) -> u64 {
    let guest = rig
        .wait_guest_mac(mac, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the guest does not report {mac}"));
    let (_, out) = rig.guest_exec(&[
        "/bin/cat",
        &format!("/sys/class/net/{}/carrier_changes", guest.name),
    ]);
    out.trim().parse().unwrap_or(0)
}

/// The live link state of the passt device.
fn device_link_up(rig: &Rig) -> Option<bool> {
    nicplug::hypervisor::domain_xml::parse_devices(&rig.domain_xml())
        .unwrap()
        .interfaces
        .iter()
        .find(|i| i.is_passt())
        .map(|i| i.link_up)
}

/// The live domain's passt devices.
fn passt_devices(rig: &Rig) -> usize {
    nicplug::hypervisor::domain_xml::parse_devices(&rig.domain_xml())
        .unwrap()
        .interfaces
        .iter()
        .filter(|i| i.is_passt())
        .count()
}

/// The guest reaches the node both ways through passt: its lease is the
/// pod's address, it connects out to the node-side host, and the node
/// connects in to the pod's forwarded port.
fn traffic_both_ways(rig: &Rig, net: &CniNet, pod_addr: &str, mac: &str) -> Result<(), String> {
    let (_, leased) = lease_through_passt(rig, mac)?;
    if leased != pod_addr {
        return Err(format!("passt leased {leased}, not the pod's {pod_addr}"));
    }
    guest_to_node(rig, net, 7000)?;
    node_to_guest(rig, pod_addr, FORWARDED)
}

#[test]
fn a_passt_nic_is_hot_plugged_carries_traffic_both_ways_and_leaves_the_pod_as_cni_made_it() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let (net, pod_addr) = pod_with_pod_network(&rig, 72);
    let cni_made = rig.pod_links_snapshot();
    // `nicplug plan` first: the attach of a passt device, nothing changed.
    let plan_vmi = rig.dir.join("passt-vmi.json");
    std::fs::write(&plan_vmi, spec(&rig, "up").to_string()).unwrap();
    let planned = rig
        .pod_cmd(nicplug_binary().to_str().unwrap())
        .args(["plan", "--vmi"])
        .arg(&plan_vmi)
        .args(["--libvirt-uri", &rig.libvirt_uri])
        .env_remove("NICPLUG_LOG")
        .output()
        .unwrap();
    let planned_text = String::from_utf8_lossy(&planned.stdout).into_owned();
    assert_eq!(
        planned.status.code(),
        Some(2),
        "not converged: {planned_text}"
    );
    assert!(
        planned_text.contains("attach-device") && planned_text.contains("passt on eth0"),
        "{planned_text}"
    );
    assert_eq!(passt_devices(&rig), 0);
    assert_eq!(rig.pod_links_snapshot(), cni_made);
    let mut nicplug = nicplug_with_network_status(&rig);
    nicplug.start();
    nicplug.write_vmi(&spec(&rig, "up"));
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    let entry = nicplug.entry(NETWORK).unwrap();
    assert_eq!(entry["podInterfaceName"], "eth0", "{entry}");
    let mac = entry["mac"].as_str().unwrap().to_string();
    assert!(entry.get("uplink").is_none(), "{entry}");
    let reason = entry["dhcp"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("passt serves"), "{entry}");
    // KubeVirt's rendering; passt started by libvirt; nothing of nicplug's.
    let xml = rig.domain_xml();
    assert!(xml.contains("<backend type='passt'"), "{xml}");
    assert!(xml.contains("<source dev='eth0'/>"), "{xml}");
    assert_eq!(passt_devices(&rig), 1);
    let passt = passt_pids(&rig);
    assert_eq!(passt.len(), 1, "one passt for the device: {passt:?}");
    let (_, metrics) = nicplug.api("/metrics", WAIT).unwrap();
    assert!(
        metrics.contains("nicplug_interfaces{phase=\"Ready\"} 1"),
        "{metrics}"
    );
    traffic_both_ways(&rig, &net, &pod_addr, &mac)
        .unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

    // Unplug: the device goes, libvirt stops its passt, the pod is as CNI
    // made it (passt's port listeners went with it).
    nicplug.write_vmi(&spec(&rig, "absent"));
    nicplug.wait_phase(NETWORK, Phase::Detached, WAIT);
    assert!(
        rig.wait_guest_mac_gone(&mac, WAIT),
        "the guest still has {mac}"
    );
    assert_eq!(passt_devices(&rig), 0);
    assert!(
        wait_process_gone(passt[0], Duration::from_secs(5)),
        "passt {} still runs",
        passt[0]
    );
    assert_eq!(rig.pod_links_snapshot(), cni_made);

    // And back, with the same MAC.
    nicplug.write_vmi(&spec(&rig, "up"));
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    assert_eq!(nicplug.entry(NETWORK).unwrap()["mac"], mac.as_str());
    traffic_both_ways(&rig, &net, &pod_addr, &mac)
        .unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

    // Leaving the spec: detached, the entry goes, passt with it.
    let passt = passt_pids(&rig);
    nicplug.write_vmi(&spec_without_pod_network(&rig));
    nicplug.wait_gone(NETWORK, WAIT);
    assert_eq!(passt_devices(&rig), 0);
    assert!(
        passt
            .iter()
            .all(|pid| wait_process_gone(*pid, Duration::from_secs(5)))
    );
    assert_eq!(rig.pod_links_snapshot(), cni_made);
}

#[test]
fn a_device_kubevirt_rendered_is_adopted_and_a_restart_plugs_no_second() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let (net, pod_addr) = pod_with_pod_network(&rig, 73);
    let mac = "02:6b:76:00:00:73";
    // As KubeVirt's passt sidecar renders it at VM start (its portForward
    // `dev`, which this passt refuses, left out; see docs/design.md).
    let device = format!(
        "<interface type='user'><alias name='ua-{NETWORK}'/><model type='virtio-non-transitional'/><mac address='{mac}'/><source dev='eth0'/><backend type='passt'/><portForward proto='tcp'><range start='{FORWARDED}'/></portForward></interface>"
    );
    rig.attach_live("kubevirt-passt.xml", &device);
    let mut nicplug = nicplug_with_network_status(&rig);
    nicplug.start();
    nicplug.write_vmi(&spec(&rig, "up"));
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    assert_eq!(nicplug.entry(NETWORK).unwrap()["mac"], mac);
    assert_eq!(passt_devices(&rig), 1);
    traffic_both_ways(&rig, &net, &pod_addr, mac)
        .unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

    assert_restart_adopts(&mut nicplug, NETWORK, || passt_devices(&rig));
}

#[test]
fn a_crash_right_after_the_attach_or_the_detach_converges() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let (net, pod_addr) = pod_with_pod_network(&rig, 74);
    let mut nicplug = nicplug_with_network_status(&rig);
    nicplug.env = abort_after("attach-device");
    nicplug.start();
    nicplug.write_vmi(&spec(&rig, "up"));
    abort_after_then_restart(&mut nicplug, "attach-device");
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    assert_eq!(passt_devices(&rig), 1, "{}", nicplug.log());
    assert_eq!(passt_pids(&rig).len(), 1);
    let mac = nicplug.entry(NETWORK).unwrap()["mac"]
        .as_str()
        .unwrap()
        .to_string();
    traffic_both_ways(&rig, &net, &pod_addr, &mac)
        .unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));

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
    assert_eq!(passt_devices(&rig), 0, "{}", nicplug.log());
    assert!(
        support::poll(Duration::from_secs(5), Duration::from_millis(50), || {
            passt_pids(&rig).is_empty().then_some(())
        })
        .is_some()
    );
}

#[test]
fn live_migration_moves_a_passt_nic_onto_the_target_pods_own_pod_network() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::root_launcher());
    let (net, source_addr) = pod_with_pod_network(&rig, 75);
    let mut source = nicplug_with_network_status(&rig);
    source.start();
    source.write_vmi(&spec(&rig, "up"));
    source.wait_phase(NETWORK, Phase::Ready, WAIT);
    let mac = source.entry(NETWORK).unwrap()["mac"]
        .as_str()
        .unwrap()
        .to_string();
    traffic_both_ways(&rig, &net, &source_addr, &mac)
        .unwrap_or_else(|e| panic!("{e}\n{}", source.log()));
    let source_passt = passt_pids(&rig);
    let flaps_before = carrier_changes(&rig, &mac);

    // The target pod has its own eth0 (another address of the same
    // network); libvirt starts passt there when the domain arrives.
    let target = rig.start_target();
    let target_addr = target.cni_add(&net, "eth0").ips[0]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert_ne!(target_addr, source_addr);
    let mut nicplug = nicplug_with_network_status(&target);
    nicplug.start();
    nicplug.write_vmi(&spec(&target, "up"));
    nicplug.wait_phase(NETWORK, Phase::Prepared, WAIT);
    assert!(passt_pids(&target).is_empty(), "no passt before the domain");

    let took = rig
        .migrate_to(&target, &[])
        .expect("the migration succeeds");
    eprintln!("timing: passt NIC migration (virsh migrate) {took:?}");
    nicplug.wait_phase(NETWORK, Phase::Ready, WAIT);
    assert_eq!(passt_devices(&target), 1);
    assert_eq!(
        passt_pids(&target).len(),
        1,
        "libvirt started the target's passt"
    );
    assert!(
        !nicplug.log().contains("attached mac"),
        "the target attached: {}",
        nicplug.log()
    );
    assert!(
        source_passt
            .iter()
            .all(|pid| wait_process_gone(*pid, Duration::from_secs(5))),
        "the source's passt stops with the source QEMU"
    );
    // nicplug refreshed the link (KubeVirt's link-refresh method): the
    // guest saw its carrier go and come back, so its DHCP client (here the
    // test's udhcpc, as a distribution's does on carrier up) takes the
    // target pod's address, and traffic goes through the target pod.
    let flapped = support::poll(WAIT, Duration::from_millis(100), || {
        (carrier_changes(&target, &mac) >= flaps_before + 2).then_some(())
    });
    assert!(
        flapped.is_some(),
        "no carrier flap in the guest ({flaps_before} -> {})\n{}",
        carrier_changes(&target, &mac),
        nicplug.log()
    );
    assert!(nicplug.log().contains("link refreshed after the migration"));
    assert_eq!(device_link_up(&target), Some(true), "the link is up again");
    traffic_both_ways(&target, &net, &target_addr, &mac)
        .unwrap_or_else(|e| panic!("{e}\n{}", nicplug.log()));
    assert_source_left_alone(&source, NETWORK);
    drop(nicplug);
    drop(target);
}
