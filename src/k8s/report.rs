//! What operators see in the API: the status as an annotation on the
//! launcher pod, and plug/unplug outcomes as Events on the VMI.
//!
//! # The pod annotation
//!
//! `nicplug.kubevirt.io/interfaces` holds the compact JSON array of the
//! status document's `interfaces`, without `phaseTransitions` and
//! `podInterfaceSeen`: those are timestamps (wall clock and this node's
//! CLOCK_MONOTONIC) that only mean something next to the status file, and
//! every pod update wakes every pod watcher (kubelet, virt-handler,
//! virt-controller), so the annotation carries the state, not its history;
//! the durations go into the Events. The patch is a JSON merge patch of that
//! one key, sent only when the value differs from the last one written (read
//! back from the pod at start, so a restart does not rewrite it), at most
//! once per [`ANNOTATION_MIN_INTERVAL`] (the latest document wins), retried
//! with backoff.
//!
//! # Events
//!
//! events.k8s.io/v1 Events regarding the VMI (kubevirt.io/v1
//! VirtualMachineInstance, with its uid once the VMI watch has seen it),
//! `reportingController: nicplug`, `reportingInstance: <pod>`. Reasons:
//! `NicHotplugged`, `NicUnplugged` (Normal) and `NicHotplugFailed` (Warning);
//! the note is `<interface>: <outcome message>`.
//!
//! Rate limit ([`EventLimiter`]): per (interface, reason) at most one Event
//! per [`EVENT_WINDOW`]. The first goes out at once; later ones inside the
//! window are counted and the latest is kept, and when the window ends one
//! folded Event says it with the count (`... (4 times in the last 10s)`).
//! Before an Event for an interface goes out, folded Events of its other
//! reasons go first, so a failure burst that ends in success reads in order.
//! kube-rs' `events::Recorder` is not used: it aggregates into an
//! `EventSeries` keyed without the note, so a second plug of an interface
//! would only bump a counter on the first plug's message, and it sends one
//! API call per occurrence (no rate limit).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::agent::{Outcome, OutcomeKind};
use crate::error::error_chain;
use crate::status::StatusDocument;

/// The launcher pod annotation with the interfaces' status.
pub const ANNOTATION: &str = "nicplug.kubevirt.io/interfaces";
/// At most one annotation patch per this long; the latest document wins.
pub const ANNOTATION_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Per (interface, reason), at most one Event per this long.
pub const EVENT_WINDOW: Duration = Duration::from_secs(10);
/// `reportingController` of the Events, and the patches' field manager.
pub const COMPONENT: &str = "nicplug";

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Attempts per Event before it is dropped (Events are best effort).
const EVENT_ATTEMPTS: u32 = 3;
/// events.k8s.io/v1 rejects a longer note.
const NOTE_MAX_BYTES: usize = 1024;

/// The annotation's value for `doc`: compact JSON of the interfaces,
/// without their timestamps.
pub fn annotation_value(doc: &StatusDocument) -> String {
    let interfaces: Vec<_> = doc
        .interfaces
        .iter()
        .cloned()
        .map(|mut iface| {
            iface.phase_transitions.clear();
            iface.pod_interface_seen = None;
            iface
        })
        .collect();
    serde_json::to_string(&interfaces).unwrap_or_else(|_| "[]".into())
}

