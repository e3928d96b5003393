//! End-to-end: the world around nicplug fails (issue 9, "The world fails").
//! A wedged libvirt socket, libvirtd killed while idle and during an attach,
//! the domain shut off and started again, PCI capacity running out and
//! freeing up, a second instance, plumbing deleted under a live device.
//! Needs root; see docs/testing.md.
//!
//! Nothing here asserts how fast nicplug is: where the fault is a hang the
//! bound is generous ("answered at all within 5 s"), and every wait is a poll.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e::*;
use support::{CniNet, Rig, RigOptions, poll};

const PLUG: Duration = Duration::from_secs(20);
/// How long a fixed nicplug may take to notice an outage or converge after
/// one: generous, it only separates "does it at all" from "never".
const GENEROUS: Duration = Duration::from_secs(60);

/// Soft checks: each failed one is recorded, the test goes on (so a run on
/// unfixed code reports every defect it shows, not only the first), and
/// `finish` panics with all of them and nicplug's log tail.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let what = what();
            eprintln!("CHECK FAILED: {what}");
            self.failed.push(what);
        }
    }

    fn finish(self, log_tail: &str) {
        if !self.failed.is_empty() {
            panic!(
                "{} check(s) failed:\n- {}\n--- nicplug log tail ---\n{log_tail}",
                self.failed.len(),
                self.failed.join("\n- ")
            );
        }
    }
}

