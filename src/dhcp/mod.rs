//! DHCPv4 for the VM behind a bridge binding nicplug plumbed: what KubeVirt's
//! launcher does for the interfaces it plumbs itself, and does not for a
//! device nicplug attached (it adopts the device and starts no server).
//!
//! - [`lease`]: the lease, derived only from the pod link's record (its
//!   first IPv4 address, prefix, MTU, routes), DNS and the VMI name;
//! - [`server`]: the server logic, a pure function of a request and the
//!   lease;
//! - [`frame`]: Ethernet/IPv4/UDP framing of the DHCP payload (the wire
//!   format of the payload itself is `dhcproto`'s).

pub mod frame;
pub mod lease;
pub mod server;

pub use lease::{Dns, LeaseConfig};
pub use server::{Outcome, Reply, answer};
