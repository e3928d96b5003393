//! What a guest can send the DHCP server: any frame read from the tap goes
//! through `dhcp::frame::parse` and, when it is a request, through the
//! server logic (`dhcp::answer`) for a fixed lease; a reply is framed and
//! must parse back as a BOOTREPLY frame of the same message.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use nicplug::dhcp::{Dns, LeaseConfig, answer, frame};
use nicplug::model::Mac;

fuzz_target!(|data: &[u8]| {
    let Ok(received) = frame::parse(data) else {
        return;
    };
    let server = Ipv4Addr::new(169, 254, 2, 1);
    let lease = LeaseConfig {
        // The sender's MAC, so that every parsed request reaches the logic.
        client: received.source,
        address: Ipv4Addr::new(169, 254, 2, 5),
        prefix: 24,
        router: Some(server),
        classless_routes: vec![(Default::default(), server)],
        mtu: 1400,
        dns: Dns {
            servers: vec![Ipv4Addr::new(10, 96, 0, 10)],
            servers6: vec!["fd00::10".parse().unwrap()],
            search: vec!["svc.cluster.local".into()],
        },
        hostname: Some("vmi".into()),
        lease_seconds: 86_400,
        server,
    };
    let (reply, _outcome) = answer(&received.message, &lease);
    if let Some(reply) = reply {
        let bytes = frame::build(
            &reply.message,
            Mac::from_bytes([2, 0, 0, 0, 0, 1]),
            server,
            lease.client,
            reply.destination,
        );
        // A reply goes to port 68: the request parser refuses it.
        assert!(frame::parse(&bytes).is_err());
    }
});