/// Waits until interface `name` is in `phase` (Ready satisfies Attached);
/// `Err` with the status entry (the caller adds the log tail).
fn wait_phase_soft(
    nicplug: &Nicplug<'_>,
    name: &str,
    phase: Phase,
    timeout: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let now = nicplug.phase(name);
        if now == Some(phase) || (phase == Phase::Attached && now == Some(Phase::Ready)) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "{name} not {phase} within {timeout:?}: {:?}",
                nicplug.entry(name)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `/readyz` until `want(code, body)` holds; the last answer either way.
fn wait_readyz(
    nicplug: &Nicplug<'_>,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (bool, Result<(u16, String), String>) {
    let start = Instant::now();
    loop {
        let answer = nicplug.api("/readyz", Duration::from_secs(5));
        if let Ok((code, body)) = &answer
            && want(*code, body)
        {
            return (true, answer);
        }
        if start.elapsed() >= timeout {
            return (false, answer);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn not_ready_naming_libvirt(code: u16, body: &str) -> bool {
    code == 503 && body.contains("libvirt")
}

/// How many reconcile passes `log` shows: the lines that start a pass
/// (`reconcile`) or report a failed one (`reconcile failed...`), whichever
/// are more (a pass may log both).
fn reconcile_passes(log: &str) -> usize {
    let started = log
        .lines()
        .filter(|l| l.trim_end().ends_with(": reconcile"))
        .count();
    let failed = log
        .lines()
        .filter(|l| l.contains("reconcile failed"))
        .count();
    started.max(failed)
}

/// Plugs `network` with nicplug running (spec already written): CNI ADD,
/// Attached, the guest sees the MAC, then Ready.
fn plug_ready(rig: &Rig, nicplug: &Nicplug<'_>, net: &CniNet, network: &str) -> String {
    let cni = rig.cni_add(net, &pod_iface(network));
    nicplug.wait_phase(network, Phase::Attached, PLUG);
    assert!(
        rig.wait_guest_mac(&cni.mac, PLUG).is_some(),
        "the guest never saw {}",
        cni.mac
    );
    nicplug.wait_phase(network, Phase::Ready, GENEROUS);
    cni.mac
}

/// A quick guest refresh, for tests that are not about how soon Ready comes
/// (today a plain hot-plug can wait a whole `--guest-refresh` for Ready).
fn quick_refresh_args() -> Vec<String> {
    ["--guest-refresh", "2"].map(String::from).to_vec()
}

// ---------------------------------------------------------------------------
// A wedged libvirt socket (no rig)
// ---------------------------------------------------------------------------

/// A unix socket that accepts every connection and never answers.
struct WedgedSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl WedgedSocket {
    fn bind(path: PathBuf) -> Self {
        let listener = UnixListener::bind(&path).expect("bind the wedged socket");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    // Read nothing, write nothing, close nothing.
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            held.len()
        });
        Self {
            path,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops accepting; returns how many connections it held.
    fn close(&mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for WedgedSocket {
    fn drop(&mut self) {
        self.close();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A child process killed (by its pid) and reaped on drop, and a directory
/// removed, whatever happened.
struct Scratch {
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn wedged_libvirt_socket() {
    if !support::require_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("nicplug-wedged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut scratch = Scratch {
        dir: dir.clone(),
        child: None,
    };
    let mut wedged = WedgedSocket::bind(dir.join("libvirt-sock"));
    let vmi = dir.join("vmi.json");
    std::fs::write(
        &vmi,
        serde_json::to_string_pretty(&vmi_doc_for("default_wedged", &[("blue", "up")])).unwrap(),
    )
    .unwrap();
    let api = dir.join("api.sock");
    let log_path = dir.join("nicplug.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // A fresh, empty network namespace of its own: nothing of the machine's
    // is touched.
    let child = nicplug_in_fresh_netns(&vmi, &wedged.path, &api, &dir.join("status.json"), log)
        .spawn()
        .expect("start nicplug");
    let pid = child.id();
    scratch.child = Some(child);
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };

    // The API socket appears first thing.
    let bound = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        api.exists().then_some(())
    });
    assert!(
        bound.is_some(),
        "nicplug did not bind {} within 10 s\n{}",
        api.display(),
        log_tail()
    );

    let mut checks = Checks::default();
    let (mut health_ok, mut health_bad, mut ready_ok) = (0, Vec::new(), 0);
    let mut ready_bad = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        match api_get(&api, "/healthz", Duration::from_secs(5)) {
            Ok((200, _)) => health_ok += 1,
            other => health_bad.push(format!(
                "{:?} after {:?}: {other:?}",
                start.elapsed(),
                t.elapsed()
            )),
        }
        match api_get(&api, "/readyz", Duration::from_secs(5)) {
            Ok((code, body)) if not_ready_naming_libvirt(code, &body) => ready_ok += 1,
            other => ready_bad.push(format!("{:?}: {other:?}", start.elapsed())),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "over 8 s: /healthz answered 200 {health_ok} times, failed {} times; /readyz 503 naming libvirt {ready_ok} times, otherwise {} times",
        health_bad.len(),
        ready_bad.len()
    );
    checks.check(health_bad.is_empty() && health_ok > 0, || {
        format!(
            "/healthz must answer every time while libvirt hangs: {health_ok} answers, failures: {health_bad:?}"
        )
    });
    checks.check(ready_bad.is_empty() && ready_ok > 0, || {
        format!("/readyz must answer 503 naming libvirt every time: {ready_bad:?}")
    });

    // SIGTERM is handled although libvirt never answers.
    support::kill_pid(pid as i32, libc::SIGTERM);
    let t = Instant::now();
    let mut child = scratch.child.take().unwrap();
    let exited = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    });
    match exited {
        Some(status) => {
            eprintln!(
                "SIGTERM -> exited ({}) after {:?}",
                describe_exit(&status),
                t.elapsed()
            );
            // Killed by the signal's default action means nobody handled it.
            checks.check(status.code().is_some(), || {
                format!(
                    "nicplug must handle SIGTERM and exit by itself, not die of it: {}",
                    describe_exit(&status)
                )
            });
        }
        None => {
            checks.check(false, || {
                "nicplug did not exit within 10 s of SIGTERM".into()
            });
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let held = wedged.close();
    eprintln!("the wedged socket held {held} connection(s)");
    checks.finish(&log_tail());
}

// ---------------------------------------------------------------------------
// libvirtd dies while idle
// ---------------------------------------------------------------------------

fn libvirtd_dies_while_idle(signal: i32, net_index: u8) {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(net_index);
    let mut nicplug = Nicplug::new(&rig, &["idle"]);
    nicplug.args = quick_refresh_args();
    nicplug.start();
    let mac = plug_ready(&rig, &nicplug, &net, "idle");
    let mut checks = Checks::default();

    let t = Instant::now();
    rig.kill_daemon(signal);
    let offset = nicplug.log_len();
    let (noticed, last) = wait_readyz(&nicplug, GENEROUS, not_ready_naming_libvirt);
    eprintln!(
        "libvirtd down -> /readyz {last:?} after {:?} (noticed: {noticed})",
        t.elapsed()
    );
    checks.check(noticed, || {
        format!(
            "/readyz must turn 503 naming libvirt within {GENEROUS:?} of libvirtd's death; last answer {last:?}"
        )
    });
    // A handful of failed passes in 5 s at most: a backoff, not a spin.
    let window = nicplug.log_len();
    std::thread::sleep(Duration::from_secs(5));
    let during = nicplug.log_since(window);
    let passes = reconcile_passes(&during);
    eprintln!(
        "during the outage: {passes} reconcile passes in 5 s ({} log lines in total since the kill)",
        nicplug.log_since(offset).lines().count()
    );
    checks.check(passes <= 10, || {
        format!(
            "{passes} reconcile passes in 5 s of outage (a handful at most); a sample:\n{}",
            during.lines().take(5).collect::<Vec<_>>().join("\n")
        )
    });
    checks.check(nicplug.is_running(), || {
        "nicplug exited during the outage".into()
    });

    let t = Instant::now();
    rig.start_daemon();
    let (ready, last) = wait_readyz(&nicplug, GENEROUS, |code, _| code == 200);
    eprintln!("libvirtd back -> /readyz {last:?} after {:?}", t.elapsed());
    checks.check(ready, || {
        format!("/readyz not 200 within {GENEROUS:?} of libvirtd's restart: {last:?}")
    });
    let ready = wait_phase_soft(&nicplug, "idle", Phase::Ready, GENEROUS);
    eprintln!("libvirtd back -> idle Ready: {ready:?}");
    checks.check(ready.is_ok(), || format!("after the restart: {ready:?}"));
    checks.check(devices_named(&rig, "idle") == 1, || {
        format!("exactly one ua-idle: {:?}", device_aliases(&rig))
    });
    checks.check(plumbing_links(&rig) == expected_plumbing(&["idle"]), || {
        format!("plumbing: {:?}", plumbing_links(&rig))
    });
    if let Err(e) = ping_guest(&rig, &net, &mac, 50) {
        checks.check(false, || format!("after the restart: {e}"));
    }
    checks.finish(&nicplug.log_tail(60));
}

#[test]
fn libvirtd_sigkill_while_idle() {
    libvirtd_dies_while_idle(libc::SIGKILL, 20);
}

#[test]
fn libvirtd_sigterm_while_idle() {
    libvirtd_dies_while_idle(libc::SIGTERM, 21);
}

#[test]
fn libvirtd_killed_during_attach() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(23);
    let mut nicplug = Nicplug::new(&rig, &["inflight"]);
    nicplug.args = quick_refresh_args();
    nicplug.start();
    nicplug.wait_phase("inflight", Phase::Pending, PLUG);
    let mut checks = Checks::default();

    // Freeze libvirtd, then add the pod interface: nicplug plumbs (netlink
    // only), publishes Plumbed, and blocks in the attach call.
    rig.freeze_daemon();
    let cni = rig.cni_add(&net, &pod_iface("inflight"));
    nicplug.wait_phase("inflight", Phase::Plumbed, PLUG);
    // Plumbed is published just before the call: give the request the moment
    // it needs to reach the daemon's socket (nothing observable to poll).
    std::thread::sleep(Duration::from_millis(300));
    rig.kill_daemon(libc::SIGKILL);
    let (noticed, last) = wait_readyz(&nicplug, GENEROUS, not_ready_naming_libvirt);
    checks.check(noticed, || {
        format!("/readyz must turn 503 naming libvirt while libvirtd is dead: {last:?}")
    });

    rig.start_daemon();
    let ready = wait_phase_soft(&nicplug, "inflight", Phase::Ready, GENEROUS);
    eprintln!("libvirtd back -> inflight Ready: {ready:?}");
    checks.check(ready.is_ok(), || format!("after the restart: {ready:?}"));
    checks.check(devices_named(&rig, "inflight") == 1, || {
        format!("exactly one ua-inflight: {:?}", device_aliases(&rig))
    });
    assert_plumbing(&rig, "inflight", 1500);
    checks.check(
        plumbing_links(&rig) == expected_plumbing(&["inflight"]),
        || format!("leftover links: {:?}", plumbing_links(&rig)),
    );
    if let Err(e) = ping_guest(&rig, &net, &cni.mac, 50) {
        checks.check(false, || e);
    }
    let (ready, last) = wait_readyz(&nicplug, GENEROUS, |code, _| code == 200);
    checks.check(ready, || format!("/readyz after the restart: {last:?}"));
    checks.finish(&nicplug.log_tail(60));
}

// ---------------------------------------------------------------------------
// The domain is shut off, and started again
// ---------------------------------------------------------------------------

/// Long refreshes: only the fast poll after a plug makes Ready come soon.
fn slow_refresh_args() -> Vec<String> {
    ["--guest-refresh", "600", "--resync", "600"]
        .map(String::from)
        .to_vec()
}

#[test]
fn domain_shut_off_at_start_then_started() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    rig.destroy_domain();
    let net = CniNet::new(24);
    let cni = rig.cni_add(&net, &pod_iface("late"));
    let mut nicplug = Nicplug::new(&rig, &["late"]);
    nicplug.args = slow_refresh_args();
    nicplug.start();
    let mut checks = Checks::default();

    let pending = poll(PLUG, Duration::from_millis(20), || {
        nicplug.entry("late").filter(|e| {
            e["phase"] == "Pending" && e["message"].as_str().is_some_and(|m| !m.is_empty())
        })
    });
    eprintln!("shut off: {pending:?}");
    checks.check(pending.is_some(), || {
        format!(
            "late must be Pending with a message while the domain is shut off: {:?}",
            nicplug.entry("late")
        )
    });
    checks.check(devices_named(&rig, "late") == 0, || {
        format!(
            "nothing attached to the shut-off domain: {:?}",
            device_aliases(&rig)
        )
    });

    let t = Instant::now();
    rig.start_domain();
    let attached = nicplug.wait_phase("late", Phase::Attached, GENEROUS);
    let ready = poll(GENEROUS, Duration::from_millis(20), || {
        (nicplug.phase("late") == Some(Phase::Ready)).then_some(t.elapsed())
    });
    eprintln!("after the start: Attached after {attached:?}, Ready after {ready:?}");
    checks.check(ready.is_some(), || {
        format!(
            "late not Ready within {GENEROUS:?} of the start (--guest-refresh 600): {:?}",
            nicplug.entry("late")
        )
    });
    checks.check(devices_named(&rig, "late") == 1, || {
        format!("exactly one ua-late: {:?}", device_aliases(&rig))
    });
    if let Err(e) = ping_guest(&rig, &net, &cni.mac, 50) {
        checks.check(false, || e);
    }
    checks.finish(&nicplug.log_tail(60));
}

#[test]
fn domain_destroyed_and_started_again() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(25);
    let mut nicplug = Nicplug::new(&rig, &["again"]);
    nicplug.args = slow_refresh_args();
    nicplug.start();
    let mac = plug_ready(&rig, &nicplug, &net, "again");
    let mut checks = Checks::default();

    rig.destroy_domain();
    // The status must stop claiming the device once the domain is off.
    let off = poll(PLUG, Duration::from_millis(20), || {
        nicplug
            .phase("again")
            .filter(|p| !matches!(p, Phase::Attached | Phase::Ready))
    });
    eprintln!(
        "shut off: phase {off:?}, entry {:?}",
        nicplug.entry("again")
    );
    checks.check(off.is_some(), || {
        format!(
            "while the domain is shut off the status must not say Attached/Ready: {:?}",
            nicplug.entry("again")
        )
    });

    let t = Instant::now();
    rig.start_domain();
    let ready = poll(GENEROUS, Duration::from_millis(20), || {
        (nicplug.phase("again") == Some(Phase::Ready) && devices_named(&rig, "again") == 1)
            .then_some(t.elapsed())
    });
    eprintln!("after the start: Ready after {ready:?}");
    checks.check(ready.is_some(), || {
        format!(
            "again not Ready within {GENEROUS:?} of the start (--guest-refresh 600): {:?}",
            nicplug.entry("again")
        )
    });
    checks.check(devices_named(&rig, "again") == 1, || {
        format!("exactly one ua-again: {:?}", device_aliases(&rig))
    });
    checks.check(
        plumbing_links(&rig) == expected_plumbing(&["again"]),
        || format!("plumbing: {:?}", plumbing_links(&rig)),
    );
    if let Err(e) = ping_guest(&rig, &net, &mac, 50) {
        checks.check(false, || e);
    }
    checks.finish(&nicplug.log_tail(60));
}

#[test]
fn restart_plugs_in_first_pass_and_goes_ready() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(26);
    let mut nicplug = Nicplug::new(&rig, &["restart"]);
    nicplug.start();
    nicplug.wait_phase("restart", Phase::Pending, PLUG);
    nicplug.kill();
    let cni = rig.cni_add(&net, &pod_iface("restart"));
    nicplug.args = slow_refresh_args();
    let t = Instant::now();
    nicplug.start();
    let attached = nicplug.wait_phase("restart", Phase::Attached, PLUG);
    let seen = rig.wait_guest_mac(&cni.mac, PLUG).map(|_| t.elapsed());
    let ready = poll(GENEROUS, Duration::from_millis(20), || {
        (nicplug.phase("restart") == Some(Phase::Ready)).then_some(t.elapsed())
    });
    eprintln!(
        "restart: Attached after {attached:?}, guest saw the MAC by {seen:?}, Ready after {ready:?}"
    );
    assert!(
        ready.is_some(),
        "restart not Ready within {GENEROUS:?} of a restart that plugged it in its first pass (--guest-refresh 600): {:?}\n{}",
        nicplug.entry("restart"),
        nicplug.log_tail(60)
    );
    assert_eq!(
        devices_named(&rig, "restart"),
        1,
        "{:?}",
        device_aliases(&rig)
    );
}

// ---------------------------------------------------------------------------
// PCI capacity
// ---------------------------------------------------------------------------

/// `(used, total)` from "no free PCIe root port for hotplug: U of T in use".
fn capacity_counts(message: &str) -> Option<(u32, u32)> {
    let rest = message.split("root port").nth(1)?;
    let words: Vec<&str> = rest
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let of = words.iter().position(|w| *w == "of")?;
    Some((
        words.get(of - 1)?.parse().ok()?,
        words.get(of + 1)?.parse().ok()?,
    ))
}

/// How many times interface `name` failed, by nicplug's log.
fn failures_logged(nicplug: &Nicplug<'_>, name: &str) -> usize {
    nicplug
        .log()
        .lines()
        .filter(|l| l.contains(&format!("name={name}")) && l.contains("interface failed"))
        .count()
}

#[test]
fn two_free_ports_three_interfaces() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions {
        root_ports: 2,
        ..RigOptions::default()
    });
    let nets = [CniNet::new(27), CniNet::new(28), CniNet::new(29)];
    let names = ["p1", "p2", "p3"];
    let mut nicplug = Nicplug::new(&rig, &names);
    nicplug.args = quick_refresh_args();
    nicplug.start();
    let mut checks = Checks::default();
    for (net, name) in nets.iter().zip(names) {
        rig.cni_add(net, &pod_iface(name));
    }
    nicplug.wait_phase("p1", Phase::Attached, PLUG);
    nicplug.wait_phase("p2", Phase::Attached, PLUG);
    let failed = poll(PLUG, Duration::from_millis(2), || {
        nicplug.entry("p3").filter(|e| e["phase"] == "Failed")
    })
    .unwrap_or_else(|| {
        panic!(
            "p3 never Failed: {:?}\n{}",
            nicplug.status(),
            nicplug.log_tail(40)
        )
    });
    let message = failed["message"].as_str().unwrap_or("").to_string();
    eprintln!("p3's first failure: {message:?}");
    checks.check(message.contains("no free PCIe root port"), || {
        format!("p3's message names the PCI capacity: {message:?}")
    });
    checks.check(capacity_counts(&message) == Some((2, 2)), || {
        format!("p3's message counts 2 of 2 root ports in use: {message:?}")
    });
    checks.check(devices_named(&rig, "p3") == 0, || "p3 not attached".into());
    assert_eq!(rig.free_root_ports(), 0, "both ports taken");

    // Let p3 fail again and again, so its backoff has grown to >= 30 s
    // (1 s doubling: the 6th failure backs off 32 s).
    let t = Instant::now();
    let grown = poll(Duration::from_secs(60), Duration::from_millis(100), || {
        (failures_logged(&nicplug, "p3") >= 6).then_some(t.elapsed())
    });
    eprintln!(
        "p3 failed {} times in {:?} (grown: {grown:?}); last message {:?}",
        failures_logged(&nicplug, "p3"),
        t.elapsed(),
        nicplug.entry("p3").map(|e| e["message"].clone())
    );
    if let Some(e) = nicplug.entry("p3")
        && let Some(m) = e["message"].as_str()
    {
        checks.check(capacity_counts(m) == Some((2, 2)), || {
            format!("p3's later message counts 2 of 2: {m:?}")
        });
    }

    // Free a port: p3 goes in reaction to it, not after its backoff.
    let t = Instant::now();
    nicplug.set_spec_states(&[("p1", "absent"), ("p2", "up"), ("p3", "up")]);
    nicplug.wait_phase("p1", Phase::Detached, PLUG);
    let freed = t.elapsed();
    let attached = poll(PLUG, Duration::from_millis(5), || {
        matches!(nicplug.phase("p3"), Some(Phase::Attached | Phase::Ready)).then_some(t.elapsed())
    });
    eprintln!("port freed after {freed:?}; p3 Attached after {attached:?}");
    checks.check(attached.is_some(), || {
        format!(
            "p3 not Attached within {PLUG:?} of the freed port (its backoff was >= 32 s): {:?}",
            nicplug.entry("p3")
        )
    });
    checks.finish(&nicplug.log_tail(60));
}

// ---------------------------------------------------------------------------
// Two instances
// ---------------------------------------------------------------------------

/// The live domain's interface devices, for before/after comparisons.
fn domain_interfaces(rig: &Rig) -> String {
    let xml = rig.domain_xml();
    format!(
        "{:?}",
        nicplug::hypervisor::domain_xml::parse_devices(&xml)
            .unwrap()
            .interfaces
    )
}

#[test]
fn second_instance_refuses_to_start() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(31);
    let mut first = Nicplug::new(&rig, &["solo"]);
    first.args = quick_refresh_args();
    first.start();
    let mac = plug_ready(&rig, &first, &net, "solo");
    let links = settled_pod_link_state(&rig);
    let devices = domain_interfaces(&rig);
    let mut checks = Checks::default();

    let mut second = Nicplug::another(&rig, "second");
    second.start();
    let exit = second.wait_exit(Duration::from_secs(10));
    let log = second.log();
    eprintln!(
        "second instance: {:?}; its log:\n{log}",
        exit.as_ref().map(describe_exit)
    );
    checks.check(exit.is_some_and(|s| !s.success()), || {
        format!(
            "a second nicplug in the pod must exit non-zero within 10 s: {:?}",
            exit.as_ref().map(describe_exit)
        )
    });
    let first_pid = first.pid().unwrap().to_string();
    checks.check(
        log.contains(&first_pid) || log.contains("another") || log.contains("already running"),
        || format!("its message names the other instance (pid {first_pid}): {log:?}"),
    );
    second.kill();
    let now = pod_link_state(&rig);
    checks.check(now == links, || {
        format!("the pod's links changed:\n  before {links:?}\n  after  {now:?}")
    });
    checks.check(domain_interfaces(&rig) == devices, || {
        format!(
            "the domain's interfaces changed: {}",
            domain_interfaces(&rig)
        )
    });
    checks.check(first.phase("solo") == Some(Phase::Ready), || {
        format!("the first instance's NIC: {:?}", first.entry("solo"))
    });
    if let Err(e) = ping_guest(&rig, &net, &mac, 50) {
        checks.check(false, || e);
    }
    checks.finish(&format!(
        "{}\n--- second instance ---\n{}",
        first.log_tail(40),
        second.log_tail(20)
    ));
}