/// Keeps annotation [`ANNOTATION`] of pod `namespace/pod` equal to the
/// interfaces of the latest document in `status_rx` (see the module doc),
/// until `shutdown` or until the sender is gone.
pub async fn publish_annotation(
    client: Client,
    namespace: &str,
    pod: &str,
    mut status_rx: watch::Receiver<StatusDocument>,
    shutdown: CancellationToken,
) {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let current = tokio::select! {
        _ = shutdown.cancelled() => return,
        current = pods.get(pod) => current,
    };
    let mut written = match current {
        Ok(p) => p
            .metadata
            .annotations
            .and_then(|mut a| a.remove(ANNOTATION)),
        Err(e) => {
            debug!(%pod, error = %error_chain(&e), "cannot read the pod's annotation; will write it");
            None
        }
    };
    let params = PatchParams {
        field_manager: Some(COMPONENT.into()),
        ..PatchParams::default()
    };
    let mut last_patch: Option<Instant> = None;
    let mut retry = RETRY_FIRST;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = status_rx.changed() => if changed.is_err() { return },
        }
        // Patch the latest value until it is written (or equals the last).
        loop {
            if let Some(at) = last_patch {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(at + ANNOTATION_MIN_INTERVAL) => {}
                }
            }
            let value = annotation_value(&status_rx.borrow_and_update());
            if written.as_deref() == Some(value.as_str()) {
                break;
            }
            let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION: value}}});
            last_patch = Some(Instant::now());
            match pods.patch(pod, &params, &Patch::Merge(&patch)).await {
                Ok(_) => {
                    debug!(%pod, annotation = ANNOTATION, "pod annotation updated");
                    written = Some(value);
                    retry = RETRY_FIRST;
                    break;
                }
                Err(e) => {
                    warn!(%pod, error = %error_chain(&e), retry_in = ?retry, "cannot patch the pod annotation");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// The VMI that Events are about; `uid` is filled by the VMI watch
/// ([`super::vmi_source::watch_vmi_and_uid`]) and read at each Event.
#[derive(Debug, Clone)]
pub struct VmiRef {
    pub namespace: String,
    pub name: String,
    pub uid: watch::Receiver<Option<String>>,
}

impl VmiRef {
    fn object_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("kubevirt.io/v1".into()),
            kind: Some("VirtualMachineInstance".into()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            uid: self.uid.borrow().clone(),
            ..ObjectReference::default()
        }
    }
}

/// Turns the agent's outcomes into Events on the VMI, rate limited (see
/// the module doc); `instance` is the `reportingInstance` (the pod name).
/// Runs until `shutdown` or until the outcome sender is gone, then sends
/// what the rate limit still held back.
pub async fn publish_events(
    client: Client,
    vmi: VmiRef,
    instance: String,
    mut outcomes: mpsc::UnboundedReceiver<Outcome>,
    shutdown: CancellationToken,
) {
    let events: Api<Event> = Api::namespaced(client, &vmi.namespace);
    let sender = EventSender {
        events: &events,
        vmi: &vmi,
        instance: &instance,
    };
    let mut limiter = EventLimiter::new(EVENT_WINDOW);
    loop {
        let deadline = limiter.next_deadline();
        let due = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let emits = tokio::select! {
            _ = shutdown.cancelled() => break,
            outcome = outcomes.recv() => match outcome {
                Some(outcome) => limiter.offer(outcome, Instant::now()),
                None => break,
            },
            _ = due => limiter.due(Instant::now()),
        };
        for emit in emits {
            sender.send(&emit).await;
        }
    }
    let held = limiter.drain();
    if !held.is_empty() {
        let flush = async {
            for emit in &held {
                sender.send(emit).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    }
}

struct EventSender<'a> {
    events: &'a Api<Event>,
    vmi: &'a VmiRef,
    instance: &'a str,
}

impl EventSender<'_> {
    async fn send(&self, emit: &Emit) {
        let event = build_event(emit, &self.vmi.object_reference(), self.instance);
        let mut retry = RETRY_FIRST;
        for attempt in 1..=EVENT_ATTEMPTS {
            match self.events.create(&PostParams::default(), &event).await {
                Ok(_) => {
                    info!(reason = emit.reason(), note = %emit.note, "event recorded");
                    return;
                }
                Err(e) if attempt < EVENT_ATTEMPTS => {
                    debug!(reason = emit.reason(), error = %error_chain(&e), retry_in = ?retry, "cannot create event");
                    tokio::time::sleep(retry).await;
                    retry *= 2;
                }
                Err(e) => {
                    warn!(reason = emit.reason(), note = %emit.note, error = %error_chain(&e), "cannot create event; dropped")
                }
            }
        }
    }
}

/// The events.k8s.io/v1 Event for `emit` regarding `regarding`.
pub fn build_event(emit: &Emit, regarding: &ObjectReference, instance: &str) -> Event {
    let now = Timestamp::now();
    let base = regarding.name.as_deref().unwrap_or(COMPONENT);
    Event {
        metadata: ObjectMeta {
            // client-go's scheme: unique per object and time.
            name: Some(format!("{base}.{:x}", now.as_nanosecond())),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(emit.action().into()),
        reason: Some(emit.reason().into()),
        type_: Some(emit.type_().into()),
        note: Some(emit.note.clone()),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(COMPONENT.into()),
        reporting_instance: Some(instance.into()),
        ..Event::default()
    }
}

/// One Event to send: an outcome, possibly standing for several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    pub interface: String,
    pub kind: OutcomeKind,
    /// `<interface>: <message>[ (N times in the last 10s)]`, at most 1 KiB.
    pub note: String,
    /// How many outcomes this Event stands for.
    pub count: u32,
}

impl Emit {
    pub fn reason(&self) -> &'static str {
        reason(self.kind)
    }

    pub fn type_(&self) -> &'static str {
        match self.kind {
            OutcomeKind::Plugged | OutcomeKind::Unplugged => "Normal",
            OutcomeKind::Failed => "Warning",
        }
    }

    pub fn action(&self) -> &'static str {
        match self.kind {
            OutcomeKind::Plugged => "Attach",
            OutcomeKind::Unplugged => "Detach",
            OutcomeKind::Failed => "Reconcile",
        }
    }
}

