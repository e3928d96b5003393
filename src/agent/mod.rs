//! The reconcile loop: observe -> plan -> apply -> status, one pass at a
//! time, woken by triggers (netlink, libvirt events, spec changes, finished
//! detaches) and by a slow resync timer. Triggers carry no data; every pass
//! reads the whole current state, so a missed or coalesced trigger loses
//! nothing and a restarted nicplug finishes whatever a previous run left
//! half done.
//!
//! Waiting for a guest to release a device can take long (or forever, with
//! a guest that ignores PCIe hot-unplug), so a detach runs as its own task:
//! the loop goes on serving every other interface, and the task's outcome
//! comes back through a channel and wakes the loop.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::error::error_chain;
use crate::health::{Part, Readiness};
use crate::hypervisor::events::DomainEvent;
use crate::hypervisor::{DomainLifecycle, DomainState, Hypervisor, HypervisorError, Migration};
use crate::model::vmi::{Binding, BindingPlugins, Vmi};
use crate::model::{IfName, Owner};
use crate::netns::{Link, NetnsError, PodNetwork};
use crate::plan::{InterfacePlan, Observed, Phase, Step, plan};
use crate::status::{
    AgentStatus, Dependency, DomainRef, InterfaceStatus, StatusDocument, Timestamp, VmiRef,
};

mod fault;
mod guest;
mod history;
mod report;
mod settle;
pub use history::{Outcome, OutcomeKind};
pub use report::ReportConfig;
use report::Reporter;
use settle::LinkChanges;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the pod network namespace")]
    Observe(#[source] NetnsError),
    #[error("cannot read the domain")]
    Domain(#[source] HypervisorError),
}

impl AgentError {
    /// Retrying cannot help (libvirt rejects the URI itself): the agent
    /// stops with the reason instead of retrying forever.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Domain(HypervisorError::InvalidUri { .. }))
    }
}

/// What a pass reads before it plans, exactly as [`Agent::reconcile`] reads
/// it: every link of the pod namespace, then the live domain, then QEMU's
/// user (the tap owner).
#[derive(Debug, Clone)]
pub struct Observation {
    pub links: Vec<Link>,
    /// `None` when the domain is not defined.
    pub domain: Option<DomainState>,
    pub lifecycle: DomainLifecycle,
    pub tap_owner: Option<Owner>,
    /// When the links were read.
    pub observed_at: Timestamp,
}

impl Observation {
    /// The planner's view; `migrated_in` as [`Observed::migrated_in`].
    pub fn observed<'a>(&'a self, coexist: bool, migrated_in: &'a [String]) -> Observed<'a> {
        Observed {
            links: &self.links,
            domain: self.domain.as_ref(),
            tap_owner: self.tap_owner,
            clean_kubevirt_leftovers: coexist,
            kubevirt_plumbs: coexist,
            migrated_in,
        }
    }
}

/// What applying a pass's plans left.
#[derive(Default)]
struct AppliedPass {
    statuses: Vec<InterfaceStatus>,
    domain_changed: bool,
    /// Records this pass wrote: the DHCP server of an interface attached in
    /// this pass starts in this pass, before the guest's first DISCOVER (the
    /// links were read before the record existed).
    written: Vec<(crate::model::IfName, String)>,
}

/// A step that changes the domain's devices (which no migration may see).
fn changes_the_domain(step: &Step) -> bool {
    matches!(
        step,
        Step::Attach { .. }
            | Step::Detach { .. }
            | Step::SetLinkState { .. }
            | Step::RefreshLink { .. }
    )
}

/// Readiness of a migration target (domain absent or arriving): every
/// interface the spec wants plugged is `Prepared`, so the hand-off (which
/// waits for the pod to be Ready) brings the domain to taps that exist.
/// Wherever the domain runs (or is shut off) there is nothing to gate.
fn target_readiness(
    domain: Option<&DomainState>,
    statuses: &[InterfaceStatus],
) -> Result<(), String> {
    if domain.is_some_and(|d| d.migration != Migration::Incoming) {
        return Ok(());
    }
    let waiting: Vec<String> = statuses
        .iter()
        .filter(|p| {
            !matches!(
                p.phase,
                Phase::Prepared | Phase::NotManaged | Phase::Unsupported | Phase::Detached
            )
        })
        .map(|p| match &p.message {
            Some(m) => format!("{} ({m})", p.name),
            None => p.name.clone(),
        })
        .collect();
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not prepared for the domain: {}",
            waiting.join(", ")
        ))
    }
}

/// The domain's state for people: what the hypervisor knows, else what
/// [`DomainState::running`] says.
fn lifecycle_of<H: Hypervisor>(
    hyp: &H,
    name: &str,
    domain: Option<&DomainState>,
) -> DomainLifecycle {
    match domain {
        None => DomainLifecycle::Absent,
        Some(d) => hyp.lifecycle(name).unwrap_or(match d.migration {
            Migration::Incoming => DomainLifecycle::Migrating,
            Migration::Outgoing => DomainLifecycle::MigratingOut,
            Migration::Departed => DomainLifecycle::Migrated,
            Migration::None if d.running => DomainLifecycle::Running,
            Migration::None => DomainLifecycle::ShutOff,
        }),
    }
}

