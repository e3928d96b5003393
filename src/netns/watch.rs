//! Link, address and route events of the pod network namespace, as
//! reconcile triggers.
//!
//! Protocol, step by step:
//! 1. [`LinkEvents::subscribe`] opens a NETLINK_ROUTE socket in the calling
//!    thread's network namespace and binds it to RTNLGRP_LINK, the IPv4 and
//!    IPv6 address and route groups ([`POD_NETNS_EVENTS`]; routes because
//!    CNI adds them after the addresses, and the record must hold them;
//!    this module is the one place those groups are named). When it returns,
//!    the kernel already queues every later event for it.
//! 2. The caller then does its initial dump (so nothing that happens between
//!    dump and subscription is lost).
//! 3. [`LinkEvents::run`] wakes the caller's [`Notify`] for every datagram of
//!    events. Events are only triggers: the caller re-reads the namespace,
//!    and [`Notify`] coalesces a burst into one wake-up (link events are
//!    chatty: every flag, MTU or master change is an RTM_NEWLINK).
//! 4. When the socket's receive queue overflows the kernel drops events and
//!    reports ENOBUFS once; `run` counts it ([`LinkEvents::overflows`]), logs
//!    it, notifies as well (the re-dump is the caller's job, exactly as after
//!    any event: a pass re-reads the whole namespace) and keeps receiving.
//!    [`SubscribeOptions::receive_buffer`] lets a test shrink the queue to
//!    provoke exactly that.
//!
//! `run` never busy-loops: it sleeps in the reactor until the socket is
//! readable, and after an unexpected receive error it backs off (100 ms
//! doubling to 5 s) before it tries again.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::NetnsError;

/// The `nl_groups` bitmask of a `sockaddr_nl` for RTNLGRP_* groups (group
/// `n` is bit `n - 1`; groups above 32 need NETLINK_ADD_MEMBERSHIP instead).
pub const fn group_mask(groups: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < groups.len() {
        assert!(groups[i] >= 1 && groups[i] <= 32);
        mask |= 1 << (groups[i] - 1);
        i += 1;
    }
    mask
}

/// Link events only (what the benchmark's listener needs).
pub const LINK_EVENTS: u32 = group_mask(&[libc::RTNLGRP_LINK]);

/// Link and IPv4/IPv6 address and route events: what [`LinkEvents`]
/// subscribes to.
pub const POD_NETNS_EVENTS: u32 = group_mask(&[
    libc::RTNLGRP_LINK,
    libc::RTNLGRP_IPV4_IFADDR,
    libc::RTNLGRP_IPV6_IFADDR,
    libc::RTNLGRP_IPV4_ROUTE,
    libc::RTNLGRP_IPV6_ROUTE,
]);

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

/// Receive buffer asked for by default; the kernel caps it at
/// `net.core.rmem_max`.
const RECV_BUFFER: usize = 1 << 20;
/// Largest datagram read at once; longer ones are truncated, which is fine
/// for a trigger.
const DATAGRAM: usize = 64 * 1024;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How [`LinkEvents::subscribe_with`] sets up its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// SO_RCVBUF to ask for (the kernel doubles it, caps it at
    /// `net.core.rmem_max` and raises it to its minimum of a few KiB).
    /// Tests make it tiny to overflow the queue on purpose.
    pub receive_buffer: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            receive_buffer: RECV_BUFFER,
        }
    }
}

/// How many times a [`LinkEvents`] queue overflowed (the kernel dropped
/// events and said so with ENOBUFS), each followed by a wake-up and so by a
/// full re-read. Readable while [`LinkEvents::run`] owns the subscription.
#[derive(Debug, Clone, Default)]
pub struct Overflows(Arc<AtomicU64>);

impl Overflows {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one overflow and returns the new total.
    fn record(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A subscription to link, address and route events of one network namespace.
pub struct LinkEvents {
    socket: AsyncFd<Socket>,
    overflows: Overflows,
}

impl std::fmt::Debug for LinkEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkEvents").finish_non_exhaustive()
    }
}

impl LinkEvents {
    /// Subscribes in the calling thread's network namespace; events that
    /// happen after this returns are delivered by [`LinkEvents::run`]. Must
    /// be called inside a tokio runtime with IO enabled.
    pub async fn subscribe() -> Result<LinkEvents, NetnsError> {
        Self::subscribe_with(SubscribeOptions::default()).await
    }

