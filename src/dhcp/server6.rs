//! The DHCPv6 server's logic (RFC 8415, stateful IA_NA for one client), a
//! pure function like the IPv4 one: one message and the lease in, the
//! reply (if any) and what happened out.
//!
//! The client is identified by the frame's source MAC (checked by the
//! caller); the DUID it sends is echoed, never trusted to mean another
//! client. Every IA_NA the client asks for gets the same, only address
//! (a guest asks for one per interface). Prefix delegation and temporary
//! addresses are not offered: the network allocated one address.

use dhcproto::v6::{
    DhcpOption, DhcpOptions, IAAddr, IANA, Message, MessageType, OptionCode, Status, StatusCode,
};

use super::lease6::Lease6Config;
use super::server::Outcome;

/// Answers `request` for `lease`.
pub fn answer6(request: &Message, lease: &Lease6Config) -> (Option<Message>, Outcome) {
    let opts = request.opts();
    let Some(DhcpOption::ClientId(client_id)) = opts.get(OptionCode::ClientId) else {
        return match request.msg_type() {
            // An INFORMATION-REQUEST may come without a client id.
            MessageType::InformationRequest => (
                Some(reply(request, lease, None, MessageType::Reply)),
                Outcome::Informed,
            ),
            _ => (None, Outcome::Ignored("no client identifier")),
        };
    };
    let server_id = match opts.get(OptionCode::ServerId) {
        Some(DhcpOption::ServerId(id)) => Some(id.as_slice()),
        _ => None,
    };
    let ours = server_id == Some(lease.server_duid.as_slice());
    let client_id = Some(client_id.as_slice());
    match request.msg_type() {
        // Solicit, Confirm and Rebind go to every server: one naming a
        // server is malformed (RFC 8415 16).
        MessageType::Solicit | MessageType::Confirm | MessageType::Rebind
            if server_id.is_some() =>
        {
            (None, Outcome::Ignored("carries a server identifier"))
        }
        MessageType::Solicit => {
            let rapid = opts.get(OptionCode::RapidCommit).is_some();
            let kind = if rapid {
                MessageType::Reply
            } else {
                MessageType::Advertise
            };
            let mut message = reply(request, lease, client_id, kind);
            let outcome = bind(request, lease, &mut message);
            if rapid {
                message.opts_mut().insert(DhcpOption::RapidCommit);
                (Some(message), outcome)
            } else {
                // The only server on the link: preference 255 lets the
                // client request at once instead of collecting other
                // advertisements for a second (RFC 8415 18.2.1).
                message.opts_mut().insert(DhcpOption::Preference(u8::MAX));
                let offered = match outcome {
                    Outcome::Acked => Outcome::Offered,
                    other => other,
                };
                (Some(message), offered)
            }
        }
        MessageType::Request | MessageType::Renew if !ours => {
            (None, Outcome::Ignored("for another server"))
        }
        MessageType::Request | MessageType::Renew | MessageType::Rebind => {
            let mut message = reply(request, lease, client_id, MessageType::Reply);
            let outcome = bind(request, lease, &mut message);
            (Some(message), outcome)
        }
        MessageType::Confirm => {
            let on_link = requested_addresses(request)
                .iter()
                .all(|a| *a == lease.address || lease.on_link.is_some_and(|n| n.contains(a)));
            let mut message = reply(request, lease, client_id, MessageType::Reply);
            let (status, text) = if on_link {
                (Status::Success, "on link")
            } else {
                (Status::NotOnLink, "not on this link")
            };
            message.opts_mut().insert(status_code(status, text));
            (Some(message), Outcome::Confirmed { on_link })
        }
        MessageType::Release | MessageType::Decline if !ours => {
            (None, Outcome::Ignored("for another server"))
        }
        MessageType::Release | MessageType::Decline => {
            let mut message = reply(request, lease, client_id, MessageType::Reply);
            message
                .opts_mut()
                .insert(status_code(Status::Success, "done"));
            let outcome = if request.msg_type() == MessageType::Release {
                Outcome::Released
            } else {
                Outcome::Declined
            };
            (Some(message), outcome)
        }
        MessageType::InformationRequest if server_id.is_some() && !ours => {
            (None, Outcome::Ignored("for another server"))
        }
        MessageType::InformationRequest => (
            Some(reply(request, lease, client_id, MessageType::Reply)),
            Outcome::Informed,
        ),
        _ => (None, Outcome::Ignored("not a client message")),
    }
}

