//! End-to-end: nicplug inside a real launcher-pod rig (libvirt daemon in the
//! pod netns, TCG guest with qemu-guest-agent), pod interfaces put in by the
//! real CNI bridge plugin, as Multus would. Needs root; see docs/testing.md.

mod support;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{CniNet, Rig, RigOptions};

/// `nicplug run` in the rig's pod netns, like the sidecar in the launcher pod.
struct Nicplug<'a> {
    rig: &'a Rig,
    child: Option<Child>,
    vmi_path: PathBuf,
    status_path: PathBuf,
    log_path: PathBuf,
    starts: u32,
}

impl<'a> Nicplug<'a> {
    fn new(rig: &'a Rig, networks: &[&str]) -> Self {
        let nicplug = Self {
            rig,
            child: None,
            vmi_path: rig.dir.join("vmi/vmi.json"),
            status_path: rig.dir.join("status.json"),
            log_path: rig.dir.join("nicplug.log"),
            starts: 0,
        };
        std::fs::create_dir_all(nicplug.vmi_path.parent().unwrap()).unwrap();
        nicplug.set_spec(networks);
        nicplug
    }

    fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = self
            .rig
            .pod_cmd(env!("CARGO_BIN_EXE_nicplug"))
            .args(["run", "--vmi"])
            .arg(&self.vmi_path)
            .args(["--libvirt-uri", &self.rig.libvirt_uri, "--status-file"])
            .arg(&self.status_path)
            .env("NICPLUG_LOG", "nicplug=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nicplug starts");
        self.child = Some(child);
    }

    /// Replaces the VMI document atomically (write + rename), as a
    /// downward-API or `kubectl get -o json > tmp && mv` update would.
    fn write_vmi(&self, doc: &Value) {
        self.write_vmi_text(&serde_json::to_string_pretty(doc).unwrap());
    }

    fn write_vmi_text(&self, text: &str) {
        let tmp = self.vmi_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.vmi_path).unwrap();
    }

    fn set_spec(&self, networks: &[&str]) {
        self.write_vmi(&vmi_doc(self.rig, networks));
    }

    fn status(&self) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(&self.status_path).ok()?).ok()
    }

    fn phase(&self, name: &str) -> Option<String> {
        let doc = self.status()?;
        let entry = doc["interfaces"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == name)?
            .clone();
        entry["phase"].as_str().map(String::from)
    }

    /// Waits until interface `name` is in `phase`; panics with the log tail.
    fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.phase(name).as_deref() == Some(phase) {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!(
            "{name} not {phase} within {timeout:?}; status: {:?}\nnicplug log:\n{}",
            self.status(),
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn signal(&mut self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the pid of a child this test spawned and has
            // not reaped yet.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    fn stop(&mut self) -> bool {
        self.signal(libc::SIGTERM);
        let ok = self.child.take().map(|mut c| c.wait().unwrap().success());
        ok.unwrap_or(true)
    }

    fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for Nicplug<'_> {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A VMI document as `kubectl get vmi -o json` prints it: the pod network
/// (masquerade) plus a bridge-bound Multus network per name.
fn vmi_doc(rig: &Rig, networks: &[&str]) -> Value {
    let (namespace, name) = rig.domain.split_once('_').unwrap();
    let mut interfaces = vec![json!({"name": "default", "masquerade": {}})];
    let mut nets = vec![json!({"name": "default", "pod": {}})];
    for n in networks {
        interfaces.push(json!({"name": n, "bridge": {}}));
        nets.push(json!({"name": n, "multus": {"networkName": format!("{namespace}/{n}-nad")}}));
    }
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": namespace, "uid": "0b6d7e52-2f7c-4a8e-9d0e-1d2c3b4a5f60"},
        "spec": {
            "domain": {"devices": {"interfaces": interfaces}, "cpu": {"cores": 2}},
            "networks": nets
        },
        "status": {"phase": "Running"}
    })
}

fn pod_iface(network: &str) -> String {
    nicplug::model::names::hashed_pod_iface(network).to_string()
}

fn suffix(network: &str) -> String {
    pod_iface(network)[3..].to_string()
}

/// Aliases of the interfaces in the live domain.
fn device_aliases(rig: &Rig) -> Vec<String> {
    let xml = rig.domain_xml();
    nicplug::hypervisor::domain_xml::parse_devices(&xml)
        .unwrap()
        .interfaces
        .into_iter()
        .filter_map(|i| i.alias)
        .collect()
}

fn device_mac(rig: &Rig, alias: &str) -> Option<String> {
    let xml = rig.domain_xml();
    nicplug::hypervisor::domain_xml::parse_devices(&xml)
        .unwrap()
        .interfaces
        .into_iter()
        .find(|i| i.alias.as_deref() == Some(alias))
        .and_then(|i| i.mac.map(|m| m.to_string()))
}

/// `ip -d -j link show` of the pod netns, by name.
fn pod_link(rig: &Rig, name: &str) -> Option<Value> {
    let out = rig
        .pod_cmd("ip")
        .args(["-N", "-d", "-j", "link", "show", "dev", name])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()?.first().cloned()
}