/// QEMU's user: the configured owner, else the one detected from the
/// running domain (kept in `cache` until the domain stops).
async fn detect_tap_owner<H: Hypervisor>(
    hyp: &H,
    configured: Option<Owner>,
    cache: &mut Option<Owner>,
    domain_name: &str,
    domain: Option<&DomainState>,
) -> Option<Owner> {
    if configured.is_some() {
        return configured;
    }
    if !domain.is_some_and(|d| d.running) {
        // A migration target prepares taps before any QEMU runs here: only
        // what needs no QEMU (a session daemon's socket owner) tells.
        *cache = None;
        return hyp.qemu_owner(domain_name).await.ok().flatten();
    }
    if cache.is_none() {
        match hyp.qemu_owner(domain_name).await {
            Ok(owner) => {
                if let Some(o) = owner {
                    info!(
                        uid = o.uid,
                        gid = o.gid,
                        "detected QEMU's user for tap ownership"
                    );
                }
                *cache = owner;
            }
            Err(e) => warn!(error = %error_chain(&e), "cannot detect QEMU's user"),
        }
    }
    *cache
}

/// Observes and plans once, as a pass of the agent would, and changes
/// nothing: what `nicplug plan` shows. Backoff and in-flight detaches of a
/// running agent are not known here, so this is what a pass would do if it
/// ran now and nothing held it back.
pub async fn observe_and_plan<N: PodNetwork, H: Hypervisor>(
    net: &N,
    hyp: &H,
    vmi: &Vmi,
    config: &AgentConfig,
) -> Result<(Observation, Vec<InterfacePlan>), AgentError> {
    let domain_name = config.domain.clone().unwrap_or_else(|| vmi.domain_name());
    let mut cache = None;
    let observation = observe(net, hyp, &domain_name, config.tap_owner, &mut cache, None).await?;
    let vmi = vmi.resolve_plugins(&config.binding_plugins);
    let plans = plan(&vmi, &observation.observed(config.coexist, &[]));
    Ok((observation, plans))
}

/// The observe part of a pass; reports each part's readiness when given.
async fn observe<N: PodNetwork, H: Hypervisor>(
    net: &N,
    hyp: &H,
    domain_name: &str,
    configured_owner: Option<Owner>,
    owner_cache: &mut Option<Owner>,
    readiness: Option<&Readiness>,
) -> Result<Observation, AgentError> {
    let report = |part, state| {
        if let Some(r) = readiness {
            r.set(part, state);
        }
    };
    let links = net.links().await.map_err(|e| {
        report(Part::Netlink, Err(error_chain(&e)));
        AgentError::Observe(e)
    })?;
    report(Part::Netlink, Ok(()));
    let observed_at = Timestamp::now();
    let domain = hyp.domain(domain_name).await.map_err(|e| {
        report(Part::Libvirt, Err(error_chain(&e)));
        AgentError::Domain(e)
    })?;
    report(Part::Libvirt, Ok(()));
    let tap_owner = detect_tap_owner(
        hyp,
        configured_owner,
        owner_cache,
        domain_name,
        domain.as_ref(),
    )
    .await;
    Ok(Observation {
        lifecycle: lifecycle_of(hyp, domain_name, domain.as_ref()),
        links,
        domain,
        tap_owner,
        observed_at,
    })
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// How long to wait for DEVICE_ADDED after an attach call.
    pub attach_timeout: Duration,
    /// How long to wait for the guest to release a device after a detach.
    pub detach_timeout: Duration,
    /// Reconcile at least this often even without triggers.
    pub resync: Duration,
    /// The tap owner; detected from the domain's QEMU when `None`.
    pub tap_owner: Option<Owner>,
    /// libvirt domain name; `<namespace>_<name>` of the VMI when `None`.
    pub domain: Option<String>,
    /// Where the status goes and what it reads besides the plan.
    pub report: ReportConfig,
    /// Coexistence with KubeVirt's own hotplug: also clean up the bridges
    /// and taps KubeVirt leaves behind (see `plan::Observed`).
    pub coexist: bool,
    /// First retry delay after a failure; doubles up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Where each pass reports whether libvirt and netlink answered.
    pub readiness: Option<Arc<Readiness>>,
    /// The resolv.conf whose name servers and search domains the DHCP
    /// server hands the VM (the pod's, as KubeVirt does); `None`: no DNS.
    pub resolv_conf: Option<std::path::PathBuf>,
    /// Serve DHCPv4 to the VM on interfaces nicplug plumbed.
    pub dhcp: bool,
    /// Which binding plugin names stand for which kind nicplug hot-plugs.
    pub binding_plugins: BindingPlugins,
}

/// Retry delays of a whole pass that failed (libvirt or netlink not
/// answering): short, because nothing else wakes the loop while libvirt is
/// gone, and growing, because each pass is a connection attempt.
const PASS_BACKOFF_FIRST: Duration = Duration::from_millis(250);
const PASS_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// While passes keep failing with the same error, it is logged again this
/// often (at INFO), so a log reader sees the wait goes on and why.
const STILL_FAILING_EVERY: Duration = Duration::from_secs(60);

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            attach_timeout: Duration::from_secs(10),
            detach_timeout: Duration::from_secs(30),
            resync: Duration::from_secs(30),
            tap_owner: None,
            domain: None,
            report: ReportConfig {
                guest_refresh: Duration::from_secs(30),
                ..ReportConfig::default()
            },
            coexist: false,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            readiness: None,
            resolv_conf: Some("/etc/resolv.conf".into()),
            dhcp: true,
            binding_plugins: BindingPlugins::default(),
        }
    }
}

