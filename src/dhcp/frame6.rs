//! Ethernet/IPv6 framing for the IPv6 half: DHCPv6 over UDP (client port
//! 546, server port 547) and the ICMPv6 router solicitation and
//! advertisement. Pure functions, unit-tested and fuzzed like the IPv4
//! ones. Extension headers are not followed: neither a router solicitation
//! nor a DHCPv6 client message carries one.

use std::net::Ipv6Addr;

use dhcproto::v6::Message;
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::frame::{ETH_HEADER, FrameError, PROTO_UDP, UDP_HEADER, internet_checksum};
use crate::model::Mac;

pub const SERVER_PORT: u16 = 547;
pub const CLIENT_PORT: u16 = 546;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPV6_HEADER: usize = 40;
pub(super) const PROTO_ICMPV6: u8 = 58;
pub const ROUTER_SOLICITATION: u8 = 133;
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// Neighbor discovery messages must arrive with this hop limit, proof that
/// no router forwarded them (RFC 4861 6.1).
const ND_HOP_LIMIT: u8 = 255;
/// ff02::1, all nodes, and its Ethernet group (RFC 2464 7).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
pub const ALL_NODES_MAC: Mac = Mac::from_bytes([0x33, 0x33, 0, 0, 0, 1]);

/// What the guest sent over IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request6 {
    Dhcp(Message),
    RouterSolicitation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received6 {
    pub source: Mac,
    /// The IPv6 source: the client's link-local address, or `::` for a
    /// solicitation sent before it has one.
    pub from: Ipv6Addr,
    pub request: Request6,
}

/// Whether `frame` is IPv6 (the IPv4 parser takes the rest).
pub fn is_ipv6(frame: &[u8]) -> bool {
    frame
        .get(12..14)
        .is_some_and(|t| u16::from_be_bytes([t[0], t[1]]) == ETHERTYPE_IPV6)
}

/// Parses one Ethernet frame: IPv6 with UDP to port 547 and a DHCPv6
/// message, or a valid router solicitation (hop limit 255, code 0).
pub fn parse6(frame: &[u8]) -> Result<Received6, FrameError> {
    if !is_ipv6(frame) {
        return Err(FrameError::NotDhcp);
    }
    let source = Mac::from_bytes(frame[6..12].try_into().expect("six bytes"));
    let ip = &frame[ETH_HEADER..];
    let header = ip.get(..IPV6_HEADER).ok_or(FrameError::Truncated)?;
    if header[0] >> 4 != 6 {
        return Err(FrameError::NotDhcp);
    }
    let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let next = header[6];
    let hop_limit = header[7];
    let from = Ipv6Addr::from(<[u8; 16]>::try_from(&header[8..24]).expect("16 bytes"));
    let payload = ip
        .get(IPV6_HEADER..IPV6_HEADER + payload_len)
        .ok_or(FrameError::Truncated)?;
    let request = match next {
        PROTO_UDP => {
            let udp = payload.get(..UDP_HEADER).ok_or(FrameError::Truncated)?;
            if u16::from_be_bytes([udp[2], udp[3]]) != SERVER_PORT {
                return Err(FrameError::NotDhcp);
            }
            let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
            if udp_len < UDP_HEADER {
                return Err(FrameError::Truncated);
            }
            let body = payload
                .get(UDP_HEADER..udp_len)
                .ok_or(FrameError::Truncated)?;
            let body = client_options_only(body)?;
            let message = Message::decode(&mut Decoder::new(&body))
                .map_err(|e| FrameError::Decode(e.to_string()))?;
            Request6::Dhcp(message)
        }
        PROTO_ICMPV6 => {
            let icmp = payload.get(..8).ok_or(FrameError::Truncated)?;
            if icmp[0] != ROUTER_SOLICITATION || icmp[1] != 0 || hop_limit != ND_HOP_LIMIT {
                return Err(FrameError::NotDhcp);
            }
            Request6::RouterSolicitation
        }
        _ => return Err(FrameError::NotDhcp),
    };
    Ok(Received6 {
        source,
        from,
        request,
    })
}

const OPTION_CLIENT_ID: u16 = 1;
const OPTION_SERVER_ID: u16 = 2;
const OPTION_IA_NA: u16 = 3;
const OPTION_IA_ADDR: u16 = 5;
const OPTION_RAPID_COMMIT: u16 = 14;
/// IA_NA: IAID, T1, T2 before its options (RFC 8415 21.4).
const IA_NA_FIXED: usize = 12;
/// IA Address: the address and two lifetimes before its options (21.6).
const IA_ADDR_FIXED: usize = 24;

