//! When the user's network works: an ICMPv6 echo train from the node
//! namespace to the guest NIC's link-local address, one request every
//! `every`, each stamped (CLOCK_MONOTONIC) when it is sent. The first request
//! answered is the first packet from the node that reached the guest.
//!
//! Only the guest can answer: the spec gives the NIC a MAC of its own, so its
//! EUI-64 link-local address is on no link of the pod namespace, and the node
//! has a static neighbour entry for it (no neighbour discovery delay, no
//! 1 s solicitation retries in the measurement).

use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::linkwatch::mono_ns;

const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;

/// The EUI-64 link-local address a Linux guest gives a NIC with `mac`.
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let b = [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ];
    Ipv6Addr::from(b)
}

pub struct EchoTrain {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<u64>>>,
}

impl EchoTrain {
    /// Starts the train in network namespace `netns` (a /run/netns path),
    /// out of link `via`, to `dest`.
    pub fn start(netns: &str, via: &str, dest: Ipv6Addr, every: Duration) -> EchoTrain {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (netns, via) = (netns.to_string(), via.to_string());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // This thread alone moves into the node netns; the socket stays there.
            let f = std::fs::File::open(&netns).expect("node netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let socket = icmp6_socket();
            let scope = nix::net::if_::if_nametoindex(via.as_str()).expect("node link");
            ready_tx.send(()).unwrap();
            run(&socket, dest, scope, every, &stop2)
        });
        ready.recv().expect("echo train started");
        EchoTrain {
            stop,
            thread: Some(thread),
        }
    }

    /// Waits up to `timeout` for an answer; the send stamp of the first
    /// request answered.
    pub fn first_answered(mut self, timeout: Duration) -> Option<u64> {
        let t0 = Instant::now();
        let thread = self.thread.take().unwrap();
        while !thread.is_finished() && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::Relaxed);
        thread.join().expect("echo train thread")
    }
}

impl Drop for EchoTrain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn icmp6_socket() -> OwnedFd {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) };
    assert!(
        fd >= 0,
        "raw ICMPv6 socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sends a request every `every` until one is answered or `stop`; the send
/// stamp of the first one answered.
fn run(
    socket: &OwnedFd,
    dest: Ipv6Addr,
    scope: u32,
    every: Duration,
    stop: &AtomicBool,
) -> Option<u64> {
    let id = (std::process::id() & 0xffff) as u16;
    // SAFETY: sockaddr_in6 is plain data; zero is a valid value.
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    to.sin6_addr.s6_addr = dest.octets();
    to.sin6_scope_id = scope;
    let mut sent: Vec<u64> = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            let seq = sent.len() as u16;
            // The kernel fills in the ICMPv6 checksum of a raw socket.
            let mut echo = [0u8; 16];
            echo[0] = ECHO_REQUEST;
            echo[4..6].copy_from_slice(&id.to_be_bytes());
            echo[6..8].copy_from_slice(&seq.to_be_bytes());
            sent.push(mono_ns());
            // SAFETY: echo and to are valid for the lengths given.
            unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    echo.as_ptr().cast(),
                    echo.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            };
            next += every;
        }
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = next.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().max(1) as i32) };
        if n <= 0 {
            continue;
        }
        let mut buf = [0u8; 1500];
        // SAFETY: buf is valid for its length.
        let len = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if len < 8 || buf[0] != ECHO_REPLY || buf[4..6] != id.to_be_bytes() {
            continue;
        }
        let seq = u16::from_be_bytes([buf[6], buf[7]]) as usize;
        if let Some(at) = sent.get(seq) {
            return Some(*at);
        }
    }
    None
}
