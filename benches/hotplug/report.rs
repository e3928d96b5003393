//! The benchmark's outputs: a markdown table on stdout (also written as
//! `hotplug-*.md`), the JSON with every sample, and the PNG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::footprint::Footprint;

/// Draws the report's figure into a PNG file (`plot::draw`).
pub type Plot = fn(&Report, &Path, &str) -> Result<(), Box<dyn std::error::Error>>;
use crate::stats::{PHASES, Summary, ms, round3, summarize};
use crate::{Burst, Sample, Uplink, VARIANTS};

pub struct Report<'a> {
    pub runs: usize,
    pub samples: BTreeMap<&'a str, Vec<Sample>>,
    pub bursts: Vec<Burst>,
    /// 8 back-to-back single plugs: each one's Ready, from the first update.
    pub singles: Vec<f64>,
    /// A restart with 8 plugged: the start -> all 8 Ready.
    pub restart_ms: f64,
    /// With network-status (CNI's done signal).
    pub uplinks: Vec<Uplink>,
    /// Without network-status: the settle window.
    pub uplinks_window: Vec<Uplink>,
    /// macvtap rounds (`device_added`, `ready`, `u_gone`, as the cycles').
    pub macvtap: Vec<Sample>,
    pub footprint: Footprint,
    pub machine: Value,
    pub load: (String, String),
    pub resync_s: f64,
    pub elapsed_s: f64,
}

/// What the macvtap rounds measure (keys of the cycles' samples).
const MACVTAP_KEYS: [&str; 3] = ["device_added", "ready", "u_gone"];

/// One target: its text, the measured value as text, and whether it is met.
struct Target {
    text: &'static str,
    measured: String,
    met: bool,
}

