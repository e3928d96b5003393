//! Helpers shared by the end-to-end suites: nicplug running in a rig's pod
//! netns, VMI documents, and checks of the pod namespace and the domain.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nicplug::plan::Phase;
use serde_json::{Value, json};

use crate::support::{CniNet, GuestIface, Rig, poll};

/// `nicplug run` in the rig's pod netns, like the sidecar in the launcher pod.
pub struct Nicplug<'a> {
    rig: &'a Rig,
    child: Option<Child>,
    pub vmi_path: PathBuf,
    pub status_path: PathBuf,
    pub log_path: PathBuf,
    pub api_socket: PathBuf,
    /// Extra `nicplug run` arguments.
    pub args: Vec<String>,
    /// Extra environment (e.g. `NICPLUG_TEST_FAULT`).
    pub env: Vec<(String, String)>,
    /// How the last process exited, once reaped (`wait_exit`, `kill`, `stop`).
    pub exit: Option<ExitStatus>,
    /// A program (and its arguments) nicplug runs under, e.g. `setpriv` to
    /// drop a capability; empty: none.
    pub prefix: Vec<String>,
}

impl<'a> Nicplug<'a> {
    pub fn new(rig: &'a Rig, networks: &[&str]) -> Self {
        let nicplug = Self {
            rig,
            child: None,
            vmi_path: rig.dir.join("vmi/vmi.json"),
            status_path: rig.dir.join("status.json"),
            log_path: rig.dir.join("nicplug.log"),
            api_socket: rig.dir.join("api/nicplug.sock"),
            args: Vec::new(),
            env: Vec::new(),
            exit: None,
            prefix: Vec::new(),
        };
        std::fs::create_dir_all(nicplug.vmi_path.parent().unwrap()).unwrap();
        nicplug.set_spec(networks);
        nicplug
    }

    /// Another instance in the same rig: the same VMI file, its own status
    /// file (`status-<tag>.json`), log (`nicplug-<tag>.log`) and API socket
    /// (`api/<tag>.sock`, beside the first one's). Does not rewrite the VMI.
    pub fn another(rig: &'a Rig, tag: &str) -> Self {
        std::fs::create_dir_all(rig.dir.join("vmi")).unwrap();
        Self {
            rig,
            child: None,
            vmi_path: rig.dir.join("vmi/vmi.json"),
            status_path: rig.dir.join(format!("status-{tag}.json")),
            log_path: rig.dir.join(format!("nicplug-{tag}.log")),
            api_socket: rig.dir.join(format!("api/{tag}.sock")),
            args: Vec::new(),
            env: Vec::new(),
            exit: None,
            prefix: Vec::new(),
        }
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let binary = nicplug_binary();
        let mut command = match self.prefix.split_first() {
            None => self.rig.sidecar_cmd(binary.to_str().unwrap()),
            Some((program, args)) => {
                let mut c = self.rig.sidecar_cmd(program);
                c.args(args).arg(&binary);
                c
            }
        };
        let child = command
            .args(["run", "--vmi"])
            .arg(&self.vmi_path)
            .args([
                "--libvirt-uri",
                &self.rig.sidecar_libvirt_uri(),
                "--status-file",
            ])
            .arg(&self.status_path)
            .arg("--api-socket")
            .arg(&self.api_socket)
            .args(&self.args)
            .env("NICPLUG_LOG", "nicplug=debug,info")
            // Plain text: the tests search the log and print it in failures.
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nicplug starts");
        self.child = Some(child);
        self.exit = None;
    }

    /// Replaces the VMI document atomically (write + rename), as a
    /// downward-API or `kubectl get -o json > tmp && mv` update would.
    pub fn write_vmi(&self, doc: &Value) {
        self.write_vmi_text(&serde_json::to_string_pretty(doc).unwrap());
    }

