//! Which pod links CNI may still be configuring, from what the passes saw
//! ([`Link::settling`]): the planner takes no address from them (see
//! `plan::CNI_SETTLE`).

use std::collections::HashMap;

use tokio::time::Instant;

use crate::model::{IfName, IpCidr, PodRoute};
use crate::netns::Link;
use crate::plan::CNI_SETTLE;

/// When each link's addresses and routes last changed, as the passes saw
/// them, for [`Link::settling`] (see `plan::CNI_SETTLE`). A link counts as
/// changed when a pass first sees it, the first pass's links too: nicplug
/// may start while CNI is midway (the crash test caught a record taken
/// between CNI's address and its route). A restart pays next to nothing for
/// it: a plumbed link needs no change, and a new one gets its device at once.
#[derive(Default)]
pub(super) struct LinkChanges {
    seen: HashMap<IfName, LinkState>,
}

struct LinkState {
    addresses: Vec<IpCidr>,
    routes: Vec<PodRoute>,
    changed_at: Instant,
}

impl LinkChanges {
    /// Notes what changed in `links` and marks the links still settling.
    pub(super) fn mark_settling(&mut self, links: &mut [Link], now: Instant) {
        self.seen
            .retain(|name, _| links.iter().any(|l| &l.name == name));
        for link in links.iter_mut() {
            let state = self
                .seen
                .entry(link.name.clone())
                .or_insert_with(|| LinkState {
                    addresses: link.addresses.clone(),
                    routes: link.routes.clone(),
                    changed_at: now,
                });
            if state.addresses != link.addresses || state.routes != link.routes {
                state.addresses.clone_from(&link.addresses);
                state.routes.clone_from(&link.routes);
                state.changed_at = now;
            }
            link.settling = now.duration_since(state.changed_at) < CNI_SETTLE;
        }
    }

    /// When the next settling link is settled, if one is.
    pub(super) fn next_settled(&self, now: Instant) -> Option<Instant> {
        self.seen
            .values()
            .map(|s| s.changed_at + CNI_SETTLE)
            .filter(|at| *at > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::netns::LinkKind;

    #[test]
    fn a_link_whose_addresses_change_settles_for_a_moment_first() {
        let t0 = Instant::now();
        let mut changes = LinkChanges::default();
        let address = |a: &str| a.parse::<IpCidr>().unwrap();
        let mut there = Link::fixture(3, "pod1", LinkKind::Veth);
        there.addresses = vec![address("169.254.1.5/24")];
        // The first pass's links too: nicplug may start while CNI is midway.
        let mut links = vec![there.clone()];
        changes.mark_settling(&mut links, t0);
        assert!(links[0].settling);
        assert_eq!(changes.next_settled(t0), Some(t0 + CNI_SETTLE));
        let settled = t0 + CNI_SETTLE;
        changes.mark_settling(&mut links, settled);
        assert!(!links[0].settling);
        assert_eq!(changes.next_settled(settled), None);
        // A link that appears with addresses, and one whose addresses change,
        // settle for CNI_SETTLE.
        let mut new = Link::fixture(4, "pod2", LinkKind::Veth);
        new.addresses = vec![address("169.254.2.5/24")];
        there.addresses.push(address("fe80::1:5/64"));
        let t1 = settled + Duration::from_millis(10);
        let mut links = vec![there.clone(), new.clone()];
        changes.mark_settling(&mut links, t1);
        assert!(links.iter().all(|l| l.settling));
        assert_eq!(changes.next_settled(t1), Some(t1 + CNI_SETTLE));
        // Unchanged for CNI_SETTLE: settled.
        let t2 = t1 + CNI_SETTLE;
        let mut links = vec![there, new];
        changes.mark_settling(&mut links, t2);
        assert!(links.iter().all(|l| !l.settling));
        assert_eq!(changes.next_settled(t2), None);
        // A new link without addresses too: CNI has not added them yet.
        let mut links = vec![Link::fixture(5, "pod3", LinkKind::Veth)];
        changes.mark_settling(&mut links, t2);
        assert!(links[0].settling);
        assert_eq!(changes.next_settled(t2), Some(t2 + CNI_SETTLE));
    }
}
