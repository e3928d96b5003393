//! End-to-end in KubeVirt's non-root launcher shape (issue 11 §1): the pod's
//! libvirt daemon runs as uid/gid 107 in session mode, so QEMU runs as 107;
//! nicplug runs as the injected sidecar does (`deploy/cluster/policy.yaml`): uid/gid
//! 107, no supplementary groups, no-new-privs, exactly `CAP_NET_ADMIN` and `CAP_NET_RAW`, the
//! libvirt socket directory mounted read-only at `/var/run/libvirt`, the URI
//! the policy passes, a writable runtime directory for `XDG_*`. The core
//! cases of the root suites, in this mode: a plug with ping and Ready, link
//! down/up, an unplug back to the pod namespace CNI made. Needs root (to
//! build the rig); see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::time::{Duration, Instant};

use e2e::*;
use support::{CniNet, NONROOT_ID, Rig, RigOptions};

const PLUG: Duration = Duration::from_secs(20);

/// CAP_NET_ADMIN is bit 12, CAP_NET_RAW bit 13: what deploy/ gives the sidecar.
const SIDECAR_CAPS: u64 = (1 << 12) | (1 << 13);

fn non_root_rig() -> Rig {
    Rig::start(RigOptions {
        non_root: true,
        ..RigOptions::default()
    })
}

/// `/proc/<pid>/status` fields of a process, as text.
fn proc_status(pid: u32) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn caps(status: &std::collections::HashMap<String, String>, set: &str) -> u64 {
    u64::from_str_radix(&status[set], 16).unwrap()
}

/// libvirtd, QEMU and nicplug run with the ids and capabilities of the
/// non-root launcher and the injected sidecar.
fn assert_shape(rig: &Rig, nicplug: &Nicplug<'_>) {
    let id = NONROOT_ID.to_string();
    let daemon = proc_status(rig.daemon_pid() as u32);
    assert!(
        daemon["Uid"].split_whitespace().all(|u| u == id),
        "libvirtd uids {}",
        daemon["Uid"]
    );
    assert_eq!(caps(&daemon, "CapEff"), 0, "libvirtd has no capabilities");
    assert_eq!(
        (rig.qemu_uid(), rig.qemu_gid()),
        (NONROOT_ID, NONROOT_ID),
        "QEMU runs as 107"
    );
    let me = proc_status(nicplug.pid().expect("nicplug runs"));
    assert!(
        me["Name"].starts_with("nicplug"),
        "the pid is nicplug's: {}",
        me["Name"]
    );
    assert!(
        me["Uid"].split_whitespace().all(|u| u == id),
        "nicplug uids {}",
        me["Uid"]
    );
    assert!(
        me["Gid"].split_whitespace().all(|g| g == id),
        "nicplug gids {}",
        me["Gid"]
    );
    assert_eq!(me["Groups"], "", "no supplementary groups");
    assert_eq!(me["NoNewPrivs"], "1");
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(
            caps(&me, set),
            SIDECAR_CAPS,
            "{set} is exactly CAP_NET_ADMIN and CAP_NET_RAW"
        );
    }
}

/// `nicplug status -o json` as the probe runs it: inside the sidecar.
fn status_in_sidecar(rig: &Rig, nicplug: &Nicplug<'_>) -> serde_json::Value {
    let out = rig
        .sidecar_cmd(nicplug_binary().to_str().unwrap())
        .args(["status", "-o", "json", "--socket"])
        .arg(&nicplug.api_socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nicplug status in the sidecar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn nonroot_hotplug_reaches_the_guest_and_goes_ready() {
    if !support::require_root() {
        return;
    }
    let rig = non_root_rig();
    let mut nicplug = Nicplug::new(&rig, &["dyniface1"]);
    nicplug.start();
    nicplug.wait_phase("dyniface1", Phase::Pending, PLUG);
    assert_shape(&rig, &nicplug);

    let net = CniNet::new(1);
    let created = Instant::now();
    let cni = rig.cni_add(&net, &pod_iface("dyniface1"));
    nicplug.wait_phase("dyniface1", Phase::Attached, PLUG);
    let attached = created.elapsed();
    nicplug.wait_phase("dyniface1", Phase::Ready, PLUG);
    eprintln!(
        "timing (non-root launcher): pod interface -> Attached {attached:?}, -> Ready {:?}",
        created.elapsed()
    );
    assert_eq!(
        device_mac(&rig, "ua-dyniface1").as_deref(),
        Some(cni.mac.as_str())
    );
    assert!(
        rig.domain_config_xml().contains("ua-dyniface1"),
        "persisted (LIVE|CONFIG)"
    );
    // Tap owned by QEMU's 107, found without --tap-owner.
    assert_plumbing(&rig, "dyniface1", 1500);
    assert_guest_reachable(&rig, &net, &cni.mac);

    let (code, body) = nicplug.api("/readyz", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200, "/readyz: {body}");
    let status = status_in_sidecar(&rig, &nicplug);
    let entry = status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "dyniface1")
        .cloned()
        .unwrap_or_else(|| panic!("dyniface1 in {status}"));
    assert_eq!(entry["phase"], "Ready", "{entry}");
    assert_eq!(entry["mac"], cni.mac.as_str());

    // The socket directory is read-only in the sidecar, and nothing else of the
    // launcher is writable to it.
    let out = rig
        .sidecar_cmd("/bin/sh")
        .args(["-c", "touch /var/run/libvirt/nicplug-was-here"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the libvirt socket directory is read-only"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(nicplug.stop(), "nicplug exits cleanly on SIGTERM");
    assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
}

#[test]
fn nonroot_link_state_and_unplug_back_to_the_pre_plug_pod() {
    if !support::require_root() {
        return;
    }
    let rig = non_root_rig();
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let net = CniNet::new(13);
    let before_plug = rig.pod_links_snapshot();
    nicplug.set_spec(&["yellow"]);
    let cni = rig.cni_add(&net, &pod_iface("yellow"));
    nicplug.wait_phase("yellow", Phase::Ready, PLUG);
    assert_shape(&rig, &nicplug);
    wait_carrier(&rig, &cni.mac, "1");

    nicplug.set_spec_states(&[("yellow", "down")]);
    wait_carrier(&rig, &cni.mac, "0");
    assert_eq!(nicplug.entry("yellow").unwrap()["linkState"], "down");
    assert!(
        rig.domain_config_xml().contains("<link state='down'/>"),
        "persisted"
    );
    nicplug.set_spec_states(&[("yellow", "up")]);
    wait_carrier(&rig, &cni.mac, "1");

    let changed = Instant::now();
    nicplug.set_spec_states(&[("yellow", "absent")]);
    nicplug.wait_phase("yellow", Phase::Detached, PLUG);
    eprintln!(
        "timing (non-root launcher): spec absent -> Detached {:?}",
        changed.elapsed()
    );
    assert!(!device_aliases(&rig).contains(&"ua-yellow".to_string()));
    assert!(!rig.domain_config_xml().contains("ua-yellow"));
    assert!(
        rig.wait_guest_mac_gone(&cni.mac, PLUG),
        "guest released {}",
        cni.mac
    );
    assert_no_plumbing(&rig, "yellow");
    rig.cni_del(&net, &pod_iface("yellow"));
    assert_eq!(
        rig.pod_links_snapshot(),
        before_plug,
        "pod namespace as before the plug"
    );
    assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
}
