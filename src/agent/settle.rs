//! Which pod links CNI may still be configuring ([`Link::cni`]), from
//! Multus' network-status when a source gives it, else from what the passes
//! saw: the planner takes no address from them (see `plan::CNI_SETTLE`).

use std::collections::HashMap;

use tokio::time::Instant;

use crate::model::network_status::NetworkStatus;
use crate::model::{IfName, IpCidr, Mac, PodRoute};
use crate::netns::{CniDone, CniProgress, Link};
use crate::plan::{CNI_SETTLE, NETWORK_STATUS_WAIT};

/// When each link's addresses and routes last changed, as the passes saw
/// them, for [`Link::cni`] where no network-status tells (see
/// `plan::CNI_SETTLE`). A link counts as
/// changed when a pass first sees it, the first pass's links too: nicplug
/// may start while CNI is midway (the crash test caught a record taken
/// between CNI's address and its route). A restart pays next to nothing for
/// it: a plumbed link needs no change, and a new one gets its device at once.
#[derive(Default)]
pub(super) struct LinkChanges {
    seen: HashMap<IfName, LinkState>,
    /// The rule that said CNI was done with a link, kept while the link is
    /// on a bridge: nicplug's own enslave changes its addresses, which is
    /// no new work of CNI's.
    done: HashMap<IfName, CniDone>,
}

struct LinkState {
    addresses: Vec<IpCidr>,
    routes: Vec<PodRoute>,
    changed_at: Instant,
    appeared_at: Instant,
    /// Waiting for its network-status entry in the last pass.
    awaiting: bool,
    /// Settling in the last pass: only then does the settle window's end
    /// need a pass (a link that network-status or an earlier pass called
    /// done changes no plan when its window ends).
    settling: bool,
}

impl LinkChanges {
    /// Notes what changed in `links` and marks how far CNI is with each.
    /// With `network_status` (a source gave a document), a link is done
    /// once an entry names it (Multus writes it after CNI ADD returned) and
    /// awaited until then, for `NETWORK_STATUS_WAIT` at most; without (or
    /// after that), once it stayed as it was for `CNI_SETTLE`.
    pub(super) fn mark_cni_progress(
        &mut self,
        links: &mut [Link],
        network_status: Option<&[NetworkStatus]>,
        now: Instant,
    ) {
        self.seen
            .retain(|name, _| links.iter().any(|l| &l.name == name));
        self.done
            .retain(|name, _| links.iter().any(|l| &l.name == name && l.master.is_some()));
        for link in links.iter_mut() {
            let state = self
                .seen
                .entry(link.name.clone())
                .or_insert_with(|| LinkState {
                    addresses: link.addresses.clone(),
                    routes: link.routes.clone(),
                    changed_at: now,
                    appeared_at: now,
                    awaiting: false,
                    settling: false,
                });
            if state.addresses != link.addresses || state.routes != link.routes {
                state.addresses.clone_from(&link.addresses);
                state.routes.clone_from(&link.routes);
                state.changed_at = now;
            }
            let awaited = now.duration_since(state.appeared_at) < NETWORK_STATUS_WAIT;
            let settling = now.duration_since(state.changed_at) < CNI_SETTLE;
            let listed = network_status.map(|entries| entries.iter().any(|e| lists(e, link)));
            link.cni = match listed {
                Some(true) => CniProgress::Done(CniDone::NetworkStatus),
                Some(false) if awaited => CniProgress::AwaitingNetworkStatus,
                _ if settling => CniProgress::Settling,
                _ => CniProgress::Done(CniDone::SettleWindow),
            };
            state.awaiting = link.cni == CniProgress::AwaitingNetworkStatus;
            match (link.cni, self.done.get(&link.name)) {
                (CniProgress::Done(rule), None) => {
                    self.done.insert(link.name.clone(), rule);
                }
                (_, Some(rule)) if link.master.is_some() => link.cni = CniProgress::Done(*rule),
                _ => {}
            }
            state.settling = link.cni == CniProgress::Settling;
        }
    }

