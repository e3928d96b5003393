//! The DHCP server's only socket: `AF_PACKET` bound to the VM's tap, with
//! no IP address anywhere.
//!
//! A frame the VM sends is a frame the tap *receives* (QEMU writes it), so it
//! arrives here with a packet type other than `PACKET_OUTGOING`; what the
//! bridge forwards to the VM leaves through the tap and shows as
//! `PACKET_OUTGOING`, which is skipped. A frame sent on this socket leaves
//! the tap, i.e. goes straight to the VM, and never crosses the bridge: the
//! pod link and the node side never see the server. A classic BPF filter
//! (IPv4, UDP, not a fragment, destination port 67) keeps every other frame
//! of the guest in the kernel. Opening it needs `CAP_NET_RAW`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use crate::model::{IfName, Mac};

/// ETH_P_ALL in network byte order, for `socket()` and `bind()`: the tap is
/// a bridge port, and the bridge's rx handler consumes every frame the tap
/// receives before protocol-specific packet sockets (ETH_P_IP) would see
/// it; only ETH_P_ALL sockets see it first. The BPF filter then keeps
/// DHCP only.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();
/// ETH_P_IP in network byte order: the protocol of the frames sent.
const ETH_P_IP_BE: u16 = (libc::ETH_P_IP as u16).to_be();
const MAX_FRAME: usize = 65_536;

/// `udp dst port 67` over IPv4 without fragments (what `tcpdump -dd` gives).
const FILTER: [libc::sock_filter; 11] = [
    bpf(0x28, 0, 0, 12),     // ldh [12]            ethertype
    bpf(0x15, 0, 8, 0x0800), // jeq IPv4 else drop
    bpf(0x30, 0, 0, 23),     // ldb [23]            protocol
    bpf(0x15, 0, 6, 17),     // jeq UDP else drop
    bpf(0x28, 0, 0, 20),     // ldh [20]            flags + fragment offset
    bpf(0x45, 4, 0, 0x1fff), // jset offset -> drop
    bpf(0xb1, 0, 0, 14),     // ldxb 4*([14]&0xf)   IP header length
    bpf(0x48, 0, 0, 16),     // ldh [x+16]          UDP destination port
    bpf(0x15, 0, 1, 67),     // jeq 67 else drop
    bpf(0x06, 0, 0, 0xffff), // ret accept
    bpf(0x06, 0, 0, 0),      // ret drop
];

const fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// A packet socket on one tap.
pub struct TapSocket {
    fd: AsyncFd<OwnedFd>,
    ifindex: i32,
}

impl TapSocket {
    /// Opens the socket on `tap` (in the calling thread's network
    /// namespace). EPERM means no `CAP_NET_RAW`; ENODEV a missing tap.
    pub fn open(tap: &IfName) -> io::Result<Self> {
        let ifindex = nix::net::if_::if_nametoindex(tap.as_str()).map_err(io::Error::from)? as i32;
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL_BE),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let program = libc::sock_fprog {
            len: FILTER.len() as u16,
            filter: FILTER.as_ptr().cast_mut(),
        };
        // SAFETY: `program` points at FILTER, which outlives the call (the
        // kernel copies the program); the length is the option's size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&program as *const libc::sock_fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let address = link_address(ifindex, ETH_P_ALL_BE, None);
        // SAFETY: `address` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd's descriptor stays open and the same until the
        // AsyncFd that owns it is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd, ifindex })
    }

    /// The next frame the VM sent (frames the bridge forwards to the VM are
    /// skipped). A frame that arrived before the filter was attached may be
    /// anything: the caller parses defensively.
    pub async fn receive(&self) -> io::Result<Vec<u8>> {
        let mut buffer = vec![0u8; MAX_FRAME];
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: zeroed sockaddr_ll is a valid value to be filled in.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: the buffer and address are valid for the lengths given.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok((n as usize, from.sll_pkttype))
            });
            match result {
                Ok(Ok((_, pkttype))) if pkttype == libc::PACKET_OUTGOING => continue,
                Ok(Ok((n, _))) => return Ok(buffer[..n].to_vec()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one whole Ethernet frame out of the tap, to the VM.
    pub async fn send(&self, frame: &[u8], destination: Mac) -> io::Result<()> {
        let address = link_address(self.ifindex, ETH_P_IP_BE, Some(destination));
        loop {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: frame and address are valid for the lengths given.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&address as *const libc::sockaddr_ll).cast(),
                        size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
            match result {
                Ok(done) => return done,
                Err(_would_block) => continue,
            }
        }
    }
}

fn link_address(ifindex: i32, protocol: u16, destination: Option<Mac>) -> libc::sockaddr_ll {
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex;
    if let Some(mac) = destination {
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&mac.octets());
    }
    address
}
