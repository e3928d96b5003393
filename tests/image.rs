//! End-to-end from the real image (issue 11 §2): nicplug runs as a podman
//! container (runc, the project's containers.conf and image store) joined to
//! the non-root rig's pod network namespace, with the securityContext
//! deploy/cluster/policy.yaml injects translated to podman flags:
//!
//! | policy | podman |
//! | --- | --- |
//! | `runAsUser/runAsGroup: 107`, `runAsNonRoot` | `--user 107:107` |
//! | `capabilities: {drop: [ALL], add: [NET_ADMIN, NET_RAW]}` | `--cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW` |
//! | `allowPrivilegeEscalation: false` | `--security-opt no-new-privileges` |
//! | `readOnlyRootFilesystem: true` | `--read-only --read-only-tmpfs=false` |
//! | `devices.kubevirt.io/tun: 1` | `--device <0666 tun node>:/dev/net/tun` |
//! | `libvirt-runtime` at `/var/run/libvirt`, read-only | `-v <rig run dir>:/var/run/libvirt:ro` |
//! | `nicplug-run` emptyDir (memory, 1Mi) at `/var/run/nicplug` | `--tmpfs /var/run/nicplug:size=1m,mode=0777` |
//! | env `XDG_*=/var/run/nicplug`, args `--api-socket`, `--libvirt-uri` | the same |
//!
//! One mount more than the policy's: the VMI document, read-only, in place of
//! the Kubernetes API (`--kube`), which does not exist here.
//!
//! The image is built by `scripts/image` (registry-less: the host's release
//! build on the cached runtime stage). The test uses `NICPLUG_IMAGE` (default
//! `localhost/nicplug:dev`) and prints SKIP when that image is not in the
//! project's store; `scripts/test` builds it first and runs this.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;
use serde_json::Value;
use support::{CniNet, NONROOT_ID, NONROOT_SIDECAR_URI, Rig, RigOptions};

const PLUG: Duration = Duration::from_secs(30);
/// CAP_NET_ADMIN (bit 12) and CAP_NET_RAW (bit 13).
const SIDECAR_CAPS: u64 = (1 << 12) | (1 << 13);

fn image() -> String {
    std::env::var("NICPLUG_IMAGE").unwrap_or_else(|_| "localhost/nicplug:dev".into())
}

/// podman with the project's configuration (scripts/podman/), never the machine's.
fn podman() -> Command {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/podman");
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf.join("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", conf.join("storage.conf"))
        .arg("--runtime")
        .arg("runc");
    c
}

