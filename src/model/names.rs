//! Validated identifiers: Linux interface names and MAC addresses, and the
//! names KubeVirt derives from a VMI network (pod interface, bridge, tap).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("interface name is empty")]
    IfNameEmpty,
    #[error("interface name {0:?} is longer than 15 bytes or is '.' or '..'")]
    IfNameLength(String),
    #[error("interface name {0:?} contains '/', ':', whitespace or a control character")]
    IfNameChars(String),
    #[error("invalid MAC address {0:?}: expected six hex octets separated by ':' or '-'")]
    Mac(String),
    #[error("MAC address {0} is a multicast address")]
    MacMulticast(String),
    #[error("MAC address {0} is all zeros")]
    MacZero(String),
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {value:?} is longer than {max} bytes")]
    TooLong {
        what: &'static str,
        value: String,
        max: usize,
    },
    #[error("{what} {value:?} {rule}")]
    Chars {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
}

/// A Linux network interface name: 1 to 15 bytes, none of `/`, `:`, whitespace
/// or control characters, and neither `.` nor `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::IfNameEmpty);
        }
        if name.len() > MAX_IFNAME_LEN || name == "." || name == ".." {
            return Err(NameError::IfNameLength(name));
        }
        if name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(NameError::IfNameChars(name));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for IfName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for IfName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for IfName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// A unicast Ethernet MAC address. Parses `aa:bb:..` and `aa-bb-..` in any
/// case; always prints lowercase with colons (libvirt's and KubeVirt's form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac([u8; 6]);

