//! What the DHCPv4 server hands a VM, derived only from the pod link's
//! record (the crash-safe state) plus DNS and the VMI name: a restarted
//! nicplug derives the same lease again, so a guest renewing across the
//! restart keeps its address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;

use crate::model::route::TABLE_MAIN;
use crate::model::{Mac, PodLinkRecord, PodRoute};

/// Lease time offered: one day. Nothing is lost when a lease expires
/// (the address is the pod link's for the pod's life), so a long lease only
/// means fewer renewals; T1/T2 are the RFC 2131 defaults (1/2 and 7/8).
pub const LEASE_SECONDS: u32 = 86_400;

/// The server's own address when the pod link had no gateway: link-local,
/// KubeVirt's choice for its bridge-binding server (`169.254.75.1x`).
pub const FALLBACK_SERVER_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 75, 1);

/// DNS the guest gets: from Multus' network-status `dns` field when it has
/// one, else from the pod's resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    /// For DHCPv4 (option 6).
    pub servers: Vec<Ipv4Addr>,
    /// For DHCPv6 (option 23).
    pub servers6: Vec<Ipv6Addr>,
    pub search: Vec<String>,
}

impl Dns {
    /// DNS for pod interface `pod`: its Multus network-status entry's `dns`
    /// when that names a server (what CNI returned for this network), else
    /// `pod_default` (the pod's resolv.conf, as KubeVirt does).
    pub fn for_interface(
        network_status: &[crate::model::network_status::NetworkStatus],
        pod: &str,
        pod_default: &Dns,
    ) -> Dns {
        let entry = network_status
            .iter()
            .find(|s| s.interface.as_deref() == Some(pod));
        let named: Vec<IpAddr> = entry
            .map(|e| e.dns_servers())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        match entry {
            Some(e) if !named.is_empty() => {
                let (servers, servers6) = split_families(&named);
                Dns {
                    servers,
                    servers6,
                    search: e.dns_search(),
                }
            }
            _ => pod_default.clone(),
        }
    }

    /// Reads `nameserver` and `search` lines of a resolv.conf.
    pub fn from_resolv_conf(text: &str) -> Self {
        let mut dns = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => match words.next().map(str::parse::<IpAddr>) {
                    Some(Ok(IpAddr::V4(ip))) => dns.servers.push(ip),
                    Some(Ok(IpAddr::V6(ip))) => dns.servers6.push(ip),
                    _ => {}
                },
                Some("search") | Some("domain") => {
                    dns.search = words.map(String::from).collect();
                }
                _ => {}
            }
        }
        dns
    }
}

fn split_families(ips: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in ips {
        match ip {
            IpAddr::V4(ip) => v4.push(*ip),
            IpAddr::V6(ip) => v6.push(*ip),
        }
    }
    (v4, v6)
}

/// One VM's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The only client answered.
    pub client: Mac,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// Option 3: the default route's gateway, else the first gateway
    /// route's.
    pub router: Option<Ipv4Addr>,
    /// Option 121 (RFC 3442): the other IPv4 routes of the main table
    /// (a direct route has router 0.0.0.0), with the default route first
    /// when there is a router, since a client that takes option 121
    /// ignores option 3.
    pub classless_routes: Vec<(Ipv4Net, Ipv4Addr)>,
    pub mtu: u16,
    pub dns: Dns,
    pub hostname: Option<String>,
    pub lease_seconds: u32,
    /// Option 54 and the source of every reply.
    pub server: Ipv4Addr,
}

