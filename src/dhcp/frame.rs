//! Ethernet/IPv4/UDP framing around DHCP payloads, for the packet socket on
//! the tap: pure functions, so parsing what a guest sends is unit-tested
//! and fuzzed without a socket.

use std::net::Ipv4Addr;

use dhcproto::v4::Message;
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::model::Mac;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const ETHERTYPE_IPV4: u16 = 0x0800;
pub(super) const ETH_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
pub(super) const UDP_HEADER: usize = 8;
pub(super) const PROTO_UDP: u8 = 17;

/// Why a received frame is no DHCP request for this server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not IPv4/UDP to port 67, IPv6/UDP to port 547 or a router solicitation")]
    NotDhcp,
    #[error("frame is truncated")]
    Truncated,
    #[error("fragmented IPv4 packet")]
    Fragmented,
    #[error("undecodable DHCP message: {0}")]
    Decode(String),
}

/// A DHCP request as it arrived: the sender's MAC and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub source: Mac,
    pub message: Message,
}

/// Parses one Ethernet frame: IPv4 (no options skipped wrongly, no
/// fragments), UDP to port 67, a DHCP message. Checksums are not verified:
/// a virtio guest hands frames over with the UDP checksum left to offload.
pub fn parse(frame: &[u8]) -> Result<Received, FrameError> {
    let eth = frame.get(..ETH_HEADER).ok_or(FrameError::Truncated)?;
    if u16::from_be_bytes([eth[12], eth[13]]) != ETHERTYPE_IPV4 {
        return Err(FrameError::NotDhcp);
    }
    let source = Mac::from_bytes(eth[6..12].try_into().expect("six bytes"));
    let ip = &frame[ETH_HEADER..];
    let first = *ip.first().ok_or(FrameError::Truncated)?;
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < IPV4_HEADER {
        return Err(FrameError::NotDhcp);
    }
    let header = ip.get(..header_len).ok_or(FrameError::Truncated)?;
    if header[9] != PROTO_UDP {
        return Err(FrameError::NotDhcp);
    }
    let fragment = u16::from_be_bytes([header[6], header[7]]);
    // More-fragments flag or a fragment offset.
    if fragment & 0x3fff != 0 {
        return Err(FrameError::Fragmented);
    }
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let ip = ip.get(..total).ok_or(FrameError::Truncated)?;
    let udp = ip.get(header_len..).ok_or(FrameError::Truncated)?;
    let udp_header = udp.get(..UDP_HEADER).ok_or(FrameError::Truncated)?;
    if u16::from_be_bytes([udp_header[2], udp_header[3]]) != SERVER_PORT {
        return Err(FrameError::NotDhcp);
    }
    let udp_len = usize::from(u16::from_be_bytes([udp_header[4], udp_header[5]]));
    if udp_len < UDP_HEADER {
        return Err(FrameError::Truncated);
    }
    let payload = udp.get(UDP_HEADER..udp_len).ok_or(FrameError::Truncated)?;
    let payload = client_options_only(payload)?;
    let message = Message::decode(&mut Decoder::new(&payload))
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok(Received { source, message })
}

/// The fixed BOOTP header before the options (RFC 2131 figure 1).
const BOOTP_HEADER: usize = 236;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const OPTION_PAD: u8 = 0;
const OPTION_END: u8 = 255;

