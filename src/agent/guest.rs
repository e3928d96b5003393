//! When to ask the guest agent, and what it said last.
//!
//! The guest agent is asked when something may have changed (a device or
//! agent event marked the view stale), fast whenever an interface becomes
//! Attached (20 ms, doubling to 2 s, for up to 30 s) until the guest reports
//! the new MAC, then twice more ([`RENAME_LOOKS`]; a real guest's udev
//! renames a new NIC, `eth0` -> `enp1s0`, shortly after the kernel named it,
//! so the name the confirmation saw may already be stale), and otherwise
//! every `refresh`. Idle, nothing wakes more often than that. An agent that is not connected yet (the guest still boots) does
//! not end the fast polling: it may connect any moment, and the device with it.
//!
//! The pass asks after it applied its steps: a plug is never delayed by a
//! guest round trip, and the confirmation it waits for needs the device.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::error_chain;
use crate::hypervisor::{DomainState, GuestView, Hypervisor};

const FAST_POLL_FIRST: Duration = Duration::from_millis(20);
const FAST_POLL_MAX: Duration = Duration::from_secs(2);
const FAST_POLL_FOR: Duration = Duration::from_secs(30);
/// How soon to try again when an earlier query was still running (one that
/// did not answer in time goes on in the background), doubling up to
/// [`BUSY_RETRY_MAX`] while it still runs: a wedged agent holds that query
/// for as long as libvirt waits.
const BUSY_RETRY: Duration = Duration::from_millis(100);
const BUSY_RETRY_MAX: Duration = Duration::from_secs(2);
/// When, after the guest confirmed a device, it is asked again, for the name
/// udev gives the NIC (measured on the Debian rig guest: 0.1 to 3.4 s after
/// the device appeared, the machine loaded); the second look is for a slow
/// guest.
pub const RENAME_LOOKS: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(8)];

#[derive(Debug)]
struct FastPoll {
    next: Instant,
    interval: Duration,
    until: Instant,
}

pub struct GuestPoller {
    refresh: Duration,
    view: Option<GuestView>,
    read_at: Option<Instant>,
    stale: Arc<AtomicBool>,
    fast: Option<FastPoll>,
    /// The looks still due after the guest confirmed a device
    /// ([`RENAME_LOOKS`]), earliest first.
    rename_looks: Vec<Instant>,
    /// The last attempt found an earlier query still running: nothing is
    /// due before this.
    busy_retry: Option<Instant>,
    /// The wait before the next retry behind a running query.
    busy_backoff: Duration,
}

impl GuestPoller {
    pub fn new(refresh: Duration) -> Self {
        Self {
            refresh,
            view: None,
            read_at: None,
            stale: Arc::default(),
            fast: None,
            rename_looks: Vec::new(),
            busy_retry: None,
            busy_backoff: BUSY_RETRY,
        }
    }

    /// What the guest agent said last, if it was asked since the domain ran.
    pub fn view(&self) -> Option<&GuestView> {
        self.view.as_ref()
    }

    /// Set this flag (from a domain-event listener) to have the guest agent
    /// asked again on the next pass.
    pub fn stale_flag(&self) -> Arc<AtomicBool> {
        self.stale.clone()
    }

    pub fn mark_stale(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    /// When the loop must run again for the guest agent.
    pub fn next_wake(&self) -> Option<Instant> {
        let refresh = self.read_at.map(|t| t + self.refresh);
        [
            self.fast.as_ref().map(|p| p.next),
            refresh,
            self.rename_looks.first().copied(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|due| self.busy_retry.map_or(due, |retry| due.max(retry)))
    }

    /// An interface became Attached: ask often until the guest reports it.
    pub fn expect_device(&mut self) {
        let now = Instant::now();
        self.fast = Some(FastPoll {
            next: now + FAST_POLL_FIRST,
            interval: FAST_POLL_FIRST,
            until: now + FAST_POLL_FOR,
        });
    }

    /// Ends fast polling once nothing waits for the guest (with the looks
    /// of [`RENAME_LOOKS`] after it), or at its deadline.
    pub fn settle(&mut self, waiting: bool) {
        let Some(fast) = &self.fast else {
            return;
        };
        if !waiting {
            let now = Instant::now();
            self.rename_looks = RENAME_LOOKS.iter().map(|d| now + *d).collect();
            self.fast = None;
        } else if Instant::now() >= fast.until {
            self.fast = None;
        }
    }

    /// Asks the guest agent when due; returns whether it did.
    pub async fn refresh<H: Hypervisor>(
        &mut self,
        hyp: &H,
        domain_name: &str,
        domain: Option<&DomainState>,
    ) -> bool {
        if !domain.is_some_and(|d| d.running) {
            self.view = None;
            self.read_at = None;
            // Nothing is asked of a guest that does not run, so a poll or
            // look kept here would stay due, and the loop, which sleeps
            // until the next one, would not sleep at all. A device the
            // domain has when it runs again becomes Attached again and is
            // polled then.
            self.fast = None;
            self.rename_looks.clear();
            self.busy_retry = None;
            self.busy_backoff = BUSY_RETRY;
            return false;
        }
        let now = Instant::now();
        let stale = self.stale.swap(false, Ordering::SeqCst);
        let poll_due = self.fast.as_ref().is_some_and(|p| p.next <= now)
            || self.rename_looks.first().is_some_and(|t| *t <= now);
        // Half a period early is due too: a pass woken for something else
        // (the resync) takes the refresh along, so the two timers fall into
        // one wake-up instead of drifting apart.
        let refresh_due = self.read_at.is_none_or(|t| t + self.refresh / 2 <= now);
        if !(stale || poll_due || refresh_due || self.view.is_none()) {
            return false;
        }
        let view = match hyp.guest_interfaces(domain_name).await {
            Ok(Some(view)) => view,
            // An earlier query is still running: keep what is known, and
            // try again shortly, not on every pass until it ends (what is
            // due stays due meanwhile).
            Ok(None) => {
                self.busy_retry = Some(now + self.busy_backoff);
                self.busy_backoff = (self.busy_backoff * 2).min(BUSY_RETRY_MAX);
                return false;
            }
            Err(e) => GuestView::NotConnected(error_chain(&e)),
        };
        if let GuestView::NotConnected(reason) = &view
            && !matches!(self.view, Some(GuestView::NotConnected(_)))
        {
            // Logged on the change only: the guest controls how often this happens.
            warn!(%reason, "guest agent not available");
        }
        debug!(poll_due, stale, "guest agent asked");
        self.view = Some(view);
        self.read_at = Some(Instant::now());
        self.busy_retry = None;
        self.busy_backoff = BUSY_RETRY;
        self.rename_looks.retain(|t| *t > now);
        if let Some(poll) = self.fast.as_mut().filter(|_| poll_due) {
            poll.interval = (poll.interval * 2).min(FAST_POLL_MAX);
            poll.next = Instant::now() + poll.interval;
        }
        true
    }
}
