//! Prometheus metrics of the agent: how long hot-plug and unplug take per
//! stage, how many interfaces sit in each phase, why attempts fail, how
//! often libvirt had to be reconnected, whether the agent is ready, how long
//! its passes take, and the standard `process_*` metrics.
//!
//! One [`Metrics`] lives for the whole process, shared as `Arc<Metrics>`
//! between the reconcile loop (which observes) and the API (which encodes).
//! Every method takes `&self`; the metric types are atomics, and the few
//! pieces of bookkeeping that need read-modify-write sit behind mutexes that
//! are never held across an await.
//!
//! The exposition is the OpenMetrics text that `prometheus_client` writes
//! (`# EOF` terminated, counters as `<name>_total`), served with the
//! OpenMetrics content type ([`CONTENT_TYPE`]) to a scraper that asks for
//! it (Prometheus does); anything else gets the classic text format
//! ([`Metrics::encode_text`]), which `promtool check metrics` accepts.

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

/// The content type of [`Metrics::encode_text`]'s output: Prometheus' classic
/// text format, for anything that does not ask for OpenMetrics (curl,
/// `promtool check metrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
    /// A migration target's plumbing is in place for the arriving device.
    Prepared,
    /// libvirt reported DEVICE_ADDED.
    Attached,
    /// The guest uses the interface.
    Ready,
}

impl PlugStage {
    pub fn as_str(self) -> &'static str {
        match self {
            PlugStage::Plumbed => "plumbed",
            PlugStage::Prepared => "prepared",
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NetworkLabel {
    network: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type HistogramFamily = Family<StageLabel, Histogram, fn() -> Histogram>;

/// A reconcile pass takes a netlink dump and (mostly cached) domain read,
/// plus the steps it runs: 100 us doubling 18 times, the last finite bucket
/// at 26 s.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// What the kernel says about this process, turned into the standard
/// `process_*` metrics when scraped.
struct ProcessMetrics {
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    cpu_seen: Mutex<f64>,
    resident_bytes: Gauge,
    virtual_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ProcessMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            cpu_seconds: Counter::default(),
            cpu_seen: Mutex::new(0.0),
            resident_bytes: Gauge::default(),
            virtual_bytes: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            start_time: Gauge::default(),
        };
        registry.register_with_unit(
            "process_cpu",
            "Total user and system CPU time spent",
            Unit::Seconds,
            m.cpu_seconds.clone(),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            m.resident_bytes.clone(),
        );
        registry.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            m.virtual_bytes.clone(),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            m.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            m.max_fds.clone(),
        );
        registry.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            m.start_time.clone(),
        );
        m
    }

    /// Reads `/proc/self` now; a field that cannot be read keeps its value.
    fn refresh(&self) {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .unwrap_or(100) as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096);
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            // Fields after the command name, numbered from 3 (state).
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                let total = (utime + stime) as f64 / ticks;
                let mut seen = lock(&self.cpu_seen);
                if total > *seen {
                    self.cpu_seconds.inc_by(total - *seen);
                    *seen = total;
                }
            }
            if let Some(vsize) = field(23) {
                self.virtual_bytes.set(vsize as i64);
            }
            if let Some(rss) = field(24) {
                self.resident_bytes.set(rss as i64 * page);
            }
            if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                self.start_time.set(boot + start as f64 / ticks);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            self.max_fds.set(i64::try_from(soft).unwrap_or(i64::MAX));
        }
    }
}