impl Mac {
    pub const fn from_bytes(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// A stable locally administered unicast MAC derived from `seed`: the same
    /// seed always gives the same MAC, so a retried or restarted plan computes
    /// the same value and steps stay idempotent.
    pub fn locally_administered_from(seed: &str) -> Self {
        let digest = Sha256::digest(seed.as_bytes());
        let mut bytes = [0u8; 6];
        bytes.copy_from_slice(&digest[..6]);
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        Self(bytes)
    }

    /// `fe80::` + the modified EUI-64 of this MAC (RFC 4291 appendix A):
    /// the link-local address the kernel gives a link with this MAC when it
    /// comes up (`addr_gen_mode eui64`, the default).
    pub fn eui64_link_local(&self) -> std::net::Ipv6Addr {
        let m = self.0;
        std::net::Ipv6Addr::from([
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            m[0] ^ 0x02,
            m[1],
            m[2],
            0xff,
            0xfe,
            m[3],
            m[4],
            m[5],
        ])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for Mac {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(NameError::Mac(s.to_string()));
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(&parts) {
            // from_str_radix alone would take "+f" as 15.
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(NameError::Mac(s.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| NameError::Mac(s.to_string()))?;
        }
        let mac = Self(bytes);
        // Broadcast is multicast too; the kernel refuses both and zero
        // (is_valid_ether_addr) as a device address.
        if mac.is_multicast() {
            return Err(NameError::MacMulticast(mac.to_string()));
        }
        if bytes == [0; 6] {
            return Err(NameError::MacZero(mac.to_string()));
        }
        Ok(mac)
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// KubeVirt's prefix of hashed pod interface names.
const HASHED_PREFIX: &str = "pod";

/// KubeVirt's hashed pod interface name of a secondary network:
/// `"pod" + hex(sha256(network))[..11]`.
pub fn hashed_pod_iface(network: &str) -> IfName {
    let digest: String = Sha256::digest(network.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    IfName(format!("{HASHED_PREFIX}{}", &digest[..11]))
}

/// KubeVirt's legacy ordinal pod interface name: `net1`, `net2`, ... by the
/// 1-based position of the network among the secondary Multus networks.
pub fn ordinal_pod_iface(position: usize) -> IfName {
    IfName(format!("net{position}"))
}

/// Whether `name` has the shape of a legacy ordinal pod interface (`netN`).
pub fn is_ordinal_pod_iface(name: &str) -> bool {
    name.strip_prefix("net")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The links of one network's bridge binding, named as KubeVirt names them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlumbingNames {
    /// The interface CNI put into the pod (`podH` or `netN`).
    pub pod: IfName,
    /// The in-pod bridge, `k6t-H` (`k6t-netN` for ordinal names).
    pub bridge: IfName,
    /// QEMU's tap, `tapH` (`tapN` for ordinal names).
    pub tap: IfName,
    /// KubeVirt's own name for the renamed pod link (`H-nic`); nicplug never
    /// creates it, but recognises it as KubeVirt's layout.
    pub kubevirt_renamed_pod: IfName,
}

impl PlumbingNames {
    pub fn for_pod_iface(pod: &IfName) -> Self {
        let trimmed = pod
            .as_str()
            .strip_prefix(HASHED_PREFIX)
            .unwrap_or(pod.as_str());
        // The tap drops the first three characters (`pod`, `net` or
        // whatever a foreign name starts with): by character, not by byte, so
        // a non-ASCII name (the kernel allows them) cannot split a character.
        let after_prefix = pod
            .as_str()
            .char_indices()
            .nth(3)
            .map_or("", |(at, _)| &pod.as_str()[at..]);
        // The pod name is at most 15 bytes, so `tapX` fits, but `k6t-X` and
        // `X-nic` of a long legacy name do not: truncate those.
        Self {
            pod: pod.clone(),
            bridge: IfName(truncated(format!("k6t-{trimmed}"))),
            tap: IfName(truncated(format!("tap{after_prefix}"))),
            kubevirt_renamed_pod: IfName(truncated(format!("{trimmed}-nic"))),
        }
    }
}

/// `name` cut to at most [`MAX_IFNAME_LEN`] bytes on a character boundary
/// (`String::truncate` panics inside a character).
fn truncated(mut name: String) -> String {
    let end = name.floor_char_boundary(MAX_IFNAME_LEN);
    name.truncate(end);
    name
}

/// Longest Kubernetes object name (a DNS-1123 subdomain).
pub const MAX_OBJECT_NAME_LEN: usize = 253;
/// Longest DNS-1123 label: namespaces, and the cap nicplug puts on VMI
/// interface and network names.
pub const MAX_LABEL_LEN: usize = 63;

/// Checks a Kubernetes object name (`metadata.name`): a DNS-1123 subdomain,
/// lowercase alphanumerics, '-' and '.', starting and ending with an
/// alphanumeric, at most 253 bytes.
pub fn check_object_name(what: &'static str, value: &str) -> Result<(), NameError> {
    check_dns1123(what, value, MAX_OBJECT_NAME_LEN, true)
}

/// Checks a namespace: a DNS-1123 label, at most 63 bytes.
pub fn check_namespace(what: &'static str, value: &str) -> Result<(), NameError> {
    check_dns1123(what, value, MAX_LABEL_LEN, false)
}

fn check_dns1123(what: &'static str, value: &str, max: usize, dots: bool) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > max {
        return Err(NameError::TooLong {
            what,
            value: value.to_string(),
            max,
        });
    }
    let inner_ok =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.');
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = value.as_bytes();
    let labels_ok = !dots
        || value.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().next().is_some_and(edge_ok)
                && l.bytes().last().is_some_and(edge_ok)
        });
    if !bytes.iter().all(|&b| inner_ok(b))
        || !bytes.first().is_some_and(|&b| edge_ok(b))
        || !bytes.last().is_some_and(|&b| edge_ok(b))
        || !labels_ok
    {
        return Err(NameError::Chars {
            what,
            value: value.to_string(),
            rule: if dots {
                "is not a DNS-1123 subdomain: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
            } else {
                "is not a DNS-1123 label: use lowercase letters, digits and '-', starting and ending with a letter or digit"
            },
        });
    }
    Ok(())
}

/// Checks a VMI interface or network name. KubeVirt's admission allows
/// `[A-Za-z0-9_-]+` (`validateInterfaceNameFormat`); nicplug also wants a
/// letter or digit first (a leading '-' reads as an option to every tool
/// the name reaches, `--help`) and at most 63 bytes (a DNS label; the name
/// ends up in the libvirt alias `ua-<name>` and the 255-byte ifalias record).
pub fn check_network_name(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > MAX_LABEL_LEN {
        return Err(NameError::TooLong {
            what,
            value: value.to_string(),
            max: MAX_LABEL_LEN,
        });
    }
    let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if !value.bytes().all(ok)
        || !value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
    {
        return Err(NameError::Chars {
            what,
            value: value.to_string(),
            rule: "may only contain letters, digits, '-' and '_', and must start with a letter or digit",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_name_matches_kubevirt_vector() {
        assert_eq!(hashed_pod_iface("dyniface1").as_str(), "pod9a6a0c3b4d8");
    }

    #[test]
    fn plumbing_names_for_hashed_and_ordinal() {
        let names = PlumbingNames::for_pod_iface(&hashed_pod_iface("dyniface1"));
        assert_eq!(names.bridge.as_str(), "k6t-9a6a0c3b4d8");
        assert_eq!(names.tap.as_str(), "tap9a6a0c3b4d8");
        assert_eq!(names.kubevirt_renamed_pod.as_str(), "9a6a0c3b4d8-nic");

        let names = PlumbingNames::for_pod_iface(&ordinal_pod_iface(2));
        assert_eq!(names.pod.as_str(), "net2");
        assert_eq!(names.bridge.as_str(), "k6t-net2");
        assert_eq!(names.tap.as_str(), "tap2");
        assert_eq!(names.kubevirt_renamed_pod.as_str(), "net2-nic");
    }

    #[test]
    fn plumbing_names_of_non_ascii_links_do_not_panic() {
        // The kernel allows any byte but '/', ':', whitespace and NUL; a link
        // carrying a record can have such a name. Byte 3 and byte 15 fall
        // inside a character here.
        for name in ["aéé", "é", "podéééééé", "ab€", "k6t€€€€"] {
            let names = PlumbingNames::for_pod_iface(&IfName::new(name).unwrap());
            for derived in [&names.bridge, &names.tap, &names.kubevirt_renamed_pod] {
                assert!(
                    IfName::new(derived.as_str()).is_ok(),
                    "{derived} from {name}"
                );
            }
        }
        let names = PlumbingNames::for_pod_iface(&IfName::new("neté1").unwrap());
        assert_eq!(names.tap.as_str(), "tapé1");
    }

    #[test]
    fn kubernetes_and_network_names() {
        assert!(check_object_name("name", "vmi-fedora.example").is_ok());
        assert!(check_object_name("name", &"a".repeat(253)).is_ok());
        for bad in ["", "A", "-a", "a-", "a..b", ".a", "a b", "é", "--help"] {
            assert!(check_object_name("name", bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_object_name("name", "").unwrap_err().to_string(),
            "name is empty"
        );
        assert!(check_namespace("namespace", "a.b").is_err());
        assert!(check_network_name("network", "Net_1-a").is_ok());
        assert!(check_network_name("network", &"n".repeat(63)).is_ok());
        for bad in [
            "",
            "--help",
            "_a",
            "a.b",
            "a b",
            "blé",
            "a\u{1}",
            &"n".repeat(64),
        ] {
            assert!(check_network_name("network", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ordinal_shape() {
        assert!(is_ordinal_pod_iface("net1"));
        assert!(is_ordinal_pod_iface("net12"));
        assert!(!is_ordinal_pod_iface("net"));
        assert!(!is_ordinal_pod_iface("netx"));
        assert!(!is_ordinal_pod_iface("eth0"));
    }

    #[test]
    fn ifname_validation() {
        assert!(IfName::new("eth0").is_ok());
        assert!(IfName::new("k6t-9a6a0c3b4d8").is_ok());
        assert!(IfName::new("0123456789abcdef").is_err());
        assert_eq!(IfName::new(""), Err(NameError::IfNameEmpty));
        assert!(IfName::new("a/b").is_err());
        assert!(IfName::new("a b").is_err());
        assert!(IfName::new("..").is_err());
    }

    #[test]
    fn mac_parse_and_print() {
        let mac: Mac = "02:AB:cd:00:11:FF".parse().unwrap();
        assert_eq!(mac.to_string(), "02:ab:cd:00:11:ff");
        assert_eq!("02-ab-cd-00-11-ff".parse::<Mac>().unwrap(), mac);
        assert!("02:ab:cd:00:11".parse::<Mac>().is_err());
        assert!("02:ab:cd:00:11:fg".parse::<Mac>().is_err());
        assert!("01:00:5e:00:00:01".parse::<Mac>().is_err());
        assert!("ff:ff:ff:ff:ff:ff".parse::<Mac>().is_err());
        assert_eq!(
            "00:00:00:00:00:00".parse::<Mac>(),
            Err(NameError::MacZero("00:00:00:00:00:00".into()))
        );
        // from_str_radix alone accepts a sign.
        assert!("+2:00:00:00:00:01".parse::<Mac>().is_err());
        assert!("02:00:00:00:00:é1".parse::<Mac>().is_err());
    }

    #[test]
    fn derived_mac_is_local_unicast_and_stable() {
        let a = Mac::locally_administered_from("pod9a6a0c3b4d8");
        assert!(a.is_locally_administered());
        assert!(!a.is_multicast());
        assert_eq!(a, Mac::locally_administered_from("pod9a6a0c3b4d8"));
        assert_ne!(a, Mac::locally_administered_from("pod000000000000"));
    }
}