/// What the agent remembers of an interface between passes: only what
/// cannot be observed (failure history), never the plumbing itself.
#[derive(Debug, Default)]
struct Tracked {
    failures: u32,
    retry_at: Option<Instant>,
    /// The phase and message of the last failure, shown while backing off
    /// (and logged once, not on every retry).
    failed: Option<(Phase, String)>,
    /// The failure was "no free PCIe root port": a port that frees ends the
    /// backoff.
    needs_root_port: bool,
}

/// How far an interface's steps got in one pass.
enum Progress {
    Done,
    /// A detach is in flight; the remaining steps wait for the device to go.
    Detaching,
    /// A migration is in flight: the step that would change the domain, and
    /// those after it, wait until it is over.
    Held,
}

type DetachResult = (String, Result<(), HypervisorError>);

pub struct Agent<N, H> {
    net: N,
    hyp: Arc<H>,
    config: AgentConfig,
    tracked: HashMap<String, Tracked>,
    report: Reporter,
    detected_owner: Option<Owner>,
    /// Interfaces with a detach task in flight.
    detaching: HashSet<String>,
    detach_tx: mpsc::UnboundedSender<DetachResult>,
    detach_rx: mpsc::UnboundedReceiver<DetachResult>,
    /// The configured readiness, or one of its own.
    readiness: Arc<Readiness>,
    /// When the last pass completed.
    last_reconcile: Option<Timestamp>,
    /// Why the passes since then failed.
    pass_error: Option<String>,
    /// The domain's name and state as the last pass found them.
    domain_seen: Option<(String, DomainLifecycle)>,
    /// The last pass found a migration in flight: passes repeat every
    /// [`MIGRATION_POLL`], since a failed migration raises no event.
    migrating: bool,
    /// A device change (a detach finishing between passes) met a migration
    /// that the pass's domain read may not show yet.
    change_met_migration: bool,
    /// The DHCP server tasks (both families), one per served interface.
    dhcp: crate::dhcp::Servers,
    /// When each link's addresses and routes last changed, as passes saw it.
    link_changes: LinkChanges,
    /// The pod's resolv.conf as DHCP hands it out, read on first use: the
    /// kubelet writes it when the pod is made and it does not change after.
    pod_dns: Option<crate::dhcp::Dns>,
    /// The pod interfaces the last pass's plans name.
    pod_ifaces: Vec<IfName>,
    /// passt interfaces a pass of this process found `Prepared` (a
    /// migration target, before the domain).
    passt_prepared: BTreeSet<String>,
    /// Of those, the ones whose device arrived with a live migration and
    /// whose link was not refreshed yet ([`Observed::migrated_in`]).
    migrated_in: Vec<String>,
}

/// How long a link refresh keeps the link down: long enough for a busy
/// guest to handle the link change, once per migration.
const LINK_REFRESH_HOLD: Duration = Duration::from_secs(1);

/// How often a migration in flight is looked at.
const MIGRATION_POLL: Duration = Duration::from_secs(1);

/// Retries of whole passes that failed, and their logging: once per
/// distinct error, then a reminder every [`STILL_FAILING_EVERY`].
#[derive(Debug, Default)]
struct PassBackoff {
    failed_passes: u32,
    last_error: Option<String>,
    last_logged: Option<Instant>,
}

impl PassBackoff {
    fn succeeded(&mut self) {
        if self.failed_passes > 0 {
            info!(
                failed_passes = self.failed_passes,
                "reconcile succeeds again"
            );
        }
        *self = Self::default();
    }

    /// Logs the failure as due and returns how long to wait.
    fn failed(&mut self, message: &str) -> Duration {
        self.failed_passes += 1;
        let delay = PASS_BACKOFF_FIRST
            .saturating_mul(1 << (self.failed_passes - 1).min(16))
            .min(PASS_BACKOFF_MAX);
        let failed_passes = self.failed_passes;
        if self.last_error.as_deref() != Some(message) {
            warn!(error = %message, retry_in_ms = delay.as_millis() as u64, "reconcile failed; retrying");
            self.last_error = Some(message.to_string());
            self.last_logged = Some(Instant::now());
        } else if self
            .last_logged
            .is_none_or(|t| t.elapsed() >= STILL_FAILING_EVERY)
        {
            // Rate-limited reminder: still waiting, and why.
            info!(error = %message, failed_passes, "reconcile still failing; retrying");
            self.last_logged = Some(Instant::now());
        } else {
            debug!(error = %message, failed_passes, "reconcile failed again");
        }
        delay
    }
}

/// A spec that removes every secondary interface at once is legal, and
/// what a spec typo looks like too: said loudly.
fn warn_if_every_secondary_goes(before: &mut Option<Vec<String>>, vmi: &Vmi) {
    let now = wanted_secondaries(vmi);
    if let Some(before) = before.as_ref()
        && !before.is_empty()
        && now.is_empty()
    {
        warn!(
            interfaces = %before.join(", "),
            "the new VMI spec removes every secondary interface: unplugging all of them"
        );
    }
    *before = Some(now);
}

/// The hot-pluggable interfaces the spec wants plugged.
fn wanted_secondaries(vmi: &Vmi) -> Vec<String> {
    vmi.interfaces
        .iter()
        .filter(|i| i.is_hotpluggable() && i.state != crate::model::vmi::SpecState::Absent)
        .map(|i| i.name.clone())
        .collect()
}

