//! What the VM gets over IPv6 (router advertisements and DHCPv6 IA_NA),
//! derived like the IPv4 lease only from the pod link's record, DNS and the
//! server's MAC: a restarted nicplug announces and leases the same again.
//!
//! KubeVirt's bridge binding gives the guest no IPv6 at all; here the guest
//! gets exactly the address IPAM gave the pod link, by DHCPv6, and router
//! advertisements that tell it to ask (M and O flags), the link's MTU, the
//! prefix as on-link (never for SLAAC: an address of the guest's own making
//! would not be the one the network allocated) and, when the pod link's
//! default route goes through a link-local gateway, that gateway as the
//! default router.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::Ipv6Net;

use super::lease::{Dns, LEASE_SECONDS};
use crate::model::route::TABLE_MAIN;
use crate::model::{Mac, PodLinkRecord, PodRoute};

/// How long the guest may use the default router a router advertisement
/// names (RFC 4861's default, 3 x the 600 s maximum advertisement
/// interval; nicplug advertises far more often, see [`super::task`]).
pub const ROUTER_LIFETIME_SECONDS: u16 = 1800;

/// The VM's IPv6 configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease6Config {
    /// The only client answered (by the frame's source MAC: DHCPv6 carries
    /// no hardware address of its own).
    pub client: Mac,
    /// The IA_NA address: the pod link's IPv6 address that IPAM gave.
    pub address: Ipv6Addr,
    pub prefix: u8,
    /// The default router advertised: the pod link's default route's
    /// gateway, when it is link-local (a router advertisement can only name
    /// its own source, which must be link-local, RFC 4861 4.2). `None`: the
    /// advertisements say "not a default router" (lifetime 0).
    pub router: Option<Ipv6Addr>,
    /// The prefix advertised as on-link (L=1, A=0); `None` for a
    /// link-local address, whose prefix is on-link by definition.
    pub on_link: Option<Ipv6Net>,
    /// More-specific routes through the router (RFC 4191 route information):
    /// the pod link's other main-table IPv6 routes via that gateway.
    pub routes: Vec<Ipv6Net>,
    pub mtu: u32,
    pub dns: Vec<Ipv6Addr>,
    pub search: Vec<String>,
    pub lease_seconds: u32,
    /// The server's own link-local address (EUI-64 of its MAC): the source
    /// of its DHCPv6 replies, and of its advertisements when there is no
    /// router to speak for.
    pub server: Ipv6Addr,
    /// The server's DUID (DUID-LL of its MAC, RFC 8415 11.4): stable across
    /// restarts, as the server identifier a client renews with must be.
    pub server_duid: Vec<u8>,
}

impl Lease6Config {
    /// The configuration for the record's IPv6 address that IPAM gave, `None`
    /// when it has none (see [`leased_address`]).
    pub fn from_record(
        record: &PodLinkRecord,
        client: Mac,
        server_mac: Mac,
        dns: &Dns,
    ) -> Option<Self> {
        let (address, prefix) = leased_address(record)?;
        let v6_routes: Vec<&PodRoute> = record
            .routes
            .iter()
            .filter(|r| !r.is_ipv4() && r.table == TABLE_MAIN)
            .collect();
        let gateway = |r: &PodRoute| match r.gateway {
            Some(IpAddr::V6(g)) => Some(g),
            _ => None,
        };
        let router = v6_routes
            .iter()
            .filter(|r| r.is_default())
            .min_by_key(|r| r.metric)
            .and_then(|r| gateway(r))
            .filter(Ipv6Addr::is_unicast_link_local);
        let routes = v6_routes
            .iter()
            .filter(|r| !r.is_default() && router.is_some() && gateway(r) == router)
            .filter_map(|r| match r.destination.addr {
                IpAddr::V6(dst) => Ipv6Net::new(dst, r.destination.prefix).ok(),
                IpAddr::V4(_) => None,
            })
            .map(|n| n.trunc())
            .collect();
        let on_link = (!address.is_unicast_link_local())
            .then(|| Ipv6Net::new(address, prefix).ok())
            .flatten()
            .map(|n| n.trunc());
        Some(Self {
            client,
            address,
            prefix,
            router,
            on_link,
            routes,
            mtu: record.mtu,
            dns: dns.servers6.clone(),
            search: dns.search.clone(),
            lease_seconds: LEASE_SECONDS,
            server: server_mac.eui64_link_local(),
            server_duid: duid_ll(server_mac),
        })
    }
}

