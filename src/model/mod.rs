//! nicplug's vocabulary: validated names, the VMI subset it reads, Multus'
//! network-status, and the record it keeps of a pod link's original state.

pub mod cidr;
pub mod depth;
pub mod names;
pub mod network_status;
pub mod record;
pub mod route;
pub mod vmi;

pub use cidr::IpCidr;
pub use names::{IfName, Mac, PlumbingNames};
pub use record::PodLinkRecord;
pub use route::PodRoute;

/// A uid/gid pair (the owner of a tap device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// `UID:GID`, what [`Owner::from_str`](std::str::FromStr) reads.
impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

impl std::str::FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid owner {s:?}: expected UID:GID, e.g. 107:107");
        let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        })
    }
}