#[test]
fn attach_race_loser_keeps_plumbing() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(32);
    let mut nicplug = Nicplug::new(&rig, &["race"]);
    nicplug.args = quick_refresh_args();
    nicplug.env.push((
        "NICPLUG_TEST_FAULT".into(),
        "pause-before=attach-device:3000".into(),
    ));
    nicplug.start();
    nicplug.wait_phase("race", Phase::Pending, PLUG);
    let cni = rig.cni_add(&net, &pod_iface("race"));
    nicplug.wait_phase("race", Phase::Plumbed, PLUG);

    // While nicplug pauses before its attach, someone else attaches the
    // device under the same alias, on the same tap.
    let tap = format!("tap{}", suffix("race"));
    let xml = format!(
        "<interface type='ethernet'>\n  <mac address='{}'/>\n  <target dev='{tap}' managed='no'/>\n  <model type='virtio'/>\n  <alias name='ua-race'/>\n</interface>\n",
        cni.mac
    );
    let xml_path = rig.dir.join("race.xml");
    std::fs::write(&xml_path, xml).unwrap();
    let by_hand = rig.virsh_try(&[
        "attach-device",
        &rig.domain,
        xml_path.to_str().unwrap(),
        "--live",
    ]);
    if let Err(e) = &by_hand {
        panic!(
            "attach by hand failed: {e}\n(if nicplug's device is there already, it did not pause: the NICPLUG_TEST_FAULT hook is missing?)\n{}",
            nicplug.log_tail(40)
        );
    }
    let lost = poll(PLUG, Duration::from_millis(10), || {
        nicplug.log().contains("non unique alias").then_some(())
    });
    assert!(
        lost.is_some(),
        "nicplug's attach did not fail with libvirt's \"non unique alias\"\n{}",
        nicplug.log_tail(40)
    );
    let mut checks = Checks::default();
    // It must not roll back: the other device uses this plumbing. Look now
    // and again a moment later (a rollback runs right after the error).
    for when in ["at once", "after 2 s"] {
        if when != "at once" {
            std::thread::sleep(Duration::from_secs(2));
        }
        checks.check(plumbing_links(&rig) == expected_plumbing(&["race"]), || {
            format!(
                "{when}: tap and bridge under the live device: {:?}",
                plumbing_links(&rig)
            )
        });
        // A rollback would give the pod link back, record and all. It may
        // not be on the bridge yet at once: the plug leaves that until CNI
        // is done with the link, and the pass was held in the pause.
        let pod = pod_link(&rig, &pod_iface("race"));
        checks.check(
            pod.as_ref().is_some_and(|p| {
                p["ifalias"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("nicplug/"))
            }),
            || format!("{when}: pod link still recorded: {pod:?}"),
        );
    }
    let pod = pod_link(&rig, &pod_iface("race"));
    checks.check(
        pod.as_ref()
            .is_some_and(|p| p["master"] == format!("k6t-{}", suffix("race")).as_str()),
        || format!("pod link enslaved under the live device: {pod:?}"),
    );
    checks.check(devices_named(&rig, "race") == 1, || {
        format!("exactly one ua-race: {:?}", device_aliases(&rig))
    });
    if let Err(e) = ping_guest(&rig, &net, &cni.mac, 50) {
        checks.check(false, || e);
    }
    checks.finish(&nicplug.log_tail(60));
}