/// The record's IPv6 address that IPAM gave: the first one that is not
/// link-local, else the first link-local one other than the kernel's own
/// (`fe80::` + the EUI-64 of the link's original MAC, what the kernel makes
/// when a link comes up). `None`: the pod link had no IPv6 of IPAM's.
///
/// A CNI handing out link-local IPv6 is unusual, but legal, and the test
/// rig does it (its traffic must stay link-local). A pod namespace that
/// generates link-local addresses otherwise (`addr_gen_mode` stable-privacy
/// or random) on an IPv4-only network makes the kernel's address look like
/// IPAM's: the guest is then offered that unused link-local address, which
/// conflicts with nothing (the pod link holds no address while enslaved).
pub fn leased_address(record: &PodLinkRecord) -> Option<(Ipv6Addr, u8)> {
    let kernels = record.mac.eui64_link_local();
    let v6: Vec<(Ipv6Addr, u8)> = record
        .addresses
        .iter()
        .filter_map(|c| match c.addr {
            IpAddr::V6(ip) => Some((ip, c.prefix)),
            IpAddr::V4(_) => None,
        })
        .collect();
    let global = v6
        .iter()
        .find(|(ip, _)| !ip.is_unicast_link_local() && !ip.is_multicast());
    global
        .or_else(|| {
            v6.iter()
                .find(|(ip, _)| ip.is_unicast_link_local() && *ip != kernels)
        })
        .copied()
}

/// DUID-LL (type 3, hardware type 1 = Ethernet) of `mac`.
fn duid_ll(mac: Mac) -> Vec<u8> {
    let mut duid = vec![0, 3, 0, 1];
    duid.extend_from_slice(&mac.octets());
    duid
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_MAC: &str = "0a:58:a9:fe:02:05";

    fn record(addresses: &[&str], routes: &[&str]) -> PodLinkRecord {
        PodLinkRecord {
            network: Some("blue".into()),
            mac: POD_MAC.parse().unwrap(),
            mtu: 1400,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            previous_alias: None,
        }
    }

    fn lease(addresses: &[&str], routes: &[&str]) -> Option<Lease6Config> {
        let dns = Dns {
            servers6: vec!["fd00::53".parse().unwrap()],
            search: vec!["a.test".into()],
            ..Dns::default()
        };
        Lease6Config::from_record(
            &record(addresses, routes),
            "02:00:00:00:00:09".parse().unwrap(),
            "02:aa:bb:cc:dd:ee".parse().unwrap(),
            &dns,
        )
    }

    #[test]
    fn the_kernels_link_local_address_is_no_lease() {
        assert_eq!(
            POD_MAC.parse::<Mac>().unwrap().eui64_link_local(),
            "fe80::858:a9ff:fefe:205".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            lease(&["169.254.2.5/24", "fe80::858:a9ff:fefe:205/64"], &[]),
            None
        );
        assert_eq!(lease(&[], &[]), None);
    }

    #[test]
    fn a_global_address_wins_and_its_prefix_is_on_link() {
        let l = lease(
            &[
                "fe80::858:a9ff:fefe:205/64",
                "fe80::2:5/64",
                "2001:db8:2::5/64",
            ],
            &["::/0>2001:db8:2::1"],
        )
        .unwrap();
        assert_eq!(l.address, "2001:db8:2::5".parse::<Ipv6Addr>().unwrap());
        assert_eq!(l.prefix, 64);
        assert_eq!(l.on_link, Some("2001:db8:2::/64".parse().unwrap()));
        // A global gateway cannot be advertised as the default router.
        assert_eq!(l.router, None);
        assert_eq!(l.dns, vec!["fd00::53".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(
            l.server,
            "fe80::aa:bbff:fecc:ddee".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            l.server_duid,
            vec![0, 3, 0, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]
        );
    }

    #[test]
    fn an_ipam_link_local_address_with_a_link_local_gateway() {
        let l = lease(
            &["fe80::858:a9ff:fefe:205/64", "fe80::2:5/64"],
            &[
                "::/0>fe80::2:1",
                "fd00:9::/48>fe80::2:1",
                "fd00:8::/48>fe80::2:7",
                "::/0>fe80::2:9~t100",
            ],
        )
        .unwrap();
        assert_eq!(l.address, "fe80::2:5".parse::<Ipv6Addr>().unwrap());
        assert_eq!(l.on_link, None);
        assert_eq!(l.router, Some("fe80::2:1".parse().unwrap()));
        // Only routes through the advertised router, main table only.
        assert_eq!(l.routes, vec!["fd00:9::/48".parse::<Ipv6Net>().unwrap()]);
        assert_eq!(l.mtu, 1400);
    }
}
