//! An interface address with its prefix length, as the kernel, CNI and the
//! pod link's record write it (`169.254.1.5/24`, `fe80::1/64`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

/// A text or a prefix that is no `ADDRESS/PREFIX` of its family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {0:?}: expected ADDRESS/PREFIX")]
pub struct CidrError(pub String);

/// An interface address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpCidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(CidrError(format!("{addr}/{prefix}")));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpCidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| CidrError(s.into()))?;
        let addr = addr.parse().map_err(|_| CidrError(s.into()))?;
        let prefix = prefix.parse().map_err(|_| CidrError(s.into()))?;
        Self::new(addr, prefix)
    }
}
