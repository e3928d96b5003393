//! End-to-end: crash anywhere (issue 9). nicplug is aborted right after each
//! step of a plug and of an unplug (the debug-build test hook
//! `NICPLUG_TEST_FAULT=abort-after=<step>[#<n>]`), restarted without the
//! fault, and the end state must equal the no-crash run's: one device, the
//! exact plumbing and Ready after a plug; no device, no plumbing and the pod
//! link exactly as CNI made it after an unplug. One rig serves the whole
//! matrix (a TCG boot per case would cost minutes); each case returns the pod
//! to its state before CNI ADD. Needs root; see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use e2e::*;
use support::{CniNet, Rig, RigOptions};

const NET: &str = "crash";
const WAIT: Duration = Duration::from_secs(30);
/// How long an aborting nicplug gets to reach its step and die.
const ABORT_WITHIN: Duration = Duration::from_secs(30);

const PLUG_STEPS: [&str; 5] = [
    "record-pod-link",
    "ensure-bridge",
    "enslave-pod-link",
    "ensure-tap",
    "attach-device",
];
const UNPLUG_STEPS: [&str; 4] = [
    "detach-device",
    "delete-link#1",
    "release-pod-link",
    "delete-link#2",
];

fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// The pod link's routes (all tables), volatile fields dropped.
fn routes(rig: &Rig) -> Vec<String> {
    let mut lines: Vec<String> = ["-4", "-6"]
        .iter()
        .flat_map(|family| {
            rig.pod_ip(&[family, "route", "show", "table", "all"])
                .lines()
                .filter(|l| !l.contains("expires"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort();
    lines
}

/// What must hold after a plug, as comparable text.
fn plugged_state(rig: &Rig, nicplug: &Nicplug<'_>) -> Vec<String> {
    let pod = pod_link(rig, &pod_iface(NET));
    vec![
        format!("devices ua-{NET}: {}", devices_named(rig, NET)),
        format!("plumbing: {:?}", plumbing_links(rig)),
        format!(
            "pod link: master={} record={} addresses={:?}",
            pod.as_ref()
                .map(|p| p["master"].clone())
                .unwrap_or_default(),
            pod.as_ref()
                .and_then(|p| p["ifalias"].as_str().map(|a| a.starts_with("nicplug/v2 ")))
                .unwrap_or(false),
            pod_addresses(rig, &pod_iface(NET))
        ),
        format!("phase: {:?}", nicplug.phase(NET)),
        format!(
            "links named like the network's: {:?}",
            pod_link_names(rig)
                .into_iter()
                .filter(|n| n.ends_with(&suffix(NET)))
                .collect::<Vec<_>>()
        ),
    ]
}

/// How the faulted run ended: the text for the matrix, or why it is wrong.
fn await_abort(nicplug: &mut Nicplug<'_>, fault: &str, offset: usize) -> Result<String, String> {
    match nicplug.wait_exit(ABORT_WITHIN) {
        None => {
            nicplug.kill();
            let log = nicplug.log_since(offset);
            let hint = if log.contains("test fault") {
                "it logged the fault but kept running"
            } else {
                "the NICPLUG_TEST_FAULT hook is missing?"
            };
            Err(format!(
                "nicplug did not abort after {fault} within {ABORT_WITHIN:?}: {hint}"
            ))
        }
        Some(status) if status.signal() == Some(libc::SIGABRT) => {
            let log = nicplug.log_since(offset);
            let step = fault.split('#').next().unwrap_or(fault);
            if log.contains(&format!("test fault: abort after {step}")) {
                Ok("SIGABRT".into())
            } else {
                Ok("SIGABRT (no \"test fault: abort after\" line)".into())
            }
        }
        Some(status) => Err(format!(
            "nicplug with abort-after={fault} ended with {} instead of SIGABRT",
            describe_exit(&status)
        )),
    }
}

fn fault_env(fault: &str) -> Vec<(String, String)> {
    vec![("NICPLUG_TEST_FAULT".into(), format!("abort-after={fault}"))]
}

struct Case {
    kind: &'static str,
    fault: Option<String>,
    abort: String,
    result: Result<Duration, String>,
}

/// Plug with an abort after `fault` (none: the reference run), restart,
/// converge. Returns the end state and how the faulted run ended.
fn plug_case(
    rig: &Rig,
    net: &CniNet,
    fault: Option<&str>,
    tag: &str,
) -> (String, Result<Vec<String>, String>) {
    let mut nicplug = Nicplug::another(rig, tag);
    nicplug.args = vec!["--guest-refresh".into(), "2".into()];
    nicplug.set_spec(&[NET]);
    let offset = nicplug.log_len();
    if let Some(f) = fault {
        nicplug.env = fault_env(f);
    }
    nicplug.start();
    // The hot-plug order, as Multus does it: nicplug runs, then CNI ADD. Its
    // first pass must be over first, or it may land in the middle of CNI ADD
    // (a known, rare race: see docs/testing.md).
    nicplug.wait_phase(NET, Phase::Pending, WAIT);
    let cni = rig.cni_add(net, &pod_iface(NET));
    let mut abort = "-".to_string();
    if let Some(f) = fault {
        match await_abort(&mut nicplug, f, offset) {
            Ok(a) => abort = a,
            Err(e) => return ("no abort".into(), Err(e)),
        }
        nicplug.env.clear();
        nicplug.start();
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        nicplug.wait_phase(NET, Phase::Ready, WAIT);
        assert_plumbing(rig, NET, 1500);
        ping_guest(rig, net, &cni.mac, 50).unwrap_or_else(|e| panic!("{e}"));
        plugged_state(rig, &nicplug)
    }))
    .map_err(|e| {
        format!(
            "{}\n--- log tail ---\n{}",
            panic_text(e),
            nicplug.log_tail(30)
        )
    });
    (abort, result)
}

/// Unplug with an abort after `fault`; `after_add` is the pod's state right
/// after CNI ADD, before nicplug touched it.
fn unplug_case(
    rig: &Rig,
    net: &CniNet,
    fault: Option<&str>,
    tag: &str,
) -> (String, Result<Vec<String>, String>) {
    let cni = rig.cni_add(net, &pod_iface(NET));
    let (after_add, routes_after_add) = (pod_link_state(rig), routes(rig));
    let mut nicplug = Nicplug::another(rig, tag);
    nicplug.args = vec!["--guest-refresh".into(), "2".into()];
    nicplug.set_spec(&[NET]);
    nicplug.start();
    let plugged = catch_unwind(AssertUnwindSafe(|| {
        nicplug.wait_phase(NET, Phase::Ready, WAIT);
    }));
    if let Err(e) = plugged {
        return (
            "-".into(),
            Err(format!(
                "the plug before the unplug failed: {}\n{}",
                panic_text(e),
                nicplug.log_tail(30)
            )),
        );
    }
    nicplug.kill();
    nicplug.set_spec_states(&[(NET, "absent")]);
    let offset = nicplug.log_len();
    let mut abort = "-".to_string();
    if let Some(f) = fault {
        nicplug.env = fault_env(f);
        nicplug.start();
        match await_abort(&mut nicplug, f, offset) {
            Ok(a) => abort = a,
            Err(e) => return ("no abort".into(), Err(e)),
        }
        nicplug.env.clear();
    }
    nicplug.start();
    let result = catch_unwind(AssertUnwindSafe(|| {
        nicplug.wait_phase(NET, Phase::Detached, WAIT);
        assert!(
            rig.wait_guest_mac_gone(&cni.mac, WAIT),
            "the guest still has {}",
            cni.mac
        );
        assert_eq!(devices_named(rig, NET), 0, "{:?}", device_aliases(rig));
        assert!(
            !rig.domain_config_xml().contains(&format!("ua-{NET}")),
            "the persistent definition still has ua-{NET}"
        );
        assert_no_plumbing(rig, NET);
        assert_eq!(
            pod_link_state(rig),
            after_add,
            "the pod's links as CNI ADD left them"
        );
        assert_eq!(routes(rig), routes_after_add, "the pod's routes");
        vec![format!("phase: {:?}", nicplug.phase(NET))]
    }))
    .map_err(|e| {
        format!(
            "{}\n--- log tail ---\n{}",
            panic_text(e),
            nicplug.log_tail(30)
        )
    });
    (abort, result)
}

/// Back to the pod as it was before CNI ADD: nothing in the spec, no device,
/// CNI DEL. `Err` if the rig cannot be trusted for another case.
fn reset(rig: &Rig, net: &CniNet, base: &str) -> Result<(), String> {
    let mut nicplug = Nicplug::another(rig, "reset");
    nicplug.set_spec(&[]);
    nicplug.start();
    let gone = catch_unwind(AssertUnwindSafe(|| {
        nicplug.wait_gone(NET, WAIT);
    }));
    // The plumbing must be gone before CNI DEL (nothing of nicplug's left).
    let clean = support::poll(WAIT, Duration::from_millis(20), || {
        (devices_named(rig, NET) == 0 && plumbing_links(rig).is_empty()).then_some(())
    });
    nicplug.kill();
    let del = catch_unwind(AssertUnwindSafe(|| rig.cni_del(net, &pod_iface(NET))));
    let now = rig.pod_links_snapshot();
    if gone.is_err() || clean.is_none() || del.is_err() || now != base {
        return Err(format!(
            "cannot reset the rig: gone={} clean={} cni_del={} pod as before ADD={}\n{now}\n{}",
            gone.is_ok(),
            clean.is_some(),
            del.is_ok(),
            now == base,
            nicplug.log_tail(20)
        ));
    }
    Ok(())
}

#[test]
fn crash_anywhere_converges() {
    if !support::require_root() {
        return;
    }
    // One vCPU, as in the soak: with two, one CI run in about fifteen saw
    // the guest stop answering its agent for good right after an attach
    // (domain running, nicplug's steps all done), the kind of failure
    // Debian 12's QEMU 7.2 shows under multi-threaded TCG after NIC ejects
    // (docs/testing.md), and QEMU 10.0 still shows in the soak with two
    // vCPUs (3 runs of this matrix with two passed). What is tested here is
    // nicplug's convergence.
    let rig = Rig::start(RigOptions {
        vcpus: 1,
        ..RigOptions::default()
    });
    let net = CniNet::new(60);
    let base = rig.pod_links_snapshot();
    let mut cases: Vec<Case> = Vec::new();
    let mut reference: [Option<Vec<String>>; 2] = [None, None];
    let mut matrix: Vec<(&'static str, Option<String>)> = vec![("plug", None)];
    matrix.extend(PLUG_STEPS.iter().map(|s| ("plug", Some(s.to_string()))));
    matrix.push(("unplug", None));
    matrix.extend(UNPLUG_STEPS.iter().map(|s| ("unplug", Some(s.to_string()))));
    let mut broken: Option<String> = None;
    let mut hook_missing = false;

    for (i, (kind, fault)) in matrix.into_iter().enumerate() {
        if let Some(why) = &broken {
            cases.push(Case {
                kind,
                fault,
                abort: "-".into(),
                result: Err(format!("skipped: {}", why.lines().next().unwrap_or(""))),
            });
            continue;
        }
        let t = Instant::now();
        let tag = format!("case{i}");
        rig.log(&format!("crash case {kind} after {fault:?}"));
        let (abort, result) = match kind {
            "plug" => plug_case(&rig, &net, fault.as_deref(), &tag),
            _ => unplug_case(&rig, &net, fault.as_deref(), &tag),
        };
        let slot = usize::from(kind == "unplug");
        let result = result.and_then(|state| match &reference[slot] {
            None => {
                reference[slot] = Some(state);
                Ok(t.elapsed())
            }
            Some(want) if *want == state => Ok(t.elapsed()),
            Some(want) => Err(format!(
                "end state differs from the no-crash run:\n  got  {state:?}\n  want {want:?}"
            )),
        });
        if let Err(e) = &result {
            eprintln!("CASE FAILED {kind} after {fault:?}: {e}");
            hook_missing |= e.contains("hook is missing");
        }
        if let Err(e) = reset(&rig, &net, &base) {
            broken = Some(e);
        }
        cases.push(Case {
            kind,
            fault,
            abort,
            result,
        });
        if hook_missing {
            broken.get_or_insert_with(|| "the NICPLUG_TEST_FAULT hook is missing".into());
        }
    }

    eprintln!("\ncrash-anywhere matrix (abort after the step, restart without the fault):");
    eprintln!("| run | abort after | process | end state |");
    eprintln!("| --- | --- | --- | --- |");
    for c in &cases {
        let outcome = match &c.result {
            Ok(d) => format!(
                "converged, equal to the no-crash run ({:.1} s)",
                d.as_secs_f64()
            ),
            Err(e) => format!("FAILED: {}", e.lines().next().unwrap_or("")),
        };
        eprintln!(
            "| {} | {} | {} | {} |",
            c.kind,
            c.fault.as_deref().unwrap_or("(none)"),
            c.abort,
            outcome
        );
    }
    if let Some(why) = &broken {
        eprintln!("\nthe matrix stopped early: {why}");
    }
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            c.result.as_ref().err().map(|e| {
                format!(
                    "{} after {}: {e}",
                    c.kind,
                    c.fault.as_deref().unwrap_or("(none)")
                )
            })
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} crash cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n\n")
    );
}
