//! A blocking rtnetlink link-event listener stamped with CLOCK_MONOTONIC,
//! shared by the benchmark harness (which stamps when a pod interface
//! appears) and `examples/floor.rs` (which reacts to it).
//!
//! It is deliberately minimal: one NETLINK_ROUTE socket bound to
//! RTNLGRP_LINK in the network namespace of the thread that opens it, a
//! `poll` with a timeout, and a parse of RTM_NEWLINK/RTM_DELLINK carrying
//! name, MAC and MTU (so a reacting program needs no extra round trip).
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;

/// CLOCK_MONOTONIC in nanoseconds: the clock nicplug's status stamps
/// (`monotonicNs`) use.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One link event.
#[derive(Debug, Clone)]
pub struct LinkEvent {
    /// RTM_NEWLINK (true) or RTM_DELLINK (false).
    pub new: bool,
    pub index: i32,
    pub name: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// When the datagram was received (CLOCK_MONOTONIC ns).
    pub at_ns: u64,
}

impl LinkEvent {
    pub fn mac_string(&self) -> Option<String> {
        self.mac.map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
    }
}

/// A subscription to link events of the opening thread's network namespace.
pub struct LinkWatch {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl LinkWatch {
    /// Subscribes; every link event after this returns is delivered.
    pub fn open() -> io::Result<LinkWatch> {
        // SAFETY: plain socket(2) call; the fd is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = nicplug::netns::watch::LINK_EVENTS;
        // SAFETY: bind(2) with a properly sized sockaddr_nl.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = 1 << 20;
        // SAFETY: setsockopt(2) with an int option value; failure is harmless.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        Ok(LinkWatch {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// The events of the next datagram, or an empty list after `timeout`.
    pub fn next(&mut self, timeout: Duration) -> io::Result<Vec<LinkEvent>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: recv(2) into our buffer, bounded by its length.
        let len = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
                0,
            )
        };
        let at_ns = mono_ns();
        if len < 0 {
            let e = io::Error::last_os_error();
            // ENOBUFS: events were dropped; the caller re-checks what it waits for.
            return if e.raw_os_error() == Some(libc::ENOBUFS) {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        Ok(parse(&self.buf[..len as usize], at_ns))
    }

    /// Blocks until a RTM_NEWLINK for `name` arrives (or `timeout`).
    pub fn wait_new(&mut self, name: &str, timeout: Duration) -> io::Result<Option<LinkEvent>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            for e in self.next(left)? {
                if e.new && e.name.as_deref() == Some(name) {
                    return Ok(Some(e));
                }
            }
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses the link messages of one netlink datagram.
pub fn parse(buf: &[u8], at_ns: u64) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, off) as usize;
        let kind = u16_at(buf, off + 4);
        if len < NLMSG_HDR || off + len > buf.len() {
            break;
        }
        if (kind == RTM_NEWLINK || kind == RTM_DELLINK) && len >= NLMSG_HDR + IFINFOMSG {
            let body = &buf[off + NLMSG_HDR..off + len];
            let index = u32_at(body, 4) as i32;
            let mut event = LinkEvent {
                new: kind == RTM_NEWLINK,
                index,
                name: None,
                mac: None,
                mtu: None,
                at_ns,
            };
            let mut a = IFINFOMSG;
            while a + 4 <= body.len() {
                let alen = u16_at(body, a) as usize;
                let atype = u16_at(body, a + 2) & 0x3fff;
                if alen < 4 || a + alen > body.len() {
                    break;
                }
                let data = &body[a + 4..a + alen];
                match atype {
                    IFLA_IFNAME => {
                        let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
                        event.name = Some(String::from_utf8_lossy(&data[..end]).into_owned());
                    }
                    IFLA_ADDRESS if data.len() == 6 => {
                        let mut mac = [0u8; 6];
                        mac.copy_from_slice(data);
                        event.mac = Some(mac);
                    }
                    IFLA_MTU if data.len() >= 4 => event.mtu = Some(u32_at(data, 0)),
                    _ => {}
                }
                a += align4(alen);
            }
            out.push(event);
        }
        off += align4(len);
    }
    out
}
