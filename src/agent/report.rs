//! Turning each pass's outcome into the published status: KubeVirt's fields
//! from the domain, the guest agent and Multus (`status::enrich`), the time
//! each phase was entered, the metrics, and when to ask the guest agent next.
//!
//! The guest agent is asked when something may have changed (a device or
//! agent event marked the view stale), fast whenever an interface becomes
//! Attached (20 ms, doubling to 2 s, for up to 30 s) until the guest reports
//! the new MAC, and otherwise every `guest_refresh`. Idle, nothing wakes more
//! often than that.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::error_chain;
use crate::hypervisor::{DomainState, GuestView, Hypervisor};
use crate::metrics::{Metrics, PlugStage, UnplugStage};
use crate::plan::Phase;
use crate::sources::network_status::NetworkStatus;
use crate::status::{
    InterfaceStatus, PhaseTransition, Sources, StatusDocument, Timestamp, enrich, guest_only,
    monotonic_ns, write_atomically,
};

const FAST_POLL_FIRST: Duration = Duration::from_millis(20);
const FAST_POLL_MAX: Duration = Duration::from_secs(2);
const FAST_POLL_FOR: Duration = Duration::from_secs(30);

/// How an interface's plug or unplug ended, for operators (Kubernetes
/// Events): sent once per outcome, when the phase changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The VMI interface.
    pub interface: String,
    pub kind: OutcomeKind,
    /// What happened, with the phase durations (`plugged in 0.041s: plumbed
    /// 0.004s, attached 0.031s, ready 0.127s`) or the failure's message.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// The guest sees the NIC (Ready), or the device is attached and the
    /// guest has no agent to confirm it.
    Plugged,
    Unplugged,
    /// Failed or DetachPending.
    Failed,
}

/// Where the status goes and what it reads besides the plan.
#[derive(Debug, Clone, Default)]
pub struct ReportConfig {
    /// Plug and unplug outcomes, for Kubernetes Events.
    pub outcomes: Option<tokio::sync::mpsc::UnboundedSender<Outcome>>,
    pub status_file: Option<PathBuf>,
    pub status_tx: Option<watch::Sender<StatusDocument>>,
    pub metrics: Option<Arc<Metrics>>,
    pub network_status: Option<watch::Receiver<Option<Vec<NetworkStatus>>>>,
    /// How often the guest agent is asked when nothing else prompts it.
    pub guest_refresh: Duration,
}

#[derive(Debug, Default)]
struct History {
    pod_seen: Option<Timestamp>,
    transitions: Vec<PhaseTransition>,
    unplug_started: Option<Timestamp>,
}

#[derive(Debug)]
struct FastPoll {
    next: Instant,
    interval: Duration,
    until: Instant,
}

pub struct Reporter {
    config: ReportConfig,
    doc: StatusDocument,
    history: HashMap<String, History>,
    guest: Option<GuestView>,
    guest_read_at: Option<Instant>,
    guest_stale: Arc<AtomicBool>,
    fast_poll: Option<FastPoll>,
}

fn seconds_since(t: &Timestamp) -> f64 {
    monotonic_ns().saturating_sub(t.monotonic_ns) as f64 / 1e9
}

impl Reporter {
    pub fn new(config: ReportConfig) -> Self {
        Self {
            config,
            doc: StatusDocument::default(),
            history: HashMap::new(),
            guest: None,
            guest_read_at: None,
            guest_stale: Arc::default(),
            fast_poll: None,
        }
    }

    pub fn document(&self) -> &StatusDocument {
        &self.doc
    }

    /// Set this flag (from a domain-event listener) to have the guest agent
    /// asked again on the next pass.
    pub fn guest_stale_flag(&self) -> Arc<AtomicBool> {
        self.guest_stale.clone()
    }