pub fn reason(kind: OutcomeKind) -> &'static str {
    match kind {
        OutcomeKind::Plugged => "NicHotplugged",
        OutcomeKind::Unplugged => "NicUnplugged",
        OutcomeKind::Failed => "NicHotplugFailed",
    }
}

/// The rate limit of Events: a pure state machine over outcomes and time.
#[derive(Debug)]
pub struct EventLimiter {
    window: Duration,
    keys: BTreeMap<(String, &'static str), KeyState>,
}

#[derive(Debug)]
struct KeyState {
    kind: OutcomeKind,
    last_sent: Instant,
    /// Held back: the latest message and how many outcomes it stands for.
    held: Option<(String, u32)>,
}

impl EventLimiter {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            keys: BTreeMap::new(),
        }
    }

    /// Takes an outcome at `now`: what to send now (possibly nothing).
    pub fn offer(&mut self, outcome: Outcome, now: Instant) -> Vec<Emit> {
        let reason = reason(outcome.kind);
        let mut out = Vec::new();
        // Held Events of this interface's other reasons first, in order.
        for ((iface, r), state) in self.keys.iter_mut() {
            if *iface == outcome.interface
                && *r != reason
                && let Some(emit) = state.flush(iface, self.window, now)
            {
                out.push(emit);
            }
        }
        let key = (outcome.interface.clone(), reason);
        match self.keys.get_mut(&key) {
            Some(state) if now < state.last_sent + self.window => {
                let count = state.held.as_ref().map_or(0, |(_, n)| *n) + 1;
                state.held = Some((outcome.message, count));
            }
            _ => {
                out.push(Emit {
                    note: note(&outcome.interface, &outcome.message, 1, self.window),
                    interface: outcome.interface,
                    kind: outcome.kind,
                    count: 1,
                });
                self.keys.insert(
                    key,
                    KeyState {
                        kind: outcome.kind,
                        last_sent: now,
                        held: None,
                    },
                );
            }
        }
        out
    }

    /// When the next held Event is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.keys
            .values()
            .filter(|s| s.held.is_some())
            .map(|s| s.last_sent + self.window)
            .min()
    }

    /// The held Events whose window ended by `now`; forgets quiet keys.
    pub fn due(&mut self, now: Instant) -> Vec<Emit> {
        let window = self.window;
        let mut out = Vec::new();
        for ((iface, _), state) in self.keys.iter_mut() {
            if now >= state.last_sent + window
                && let Some(emit) = state.flush(iface, window, now)
            {
                out.push(emit);
            }
        }
        self.keys
            .retain(|_, s| s.held.is_some() || now < s.last_sent + window);
        out
    }

    /// Everything still held, regardless of time (at shutdown).
    pub fn drain(&mut self) -> Vec<Emit> {
        let window = self.window;
        let out = self
            .keys
            .iter_mut()
            .filter_map(|((iface, _), state)| {
                let (message, count) = state.held.take()?;
                Some(Emit {
                    interface: iface.clone(),
                    kind: state.kind,
                    note: note(iface, &message, count, window),
                    count,
                })
            })
            .collect();
        self.keys.clear();
        out
    }
}

impl KeyState {
    fn flush(&mut self, iface: &str, window: Duration, now: Instant) -> Option<Emit> {
        let (message, count) = self.held.take()?;
        self.last_sent = now;
        Some(Emit {
            interface: iface.to_string(),
            kind: self.kind,
            note: note(iface, &message, count, window),
            count,
        })
    }
}