    /// [`LinkEvents::subscribe`] with a chosen receive buffer.
    pub async fn subscribe_with(options: SubscribeOptions) -> Result<LinkEvents, NetnsError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetnsError::Socket)?;
        socket
            .bind(&SocketAddr::new(0, POD_NETNS_EVENTS))
            .map_err(NetnsError::Socket)?;
        // A bigger queue makes ENOBUFS rarer; failing to get it is harmless.
        if let Err(e) = socket.set_rx_buf_sz(options.receive_buffer) {
            tracing::debug!(error = %e, "cannot set the netlink receive buffer");
        }
        socket.set_non_blocking(true).map_err(NetnsError::Socket)?;
        // SAFETY: `Socket` owns its fd and closes it only in its own Drop;
        // nothing replaces or closes the fd while the AsyncFd owns the socket.
        let socket = unsafe { AsyncFd::register(socket) }
            .map_err(|e| NetnsError::Socket(e.into_parts().1))?;
        Ok(LinkEvents {
            socket,
            overflows: Overflows::default(),
        })
    }

    /// The overflow counter of this subscription (a handle that stays valid
    /// after [`LinkEvents::run`] took it).
    pub fn overflows(&self) -> Overflows {
        self.overflows.clone()
    }

    /// Notifies `notify` for every received batch of events and on every
    /// overrun, forever (stop it by dropping or aborting its task).
    pub async fn run(self, notify: Arc<Notify>) {
        let mut buf = vec![0u8; DATAGRAM];
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut guard = match self.socket.readable().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!(error = %e, "netlink event socket not pollable");
                    notify.notify_one();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let result = guard.try_io(|socket| {
                recv(socket.get_ref().as_raw_fd(), &mut buf, MsgFlags::empty())
                    .map_err(std::io::Error::from)
            });
            match result {
                // Spurious readiness: try_io cleared it, wait again.
                Err(_would_block) => {}
                Ok(Ok(len)) => {
                    backoff = BACKOFF_MIN;
                    if is_trigger(&buf[..len.min(buf.len())]) {
                        notify.notify_one();
                    }
                }
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::ENOBUFS as i32) => {
                    let total = self.overflows.record();
                    // A link storm can overflow again and again: info for
                    // the 1st, 2nd, 4th, 8th ... overflow, debug otherwise.
                    if total.is_power_of_two() {
                        tracing::info!(
                            overflows = total,
                            "netlink event queue overflowed, events were lost: re-reading the namespace"
                        );
                    } else {
                        tracing::debug!(overflows = total, "netlink event queue overflowed");
                    }
                    notify.notify_one();
                }
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EINTR as i32) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot receive netlink events");
                    notify.notify_one();
                    drop(guard);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Whether a datagram holds at least one event (anything but netlink
/// control messages: errors, no-ops, done, overrun). A datagram too short
/// to hold a header still counts, to err on the side of a reconcile.
fn is_trigger(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    if rest.len() < 16 {
        return true;
    }
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if !matches!(kind, NLMSG_NOOP | NLMSG_ERROR | NLMSG_DONE | NLMSG_OVERRUN) {
            return true;
        }
        // NLMSG_ALIGN(len); a zero or oversized length ends the walk.
        let step = (len + 3) & !3;
        if len < 16 || step > rest.len() {
            break;
        }
        rest = &rest[step..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, kind: u16) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&len.to_ne_bytes());
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(&[0; 10]);
        h
    }

    #[test]
    fn group_masks_match_linux_rtnetlink_h() {
        // RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
        assert_eq!(LINK_EVENTS, 0x1);
        assert_eq!(POD_NETNS_EVENTS, 0x1 | 0x10 | 0x40 | 0x100 | 0x400);
    }

    #[test]
    fn events_trigger_control_messages_do_not() {
        const RTM_NEWLINK: u16 = 16;
        assert!(is_trigger(&header(16, RTM_NEWLINK)));
        assert!(!is_trigger(&header(16, NLMSG_ERROR)));
        let mut two = header(16, NLMSG_NOOP);
        two.extend(header(16, RTM_NEWLINK));
        assert!(is_trigger(&two));
        assert!(is_trigger(&[1, 2, 3]));
    }
}