    pub fn write_vmi_text(&self, text: &str) {
        let tmp = self.vmi_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.vmi_path).unwrap();
    }

    pub fn set_spec(&self, networks: &[&str]) {
        self.write_vmi(&vmi_doc(self.rig, networks));
    }

    pub fn set_spec_states(&self, networks: &[(&str, &str)]) {
        self.write_vmi(&vmi_doc_states(self.rig, networks));
    }

    /// The status entry of interface `name`.
    pub fn entry(&self, name: &str) -> Option<Value> {
        self.status()?["interfaces"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == name)
            .cloned()
    }

    /// Waits until interface `name` has no status entry.
    pub fn wait_gone(&self, name: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.status().is_some() && self.entry(name).is_none() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!(
            "{name} still listed after {timeout:?}: {:?}\nnicplug log:\n{}",
            self.status(),
            self.log()
        );
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The status file; every document read is checked against the schema
    /// (`docs/status.schema.json`), so each e2e suite tests the contract.
    pub fn status(&self) -> Option<Value> {
        let doc: Value = serde_json::from_slice(&std::fs::read(&self.status_path).ok()?).ok()?;
        assert_valid_status(&doc);
        Some(doc)
    }

    pub fn phase(&self, name: &str) -> Option<Phase> {
        let doc = self.status()?;
        let entry = doc["interfaces"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == name)?
            .clone();
        serde_json::from_value(entry["phase"].clone()).ok()
    }

    /// Waits until interface `name` is in `phase`; panics with the log tail.
    pub fn wait_phase(&self, name: &str, phase: Phase, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let now = self.phase(name);
            // Ready is Attached and confirmed by the guest: it satisfies a wait for Attached.
            if now == Some(phase) || (phase == Phase::Attached && now == Some(Phase::Ready)) {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log's length in bytes now: an offset for `log_since`.
    pub fn log_len(&self) -> usize {
        std::fs::metadata(&self.log_path)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// What the log got after `offset` (from `log_len`).
    pub fn log_since(&self, offset: usize) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(offset..).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits up to `timeout` for the process to exit by itself; reaps it and
    /// returns how it exited (`None`: still running, or never started).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                self.exit = Some(status);
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `GET path` on the API socket, the whole exchange bounded by `timeout`.
    pub fn api(&self, path: &str, timeout: Duration) -> Result<(u16, String), String> {
        api_get(&self.api_socket, path, timeout)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn signal(&mut self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the pid of a child this test spawned and has
            // not reaped yet.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        self.signal(libc::SIGTERM);
        let status = self.child.take().map(|mut c| c.wait().unwrap());
        self.exit = status.or(self.exit);
        status.is_none_or(|s| s.success())
    }

    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            self.exit = c.wait().ok();
        }
    }
}

impl Drop for Nicplug<'_> {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The status document's JSON Schema, compiled once.
fn status_schema() -> &'static jsonschema::Validator {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status.schema.json");
        let schema: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        jsonschema::validator_for(&schema).expect("docs/status.schema.json is a valid schema")
    })
}

/// What is wrong with `doc` by the schema, `None` when it is valid.
pub fn status_errors(doc: &Value) -> Option<String> {
    let errors: Vec<String> = status_schema()
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    (!errors.is_empty()).then(|| errors.join("; "))
}

/// Panics with every schema violation of `doc`.
pub fn assert_valid_status(doc: &Value) {
    if let Some(errors) = status_errors(doc) {
        panic!("status document does not match docs/status.schema.json: {errors}\n{doc:#}");
    }
}

/// The nicplug binary: cargo names it for integration tests; examples (the
/// demo) find it next to their own directory.
pub fn nicplug_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_nicplug") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|examples| examples.parent())
        .unwrap()
        .join("nicplug")
}

/// How a process exited, for messages: `exit 1`, `signal 6 (SIGABRT)`.
pub fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(6)) => "signal 6 (SIGABRT)".to_string(),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => format!("{status}"),
    }
}

/// `GET path` over a nicplug API unix socket with `nicplug::api::client`,
/// the whole exchange bounded by `timeout`: `Err` says it did not answer.
pub fn api_get(socket: &Path, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(async {
        match tokio::time::timeout(timeout, nicplug::api::client::fetch(socket, path)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!(
                "GET {path}: {} (after {:?})",
                nicplug::error::error_chain(&e),
                started.elapsed()
            )),
            Err(_) => Err(format!("GET {path}: no answer within {timeout:?}")),
        }
    })
}

/// A VMI document as `kubectl get vmi -o json` prints it: the pod network
/// (masquerade) plus a bridge-bound Multus network per name.
pub fn vmi_doc(rig: &Rig, networks: &[&str]) -> Value {
    let with_state: Vec<(&str, &str)> = networks.iter().map(|n| (*n, "up")).collect();
    vmi_doc_states(rig, &with_state)
}