impl<N: PodNetwork, H: Hypervisor + 'static> Agent<N, H> {
    pub fn new(net: N, hyp: H, config: AgentConfig) -> Self {
        let (detach_tx, detach_rx) = mpsc::unbounded_channel();
        Self {
            readiness: config.readiness.clone().unwrap_or_default(),
            last_reconcile: None,
            pass_error: None,
            domain_seen: None,
            migrating: false,
            change_met_migration: false,
            pod_ifaces: Vec::new(),
            passt_prepared: BTreeSet::new(),
            migrated_in: Vec::new(),
            dhcp: crate::dhcp::Servers::new(config.report.metrics.clone()),
            link_changes: LinkChanges::default(),
            pod_dns: None,
            net,
            hyp: Arc::new(hyp),
            report: Reporter::new(config.report.clone()),
            config,
            tracked: HashMap::new(),
            detected_owner: None,
            detaching: HashSet::new(),
            detach_tx,
            detach_rx,
        }
    }

    pub fn status(&self) -> &StatusDocument {
        self.report.document()
    }

    /// A task turning libvirt's domain events into wake-ups of the loop:
    /// events are only triggers; device and agent events (and missed ones)
    /// also have the guest agent asked again.
    pub fn forward_domain_events(
        &self,
        mut events: broadcast::Receiver<DomainEvent>,
        wake: Arc<Notify>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let guest_stale = self.report.guest_stale_flag();
        async move {
            loop {
                let stale = match events.recv().await {
                    Ok(event) => {
                        debug!(?event, "libvirt event");
                        !matches!(event, DomainEvent::Lifecycle { .. })
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if stale {
                    guest_stale.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                wake.notify_one();
            }
        }
    }

    fn domain_name(&self, vmi: &Vmi) -> String {
        self.config
            .domain
            .clone()
            .unwrap_or_else(|| vmi.domain_name())
    }

    /// The agent section of the status document, as of now.
    fn agent_status(&self, vmi: Option<&Vmi>) -> AgentStatus {
        let not_ready = self.readiness.not_ready();
        let dependencies = crate::health::Part::ALL
            .iter()
            .map(|part| {
                let reason = not_ready
                    .iter()
                    .find(|(name, _)| *name == part.name())
                    .map(|(_, reason)| reason.clone());
                Dependency {
                    name: part.name().to_string(),
                    ready: reason.is_none(),
                    reason,
                    required: true,
                }
            })
            .collect();
        let domain = match (&self.domain_seen, vmi) {
            (Some((name, state)), _) => Some(DomainRef {
                name: name.clone(),
                state: *state,
            }),
            (None, Some(vmi)) => Some(DomainRef {
                name: self.domain_name(vmi),
                state: DomainLifecycle::Unknown,
            }),
            (None, None) => None,
        };
        AgentStatus {
            ready: not_ready.is_empty(),
            vmi: vmi.map(|v| VmiRef {
                namespace: v.namespace.clone(),
                name: v.name.clone(),
                uid: v.uid.clone(),
            }),
            domain,
            dependencies,
            last_reconcile: self.last_reconcile,
            reconcile_error: self.pass_error.clone(),
            ..AgentStatus::default()
        }
    }

    /// Runs until `shutdown`. Never undoes anything on the way out: a pass
    /// in flight is dropped where it stands, as a crash would leave it, and
    /// the next start finishes it. Returns an error only when retrying
    /// cannot help ([`AgentError::is_fatal`]).
    pub async fn run(
        mut self,
        mut spec: watch::Receiver<Option<Vmi>>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let mut spec_open = true;
        // A new network-status may say CNI is done with a pod link.
        let mut network_status = self.config.report.network_status.clone();
        let mut backoff = PassBackoff::default();
        let mut secondaries: Option<Vec<String>> = None;
        loop {
            // The one copy of the spec a pass takes, binding plugins resolved.
            let vmi = spec
                .borrow_and_update()
                .as_ref()
                .map(|vmi| vmi.resolve_plugins(&self.config.binding_plugins));
            let mut deadline = Deadline {
                at: Instant::now() + self.config.resync,
                why: "resync",
            };
            if vmi.is_none() {
                self.report.set_agent(self.agent_status(None));
            }
            if let Some(vmi) = vmi {
                self.readiness.set(Part::Spec, Ok(()));
                warn_if_every_secondary_goes(&mut secondaries, &vmi);
                let started = std::time::Instant::now();
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    outcome = self.reconcile(&vmi) => outcome,
                };
                self.report.pass_done(started.elapsed(), outcome.is_ok());
                match outcome {
                    Err(e) if e.is_fatal() => return Err(e),
                    Ok(()) => {
                        backoff.succeeded();
                        if let Some(retry) = self.next_retry() {
                            deadline.sooner(retry, "interface retry");
                        }
                        if let Some(guest) = self.report.next_wake() {
                            deadline.sooner(guest, "guest agent poll");
                        }
                        if self.migrating {
                            deadline.sooner(Instant::now() + MIGRATION_POLL, "migration poll");
                        }
                    }
                    Err(e) => {
                        // The whole pass failed: interface retries and guest
                        // polls wait for the next good pass.
                        let message = error_chain(&e);
                        deadline = Deadline {
                            at: Instant::now() + backoff.failed(&message),
                            why: "pass retry",
                        };
                        self.pass_error = Some(message);
                        if matches!(e, AgentError::Domain(_)) {
                            self.domain_seen =
                                Some((self.domain_name(&vmi), DomainLifecycle::Unknown));
                        }
                        self.report.set_agent(self.agent_status(Some(&vmi)));
                    }
                }
            }
            if let Some(retry) = self.dhcp.next_retry() {
                deadline.sooner(retry, "dhcp server retry");
            }
            if let Some(settled) = self
                .link_changes
                .next_settled(Instant::now(), &self.pod_ifaces)
            {
                deadline.sooner(settled, "cni settle");
            }
            let dhcp_changed = self.dhcp.changed();
            let (woke, finished) = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => ("a link or domain event", None),
                // A server started, died or acknowledged a lease: the status
                // shows it.
                _ = dhcp_changed.notified() => ("a dhcp server changed", None),
                changed = spec.changed(), if spec_open => {
                    // A closed source keeps the last spec.
                    spec_open = changed.is_ok();
                    ("the spec changed", None)
                }
                changed = changed_or_pending(&mut network_status) => {
                    if changed.is_err() {
                        network_status = None;
                    }
                    ("the network-status changed", None)
                }
                result = self.detach_rx.recv() => ("a detach finished", result),
                _ = tokio::time::sleep_until(deadline.at) => (deadline.why, None),
            };
            debug!(woke, "loop woke");
            if let Some(result) = finished {
                self.detach_finished(result);
            }
        }
        info!("stopped; plugged interfaces stay as they are");
        Ok(())
    }

    /// The domain runs here: the passt interfaces prepared for it need
    /// their link refreshed if a live migration brought it, and nothing if
    /// it started here.
    fn note_arrival(&mut self, observation: &Observation) {
        let Some(domain) = observation.domain.as_ref().filter(|d| d.running) else {
            return;
        };
        let prepared = std::mem::take(&mut self.passt_prepared);
        if domain.arrived_by_migration {
            self.migrated_in.extend(prepared);
        }
    }

    /// Notes the passt interfaces `plans` prepare, and keeps of the arrived
    /// ones those whose refresh this pass plans (a NIC the spec took down
    /// or away meanwhile gets none later).
    fn note_passt_prepared(&mut self, vmi: &Vmi, plans: &[InterfacePlan]) {
        let passt = |name: &str| {
            vmi.interfaces
                .iter()
                .any(|i| i.name == name && i.binding == Binding::Passt)
        };
        for p in plans {
            if p.phase == Phase::Prepared && passt(&p.name) {
                self.passt_prepared.insert(p.name.clone());
            }
        }
        let refreshes = |name: &String| {
            plans.iter().any(|p| {
                &p.name == name
                    && p.steps
                        .iter()
                        .any(|s| matches!(s, Step::RefreshLink { .. }))
            })
        };
        self.migrated_in.retain(refreshes);
    }

    /// The earliest interface retry still ahead.
    fn next_retry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.tracked
            .values()
            .filter_map(|t| t.retry_at)
            .filter(|t| *t > now)
            .min()
    }

    /// One observe -> plan -> apply pass over every interface of `vmi`,
    /// whose binding plugins are resolved ([`Vmi::resolve_plugins`], as
    /// [`Agent::run`] does).
    pub async fn reconcile(&mut self, vmi: &Vmi) -> Result<(), AgentError> {
        while let Ok(result) = self.detach_rx.try_recv() {
            self.detach_finished(result);
        }
        let domain_name = self.domain_name(vmi);
        debug!("reconcile");
        let observation = self.observe_pass(&domain_name).await?;
        self.note_arrival(&observation);
        let plans = plan(
            vmi,
            &observation.observed(self.config.coexist, &self.migrated_in),
        );
        self.note_passt_prepared(vmi, &plans);
        self.pod_ifaces = plans.iter().filter_map(|p| p.pod_iface.clone()).collect();
        self.migrating = std::mem::take(&mut self.change_met_migration)
            || observation
                .domain
                .as_ref()
                .is_some_and(|d| matches!(d.migration, Migration::Incoming | Migration::Outgoing));
        self.tracked
            .retain(|name, _| plans.iter().any(|p| &p.name == name));
        let applied = self
            .apply_plans(&domain_name, plans, observation.observed_at)
            .await;
        self.publish_pass(vmi, &domain_name, observation, applied)
            .await;
        Ok(())
    }

    /// Reads the pod namespace, the domain and the tap owner for a pass.
    async fn observe_pass(&mut self, domain_name: &str) -> Result<Observation, AgentError> {
        let mut observation = observe(
            &self.net,
            self.hyp.as_ref(),
            domain_name,
            self.config.tap_owner,
            &mut self.detected_owner,
            Some(&self.readiness),
        )
        .await?;
        self.domain_seen = Some((domain_name.to_string(), observation.lifecycle));
        let network_status = self
            .config
            .report
            .network_status
            .as_ref()
            .and_then(|rx| rx.borrow().clone());
        self.link_changes.mark_cni_progress(
            &mut observation.links,
            network_status.as_deref(),
            Instant::now(),
        );
        if observation
            .domain
            .as_ref()
            .is_some_and(|d| d.root_ports.free() > 0)
        {
            // A port freed (or was free all along): who waits for one may try now.
            for tracked in self.tracked.values_mut().filter(|t| t.needs_root_port) {
                tracked.retry_at = None;
            }
        }
        Ok(observation)
    }

    /// Applies each interface's plan in its own span, in plan order.
    async fn apply_plans(
        &mut self,
        domain_name: &str,
        plans: Vec<InterfacePlan>,
        observed_at: Timestamp,
    ) -> AppliedPass {
        let mut pass = AppliedPass::default();
        for plan in plans {
            let records: Vec<_> = plan
                .steps
                .iter()
                .filter_map(|s| match s {
                    Step::RecordPodLink { pod, alias } => Some((pod.clone(), alias.clone())),
                    _ => None,
                })
                .collect();
            let preparing = plan.phase == Phase::Prepared && !plan.steps.is_empty();
            if preparing || plan.steps.iter().any(|s| matches!(s, Step::Attach { .. })) {
                self.report.pod_seen(&plan.name, observed_at);
            }
            pass.domain_changed |= plan.steps.iter().any(changes_the_domain);
            let span = info_span!("interface", iface = %plan.name, pod = plan.pod_iface.as_ref().map(|p| p.as_str()));
            let departed = plan.departed;
            let status = self.apply(domain_name, plan).instrument(span).await;
            if matches!(status.phase, Phase::Attached | Phase::Ready) {
                pass.written.extend(records);
            }
            if !(departed && status.phase == Phase::Detached) {
                pass.statuses.push(status);
            }
        }
        pass
    }

    /// A detach in flight is Detaching whatever this pass saw: the entry
    /// goes only when a pass finds nothing of the interface left.
    fn keep_detaches_listed(&self, statuses: &mut Vec<InterfaceStatus>) {
        for name in &self.detaching {
            if !statuses.iter().any(|s| &s.name == name) {
                warn!(iface = %name, "this pass found nothing of an interface whose detach is in flight; keeping it listed");
                let mut status = self
                    .report
                    .document()
                    .interfaces
                    .iter()
                    .find(|i| &i.name == name)
                    .cloned()
                    .unwrap_or_else(|| InterfaceStatus::new(name.clone(), Phase::Detaching));
                status.phase = Phase::Detaching;
                statuses.push(status);
            }
        }
    }

    /// Readiness, DHCP and the status document, from what the pass left.
    async fn publish_pass(
        &mut self,
        vmi: &Vmi,
        domain_name: &str,
        observation: Observation,
        applied: AppliedPass,
    ) {
        let AppliedPass {
            mut statuses,
            domain_changed,
            written,
        } = applied;
        let Observation {
            mut links, domain, ..
        } = observation;
        // What this pass left, not what it planned: a preparation step that
        // failed leaves the target not ready.
        let plumbing = if self.config.coexist {
            // KubeVirt plumbs a target after the hand-off: waiting for it
            // here could hold the hand-off forever.
            Ok(())
        } else {
            target_readiness(domain.as_ref(), &statuses)
        };
        self.readiness.set(Part::Plumbing, plumbing);
        self.keep_detaches_listed(&mut statuses);
        // The status shows the domain as this pass left it.
        let domain = if domain_changed {
            self.hyp.domain(domain_name).await.ok().flatten()
        } else {
            domain
        };
        for (pod, alias) in written {
            if let Some(link) = links.iter_mut().find(|l| l.name == pod) {
                link.alias = Some(alias);
            }
        }
        self.serve_dhcp(vmi, &links, domain.as_ref(), &mut statuses);
        let reconnects = self.hyp.reconnects();
        self.last_reconcile = Some(Timestamp::now());
        self.pass_error = None;
        let agent = self.agent_status(Some(vmi));
        self.report.set_agent_quietly(agent);
        self.report
            .finish(
                self.hyp.as_ref(),
                domain_name,
                domain.as_ref(),
                statuses,
                reconnects,
            )
            .await;
    }

    /// Starts and stops DHCP server tasks to match this pass, and puts each
    /// interface's DHCP state into its status.
    fn serve_dhcp(
        &mut self,
        vmi: &Vmi,
        links: &[Link],
        domain: Option<&DomainState>,
        statuses: &mut [InterfaceStatus],
    ) {
        if !self.config.dhcp {
            return;
        }
        let resolv_conf = self.config.resolv_conf.as_deref();
        let pod_dns = self.pod_dns.get_or_insert_with(|| {
            resolv_conf
                .and_then(|path| std::fs::read_to_string(path).ok())
                .map(|text| crate::dhcp::Dns::from_resolv_conf(&text))
                .unwrap_or_default()
        });
        let network_status = self
            .config
            .report
            .network_status
            .as_ref()
            .and_then(|rx| rx.borrow().clone())
            .unwrap_or_default();
        let (desired, unserved) =
            crate::dhcp::desired_servers(vmi, links, domain, statuses, &|pod: &str| {
                crate::dhcp::Dns::for_interface(&network_status, pod, pod_dns)
            });
        self.dhcp.reconcile(desired);
        for status in statuses.iter_mut() {
            status.dhcp = self.dhcp.status(&status.name).or_else(|| {
                unserved
                    .iter()
                    .find(|(name, _)| name == &status.name)
                    .map(|(_, s)| s.clone())
            });
        }
    }

    fn detach_finished(&mut self, (name, result): DetachResult) {
        let span = info_span!("interface", iface = %name);
        let _enter = span.enter();
        self.detaching.remove(&name);
        match result {
            Ok(()) => {
                let since_unplug = self.report.device_removed(&name);
                info!(since_unplug_s = since_unplug, "device removed");
                fault::after("detach-device");
                self.tracked.remove(&name);
            }
            Err(HypervisorError::Migrating { migration }) => {
                // Nothing was detached; the next pass plans it again, where
                // the domain runs once the migration is over.
                self.migration_met(migration);
            }
            Err(e @ HypervisorError::DetachTimeout { .. }) => {
                self.record_failure(&name, "detach-timeout", Phase::DetachPending, e.to_string());
            }
            Err(e) => {
                let message = format!("detach-device: {}", error_chain(&e));
                self.record_failure(&name, "detach-device", Phase::Failed, message);
            }
        }
    }

    /// A device change met a migration in flight: said once per migration,
    /// and passes repeat until it is over.
    fn migration_met(&mut self, migration: Migration) {
        if self.migrating {
            debug!(?migration, "a migration is in flight: device changes wait");
        } else {
            info!(?migration, "a migration is in flight: device changes wait");
        }
        self.migrating = true;
        self.change_met_migration = true;
    }

    fn record_failure(&mut self, name: &str, reason: &str, phase: Phase, message: String) {
        self.report.failure(reason);
        let tracked = self.tracked.entry(name.to_string()).or_default();
        tracked.failures += 1;
        let delay = self
            .config
            .backoff_base
            .saturating_mul(1 << (tracked.failures - 1).min(16))
            .min(self.config.backoff_max);
        tracked.retry_at = Some(Instant::now() + delay);
        if tracked.failed.as_ref().map(|(_, m)| m) != Some(&message) {
            warn!(error = %message, %phase, retry_in_ms = delay.as_millis() as u64, "interface failed");
        } else {
            debug!(error = %message, %phase, retry_in_ms = delay.as_millis() as u64, "interface failed again");
        }
        tracked.failed = Some((phase, message));
    }

    /// Applies one interface's plan and returns its status.
    async fn apply(&mut self, domain_name: &str, plan: InterfacePlan) -> InterfaceStatus {
        let mut status = InterfaceStatus {
            pod_interface_name: plan.pod_iface.as_ref().map(ToString::to_string),
            mac: plan.mac.map(|m| m.to_string()),
            message: plan.message.clone(),
            uplink: plan.uplink,
            ..InterfaceStatus::new(plan.name.clone(), plan.phase)
        };
        let hypervisor_step = plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::Attach { .. } | Step::Detach { .. }));
        // While the detach is in flight its outcome decides. A failed plan
        // waits for it too: QEMU closes the tap with the netdev before
        // libvirt drops the device from the live XML, and a pass between
        // the two sees a live device on a tap no one holds.
        if self.detaching.contains(&plan.name) && (hypervisor_step || plan.phase == Phase::Failed) {
            status.phase = Phase::Detaching;
            return status;
        }
        // While backing off, attach and detach attempts (and plans that
        // fail before them) wait; clean-up proceeds.
        let tracked = self.tracked.entry(plan.name.clone()).or_default();
        let gated = hypervisor_step || plan.phase == Phase::Failed;
        if gated && tracked.retry_at.is_some_and(|t| Instant::now() < t) {
            if let Some((phase, message)) = &tracked.failed {
                status.phase = *phase;
                status.message = Some(message.clone());
            }
            return status;
        }

        if !plan.repairs.is_empty() {
            warn!(missing = %plan.repairs.join(", "), "plumbing missing under the live device; rebuilding it");
        }
        match self.run_steps(domain_name, &plan).await {
            Ok(Progress::Detaching) => {
                status.phase = Phase::Detaching;
                status.message = plan.message.clone();
            }
            Ok(Progress::Held) => {
                let plugging = plan.steps.iter().any(|s| matches!(s, Step::Attach { .. }));
                status.phase = if plugging {
                    Phase::Pending
                } else {
                    Phase::Attached
                };
                status.message = Some(crate::plan::MIGRATING_OUT.to_string());
            }
            Ok(Progress::Done) if plan.phase == Phase::Failed => {
                let message = plan.message.clone().unwrap_or_default();
                self.record_failure(&plan.name, "plan", Phase::Failed, message);
                if let Some(tracked) = self.tracked.get_mut(&plan.name) {
                    tracked.needs_root_port = plan.needs_root_port;
                }
            }
            Ok(Progress::Done) => {
                for step in &plan.steps {
                    match step {
                        Step::Attach { device, .. } => info!(mac = %device.mac, "attached"),
                        Step::SetLinkState { up, .. } => {
                            info!(link = if *up { "up" } else { "down" }, "link state set");
                        }
                        Step::RefreshLink { .. } => {
                            self.migrated_in.retain(|name| name != &plan.name);
                            info!(
                                "link refreshed after the migration: the guest renews its address"
                            );
                        }
                        _ => {}
                    }
                }
                self.tracked.remove(&plan.name);
            }
            Err((reason, message)) => {
                status.phase = Phase::Failed;
                status.message = Some(message.clone());
                self.record_failure(&plan.name, reason, Phase::Failed, message);
            }
        }
        status
    }

    /// Runs the steps in order. On a failure of a plug runs the rollback and
    /// returns the failure's message; at a `Detach` it starts the detach task
    /// and stops. A plan without rollback is clean-up: every step is tried
    /// and every failure reported.
    async fn run_steps(
        &mut self,
        domain_name: &str,
        plan: &InterfacePlan,
    ) -> Result<Progress, (&'static str, String)> {
        let mut failures: Vec<(&'static str, String)> = Vec::new();
        for step in &plan.steps {
            if let Step::Attach { .. } = step {
                // Everything before the attach is done: say so.
                self.report.enter_now(&plan.name, Phase::Plumbed);
            }
            if let Step::Detach { alias, persistent } = step {
                self.report.detach_started(&plan.name);
                self.report.enter_now(&plan.name, Phase::Detaching);
                self.start_detach(domain_name, &plan.name, alias, *persistent);
                return Ok(Progress::Detaching);
            }
            let result = self.run_step(domain_name, step).await;
            let Err(e) = result else { continue };
            if let StepError::Hypervisor(HypervisorError::Migrating { migration }) = &e {
                // Checked by libvirt's worker right before the change: the
                // domain started migrating after this pass read it. Nothing
                // changed; the plumbing stays for when the migration is over.
                self.migration_met(*migration);
                return Ok(Progress::Held);
            }
            let message = format!("{}: {}", step.name(), error_chain(&e));
            // An attach is a plug's even when nothing needs undoing (a
            // macvtap device builds nothing).
            if plan.rollback.is_empty() && !matches!(step, Step::Attach { .. }) {
                warn!(step = step.name(), error = %message, "clean-up step failed; going on");
                failures.push((step.name(), message));
                continue;
            }
            if let Step::Attach { device, .. } = step {
                // An attach that failed may still have landed, or lost a race
                // against someone who attached the same alias: never tear
                // plumbing out from under a device the domain has.
                match self.hyp.domain(domain_name).await {
                    Ok(Some(d)) if d.interface_by_alias(&device.alias()).is_some() => {
                        warn!(error = %message, "the attach failed, but the domain has the device: adopting it");
                        return Ok(Progress::Done);
                    }
                    Ok(_) => {}
                    Err(check) => {
                        // Unknown whether a device uses the plumbing: keep it;
                        // the next pass sees the domain again and decides.
                        let message = format!(
                            "{message}; plumbing kept, the domain cannot be read: {}",
                            error_chain(&check)
                        );
                        return Err((step.name(), message));
                    }
                }
            }
            for undo in &plan.rollback {
                if let Err(e) = self.run_step(domain_name, undo).await {
                    warn!(step = undo.name(), error = %error_chain(&e), "rollback step failed");
                }
            }
            return Err((step.name(), message));
        }
        match failures.first() {
            None => Ok(Progress::Done),
            Some((reason, _)) => {
                let all: Vec<String> = failures.iter().map(|(_, m)| m.clone()).collect();
                Err((reason, all.join("; ")))
            }
        }
    }

    fn start_detach(&mut self, domain_name: &str, name: &str, alias: &str, persistent: bool) {
        info!(alias, "detaching");
        self.detaching.insert(name.to_string());
        let hyp = self.hyp.clone();
        let tx = self.detach_tx.clone();
        let (domain, name, alias) = (domain_name.to_string(), name.to_string(), alias.to_string());
        let timeout = self.config.detach_timeout;
        tokio::spawn(
            async move {
                let result = hyp.detach(&domain, &alias, persistent, timeout).await;
                let _ = tx.send((name, result));
            }
            .in_current_span(),
        );
    }

    async fn run_step(&self, domain_name: &str, step: &Step) -> Result<(), StepError> {
        fault::before(step.name()).await;
        let started = std::time::Instant::now();
        match step {
            Step::RecordPodLink { pod, alias } => self.net.set_alias(pod, Some(alias)).await?,
            Step::EnsureBridge { bridge, mac } => self.net.ensure_bridge(bridge, *mac).await?,
            Step::EnslavePodLink {
                pod,
                bridge,
                mac,
                addresses,
                routes,
            } => {
                self.net
                    .enslave_pod_link(pod, bridge, *mac, addresses, routes)
                    .await?
            }
            Step::EnsureTap { spec, bridge } => self.net.ensure_tap(spec, bridge).await?,
            Step::Attach { device, persistent } => {
                self.hyp
                    .attach(domain_name, device, *persistent, self.config.attach_timeout)
                    .await?
            }
            Step::SetLinkState {
                device,
                up,
                persistent,
            } => {
                self.hyp
                    .set_link_state(domain_name, device, *up, *persistent)
                    .await?
            }
            Step::RefreshLink { device } => {
                self.hyp
                    .set_link_state(domain_name, device, false, false)
                    .await?;
                // The guest reads the link state when it handles the config
                // interrupt: down and up at once can both land before that,
                // and the guest sees no carrier change (the rig's TCG guest
                // missed one that way).
                tokio::time::sleep(LINK_REFRESH_HOLD).await;
                self.hyp
                    .set_link_state(domain_name, device, true, false)
                    .await?;
            }
            // Started by `run_steps` as a task; never run inline.
            Step::Detach { .. } => {}
            Step::ReleasePodLink { pod, record } => self.net.release_pod_link(pod, record).await?,
            Step::DeleteLink { name } => self.net.delete_link(name).await?,
        }
        debug!(
            step = step.name(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "step done"
        );
        fault::after(step.name());
        Ok(())
    }
}

/// When the run loop wakes without an event, and why (for its debug log).
struct Deadline {
    at: Instant,
    why: &'static str,
}

impl Deadline {
    fn sooner(&mut self, at: Instant, why: &'static str) {
        if at < self.at {
            self.at = at;
            self.why = why;
        }
    }
}

/// The next change of `rx`; never, without one.
async fn changed_or_pending<T>(
    rx: &mut Option<watch::Receiver<T>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
