//! Percentiles and the phase catalogue of the benchmark.

use serde_json::{Value, json};

/// A measured phase: its key in samples, its label, and which group it is in.
pub struct PhaseDef {
    pub key: &'static str,
    pub label: &'static str,
    /// Short label for the plot.
    pub short: &'static str,
}

/// Plug phases are measured from "pod interface exists" (the harness's own
/// RTM_NEWLINK), unplug phases from "VMI changed / unplug requested".
pub const PHASES: &[PhaseDef] = &[
    PhaseDef {
        key: "cni_returned",
        label: "plug: exists -> CNI ADD returned (context)",
        short: "exists->CNI ADD returned",
    },
    PhaseDef {
        key: "noticed",
        label: "plug: exists -> noticed",
        short: "exists->noticed",
    },
    PhaseDef {
        key: "plumbed",
        label: "plug: exists -> plumbing done",
        short: "exists->plumbed",
    },
    PhaseDef {
        key: "device_added",
        label: "plug: exists -> DEVICE_ADDED",
        short: "exists->DEVICE_ADDED",
    },
    PhaseDef {
        key: "attach_returned",
        label: "plug: exists -> attach call returned",
        short: "exists->attach returned",
    },
    PhaseDef {
        key: "attached",
        label: "plug: exists -> status Attached",
        short: "exists->Attached",
    },
    PhaseDef {
        key: "ready",
        label: "plug: exists -> guest reports MAC (Ready)",
        short: "exists->Ready",
    },
    PhaseDef {
        key: "s_plumbing",
        label: "  step: noticed -> plumbing done",
        short: "noticed->plumbed",
    },
    PhaseDef {
        key: "s_attach",
        label: "  step: plumbing done -> DEVICE_ADDED",
        short: "plumbed->DEVICE_ADDED",
    },
    PhaseDef {
        key: "s_guest",
        label: "  step: DEVICE_ADDED -> Ready",
        short: "DEVICE_ADDED->Ready",
    },
    PhaseDef {
        key: "u_detach",
        label: "unplug: changed -> detach requested",
        short: "changed->detach req",
    },
    PhaseDef {
        key: "u_removed",
        label: "unplug: changed -> DEVICE_REMOVED",
        short: "changed->DEVICE_REMOVED",
    },
    PhaseDef {
        key: "u_gone",
        label: "unplug: changed -> all plumbing gone",
        short: "changed->plumbing gone",
    },
    PhaseDef {
        key: "u_cleanup",
        label: "  step: DEVICE_REMOVED -> all plumbing gone",
        short: "DEVICE_REMOVED->gone",
    },
];

/// Linear-interpolated percentile (numpy's default) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

pub fn summarize(xs: &[f64]) -> Option<Summary> {
    if xs.is_empty() {
        return None;
    }
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    Some(Summary {
        n: s.len(),
        p50: percentile(&s, 0.5),
        p90: percentile(&s, 0.9),
        p99: percentile(&s, 0.99),
        min: s[0],
        max: s[s.len() - 1],
    })
}

impl Summary {
    pub fn to_json(&self, samples: &[f64]) -> Value {
        json!({
            "n": self.n, "p50_ms": round3(self.p50), "p90_ms": round3(self.p90),
            "p99_ms": round3(self.p99), "min_ms": round3(self.min), "max_ms": round3(self.max),
            "samples_ms": samples.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        })
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `12.3` style, with more digits for small numbers.
pub fn ms(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}