/// The DHCP payload with only the options a client request carries that
/// the server reads, each with the length RFC 2132 gives it: message type
/// (53, 1 byte), requested address (50, 4), server identifier (54, 4),
/// parameter list (55), maximum message size (57, 2), client identifier
/// (61, at least 2), hostname (12). Everything else a guest sends is
/// dropped before the payload reaches the decoder: `dhcproto` 0.15 asserts
/// on the lengths of some options (debug builds panic on one frame, and
/// nicplug aborts on a panic), and what the server ignores need not be
/// parsed at all.
fn client_options_only(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = payload
        .get(..BOOTP_HEADER + MAGIC_COOKIE.len())
        .ok_or(FrameError::Truncated)?;
    if header[BOOTP_HEADER..] != MAGIC_COOKIE {
        return Err(FrameError::Decode("no DHCP magic cookie".into()));
    }
    let mut out = header.to_vec();
    let mut options = &payload[header.len()..];
    while let Some((&code, rest)) = options.split_first() {
        match code {
            OPTION_PAD => {
                options = rest;
                continue;
            }
            OPTION_END => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first().ok_or(FrameError::Truncated)?;
        let value = rest.get(..usize::from(len)).ok_or(FrameError::Truncated)?;
        options = &rest[usize::from(len)..];
        let wanted = match code {
            53 => len == 1,
            50 | 54 => len == 4,
            57 => len == 2,
            61 => len >= 2,
            55 | 12 => len >= 1,
            _ => false,
        };
        if wanted {
            out.extend_from_slice(&[code, len]);
            out.extend_from_slice(value);
        }
    }
    out.push(OPTION_END);
    Ok(out)
}

/// The frame carrying `message` from `source` (the server's MAC and
/// address, port 67) to `destination` at the client's MAC, port 68.
pub fn build(
    message: &Message,
    source_mac: Mac,
    source_ip: Ipv4Addr,
    destination_mac: Mac,
    destination_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut payload = Vec::new();
    message
        .encode(&mut Encoder::new(&mut payload))
        .expect("encoding into a Vec cannot fail");
    let udp_len = UDP_HEADER + payload.len();
    let ip_len = IPV4_HEADER + udp_len;
    let mut frame = Vec::with_capacity(ETH_HEADER + ip_len);
    frame.extend_from_slice(&destination_mac.octets());
    frame.extend_from_slice(&source_mac.octets());
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let mut ip = [0u8; IPV4_HEADER];
    ip[0] = 0x45; // version 4, 5 words
    ip[1] = 0x10; // TOS: low delay, as DHCP servers commonly set
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = PROTO_UDP;
    ip[12..16].copy_from_slice(&source_ip.octets());
    ip[16..20].copy_from_slice(&destination_ip.octets());
    let checksum = internet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    let mut udp = [0u8; UDP_HEADER];
    udp[0..2].copy_from_slice(&SERVER_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    // The UDP checksum covers a pseudo-header, the UDP header and the data.
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&source_ip.octets());
    pseudo[4..8].copy_from_slice(&destination_ip.octets());
    pseudo[9] = PROTO_UDP;
    pseudo[10..12].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let sum = match internet_checksum(&[&pseudo, &udp, &payload]) {
        // 0 means "no checksum" in UDP over IPv4: send all ones instead.
        0 => 0xffff,
        sum => sum,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&udp);
    frame.extend_from_slice(&payload);
    frame
}

/// RFC 1071 one's complement sum over the concatenation of `parts` (each
/// part but the last has even length here).
pub(super) fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for pair in &mut chunks {
            sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType};

    fn discover() -> Message {
        let mut m = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[2, 0, 0, 0, 0, 9],
        );
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        m
    }

    /// A client's frame: what `build` makes, with the ports swapped.
    fn client_frame(message: &Message) -> Vec<u8> {
        let mut frame = build(
            message,
            Mac::from_bytes([2, 0, 0, 0, 0, 9]),
            Ipv4Addr::UNSPECIFIED,
            Mac::from_bytes([0xff; 6]),
            Ipv4Addr::BROADCAST,
        );
        frame[34..36].copy_from_slice(&CLIENT_PORT.to_be_bytes());
        frame[36..38].copy_from_slice(&SERVER_PORT.to_be_bytes());
        frame
    }

    #[test]
    fn a_built_frame_parses_back_and_its_checksums_verify() {
        let frame = client_frame(&discover());
        let got = parse(&frame).unwrap();
        assert_eq!(got.message, discover());
        assert_eq!(got.source, Mac::from_bytes([2, 0, 0, 0, 0, 9]));
        let reply = build(
            &discover(),
            Mac::from_bytes([2, 1, 1, 1, 1, 1]),
            Ipv4Addr::new(169, 254, 2, 1),
            Mac::from_bytes([2, 0, 0, 0, 0, 9]),
            Ipv4Addr::BROADCAST,
        );
        // A correct IPv4 header sums to zero, and so does UDP with its
        // pseudo-header.
        assert_eq!(internet_checksum(&[&reply[14..34]]), 0);
        let udp = &reply[34..];
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&[169, 254, 2, 1]);
        pseudo[4..8].copy_from_slice(&[255; 4]);
        pseudo[9] = PROTO_UDP;
        pseudo[10..12].copy_from_slice(&(udp.len() as u16).to_be_bytes());
        assert_eq!(internet_checksum(&[&pseudo, udp]), 0);
        // Sent to port 68, so not a request.
        assert_eq!(parse(&reply), Err(FrameError::NotDhcp));
    }

    /// The fuzzer's find: option 152 (bulk lease query base time) with a
    /// length other than 4 made `dhcproto` assert. Dropped before decoding;
    /// the request itself still parses.
    #[test]
    fn options_the_server_does_not_read_never_reach_the_decoder() {
        let mut m = discover();
        m.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                169, 254, 2, 5,
            )));
        let mut frame = client_frame(&m);
        // Replace the END option with a malformed option 152 (length 0),
        // option 53 with a wrong length, then END.
        assert_eq!(frame.pop(), Some(OPTION_END));
        frame.extend_from_slice(&[152, 0, 53, 2, 1, 1, OPTION_END]);
        let total = (frame.len() - ETH_HEADER) as u16;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        frame[38..40].copy_from_slice(&(total - IPV4_HEADER as u16).to_be_bytes());
        let got = parse(&frame).unwrap();
        assert_eq!(got.message.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(
            got.message
                .opts()
                .get(dhcproto::v4::OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                169, 254, 2, 5
            )))
        );
        // An option running past the end is a truncated frame.
        let mut cut = client_frame(&m);
        cut.pop();
        cut.extend_from_slice(&[61, 9, 1]);
        let total = (cut.len() - ETH_HEADER) as u16;
        cut[16..18].copy_from_slice(&total.to_be_bytes());
        cut[38..40].copy_from_slice(&(total - IPV4_HEADER as u16).to_be_bytes());
        assert_eq!(parse(&cut), Err(FrameError::Truncated));
    }

    #[test]
    fn what_is_not_a_dhcp_request_is_refused_without_panic() {
        let good = client_frame(&discover());
        for cut in [0, 13, 14, 20, 33, 41, good.len() - 1] {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(parse(&arp), Err(FrameError::NotDhcp));
        let mut fragment = good.clone();
        fragment[20] = 0x20; // more fragments
        assert_eq!(parse(&fragment), Err(FrameError::Fragmented));
        let mut tcp = good.clone();
        tcp[23] = 6;
        assert_eq!(parse(&tcp), Err(FrameError::NotDhcp));
        let mut short_udp = good;
        short_udp[38..40].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse(&short_udp), Err(FrameError::Truncated));
    }
}