impl LeaseConfig {
    /// The lease for the pod link's first IPv4 address, `None` when it had
    /// none (an L2 network: no server). Any IPv4 address counts: the kernel
    /// makes none of its own on a pod link, so each one came from IPAM
    /// (a 169.254.0.0/16 one too, as on the test rig). IPv6 is
    /// [`super::lease6`]'s.
    pub fn from_record(
        record: &PodLinkRecord,
        client: Mac,
        dns: Dns,
        hostname: Option<String>,
    ) -> Option<Self> {
        let (address, prefix) = record.addresses.iter().find_map(|c| match c.addr {
            IpAddr::V4(v4) => Some((v4, c.prefix)),
            IpAddr::V6(_) => None,
        })?;
        let v4_gateway = |r: &PodRoute| match r.gateway {
            Some(IpAddr::V4(g)) => Some(g),
            _ => None,
        };
        let v4_routes: Vec<&PodRoute> = record.routes.iter().filter(|r| r.is_ipv4()).collect();
        let default_route = v4_routes
            .iter()
            .filter(|r| r.is_default())
            .min_by_key(|r| (r.table != TABLE_MAIN, r.metric));
        let router = default_route
            .and_then(|r| v4_gateway(r))
            .or_else(|| v4_routes.iter().find_map(|r| v4_gateway(r)));
        let mut classless_routes = Vec::new();
        if let Some(router) = router {
            classless_routes.push((Ipv4Net::default(), router));
        }
        for route in v4_routes
            .iter()
            .filter(|r| r.table == TABLE_MAIN && !r.is_default())
        {
            let IpAddr::V4(dst) = route.destination.addr else {
                continue;
            };
            let Ok(net) = Ipv4Net::new(dst, route.destination.prefix) else {
                continue;
            };
            classless_routes.push((
                net.trunc(),
                v4_gateway(route).unwrap_or(Ipv4Addr::UNSPECIFIED),
            ));
        }
        Some(Self {
            client,
            address,
            prefix,
            router,
            classless_routes,
            mtu: u16::try_from(record.mtu).unwrap_or(u16::MAX),
            dns,
            hostname,
            lease_seconds: LEASE_SECONDS,
            server: router.unwrap_or(FALLBACK_SERVER_ADDRESS),
        })
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Net::new(self.address, self.prefix)
            .map(|n| n.netmask())
            .unwrap_or(Ipv4Addr::BROADCAST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(routes: &[&str]) -> PodLinkRecord {
        PodLinkRecord {
            network: Some("blue".into()),
            mac: "0a:58:a9:fe:02:05".parse().unwrap(),
            mtu: 1400,
            addresses: vec![
                "fe80::858:a9ff:fefe:205/64".parse().unwrap(),
                "169.254.2.5/24".parse().unwrap(),
            ],
            routes: routes.iter().map(|r| r.parse().unwrap()).collect(),
            previous_alias: None,
        }
    }

    fn lease(routes: &[&str]) -> Option<LeaseConfig> {
        LeaseConfig::from_record(
            &record(routes),
            "02:00:00:00:00:09".parse().unwrap(),
            Dns::default(),
            Some("vmi-1".into()),
        )
    }

    #[test]
    fn a_gateway_route_gives_the_router_and_option_121() {
        let l = lease(&["169.254.255.2/32>169.254.2.1", "169.254.9.0/24"]).unwrap();
        assert_eq!((l.address, l.prefix), (Ipv4Addr::new(169, 254, 2, 5), 24));
        assert_eq!(l.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(l.router, Some(Ipv4Addr::new(169, 254, 2, 1)));
        assert_eq!(l.server, Ipv4Addr::new(169, 254, 2, 1));
        assert_eq!(
            l.classless_routes,
            vec![
                ("0.0.0.0/0".parse().unwrap(), Ipv4Addr::new(169, 254, 2, 1)),
                (
                    "169.254.255.2/32".parse().unwrap(),
                    Ipv4Addr::new(169, 254, 2, 1)
                ),
                ("169.254.9.0/24".parse().unwrap(), Ipv4Addr::UNSPECIFIED),
            ]
        );
        assert_eq!(l.mtu, 1400);
    }

    #[test]
    fn the_default_route_wins_over_other_gateways_and_tables() {
        let l = lease(&[
            "169.254.255.2/32>169.254.2.7",
            "0.0.0.0/0>169.254.2.9~t100",
            "0.0.0.0/0>169.254.2.1",
        ])
        .unwrap();
        assert_eq!(l.router, Some(Ipv4Addr::new(169, 254, 2, 1)));
        // Only main-table routes are the guest's routes.
        assert_eq!(l.classless_routes.len(), 2, "{:?}", l.classless_routes);
    }

    #[test]
    fn no_gateway_uses_the_fallback_server_and_no_ipv4_no_lease() {
        let l = lease(&[]).unwrap();
        assert_eq!(l.router, None);
        assert!(l.classless_routes.is_empty());
        assert_eq!(l.server, FALLBACK_SERVER_ADDRESS);
        let mut l2 = record(&[]);
        l2.addresses.retain(|a| a.addr.is_ipv6());
        assert_eq!(
            LeaseConfig::from_record(&l2, l2.mac, Dns::default(), None),
            None
        );
    }

    #[test]
    fn network_status_dns_wins_over_the_pods_resolv_conf() {
        let statuses = crate::model::network_status::parse(
            r#"[{"name":"ns/a","interface":"pod1","dns":{"nameservers":["10.1.0.53","fd00::53"],"search":["a.test"]}},
                {"name":"ns/b","interface":"pod2","dns":{}},
                {"name":"ns/c","interface":"pod3","dns":{"nameservers":"not a list"}}]"#,
        )
        .unwrap();
        let pod = Dns {
            servers: vec![Ipv4Addr::new(10, 96, 0, 10)],
            servers6: vec![],
            search: vec!["svc.cluster.local".into()],
        };
        let a = Dns::for_interface(&statuses, "pod1", &pod);
        assert_eq!(a.servers, vec![Ipv4Addr::new(10, 1, 0, 53)]);
        assert_eq!(a.servers6, vec!["fd00::53".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(a.search, vec!["a.test"]);
        assert_eq!(Dns::for_interface(&statuses, "pod2", &pod), pod);
        assert_eq!(Dns::for_interface(&statuses, "pod3", &pod), pod);
        assert_eq!(Dns::for_interface(&statuses, "pod9", &pod), pod);
    }

    #[test]
    fn resolv_conf() {
        let dns = Dns::from_resolv_conf(
            "# k8s\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5\n",
        );
        assert_eq!(dns.servers, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(dns.servers6, vec!["fd00::10".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(
            dns.search,
            vec!["default.svc.cluster.local", "svc.cluster.local"]
        );
    }
}