fn note(iface: &str, message: &str, count: u32, window: Duration) -> String {
    let mut note = format!("{iface}: {message}");
    if count > 1 {
        note.push_str(&format!(
            " ({count} times in the last {}s)",
            window.as_secs()
        ));
    }
    truncate(note, NOTE_MAX_BYTES)
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Phase;
    use crate::status::{InterfaceStatus, PhaseTransition, Timestamp as StatusTime};

    fn outcome(iface: &str, kind: OutcomeKind, message: &str) -> Outcome {
        Outcome {
            interface: iface.into(),
            kind,
            message: message.into(),
        }
    }

    #[test]
    fn annotation_leaves_out_timestamps() {
        let mut iface = InterfaceStatus::new("dyniface1", Phase::Attached);
        iface.mac = Some("02:00:00:aa:bb:01".into());
        iface.pod_interface_seen = Some(StatusTime::now());
        iface.phase_transitions = vec![PhaseTransition {
            phase: Phase::Attached,
            at: StatusTime::now(),
        }];
        let doc = StatusDocument {
            interfaces: vec![iface],
            guest_agent_connected: Some(true),
            ..StatusDocument::default()
        };
        assert_eq!(
            annotation_value(&doc),
            r#"[{"name":"dyniface1","mac":"02:00:00:aa:bb:01","phase":"Attached"}]"#
        );
        // The same state at a later time gives the same value: no patch.
        let mut later = doc.clone();
        later.interfaces[0].phase_transitions[0].at = StatusTime::now();
        assert_eq!(annotation_value(&later), annotation_value(&doc));
        assert_eq!(annotation_value(&StatusDocument::default()), "[]");
    }

    #[test]
    fn burst_is_one_event_then_one_folded() {
        let t0 = Instant::now();
        let mut limiter = EventLimiter::new(EVENT_WINDOW);
        let failed = |n: u32| outcome("net1", OutcomeKind::Failed, &format!("attach failed #{n}"));
        let first = limiter.offer(failed(1), t0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].note, "net1: attach failed #1");
        assert_eq!(first[0].reason(), "NicHotplugFailed");
        assert_eq!(first[0].type_(), "Warning");
        for n in 2..=5 {
            let at = t0 + Duration::from_millis(100 * u64::from(n));
            assert!(limiter.offer(failed(n), at).is_empty());
        }
        assert_eq!(limiter.next_deadline(), Some(t0 + EVENT_WINDOW));
        assert!(limiter.due(t0 + Duration::from_secs(9)).is_empty());
        let folded = limiter.due(t0 + EVENT_WINDOW);
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].count, 4);
        assert_eq!(
            folded[0].note,
            "net1: attach failed #5 (4 times in the last 10s)"
        );
        assert_eq!(limiter.next_deadline(), None);
        // Quiet for a window: the key is forgotten, the next one goes out at once.
        assert!(limiter.due(t0 + EVENT_WINDOW * 2).is_empty());
        assert_eq!(limiter.offer(failed(6), t0 + EVENT_WINDOW * 2).len(), 1);
    }

    #[test]
    fn keys_are_per_interface_and_reason_and_held_ones_go_first() {
        let t0 = Instant::now();
        let mut limiter = EventLimiter::new(EVENT_WINDOW);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(
            limiter
                .offer(outcome("a", OutcomeKind::Failed, "x"), ms(0))
                .len(),
            1
        );
        assert!(
            limiter
                .offer(outcome("a", OutcomeKind::Failed, "y"), ms(10))
                .is_empty()
        );
        // Another interface is not limited by "a".
        assert_eq!(
            limiter
                .offer(outcome("b", OutcomeKind::Failed, "x"), ms(20))
                .len(),
            1
        );
        // "a" plugs: its held failure goes first, then the plug.
        let out = limiter.offer(
            outcome("a", OutcomeKind::Plugged, "plugged in 0.041s"),
            ms(30),
        );
        let notes: Vec<_> = out.iter().map(|e| e.note.as_str()).collect();
        assert_eq!(notes, ["a: y", "a: plugged in 0.041s"]);
        assert_eq!(out[1].reason(), "NicHotplugged");
        assert_eq!(out[1].type_(), "Normal");
        // Held "a" failures were flushed: nothing due for "a" any more.
        assert!(limiter.due(ms(10_000)).is_empty());
    }

    #[test]
    fn drain_and_truncate() {
        let t0 = Instant::now();
        let mut limiter = EventLimiter::new(EVENT_WINDOW);
        limiter.offer(outcome("a", OutcomeKind::Unplugged, "unplugged in 1s"), t0);
        limiter.offer(outcome("a", OutcomeKind::Unplugged, "unplugged in 2s"), t0);
        let held = limiter.drain();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].note, "a: unplugged in 2s");
        assert_eq!(held[0].reason(), "NicUnplugged");
        let long = "é".repeat(600);
        let note = note("a", &long, 1, EVENT_WINDOW);
        assert!(note.len() <= NOTE_MAX_BYTES);
        assert!(note.ends_with("..."));
    }
}
