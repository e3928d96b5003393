//! A route whose output link is a pod link, as the pod link's record keeps
//! it: CNI put it there, and the kernel drops it when nicplug flushes the
//! link's addresses, so release must add it again.
//!
//! Record encoding (one route, no spaces or commas):
//! `DST/LEN[>GATEWAY][~tTABLE][~pPROTOCOL][~sSCOPE][~mMETRIC][~fPREFSRC][~rPREF][~o]`,
//! e.g. `169.254.255.2/32>169.254.2.1` or `0.0.0.0/0>169.254.2.1~t100`.
//! A tag is only written when the value differs from what `ip route add`
//! (and CNI's netlink library) would use anyway: table main (254), protocol
//! boot (3), scope universe with a gateway and link without (IPv4; IPv6 is
//! always universe), metric 0 (IPv4) or 1024 (IPv6), preference medium (0),
//! no preferred source, not onlink. That keeps a typical record far below
//! the 255 bytes an ifalias holds.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

use super::cidr::IpCidr;

/// A record's route that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed route {0:?} in nicplug record")]
pub struct RouteError(pub String);

/// The main routing table (RT_TABLE_MAIN).
pub const TABLE_MAIN: u32 = 254;
/// RTPROT_BOOT: what `ip route add` and CNI plugins set.
pub const PROTOCOL_BOOT: u8 = 3;
/// RT_SCOPE_UNIVERSE.
pub const SCOPE_UNIVERSE: u8 = 0;
/// RT_SCOPE_LINK.
pub const SCOPE_LINK: u8 = 253;
/// ICMPV6_ROUTER_PREF_MEDIUM, the preference of every IPv6 route not
/// learned from a router advertisement.
pub const PREF_MEDIUM: u8 = 0;

/// One unicast route through the pod link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PodRoute {
    pub destination: IpCidr,
    pub gateway: Option<IpAddr>,
    pub table: u32,
    pub protocol: u8,
    pub scope: u8,
    /// RTA_PRIORITY.
    pub metric: u32,
    /// RTA_PREFSRC.
    pub preferred_source: Option<IpAddr>,
    /// RTA_PREF (IPv6 only).
    pub preference: u8,
    /// RTNH_F_ONLINK: the gateway is on the link without a connected route.
    pub onlink: bool,
}

impl PodRoute {
    /// A route with every optional value at its default (see the module
    /// documentation).
    pub fn new(destination: IpCidr, gateway: Option<IpAddr>) -> Self {
        let mut route = Self {
            destination,
            gateway,
            table: TABLE_MAIN,
            protocol: PROTOCOL_BOOT,
            scope: SCOPE_UNIVERSE,
            metric: 0,
            preferred_source: None,
            preference: PREF_MEDIUM,
            onlink: false,
        };
        route.scope = route.default_scope();
        route.metric = route.default_metric();
        route
    }

    pub fn is_ipv4(&self) -> bool {
        self.destination.addr.is_ipv4()
    }

    /// The scope the kernel gives a route added without one.
    pub fn default_scope(&self) -> u8 {
        if self.is_ipv4() && self.gateway.is_none() {
            SCOPE_LINK
        } else {
            SCOPE_UNIVERSE
        }
    }

    /// The metric the kernel gives a route added without one.
    pub fn default_metric(&self) -> u32 {
        if self.is_ipv4() { 0 } else { 1024 }
    }

    /// Whether this is a default route (`0.0.0.0/0` or `::/0`).
    pub fn is_default(&self) -> bool {
        self.destination.prefix == 0
    }
}

impl fmt::Display for PodRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, ">{gateway}")?;
        }
        if self.table != TABLE_MAIN {
            write!(f, "~t{}", self.table)?;
        }
        if self.protocol != PROTOCOL_BOOT {
            write!(f, "~p{}", self.protocol)?;
        }
        if self.scope != self.default_scope() {
            write!(f, "~s{}", self.scope)?;
        }
        if self.metric != self.default_metric() {
            write!(f, "~m{}", self.metric)?;
        }
        if let Some(source) = self.preferred_source {
            write!(f, "~f{source}")?;
        }
        if self.preference != PREF_MEDIUM {
            write!(f, "~r{}", self.preference)?;
        }
        if self.onlink {
            write!(f, "~o")?;
        }
        Ok(())
    }
}