    /// When the loop must run again for the guest agent.
    pub fn next_wake(&self) -> Option<Instant> {
        let refresh = self.guest_read_at.map(|t| t + self.config.guest_refresh);
        match (self.fast_poll.as_ref().map(|p| p.next), refresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The pass observed the pod interface of a plug attempt at `at`.
    pub fn pod_seen(&mut self, name: &str, at: Timestamp) {
        let history = self.history.entry(name.to_string()).or_default();
        history.pod_seen.get_or_insert(at);
    }

    pub fn detach_started(&mut self, name: &str) {
        let history = self.history.entry(name.to_string()).or_default();
        history.unplug_started.get_or_insert_with(Timestamp::now);
    }

    /// DEVICE_REMOVED (or the device left the live XML).
    pub fn device_removed(&mut self, name: &str) {
        self.guest_stale.store(true, Ordering::SeqCst);
        if let (Some(metrics), Some(started)) = (
            &self.config.metrics,
            self.history
                .get(name)
                .and_then(|h| h.unplug_started.as_ref()),
        ) {
            metrics.observe_unplug(UnplugStage::Removed, seconds_since(started));
        }
    }

    pub fn failure(&self, reason: &str) {
        if let Some(metrics) = &self.config.metrics {
            metrics.inc_failure(reason);
        }
    }

    /// Publishes a phase entered in the middle of a pass (Plumbed, right
    /// before the attach call).
    pub fn enter_now(&mut self, name: &str, phase: Phase) {
        let existing = self.doc.interfaces.iter().position(|i| i.name == name);
        let mut entry = match existing {
            Some(index) => self.doc.interfaces[index].clone(),
            // First pass for this interface: nothing published yet.
            None => InterfaceStatus::new(name, phase),
        };
        entry.phase = phase;
        entry.message = None;
        self.record(&mut entry);
        if let Some(index) = existing {
            let mut doc = self.doc.clone();
            doc.interfaces[index] = entry;
            self.publish(doc);
        }
    }

    /// Completes this pass's statuses from all sources and publishes them.
    pub async fn finish<H: Hypervisor>(
        &mut self,
        hyp: &H,
        domain_name: &str,
        domain: Option<&DomainState>,
        statuses: Vec<InterfaceStatus>,
        reconnects: u64,
    ) {
        // Publish what this pass did first, with what is known of the guest:
        // a guest agent round trip must neither delay it nor hide a phase
        // the interface went through (Attached before Ready).
        self.compose(domain, statuses.clone(), reconnects);
        if self.refresh_guest(hyp, domain_name, domain).await {
            self.compose(domain, statuses, reconnects);
        }
    }

    /// Builds and publishes the document from this pass's statuses and the
    /// current guest view.
    fn compose(
        &mut self,
        domain: Option<&DomainState>,
        mut statuses: Vec<InterfaceStatus>,
        reconnects: u64,
    ) {
        let multus = self
            .config
            .network_status
            .as_ref()
            .and_then(|rx| rx.borrow().clone());
        let guest = self.guest.clone();
        let sources = Sources {
            domain,
            guest: guest.as_ref(),
            multus: multus.as_deref(),
        };
        for status in &mut statuses {
            enrich(status, &sources);
            self.record(status);
        }
        let guest_interfaces = guest_only(&sources);
        let connected = guest
            .as_ref()
            .map(|g| matches!(g, GuestView::Interfaces(_)));
        // Entries that went away finished their unplug: forget them.
        let gone: Vec<String> = self
            .history
            .keys()
            .filter(|name| !statuses.iter().any(|s| &&s.name == name))
            .cloned()
            .collect();
        for name in gone {
            let Some(history) = self.history.remove(&name) else {
                continue;
            };
            if let Some(started) = &history.unplug_started {
                if let Some(metrics) = &self.config.metrics {
                    metrics.observe_unplug(UnplugStage::Cleaned, seconds_since(started));
                }
                self.send(Outcome {
                    interface: name,
                    kind: OutcomeKind::Unplugged,
                    message: format!("unplugged in {:.3}s", seconds_since(started)),
                });
            }
        }
        self.update_fast_poll(&statuses);
        if let Some(metrics) = &self.config.metrics {
            let mut counts: HashMap<String, i64> = HashMap::new();
            for status in &statuses {
                *counts.entry(status.phase.to_string()).or_default() += 1;
            }
            let counts: Vec<(String, i64)> = counts.into_iter().collect();
            metrics.set_interfaces_per_phase(&counts);
            metrics.set_libvirt_reconnects(reconnects);
        }
        self.publish(StatusDocument {
            interfaces: statuses,
            guest_interfaces,
            guest_agent_connected: connected,
        });
    }

    /// Records a phase change of `status` (and its metrics), then fills the
    /// status's own history fields.
    fn record(&mut self, status: &mut InterfaceStatus) {
        let history = self.history.entry(status.name.clone()).or_default();
        if matches!(status.phase, Phase::Pending | Phase::Detached) {
            history.pod_seen = None;
        }
        if status.phase != Phase::Detaching
            && status.phase != Phase::DetachPending
            && status.phase != Phase::Detached
        {
            history.unplug_started = None;
        }
        if history.transitions.last().map(|t| t.phase) != Some(status.phase) {
            if status.phase == Phase::Attached {
                // Attached now (plugged, or adopted after a restart or a
                // domain start): ask the guest often until it reports it.
                let now = Instant::now();
                self.fast_poll = Some(FastPoll {
                    next: now + FAST_POLL_FIRST,
                    interval: FAST_POLL_FIRST,
                    until: now + FAST_POLL_FOR,
                });
            }
            let at = Timestamp::now();
            history.transitions.retain(|t| t.phase != status.phase);
            history.transitions.push(PhaseTransition {
                phase: status.phase,
                at,
            });
            if let Some(outcome) = outcome_of(status, history)
                && let Some(tx) = &self.config.outcomes
            {
                let _ = tx.send(outcome);
            }
            if let Some(metrics) = &self.config.metrics {
                let stage = match status.phase {
                    Phase::Plumbed => Some(PlugStage::Plumbed),
                    Phase::Attached => Some(PlugStage::Attached),
                    Phase::Ready => Some(PlugStage::Ready),
                    _ => None,
                };
                if let (Some(stage), Some(seen)) = (stage, &history.pod_seen) {
                    metrics.observe_plug(stage, seconds_since(seen));
                }
                if status.phase == Phase::Detached
                    && let Some(started) = &history.unplug_started
                {
                    metrics.observe_unplug(UnplugStage::Cleaned, seconds_since(started));
                }
            }
            if status.phase == Phase::Detached {
                // Reported: the entry's removal later is not a second unplug.
                history.unplug_started = None;
            }
        }
        status.pod_interface_seen = history.pod_seen;
        status.phase_transitions = history.transitions.clone();
    }

    /// Asks the guest agent when due; returns whether it did.
    async fn refresh_guest<H: Hypervisor>(
        &mut self,
        hyp: &H,
        domain_name: &str,
        domain: Option<&DomainState>,
    ) -> bool {
        if !domain.is_some_and(|d| d.running) {
            self.guest = None;
            self.guest_read_at = None;
            return false;
        }
        let now = Instant::now();
        let stale = self.guest_stale.swap(false, Ordering::SeqCst);
        let poll_due = self.fast_poll.as_ref().is_some_and(|p| p.next <= now);
        // Half a period early is due too: a pass woken for something else
        // (the resync) takes the refresh along, so the two timers fall into
        // one wake-up instead of drifting apart.
        let refresh_due = self
            .guest_read_at
            .is_none_or(|t| t + self.config.guest_refresh / 2 <= now);
        if !(stale || poll_due || refresh_due || self.guest.is_none()) {
            return false;
        }
        let view = match hyp.guest_interfaces(domain_name).await {
            Ok(Some(view)) => view,
            // An earlier query is still running: keep what is known.
            Ok(None) => return false,
            Err(e) => GuestView::NotConnected(error_chain(&e)),
        };
        if let GuestView::NotConnected(reason) = &view
            && !matches!(self.guest, Some(GuestView::NotConnected(_)))
        {
            // Logged on the change only: the guest controls how often this happens.
            warn!(%reason, "guest agent not available");
        }
        debug!(poll_due, stale, "guest agent asked");
        self.guest = Some(view);
        self.guest_read_at = Some(Instant::now());
        if let Some(poll) = self.fast_poll.as_mut().filter(|_| poll_due) {
            poll.interval = (poll.interval * 2).min(FAST_POLL_MAX);
            poll.next = Instant::now() + poll.interval;
        }
        true
    }

    /// Keeps polling fast while an attached interface waits for the guest
    /// to report it; stops at the deadline. An agent that is not connected
    /// yet (the guest is still booting) does not stop it: it may connect any
    /// moment, and the device with it.
    fn update_fast_poll(&mut self, statuses: &[InterfaceStatus]) {
        let waiting = statuses.iter().any(|s| s.phase == Phase::Attached);
        if !waiting
            || self
                .fast_poll
                .as_ref()
                .is_some_and(|p| Instant::now() >= p.until)
        {
            self.fast_poll = None;
        }
    }

    fn send(&self, outcome: Outcome) {
        if let Some(tx) = &self.config.outcomes {
            let _ = tx.send(outcome);
        }
    }

    fn publish(&mut self, doc: StatusDocument) {
        if doc == self.doc {
            return;
        }
        self.doc = doc;
        if let Some(path) = &self.config.status_file
            && let Err(e) = write_atomically(path, &self.doc)
        {
            warn!(error = %error_chain(&e), "status not written");
        }
        if let Some(tx) = &self.config.status_tx {
            tx.send_replace(self.doc.clone());
        }
    }
}

/// The outcome an interface's new phase stands for, if any.
fn outcome_of(status: &InterfaceStatus, history: &History) -> Option<Outcome> {
    let since_seen = |phase: Phase| {
        let seen = history.pod_seen?;
        let at = history.transitions.iter().find(|t| t.phase == phase)?.at;
        Some(at.monotonic_ns.saturating_sub(seen.monotonic_ns) as f64 / 1e9)
    };
    let (kind, message) = match status.phase {
        Phase::Ready => {
            let stages: Vec<String> = [
                (Phase::Plumbed, "plumbed"),
                (Phase::Attached, "attached"),
                (Phase::Ready, "ready"),
            ]
            .into_iter()
            .filter_map(|(phase, name)| since_seen(phase).map(|s| format!("{name} {s:.3}s")))
            .collect();
            let mut message = String::from("the guest sees the interface");
            if let Some(mac) = &status.mac {
                message.push_str(&format!(" ({mac})"));
            }
            if !stages.is_empty() {
                message.push_str(&format!(
                    " after the pod interface appeared: {}",
                    stages.join(", ")
                ));
            }
            (OutcomeKind::Plugged, message)
        }
        Phase::Detached => {
            let took = history
                .unplug_started
                .as_ref()
                .map(|s| format!(" in {:.3}s", seconds_since(s)))
                .unwrap_or_default();
            (OutcomeKind::Unplugged, format!("unplugged{took}"))
        }
        Phase::Failed | Phase::DetachPending => (
            OutcomeKind::Failed,
            status
                .message
                .clone()
                .unwrap_or_else(|| status.phase.to_string()),
        ),
        _ => return None,
    };
    Some(Outcome {
        interface: status.name.clone(),
        kind,
        message,
    })
}
