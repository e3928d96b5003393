//! Prometheus metrics of the agent: how long hot-plug and unplug take per
//! stage, how many interfaces sit in each phase, why attempts fail, and how
//! often libvirt had to be reconnected.
//!
//! One [`Metrics`] lives for the whole process, shared as `Arc<Metrics>`
//! between the reconcile loop (which observes) and the API (which encodes).
//! Every method takes `&self`; the metric types are atomics, and the few
//! pieces of bookkeeping that need read-modify-write sit behind mutexes that
//! are never held across an await.
//!
//! The exposition is the OpenMetrics text that `prometheus_client` writes
//! (`# EOF` terminated, counters as `<name>_total`), served with the
//! OpenMetrics content type ([`CONTENT_TYPE`]) so Prometheus picks the
//! matching parser; classic text parsers read it too.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// At most this many distinct `reason` labels on `nicplug_failures_total`;
/// later ones are counted as [`OTHER_REASON`]. Reasons are meant to be step
/// names, so this only bites if a caller passes free text, and then it keeps
/// a bad caller from growing the series without bound.
pub const MAX_FAILURE_REASONS: usize = 32;

/// The `reason` label used once [`MAX_FAILURE_REASONS`] is reached.
pub const OTHER_REASON: &str = "other";

/// A stage of a hot-plug, timed from the moment nicplug first saw the pod
/// interface (`InterfaceStatus::pod_interface_seen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlugStage {
    /// Bridge, pod link and tap are in place.
    Plumbed,
    /// libvirt reported DEVICE_ADDED.
    Attached,
    /// The guest uses the interface.
    Ready,
}

impl PlugStage {
    pub fn as_str(self) -> &'static str {
        match self {
            PlugStage::Plumbed => "plumbed",
            PlugStage::Attached => "attached",
            PlugStage::Ready => "ready",
        }
    }
}

/// A stage of an unplug, timed from the unplug request (the spec saying
/// `absent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnplugStage {
    /// libvirt reported DEVICE_REMOVED.
    Removed,
    /// The plumbing is gone and the pod link is restored.
    Cleaned,
}

impl UnplugStage {
    pub fn as_str(self) -> &'static str {
        match self {
            UnplugStage::Removed => "removed",
            UnplugStage::Cleaned => "cleaned",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

type HistogramFamily = Family<StageLabel, Histogram, fn() -> Histogram>;

/// Hot-plug latencies span a netlink round trip (about a millisecond) to a
/// guest that takes its time (tens of seconds): 1 ms doubling 17 times, the
/// last finite bucket at 65.5 s.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The agent's metrics; see the module doc.
pub struct Metrics {
    registry: Registry,
    plug: HistogramFamily,
    unplug: HistogramFamily,
    interfaces: Family<PhaseLabel, Gauge>,
    /// Every phase ever given to `set_interfaces_per_phase`, so phases that
    /// dropped out are set to 0 instead of keeping their last value.
    phases_seen: Mutex<BTreeSet<String>>,
    failures: Family<ReasonLabel, Counter>,
    reasons_seen: Mutex<HashSet<String>>,
    libvirt_reconnects: Counter,
    /// The last running total passed to `set_libvirt_reconnects`.
    libvirt_reconnects_source: Mutex<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let plug = HistogramFamily::new_with_constructor(stage_histogram);
        registry.register_with_unit(
            "nicplug_plug_stage",
            "Time from first seeing the pod interface to reaching the stage",
            Unit::Seconds,
            plug.clone(),
        );
        let unplug = HistogramFamily::new_with_constructor(stage_histogram);
        registry.register_with_unit(
            "nicplug_unplug_stage",
            "Time from the unplug request to reaching the stage",
            Unit::Seconds,
            unplug.clone(),
        );
        let interfaces = Family::<PhaseLabel, Gauge>::default();
        registry.register(
            "nicplug_interfaces",
            "Spec interfaces per phase",
            interfaces.clone(),
        );
        let failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "nicplug_failures",
            "Failed plug or unplug attempts by the step that failed",
            failures.clone(),
        );
        let libvirt_reconnects = Counter::default();
        registry.register(
            "nicplug_libvirt_reconnects",
            "Times the libvirt connection was lost and reopened",
            libvirt_reconnects.clone(),
        );
        Self {
            registry,
            plug,
            unplug,
            interfaces,
            phases_seen: Mutex::new(BTreeSet::new()),
            failures,
            reasons_seen: Mutex::new(HashSet::new()),
            libvirt_reconnects,
            libvirt_reconnects_source: Mutex::new(0),
        }
    }

