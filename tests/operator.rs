//! The operator's view (issue 12): the status document and its schema, the
//! header and exit code of `nicplug status` with libvirt unreachable,
//! `nicplug plan` on the rig before and after a plug (changing nothing),
//! JSON logs, the metrics and alert rules through `promtool`, the dashboard,
//! CLI errors with their exit codes, and docs/troubleshooting.md covering
//! every message. The rig and `unshare` tests need root.

mod e2e;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nicplug::plan::Phase;
use serde_json::Value;

use e2e::*;
use support::{CniNet, Rig, RigOptions};

const WAIT: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nicplug-operator-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nicplug(args: &[&str]) -> Output {
    Command::new(nicplug_binary())
        .args(args)
        .env_remove("NICPLUG_LOG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("nicplug runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------

/// `promtool` from PATH, or where `scripts/setup` unpacks Debian's
/// `prometheus` package (`/var/cache/nicplug/prometheus`, no service).
fn promtool(test: &str) -> Option<PathBuf> {
    let cached = PathBuf::from("/var/cache/nicplug/prometheus/usr/bin/promtool");
    if cached.exists() {
        return Some(cached);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("promtool");
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    let msg = format!(
        "SKIP {test}: promtool not found (scripts/setup unpacks Debian's prometheus package into /var/cache/nicplug/prometheus)"
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}; CI=true, so not skipping");
    }
    eprintln!("\n*** {msg} ***\n");
    None
}

/// Metrics with every family holding samples.
fn exercised_metrics() -> nicplug::metrics::Metrics {
    use nicplug::metrics::{Metrics, PlugStage, UnplugStage};
    let m = Metrics::new();
    m.observe_plug(PlugStage::Plumbed, 0.004);
    m.observe_plug(PlugStage::Attached, 0.2);
    m.observe_plug(PlugStage::Ready, 0.4);
    m.observe_unplug(UnplugStage::Removed, 0.3);
    m.observe_unplug(UnplugStage::Cleaned, 0.35);
    m.set_interfaces_per_phase(&[("Ready".into(), 1), ("Failed".into(), 1)]);
    m.inc_failure("attach-device");
    m.set_libvirt_reconnects(1);
    m.set_ready(true);
    m.set_libvirt_connected(true);
    m.set_root_ports_free(Some(3));
    m.observe_reconcile(0.002, true);
    m.observe_reconcile(0.01, false);
    m
}

#[test]
fn metrics_pass_promtool_check_metrics() {
    let Some(promtool) = promtool("metrics_pass_promtool_check_metrics") else {
        return;
    };
    let text = exercised_metrics().encode_text();
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {:?}\n{}\n---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Counters carry their HELP/TYPE under the sample name.
    assert!(
        text.contains("# TYPE nicplug_failures_total counter"),
        "{text}"
    );
    assert!(text.contains("nicplug_build_info{version=\""), "{text}");
}

/// The rule groups of the PrometheusRule, as a plain rules file.
fn rule_groups() -> String {
    let text =
        std::fs::read_to_string(repo().join("deploy/monitoring/prometheusrule.yaml")).unwrap();
    let rule: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(rule["kind"], "PrometheusRule");
    serde_yaml::to_string(&rule["spec"]).unwrap()
}

#[test]
fn alert_rules_pass_promtool_check_and_test() {
    let Some(promtool) = promtool("alert_rules_pass_promtool_check_and_test") else {
        return;
    };
    let dir = scratch("rules");
    std::fs::write(dir.join("rules.yaml"), rule_groups()).unwrap();
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(dir.join("rules.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        text(&check)
    );
    std::fs::copy(
        repo().join("fixtures/monitoring/alerts-test.yaml"),
        dir.join("alerts-test.yaml"),
    )
    .unwrap();
    let test = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(dir.join("alerts-test.yaml"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "promtool test rules: {}",
        text(&test)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Metric names (families) nicplug exports.
fn exported_names() -> std::collections::BTreeSet<String> {
    exercised_metrics()
        .encode_text()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `nicplug_*` and `process_*` names in `text`, histogram suffixes removed.
fn referenced_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts = (rest.starts_with("nicplug_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let mut name = &rest[..len];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && base.ends_with("_seconds")
                {
                    name = base;
                }
            }
            names.insert(name.to_string());
            i += len;
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    names
}

#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    let exported = exported_names();
    for required in [
        "nicplug_build_info",
        "nicplug_ready",
        "nicplug_libvirt_connected",
        "nicplug_pcie_root_ports_free",
        "nicplug_reconcile_errors_total",
        "nicplug_reconcile_duration_seconds",
        "nicplug_netlink_overflows_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            exported.contains(required),
            "{required} not exported: {exported:?}"
        );
    }
    let dashboard =
        std::fs::read_to_string(repo().join("deploy/monitoring/dashboard.json")).unwrap();
    let _: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let rules = rule_groups();
    for (what, text) in [
        ("dashboard.json", &dashboard),
        ("prometheusrule.yaml", &rules),
    ] {
        let used = referenced_names(text);
        assert!(!used.is_empty(), "{what} uses no metric");
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics nicplug does not export: {unknown:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The schema of the status document
// ---------------------------------------------------------------------------

#[test]
fn status_schema_accepts_full_documents_and_refuses_wrong_ones() {
    use nicplug::hypervisor::DomainLifecycle;
    use nicplug::plan::Phase;
    use nicplug::status::*;
    let doc = StatusDocument {
        agent: AgentStatus {
            ready: false,
            vmi: Some(VmiRef {
                namespace: "ns1".into(),
                name: "vm1".into(),
                uid: Some("0b6d7e52-2f7c-4a8e-9d0e-1d2c3b4a5f60".into()),
            }),
            domain: Some(DomainRef {
                name: "ns1_vm1".into(),
                state: DomainLifecycle::Migrating,
            }),
            dependencies: vec![Dependency {
                name: "libvirt".into(),
                ready: false,
                reason: Some("not connected yet".into()),
                required: true,
            }],
            last_reconcile: Some(Timestamp::now()),
            reconcile_error: Some("cannot read the domain: libvirt did not answer".into()),
            ..AgentStatus::default()
        },
        interfaces: vec![
            InterfaceStatus {
                interface_name: Some("eth1".into()),
                mac: Some("02:00:00:aa:bb:01".into()),
                ip_address: Some("169.254.2.5".into()),
                ip_addresses: vec!["169.254.2.5".into()],
                pod_interface_name: Some("pod9a6a0c3b4d8".into()),
                info_source: Some("domain, guest-agent".into()),
                link_state: Some("up".into()),
                queue_count: Some(1),
                message: Some("m".into()),
                pod_interface_seen: Some(Timestamp::now()),
                phase_transitions: vec![PhaseTransition {
                    phase: Phase::Ready,
                    at: Timestamp::now(),
                }],
                ..InterfaceStatus::new("dyniface1", Phase::Ready)
            },
            InterfaceStatus::new("default", Phase::NotManaged),
        ],
        guest_interfaces: vec![GuestInterfaceStatus {
            interface_name: "eth9".into(),
            mac: None,
            ip_addresses: vec![],
        }],
        guest_agent_connected: Some(true),
        ..StatusDocument::default()
    };
    let value = serde_json::to_value(&doc).unwrap();
    assert_valid_status(&value);
    assert_valid_status(&serde_json::to_value(StatusDocument::default()).unwrap());
    for (path, bad) in [
        ("/apiVersion", Value::from("v0")),
        ("/interfaces/0/phase", Value::from("Happy")),
        ("/agent/domain/state", Value::from("on")),
        ("/interfaces/0/undocumented", Value::from(1)),
    ] {
        let mut broken = value.clone();
        let (parent, key) = path.rsplit_once('/').unwrap();
        broken.pointer_mut(parent).unwrap()[key] = bad;
        assert!(status_errors(&broken).is_some(), "{path} accepted");
    }
}

// ---------------------------------------------------------------------------
// CLI errors and exit codes
// ---------------------------------------------------------------------------

#[test]
fn cli_errors_and_exit_codes() {
    let dir = scratch("cli");
    let vmi = dir.join("vmi.json");
    std::fs::write(
        &vmi,
        serde_json::to_string(&vmi_doc_for("ns1_vm1", &[])).unwrap(),
    )
    .unwrap();
    let vmi = vmi.to_str().unwrap();
    let cases: &[(&[&str], i32, &[&str])] = &[
        (&["run"], 2, &["--vmi", "--kube"]),
        (
            &["run", "--vmi", "/nonexistent/vmi.json"],
            1,
            &["--vmi /nonexistent/vmi.json: No such file"],
        ),
        (
            &["run", "--vmi", vmi, "--libvirt-uri", "bogus://x"],
            1,
            &["--libvirt-uri bogus://x: unknown driver \"bogus\""],
        ),
        (
            &["run", "--vmi", vmi, "--libvirt-uri", "qemu+bogus:///system"],
            1,
            &["unknown transport \"bogus\""],
        ),
        (
            &["run", "--vmi", vmi, "--attach-timeout", "0"],
            2,
            &["--attach-timeout", "must be more than zero"],
        ),
        (
            &["run", "--vmi", vmi, "--resync", "0s"],
            2,
            &["--resync", "must be more than zero"],
        ),
        (
            &["run", "--vmi", vmi, "--detach-timeout", "soon"],
            2,
            &["not a duration such as 10s or 500ms"],
        ),
        (
            &["plan", "--vmi", "/nonexistent/vmi.json"],
            1,
            &["/nonexistent/vmi.json"],
        ),
        (
            &["status", "--socket", "/nonexistent/nicplug.sock"],
            1,
            &[
                "cannot connect to nicplug at /nonexistent/nicplug.sock",
                "is nicplug running?",
            ],
        ),
        (&["completions", "bash"], 0, &["_nicplug()"]),
        (&["completions", "zsh"], 0, &["#compdef nicplug"]),
        (&["completions", "fish"], 0, &["complete -c nicplug"]),
        (&["man"], 0, &[".TH nicplug", "NICPLUG_LOG"]),
        (
            &["run", "--help"],
            0,
            &["--log-level", "NICPLUG_LOG", "10s"],
        ),
    ];
    for (args, code, says) in cases {
        let started = Instant::now();
        let out = nicplug(args);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(*code), "nicplug {args:?}: {all}");
        for s in *says {
            assert!(
                all.contains(s),
                "nicplug {args:?} does not say {s:?}: {all}"
            );
        }
        eprintln!(
            "nicplug {args:?}: exit {code} after {:?}",
            started.elapsed()
        );
    }
    // No ANSI colour into a pipe, even for errors.
    let out = nicplug(&["run", "--vmi", "/nonexistent/vmi.json"]);
    assert!(!text(&out).contains('\x1b'), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// libvirt unreachable: the header, the exit code, SIGTERM
// ---------------------------------------------------------------------------

struct Child(Option<std::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool, log: &Path) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} never happened; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_header_and_exit_code_with_libvirt_unreachable() {
    if !support::require_root() {
        return;
    }
    let dir = scratch("unreachable");
    let vmi = dir.join("vmi.json");
    std::fs::write(
        &vmi,
        serde_json::to_string(&vmi_doc_for("ns1_vm1", &[("blue", "up")])).unwrap(),
    )
    .unwrap();
    let api = dir.join("api.sock");
    let log_path = dir.join("nicplug.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // A fresh network namespace of its own; a libvirt socket that does not exist.
    let mut child = Child(Some(
        nicplug_in_fresh_netns(
            &vmi,
            &dir.join("no-libvirt-sock"),
            &api,
            &dir.join("status.json"),
            log,
        )
        .spawn()
        .unwrap(),
    ));
    let status = || {
        Command::new(nicplug_binary())
            .args(["status", "--socket"])
            .arg(&api)
            .output()
            .unwrap()
    };
    wait_for(
        "the first failed pass in the status",
        || {
            let out = status();
            out.status.code() == Some(3)
                && text(&out).contains("not ready: libvirt: cannot connect")
        },
        &log_path,
    );
    let out = status();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "nicplug status with libvirt unreachable (exit {:?}):\n{table}",
        out.status.code()
    );
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with(
            "vmi ns1/vm1   domain ns1_vm1 unknown   libvirt NOT READY   netlink ok   spec ok"
        ),
        "{table}"
    );
    assert!(header.ends_with("never reconciled"), "{table}");
    assert!(
        table.contains("\nlast pass failed: cannot read the domain: "),
        "{table}"
    );
    // The same as JSON, valid against the schema, exit 3 as well.
    let out = Command::new(nicplug_binary())
        .args(["status", "-o", "json", "--socket"])
        .arg(&api)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_valid_status(&doc);
    assert_eq!(doc["agent"]["ready"], false);
    assert_eq!(
        doc["agent"]["vmi"]["uid"],
        "0b6d7e52-2f7c-4a8e-9d0e-1d2c3b4a5f60"
    );
    let libvirt = doc["agent"]["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "libvirt")
        .unwrap()
        .clone();
    assert_eq!(libvirt["ready"], false);
    assert!(
        libvirt["reason"]
            .as_str()
            .unwrap()
            .contains("Failed to connect socket"),
        "{libvirt}"
    );
    // The waits are not errors a person must act on.
    let log_text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log_text.contains(" ERROR "), "{log_text}");

    // SIGTERM while libvirt never connected: exit 0, "stopped".
    let mut c = child.0.take().unwrap();
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let exit = c.wait().unwrap();
    let log_text = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(exit.code(), Some(0), "{log_text}");
    assert!(log_text.contains("stopped"), "{log_text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------
// nicplug plan and status on the rig, before and after a plug
// ---------------------------------------------------------------------------

/// The domain's live XML without what changes by itself.
fn domain_snapshot(rig: &Rig) -> String {
    rig.domain_xml()
}

#[test]
fn plan_and_status_on_the_rig_before_and_after_a_plug() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let mut agent = Nicplug::new(&rig, &[]);
    agent.args = vec!["--log-format".into(), "json".into()];
    agent.start();
    let status = || {
        Command::new(nicplug_binary())
            .args(["status", "--socket"])
            .arg(&agent.api_socket)
            .output()
            .unwrap()
    };
    wait_for(
        "the agent ready",
        || status().status.code() == Some(0),
        &agent.log_path,
    );
    let before = status();
    let before_text = String::from_utf8_lossy(&before.stdout).into_owned();
    eprintln!("nicplug status before the plug:\n{before_text}");
    assert!(
        before_text.starts_with(&format!(
            "vmi {}   domain {} running   libvirt ok   netlink ok   spec ok   guest agent ",
            rig.domain.replacen('_', "/", 1),
            rig.domain
        )),
        "{before_text}"
    );
    assert!(before_text.contains("\ndefault "), "{before_text}");
    assert!(before_text.contains(" NotManaged "), "{before_text}");
    assert!(
        !before_text.contains("not hot-pluggable"),
        "no warning for the pod network: {before_text}"
    );

    // The pod interface arrives; plan with a spec that wants it.
    let net = CniNet::new(41);
    let cni = rig.cni_add(&net, &pod_iface("blue"));
    let plan_vmi = rig.dir.join("plan-vmi.json");
    std::fs::write(
        &plan_vmi,
        serde_json::to_string(&vmi_doc(&rig, &["blue"])).unwrap(),
    )
    .unwrap();
    let plan = |output: &str| {
        rig.pod_cmd(nicplug_binary().to_str().unwrap())
            .args(["plan", "-o", output, "--vmi"])
            .arg(&plan_vmi)
            .args(["--libvirt-uri", &rig.libvirt_uri])
            .env_remove("NICPLUG_LOG")
            .output()
            .unwrap()
    };
    let links_before = pod_link_state(&rig);
    let domain_before = domain_snapshot(&rig);
    let pending = plan("table");
    let pending_text = text(&pending);
    eprintln!(
        "nicplug plan before the plug (exit {:?}):\n{pending_text}",
        pending.status.code()
    );
    assert_eq!(pending.status.code(), Some(2), "{pending_text}");
    for step in [
        "record-pod-link",
        "ensure-bridge",
        "enslave-pod-link",
        "ensure-tap",
        "attach-device",
    ] {
        assert!(pending_text.contains(step), "{step}: {pending_text}");
    }
    let json = plan("json");
    assert_eq!(json.status.code(), Some(2), "{}", text(&json));
    let report: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["converged"], false);
    let blue = report["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "blue")
        .unwrap()
        .clone();
    assert_eq!(blue["phase"], "Attached");
    assert_eq!(blue["steps"].as_array().unwrap().len(), 5, "{blue}");
    // Nothing changed: the pod namespace and the domain are as before.
    assert_eq!(pod_link_state(&rig), links_before);
    assert_eq!(domain_snapshot(&rig), domain_before);
    assert!(device_aliases(&rig).is_empty());

    // The agent plugs it.
    agent.set_spec(&["blue"]);
    agent.wait_phase("blue", Phase::Ready, WAIT);
    let after = status();
    let after_text = String::from_utf8_lossy(&after.stdout).into_owned();
    eprintln!("nicplug status after the plug:\n{after_text}");
    assert_eq!(after.status.code(), Some(0), "{after_text}");
    assert!(after_text.contains("guest agent connected"), "{after_text}");
    assert!(after_text.contains(&cni.mac), "{after_text}");
    // The pod link joins the bridge once CNI is done with it, which can be
    // just after the guest saw the NIC.
    let converged = support::poll(WAIT, Duration::from_millis(100), || {
        Some(plan("table")).filter(|out| out.status.code() == Some(0))
    })
    .unwrap_or_else(|| plan("table"));
    let converged_text = text(&converged);
    eprintln!(
        "nicplug plan after the plug (exit {:?}):\n{converged_text}",
        converged.status.code()
    );
    assert_eq!(converged.status.code(), Some(0), "{converged_text}");
    assert!(
        converged_text.contains("converged: nothing to do"),
        "{converged_text}"
    );

    // JSON logs: every line parses, the interface's lines carry `iface`.
    assert!(agent.stop(), "stops with exit 0");
    let log = agent.log();
    let mut with_iface = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["span"]["iface"] == "blue" {
            with_iface += 1;
            assert_eq!(v["span"]["name"], "interface", "{line}");
        }
        assert!(!line.contains("Some("), "Debug-formatted value: {line}");
    }
    assert!(with_iface > 0, "no log line with span.iface = blue:\n{log}");
    assert!(log.contains("\"message\":\"attached\""), "{log}");
}

// ---------------------------------------------------------------------------
// docs/troubleshooting.md covers every message
// ---------------------------------------------------------------------------

/// The string literal starting at `s[i]` (a `"`), as written in the source;
/// and the index after it.
fn literal_at(s: &str, i: usize) -> (String, usize) {
    let bytes = s.as_bytes();
    let mut j = i + 1;
    while j < bytes.len() && bytes[j] != b'"' {
        j += if bytes[j] == b'\\' { 2 } else { 1 };
    }
    (s[i + 1..j].to_string(), j + 1)
}

/// Message texts of `src/`: `#[error("..")]`, the message of `warn!`/`error!`
/// (its last string literal), `.context("..")`, and the planner's
/// `with_message("..")`; test code left out.
fn messages_in_code() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("tests.rs") {
                continue;
            }
            let mut s = std::fs::read_to_string(&path).unwrap();
            if let Some(at) = s.find("#[cfg(test)]\nmod ") {
                s.truncate(at);
            }
            let name = path.strip_prefix(repo()).unwrap().display().to_string();
            let mut push = |msg: String| out.push((name.clone(), msg));
            // rustfmt may break the line before the literal.
            for prefix in [
                "#[error(",
                ".context(",
                "with_message(",
                "with_message(format!(",
            ] {
                let mut from = 0;
                while let Some(at) = s[from..].find(prefix) {
                    let after = from + at + prefix.len();
                    let start = after + (s[after..].len() - s[after..].trim_start().len());
                    if !s[start..].starts_with('"') {
                        from = after;
                        continue;
                    }
                    let (lit, end) = literal_at(&s, start);
                    push(lit);
                    from = end;
                }
            }
            for mac in ["warn!(", "error!("] {
                let mut from = 0;
                while let Some(at) = s[from..].find(mac) {
                    let start = from + at;
                    // Only the macro, not e.g. `my_warn!(`.
                    let before = s[..start].chars().next_back();
                    let mut i = start + mac.len();
                    let (mut depth, mut last) = (1, None);
                    while depth > 0 && i < s.len() {
                        match s.as_bytes()[i] {
                            b'"' => {
                                let (lit, end) = literal_at(&s, i);
                                last = Some(lit);
                                i = end;
                                continue;
                            }
                            b'(' => depth += 1,
                            b')' => depth -= 1,
                            _ => {}
                        }
                        i += 1;
                    }
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                        && let Some(lit) = last
                    {
                        push(lit);
                    }
                    from = i;
                }
            }
        }
    }
    // Messages that are only placeholders carry no text to look up.
    out.retain(|(_, m)| {
        let mut text = String::new();
        let mut depth = 0;
        for c in m.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                c if depth == 0 => text.push(c),
                _ => {}
            }
        }
        text.chars().any(|c| c.is_alphabetic())
    });
    out
}

#[test]
fn troubleshooting_covers_every_message() {
    let doc = std::fs::read_to_string(repo().join("docs/troubleshooting.md")).unwrap();
    let messages = messages_in_code();
    assert!(
        messages.len() > 100,
        "found only {} messages",
        messages.len()
    );
    let missing: Vec<String> = messages
        .iter()
        .filter(|(_, m)| !doc.contains(&format!("`{}`", m.replace('|', "\\|"))))
        .map(|(file, m)| format!("{file}: {m}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md lacks {} message(s) (add a row to its table):\n{}",
        missing.len(),
        missing.join("\n")
    );
}