fn pod_addresses(rig: &Rig, name: &str) -> Vec<String> {
    let out = rig
        .pod_cmd("ip")
        .args(["-j", "addr", "show", "dev", name])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| format!("{}/{}", x["local"].as_str().unwrap(), x["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

/// The plumbing of one network is exactly as specified.
fn assert_plumbing(rig: &Rig, network: &str, mtu: u64) {
    let (pod, bridge, tap) = (
        pod_iface(network),
        format!("k6t-{}", suffix(network)),
        format!("tap{}", suffix(network)),
    );
    let b = pod_link(rig, &bridge).expect("bridge exists");
    assert_eq!(b["linkinfo"]["info_kind"], "bridge");
    assert!(b["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    let p = pod_link(rig, &pod).expect("pod link keeps its name");
    assert_eq!(p["master"], bridge.as_str());
    assert_eq!(
        p["address"], b["address"],
        "pod link carries the bridge's MAC"
    );
    assert_eq!(p["linkinfo"]["info_slave_data"]["learning"], false);
    assert!(p["ifalias"].as_str().unwrap().starts_with("nicplug/v1 "));
    assert!(
        pod_addresses(rig, &pod).is_empty(),
        "pod link has no addresses"
    );
    let t = pod_link(rig, &tap).expect("tap exists");
    assert_eq!(t["master"], bridge.as_str());
    assert_eq!(t["mtu"], mtu);
    let tun = &t["linkinfo"]["info_data"];
    assert_eq!(tun["type"], "tap");
    // iproute2 prints the owner by name when it has one.
    let qemu_user = std::process::Command::new("id")
        .args(["-nu", &rig.qemu_uid().to_string()])
        .output()
        .unwrap();
    let qemu_user = String::from_utf8_lossy(&qemu_user.stdout)
        .trim()
        .to_string();
    assert!(
        tun["user"] == qemu_user.as_str() || tun["user"].as_u64() == Some(rig.qemu_uid().into()),
        "tap owned by QEMU's user {qemu_user}: {t}"
    );
    assert_eq!(tun["multi_queue"], false);
    // No KubeVirt rename, no dummy.
    assert!(pod_link(rig, &format!("{}-nic", suffix(network))).is_none());
}

/// Gives the guest NIC with `mac` a link-local address through the guest
/// agent and pings it from the node netns over the CNI bridge.
fn assert_guest_reachable(rig: &Rig, net: &CniNet, mac: &str) {
    let guest = rig
        .wait_guest_mac(mac, Duration::from_secs(30))
        .expect("guest sees the MAC");
    let addr = net.addr(50);
    let (code, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!(
            "ip addr add {addr}/24 dev {} && ip link set {} up",
            guest.name, guest.name
        ),
    ]);
    assert_eq!(code, 0, "guest address: {out}");
    assert!(
        rig.ping_from_node(net, &addr),
        "node reaches the guest at {addr} over {}",
        guest.name
    );
}

#[test]
fn hotplug_one_nic_reaches_the_guest() {
    if !support::require_root("hotplug_one_nic_reaches_the_guest") {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    nicplug.set_spec(&["dyniface1"]);
    nicplug.wait_phase("dyniface1", "Pending", Duration::from_secs(10));

    let net = CniNet::new(1);
    let created = Instant::now();
    let cni = rig.cni_add(&net, "pod9a6a0c3b4d8");
    nicplug.wait_phase("dyniface1", "Attached", Duration::from_secs(20));
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
    assert_eq!(nicplug.phase("default").as_deref(), Some("Unsupported"));
    assert_guest_reachable(&rig, &net, &cni.mac);

    // A stop leaves what was plugged in place.
    assert!(nicplug.stop(), "nicplug exits cleanly on SIGTERM");
    assert!(device_aliases(&rig).contains(&"ua-dyniface1".to_string()));
    assert!(pod_link(&rig, "tap9a6a0c3b4d8").is_some());
    assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
}

#[test]
fn hotplug_two_nics_in_one_update() {
    if !support::require_root("hotplug_two_nics_in_one_update") {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let (red, blue) = (CniNet::new(2), CniNet::new(3));
    nicplug.set_spec(&["red", "blue"]);
    let red_cni = rig.cni_add(&red, &pod_iface("red"));
    let blue_cni = rig.cni_add(&blue, &pod_iface("blue"));
    nicplug.wait_phase("red", "Attached", Duration::from_secs(20));
    nicplug.wait_phase("blue", "Attached", Duration::from_secs(20));
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
    if !support::require_root("pod_interface_before_spec_update") {
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
    nicplug.wait_phase("early", "Attached", Duration::from_secs(20));
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
    if !support::require_root("sigkill_between_plumbing_and_attach_then_restart") {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &["crash"]);
    nicplug.start();
    nicplug.wait_phase("crash", "Pending", Duration::from_secs(10));

    // Freeze the libvirt daemon: nicplug plumbs (netlink only), publishes
    // Plumbed, and then blocks in the attach call it cannot finish.
    let daemon = rig.daemon_pid();
    // SAFETY: signalling the rig's own libvirtd by its pid.
    unsafe { libc::kill(daemon, libc::SIGSTOP) };
    let net = CniNet::new(5);
    let cni = rig.cni_add(&net, &pod_iface("crash"));
    let plumbed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        nicplug.wait_phase("crash", "Plumbed", Duration::from_secs(10))
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
    nicplug.wait_phase("crash", "Attached", Duration::from_secs(20));
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
    if !support::require_root("malformed_vmi_keeps_the_last_good_spec") {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &["first"]);
    nicplug.start();
    let (first, second) = (CniNet::new(6), CniNet::new(7));
    rig.cni_add(&first, &pod_iface("first"));
    nicplug.wait_phase("first", "Attached", Duration::from_secs(20));

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
    assert_eq!(nicplug.phase("first").as_deref(), Some("Attached"));

    // A later good document is applied.
    nicplug.set_spec(&["first", "second"]);
    let cni = rig.cni_add(&second, &pod_iface("second"));
    nicplug.wait_phase("second", "Attached", Duration::from_secs(20));
    assert!(
        rig.wait_guest_mac(&cni.mac, Duration::from_secs(30))
            .is_some()
    );
}