// ---------------------------------------------------------------------------
// Plumbing deleted under a live device
// ---------------------------------------------------------------------------

fn deleted_link_is_repaired(network: &str, net_index: u8, link: &str) {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::default());
    let net = CniNet::new(net_index);
    let mut nicplug = Nicplug::new(&rig, &[network]);
    nicplug.args = quick_refresh_args();
    nicplug.start();
    let mac = plug_ready(&rig, &nicplug, &net, network);
    ping_guest(&rig, &net, &mac, 50).expect("the NIC works before the deletion");
    let mut checks = Checks::default();

    let offset = nicplug.log_len();
    let t = Instant::now();
    rig.pod_ip(&["link", "del", link]);
    if link.starts_with("tap") && !rig.qemu_version().survives_dead_tap_unplug() {
        // This QEMU exits when the device is unplugged (tests/dhcp.rs has
        // the whole case): the tap is made again, the device kept, the
        // interface Failed with the reason, the VM running.
        let kept = poll(GENEROUS, Duration::from_millis(5), || {
            let message = nicplug.entry(network)?["message"].as_str()?.to_string();
            (message.contains("not detaching it")
                && plumbing_links(&rig) == expected_plumbing(&[network]))
            .then_some(t.elapsed())
        });
        eprintln!(
            "{link} deleted on QEMU {}: kept after {kept:?}",
            rig.qemu_version()
        );
        checks.check(kept.is_some(), || {
            format!("not kept: {:?}", nicplug.entry(network))
        });
        checks.check(devices_named(&rig, network) == 1, || {
            format!("exactly one ua-{network}: {:?}", device_aliases(&rig))
        });
        checks.check(
            rig.virsh(&["domstate", &rig.domain]).trim() == "running",
            || "the VM runs".to_string(),
        );
        checks.finish(&nicplug.log_tail(60));
        return;
    }
    // Reported: a status message or a log line naming the link.
    let mut reported = None;
    let mut note_report = |nicplug: &Nicplug<'_>| {
        if reported.is_some() {
            return;
        }
        if let Some(m) = nicplug
            .entry(network)
            .and_then(|e| e["message"].as_str().map(String::from))
            && m.contains(link)
        {
            reported = Some(format!("status message {m:?}"));
        } else if let Some(l) = nicplug
            .log_since(offset)
            .lines()
            .find(|l| l.contains(link) && l.contains("missing"))
        {
            reported = Some(format!("log {l:?}"));
        }
    };
    // Repaired: the plumbing is back, one device, Ready, and traffic flows
    // (QEMU's fd to a deleted tap is dead, so the device may be re-attached:
    // only a ping tells).
    let mut last_ping = String::from("never tried");
    let repaired = poll(GENEROUS, Duration::from_millis(5), || {
        note_report(&nicplug);
        let structure = plumbing_links(&rig) == expected_plumbing(&[network])
            && devices_named(&rig, network) == 1
            && nicplug.phase(network) == Some(Phase::Ready)
            && pod_link(&rig, &pod_iface(network))
                .is_some_and(|p| p["master"] == format!("k6t-{}", suffix(network)).as_str());
        if !structure {
            return None;
        }
        match ping_guest(&rig, &net, &mac, 51) {
            Ok(()) => Some(t.elapsed()),
            Err(e) => {
                last_ping = e;
                note_report(&nicplug);
                None
            }
        }
    });
    note_report(&nicplug);
    eprintln!("{link} deleted: reported {reported:?}; repaired (ping works) after {repaired:?}");
    checks.check(reported.is_some(), || {
        format!("the missing {link} must be reported (status message or log)")
    });
    checks.check(repaired.is_some(), || {
        format!(
            "{link} not repaired within {GENEROUS:?}: links {:?}, devices {:?}, status {:?}, last ping: {last_ping}",
            plumbing_links(&rig),
            device_aliases(&rig),
            nicplug.entry(network)
        )
    });
    checks.check(devices_named(&rig, network) == 1, || {
        format!("exactly one ua-{network}: {:?}", device_aliases(&rig))
    });
    checks.finish(&nicplug.log_tail(60));
}

#[test]
fn missing_tap_under_live_device_is_repaired() {
    let tap = format!("tap{}", suffix("mend"));
    deleted_link_is_repaired("mend", 33, &tap);
}

#[test]
fn missing_bridge_under_live_device_is_repaired() {
    let bridge = format!("k6t-{}", suffix("fix"));
    deleted_link_is_repaired("fix", 34, &bridge);
}
