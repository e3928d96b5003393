//! The DHCPv4 server's logic, a pure function: one request and the lease
//! config in, the reply (if any) and what happened out. No socket, no
//! clock, no state: everything comes from the lease, which comes from the
//! record, so any instance of nicplug answers the same.

use std::net::{IpAddr, Ipv4Addr};

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};

use super::lease::LeaseConfig;

/// What one request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// DISCOVER answered with an OFFER.
    Offered,
    /// REQUEST (selecting, init-reboot, renewing or rebinding) answered with
    /// an ACK: the guest holds its lease.
    Acked,
    /// REQUEST for another address answered with a NAK (DHCPv6: a renewal
    /// of another address, answered with the lease's and the other at
    /// lifetime 0).
    Nacked { requested: IpAddr },
    /// DHCPv6 CONFIRM: whether the guest's addresses are still on the link.
    Confirmed { on_link: bool },
    /// INFORM answered with an ACK carrying configuration only.
    Informed,
    /// The guest released its lease (no reply).
    Released,
    /// The guest declined the address: it found it in use (no reply).
    Declined,
    /// Not answered, and why (another MAC, another server chosen, ...).
    Ignored(&'static str),
}

/// Where a reply goes (RFC 2131 4.1): the IPv4 destination; the Ethernet
/// destination is always the client's MAC (the only one served).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub message: Message,
    pub destination: Ipv4Addr,
}

/// Answers `request` for `lease`.
pub fn answer(request: &Message, lease: &LeaseConfig) -> (Option<Reply>, Outcome) {
    if request.opcode() != Opcode::BootRequest {
        return (None, Outcome::Ignored("not a BOOTREQUEST"));
    }
    if request.htype() != HType::Eth || request.hlen() != 6 {
        return (None, Outcome::Ignored("not an Ethernet client"));
    }
    if request.chaddr().get(..6) != Some(&lease.client.octets()[..]) {
        return (None, Outcome::Ignored("another MAC"));
    }
    if !request.giaddr().is_unspecified() {
        return (None, Outcome::Ignored("relayed"));
    }
    let opts = request.opts();
    let Some(kind) = opts.msg_type() else {
        return (None, Outcome::Ignored("no message type (BOOTP)"));
    };
    let server_id = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let requested = match opts.get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    match kind {
        MessageType::Discover => (
            Some(reply(request, lease, MessageType::Offer)),
            Outcome::Offered,
        ),
        MessageType::Request => {
            let asked = match (server_id, requested) {
                // SELECTING: the client chose a server.
                (Some(id), _) if id != lease.server => {
                    return (None, Outcome::Ignored("another server chosen"));
                }
                (Some(_), Some(ip)) => ip,
                (Some(_), None) => return (None, Outcome::Ignored("selecting without an address")),
                // INIT-REBOOT: the client asks for the address it remembers.
                (None, Some(ip)) => ip,
                // RENEWING / REBINDING: the client's address is in ciaddr.
                (None, None) if !request.ciaddr().is_unspecified() => request.ciaddr(),
                (None, None) => return (None, Outcome::Ignored("request without an address")),
            };
            if asked == lease.address {
                (
                    Some(reply(request, lease, MessageType::Ack)),
                    Outcome::Acked,
                )
            } else {
                (
                    Some(nak(request, lease)),
                    Outcome::Nacked {
                        requested: asked.into(),
                    },
                )
            }
        }
        MessageType::Inform => (
            Some(reply(request, lease, MessageType::Ack)),
            Outcome::Informed,
        ),
        MessageType::Release if server_id.is_none_or(|id| id == lease.server) => {
            (None, Outcome::Released)
        }
        MessageType::Decline if server_id.is_none_or(|id| id == lease.server) => {
            (None, Outcome::Declined)
        }
        MessageType::Release | MessageType::Decline => {
            (None, Outcome::Ignored("for another server"))
        }
        _ => (None, Outcome::Ignored("not a client message")),
    }
}

/// OFFER or ACK (for INFORM: no address, no lease time).
fn reply(request: &Message, lease: &LeaseConfig, kind: MessageType) -> Reply {
    let inform = request.opts().msg_type() == Some(MessageType::Inform);
    let mut message = base(request, lease);
    if inform {
        message.set_ciaddr(request.ciaddr());
    } else {
        message.set_yiaddr(lease.address);
    }
    let opts = message.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(lease.server));
    if !inform {
        let t = lease.lease_seconds;
        opts.insert(DhcpOption::AddressLeaseTime(t));
        opts.insert(DhcpOption::Renewal(t / 2));
        opts.insert(DhcpOption::Rebinding(t / 8 * 7));
    }
    opts.insert(DhcpOption::SubnetMask(lease.netmask()));
    if let Some(router) = lease.router {
        opts.insert(DhcpOption::Router(vec![router]));
    }
    if !lease.classless_routes.is_empty() {
        opts.insert(DhcpOption::ClasslessStaticRoute(
            lease.classless_routes.clone(),
        ));
    }
    opts.insert(DhcpOption::InterfaceMtu(lease.mtu));
    if !lease.dns.servers.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(lease.dns.servers.clone()));
    }
    if let Some(first) = lease.dns.search.first() {
        opts.insert(DhcpOption::DomainName(first.clone()));
        let names: Vec<dhcproto::Name> = lease
            .dns
            .search
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        if !names.is_empty() {
            opts.insert(DhcpOption::DomainSearch(names));
        }
    }
    if let Some(hostname) = &lease.hostname {
        opts.insert(DhcpOption::Hostname(hostname.clone()));
    }
    let destination = destination(request);
    Reply {
        message,
        destination,
    }
}

