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
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    IfNameLength(String),
    #[error("interface name {0:?} contains '/', ':', whitespace or a control character")]
    IfNameChars(String),
    #[error("invalid MAC address {0:?}: expected six hex octets separated by ':' or '-'")]
    Mac(String),
    #[error("MAC address {0} is a multicast address")]
    MacMulticast(String),
}

/// A Linux network interface name: 1 to 15 bytes, none of `/`, `:`, whitespace
/// or control characters, and neither `.` nor `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() || name.len() > MAX_IFNAME_LEN || name == "." || name == ".." {
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
            if part.len() != 2 {
                return Err(NameError::Mac(s.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| NameError::Mac(s.to_string()))?;
        }
        let mac = Self(bytes);
        if mac.is_multicast() {
            return Err(NameError::MacMulticast(mac.to_string()));
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
    let digest = hex::encode(Sha256::digest(network.as_bytes()));
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
        // The pod name is at most 15 bytes, so every derived name fits too,
        // except `H-nic` of an implausibly long legacy name: truncate that one.
        let mut renamed = format!("{trimmed}-nic");
        renamed.truncate(MAX_IFNAME_LEN);
        Self {
            pod: pod.clone(),
            bridge: IfName(truncated(format!("k6t-{trimmed}"))),
            tap: IfName(truncated(format!(
                "tap{}",
                &pod.as_str()[3.min(pod.as_str().len())..]
            ))),
            kubevirt_renamed_pod: IfName(renamed),
        }
    }
}

fn truncated(mut name: String) -> String {
    name.truncate(MAX_IFNAME_LEN);
    name
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
        assert!(IfName::new("").is_err());
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
