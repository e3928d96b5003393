//! The DHCP server's only socket: `AF_PACKET` bound to the VM's tap, with
//! no IP address anywhere.
//!
//! A frame the VM sends is a frame the tap *receives* (QEMU writes it), so it
//! arrives here with a packet type other than `PACKET_OUTGOING`; what the
//! bridge forwards to the VM leaves through the tap and shows as
//! `PACKET_OUTGOING`, which is skipped. A frame sent on this socket leaves
//! the tap, i.e. goes straight to the VM, and never crosses the bridge: the
//! pod link and the node side never see the server. A classic BPF filter
//! (DHCPv4, DHCPv6, router solicitations) keeps every other frame of the
//! guest in the kernel. Opening it needs `CAP_NET_RAW`.

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
const MAX_FRAME: usize = 65_536;
/// The socket's receive queue (the kernel doubles it for its bookkeeping):
/// room for the few frames a guest sends at once (DISCOVER, router
/// solicitation, Solicit), not for a backlog a flood would leave to be
/// answered, late, for seconds after it (see `task::FRAME_BURST`).
const RECEIVE_BUFFER: libc::c_int = 16 * 1024;

/// What the server reads, as a classic BPF program: IPv4 UDP to port 67
/// without fragments, IPv6 UDP to port 547, and ICMPv6 router
/// solicitations (type 133); IPv6 extension headers are not followed.
const FILTER: [libc::sock_filter; 19] = [
    bpf(0x28, 0, 0, 12),      // 0: ldh [12]            ethertype
    bpf(0x15, 0, 7, 0x0800),  // 1: jeq IPv4 else 9
    bpf(0x30, 0, 0, 23),      // 2: ldb [23]            protocol
    bpf(0x15, 0, 14, 17),     // 3: jeq UDP else drop
    bpf(0x28, 0, 0, 20),      // 4: ldh [20]            flags + fragment offset
    bpf(0x45, 12, 0, 0x1fff), // 5: jset offset -> drop
    bpf(0xb1, 0, 0, 14),      // 6: ldxb 4*([14]&0xf)   IP header length
    bpf(0x48, 0, 0, 16),      // 7: ldh [x+16]          UDP destination port
    bpf(0x15, 8, 9, 67),      // 8: jeq 67 -> accept else drop
    bpf(0x15, 0, 8, 0x86dd),  // 9: jeq IPv6 else drop
    bpf(0x30, 0, 0, 20),      // 10: ldb [20]           next header
    bpf(0x15, 0, 2, 17),      // 11: jeq UDP else 14
    bpf(0x28, 0, 0, 56),      // 12: ldh [56]           UDP destination port
    bpf(0x15, 3, 4, 547),     // 13: jeq 547 -> accept else drop
    bpf(0x15, 0, 3, 58),      // 14: jeq ICMPv6 else drop
    bpf(0x30, 0, 0, 54),      // 15: ldb [54]           ICMPv6 type
    bpf(0x15, 0, 1, 133),     // 16: jeq router solicitation else drop
    bpf(0x06, 0, 0, 0xffff),  // 17: ret accept
    bpf(0x06, 0, 0, 0),       // 18: ret drop
];

/// [`FILTER`] for a server without IPv6 (the network has no IPv6 from
/// IPAM): DHCPv4 only, so the router solicitations and Solicits a guest's
/// kernel sends on every new NIC stay in the kernel too.
const FILTER_V4: [libc::sock_filter; 11] = [
    bpf(0x28, 0, 0, 12),     // 0: ldh [12]            ethertype
    bpf(0x15, 0, 8, 0x0800), // 1: jeq IPv4 else drop
    bpf(0x30, 0, 0, 23),     // 2: ldb [23]            protocol
    bpf(0x15, 0, 6, 17),     // 3: jeq UDP else drop
    bpf(0x28, 0, 0, 20),     // 4: ldh [20]            flags + fragment offset
    bpf(0x45, 4, 0, 0x1fff), // 5: jset offset -> drop
    bpf(0xb1, 0, 0, 14),     // 6: ldxb 4*([14]&0xf)   IP header length
    bpf(0x48, 0, 0, 16),     // 7: ldh [x+16]          UDP destination port
    bpf(0x15, 0, 1, 67),     // 8: jeq 67 -> accept else drop
    bpf(0x06, 0, 0, 0xffff), // 9: ret accept
    bpf(0x06, 0, 0, 0),      // 10: ret drop
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
    /// namespace), taking IPv6 frames only when `ipv6` (the server has an
    /// IPv6 lease to give). EPERM means no `CAP_NET_RAW`; ENODEV a missing
    /// tap.
    pub fn open(tap: &IfName, ipv6: bool) -> io::Result<Self> {
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
        let filter: &'static [libc::sock_filter] = if ipv6 { &FILTER } else { &FILTER_V4 };
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // `program` points at a static filter, which outlives the call (the
        // kernel copies the program).
        set_socket_option(&fd, libc::SO_ATTACH_FILTER, &program)?;
        set_socket_option(&fd, libc::SO_RCVBUF, &RECEIVE_BUFFER)?;
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

    /// Sends one whole Ethernet frame out of the tap, to the VM. The
    /// address the kernel wants is the frame's own destination and
    /// ethertype (SOCK_RAW sends the frame as it is).
    pub async fn send(&self, frame: &[u8]) -> io::Result<()> {
        let header = frame.get(..14).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame shorter than its Ethernet header",
            )
        })?;
        let destination = Mac::from_bytes(header[..6].try_into().expect("six bytes"));
        let protocol = u16::from_be_bytes([header[12], header[13]]).to_be();
        let address = link_address(self.ifindex, protocol, Some(destination));
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

