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

/// Resident KiB per mapped file (`/proc/<pid>/smaps`), largest first.
fn top_files(pid: u32, n: usize) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut per: BTreeMap<String, u64> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // "start-end perms offset dev inode [path]"
            current = words
                .nth(4)
                .filter(|p| p.starts_with('/'))
                .map(str::to_string);
        } else if first == "Rss:"
            && let Some(path) = &current
        {
            *per.entry(path.clone()).or_default() +=
                words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<(String, u64)> = per.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v.truncate(n);
    v
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

/// VmRSS, VmHWM, RssAnon, RssFile in KiB.
fn rss_kib(pid: u32) -> [u64; 4] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    ["VmRSS:", "VmHWM:", "RssAnon:", "RssFile:"].map(|k| status_field(&status, k).unwrap_or(0))
}

/// Pss and USS (Private_Clean + Private_Dirty) in KiB, from
/// `/proc/<pid>/smaps_rollup`: what the process costs a node where the same
/// libraries are mapped by many processes (Pss shares each page among its
/// mappers; USS is what its exit would free).
fn pss_uss_kib(pid: u32) -> [u64; 2] {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |k| status_field(&rollup, k).unwrap_or(0);
    [
        field("Pss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    ]
}

#[derive(Debug, Clone)]
pub struct Activity {
    pub from_s: f64,
    pub to_s: f64,
    pub switches: u64,
    pub threads: Vec<String>,
}

#[derive(Debug)]
pub struct Footprint {
    pub seconds: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// Private memory (heap, stacks) vs pages of mapped files (shared libraries).
    pub anon_mib: f64,
    pub file_mib: f64,
    pub pss_mib: f64,
    pub uss_mib: f64,
    pub cpu_ticks: u64,
    pub cpu_percent: f64,
    pub run_ns: u64,
    pub voluntary: u64,
    pub nonvoluntary: u64,
    pub switches_per_s: f64,
    /// Sampling intervals in which any thread switched, merged when adjacent:
    /// (start s, end s, context switches, the threads that switched).
    pub activity: Vec<Activity>,
    /// The largest file mappings by resident size: (path, KiB).
    pub top_files: Vec<(String, u64)>,
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
    let mut activity: Vec<Activity> = Vec::new();
    let mut prev_t = 0.0;
    let switches = |t: &ThreadSample| t.voluntary + t.nonvoluntary;
    while start.elapsed() < window {
        std::thread::sleep(every);
        let now = threads(pid);
        let t = start.elapsed().as_secs_f64();
        let mut delta = 0;
        let mut woke = Vec::new();
        for (tid, s) in now {
            let before = last.get(&tid).map_or(0, switches);
            if switches(&s) > before {
                delta += switches(&s) - before;
                if !woke.contains(&s.comm) {
                    woke.push(s.comm.clone());
                }
            }
            last.insert(tid, s);
        }
        if delta > 0 {
            match activity.last_mut() {
                Some(a) if (a.to_s - prev_t).abs() < 1e-6 => {
                    a.to_s = t;
                    a.switches += delta;
                    for w in woke {
                        if !a.threads.contains(&w) {
                            a.threads.push(w);
                        }
                    }
                }
                _ => activity.push(Activity {
                    from_s: prev_t,
                    to_s: t,
                    switches: delta,
                    threads: woke,
                }),
            }
        }
        prev_t = t;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ticks1 = cpu_ticks(pid).unwrap_or(ticks0);
    let [rss, hwm, anon, file] = rss_kib(pid);
    let [pss, uss] = pss_uss_kib(pid);
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
        anon_mib: anon as f64 / 1024.0,
        file_mib: file as f64 / 1024.0,
        pss_mib: pss as f64 / 1024.0,
        uss_mib: uss as f64 / 1024.0,
        cpu_ticks,
        cpu_percent: cpu_ticks as f64 / tck / seconds * 100.0,
        run_ns,
        voluntary,
        nonvoluntary,
        switches_per_s: (voluntary + nonvoluntary) as f64 / seconds,
        activity,
        top_files: top_files(pid, 6),
        per_thread,
        threads: last.len(),
    }
}

impl Footprint {
    /// Gaps between the starts of consecutive activity bursts, in s.
    pub fn wake_gaps(&self) -> Vec<f64> {
        self.activity
            .windows(2)
            .map(|w| w[1].from_s - w[0].from_s)
            .collect()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "window_s": self.seconds,
            "rss_mib": self.rss_mib,
            "rss_high_water_mib": self.hwm_mib,
            "rss_anon_mib": self.anon_mib,
            "rss_file_mib": self.file_mib,
            "pss_mib": self.pss_mib,
            "uss_mib": self.uss_mib,
            "cpu_ticks": self.cpu_ticks,
            "cpu_percent_of_one_core": self.cpu_percent,
            "cpu_run_ms_schedstat": self.run_ns as f64 / 1e6,
            "cpu_percent_schedstat": self.run_ns as f64 / 1e9 / self.seconds * 100.0,
            "voluntary_ctxt_switches": self.voluntary,
            "nonvoluntary_ctxt_switches": self.nonvoluntary,
            "ctxt_switches_per_s": self.switches_per_s,
            "threads": self.threads,
            "activity_bursts": self.activity.iter().map(|a| json!({
                "from_s": a.from_s, "to_s": a.to_s, "switches": a.switches, "threads": a.threads
            })).collect::<Vec<_>>(),
            "top_file_mappings_kib": self.top_files.iter().map(|(p, k)| json!({"path": p, "rss_kib": k})).collect::<Vec<_>>(),
            "wake_gaps_s": self.wake_gaps(),
            "per_thread": self.per_thread.iter().map(|(comm, (n, v, nv, r))| json!({
                "comm": comm, "threads": n, "voluntary": v, "nonvoluntary": nv, "run_ms": *r as f64 / 1e6
            })).collect::<Vec<_>>(),
        })
    }
}
