//! Hot-plug and unplug latency on the rig, as nicplug and libvirt see them:
//! N plug/unplug cycles of one network, reporting medians and p90.
//! Reports numbers only; run with `cargo run --example latency [N]` as root.
//!
//! DEVICE_ADDED/DEVICE_REMOVED times come from an independent `virsh event`
//! listener (libvirt's own timestamps, ms resolution); the guest-agent time
//! is bounded below by the agent query round trip (~tens of ms with virsh).

#[path = "../tests/e2e/mod.rs"]
mod e2e;
#[path = "../tests/support/mod.rs"]
mod support;

use nicplug::plan::Phase;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::{Nicplug, pod_iface};
use support::{CniNet, Rig, RigOptions};

/// Milliseconds since the epoch of a virsh event timestamp
/// (`2026-11-27 21:40:01.123+0000`).
fn parse_virsh_time(line: &str) -> Option<f64> {
    let stamp = line.split("+0000").next()?;
    let (date, time) = stamp.split_once(' ')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // days from civil (Howard Hinnant's algorithm)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days as f64 * 86_400_000.0 + h * 3_600_000.0 + min * 60_000.0 + sec * 1000.0)
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn summary(name: &str, mut xs: Vec<f64>) {
    xs.sort_by(f64::total_cmp);
    let pick = |q: f64| xs[((xs.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<48} n={:<3} p50={:>8.1} ms  p90={:>8.1} ms  max={:>8.1} ms",
        xs.len(),
        pick(0.5),
        pick(0.9),
        pick(1.0)
    );
}

fn main() {
    if !support::require_root() {
        std::process::exit(1);
    }
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let rig = Rig::start(RigOptions {
        root_ports: 6,
        ..RigOptions::default()
    });
    let mut listener = rig
        .pod_cmd("virsh")
        .args([
            "-c",
            &rig.libvirt_uri,
            "event",
            "--domain",
            &rig.domain,
            "--loop",
            "--timestamp",
            "--all",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, events) = mpsc::channel::<(String, f64)>();
    let stdout = listener.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(t) = parse_virsh_time(&line) {
                let _ = tx.send((line, t));
            }
        }
    });
    let wait_event = |kind: &str| -> f64 {
        loop {
            let (line, t) = events
                .recv_timeout(Duration::from_secs(30))
                .expect("libvirt event");
            if line.contains(kind) {
                return t;
            }
        }
    };

    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    nicplug.wait_phase("default", Phase::NotManaged, Duration::from_secs(10));
    let net = CniNet::new(1);
    let network = "dyniface1";
    let (mut to_added, mut to_status, mut to_ready, mut to_guest) =
        (vec![], vec![], vec![], vec![]);
    let (mut to_removed, mut to_clean) = (vec![], vec![]);
    for _ in 0..runs {
        nicplug.set_spec(&[network]);
        nicplug.wait_phase(network, Phase::Pending, Duration::from_secs(10));
        let cni = rig.cni_add(&net, &pod_iface(network));
        let created = now_ms();
        let status = nicplug.wait_phase(network, Phase::Attached, Duration::from_secs(20));
        let _ = status;
        to_status.push(now_ms() - created);
        to_added.push(wait_event("device-added") - created);
        nicplug.wait_phase(network, Phase::Ready, Duration::from_secs(20));
        to_ready.push(now_ms() - created);
        rig.wait_guest_mac(&cni.mac, Duration::from_secs(30))
            .expect("guest sees the NIC");
        to_guest.push(now_ms() - created);

        let changed = now_ms();
        nicplug.set_spec(&[]);
        nicplug.wait_gone(network, Duration::from_secs(30));
        to_clean.push(now_ms() - changed);
        to_removed.push(wait_event("device-removed") - changed);
        rig.cni_del(&net, &pod_iface(network));
    }
    println!(
        "\n{} plug/unplug cycles, {} cores",
        runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    summary("pod interface created -> DEVICE_ADDED", to_added);
    summary("pod interface created -> status Attached", to_status);
    summary("pod interface created -> status Ready", to_ready);
    summary(
        "pod interface created -> harness's agent query sees MAC",
        to_guest,
    );
    summary("spec change -> DEVICE_REMOVED", to_removed);
    summary("spec change -> all plumbing gone (entry gone)", to_clean);

    // Idle footprint with 4 interfaces plugged.
    let idle_networks = ["idle1", "idle2", "idle3", "idle4"];
    nicplug.set_spec(&idle_networks);
    for (i, network) in idle_networks.iter().enumerate() {
        rig.cni_add(&CniNet::new(40 + i as u8), &pod_iface(network));
    }
    for network in idle_networks {
        nicplug.wait_phase(network, Phase::Ready, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    let pid = nicplug.pid().unwrap();
    let before = footprint(pid);
    let idle = Duration::from_secs(60);
    std::thread::sleep(idle);
    let after = footprint(pid);
    let ticks = (after.cpu_ticks - before.cpu_ticks) as f64;
    let hz = 100.0; // USER_HZ
    println!(
        "idle {}s with 4 interfaces Ready: CPU {:.3}% of one core, {} voluntary context switches, RSS {} kB",
        idle.as_secs(),
        ticks / hz / idle.as_secs_f64() * 100.0,
        after.switches_since(&before),
        after.rss_kb
    );
    nicplug.stop();
    let _ = listener.kill();
    let _ = listener.wait();
}

struct Footprint {
    cpu_ticks: u64,
    /// Voluntary context switches per thread id.
    switches: std::collections::HashMap<String, u64>,
    rss_kb: u64,
}

impl Footprint {
    /// Voluntary context switches since `before`, over threads alive in both.
    fn switches_since(&self, before: &Footprint) -> u64 {
        self.switches
            .iter()
            .filter_map(|(tid, n)| before.switches.get(tid).map(|b| n.saturating_sub(*b)))
            .sum()
    }
}

/// CPU time (utime + stime of all threads), voluntary context switches per
/// thread, and RSS of a process.
fn footprint(pid: u32) -> Footprint {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let cpu_ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let mut switches = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if let Some(n) = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            switches.insert(task.file_name().to_string_lossy().into_owned(), n);
        }
    }
    let rss_kb = e2e::rss_kb(pid);
    Footprint {
        cpu_ticks,
        switches,
        rss_kb,
    }
}