/// A reply of `kind` with the server's identity, the client's, and the
/// configuration every reply carries (DNS).
fn reply(
    request: &Message,
    lease: &Lease6Config,
    client_id: Option<&[u8]>,
    kind: MessageType,
) -> Message {
    let mut message = Message::new_with_id(kind, request.xid());
    let opts = message.opts_mut();
    opts.insert(DhcpOption::ServerId(lease.server_duid.clone()));
    if let Some(id) = client_id {
        opts.insert(DhcpOption::ClientId(id.to_vec()));
    }
    if !lease.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServers(lease.dns.clone()));
    }
    let names: Vec<dhcproto::Name> = lease.search.iter().filter_map(|s| s.parse().ok()).collect();
    if !names.is_empty() {
        opts.insert(DhcpOption::DomainSearchList(names));
    }
    message
}

/// Puts the lease into every IA_NA of `request` (with any other address
/// the client named at lifetime 0, so it drops it), or NoAddrsAvail when
/// the client asked for none (then it got configuration only). Returns
/// what happened.
fn bind(request: &Message, lease: &Lease6Config, message: &mut Message) -> Outcome {
    let ias: Vec<&IANA> = request
        .opts()
        .iter()
        .filter_map(|o| match o {
            DhcpOption::IANA(ia) => Some(ia),
            _ => None,
        })
        .collect();
    if ias.is_empty() {
        message
            .opts_mut()
            .insert(status_code(Status::NoAddrsAvail, "only IA_NA is served"));
        return Outcome::Informed;
    }
    let valid = lease.lease_seconds;
    let mut other = None;
    for ia in &ias {
        let mut ia_opts = DhcpOptions::new();
        ia_opts.insert(DhcpOption::IAAddr(IAAddr {
            addr: lease.address,
            preferred_life: valid,
            valid_life: valid,
            opts: DhcpOptions::new(),
        }));
        for asked in addresses_of(ia).filter(|a| *a != lease.address) {
            other.get_or_insert(asked);
            ia_opts.insert(DhcpOption::IAAddr(IAAddr {
                addr: asked,
                preferred_life: 0,
                valid_life: 0,
                opts: DhcpOptions::new(),
            }));
        }
        message.opts_mut().insert(DhcpOption::IANA(IANA {
            id: ia.id,
            t1: valid / 2,
            t2: valid / 8 * 7,
            opts: ia_opts,
        }));
    }
    match other {
        // A Solicit naming an address is only a hint; anything else names
        // the address the client holds.
        Some(requested) if request.msg_type() != MessageType::Solicit => Outcome::Nacked {
            requested: requested.into(),
        },
        _ => Outcome::Acked,
    }
}

fn addresses_of(ia: &IANA) -> impl Iterator<Item = std::net::Ipv6Addr> + '_ {
    ia.opts.iter().filter_map(|o| match o {
        DhcpOption::IAAddr(a) => Some(a.addr),
        _ => None,
    })
}