/// `setsockopt(fd, SOL_SOCKET, option, value)`; `value` must be what the
/// option takes, with any pointer in it valid for the call.
fn set_socket_option<T>(fd: &OwnedFd, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a valid `T` for the length passed, and the kernel
    // copies it before the call returns.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the classic BPF program on `packet` with the instructions the
    /// filter uses (absolute and indexed loads, jeq, jset, msh, ret).
    fn run(program: &[libc::sock_filter], packet: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let byte = |at: usize| u32::from(packet.get(at).copied().unwrap_or(0));
        let half = |at: usize| byte(at) << 8 | byte(at + 1);
        loop {
            let i = program[pc];
            let k = i.k as usize;
            pc += 1;
            match i.code {
                0x28 => a = half(k),
                0x30 => a = byte(k),
                0x48 => a = half(x as usize + k),
                0xb1 => x = 4 * (byte(k) & 0xf),
                0x15 | 0x45 => {
                    let hit = if i.code == 0x15 {
                        a == i.k
                    } else {
                        a & i.k != 0
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                0x06 => return i.k,
                code => panic!("instruction {code:#x} not emulated"),
            }
        }
    }

    fn frame(ethertype: u16, at: &[(usize, u8)]) -> Vec<u8> {
        let mut f = vec![0u8; 90];
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        for (i, b) in at {
            f[*i] = *b;
        }
        f
    }

    #[test]
    fn the_filter_takes_dhcp_of_both_families_and_solicitations_only() {
        // IPv4, header length 5, UDP, to port 67 (or 68).
        let dhcp4 = frame(0x0800, &[(14, 0x45), (23, 17), (36, 0), (37, 67)]);
        assert_ne!(run(&FILTER, &dhcp4), 0);
        let mut to68 = dhcp4.clone();
        to68[37] = 68;
        assert_eq!(run(&FILTER, &to68), 0);
        let mut fragment = dhcp4;
        fragment[21] = 1;
        assert_eq!(run(&FILTER, &fragment), 0);
        // IPv6: UDP to 547, ICMPv6 133 pass; 546, 134, TCP do not.
        let dhcp6 = frame(0x86dd, &[(20, 17), (56, 0x02), (57, 0x23)]);
        assert_ne!(run(&FILTER, &dhcp6), 0);
        let mut to546 = dhcp6;
        to546[57] = 0x22;
        assert_eq!(run(&FILTER, &to546), 0);
        assert_ne!(run(&FILTER, &frame(0x86dd, &[(20, 58), (54, 133)])), 0);
        assert_eq!(run(&FILTER, &frame(0x86dd, &[(20, 58), (54, 134)])), 0);
        assert_eq!(run(&FILTER, &frame(0x86dd, &[(20, 6)])), 0);
        assert_eq!(run(&FILTER, &frame(0x0806, &[])), 0);
    }

    #[test]
    fn the_ipv4_filter_takes_dhcpv4_only() {
        let dhcp4 = frame(0x0800, &[(14, 0x45), (23, 17), (36, 0), (37, 67)]);
        assert_ne!(run(&FILTER_V4, &dhcp4), 0);
        // With IP options (header length 6) the port moves, and is found.
        let options = frame(0x0800, &[(14, 0x46), (23, 17), (40, 0), (41, 67)]);
        assert_ne!(run(&FILTER_V4, &options), 0);
        let mut to68 = dhcp4.clone();
        to68[37] = 68;
        assert_eq!(run(&FILTER_V4, &to68), 0);
        let mut fragment = dhcp4.clone();
        fragment[21] = 1;
        assert_eq!(run(&FILTER_V4, &fragment), 0);
        let mut tcp = dhcp4;
        tcp[23] = 6;
        assert_eq!(run(&FILTER_V4, &tcp), 0);
        for ipv6 in [
            frame(0x86dd, &[(20, 17), (56, 0x02), (57, 0x23)]),
            frame(0x86dd, &[(20, 58), (54, 133)]),
        ] {
            assert_eq!(run(&FILTER_V4, &ipv6), 0);
        }
        assert_eq!(run(&FILTER_V4, &frame(0x0806, &[])), 0);
    }
}
