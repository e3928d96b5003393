//! End-to-end on the rig: the status as the guest sees it, in KubeVirt's
//! `status.interfaces` shape, through the status file, the API, `/metrics`
//! and `nicplug status`. Needs root; see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use e2e::*;
use support::{CniNet, CniResult, Rig, RigOptions};

const WAIT: Duration = Duration::from_secs(20);

/// A downward-API volume as kubelet lays it out: `annotations` ->
/// `..data/annotations`, `..data` -> a timestamped directory, replaced by
/// swapping the `..data` symlink.
struct PodInfo {
    dir: PathBuf,
    generation: u32,
}

impl PodInfo {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("..data/annotations", dir.join("annotations")).unwrap();
        Self { dir, generation: 0 }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("annotations")
    }

    /// Publishes the network-status annotation Multus would write.
    fn set_network_status(&mut self, entries: &Value) {
        self.generation += 1;
        let version = format!("..2026_11_27_22_00_00.{}", self.generation);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        let quoted = serde_json::to_string(&entries.to_string()).unwrap(); // Go's strconv.Quote of ASCII JSON
        let text =
            format!("k8s.v1.cni.cncf.io/network-status={quoted}\nkubevirt.io/domain=\"vmi\"\n");
        std::fs::write(self.dir.join(&version).join("annotations"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

fn network_status(rig: &Rig, entries: &[(&str, &CniResult)]) -> Value {
    let (namespace, _) = rig.domain.split_once('_').unwrap();
    let mut list = vec![
        json!({"name": "kindnet", "interface": "eth0", "ips": ["10.244.0.9"], "default": true, "dns": {}}),
    ];
    for (network, cni) in entries {
        list.push(json!({
            "name": format!("{namespace}/{network}-nad"),
            "interface": cni.ifname,
            "ips": cni.ips.iter().map(|ip| ip.split('/').next().unwrap()).collect::<Vec<_>>(),
            "mac": cni.mac.to_uppercase(),
            "dns": {}
        }));
    }
    Value::Array(list)
}

/// Waits until `check` holds for the status entry of `name`.
fn wait_entry(
    nicplug: &Nicplug<'_>,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(entry) = nicplug.entry(name)
            && check(&entry)
        {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {what} never held: {:?}\n{}",
            nicplug.entry(name),
            nicplug.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn api_get(socket: &Path, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(nicplug::api::client::fetch(socket, path))
        .unwrap()
}

#[test]
fn guest_status_in_kubevirts_shape_through_every_channel() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut podinfo = PodInfo::new(rig.dir.join("podinfo"));
    podinfo.set_network_status(&network_status(&rig, &[]));
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.args = vec![
        "--network-status".into(),
        podinfo.path().to_string_lossy().into_owned(),
        "--guest-refresh".into(),
        "1".into(),
    ];
    nicplug.start();
    let net = CniNet::new(30);
    nicplug.set_spec(&["purple"]);
    let cni = rig.cni_add(&net, &pod_iface("purple"));
    podinfo.set_network_status(&network_status(&rig, &[("purple", &cni)]));

    // Ready: the guest agent reports the MAC, all three sources are in.
    let entry = wait_entry(&nicplug, "purple", "Ready with every source", |e| {
        e["phase"] == "Ready" && e["infoSource"] == "domain, guest-agent, multus-status"
    });
    let guest = rig.wait_guest_mac(&cni.mac, WAIT).unwrap();
    assert_eq!(entry["interfaceName"], guest.name.as_str());
    assert_eq!(entry["mac"], cni.mac.as_str());
    assert_eq!(entry["podInterfaceName"], pod_iface("purple"));
    assert_eq!(entry["linkState"], "up");
    assert_eq!(entry["queueCount"], 1);
    let phases: Vec<&str> = entry["phaseTransitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["phase"].as_str().unwrap())
        .collect();
    assert!(
        phases.ends_with(&["Plumbed", "Attached", "Ready"]),
        "{phases:?} {entry}"
    );
    assert!(entry["podInterfaceSeen"]["monotonicNs"].as_u64().unwrap() > 0);

    // The address configured in the guest shows up, and so does a change.
    let first = net.addr(50);
    set_guest_address(&rig, &guest.name, None, &first);
    wait_entry(&nicplug, "purple", "guest IP", |e| {
        e["ipAddress"] == first.as_str()
    });
    let second = net.addr(51);
    set_guest_address(&rig, &guest.name, Some(&first), &second);
    let entry = wait_entry(&nicplug, "purple", "changed guest IP", |e| {
        e["ipAddresses"] == json!([second])
    });
    assert_eq!(entry["ipAddress"], second.as_str());

    // The API serves the same document; health and readiness.
    let (code, body) = api_get(&nicplug.api_socket, "/status");
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(
        doc["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "purple" && i["phase"] == "Ready")
    );
    assert_eq!(doc["guestAgentConnected"], true);
    assert_eq!(api_get(&nicplug.api_socket, "/healthz").0, 200);
    assert_eq!(api_get(&nicplug.api_socket, "/readyz").0, 200);
    assert_eq!(api_get(&nicplug.api_socket, "/nope").0, 404);

    // /metrics parses and the plug histograms have samples.
    let (code, body) = api_get(&nicplug.api_socket, "/metrics");
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    for stage in ["plumbed", "attached", "ready"] {
        let samples = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "nicplug_plug_stage_seconds" && s.labels.get("stage") == Some(stage)
            })
            .unwrap_or_else(|| panic!("no {stage} histogram:\n{body}"));
        let prometheus_parse::Value::Histogram(buckets) = &samples.value else {
            panic!("{stage} is not a histogram")
        };
        assert_eq!(
            buckets.last().unwrap().count,
            1.0,
            "{stage}: one plug observed"
        );
    }

    // `nicplug status`: the table a person reads.
    let out = std::process::Command::new(nicplug_binary())
        .args(["status", "--socket"])
        .arg(&nicplug.api_socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    // The agent's header first, then the table's.
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .contains("   libvirt ok   netlink ok   spec ok   "),
        "{table}"
    );
    let header = table
        .lines()
        .find(|l| l.starts_with("NAME "))
        .expect("the table's header");
    for column in [
        "NAME",
        "POD IFACE",
        "GUEST IFACE",
        "MAC",
        "IPS",
        "LINK",
        "PHASE",
        "AGE",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("purple"))
        .expect("a row for purple");
    for cell in [
        pod_iface("purple").as_str(),
        guest.name.as_str(),
        cni.mac.as_str(),
        second.as_str(),
        "up",
        "Ready",
    ] {
        assert!(row.contains(cell), "{cell} missing in {row}");
    }
    let out = std::process::Command::new(nicplug_binary())
        .args(["status", "-o", "json", "--socket"])
        .arg(&nicplug.api_socket)
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["interfaces"][1]["name"], "purple");

    // After the unplug the entry goes.
    nicplug.set_spec(&[]);
    nicplug.wait_gone("purple", WAIT);
    let (_, body) = api_get(&nicplug.api_socket, "/metrics");
    assert!(
        body.contains("nicplug_unplug_stage_seconds_count{stage=\"cleaned\"} 1"),
        "{body}\nnicplug log:\n{}",
        nicplug.log()
    );
}

/// Runs `script` in the background in the guest (it takes the guest agent
/// away) and waits for "teal" to be Attached, saying the agent is gone.
fn agent_lost_by(rig: &Rig, nicplug: &Nicplug<'_>, script: &str) {
    let (code, out) = rig.guest_exec(&["/bin/sh", "-c", &format!("({script}) >/dev/null 2>&1 &")]);
    assert_eq!(code, 0, "{out}");
    let entry = wait_entry(nicplug, "teal", "Attached without agent", |e| {
        e["phase"] == "Attached"
    });
    let message = entry["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("guest agent is not connected"),
        "{entry}"
    );
}

#[test]
fn guest_agent_going_away_and_coming_back() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &["teal"]);
    nicplug.start();
    let cni = rig.cni_add(&CniNet::new(31), &pod_iface("teal"));
    nicplug.wait_phase("teal", Phase::Ready, WAIT);
    assert!(rig.wait_guest_mac(&cni.mac, WAIT).is_some());

    // Stop the guest's agent for 8 s: freeze its restart loop, kill it.
    // The sleep lets guest-exec-status collect this command before the agent dies.
    let script = "sleep 1; pid=$(cat /run/qemu-ga.pid); loop=$(cut -d' ' -f4 /proc/$pid/stat); \
                  kill -STOP $loop; kill $pid; sleep 8; kill -CONT $loop";
    agent_lost_by(&rig, &nicplug, script);
    assert_eq!(nicplug.status().unwrap()["guestAgentConnected"], false);

    // The agent is back: Ready again, without any other trigger.
    wait_entry(&nicplug, "teal", "Ready again", |e| e["phase"] == "Ready");
    assert!(nicplug.log().contains("guest agent not available"));
}

/// A frozen guest agent (SIGSTOP: its channel stays open, and libvirt's
/// command gets no answer for as long as it waits): nicplug keeps
/// answering, says the agent is not connected, tries again with a backoff
/// rather than ten times a second, and is Ready again once the agent runs.
#[test]
fn a_frozen_guest_agent_costs_a_handful_of_passes() {
    if !support::require_root() {
        return;
    }
    const FROZEN_FOR: Duration = Duration::from_secs(6);
    let rig = Rig::start(RigOptions::default());
    let mut nicplug = Nicplug::new(&rig, &["teal"]);
    nicplug.args = vec!["--guest-refresh".into(), "2s".into()];
    nicplug.start();
    rig.cni_add(&CniNet::new(31), &pod_iface("teal"));
    nicplug.wait_phase("teal", Phase::Ready, WAIT);
    let script = "sleep 1; pid=$(cat /run/qemu-ga.pid); kill -STOP $pid; sleep 14; kill -CONT $pid";
    agent_lost_by(&rig, &nicplug, script);
    let logged = nicplug.log().len();
    std::thread::sleep(FROZEN_FOR);
    let (code, body) = api_get(&nicplug.api_socket, "/healthz");
    assert_eq!(code, 200, "{body}");
    let log = nicplug.log();
    let passes = log[logged..]
        .lines()
        .filter(|l| l.trim_end().ends_with(": reconcile"))
        .count();
    eprintln!("frozen guest agent: {passes} reconcile passes in {FROZEN_FOR:?}");
    assert!(
        passes <= 20,
        "{passes} reconcile passes in {FROZEN_FOR:?} of a frozen guest agent (a backoff, not ten a second)"
    );
    wait_entry(&nicplug, "teal", "Ready again", |e| e["phase"] == "Ready");
}