/// Like [`vmi_doc`], each network with its `state` (up, down, absent).
pub fn vmi_doc_states(rig: &Rig, networks: &[(&str, &str)]) -> Value {
    vmi_doc_for(&rig.domain, networks)
}

/// Like [`vmi_doc_states`], for domain `<namespace>_<name>` without a rig.
pub fn vmi_doc_for(domain: &str, networks: &[(&str, &str)]) -> Value {
    let (namespace, name) = domain.split_once('_').unwrap();
    let mut interfaces = vec![json!({"name": "default", "masquerade": {}})];
    let mut nets = vec![json!({"name": "default", "pod": {}})];
    for (n, state) in networks {
        interfaces.push(json!({"name": n, "bridge": {}, "state": state}));
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

/// Puts `network`'s interface of `doc` (a [`vmi_doc`]) on binding plugin
/// `plugin` instead of the bridge binding.
pub fn with_binding(mut doc: Value, network: &str, plugin: &str) -> Value {
    let interfaces = doc["spec"]["domain"]["devices"]["interfaces"]
        .as_array_mut()
        .unwrap();
    let iface = interfaces
        .iter_mut()
        .find(|i| i["name"] == network)
        .and_then(Value::as_object_mut)
        .unwrap();
    iface.remove("bridge");
    iface.insert("binding".into(), json!({"name": plugin}));
    doc
}

pub fn pod_iface(network: &str) -> String {
    nicplug::model::names::hashed_pod_iface(network).to_string()
}

pub fn suffix(network: &str) -> String {
    pod_iface(network)[3..].to_string()
}

/// Aliases of the interfaces in the live domain.
pub fn device_aliases(rig: &Rig) -> Vec<String> {
    let xml = rig.domain_xml();
    nicplug::hypervisor::domain_xml::parse_devices(&xml)
        .unwrap()
        .interfaces
        .into_iter()
        .filter_map(|i| i.alias)
        .collect()
}

pub fn device_mac(rig: &Rig, alias: &str) -> Option<String> {
    let xml = rig.domain_xml();
    nicplug::hypervisor::domain_xml::parse_devices(&xml)
        .unwrap()
        .interfaces
        .into_iter()
        .find(|i| i.alias.as_deref() == Some(alias))
        .and_then(|i| i.mac.map(|m| m.to_string()))
}

/// `ip -d -j link show` of the pod netns, by name.
pub fn pod_link(rig: &Rig, name: &str) -> Option<Value> {
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

pub fn pod_addresses(rig: &Rig, name: &str) -> Vec<String> {
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
pub fn assert_plumbing(rig: &Rig, network: &str, mtu: u64) {
    let (pod, bridge, tap) = (
        pod_iface(network),
        format!("k6t-{}", suffix(network)),
        format!("tap{}", suffix(network)),
    );
    let b = pod_link(rig, &bridge).expect("bridge exists");
    assert_eq!(b["linkinfo"]["info_kind"], "bridge");
    assert!(b["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    // The pod link joins the bridge once CNI is done with it, which can be
    // just after the attach; the enslave is several netlink calls (master,
    // then learning off), so wait for all of it.
    let enslaved = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        pod_link(rig, &pod).filter(|p| {
            p["master"] == bridge.as_str()
                && p["linkinfo"]["info_slave_data"]["learning"] == false
                && p["address"] == b["address"]
        })
    });
    let p = enslaved.unwrap_or_else(|| pod_link(rig, &pod).expect("pod link keeps its name"));
    assert_eq!(p["master"], bridge.as_str());
    assert_eq!(
        p["address"], b["address"],
        "pod link carries the bridge's MAC"
    );
    assert_eq!(p["linkinfo"]["info_slave_data"]["learning"], false);
    // CNI's IPAM may still be adding its address and route when nicplug
    // has already attached; nicplug records and removes them on the next
    // pass. v2: the rig's CNI networks put a route on the pod link, which
    // the record keeps.
    let recorded = |alias: &str| alias.starts_with("nicplug/v2 ") && alias.contains(" rt=");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut addresses = pod_addresses(rig, &pod);
    let mut p = p;
    while (!addresses.is_empty() || !recorded(p["ifalias"].as_str().unwrap_or_default()))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        addresses = pod_addresses(rig, &pod);
        p = pod_link(rig, &pod).expect("pod link keeps its name");
    }
    let alias = p["ifalias"].as_str().unwrap_or_default();
    assert!(recorded(alias), "{alias}");
    assert!(
        addresses.is_empty(),
        "pod link has no addresses: {addresses:?} {p}"
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
pub fn assert_guest_reachable(rig: &Rig, net: &CniNet, mac: &str) {
    let guest = rig
        .wait_guest_mac(mac, Duration::from_secs(30))
        .expect("guest sees the MAC");
    let addr = net.addr(50);
    set_guest_address(rig, &guest.name, None, &addr);
    assert!(
        rig.ping_from_node(net, &addr),
        "node reaches the guest at {addr} over {}",
        guest.name
    );
}

/// Sets `new`/24 on the guest's `iface` (removing `old` first) and brings
/// it up, through the guest agent.
pub fn set_guest_address(rig: &Rig, iface: &str, old: Option<&str>, new: &str) {
    let del = old
        .map(|o| format!("ip addr del {o}/24 dev {iface}; "))
        .unwrap_or_default();
    let (code, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!("{del}ip addr add {new}/24 dev {iface} && ip link set {iface} up"),
    ]);
    assert_eq!(code, 0, "guest address {new} on {iface}: {out}");
}

/// The names of all links of the pod netns.
pub fn pod_link_names(rig: &Rig) -> Vec<String> {
    let out = rig.pod_cmd("ip").args(["-j", "link"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect()
}

/// Whether nicplug's plumbing of `network` is entirely gone.
pub fn assert_no_plumbing(rig: &Rig, network: &str) {
    let names = pod_link_names(rig);
    for link in [
        format!("k6t-{}", suffix(network)),
        format!("tap{}", suffix(network)),
    ] {
        assert!(!names.contains(&link), "{link} left behind: {names:?}");
    }
    if let Some(pod) = pod_link(rig, &pod_iface(network)) {
        assert!(pod.get("master").is_none(), "pod link released: {pod}");
        assert!(pod.get("ifalias").is_none(), "record removed: {pod}");
    }
}

/// [`pod_link_state`] once it holds still: the kernel adds a link's IPv6
/// link-local address when linkwatch reports its carrier, which it delays
/// up to a second (a tap QEMU just opened, a link right after a plug).
pub fn settled_pod_link_state(rig: &Rig) -> Vec<String> {
    let mut last = pod_link_state(rig);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = pod_link_state(rig);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// What nicplug could change about the pod's links, one line per link:
/// name, kind, master, MAC, MTU, alias, addresses. Leaves out what the
/// kernel changes by itself (timers, counters, DAD state).
pub fn pod_link_state(rig: &Rig) -> Vec<String> {
    let out = rig
        .pod_cmd("ip")
        .args(["-d", "-j", "addr"])
        .output()
        .unwrap();
    let links: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut lines: Vec<String> = links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let mut addrs: Vec<String> = l["addr_info"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"])
                        })
                        .collect()
                })
                .unwrap_or_default();
            addrs.sort();
            format!(
                "{} kind={} master={} mac={} mtu={} alias={} addrs={}",
                l["ifname"].as_str().unwrap_or(""),
                l["linkinfo"]["info_kind"].as_str().unwrap_or("-"),
                l["master"].as_str().unwrap_or("-"),
                l["address"].as_str().unwrap_or("-"),
                l["mtu"],
                l["ifalias"].as_str().unwrap_or("-"),
                addrs.join(",")
            )
        })
        .collect();
    lines.sort();
    lines
}

/// How many devices of the live domain have alias `ua-<name>`.
pub fn devices_named(rig: &Rig, name: &str) -> usize {
    let alias = format!("ua-{name}");
    device_aliases(rig).iter().filter(|a| **a == alias).count()
}

/// The nicplug-made links (bridges `k6t-*`, taps `tap*`) of the pod netns.
pub fn plumbing_links(rig: &Rig) -> Vec<String> {
    let mut names: Vec<String> = pod_link_names(rig)
        .into_iter()
        .filter(|n| n.starts_with("k6t-") || n.starts_with("tap"))
        .collect();
    names.sort();
    names
}

/// Exactly the bridge and tap of `networks`, nothing else and nothing twice.
pub fn expected_plumbing(networks: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = networks
        .iter()
        .flat_map(|n| [format!("k6t-{}", suffix(n)), format!("tap{}", suffix(n))])
        .collect();
    names.sort();
    names
}

/// Gives the guest NIC with `mac` the address `addr`/24 (replacing any it
/// had) and sets it up; returns the NIC.
pub fn set_guest_nic_address(rig: &Rig, mac: &str, addr: &str) -> Result<GuestIface, String> {
    let guest = rig
        .wait_guest_mac(mac, Duration::from_secs(20))
        .ok_or_else(|| format!("the guest does not report {mac}"))?;
    let (code, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!(
            "ip addr flush dev {0} && ip addr add {addr}/24 dev {0} && ip link set {0} up",
            guest.name
        ),
    ]);
    if code != 0 {
        return Err(format!("guest address {addr} on {}: {out}", guest.name));
    }
    Ok(guest)
}

/// Gives the guest NIC with `mac` the address `net.addr(host)` (replacing any
/// it had) and pings it from the node. `Err` says which part failed.
pub fn ping_guest(rig: &Rig, net: &CniNet, mac: &str, host: u8) -> Result<(), String> {
    let addr = net.addr(host);
    let guest = set_guest_nic_address(rig, mac, &addr)?;
    if rig.ping_from_node(net, &addr) {
        Ok(())
    } else {
        Err(format!(
            "node cannot ping the guest at {addr} ({})",
            guest.name
        ))
    }
}

const CARRIER_WAIT: Duration = Duration::from_secs(20);

/// Reads the guest's carrier of the NIC with `mac` through the guest agent.
pub fn guest_carrier(rig: &Rig, mac: &str) -> String {
    let guest = rig.wait_guest_mac(mac, CARRIER_WAIT).unwrap();
    let out = rig.guest_exec_full(&[
        "/bin/sh",
        "-c",
        &format!(
            "ip link set {0} up && cat /sys/class/net/{0}/carrier",
            guest.name
        ),
    ]);
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    out.stdout.trim().to_string()
}

/// Waits (up to 20 s) until the guest's carrier of the NIC with `mac` is `want`.
pub fn wait_carrier(rig: &Rig, mac: &str, want: &str) {
    let deadline = Instant::now() + CARRIER_WAIT;
    while Instant::now() < deadline {
        if guest_carrier(rig, mac) == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("guest carrier never became {want}");
}

/// `nicplug run` in a fresh, empty network namespace of its own (nothing of
/// the machine's is touched) against the libvirt socket `socket`, logging
/// to `log`: for faults where there is no rig (a wedged or missing daemon).
pub fn nicplug_in_fresh_netns(
    vmi: &Path,
    socket: &Path,
    api: &Path,
    status: &Path,
    log: std::fs::File,
) -> std::process::Command {
    let mut cmd = std::process::Command::new("unshare");
    cmd.arg("--net")
        .arg(nicplug_binary())
        .args(["run", "--vmi"])
        .arg(vmi)
        .arg("--libvirt-uri")
        .arg(format!("qemu+unix:///system?socket={}", socket.display()))
        .arg("--api-socket")
        .arg(api)
        .arg("--status-file")
        .arg(status)
        .env("NICPLUG_LOG", "nicplug=debug,info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cmd
}

/// A process's resident memory in kB (`VmRSS` of /proc/PID/status).
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// KubeVirt's bridge-binding layout for `network`, built by hand as
/// virt-handler does it (rename the pod link to `H-nic`, bridge `k6t-H`, tap
/// `tapH`). KubeVirt's dummy `podH` cannot be made: this kernel has no
/// `dummy` link type. The tap is `tap_uid`'s (QEMU's). Returns the pod link's
/// original MAC.
pub fn kubevirt_layout(rig: &Rig, net: &CniNet, network: &str, tap_uid: u32) -> String {
    let h = suffix(network);
    let cni = rig.cni_add(net, &pod_iface(network));
    let (nic, bridge, tap) = (format!("{h}-nic"), format!("k6t-{h}"), format!("tap{h}"));
    let uid = tap_uid.to_string();
    for args in [
        vec!["link", "set", &pod_iface(network), "down"],
        vec!["link", "set", &pod_iface(network), "name", &nic],
        vec!["link", "add", &bridge, "type", "bridge"],
        vec!["link", "set", &nic, "master", &bridge, "up"],
        vec!["link", "set", &bridge, "up"],
        vec![
            "tuntap", "add", "dev", &tap, "mode", "tap", "user", &uid, "vnet_hdr",
        ],
        vec!["link", "set", &tap, "master", &bridge, "up"],
    ] {
        rig.pod_ip(&args);
    }
    cni.mac
}

/// Every frame seen on every link of a namespace (AF_PACKET bound to no
/// link), on a thread that `setns`es into it, until stopped.
pub struct NodeCapture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl NodeCapture {
    pub fn start(netns: &str) -> Self {
        let path = format!("/run/netns/{netns}");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // SAFETY: plain socket(2); checked below.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            assert!(
                raw >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh descriptor owned here.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: a valid timeval of the size given.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                );
            }
            ready_tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !stopping.load(Ordering::Relaxed) {
                // SAFETY: `buf` is valid for its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        ready_rx.recv().expect("capture thread died");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for NodeCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The (sender address, sender MAC) of every ARP frame, request or reply:
/// what each frame told its receivers about who holds an address.
pub fn arp_claims(frames: &[Vec<u8>]) -> Vec<(std::net::Ipv4Addr, String)> {
    frames
        .iter()
        .filter(|f| f.get(12..14) == Some(&[0x08, 0x06][..]) && f.len() >= 42)
        .map(|f| {
            let mac = f[22..28]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            let ip = std::net::Ipv4Addr::new(f[28], f[29], f[30], f[31]);
            (ip, mac)
        })
        .collect()
}

/// What a DHCP server or a router sends: IPv4/UDP from port 67, IPv6/UDP
/// from port 547, ICMPv6 router advertisements.
pub fn dhcp_server_frames(frames: &[Vec<u8>]) -> Vec<String> {
    let from_server = |f: &&Vec<u8>| match f.get(12..14) {
        Some([0x08, 0x00]) if f.len() >= 42 && f[23] == 17 => {
            let ihl = usize::from(f[14] & 0x0f) * 4;
            f.get(14 + ihl..14 + ihl + 2) == Some(&67u16.to_be_bytes()[..])
        }
        Some([0x86, 0xdd]) if f.len() >= 58 => match f[20] {
            17 => f[54..56] == 547u16.to_be_bytes(),
            58 => f[54] == 134,
            _ => false,
        },
        _ => false,
    };
    frames
        .iter()
        .filter(from_server)
        .map(|f| {
            let mac = |b: &[u8]| {
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            };
            format!("{} -> {}", mac(&f[6..12]), mac(&f[0..6]))
        })
        .collect()
}

/// The debug build's test hook: abort right after `step`.
pub fn abort_after(step: &str) -> Vec<(String, String)> {
    vec![("NICPLUG_TEST_FAULT".into(), format!("abort-after={step}"))]
}

/// Waits for nicplug to abort after `step` (see [`abort_after`]) and
/// restarts it without the fault.
pub fn abort_after_then_restart(nicplug: &mut Nicplug<'_>, step: &str) {
    let status = nicplug
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("nicplug did not abort after {step}: {}", nicplug.log()));
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{}", nicplug.log());
    nicplug.env.clear();
    nicplug.start();
}

/// nicplug on `rig` told of Multus' network-status (CNI's done signal), with
/// the spec the test writes.
pub fn nicplug_with_network_status(rig: &Rig) -> Nicplug<'_> {
    let mut nicplug = Nicplug::new(rig, &[]);
    nicplug.args = vec![
        "--network-status".into(),
        rig.network_status_path().to_string_lossy().into_owned(),
    ];
    nicplug
}

/// A restarted nicplug finds `network`'s device (`devices` counts them) and
/// adopts it: Ready, still one device, nothing attached.
pub fn assert_restart_adopts(
    nicplug: &mut Nicplug<'_>,
    network: &str,
    devices: impl Fn() -> usize,
) {
    assert!(nicplug.stop());
    nicplug.start();
    nicplug.wait_phase(network, Phase::Ready, Duration::from_secs(60));
    assert_eq!(devices(), 1, "{}", nicplug.log());
    assert!(
        !nicplug.log().contains("attach-device"),
        "nothing attached: {}",
        nicplug.log()
    );
}

/// A migration source's nicplug after the hand-off: `network` says the
/// domain left, and nothing was detached.
pub fn assert_source_left_alone(source: &Nicplug<'_>, network: &str) {
    let left = poll(Duration::from_secs(60), Duration::from_millis(50), || {
        source
            .entry(network)
            .filter(|e| e["message"] == "the domain migrated to another pod")
    });
    assert!(
        left.is_some(),
        "{:?}\n{}",
        source.entry(network),
        source.log()
    );
    assert!(!source.log().contains("detaching"), "{}", source.log());
}