/// The boot time in seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|v| v as f64)
}

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
    ready: Gauge,
    libvirt_connected: Gauge,
    root_ports_free: Gauge,
    reconcile: Histogram,
    reconcile_errors: Counter,
    netlink_overflows: Counter,
    dhcp_leases: Family<NetworkLabel, Counter>,
    dhcpv6_leases: Family<NetworkLabel, Counter>,
    /// The watcher's running total, and what was already added from it.
    netlink_overflows_source: Mutex<(Option<crate::netns::watch::Overflows>, u64)>,
    process: ProcessMetrics,
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
        let build_info = Family::<VersionLabel, Gauge>::default();
        registry.register(
            "nicplug_build_info",
            "Always 1; the version label is nicplug's version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let ready = Gauge::default();
        registry.register(
            "nicplug_ready",
            "1 while libvirt, netlink and the spec are available (what /readyz answers), else 0",
            ready.clone(),
        );
        let libvirt_connected = Gauge::default();
        registry.register(
            "nicplug_libvirt_connected",
            "1 while the last pass could read the domain from libvirt, else 0",
            libvirt_connected.clone(),
        );
        let root_ports_free = Gauge::default();
        registry.register(
            "nicplug_pcie_root_ports_free",
            "Empty hot-pluggable PCIe root ports of the domain (each takes one more NIC)",
            root_ports_free.clone(),
        );
        let reconcile = reconcile_histogram();
        registry.register_with_unit(
            "nicplug_reconcile_duration",
            "Time a reconcile pass took (observe, plan, apply, status)",
            Unit::Seconds,
            reconcile.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "nicplug_reconcile_errors",
            "Reconcile passes that could not observe (libvirt or netlink not answering)",
            reconcile_errors.clone(),
        );
        let netlink_overflows = Counter::default();
        registry.register(
            "nicplug_netlink_overflows",
            "Times the kernel dropped link events (ENOBUFS); each is followed by a full re-read",
            netlink_overflows.clone(),
        );
        let dhcp_leases = Family::<NetworkLabel, Counter>::default();
        registry.register(
            "nicplug_dhcp_leases",
            "DHCPv4 leases nicplug's server acknowledged to the VM, per network",
            dhcp_leases.clone(),
        );
        let dhcpv6_leases = Family::<NetworkLabel, Counter>::default();
        registry.register(
            "nicplug_dhcpv6_leases",
            "DHCPv6 IA_NA leases nicplug's server bound for the VM (Reply to Request, Renew, Rebind or a rapid-commit Solicit), per network",
            dhcpv6_leases.clone(),
        );
        let process = ProcessMetrics::register(&mut registry);
        Self {
            dhcp_leases,
            dhcpv6_leases,
            registry,
            plug,
            unplug,
            interfaces,
            phases_seen: Mutex::new(BTreeSet::new()),
            failures,
            reasons_seen: Mutex::new(HashSet::new()),
            libvirt_reconnects,
            libvirt_reconnects_source: Mutex::new(0),
            ready,
            libvirt_connected,
            root_ports_free,
            reconcile,
            reconcile_errors,
            netlink_overflows,
            netlink_overflows_source: Mutex::new((None, 0)),
            process,
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

    /// Counts one DHCPv4 lease acknowledged to the VM on `network` (one
    /// label per VMI network: bounded by the spec).
    pub fn inc_dhcp_lease(&self, network: &str) {
        self.dhcp_leases
            .get_or_create(&NetworkLabel {
                network: network.to_owned(),
            })
            .inc();
    }

    /// Counts one DHCPv6 lease bound for the VM on `network`.
    pub fn inc_dhcpv6_lease(&self, network: &str) {
        self.dhcpv6_leases
            .get_or_create(&NetworkLabel {
                network: network.to_owned(),
            })
            .inc();
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

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn set_libvirt_connected(&self, connected: bool) {
        self.libvirt_connected.set(i64::from(connected));
    }

    /// The domain's free root ports; `None` (no domain) reads 0.
    pub fn set_root_ports_free(&self, free: Option<usize>) {
        self.root_ports_free
            .set(free.map_or(0, |f| i64::try_from(f).unwrap_or(i64::MAX)));
    }

    /// A pass took `seconds`; `completed` false: it could not observe.
    pub fn observe_reconcile(&self, seconds: f64, completed: bool) {
        self.reconcile.observe(seconds);
        if !completed {
            self.reconcile_errors.inc();
        }
    }

    /// The link watcher's overflow counter, read at every scrape.
    pub fn follow_netlink_overflows(&self, overflows: crate::netns::watch::Overflows) {
        lock(&self.netlink_overflows_source).0 = Some(overflows);
    }

    /// Brings the metrics read at scrape time up to date.
    fn refresh(&self) {
        self.process.refresh();
        let mut source = lock(&self.netlink_overflows_source);
        if let Some(total) = source.0.as_ref().map(|o| o.count())
            && total > source.1
        {
            self.netlink_overflows.inc_by(total - source.1);
            source.1 = total;
        }
    }

    /// Prometheus' classic text format (version 0.0.4): the OpenMetrics
    /// text with counters' HELP and TYPE under their sample name
    /// (`<name>_total`), without UNIT lines and `# EOF`.
    pub fn encode_text(&self) -> String {
        to_classic_text(&self.encode())
    }

    /// The exposition text, with HELP, TYPE and UNIT lines, ending in `# EOF`.
    pub fn encode(&self) -> String {
        self.refresh();
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

/// See [`Metrics::encode_text`].
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
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
