//! nicplug's idle footprint from /proc: RSS (`/proc/<pid>/status`), CPU time
//! (`/proc/<pid>/stat` utime+stime, which includes exited threads, and the
//! per-thread `schedstat` run time in ns), and context switches summed over
//! every thread (`/proc/<pid>/task/<tid>/status`: the process file only
//! counts the main thread). Sampled every `every`; a thread that appears
//! counts from zero, one that exits keeps its last sample.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[derive(Clone, Debug, Default)]
struct ThreadSample {
    comm: String,
    voluntary: u64,
    nonvoluntary: u64,
    run_ns: u64,
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn threads(pid: u32) -> BTreeMap<u32, ThreadSample> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let base = e.path();
        let Ok(status) = std::fs::read_to_string(base.join("status")) else {
            continue;
        };
        let run_ns = std::fs::read_to_string(base.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        out.insert(
            tid,
            ThreadSample {
                comm: std::fs::read_to_string(base.join("comm"))
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                voluntary: status_field(&status, "voluntary_ctxt_switches:").unwrap_or(0),
                nonvoluntary: status_field(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0),
                run_ns,
            },
        );
    }
    out
}

/// utime + stime of the whole process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        status_field(&status, "VmRSS:").unwrap_or(0),
        status_field(&status, "VmHWM:").unwrap_or(0),
    )
}

#[derive(Debug)]
pub struct Footprint {
    pub seconds: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub cpu_ticks: u64,
    pub cpu_percent: f64,
    pub run_ns: u64,
    pub voluntary: u64,
    pub nonvoluntary: u64,
    pub switches_per_s: f64,
    /// Sampling intervals in which any thread switched, merged when adjacent:
    /// (start s, end s, voluntary switches).
    pub activity: Vec<(f64, f64, u64)>,
    /// comm -> (threads, voluntary, nonvoluntary, run ns)
    pub per_thread: BTreeMap<String, (u32, u64, u64, u64)>,
    pub threads: usize,
}

/// Samples process `pid` for `window`, every `every`.
pub fn measure(pid: u32, window: Duration, every: Duration) -> Footprint {
    let tck = {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    };
    let start = Instant::now();
    let first = threads(pid);
    let ticks0 = cpu_ticks(pid).unwrap_or(0);
    let mut last = first.clone();
    let mut activity: Vec<(f64, f64, u64)> = Vec::new();
    let mut prev_total: u64 = first.values().map(|t| t.voluntary + t.nonvoluntary).sum();
    let mut prev_t = 0.0;
    while start.elapsed() < window {
        std::thread::sleep(every);
        let now = threads(pid);
        for (tid, s) in now {
            last.insert(tid, s);
        }
        let total: u64 = last.values().map(|t| t.voluntary + t.nonvoluntary).sum();
        let t = start.elapsed().as_secs_f64();
        if total > prev_total {
            let delta = total - prev_total;
            match activity.last_mut() {
                Some(a) if (a.1 - prev_t).abs() < 1e-6 => {
                    a.1 = t;
                    a.2 += delta;
                }
                _ => activity.push((prev_t, t, delta)),
            }
        }
        prev_total = total;
        prev_t = t;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ticks1 = cpu_ticks(pid).unwrap_or(ticks0);
    let (rss, hwm) = rss_kib(pid);
    let mut per_thread: BTreeMap<String, (u32, u64, u64, u64)> = BTreeMap::new();
    let (mut voluntary, mut nonvoluntary, mut run_ns) = (0, 0, 0);
    for (tid, end) in &last {
        let begin = first.get(tid).cloned().unwrap_or_default();
        let v = end.voluntary.saturating_sub(begin.voluntary);
        let nv = end.nonvoluntary.saturating_sub(begin.nonvoluntary);
        let r = end.run_ns.saturating_sub(begin.run_ns);
        voluntary += v;
        nonvoluntary += nv;
        run_ns += r;
        let e = per_thread.entry(end.comm.clone()).or_default();
        e.0 += 1;
        e.1 += v;
        e.2 += nv;
        e.3 += r;
    }
    let cpu_ticks = ticks1.saturating_sub(ticks0);
    Footprint {
        seconds,
        rss_mib: rss as f64 / 1024.0,
        hwm_mib: hwm as f64 / 1024.0,
        cpu_ticks,
        cpu_percent: cpu_ticks as f64 / tck / seconds * 100.0,
        run_ns,
        voluntary,
        nonvoluntary,
        switches_per_s: (voluntary + nonvoluntary) as f64 / seconds,
        activity,
        per_thread,
        threads: last.len(),
    }
}

impl Footprint {
    /// Gaps between the starts of consecutive activity bursts, in s.
    pub fn wake_gaps(&self) -> Vec<f64> {
        self.activity.windows(2).map(|w| w[1].0 - w[0].0).collect()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "window_s": self.seconds,
            "rss_mib": self.rss_mib,
            "rss_high_water_mib": self.hwm_mib,
            "cpu_ticks": self.cpu_ticks,
            "cpu_percent_of_one_core": self.cpu_percent,
            "cpu_run_ms_schedstat": self.run_ns as f64 / 1e6,
            "cpu_percent_schedstat": self.run_ns as f64 / 1e9 / self.seconds * 100.0,
            "voluntary_ctxt_switches": self.voluntary,
            "nonvoluntary_ctxt_switches": self.nonvoluntary,
            "ctxt_switches_per_s": self.switches_per_s,
            "threads": self.threads,
            "activity_bursts": self.activity.iter().map(|(a, b, n)| json!({"from_s": a, "to_s": b, "switches": n})).collect::<Vec<_>>(),
            "wake_gaps_s": self.wake_gaps(),
            "per_thread": self.per_thread.iter().map(|(comm, (n, v, nv, r))| json!({
                "comm": comm, "threads": n, "voluntary": v, "nonvoluntary": nv, "run_ms": *r as f64 / 1e6
            })).collect::<Vec<_>>(),
        })
    }
}
