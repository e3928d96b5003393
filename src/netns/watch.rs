//! Link and address events of the pod network namespace, as reconcile
//! triggers.
//!
//! Protocol, step by step:
//! 1. [`LinkEvents::subscribe`] opens a NETLINK_ROUTE socket in the calling
//!    thread's network namespace and binds it to RTNLGRP_LINK,
//!    RTNLGRP_IPV4_IFADDR and RTNLGRP_IPV6_IFADDR. When it returns, the
//!    kernel already queues every later event for it.
//! 2. The caller then does its initial dump (so nothing that happens between
//!    dump and subscription is lost).
//! 3. [`LinkEvents::run`] wakes the caller's [`Notify`] for every datagram of
//!    events. Events are only triggers: the caller re-reads the namespace,
//!    and [`Notify`] coalesces a burst into one wake-up (link events are
//!    chatty: every flag, MTU or master change is an RTM_NEWLINK).
//! 4. When the socket's receive queue overflows the kernel drops events and
//!    reports ENOBUFS once; `run` then notifies as well (the re-dump is the
//!    caller's job, exactly as after any event) and keeps receiving.
//!
//! `run` never busy-loops: it sleeps in the reactor until the socket is
//! readable, and after an unexpected receive error it backs off (100 ms
//! doubling to 5 s) before it tries again.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::NetnsError;

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

/// Receive buffer asked for; the kernel caps it at `net.core.rmem_max`.
const RECV_BUFFER: usize = 1 << 20;
/// Largest datagram read at once; longer ones are truncated, which is fine
/// for a trigger.
const DATAGRAM: usize = 64 * 1024;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A subscription to link and address events of one network namespace.
pub struct LinkEvents {
    socket: AsyncFd<Socket>,
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
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetnsError::Socket)?;
        let groups = [RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR]
            .iter()
            .fold(0u32, |mask, group| mask | 1 << (group - 1));
        socket
            .bind(&SocketAddr::new(0, groups))
            .map_err(NetnsError::Socket)?;
        // A bigger queue makes ENOBUFS rarer; failing to get it is harmless.
        if let Err(e) = socket.set_rx_buf_sz(RECV_BUFFER) {
            tracing::debug!(error = %e, "cannot enlarge netlink receive buffer");
        }
        socket.set_non_blocking(true).map_err(NetnsError::Socket)?;
        // SAFETY: `Socket` owns its fd and closes it only in its own Drop;
        // nothing replaces or closes the fd while the AsyncFd owns the socket.
        let socket = unsafe { AsyncFd::register(socket) }
            .map_err(|e| NetnsError::Socket(e.into_parts().1))?;
        Ok(LinkEvents { socket })
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
                    tracing::debug!("netlink event queue overrun: events were lost");
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