/// The DHCPv6 message with only the options the server reads, each
/// checked for its length: client and server identifier (at least a
/// 2-byte DUID type), rapid commit (empty), and IA_NA with only its IA
/// Address options, themselves without sub-options. Everything else a
/// guest sends is dropped before the decoder sees it: `dhcproto` 0.15
/// subtracts from option lengths unchecked (a status code shorter than 2
/// bytes, at any depth, panics; the fuzzer found it), and what the server
/// ignores need not be parsed at all.
fn client_options_only(body: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = body.get(..4).ok_or(FrameError::Truncated)?;
    let mut out = header.to_vec();
    for (code, value) in options(&body[4..])? {
        match code {
            OPTION_CLIENT_ID | OPTION_SERVER_ID if value.len() >= 2 => put(&mut out, code, value),
            OPTION_RAPID_COMMIT if value.is_empty() => put(&mut out, code, value),
            OPTION_IA_NA if value.len() >= IA_NA_FIXED => {
                let mut ia = value[..IA_NA_FIXED].to_vec();
                for (sub, address) in options(&value[IA_NA_FIXED..])? {
                    if sub == OPTION_IA_ADDR && address.len() >= IA_ADDR_FIXED {
                        put(&mut ia, sub, &address[..IA_ADDR_FIXED]);
                    }
                }
                put(&mut out, code, &ia);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The (code, value) options of a DHCPv6 option area.
fn options(mut area: &[u8]) -> Result<Vec<(u16, &[u8])>, FrameError> {
    let mut out = Vec::new();
    while !area.is_empty() {
        let head = area.get(..4).ok_or(FrameError::Truncated)?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = area.get(4..4 + len).ok_or(FrameError::Truncated)?;
        out.push((code, value));
        area = &area[4 + len..];
    }
    Ok(out)
}

fn put(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// The frame carrying a DHCPv6 `message` from the server (port 547) to the
/// client (port 546).
pub fn build_dhcp6(
    message: &Message,
    source_mac: Mac,
    source_ip: Ipv6Addr,
    destination_mac: Mac,
    destination_ip: Ipv6Addr,
) -> Vec<u8> {
    let mut body = Vec::new();
    message
        .encode(&mut Encoder::new(&mut body))
        .expect("encoding into a Vec cannot fail");
    let mut udp = Vec::with_capacity(UDP_HEADER + body.len());
    udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
    udp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    udp.extend_from_slice(&((UDP_HEADER + body.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&body);
    ipv6_frame(
        PROTO_UDP,
        64,
        udp,
        6,
        (source_mac, source_ip),
        (destination_mac, destination_ip),
    )
}

/// The frame carrying an ICMPv6 message (`body` from its type on, checksum
/// zero) with the hop limit neighbor discovery requires.
pub fn build_icmp6(
    body: Vec<u8>,
    source_mac: Mac,
    source_ip: Ipv6Addr,
    destination_mac: Mac,
    destination_ip: Ipv6Addr,
) -> Vec<u8> {
    ipv6_frame(
        PROTO_ICMPV6,
        ND_HOP_LIMIT,
        body,
        2,
        (source_mac, source_ip),
        (destination_mac, destination_ip),
    )
}

/// Ethernet + IPv6 header + `upper`, whose checksum (at `checksum_at`) is
/// filled in over the IPv6 pseudo-header (RFC 8200 8.1).
fn ipv6_frame(
    next: u8,
    hop_limit: u8,
    mut upper: Vec<u8>,
    checksum_at: usize,
    (source_mac, source_ip): (Mac, Ipv6Addr),
    (destination_mac, destination_ip): (Mac, Ipv6Addr),
) -> Vec<u8> {
    let len = upper.len() as u32;
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&source_ip.octets());
    pseudo.extend_from_slice(&destination_ip.octets());
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next]);
    let sum = match internet_checksum(&[&pseudo, &upper]) {
        // UDP over IPv6 must carry a checksum: 0 is sent as all ones.
        0 if next == PROTO_UDP => 0xffff,
        sum => sum,
    };
    upper[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(ETH_HEADER + IPV6_HEADER + upper.len());
    frame.extend_from_slice(&destination_mac.octets());
    frame.extend_from_slice(&source_mac.octets());
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no class, no flow
    frame.extend_from_slice(&(len as u16).to_be_bytes());
    frame.extend_from_slice(&[next, hop_limit]);
    frame.extend_from_slice(&source_ip.octets());
    frame.extend_from_slice(&destination_ip.octets());
    frame.extend_from_slice(&upper);
    frame
}

#[cfg(test)]
mod tests {
    use dhcproto::v6::{DhcpOption, MessageType};

    use super::*;

    const CLIENT_MAC: Mac = Mac::from_bytes([2, 0, 0, 0, 0, 9]);
    const CLIENT_IP: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 9);
    const DHCP_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);

    fn solicit() -> Message {
        let mut m = Message::new_with_id(MessageType::Solicit, [1, 2, 3]);
        m.opts_mut()
            .insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 9]));
        m
    }

    /// A client's frame: what `build_dhcp6` makes, ports swapped (the
    /// checksum is then wrong, which the parser does not check).
    fn client_frame(m: &Message) -> Vec<u8> {
        let mut frame = build_dhcp6(
            m,
            CLIENT_MAC,
            CLIENT_IP,
            Mac::from_bytes([0x33, 0x33, 0, 1, 0, 2]),
            DHCP_SERVERS,
        );
        frame[54..56].copy_from_slice(&CLIENT_PORT.to_be_bytes());
        frame[56..58].copy_from_slice(&SERVER_PORT.to_be_bytes());
        frame
    }

    fn router_solicitation(hop_limit: u8) -> Vec<u8> {
        let mut frame = build_icmp6(
            vec![ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0],
            CLIENT_MAC,
            CLIENT_IP,
            Mac::from_bytes([0x33, 0x33, 0, 0, 0, 2]),
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
        );
        frame[21] = hop_limit;
        frame
    }

    /// The sum over pseudo-header and upper layer of a correct packet is 0.
    fn checksum_ok(frame: &[u8]) -> bool {
        let ip = &frame[ETH_HEADER..];
        let upper = &ip[IPV6_HEADER..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[8..40]);
        pseudo.extend_from_slice(&(upper.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
        internet_checksum(&[&pseudo, upper]) == 0
    }

    #[test]
    fn dhcpv6_and_router_solicitations_parse() {
        let got = parse6(&client_frame(&solicit())).unwrap();
        assert_eq!(got.source, CLIENT_MAC);
        assert_eq!(got.from, CLIENT_IP);
        assert_eq!(got.request, Request6::Dhcp(solicit()));
        let got = parse6(&router_solicitation(255)).unwrap();
        assert_eq!(got.request, Request6::RouterSolicitation);
        // A solicitation a router forwarded is no neighbor discovery.
        assert_eq!(parse6(&router_solicitation(64)), Err(FrameError::NotDhcp));
    }

    /// The fuzzer's find: a status code shorter than 2 bytes inside an IA
    /// Address made `dhcproto` subtract with overflow. Options the server
    /// does not read (and sub-options of an IA Address) never reach the
    /// decoder; the request itself still parses.
    #[test]
    fn options_the_server_does_not_read_never_reach_the_decoder() {
        let mut body = vec![3, 1, 2, 3]; // Request, xid
        put(&mut body, OPTION_CLIENT_ID, &[0, 3, 0, 1, 2, 0, 0, 0, 0, 9]);
        put(&mut body, 13, &[]); // status code, length 0
        put(&mut body, 16, &[1]); // vendor class, shorter than its number
        let mut address = CLIENT_IP.octets().to_vec();
        address.extend_from_slice(&[0; 8]);
        put(&mut address, 13, &[0]); // status code inside the address
        let mut ia = vec![0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0];
        put(&mut ia, OPTION_IA_ADDR, &address);
        put(&mut body, OPTION_IA_NA, &ia);
        let mut udp = Vec::new();
        udp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
        udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
        udp.extend_from_slice(&((UDP_HEADER + body.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&body);
        let frame = ipv6_frame(
            PROTO_UDP,
            64,
            udp,
            6,
            (CLIENT_MAC, CLIENT_IP),
            (Mac::from_bytes([0x33, 0x33, 0, 1, 0, 2]), DHCP_SERVERS),
        );
        let Request6::Dhcp(message) = parse6(&frame).unwrap().request else {
            panic!("not DHCPv6");
        };
        assert_eq!(message.msg_type(), MessageType::Request);
        let Some(DhcpOption::IANA(ia)) = message.opts().get(dhcproto::v6::OptionCode::IANA) else {
            panic!("no IA_NA: {message:?}");
        };
        assert_eq!(ia.id, 7);
        assert!(matches!(
            ia.opts.iter().next(),
            Some(DhcpOption::IAAddr(a)) if a.addr == CLIENT_IP && a.opts.iter().next().is_none()
        ));
        // An option running past the end is a truncated frame.
        let mut cut = frame.clone();
        cut.truncate(cut.len() - 3);
        let len = (cut.len() - ETH_HEADER - IPV6_HEADER) as u16;
        cut[18..20].copy_from_slice(&len.to_be_bytes());
        cut[58..60].copy_from_slice(&len.to_be_bytes());
        assert_eq!(parse6(&cut), Err(FrameError::Truncated));
    }

    #[test]
    fn built_frames_carry_valid_checksums() {
        let reply = build_dhcp6(&solicit(), CLIENT_MAC, CLIENT_IP, CLIENT_MAC, CLIENT_IP);
        assert!(checksum_ok(&reply));
        assert_eq!(u16::from_be_bytes([reply[56], reply[57]]), CLIENT_PORT);
        // To the client's port: no request.
        assert_eq!(parse6(&reply), Err(FrameError::NotDhcp));
        assert!(checksum_ok(&router_solicitation(255)));
    }

    #[test]
    fn what_is_no_request_is_refused_without_panic() {
        let good = client_frame(&solicit());
        for cut in [0, 13, 14, 53, 61, good.len() - 1] {
            assert!(parse6(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut tcp = good.clone();
        tcp[20] = 6;
        assert_eq!(parse6(&tcp), Err(FrameError::NotDhcp));
        let mut neighbor = router_solicitation(255);
        neighbor[54] = 135;
        assert_eq!(parse6(&neighbor), Err(FrameError::NotDhcp));
        let mut v4 = good;
        v4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(parse6(&v4), Err(FrameError::NotDhcp));
    }
}
