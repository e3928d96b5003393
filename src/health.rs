//! What the agent needs before it can do its work, as it is *now*: each part
//! is set by whoever last used it (the reconcile loop after every pass, the
//! spec source), ready or not with the reason. `/readyz` and the status read
//! it; a change is logged once, not on every pass.

use std::sync::Mutex;

/// A dependency of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The libvirt daemon answers and the domain can be read.
    Libvirt,
    /// The pod namespace's links can be read and their events arrive.
    Netlink,
    /// A valid VMI spec has been read.
    Spec,
    /// On a migration target (the domain absent or arriving): every spec
    /// interface's plumbing is prepared.
    Plumbing,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Libvirt, Part::Netlink, Part::Spec, Part::Plumbing];

    pub fn name(self) -> &'static str {
        match self {
            Part::Libvirt => "libvirt",
            Part::Netlink => "netlink",
            Part::Spec => "spec",
            Part::Plumbing => "plumbing",
        }
    }

    /// Why the part is not ready before anyone set it; `None`: ready (a
    /// pod that is no migration target has nothing to prepare, and the
    /// first pass, which needs libvirt, sets it anyway).
    fn initial_reason(self) -> Option<&'static str> {
        match self {
            Part::Libvirt => Some("not connected yet"),
            Part::Netlink => Some("not subscribed yet"),
            Part::Spec => Some("no VMI read yet"),
            Part::Plumbing => None,
        }
    }
}

/// Per part: `None` when ready, else why not.
#[derive(Debug)]
pub struct Readiness {
    parts: Mutex<[Option<String>; 4]>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            parts: Mutex::new(Part::ALL.map(|p| p.initial_reason().map(str::to_string))),
        }
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `part` as ready (`Ok`) or not with the reason; logs a change.
    pub fn set(&self, part: Part, state: Result<(), String>) {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut parts[part as usize];
        let new = state.err();
        if *slot == new {
            return;
        }
        match &new {
            None => tracing::info!(part = part.name(), "available"),
            // The first failure after the start is the normal "not yet".
            Some(reason) => tracing::warn!(part = part.name(), %reason, "not available"),
        }
        *slot = new;
    }

    /// The parts that are not ready, with the reason, in a fixed order.
    pub fn not_ready(&self) -> Vec<(&'static str, String)> {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        Part::ALL
            .iter()
            .filter_map(|p| Some((p.name(), parts[*p as usize].clone()?)))
            .collect()
    }

    /// Whether every part is ready.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    /// The names of the parts that are not ready.
    pub fn missing(&self) -> Vec<&'static str> {
        self.not_ready().into_iter().map(|(name, _)| name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_last_report_of_each_part() {
        let r = Readiness::new();
        assert_eq!(r.missing(), ["libvirt", "netlink", "spec"]);
        r.set(Part::Libvirt, Ok(()));
        r.set(Part::Netlink, Ok(()));
        r.set(Part::Spec, Ok(()));
        assert!(r.not_ready().is_empty());
        r.set(Part::Libvirt, Err("connection refused".into()));
        assert_eq!(
            r.not_ready(),
            [("libvirt", "connection refused".to_string())]
        );
        r.set(Part::Libvirt, Ok(()));
        assert!(r.missing().is_empty());
        r.set(Part::Plumbing, Err("not prepared for the domain: a".into()));
        assert_eq!(r.missing(), ["plumbing"]);
    }
}