fn nak(request: &Message, lease: &LeaseConfig) -> Reply {
    let mut message = base(request, lease);
    let opts = message.opts_mut();
    opts.insert(DhcpOption::MessageType(MessageType::Nak));
    opts.insert(DhcpOption::ServerIdentifier(lease.server));
    // A NAK is broadcast: the client has no usable address (RFC 2131 4.1).
    let flags = message.flags().set_broadcast();
    message.set_flags(flags);
    Reply {
        message,
        destination: Ipv4Addr::BROADCAST,
    }
}

/// The reply's fixed fields, from the request.
fn base(request: &Message, lease: &LeaseConfig) -> Message {
    let mut message = Message::new_with_id(
        request.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        lease.server,
        Ipv4Addr::UNSPECIFIED,
        request.chaddr(),
    );
    message
        .set_opcode(Opcode::BootReply)
        .set_flags(request.flags());
    message
}

/// RFC 2131 4.1 without relays: to ciaddr when the client has one
/// (renewing, rebinding, INFORM), else the IPv4 broadcast. The frame goes
/// to the client's MAC either way (the packet socket needs no ARP), so a
/// client without an address receives it whatever its broadcast flag says.
fn destination(request: &Message) -> Ipv4Addr {
    if request.ciaddr().is_unspecified() {
        Ipv4Addr::BROADCAST
    } else {
        request.ciaddr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::lease::{Dns, LeaseConfig};

    const CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 9];
    const ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 5);
    const SERVER: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 1);

    fn lease() -> LeaseConfig {
        LeaseConfig {
            client: crate::model::Mac::from_bytes(CLIENT),
            address: ADDRESS,
            prefix: 24,
            router: Some(SERVER),
            classless_routes: vec![
                ("0.0.0.0/0".parse().unwrap(), SERVER),
                ("169.254.255.2/32".parse().unwrap(), SERVER),
            ],
            mtu: 1400,
            dns: Dns {
                servers: vec![Ipv4Addr::new(10, 96, 0, 10)],
                servers6: vec![],
                search: vec!["default.svc.cluster.local".into()],
            },
            hostname: Some("vmi-1".into()),
            lease_seconds: 86_400,
            server: SERVER,
        }
    }

    fn request(kind: MessageType, chaddr: &[u8], opts: Vec<DhcpOption>) -> Message {
        let mut m = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            chaddr,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        m
    }

    fn kind(reply: &Reply) -> Option<MessageType> {
        reply.message.opts().msg_type()
    }

    #[test]
    fn discover_gets_an_offer_with_everything_from_the_record() {
        let (reply, outcome) = answer(&request(MessageType::Discover, &CLIENT, vec![]), &lease());
        let reply = reply.unwrap();
        assert_eq!(outcome, Outcome::Offered);
        assert_eq!(kind(&reply), Some(MessageType::Offer));
        let m = &reply.message;
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!(m.xid(), 0x1234_5678);
        assert_eq!(m.yiaddr(), ADDRESS);
        assert_eq!(&m.chaddr()[..6], &CLIENT);
        let o = m.opts();
        assert_eq!(
            o.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            o.get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![SERVER]))
        );
        assert_eq!(
            o.get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1400))
        );
        assert_eq!(
            o.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            o.get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(86_400))
        );
        assert!(matches!(
            o.get(OptionCode::ClasslessStaticRoute),
            Some(DhcpOption::ClasslessStaticRoute(r)) if r.len() == 2
        ));
        assert_eq!(
            o.get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("vmi-1".into()))
        );
        assert!(o.get(OptionCode::DomainNameServer).is_some());
        assert!(o.get(OptionCode::DomainSearch).is_some());
    }

    #[test]
    fn request_selecting_init_reboot_renew_rebind() {
        let selecting = request(
            MessageType::Request,
            &CLIENT,
            vec![
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(ADDRESS),
            ],
        );
        let (reply, outcome) = answer(&selecting, &lease());
        assert_eq!(outcome, Outcome::Acked);
        assert_eq!(kind(&reply.unwrap()), Some(MessageType::Ack));

        let init_reboot = request(
            MessageType::Request,
            &CLIENT,
            vec![DhcpOption::RequestedIpAddress(ADDRESS)],
        );
        assert_eq!(answer(&init_reboot, &lease()).1, Outcome::Acked);

        // Renewing (unicast) and rebinding (broadcast) look the same to a
        // server: ciaddr set, no server id, no requested address.
        let mut renew = request(MessageType::Request, &CLIENT, vec![]);
        renew.set_ciaddr(ADDRESS);
        let (reply, outcome) = answer(&renew, &lease());
        assert_eq!(outcome, Outcome::Acked);
        let reply = reply.unwrap();
        assert_eq!(reply.destination, ADDRESS, "unicast to ciaddr");
        assert_eq!(reply.message.yiaddr(), ADDRESS);
    }

    #[test]
    fn a_request_for_another_address_is_nacked() {
        let other = Ipv4Addr::new(169, 254, 2, 99);
        let init_reboot = request(
            MessageType::Request,
            &CLIENT,
            vec![DhcpOption::RequestedIpAddress(other)],
        );
        let (reply, outcome) = answer(&init_reboot, &lease());
        assert_eq!(
            outcome,
            Outcome::Nacked {
                requested: other.into()
            }
        );
        let reply = reply.unwrap();
        assert_eq!(kind(&reply), Some(MessageType::Nak));
        assert_eq!(reply.destination, Ipv4Addr::BROADCAST);
        assert!(reply.message.flags().broadcast());
        assert_eq!(reply.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
        let mut renew = request(MessageType::Request, &CLIENT, vec![]);
        renew.set_ciaddr(other);
        assert_eq!(
            answer(&renew, &lease()).1,
            Outcome::Nacked {
                requested: other.into()
            }
        );
    }

    #[test]
    fn another_server_chosen_or_another_mac_gets_nothing() {
        let elsewhere = request(
            MessageType::Request,
            &CLIENT,
            vec![
                DhcpOption::ServerIdentifier(Ipv4Addr::new(169, 254, 2, 200)),
                DhcpOption::RequestedIpAddress(ADDRESS),
            ],
        );
        assert_eq!(
            answer(&elsewhere, &lease()),
            (None, Outcome::Ignored("another server chosen"))
        );
        for kind in [
            MessageType::Discover,
            MessageType::Request,
            MessageType::Inform,
            MessageType::Release,
        ] {
            let foreign = request(kind, &[2, 0, 0, 0, 0, 10], vec![]);
            assert_eq!(
                answer(&foreign, &lease()),
                (None, Outcome::Ignored("another MAC"))
            );
        }
        let mut relayed = request(MessageType::Discover, &CLIENT, vec![]);
        relayed.set_giaddr(Ipv4Addr::new(169, 254, 2, 7));
        assert_eq!(answer(&relayed, &lease()).0, None);
        let mut reply_op = request(MessageType::Discover, &CLIENT, vec![]);
        reply_op.set_opcode(Opcode::BootReply);
        assert_eq!(answer(&reply_op, &lease()).0, None);
    }

    #[test]
    fn inform_gets_configuration_without_a_lease() {
        let mut inform = request(MessageType::Inform, &CLIENT, vec![]);
        inform.set_ciaddr(ADDRESS);
        let (reply, outcome) = answer(&inform, &lease());
        assert_eq!(outcome, Outcome::Informed);
        let reply = reply.unwrap();
        assert_eq!(kind(&reply), Some(MessageType::Ack));
        assert_eq!(reply.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(reply.message.ciaddr(), ADDRESS);
        assert!(
            reply
                .message
                .opts()
                .get(OptionCode::AddressLeaseTime)
                .is_none()
        );
        assert!(reply.message.opts().get(OptionCode::Router).is_some());
    }

    #[test]
    fn release_and_decline_are_noted_not_answered() {
        let release = request(
            MessageType::Release,
            &CLIENT,
            vec![DhcpOption::ServerIdentifier(SERVER)],
        );
        assert_eq!(answer(&release, &lease()), (None, Outcome::Released));
        let decline = request(
            MessageType::Decline,
            &CLIENT,
            vec![DhcpOption::RequestedIpAddress(ADDRESS)],
        );
        assert_eq!(answer(&decline, &lease()), (None, Outcome::Declined));
        let offer = request(MessageType::Offer, &CLIENT, vec![]);
        assert_eq!(answer(&offer, &lease()).0, None);
    }

    #[test]
    fn replies_survive_the_wire_format() {
        use dhcproto::{Decodable, Decoder, Encodable, Encoder};
        let (reply, _) = answer(&request(MessageType::Discover, &CLIENT, vec![]), &lease());
        let reply = reply.unwrap();
        let mut bytes = Vec::new();
        reply.message.encode(&mut Encoder::new(&mut bytes)).unwrap();
        let back = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        // Compared as bytes: a decoded search domain is fully qualified,
        // which `Name`'s equality sees and the wire does not.
        let mut again = Vec::new();
        back.encode(&mut Encoder::new(&mut again)).unwrap();
        assert_eq!(again, bytes);
        assert_eq!(back.yiaddr(), ADDRESS);
    }
}
