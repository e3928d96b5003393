//! What a guest can send the IPv6 half of the server: any frame read from
//! the tap goes through `dhcp::frame6::parse6` and, when it is a DHCPv6
//! message, through `dhcp::answer6` for a fixed lease (a router
//! solicitation through the advertisement builder); a reply is framed and
//! must be refused by the request parser (it goes to the client's port).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nicplug::dhcp::frame6::{self, Request6};
use nicplug::dhcp::{Lease6Config, answer6, ra};
use nicplug::model::Mac;

fuzz_target!(|data: &[u8]| {
    let Ok(received) = frame6::parse6(data) else {
        return;
    };
    let server_mac = Mac::from_bytes([2, 0, 0, 0, 0, 1]);
    let lease = Lease6Config {
        // The sender's MAC, so that every parsed request reaches the logic.
        client: received.source,
        address: "fe80::2:5".parse().unwrap(),
        prefix: 64,
        router: Some("fe80::2:1".parse().unwrap()),
        on_link: Some("2001:db8:2::/64".parse().unwrap()),
        routes: vec!["fd00:9::/48".parse().unwrap()],
        mtu: 1400,
        dns: vec!["fd00::53".parse().unwrap()],
        search: vec!["svc.cluster.local".into()],
        lease_seconds: 86_400,
        server: "fe80::ff:fe00:1".parse().unwrap(),
        server_duid: vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 1],
    };
    let bytes = match &received.request {
        Request6::RouterSolicitation => {
            let (source, body) = ra::advertisement(&lease, server_mac);
            frame6::build_icmp6(body, server_mac, source, lease.client, received.from)
        }
        Request6::Dhcp(message) => match answer6(message, &lease) {
            (Some(reply), _) => {
                frame6::build_dhcp6(&reply, server_mac, lease.server, lease.client, received.from)
            }
            (None, _) => return,
        },
    };
    assert!(frame6::parse6(&bytes).is_err());
});
