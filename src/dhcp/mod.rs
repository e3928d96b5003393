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
pub mod socket;
pub mod task;

pub use lease::{Dns, LeaseConfig};
pub use server::{Outcome, Reply, answer};
pub use task::{Desired, Servers};

use crate::hypervisor::DomainState;
use crate::model::vmi::Vmi;
use crate::model::{Mac, PlumbingNames, PodLinkRecord};
use crate::netns::Link;
use crate::plan::Phase;
use crate::status::{DhcpStatus, InterfaceStatus};

/// The servers a pass wants, from what it observed and decided: one per
/// interface whose device is attached (Attached or Ready) on a tap nicplug
/// plumbed (the pod link carries nicplug's record for that network, and
/// the live device uses the tap of that pod link) and whose record has an
/// IPv4 address. Also returns, for the other attached interfaces, why they
/// get no server (for the status).
pub fn desired_servers(
    vmi: &Vmi,
    links: &[Link],
    domain: Option<&DomainState>,
    statuses: &[InterfaceStatus],
    dns: &Dns,
) -> (Vec<Desired>, Vec<(String, DhcpStatus)>) {
    let mut desired = Vec::new();
    let mut unserved = Vec::new();
    let not_served = |reason: &str| DhcpStatus {
        served: false,
        reason: Some(reason.to_string()),
        address: None,
        last_lease: None,
    };
    for status in statuses {
        if !matches!(status.phase, Phase::Attached | Phase::Ready) {
            continue;
        }
        let pod = status
            .pod_interface_name
            .as_deref()
            .and_then(|name| links.iter().find(|l| l.name.as_str() == name));
        let record = pod
            .and_then(|p| p.alias.as_deref())
            .filter(|a| PodLinkRecord::is_record(a))
            .and_then(|a| PodLinkRecord::from_alias(a).ok())
            .filter(|r| r.network.as_deref() == Some(status.name.as_str()));
        let (Some(pod), Some(record)) = (pod, record) else {
            unserved.push((
                status.name.clone(),
                not_served("not served by nicplug: it did not plumb this interface (KubeVirt serves the interfaces it plumbs)"),
            ));
            continue;
        };
        let names = PlumbingNames::for_pod_iface(&pod.name);
        let device = domain
            .and_then(|d| d.interface_by_alias(&format!("ua-{}", status.name)))
            .filter(|d| d.target_dev.as_deref() == Some(names.tap.as_str()));
        let Some(mac) = device.and_then(|d| d.mac) else {
            continue;
        };
        match LeaseConfig::from_record(&record, mac, dns.clone(), Some(vmi.name.clone())) {
            Some(lease) => desired.push(Desired {
                network: status.name.clone(),
                tap: names.tap,
                server_mac: Mac::locally_administered_from(pod.name.as_str()),
                lease,
            }),
            None => unserved.push((
                status.name.clone(),
                not_served("not served: the pod interface had no IPv4 address (an L2 network)"),
            )),
        }
    }
    (desired, unserved)
}