impl FromStr for PodRoute {
    type Err = RouteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RouteError(s.to_string());
        let mut parts = s.split('~');
        let head = parts.next().ok_or_else(bad)?;
        let (destination, gateway) = match head.split_once('>') {
            Some((dst, gw)) => (dst, Some(gw.parse::<IpAddr>().map_err(|_| bad())?)),
            None => (head, None),
        };
        let destination: IpCidr = destination.parse().map_err(|_| bad())?;
        let same_family = |ip: &IpAddr| ip.is_ipv4() == destination.addr.is_ipv4();
        if gateway.as_ref().is_some_and(|g| !same_family(g)) {
            return Err(bad());
        }
        let mut route = Self::new(destination, gateway);
        let mut seen = Vec::new();
        for tag in parts {
            let mut chars = tag.chars();
            let key = chars.next().ok_or_else(bad)?;
            let value = chars.as_str();
            if seen.contains(&key) {
                return Err(bad());
            }
            seen.push(key);
            match key {
                't' => route.table = value.parse().map_err(|_| bad())?,
                'p' => route.protocol = value.parse().map_err(|_| bad())?,
                's' => route.scope = value.parse().map_err(|_| bad())?,
                'm' => route.metric = value.parse().map_err(|_| bad())?,
                'f' => {
                    let source: IpAddr = value.parse().map_err(|_| bad())?;
                    if !same_family(&source) {
                        return Err(bad());
                    }
                    route.preferred_source = Some(source);
                }
                'r' => route.preference = value.parse().map_err(|_| bad())?,
                'o' if value.is_empty() => route.onlink = true,
                _ => return Err(bad()),
            }
        }
        // RT_TABLE_UNSPEC (0) is no table a route can be in.
        if route.table == 0 {
            return Err(bad());
        }
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_not_written() {
        let route = PodRoute::new(
            "169.254.255.2/32".parse().unwrap(),
            Some("169.254.2.1".parse().unwrap()),
        );
        assert_eq!(route.to_string(), "169.254.255.2/32>169.254.2.1");
        assert_eq!(route.scope, SCOPE_UNIVERSE);
        let direct = PodRoute::new("169.254.9.0/24".parse().unwrap(), None);
        assert_eq!(direct.scope, SCOPE_LINK);
        assert_eq!(direct.to_string(), "169.254.9.0/24");
        let v6 = PodRoute::new("fd00:1::/64".parse().unwrap(), None);
        assert_eq!((v6.scope, v6.metric), (SCOPE_UNIVERSE, 1024));
        assert_eq!(v6.to_string(), "fd00:1::/64");
    }

    #[test]
    fn every_tag_round_trips() {
        let route = PodRoute {
            destination: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("169.254.2.1".parse().unwrap()),
            table: 100,
            protocol: 4,
            scope: 200,
            metric: 50,
            preferred_source: Some("169.254.2.5".parse().unwrap()),
            preference: 1,
            onlink: true,
        };
        let text = route.to_string();
        assert_eq!(
            text,
            "0.0.0.0/0>169.254.2.1~t100~p4~s200~m50~f169.254.2.5~r1~o"
        );
        assert_eq!(text.parse::<PodRoute>().unwrap(), route);
    }

    #[test]
    fn refuses_what_is_not_a_route() {
        for bad in [
            "",
            "169.254.1.0",
            "169.254.1.0/24>fe80::1",
            "fd00::/64~f169.254.1.1",
            "169.254.1.0/24~t0",
            "169.254.1.0/24~t1~t2",
            "169.254.1.0/24~x1",
            "169.254.1.0/24~ox",
            "169.254.1.0/24~m",
            "169.254.1.0/24~p300",
        ] {
            assert!(bad.parse::<PodRoute>().is_err(), "{bad:?} parsed");
        }
    }
}