    /// Records that an interface reached `stage` `seconds` after its pod
    /// interface was first seen.
    pub fn observe_plug(&self, stage: PlugStage, seconds: f64) {
        self.plug
            .get_or_create(&StageLabel {
                stage: stage.as_str(),
            })
            .observe(seconds);
    }

    /// Records that an unplug reached `stage` `seconds` after it was
    /// requested.
    pub fn observe_unplug(&self, stage: UnplugStage, seconds: f64) {
        self.unplug
            .get_or_create(&StageLabel {
                stage: stage.as_str(),
            })
            .observe(seconds);
    }

    /// Replaces the per-phase interface counts. Phases seen before but absent
    /// from `counts` read 0, so a dashboard never shows an interface in a
    /// phase it left.
    pub fn set_interfaces_per_phase(&self, counts: &[(String, i64)]) {
        let mut seen = lock(&self.phases_seen);
        for (phase, _) in counts {
            if !seen.contains(phase) {
                seen.insert(phase.clone());
            }
        }
        for phase in seen.iter() {
            let value = counts
                .iter()
                .filter(|(p, _)| p == phase)
                .map(|(_, n)| *n)
                .sum();
            self.interfaces
                .get_or_create(&PhaseLabel {
                    phase: phase.clone(),
                })
                .set(value);
        }
    }

    /// Counts one failed attempt. `reason` should be a short, bounded label
    /// such as the name of the step that failed, not an error message.
    pub fn inc_failure(&self, reason: &str) {
        let reason = {
            let mut seen = lock(&self.reasons_seen);
            if seen.contains(reason) {
                reason
            } else if seen.len() < MAX_FAILURE_REASONS {
                seen.insert(reason.to_owned());
                reason
            } else {
                tracing::debug!(reason, "too many failure reasons, counted as other");
                OTHER_REASON
            }
        };
        self.failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Takes libvirt's running reconnect total. The exposed counter grows by
    /// the difference to the last call; if the total went down (a new libvirt
    /// connection object starting at 0), the new total is added, so the
    /// counter stays monotonic for Prometheus' `rate()`.
    pub fn set_libvirt_reconnects(&self, total: u64) {
        let mut last = lock(&self.libvirt_reconnects_source);
        let delta = if total >= *last { total - *last } else { total };
        *last = total;
        if delta > 0 {
            self.libvirt_reconnects.inc_by(delta);
        }
    }

    /// The exposition text, with HELP, TYPE and UNIT lines, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; a formatting error would come
        // from a metric's own encoder, and then the partial text is still the
        // best answer to give a scraper.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        text
    }
}

