//! The router advertisement the VM gets (RFC 4861 4.2), a pure function of
//! the IPv6 lease: M and O set (the address and DNS come from DHCPv6),
//! the link's MTU, the on-link prefix without autonomous configuration, the
//! default router when the pod link has a link-local gateway, its more
//! specific routes (RFC 4191) and the DNS servers (RFC 8106).
//!
//! An advertisement names its source as the router. With a gateway to speak
//! for, the source is that gateway's address and carries no link-layer
//! address: the guest resolves the gateway itself, through the bridge, and
//! reaches the real one. Without, the source is the server's own link-local
//! address and the router lifetime is 0 ("not a default router").

use std::net::Ipv6Addr;

use super::frame6::ROUTER_ADVERTISEMENT;
use super::lease6::{Lease6Config, ROUTER_LIFETIME_SECONDS};
use crate::model::Mac;

const FLAG_MANAGED: u8 = 0x80;
const FLAG_OTHER: u8 = 0x40;
const OPTION_SOURCE_LINK_LAYER: u8 = 1;
const OPTION_PREFIX: u8 = 3;
const OPTION_MTU: u8 = 5;
const OPTION_ROUTE: u8 = 24;
const OPTION_RDNSS: u8 = 25;
const PREFIX_ON_LINK: u8 = 0x80;
const CUR_HOP_LIMIT: u8 = 64;

/// The advertisement: its IPv6 source and its ICMPv6 body (checksum zero,
/// filled in by the framing).
pub fn advertisement(lease: &Lease6Config, server_mac: Mac) -> (Ipv6Addr, Vec<u8>) {
    let (source, router_lifetime) = match lease.router {
        Some(router) => (router, ROUTER_LIFETIME_SECONDS),
        None => (lease.server, 0),
    };
    let mut body = vec![
        ROUTER_ADVERTISEMENT,
        0,
        0,
        0,
        CUR_HOP_LIMIT,
        FLAG_MANAGED | FLAG_OTHER,
    ];
    body.extend_from_slice(&router_lifetime.to_be_bytes());
    body.extend_from_slice(&[0; 8]); // reachable time, retransmit timer: unspecified
    if lease.router.is_none() {
        body.extend_from_slice(&[OPTION_SOURCE_LINK_LAYER, 1]);
        body.extend_from_slice(&server_mac.octets());
    }
    body.extend_from_slice(&[OPTION_MTU, 1, 0, 0]);
    body.extend_from_slice(&lease.mtu.to_be_bytes());
    if let Some(prefix) = lease.on_link {
        body.extend_from_slice(&[OPTION_PREFIX, 4, prefix.prefix_len(), PREFIX_ON_LINK]);
        body.extend_from_slice(&lease.lease_seconds.to_be_bytes()); // valid
        body.extend_from_slice(&lease.lease_seconds.to_be_bytes()); // preferred
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&prefix.network().octets());
    }
    if lease.router.is_some() {
        for route in &lease.routes {
            // 8 bytes of header, then as many 8-byte units of prefix as the
            // length needs (RFC 4191 2.3).
            let units = route.prefix_len().div_ceil(64);
            body.extend_from_slice(&[OPTION_ROUTE, 1 + units, route.prefix_len(), 0]);
            body.extend_from_slice(&u32::from(ROUTER_LIFETIME_SECONDS).to_be_bytes());
            body.extend_from_slice(&route.network().octets()[..usize::from(units) * 8]);
        }
    }
    if !lease.dns.is_empty() {
        let len = 1 + 2 * lease.dns.len();
        body.extend_from_slice(&[OPTION_RDNSS, len as u8, 0, 0]);
        body.extend_from_slice(&lease.lease_seconds.to_be_bytes());
        for server in &lease.dns {
            body.extend_from_slice(&server.octets());
        }
    }
    (source, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(router: Option<&str>) -> Lease6Config {
        Lease6Config {
            client: "02:00:00:00:00:09".parse().unwrap(),
            address: "2001:db8:2::5".parse().unwrap(),
            prefix: 64,
            router: router.map(|r| r.parse().unwrap()),
            on_link: Some("2001:db8:2::/64".parse().unwrap()),
            routes: vec!["fd00:9::/48".parse().unwrap()],
            mtu: 1400,
            dns: vec!["fd00::53".parse().unwrap()],
            search: vec![],
            lease_seconds: 86_400,
            server: "fe80::aa:bbff:fecc:ddee".parse().unwrap(),
            server_duid: vec![],
        }
    }

    /// The options of an advertisement body: (type, whole option bytes).
    fn options(body: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut rest = &body[16..];
        while !rest.is_empty() {
            let len = usize::from(rest[1]) * 8;
            out.push((rest[0], &rest[..len]));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn with_a_gateway_the_advertisement_speaks_for_it() {
        let (source, body) = advertisement(&lease(Some("fe80::2:1")), Mac::from_bytes([2; 6]));
        assert_eq!(source, "fe80::2:1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(body[0], ROUTER_ADVERTISEMENT);
        assert_eq!(body[5], FLAG_MANAGED | FLAG_OTHER);
        assert_eq!(u16::from_be_bytes([body[6], body[7]]), 1800);
        let opts = options(&body);
        let kinds: Vec<u8> = opts.iter().map(|(k, _)| *k).collect();
        // No source link-layer address: the guest resolves the real gateway.
        assert_eq!(
            kinds,
            vec![OPTION_MTU, OPTION_PREFIX, OPTION_ROUTE, OPTION_RDNSS]
        );
        let (_, mtu) = opts[0];
        assert_eq!(u32::from_be_bytes(mtu[4..8].try_into().unwrap()), 1400);
        let (_, prefix) = opts[1];
        assert_eq!(
            (prefix[2], prefix[3]),
            (64, PREFIX_ON_LINK),
            "on-link, never SLAAC"
        );
        assert_eq!(&prefix[16..24], &[0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0]);
        let (_, route) = opts[2];
        assert_eq!((route[1], route[2]), (2, 48));
        assert_eq!(&route[8..14], &[0xfd, 0, 0, 9, 0, 0]);
        assert_eq!(opts[3].1.len(), 24);
    }

    #[test]
    fn without_a_gateway_it_is_no_default_router() {
        let (source, body) = advertisement(&lease(None), Mac::from_bytes([2; 6]));
        assert_eq!(
            source,
            "fe80::aa:bbff:fecc:ddee".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(u16::from_be_bytes([body[6], body[7]]), 0);
        let opts = options(&body);
        assert_eq!(
            opts[0],
            (OPTION_SOURCE_LINK_LAYER, &[1, 1, 2, 2, 2, 2, 2, 2][..])
        );
        assert!(opts.iter().all(|(k, _)| *k != OPTION_ROUTE));
    }
}