impl Report<'_> {
    pub fn values(&self, variant: &str, key: &str) -> Vec<f64> {
        self.samples
            .get(variant)
            .map(|v| v.iter().filter_map(|s| s.get(key).copied()).collect())
            .unwrap_or_default()
    }

    pub fn summary(&self, variant: &str, key: &str) -> Option<Summary> {
        summarize(&self.values(variant, key))
    }

    /// The measurements that produced no numbers (a harness failure, not a
    /// slow result): every phase of every variant (`attached` is nicplug's
    /// only), the burst, the singles, the restart, the uplink rounds.
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for v in VARIANTS {
            for ph in PHASES {
                if (v == "nicplug" || ph.key != "attached") && self.values(v, ph.key).is_empty() {
                    out.push(format!("{v} {}", ph.key));
                }
            }
        }
        let finite = |x: f64| x.is_finite() && x > 0.0;
        if self.bursts.is_empty() || !self.bursts.iter().all(|b| finite(b.all_ready_ms)) {
            out.push("burst".into());
        }
        if self.singles.len() != 8 || !self.singles.iter().all(|x| finite(*x)) {
            out.push("singles".into());
        }
        if !finite(self.restart_ms) {
            out.push("restart".into());
        }
        if self.uplinks.is_empty() {
            out.push("uplink".into());
        }
        if self.uplinks_window.is_empty() {
            out.push("uplink without network-status".into());
        }
        for key in MACVTAP_KEYS {
            if self.macvtap_summary(key).is_none() {
                out.push(format!("macvtap {key}"));
            }
        }
        if !finite(self.footprint.rss_mib) || !finite(self.footprint.pss_mib) {
            out.push("footprint".into());
        }
        out
    }

    fn burst_median(&self) -> f64 {
        summarize(
            &self
                .bursts
                .iter()
                .map(|b| b.all_ready_ms)
                .collect::<Vec<_>>(),
        )
        .map_or(f64::NAN, |s| s.p50)
    }

    fn uplink_summary(&self, f: fn(&Uplink) -> f64) -> Option<Summary> {
        summarize(&self.uplinks.iter().map(f).collect::<Vec<_>>())
    }

    fn macvtap_values(&self, key: &str) -> Vec<f64> {
        self.macvtap
            .iter()
            .filter_map(|s| s.get(key).copied())
            .collect()
    }

    fn macvtap_summary(&self, key: &str) -> Option<Summary> {
        summarize(&self.macvtap_values(key))
    }

    fn uplink_window_summary(&self, f: fn(&Uplink) -> f64) -> Option<Summary> {
        summarize(&self.uplinks_window.iter().map(f).collect::<Vec<_>>())
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let p = |v: &str, k: &str| self.summary(v, k);
        if let (Some(n), Some(f)) = (p("nicplug", "device_added"), p("floor", "device_added")) {
            let ratio = n.p50 / f.p50;
            t.push(Target {
                text: "pod interface exists -> DEVICE_ADDED: p50 within 1.2x of the floor",
                measured: format!("{} ms vs floor {} ms = {ratio:.2}x", ms(n.p50), ms(f.p50)),
                met: ratio <= 1.2,
            });
        }
        if let Some(n) = p("nicplug", "noticed") {
            t.push(Target {
                text: "pod interface exists -> nicplug noticed: p99 under 5 ms",
                measured: format!("p99 {} ms", ms(n.p99)),
                met: n.p99 < 5.0,
            });
        }
        if let Some(n) = p("nicplug", "ready") {
            t.push(Target {
                text: "pod interface exists -> status Ready: p99 under 1 s",
                measured: format!("p99 {} ms", ms(n.p99)),
                met: n.p99 < 1000.0,
            });
        }
        let worst = self
            .bursts
            .iter()
            .map(|b| b.all_ready_ms)
            .fold(0.0f64, f64::max);
        t.push(Target {
            text: "burst of 8: all Ready under 3 s",
            measured: format!("worst of {} bursts {} ms", self.bursts.len(), ms(worst)),
            met: worst < 3000.0,
        });
        if let Some(singles) = self.singles.last() {
            let burst = self.burst_median();
            t.push(Target {
                text: "burst of 8: all Ready within 1.2x of 8 back-to-back single plugs",
                measured: format!(
                    "burst median {} ms vs singles {} ms = {:.2}x",
                    ms(burst),
                    ms(*singles),
                    burst / singles
                ),
                met: burst <= 1.2 * singles,
            });
        }
        if let Some(n) = p("nicplug", "u_cleanup") {
            t.push(Target {
                text: "DEVICE_REMOVED -> all plumbing gone: p99 under 100 ms",
                measured: format!("p99 {} ms", ms(n.p99)),
                met: n.p99 < 100.0,
            });
        }
        let fp = &self.footprint;
        t.push(Target {
            text: "idle with 8 interfaces: under 0.5% of one core",
            measured: format!(
                "{:.3}% (stat ticks), {:.3}% (schedstat)",
                fp.cpu_percent,
                fp.run_ns as f64 / 1e9 / fp.seconds * 100.0
            ),
            met: fp.cpu_percent < 0.5 && (fp.run_ns as f64 / 1e9 / fp.seconds * 100.0) < 0.5,
        });
        t.push(Target {
            text: "idle with 8 interfaces: RSS under 20 MB",
            measured: format!(
                "{:.1} MiB = {:.1} MiB anonymous + {:.1} MiB file-backed (high water {:.1} MiB)",
                fp.rss_mib, fp.anon_mib, fp.file_mib, fp.hwm_mib
            ),
            met: fp.rss_mib * 1.048_576 < 20.0,
        });
        let gaps = fp.wake_gaps();
        let min_gap = gaps.iter().cloned().fold(f64::INFINITY, f64::min);
        // The agent loop runs on the main thread (`block_on`), named `nicplug`.
        let agent: Vec<f64> = fp
            .activity
            .iter()
            .filter(|a| a.threads.iter().any(|t| t == "nicplug"))
            .map(|a| a.from_s)
            .collect();
        let libvirt_only = fp
            .activity
            .iter()
            .filter(|a| a.threads.iter().all(|t| t == "libvirt-events"))
            .count();
        // Each wake-up source should fire at most once per resync period
        // (resync and guest refresh are both 30 s and may fall apart).
        let allowed = 2.0 * (fp.seconds / self.resync_s).ceil() + 1.0;
        t.push(Target {
            text: "idle with 8 interfaces: no wake-ups more frequent than the resync period (30 s)",
            measured: format!(
                "{} wake-up bursts in {:.0} s ({:.2} context switches/s), shortest gap {}; \
                 {} of them only the libvirt-events thread; the main thread (the agent loop and the tasks it runs: netlink, DHCP servers, API) woke {} times (at {})",
                fp.activity.len(),
                fp.seconds,
                fp.switches_per_s,
                if min_gap.is_finite() {
                    format!("{min_gap:.1} s")
                } else {
                    "-".into()
                },
                libvirt_only,
                agent.len(),
                agent
                    .iter()
                    .map(|t| format!("{t:.1} s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            met: (fp.activity.len() as f64) <= allowed,
        });
        t
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let _ = writeln!(
            o,
            "{} plug/unplug cycles per variant (interleaved nicplug, floor, script; 1 warm-up each discarded), {} cores, {}, kernel {}, {}; load average before/after: {} / {}; run took {:.0} s.\n",
            self.runs,
            m["cores"],
            m["cpu"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("?"),
            m["libvirt"].as_str().unwrap_or("?"),
            self.load.0,
            self.load.1,
            self.elapsed_s
        );
        let _ = writeln!(
            o,
            "| phase (ms) | nicplug p50 | p90 | p99 | floor p50 | p90 | p99 | script p50 | p90 | p99 | nicplug/floor p50 | nicplug/script p50 |"
        );
        let _ = writeln!(
            o,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for ph in PHASES {
            let mut row = format!("| {} ", ph.label.trim());
            let sums: Vec<Option<Summary>> =
                VARIANTS.iter().map(|v| self.summary(v, ph.key)).collect();
            for s in &sums {
                match s {
                    Some(s) => {
                        let _ = write!(row, "| {} | {} | {} ", ms(s.p50), ms(s.p90), ms(s.p99));
                    }
                    None => row.push_str("| - | - | - "),
                }
            }
            let ratio = |a: &Option<Summary>, b: &Option<Summary>| match (a, b) {
                (Some(a), Some(b)) if b.p50 > 0.0 => format!("{:.2}x", a.p50 / b.p50),
                _ => "-".into(),
            };
            let _ = writeln!(
                row,
                "| {} | {} |",
                ratio(&sums[0], &sums[1]),
                ratio(&sums[0], &sums[2])
            );
            o.push_str(&row);
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Burst of 8 interfaces in one VMI update (pod interfaces already there), {} runs:\n",
            self.bursts.len()
        );
        let _ = writeln!(
            o,
            "| run | first Ready (ms) | all 8 Ready (ms) | per-interface Ready (ms) | all 8 Detached after one update (ms) |"
        );
        let _ = writeln!(o, "|---:|---:|---:|---|---:|");
        for (i, b) in self.bursts.iter().enumerate() {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                i + 1,
                ms(b.first_ready_ms),
                ms(b.all_ready_ms),
                b.ready_ms
                    .iter()
                    .map(|x| ms(*x))
                    .collect::<Vec<_>>()
                    .join(", "),
                b.all_gone_ms.map_or("-".into(), ms)
            );
        }
        if let Some(last) = self.singles.last() {
            let _ = writeln!(
                o,
                "\n8 back-to-back single plugs in the same run (pod interfaces already there; each VMI update once the previous interface is Ready): all 8 Ready {} ms (each: {}); the burst's median {} ms is {:.2}x of it.",
                ms(*last),
                self.singles
                    .iter()
                    .map(|x| ms(*x))
                    .collect::<Vec<_>>()
                    .join(", "),
                ms(self.burst_median()),
                self.burst_median() / last
            );
        }
        let _ = writeln!(
            o,
            "\nA restart of nicplug with the 8 interfaces plugged: all 8 Ready {} ms after the new process started.",
            ms(self.restart_ms)
        );
        if let (Some(first), Some(ready)) = (
            self.uplink_summary(|u| u.first_packet_ms),
            self.uplink_summary(|u| u.ready_ms),
        ) {
            let _ = writeln!(
                o,
                "\nWhen the user's network works, {} rounds with network-status (CNI's done signal): pod interface appears -> the first packet from the node reaches the guest p50 {} / p90 {} / max {} ms (an ICMPv6 echo every {} ms to the NIC's link-local address, answered only by the guest); -> Ready p50 {} ms.",
                first.n,
                ms(first.p50),
                ms(first.p90),
                ms(first.max),
                crate::ECHO_EVERY.as_millis(),
                ms(ready.p50)
            );
        }
        if let (Some(first), Some(ready)) = (
            self.uplink_window_summary(|u| u.first_packet_ms),
            self.uplink_window_summary(|u| u.ready_ms),
        ) {
            let _ = writeln!(
                o,
                "Without network-status (the {} ms settle window), {} rounds: -> first packet p50 {} / p90 {} / max {} ms; -> Ready p50 {} ms.\n",
                nicplug::plan::CNI_SETTLE.as_millis(),
                first.n,
                ms(first.p50),
                ms(first.p90),
                ms(first.max),
                ms(ready.p50)
            );
        }
        if let (Some(added), Some(ready), Some(gone)) = (
            self.macvtap_summary("device_added"),
            self.macvtap_summary("ready"),
            self.macvtap_summary("u_gone"),
        ) {
            let bridge = |key| self.summary("nicplug", key).map_or(f64::NAN, |s| s.p50);
            let _ = writeln!(
                o,
                "\nA macvtap NIC (KubeVirt's macvtap binding: no bridge or tap to build), {} rounds: pod interface appears -> DEVICE_ADDED p50 {} ms (bridge {} ms, {:.2}x), -> Ready p50 {} / p99 {} ms (bridge p50 {} ms, {:.2}x); unplug -> gone p50 {} ms (bridge {} ms).\n",
                added.n,
                ms(added.p50),
                ms(bridge("device_added")),
                added.p50 / bridge("device_added"),
                ms(ready.p50),
                ms(ready.p99),
                ms(bridge("ready")),
                ready.p50 / bridge("ready"),
                ms(gone.p50),
                ms(bridge("u_gone"))
            );
        }
        let fp = &self.footprint;
        let _ = writeln!(
            o,
            "\nIdle footprint, 8 interfaces plugged, {:.0} s: RSS {:.1} MiB ({:.1} MiB anonymous, {:.1} MiB file-backed: shared libraries; high water {:.1} MiB), PSS {:.1} MiB, USS {:.1} MiB (what 100 launcher pods pay: about {:.0} MiB, the shared libraries counted once per node), CPU {} ticks = {:.3}% of one core (schedstat: {:.1} ms = {:.3}%), {} voluntary + {} involuntary context switches over {} threads = {:.2}/s; wake-up bursts at {}.\n",
            fp.seconds,
            fp.rss_mib,
            fp.anon_mib,
            fp.file_mib,
            fp.hwm_mib,
            fp.pss_mib,
            fp.uss_mib,
            100.0 * fp.uss_mib + (fp.rss_mib - fp.uss_mib),
            fp.cpu_ticks,
            fp.cpu_percent,
            fp.run_ns as f64 / 1e6,
            fp.run_ns as f64 / 1e9 / fp.seconds * 100.0,
            fp.voluntary,
            fp.nonvoluntary,
            fp.threads,
            fp.switches_per_s,
            if fp.activity.is_empty() {
                "none".to_string()
            } else {
                fp.activity
                    .iter()
                    .map(|a| {
                        format!(
                            "{:.1} s ({}: {})",
                            a.from_s,
                            a.switches,
                            a.threads.join("+")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        let _ = writeln!(
            o,
            "Largest resident file mappings: {}.\n",
            fp.top_files
                .iter()
                .map(|(p, k)| format!("{} {:.1} MiB", p, *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(o, "| thread | count | voluntary | involuntary | CPU ms |");
        let _ = writeln!(o, "|---|---:|---:|---:|---:|");
        for (comm, (n, v, nv, r)) in &fp.per_thread {
            let _ = writeln!(o, "| {comm} | {n} | {v} | {nv} | {:.2} |", *r as f64 / 1e6);
        }
        let _ = writeln!(o, "\n| target | measured | |\n|---|---|---|");
        for t in self.targets() {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                t.text,
                t.measured,
                if t.met { "met" } else { "**missed**" }
            );
        }
        o
    }

    pub fn json(&self, date: &str) -> Value {
        let mut variants = serde_json::Map::new();
        for v in VARIANTS {
            let mut phases = serde_json::Map::new();
            for ph in PHASES {
                let xs = self.values(v, ph.key);
                if let Some(s) = summarize(&xs) {
                    phases.insert(ph.key.to_string(), s.to_json(&xs));
                }
            }
            variants.insert(v.to_string(), Value::Object(phases));
        }
        json!({
            "date": date,
            "command": "scripts/bench",
            "machine": self.machine,
            "load_average": {"before": self.load.0, "after": self.load.1},
            "runs_per_variant": self.runs,
            "elapsed_s": self.elapsed_s,
            "phases": PHASES.iter().map(|p| json!({"key": p.key, "label": p.label.trim()})).collect::<Vec<_>>(),
            "variants": variants,
            "burst": self.bursts.iter().map(|b| json!({
                "first_ready_ms": round3(b.first_ready_ms),
                "all_ready_ms": round3(b.all_ready_ms),
                "ready_ms": b.ready_ms.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                "all_detached_ms": b.all_gone_ms.map(round3),
            })).collect::<Vec<_>>(),
            "singles_ready_ms": self.singles.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
            "restart_all_ready_ms": round3(self.restart_ms),
            "uplink": self.uplinks.iter().map(|u| json!({
                "exists_to_ready_ms": round3(u.ready_ms),
                "exists_to_first_packet_ms": round3(u.first_packet_ms),
            })).collect::<Vec<_>>(),
            "uplink_without_network_status": self.uplinks_window.iter().map(|u| json!({
                "exists_to_ready_ms": round3(u.ready_ms),
                "exists_to_first_packet_ms": round3(u.first_packet_ms),
            })).collect::<Vec<_>>(),
            "macvtap": MACVTAP_KEYS.iter().filter_map(|key| {
                let xs = self.macvtap_values(key);
                summarize(&xs).map(|s| (key.to_string(), s.to_json(&xs)))
            }).collect::<serde_json::Map<_, _>>(),
            "footprint": self.footprint.to_json(),
            "targets": self.targets().iter().map(|t| json!({
                "target": t.text, "measured": t.measured, "met": t.met
            })).collect::<Vec<_>>(),
        })
    }

    /// Writes everything under `dir`, the plot through `plot`; returns the
    /// file stem used.
    pub fn write(&self, dir: &Path, plot: Plot) -> String {
        let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let stem = format!("hotplug-{}", date.replace(':', ""));
        std::fs::create_dir_all(dir).unwrap();
        let md = format!("# hotplug benchmark, {date}\n\n{}", self.markdown());
        println!("\n{md}");
        let json = serde_json::to_string_pretty(&self.json(&date)).unwrap();
        let png = dir.join(format!("{stem}.png"));
        for (name, body) in [
            (format!("{stem}.json"), json.as_str()),
            (format!("{stem}.md"), md.as_str()),
        ] {
            std::fs::write(dir.join(&name), body).unwrap();
        }
        if let Err(e) = plot(self, &png, &date) {
            eprintln!("bench: no plot: {e}");
        }
        for ext in ["json", "md", "png"] {
            let latest = dir.join(format!("hotplug-latest.{ext}"));
            let _ = std::fs::remove_file(&latest);
            let _ = std::fs::copy(dir.join(format!("{stem}.{ext}")), &latest);
        }
        println!(
            "results: {}/{stem}.{{json,md,png}} (and hotplug-latest.*)",
            dir.display()
        );
        stem
    }
}