/// A poisoned lock here only means another thread panicked while updating a
/// set of label names; the set itself is still usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    use prometheus_parse::{Scrape, Value};

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
    }

    fn value(scrape: &Scrape, metric: &str, label: (&str, &str)) -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == metric && s.labels.get(label.0) == Some(label.1))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                other => panic!("{metric} is not a single value: {other:?}"),
            })
    }

    #[test]
    fn encodes_histograms_with_help_type_and_buckets() {
        let m = Metrics::new();
        m.observe_plug(PlugStage::Plumbed, 0.004);
        m.observe_plug(PlugStage::Attached, 0.375);
        m.observe_plug(PlugStage::Attached, 0.5);
        m.observe_plug(PlugStage::Ready, 2.0);
        m.observe_unplug(UnplugStage::Removed, 1.5);
        m.observe_unplug(UnplugStage::Cleaned, 1.6);
        let text = m.encode();
        assert!(
            text.contains("# HELP nicplug_plug_stage_seconds "),
            "{text}"
        );
        assert!(text.contains("# TYPE nicplug_plug_stage_seconds histogram"));
        assert!(text.contains("# TYPE nicplug_unplug_stage_seconds histogram"));
        assert!(text.trim_end().ends_with("# EOF"));

        let scrape = parse(&text);
        let attached = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "nicplug_plug_stage_seconds"
                    && s.labels.get("stage") == Some("attached")
            })
            .expect("attached histogram");
        let Value::Histogram(buckets) = &attached.value else {
            panic!("not a histogram: {:?}", attached.value);
        };
        // 17 finite buckets from 1 ms plus +Inf.
        assert_eq!(buckets.len(), 18, "{buckets:?}");
        assert_eq!(buckets[0].less_than, 0.001);
        assert!(buckets[16].less_than > 60.0 && buckets[16].less_than < 70.0);
        assert!(buckets[17].less_than.is_infinite());
        let at = |le: f64| {
            buckets
                .iter()
                .find(|b| b.less_than >= le)
                .map(|b| b.count)
                .unwrap()
        };
        assert_eq!(at(0.256), 0.0);
        assert_eq!(at(0.512), 2.0);
        assert_eq!(buckets[17].count, 2.0);
        assert_eq!(
            value(
                &scrape,
                "nicplug_plug_stage_seconds_count",
                ("stage", "attached")
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &scrape,
                "nicplug_plug_stage_seconds_sum",
                ("stage", "attached")
            ),
            Some(0.875)
        );
        for stage in ["removed", "cleaned"] {
            assert_eq!(
                value(
                    &scrape,
                    "nicplug_unplug_stage_seconds_count",
                    ("stage", stage)
                ),
                Some(1.0),
                "{stage}"
            );
        }
    }

    #[test]
    fn phase_gauges_reset_to_zero() {
        let m = Metrics::new();
        m.set_interfaces_per_phase(&[("Pending".into(), 2), ("Attached".into(), 1)]);
        let scrape = parse(&m.encode());
        assert_eq!(
            value(&scrape, "nicplug_interfaces", ("phase", "Pending")),
            Some(2.0)
        );
        m.set_interfaces_per_phase(&[("Attached".into(), 3)]);
        let text = m.encode();
        assert!(text.contains("# TYPE nicplug_interfaces gauge"), "{text}");
        let scrape = parse(&text);
        assert_eq!(
            value(&scrape, "nicplug_interfaces", ("phase", "Pending")),
            Some(0.0)
        );
        assert_eq!(
            value(&scrape, "nicplug_interfaces", ("phase", "Attached")),
            Some(3.0)
        );
        m.set_interfaces_per_phase(&[]);
        let scrape = parse(&m.encode());
        assert_eq!(
            value(&scrape, "nicplug_interfaces", ("phase", "Attached")),
            Some(0.0)
        );
    }

    #[test]
    fn failures_and_reconnects_are_counters() {
        let m = Metrics::new();
        m.inc_failure("attach");
        m.inc_failure("attach");
        m.inc_failure("ensure_tap");
        m.set_libvirt_reconnects(2);
        m.set_libvirt_reconnects(3);
        // A new connection object restarts its total; the counter must not
        // go down.
        m.set_libvirt_reconnects(1);
        let text = m.encode();
        assert!(text.contains("# TYPE nicplug_failures counter"), "{text}");
        assert!(text.contains("# TYPE nicplug_libvirt_reconnects counter"));
        let scrape = parse(&text);
        assert_eq!(
            value(&scrape, "nicplug_failures_total", ("reason", "attach")),
            Some(2.0)
        );
        assert_eq!(
            value(&scrape, "nicplug_failures_total", ("reason", "ensure_tap")),
            Some(1.0)
        );
        let reconnects = scrape
            .samples
            .iter()
            .find(|s| s.metric == "nicplug_libvirt_reconnects_total")
            .expect("reconnects sample");
        assert!(matches!(
            reconnects.value,
            Value::Counter(4.0) | Value::Untyped(4.0)
        ));
    }

    #[test]
    fn failure_reasons_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_FAILURE_REASONS + 5 {
            m.inc_failure(&format!("r{i}"));
        }
        let scrape = parse(&m.encode());
        let series = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "nicplug_failures_total")
            .count();
        assert_eq!(series, MAX_FAILURE_REASONS + 1);
        assert_eq!(
            value(&scrape, "nicplug_failures_total", ("reason", OTHER_REASON)),
            Some(5.0)
        );
    }
}