fn requested_addresses(request: &Message) -> Vec<std::net::Ipv6Addr> {
    request
        .opts()
        .iter()
        .filter_map(|o| match o {
            DhcpOption::IANA(ia) => Some(addresses_of(ia).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn status_code(status: Status, text: &str) -> DhcpOption {
    DhcpOption::StatusCode(StatusCode {
        status,
        msg: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use dhcproto::{Decodable, Decoder, Encodable, Encoder};

    use super::*;

    const ADDRESS: &str = "fe80::2:5";
    const CLIENT_DUID: [u8; 10] = [0, 3, 0, 1, 2, 0, 0, 0, 0, 9];

    fn lease() -> Lease6Config {
        Lease6Config {
            client: "02:00:00:00:00:09".parse().unwrap(),
            address: ADDRESS.parse().unwrap(),
            prefix: 64,
            router: Some("fe80::2:1".parse().unwrap()),
            on_link: None,
            routes: vec![],
            mtu: 1400,
            dns: vec!["fd00::53".parse().unwrap()],
            search: vec!["a.test".into()],
            lease_seconds: 86_400,
            server: "fe80::aa:bbff:fecc:ddee".parse().unwrap(),
            server_duid: vec![0, 3, 0, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
        }
    }

    /// A client message as it comes off the wire (encoded and decoded with
    /// the crate, as the frame parser does).
    fn request(kind: MessageType, opts: Vec<DhcpOption>) -> Message {
        let mut m = Message::new_with_id(kind, [1, 2, 3]);
        for o in opts {
            m.opts_mut().insert(o);
        }
        let mut bytes = Vec::new();
        m.encode(&mut Encoder::new(&mut bytes)).unwrap();
        Message::decode(&mut Decoder::new(&bytes)).unwrap()
    }

    fn ia(addresses: &[&str]) -> DhcpOption {
        let mut opts = DhcpOptions::new();
        for a in addresses {
            opts.insert(DhcpOption::IAAddr(IAAddr {
                addr: a.parse().unwrap(),
                preferred_life: 0,
                valid_life: 0,
                opts: DhcpOptions::new(),
            }));
        }
        DhcpOption::IANA(IANA {
            id: 7,
            t1: 0,
            t2: 0,
            opts,
        })
    }

    fn client() -> DhcpOption {
        DhcpOption::ClientId(CLIENT_DUID.to_vec())
    }

    fn server() -> DhcpOption {
        DhcpOption::ServerId(lease().server_duid)
    }

    /// The addresses and lifetimes of the reply's IA_NA 7.
    fn leased(reply: &Message) -> Vec<(Ipv6Addr, u32)> {
        let Some(DhcpOption::IANA(ia)) = reply.opts().get(OptionCode::IANA) else {
            panic!("no IA_NA in {reply:?}");
        };
        assert_eq!(ia.id, 7);
        assert_eq!((ia.t1, ia.t2), (43_200, 75_600));
        addresses_of(ia)
            .map(|a| {
                let life = ia
                    .opts
                    .iter()
                    .find_map(|o| match o {
                        DhcpOption::IAAddr(x) if x.addr == a => Some(x.valid_life),
                        _ => None,
                    })
                    .unwrap();
                (a, life)
            })
            .collect()
    }

    fn status(reply: &Message) -> Option<Status> {
        match reply.opts().get(OptionCode::StatusCode) {
            Some(DhcpOption::StatusCode(s)) => Some(s.status),
            _ => None,
        }
    }

    #[test]
    fn solicit_gets_an_advertise_or_with_rapid_commit_a_reply() {
        let (reply, outcome) = answer6(
            &request(MessageType::Solicit, vec![client(), ia(&[])]),
            &lease(),
        );
        let reply = reply.unwrap();
        assert_eq!(outcome, Outcome::Offered);
        assert_eq!(reply.msg_type(), MessageType::Advertise);
        assert_eq!(reply.xid(), [1, 2, 3]);
        assert_eq!(leased(&reply), vec![(ADDRESS.parse().unwrap(), 86_400)]);
        assert_eq!(reply.opts().get(OptionCode::ServerId), Some(&server()));
        assert_eq!(reply.opts().get(OptionCode::ClientId), Some(&client()));
        assert_eq!(
            reply.opts().get(OptionCode::Preference),
            Some(&DhcpOption::Preference(255))
        );
        assert!(reply.opts().get(OptionCode::DomainNameServers).is_some());
        assert!(reply.opts().get(OptionCode::DomainSearchList).is_some());

        let rapid = request(
            MessageType::Solicit,
            vec![client(), ia(&["fe80::9:9"]), DhcpOption::RapidCommit],
        );
        let (reply, outcome) = answer6(&rapid, &lease());
        let reply = reply.unwrap();
        assert_eq!(outcome, Outcome::Acked, "a hint is no renewal");
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert!(reply.opts().get(OptionCode::RapidCommit).is_some());
    }

    #[test]
    fn request_renew_rebind_bind_the_lease() {
        for (kind, mut opts) in [
            (MessageType::Request, vec![server()]),
            (MessageType::Renew, vec![server()]),
            (MessageType::Rebind, vec![]),
        ] {
            opts.extend([client(), ia(&[ADDRESS])]);
            let (reply, outcome) = answer6(&request(kind, opts), &lease());
            assert_eq!(outcome, Outcome::Acked, "{kind:?}");
            let reply = reply.unwrap();
            assert_eq!(reply.msg_type(), MessageType::Reply);
            assert_eq!(leased(&reply), vec![(ADDRESS.parse().unwrap(), 86_400)]);
        }
    }

    #[test]
    fn renewing_another_address_gets_the_lease_and_the_other_at_lifetime_zero() {
        let renew = request(
            MessageType::Renew,
            vec![client(), server(), ia(&["fe80::9:9"])],
        );
        let (reply, outcome) = answer6(&renew, &lease());
        assert_eq!(
            outcome,
            Outcome::Nacked {
                requested: "fe80::9:9".parse::<Ipv6Addr>().unwrap().into()
            }
        );
        let mut got = leased(&reply.unwrap());
        got.sort();
        assert_eq!(
            got,
            vec![
                (ADDRESS.parse().unwrap(), 86_400),
                ("fe80::9:9".parse().unwrap(), 0)
            ]
        );
    }

    #[test]
    fn messages_for_another_server_or_without_a_client_are_ignored() {
        let other = DhcpOption::ServerId(vec![0, 3, 0, 1, 1, 1, 1, 1, 1, 1]);
        for kind in [
            MessageType::Request,
            MessageType::Renew,
            MessageType::Release,
            MessageType::Decline,
            MessageType::InformationRequest,
        ] {
            let m = request(kind, vec![client(), other.clone(), ia(&[ADDRESS])]);
            assert_eq!(
                answer6(&m, &lease()),
                (None, Outcome::Ignored("for another server")),
                "{kind:?}"
            );
        }
        // Solicit and Rebind must not name a server at all.
        let m = request(MessageType::Solicit, vec![client(), server(), ia(&[])]);
        assert!(answer6(&m, &lease()).0.is_none());
        let m = request(MessageType::Solicit, vec![ia(&[])]);
        assert_eq!(
            answer6(&m, &lease()).1,
            Outcome::Ignored("no client identifier")
        );
        // A server's message is no request.
        let m = request(MessageType::Advertise, vec![client(), server()]);
        assert!(answer6(&m, &lease()).0.is_none());
    }

    #[test]
    fn confirm_release_decline_inform() {
        let m = request(MessageType::Confirm, vec![client(), ia(&[ADDRESS])]);
        let (reply, outcome) = answer6(&m, &lease());
        assert_eq!(outcome, Outcome::Confirmed { on_link: true });
        assert_eq!(status(&reply.unwrap()), Some(Status::Success));
        let m = request(MessageType::Confirm, vec![client(), ia(&["2001:db8::5"])]);
        let (reply, outcome) = answer6(&m, &lease());
        assert_eq!(outcome, Outcome::Confirmed { on_link: false });
        assert_eq!(status(&reply.unwrap()), Some(Status::NotOnLink));

        let m = request(
            MessageType::Release,
            vec![client(), server(), ia(&[ADDRESS])],
        );
        let (reply, outcome) = answer6(&m, &lease());
        assert_eq!(outcome, Outcome::Released);
        assert_eq!(status(&reply.unwrap()), Some(Status::Success));
        let m = request(
            MessageType::Decline,
            vec![client(), server(), ia(&[ADDRESS])],
        );
        assert_eq!(answer6(&m, &lease()).1, Outcome::Declined);

        let m = request(MessageType::InformationRequest, vec![]);
        let (reply, outcome) = answer6(&m, &lease());
        assert_eq!(outcome, Outcome::Informed);
        let reply = reply.unwrap();
        assert!(reply.opts().get(OptionCode::IANA).is_none());
        assert!(reply.opts().get(OptionCode::DomainNameServers).is_some());
    }

    #[test]
    fn a_solicit_without_ia_na_gets_no_addrs_avail() {
        let m = request(MessageType::Solicit, vec![client()]);
        let (reply, _) = answer6(&m, &lease());
        assert_eq!(status(&reply.unwrap()), Some(Status::NoAddrsAvail));
    }
}
