//! Turning each pass's outcome into the published status: KubeVirt's fields
//! from the domain, the guest agent and Multus (`status::enrich`), the
//! guest's confirmation (`plan::confirmed_phase`), the phase history, and
//! what each phase change means for the metrics and for operators.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use super::guest::GuestPoller;
use super::history::{Change, Outcome, PhaseHistory, Timing};
use crate::error::error_chain;
use crate::hypervisor::{DomainState, GuestView, Hypervisor};
use crate::metrics::{Metrics, PlugStage, UnplugStage};
use crate::model::network_status::NetworkStatus;
use crate::plan::{Phase, confirmed_phase};
use crate::status::{
    AgentStatus, Dependency, InterfaceStatus, Sources, StatusDocument, Timestamp, enrich,
    guest_only, write_atomically,
};

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

pub struct Reporter {
    config: ReportConfig,
    doc: StatusDocument,
    history: PhaseHistory,
    guest: GuestPoller,
    /// The agent section, as the loop last set it (without the guest agent,
    /// which this adds).
    agent: AgentStatus,
}

impl Reporter {
    pub fn new(config: ReportConfig) -> Self {
        Self {
            guest: GuestPoller::new(config.guest_refresh),
            config,
            doc: StatusDocument::default(),
            history: PhaseHistory::default(),
            agent: AgentStatus::default(),
        }
    }

    /// Replaces the agent section and publishes the document if it changed
    /// (after a failed pass, or before the first spec).
    pub fn set_agent(&mut self, agent: AgentStatus) {
        self.set_agent_quietly(agent);
        let mut doc = self.doc.clone();
        doc.agent = self.agent_section();
        self.publish(doc);
    }

    /// Replaces the agent section for the next publication.
    pub fn set_agent_quietly(&mut self, agent: AgentStatus) {
        if let Some(metrics) = &self.config.metrics {
            metrics.set_ready(agent.ready);
            metrics.set_libvirt_connected(agent.dependency("libvirt").is_some_and(|d| d.ready));
        }
        self.agent = agent;
    }

    /// A pass ended after `took`, completed or not.
    pub fn pass_done(&self, took: Duration, completed: bool) {
        if let Some(metrics) = &self.config.metrics {
            metrics.observe_reconcile(took.as_secs_f64(), completed);
        }
    }

    /// The agent section with the guest agent's state as last seen.
    fn agent_section(&self) -> AgentStatus {
        let mut agent = self.agent.clone();
        let (ready, reason) = match self.guest.view() {
            Some(GuestView::Interfaces(_)) => (true, None),
            Some(GuestView::NotConnected(reason)) => (false, Some(reason.clone())),
            None => (false, Some("not asked yet".to_string())),
        };
        agent.dependencies.push(Dependency {
            name: "guestAgent".into(),
            ready,
            reason,
            required: false,
        });
        agent
    }

    pub fn document(&self) -> &StatusDocument {
        &self.doc
    }

    /// Set this flag (from a domain-event listener) to have the guest agent
    /// asked again on the next pass.
    pub fn guest_stale_flag(&self) -> Arc<AtomicBool> {
        self.guest.stale_flag()
    }

    /// When the loop must run again for the guest agent.
    pub fn next_wake(&self) -> Option<Instant> {
        self.guest.next_wake()
    }

    /// The pass observed the pod interface of a plug attempt at `at`.
    pub fn pod_seen(&mut self, name: &str, at: Timestamp) {
        self.history.pod_seen(name, at);
    }

    pub fn detach_started(&mut self, name: &str) {
        self.history.detach_started(name);
    }

    /// DEVICE_REMOVED (or the device left the live XML); the seconds since
    /// the unplug started.
    pub fn device_removed(&mut self, name: &str) -> Option<f64> {
        self.guest.mark_stale();
        let seconds = self.history.since_unplug_started(name)?;
        self.observe(Timing::Removed(seconds));
        Some(seconds)
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
        if self.guest.refresh(hyp, domain_name, domain).await {
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
        let guest = self.guest.view().cloned();
        let sources = Sources {
            domain,
            guest: guest.as_ref(),
            multus: multus.as_deref(),
        };
        for status in &mut statuses {
            let device = domain.and_then(|d| d.interface_by_alias(&format!("ua-{}", status.name)));
            status.phase = confirmed_phase(status.phase, device, guest.as_ref(), status.uplink);
            enrich(status, &sources);
            self.record(status);
        }
        let guest_interfaces = guest_only(&sources);
        let connected = guest
            .as_ref()
            .map(|g| matches!(g, GuestView::Interfaces(_)));
        for change in self.history.forget_absent(&statuses) {
            self.dispatch(change);
        }
        self.guest
            .settle(statuses.iter().any(|s| s.phase == Phase::Attached));
        if let Some(metrics) = &self.config.metrics {
            let mut counts: HashMap<String, i64> = HashMap::new();
            // The primary network is not nicplug's: neither counted nor a
            // problem.
            for status in statuses.iter().filter(|s| s.phase != Phase::NotManaged) {
                *counts.entry(status.phase.to_string()).or_default() += 1;
            }
            let counts: Vec<(String, i64)> = counts.into_iter().collect();
            metrics.set_interfaces_per_phase(&counts);
            metrics.set_libvirt_reconnects(reconnects);
            metrics.set_root_ports_free(domain.map(|d| d.root_ports.free()));
        }
        self.publish(StatusDocument {
            agent: self.agent_section(),
            interfaces: statuses,
            guest_interfaces,
            guest_agent_connected: connected,
            ..StatusDocument::default()
        });
    }

    /// Records the phase of `status` and acts on its change.
    fn record(&mut self, status: &mut InterfaceStatus) {
        let change = self.history.record(status);
        if change.entered == Some(Phase::Attached) {
            // Plugged, or adopted after a restart or a domain start.
            self.guest.expect_device();
        }
        self.dispatch(change);
    }

    /// A phase change's outcome to operators, its timings to the metrics.
    fn dispatch(&self, change: Change) {
        if let (Some(outcome), Some(tx)) = (change.outcome, &self.config.outcomes) {
            let _ = tx.send(outcome);
        }
        for timing in change.timings {
            self.observe(timing);
        }
    }

    fn observe(&self, timing: Timing) {
        let Some(metrics) = &self.config.metrics else {
            return;
        };
        match timing {
            Timing::Plug(phase, seconds) => {
                let stage = match phase {
                    Phase::Plumbed => PlugStage::Plumbed,
                    Phase::Prepared => PlugStage::Prepared,
                    Phase::Attached => PlugStage::Attached,
                    _ => PlugStage::Ready,
                };
                metrics.observe_plug(stage, seconds);
            }
            Timing::Removed(seconds) => metrics.observe_unplug(UnplugStage::Removed, seconds),
            Timing::Cleaned(seconds) => metrics.observe_unplug(UnplugStage::Cleaned, seconds),
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
