//! The phases each interface went through, with their times: what
//! `phaseTransitions` shows, and what a phase change means for operators
//! (an [`Outcome`]) and for the latency histograms (a [`Timing`]).

use std::collections::HashMap;

use crate::plan::Phase;
use crate::status::{InterfaceStatus, PhaseTransition, Timestamp, monotonic_ns};

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

/// A measured stretch of a plug or an unplug, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timing {
    /// From first seeing the pod interface to entering a plug phase.
    Plug(Phase, f64),
    /// From the unplug request to the device's removal.
    Removed(f64),
    /// From the unplug request to nothing being left.
    Cleaned(f64),
}

/// What recording a status changed.
#[derive(Debug, Default)]
pub struct Change {
    /// The phase the interface entered, if it changed.
    pub entered: Option<Phase>,
    pub outcome: Option<Outcome>,
    pub timings: Vec<Timing>,
}

#[derive(Debug, Default)]
struct Entry {
    pod_seen: Option<Timestamp>,
    transitions: Vec<PhaseTransition>,
    unplug_started: Option<Timestamp>,
}

#[derive(Debug, Default)]
pub struct PhaseHistory {
    entries: HashMap<String, Entry>,
}

pub fn seconds_since(t: &Timestamp) -> f64 {
    monotonic_ns().saturating_sub(t.monotonic_ns) as f64 / 1e9
}

impl PhaseHistory {
    /// The pass observed the pod interface of a plug attempt at `at`.
    pub fn pod_seen(&mut self, name: &str, at: Timestamp) {
        let entry = self.entries.entry(name.to_string()).or_default();
        entry.pod_seen.get_or_insert(at);
    }

    pub fn detach_started(&mut self, name: &str) {
        let entry = self.entries.entry(name.to_string()).or_default();
        entry.unplug_started.get_or_insert_with(Timestamp::now);
    }

    /// Seconds since `name`'s unplug started, if one did.
    pub fn since_unplug_started(&self, name: &str) -> Option<f64> {
        let started = self.entries.get(name)?.unplug_started.as_ref()?;
        Some(seconds_since(started))
    }

    /// Records the phase of `status`, then fills its history fields.
    pub fn record(&mut self, status: &mut InterfaceStatus) -> Change {
        let entry = self.entries.entry(status.name.clone()).or_default();
        let mut change = Change::default();
        if matches!(status.phase, Phase::Pending | Phase::Detached) {
            entry.pod_seen = None;
        }
        if !matches!(
            status.phase,
            Phase::Detaching | Phase::DetachPending | Phase::Detached
        ) {
            entry.unplug_started = None;
        }
        if entry.transitions.last().map(|t| t.phase) != Some(status.phase) {
            entry.transitions.retain(|t| t.phase != status.phase);
            entry.transitions.push(PhaseTransition {
                phase: status.phase,
                at: Timestamp::now(),
            });
            change.entered = Some(status.phase);
            change.outcome = outcome_of(status, entry);
            if matches!(
                status.phase,
                Phase::Plumbed | Phase::Prepared | Phase::Attached | Phase::Ready
            ) && let Some(seen) = &entry.pod_seen
            {
                change
                    .timings
                    .push(Timing::Plug(status.phase, seconds_since(seen)));
            }
            if status.phase == Phase::Detached {
                // Reported now: the entry's removal later is not a second unplug.
                if let Some(started) = entry.unplug_started.take() {
                    change
                        .timings
                        .push(Timing::Cleaned(seconds_since(&started)));
                }
            }
        }
        status.pod_interface_seen = entry.pod_seen;
        status.phase_transitions = entry.transitions.clone();
        change
    }

    /// Forgets the interfaces not in `present`; those that went in the
    /// middle of an unplug (their entry is gone, not Detached) finished it.
    pub fn forget_absent(&mut self, present: &[InterfaceStatus]) -> Vec<Change> {
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|name| !present.iter().any(|s| &&s.name == name))
            .cloned()
            .collect();
        gone.into_iter()
            .filter_map(|name| {
                let started = self.entries.remove(&name)?.unplug_started?;
                let took = seconds_since(&started);
                Some(Change {
                    entered: None,
                    outcome: Some(Outcome {
                        interface: name,
                        kind: OutcomeKind::Unplugged,
                        message: format!("unplugged in {took:.3}s"),
                    }),
                    timings: vec![Timing::Cleaned(took)],
                })
            })
            .collect()
    }
}

/// The outcome an interface's new phase stands for, if any.
fn outcome_of(status: &InterfaceStatus, entry: &Entry) -> Option<Outcome> {
    let since_seen = |phase: Phase| {
        let seen = entry.pod_seen?;
        let at = entry.transitions.iter().find(|t| t.phase == phase)?.at;
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
            let took = entry
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