    /// When the next settling link among `pod_ifaces` (the pod interfaces
    /// the spec's plans name; nicplug's own bridges and taps, whose IPv6
    /// addresses come and go after a plug, wait for nothing) is settled, or
    /// the next wait for a network-status entry ends, if one does.
    pub(super) fn next_settled(&self, now: Instant, pod_ifaces: &[IfName]) -> Option<Instant> {
        self.seen
            .iter()
            .filter(|(name, _)| pod_ifaces.contains(name))
            .flat_map(|(_, s)| {
                let wait_ends = s.awaiting.then_some(s.appeared_at + NETWORK_STATUS_WAIT);
                let settled = s.settling.then_some(s.changed_at + CNI_SETTLE);
                settled.into_iter().chain(wait_ends)
            })
            .filter(|at| *at > now)
            .min()
    }
}

/// Whether `entry` is the network-status of `link` as it is now: its name,
/// and the MAC CNI gave it while it has that MAC still (not on a bridge).
/// An entry left from an earlier attempt on the same pod interface name
/// names another MAC (CNI gives each new link its own).
fn lists(entry: &NetworkStatus, link: &Link) -> bool {
    let mac = entry.mac.as_deref().and_then(|m| m.parse::<Mac>().ok());
    entry.interface.as_deref() == Some(link.name.as_str())
        && (link.master.is_some() || mac.is_none() || mac == link.mac)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::netns::LinkKind;

    /// The tests' pod interfaces.
    fn all() -> Vec<IfName> {
        ["pod1", "pod2", "pod3"]
            .map(|n| IfName::new(n).unwrap())
            .to_vec()
    }

    #[test]
    fn a_link_whose_addresses_change_settles_for_a_moment_first() {
        let t0 = Instant::now();
        let mut changes = LinkChanges::default();
        let address = |a: &str| a.parse::<IpCidr>().unwrap();
        let mut there = Link::fixture(3, "pod1", LinkKind::Veth);
        there.addresses = vec![address("169.254.1.5/24")];
        // The first pass's links too: nicplug may start while CNI is midway.
        let mut links = vec![there.clone()];
        changes.mark_cni_progress(&mut links, None, t0);
        assert_eq!(links[0].cni, CniProgress::Settling);
        assert_eq!(changes.next_settled(t0, &all()), Some(t0 + CNI_SETTLE));
        let settled = t0 + CNI_SETTLE;
        changes.mark_cni_progress(&mut links, None, settled);
        assert_eq!(links[0].cni, CniProgress::Done(CniDone::SettleWindow));
        assert_eq!(changes.next_settled(settled, &all()), None);
        // A link that appears with addresses, and one whose addresses change,
        // settle for CNI_SETTLE.
        let mut new = Link::fixture(4, "pod2", LinkKind::Veth);
        new.addresses = vec![address("169.254.2.5/24")];
        there.addresses.push(address("fe80::1:5/64"));
        let t1 = settled + Duration::from_millis(10);
        let mut links = vec![there.clone(), new.clone()];
        changes.mark_cni_progress(&mut links, None, t1);
        assert!(links.iter().all(|l| l.cni == CniProgress::Settling));
        assert_eq!(changes.next_settled(t1, &all()), Some(t1 + CNI_SETTLE));
        // Unchanged for CNI_SETTLE: settled.
        let t2 = t1 + CNI_SETTLE;
        let mut links = vec![there, new];
        changes.mark_cni_progress(&mut links, None, t2);
        assert!(
            links
                .iter()
                .all(|l| l.cni == CniProgress::Done(CniDone::SettleWindow))
        );
        assert_eq!(changes.next_settled(t2, &all()), None);
        // nicplug's enslave takes the addresses: no new work of CNI's, the
        // rule that ended the wait stands.
        let mut enslaved = links[0].clone();
        enslaved.master = Some(9);
        enslaved.addresses.clear();
        let mut links = vec![enslaved, links[1].clone()];
        changes.mark_cni_progress(&mut links, None, t2);
        assert_eq!(links[0].cni, CniProgress::Done(CniDone::SettleWindow));
        // A new link without addresses too: CNI has not added them yet.
        let mut links = vec![Link::fixture(5, "pod3", LinkKind::Veth)];
        changes.mark_cni_progress(&mut links, None, t2);
        assert_eq!(links[0].cni, CniProgress::Settling);
        assert_eq!(changes.next_settled(t2, &all()), Some(t2 + CNI_SETTLE));
    }

    #[test]
    fn a_link_done_by_network_status_wakes_no_pass_when_it_changes() {
        let t0 = Instant::now();
        let mut changes = LinkChanges::default();
        let mut pod = Link::fixture(3, "pod1", LinkKind::Veth);
        let listed = [NetworkStatus {
            name: "default/blue".into(),
            interface: Some("pod1".into()),
            ips: vec![],
            mac: None,
            default: false,
            dns: None,
        }];
        let mut links = vec![pod.clone()];
        changes.mark_cni_progress(&mut links, Some(&listed), t0);
        assert_eq!(changes.next_settled(t0, &all()), None);
        // Its addresses change (nicplug's own enslave, the kernel's IPv6
        // link-local address): still done, and no settle window to wake for.
        pod.addresses = vec!["fe80::1/64".parse().unwrap()];
        let later = t0 + CNI_SETTLE;
        let mut links = vec![pod.clone()];
        changes.mark_cni_progress(&mut links, Some(&listed), later);
        assert_eq!(links[0].cni, CniProgress::Done(CniDone::NetworkStatus));
        assert_eq!(changes.next_settled(later, &all()), None);
        // Without network-status the same change is waited out.
        pod.addresses = vec!["fe80::2/64".parse().unwrap()];
        let mut links = vec![pod];
        changes.mark_cni_progress(&mut links, None, later);
        assert_eq!(links[0].cni, CniProgress::Settling);
        assert_eq!(
            changes.next_settled(later, &all()),
            Some(later + CNI_SETTLE)
        );
        // Unless no plan names the link (one of nicplug's bridges or taps).
        assert_eq!(changes.next_settled(later, &[]), None);
    }

    #[test]
    fn with_network_status_cni_is_done_when_its_entry_names_the_link() {
        let t0 = Instant::now();
        let mut changes = LinkChanges::default();
        let pod = Link::fixture(3, "pod1", LinkKind::Veth);
        let entry = |interface: &str, mac: Option<&str>| NetworkStatus {
            name: "default/blue".into(),
            interface: Some(interface.into()),
            ips: vec![],
            mac: mac.map(Into::into),
            default: false,
            dns: None,
        };
        let progress = |changes: &mut LinkChanges, entries: &[NetworkStatus], link: &Link| {
            let mut links = vec![link.clone()];
            changes.mark_cni_progress(&mut links, Some(entries), t0);
            links[0].cni
        };
        // Just appeared, and listed: done at once, no window waited.
        let own_mac = pod.mac.unwrap().to_string();
        assert_eq!(
            progress(&mut changes, &[entry("pod1", Some(&own_mac))], &pod),
            CniProgress::Done(CniDone::NetworkStatus)
        );
        assert_eq!(
            progress(&mut changes, &[entry("pod1", None)], &pod),
            CniProgress::Done(CniDone::NetworkStatus)
        );
        // Not listed, or listed with another MAC (an earlier attempt's
        // entry): awaited, however long the link stayed as it is.
        let later = t0 + CNI_SETTLE * 4;
        for entries in [
            vec![entry("pod2", None)],
            vec![entry("pod1", Some("0a:58:00:00:00:99"))],
            vec![],
        ] {
            let mut links = vec![pod.clone()];
            changes.mark_cni_progress(&mut links, Some(&entries), later);
            assert_eq!(
                links[0].cni,
                CniProgress::AwaitingNetworkStatus,
                "{entries:?}"
            );
        }
        // On the bridge (nicplug gave it the bridge's MAC): still its entry.
        let enslaved = Link {
            master: Some(9),
            mac: Some(Mac::from_bytes([2, 0, 0, 0, 0, 1])),
            ..pod.clone()
        };
        assert_eq!(
            progress(&mut changes, &[entry("pod1", Some(&own_mac))], &enslaved),
            CniProgress::Done(CniDone::NetworkStatus)
        );
        // A source that never lists it does not hold the uplink for good:
        // the wait wakes the loop when it ends, and the window decides.
        let mut changes = LinkChanges::default();
        let mut links = vec![pod.clone()];
        changes.mark_cni_progress(&mut links, Some(&[]), t0);
        assert_eq!(
            changes.next_settled(t0 + CNI_SETTLE, &all()),
            Some(t0 + NETWORK_STATUS_WAIT)
        );
        changes.mark_cni_progress(&mut links, Some(&[]), t0 + NETWORK_STATUS_WAIT);
        assert_eq!(links[0].cni, CniProgress::Done(CniDone::SettleWindow));
    }
}