fn podman_ok(args: &[&str]) -> Result<String, String> {
    let out = podman()
        .args(args)
        .output()
        .map_err(|e| format!("podman: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "podman {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Whether the image test can run; prints why not.
fn image_available(test: &str) -> bool {
    if !support::require_root() {
        return false;
    }
    let skip = |why: String| {
        eprintln!("\n*** SKIP {test}: {why} ***\n");
        false
    };
    if Command::new("podman").arg("--version").output().is_err() {
        return skip("podman is not installed (scripts/setup installs it)".into());
    }
    match podman_ok(&["image", "exists", &image()]) {
        Ok(_) => true,
        Err(_) => skip(format!(
            "image {} not built (run scripts/image; scripts/test builds it)",
            image()
        )),
    }
}

/// The container, removed on drop (also on failure).
struct Container {
    name: String,
}

impl Container {
    fn pid(&self) -> u32 {
        podman_ok(&["inspect", "-f", "{{.State.Pid}}", &self.name])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn logs(&self) -> String {
        let out = podman().args(["logs", &self.name]).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `nicplug status -o json` inside the container, as the probe runs it.
    fn status(&self) -> Result<Value, String> {
        let out = podman_ok(&[
            "exec",
            &self.name,
            "nicplug",
            "status",
            "--socket",
            "/var/run/nicplug/nicplug.sock",
            "-o",
            "json",
        ])?;
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = podman_ok(&["rm", "-f", "-t", "2", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// The status document over the API socket in the container's tmpfs, reached
/// from the host through the container's root (`/proc/<pid>/root`).
/// `path` inside the container of `pid`, as the host reaches it through
/// `/proc/<pid>/root`. Symlinks are resolved against the container's root:
/// the kernel would resolve an absolute link (Debian's `/var/run -> /run`)
/// against the host's.
fn in_container(pid: u32, path: &str) -> std::path::PathBuf {
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut resolved = std::path::PathBuf::from("/");
    let mut pending: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(String::from)
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        let candidate = resolved.join(&part);
        let on_host = root.join(candidate.strip_prefix("/").unwrap());
        match std::fs::read_link(&on_host) {
            Ok(target) if hops < 16 => {
                hops += 1;
                if target.is_absolute() {
                    resolved = std::path::PathBuf::from("/");
                }
                for c in target
                    .to_string_lossy()
                    .split('/')
                    .filter(|c| !c.is_empty())
                    .rev()
                {
                    pending.push(c.to_string());
                }
            }
            _ => resolved = candidate,
        }
    }
    root.join(resolved.strip_prefix("/").unwrap())
}

fn api_status(socket: &Path) -> Option<Value> {
    let (code, body) = api_get(socket, "/status", Duration::from_secs(2)).ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

fn phase_of(doc: &Value, name: &str) -> Option<Phase> {
    let entry = doc["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)?;
    serde_json::from_value(entry["phase"].clone()).ok()
}

fn wait_phase(socket: &Path, c: &Container, name: &str, phase: Phase) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < PLUG {
        if api_status(socket).and_then(|d| phase_of(&d, name)) == Some(phase) {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!(
        "{name} not {phase} within {PLUG:?}: {:?}\ncontainer log:\n{}",
        api_status(socket),
        c.logs()
    );
}

fn write_vmi(rig: &Rig, networks: &[(&str, &str)]) {
    let path = rig.dir.join("vmi/vmi.json");
    let tmp = rig.dir.join("vmi/.vmi.json.tmp");
    std::fs::write(&tmp, vmi_doc_states(rig, networks).to_string()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

#[test]
fn image_runs_as_the_sidecar_and_hotplugs_and_unplugs() {
    if !image_available("image_runs_as_the_sidecar_and_hotplugs_and_unplugs") {
        return;
    }
    let rig = Rig::start(RigOptions {
        non_root: true,
        ..RigOptions::default()
    });
    std::fs::create_dir_all(rig.dir.join("vmi")).unwrap();
    write_vmi(&rig, &[("dyniface1", "up")]);
    let d = rig.dir.display().to_string();
    let name = format!("nicplug-{}", rig.id);
    let id = format!("{NONROOT_ID}:{NONROOT_ID}");
    let netns = format!("ns:/run/netns/{}", rig.pod_ns);
    let started = Instant::now();
    podman_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &netns,
        "--user",
        &id,
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "NET_RAW",
        "--security-opt",
        "no-new-privileges",
        "--read-only",
        "--read-only-tmpfs=false",
        "--device",
        &format!("{d}/tun:/dev/net/tun:rwm"),
        "-v",
        &format!("{d}/run:/var/run/libvirt:ro"),
        "--tmpfs",
        "/var/run/nicplug:rw,size=1m,mode=0777",
        "-v",
        &format!("{d}/vmi:/var/run/nicplug-vmi:ro"),
        "-e",
        "XDG_RUNTIME_DIR=/var/run/nicplug",
        "-e",
        "XDG_CONFIG_HOME=/var/run/nicplug",
        "-e",
        "XDG_CACHE_HOME=/var/run/nicplug",
        "-e",
        "NICPLUG_LOG=nicplug=debug,info",
        &image(),
        "run",
        "--vmi",
        "/var/run/nicplug-vmi/vmi.json",
        "--api-socket",
        "/var/run/nicplug/nicplug.sock",
        "--libvirt-uri",
        NONROOT_SIDECAR_URI,
        "--log-format",
        "json",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let c = Container { name };
    let pid = c.pid();
    let socket = in_container(pid, "/var/run/nicplug/nicplug.sock");
    wait_phase(&socket, &c, "dyniface1", Phase::Pending);
    eprintln!(
        "timing (container): podman run -> API answers, Pending {:?}",
        started.elapsed()
    );

    // What the container's process really has.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    assert!(
        field("Uid").split_whitespace().all(|u| u == "107"),
        "{status}"
    );
    assert_eq!(field("NoNewPrivs"), "1");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            u64::from_str_radix(&field(set), 16).unwrap(),
            SIDECAR_CAPS,
            "{set} is exactly CAP_NET_ADMIN and CAP_NET_RAW"
        );
    }

    let net = CniNet::new(1);
    let before_plug = rig.pod_links_snapshot();
    let created = Instant::now();
    let cni = rig.cni_add(&net, &pod_iface("dyniface1"));
    wait_phase(&socket, &c, "dyniface1", Phase::Ready);
    eprintln!(
        "timing (container): pod interface -> Ready {:?}",
        created.elapsed()
    );
    assert_eq!(
        device_mac(&rig, "ua-dyniface1").as_deref(),
        Some(cni.mac.as_str())
    );
    assert_plumbing(&rig, "dyniface1", 1500);
    assert_guest_reachable(&rig, &net, &cni.mac);

    // The probe's view, from inside the container.
    let inside = c.status().unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(
        phase_of(&inside, "dyniface1"),
        Some(Phase::Ready),
        "{inside}"
    );
    let table = podman_ok(&[
        "exec",
        &c.name,
        "nicplug",
        "status",
        "--socket",
        "/var/run/nicplug/nicplug.sock",
    ])
    .unwrap();
    eprintln!("nicplug status in the container:\n{table}");
    // The probes deploy/ injects, run as kubelet runs them: inside the container.
    for endpoint in ["healthz", "readyz"] {
        let out = podman_ok(&[
            "exec",
            &c.name,
            "nicplug",
            "probe",
            endpoint,
            "--socket",
            "/var/run/nicplug/nicplug.sock",
        ])
        .unwrap_or_else(|e| panic!("probe {endpoint}: {e}"));
        assert_eq!(out, "ok\n", "probe {endpoint}");
    }
    assert!(
        table.contains("dyniface1") && table.contains("Ready"),
        "{table}"
    );

    let changed = Instant::now();
    write_vmi(&rig, &[("dyniface1", "absent")]);
    wait_phase(&socket, &c, "dyniface1", Phase::Detached);
    eprintln!(
        "timing (container): spec absent -> Detached {:?}",
        changed.elapsed()
    );
    assert!(!device_aliases(&rig).contains(&"ua-dyniface1".to_string()));
    assert!(rig.wait_guest_mac_gone(&cni.mac, PLUG));
    assert_no_plumbing(&rig, "dyniface1");
    rig.cni_del(&net, &pod_iface("dyniface1"));
    assert_eq!(
        rig.pod_links_snapshot(),
        before_plug,
        "pod namespace as before the plug"
    );

    podman_ok(&["stop", "-t", "10", &c.name]).unwrap();
    let code = podman_ok(&["inspect", "-f", "{{.State.ExitCode}}", &c.name]).unwrap();
    let logs = c.logs();
    assert_eq!(code.trim(), "0", "exits cleanly on SIGTERM:\n{logs}");
    assert!(!logs.contains("\"level\":\"ERROR\""), "{logs}");
}
