//! What nicplug must give back to a pod link when it releases it, kept in the
//! link's own `ifalias` so it survives a nicplug crash or restart and dies
//! with the link (no state file can go stale).
//!
//! Format (at most 255 bytes, the kernel's IFALIASZ - 1):
//! `nicplug/v2 net=blue mac=02:00:00:00:00:01 mtu=1500 addr=169.254.1.5/24,fe80::1/64 rt=169.254.255.2/32>169.254.1.1 was=<original alias>`
//! `net=`, `addr=`, `rt=` and `was=` are optional; `was=` is last and takes the rest of the line.
//! `net=` names the VMI network, so plumbing whose network left the spec can
//! still be found and removed. `rt=` lists the routes through the link that
//! the kernel does not recreate with the addresses (see [`super::route`]).
//!
//! Versions: `nicplug/v1` is the same format without `rt=`. A record without
//! routes is still written as `v1`, byte for byte what earlier nicplug
//! versions wrote and read; one with routes is `v2`, which a v1 reader
//! refuses as a whole instead of dropping the routes silently. Both are read.

use super::cidr::{CidrError, IpCidr};
use super::names::{Mac, NameError, check_network_name};
use super::route::{PodRoute, RouteError};

/// A record without routes.
const MAGIC_V1: &str = "nicplug/v1";
/// A record with routes (`rt=`).
const MAGIC_V2: &str = "nicplug/v2";
/// The kernel truncates aliases longer than this.
pub const MAX_ALIAS_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not a nicplug record")]
    NotARecord,
    #[error("malformed nicplug record field {0:?}")]
    Field(String),
    #[error("record misses field {0}")]
    Missing(&'static str),
    #[error("record of {len} bytes does not fit into an ifalias ({MAX_ALIAS_LEN} bytes)")]
    TooLong { len: usize },
    #[error(transparent)]
    Cidr(#[from] CidrError),
    #[error("network name {0:?} cannot be recorded")]
    Network(String, #[source] NameError),
    #[error("field {0} appears twice")]
    Duplicate(&'static str),
    #[error("mtu={0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u32),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("a nicplug/v1 record cannot have routes (rt=)")]
    RoutesInV1,
}

/// The smallest MTU an IPv4 link may have (RFC 791) and the largest the
/// kernel gives an Ethernet link (ETH_MAX_MTU): anything else in a record
/// was not read from a real pod link.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535;

/// The original state of a pod link that nicplug enslaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLinkRecord {
    /// The VMI network the link was plumbed for.
    pub network: Option<String>,
    pub mac: Mac,
    pub mtu: u32,
    pub addresses: Vec<IpCidr>,
    /// The routes through the link that release must add again.
    pub routes: Vec<PodRoute>,
    /// The alias the link had before nicplug wrote its record, if any.
    pub previous_alias: Option<String>,
}

impl PodLinkRecord {
    /// Whether an ifalias value is a nicplug record (of any version).
    pub fn is_record(alias: &str) -> bool {
        alias.starts_with("nicplug/")
    }

    /// The ifalias value, or an error if it would not fit.
    pub fn to_alias(&self) -> Result<String, RecordError> {
        let mut out = if self.routes.is_empty() {
            MAGIC_V1
        } else {
            MAGIC_V2
        }
        .to_string();
        if let Some(network) = &self.network {
            check_network_name("network name", network)
                .map_err(|e| RecordError::Network(network.clone(), e))?;
            out.push_str(" net=");
            out.push_str(network);
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(RecordError::Mtu(self.mtu));
        }
        out.push_str(&format!(" mac={} mtu={}", self.mac, self.mtu));
        if !self.addresses.is_empty() {
            let addrs: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
            out.push_str(" addr=");
            out.push_str(&addrs.join(","));
        }
        if !self.routes.is_empty() {
            let routes: Vec<String> = self.routes.iter().map(ToString::to_string).collect();
            out.push_str(" rt=");
            out.push_str(&routes.join(","));
        }
        if let Some(previous) = &self.previous_alias {
            out.push_str(" was=");
            out.push_str(previous);
        }
        if out.len() > MAX_ALIAS_LEN {
            return Err(RecordError::TooLong { len: out.len() });
        }
        Ok(out)
    }

    pub fn from_alias(alias: &str) -> Result<Self, RecordError> {
        let (version, rest) = [MAGIC_V1, MAGIC_V2]
            .into_iter()
            .find_map(|magic| {
                let rest = alias.strip_prefix(magic)?.strip_prefix(' ')?;
                Some((magic, rest))
            })
            .ok_or(RecordError::NotARecord)?;
        let (fields, previous_alias) = match rest.split_once(" was=") {
            Some((fields, was)) => (fields, Some(was.to_string())),
            None => (rest, None),
        };
        let (mut network, mut mac, mut mtu, mut addresses) = (None, None, None, None);
        let mut routes = None;
        fn set<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), RecordError> {
            if slot.replace(value).is_some() {
                return Err(RecordError::Duplicate(name));
            }
            Ok(())
        }
        for field in fields.split(' ') {
            let bad = || RecordError::Field(field.to_string());
            match field.split_once('=').ok_or_else(bad)? {
                ("net", v) => {
                    check_network_name("network name", v)
                        .map_err(|e| RecordError::Network(v.to_string(), e))?;
                    set(&mut network, "net", v.to_string())?;
                }
                ("mac", v) => set(&mut mac, "mac", v.parse::<Mac>().map_err(|_| bad())?)?,
                ("mtu", v) => {
                    let value = v.parse::<u32>().map_err(|_| bad())?;
                    if !(MIN_MTU..=MAX_MTU).contains(&value) {
                        return Err(RecordError::Mtu(value));
                    }
                    set(&mut mtu, "mtu", value)?;
                }
                ("addr", v) => {
                    let list = v.split(',').map(str::parse).collect::<Result<_, _>>()?;
                    set(&mut addresses, "addr", list)?;
                }
                ("rt", _) if version == MAGIC_V1 => return Err(RecordError::RoutesInV1),
                ("rt", v) => {
                    let list = v.split(',').map(str::parse).collect::<Result<_, _>>()?;
                    set(&mut routes, "rt", list)?;
                }
                _ => return Err(bad()),
            }
        }
        let addresses = addresses.unwrap_or_default();
        Ok(Self {
            network,
            mac: mac.ok_or(RecordError::Missing("mac"))?,
            mtu: mtu.ok_or(RecordError::Missing("mtu"))?,
            addresses,
            routes: routes.unwrap_or_default(),
            previous_alias,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> PodLinkRecord {
        PodLinkRecord {
            network: Some("dyniface1".into()),
            mac: "0a:58:a9:fe:01:05".parse().unwrap(),
            mtu: 1400,
            addresses: vec![
                "169.254.1.5/24".parse().unwrap(),
                "fe80::858:a9ff:fefe:105/64".parse().unwrap(),
            ],
            routes: vec![],
            previous_alias: None,
        }
    }

    #[test]
    fn round_trip() {
        let alias = record().to_alias().unwrap();
        assert_eq!(
            alias,
            "nicplug/v1 net=dyniface1 mac=0a:58:a9:fe:01:05 mtu=1400 addr=169.254.1.5/24,fe80::858:a9ff:fefe:105/64"
        );
        assert_eq!(PodLinkRecord::from_alias(&alias).unwrap(), record());
    }

    #[test]
    fn routes_make_a_v2_record_and_v1_stays_readable() {
        let mut rec = record();
        rec.routes = vec![
            "169.254.255.2/32>169.254.1.1".parse().unwrap(),
            "0.0.0.0/0>169.254.1.1~t100".parse().unwrap(),
        ];
        let alias = rec.to_alias().unwrap();
        assert_eq!(
            alias,
            "nicplug/v2 net=dyniface1 mac=0a:58:a9:fe:01:05 mtu=1400 addr=169.254.1.5/24,fe80::858:a9ff:fefe:105/64 rt=169.254.255.2/32>169.254.1.1,0.0.0.0/0>169.254.1.1~t100"
        );
        assert_eq!(PodLinkRecord::from_alias(&alias).unwrap(), rec);
        // What nicplug before routes wrote.
        let old = "nicplug/v1 net=dyniface1 mac=0a:58:a9:fe:01:05 mtu=1400 addr=169.254.1.5/24,fe80::858:a9ff:fefe:105/64";
        assert_eq!(PodLinkRecord::from_alias(old).unwrap(), record());
        assert_eq!(
            PodLinkRecord::from_alias(&format!("{old} rt=169.254.9.0/24")),
            Err(RecordError::RoutesInV1)
        );
        assert!(matches!(
            PodLinkRecord::from_alias("nicplug/v2 mac=0a:58:a9:fe:01:05 mtu=1400 rt=169.254.9.0"),
            Err(RecordError::Route(RouteError(r))) if r == "169.254.9.0"
        ));
    }

    #[test]
    fn keeps_a_previous_alias_verbatim() {
        let mut rec = record();
        rec.addresses.clear();
        rec.previous_alias = Some("uplink to rack 7 was=x".into());
        let alias = rec.to_alias().unwrap();
        assert_eq!(PodLinkRecord::from_alias(&alias).unwrap(), rec);
    }

    #[test]
    fn rejects_what_does_not_fit_or_parse() {
        let mut rec = record();
        rec.addresses = (0..20)
            .map(|i| format!("fe80::{i}:1:2:3/64").parse().unwrap())
            .collect();
        assert!(matches!(rec.to_alias(), Err(RecordError::TooLong { .. })));
        assert_eq!(
            PodLinkRecord::from_alias("uplink"),
            Err(RecordError::NotARecord)
        );
        assert_eq!(
            PodLinkRecord::from_alias("nicplug/v1 mtu=1500"),
            Err(RecordError::Missing("mac"))
        );
        assert!(PodLinkRecord::from_alias("nicplug/v1 mac=zz mtu=1500").is_err());
        assert!("169.254.1.1/33".parse::<IpCidr>().is_err());
        let rec = PodLinkRecord {
            network: Some("a b".into()),
            ..record()
        };
        assert!(matches!(rec.to_alias(), Err(RecordError::Network(n, _)) if n == "a b"));
        let rec = PodLinkRecord {
            network: Some(String::new()),
            ..record()
        };
        let message = rec.to_alias().unwrap_err();
        assert!(matches!(
            message,
            RecordError::Network(_, NameError::Empty { .. })
        ));
    }
}
