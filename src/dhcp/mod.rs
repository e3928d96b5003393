//! DHCP for the VM behind a bridge binding nicplug plumbed: DHCPv4, what
//! KubeVirt's launcher does for the interfaces it plumbs itself (and does
//! not for a device nicplug attached: it adopts the device and starts no
//! server), and beyond KubeVirt, which gives a bridge-bound guest no IPv6,
//! router advertisements and DHCPv6 for the pod link's IPv6 address.
//!
//! - [`lease`], [`lease6`]: what the guest gets, derived only from the pod
//!   link's record (addresses, prefix, MTU, routes), DNS and the VMI name;
//! - [`server`], [`server6`], [`ra`]: the server logic, pure functions of a
//!   request and the lease;
//! - [`frame`], [`frame6`]: Ethernet/IP/UDP (and ICMPv6) framing (the wire
//!   format of the DHCP payloads is `dhcproto`'s);
//! - [`socket`], [`task`]: one packet socket on the tap and one task per
//!   interface serving both families.

pub mod frame;
pub mod frame6;
pub mod lease;
pub mod lease6;
pub mod ra;
pub mod server;
pub mod server6;
pub mod socket;
pub mod task;

pub use lease::{Dns, LeaseConfig};
pub use lease6::Lease6Config;
pub use server::{Outcome, Reply, answer};
pub use server6::answer6;
pub use task::{Desired, Servers};

use crate::hypervisor::DomainState;
use crate::model::vmi::{Binding, Vmi};
use crate::model::{Mac, PlumbingNames, PodLinkRecord};
use crate::netns::Link;
use crate::plan::Phase;
use crate::status::{DhcpStatus, InterfaceStatus};

/// The servers a pass wants, from what it observed and decided: one per
/// interface whose device is attached (Attached or Ready) on a tap nicplug
/// plumbed (the pod link carries nicplug's record for that network, and
/// the live device uses the tap of that pod link) and whose record has an
/// IPv4 address or an IPv6 address of IPAM's. Also returns, for the other attached interfaces, why they
/// get no server (for the status).
pub fn desired_servers(
    vmi: &Vmi,
    links: &[Link],
    domain: Option<&DomainState>,
    statuses: &[InterfaceStatus],
    dns: &dyn Fn(&str) -> Dns,
) -> (Vec<Desired>, Vec<(String, DhcpStatus)>) {
    let mut desired = Vec::new();
    let mut unserved = Vec::new();
    let not_served = |reason: &str| DhcpStatus {
        served: false,
        reason: Some(reason.to_string()),
        address: None,
        last_lease: None,
        ipv6_address: None,
        ipv6_last_lease: None,
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
            let binding = vmi
                .interfaces
                .iter()
                .find(|i| i.name == status.name)
                .map(|i| &i.binding);
            let reason = match binding {
                Some(Binding::Macvtap) => {
                    "not served by nicplug: a macvtap guest is on the lower link's network, whose DHCP serves it"
                }
                Some(Binding::Passt) => {
                    "not served by nicplug: passt serves the guest the pod's address itself"
                }
                _ => {
                    "not served by nicplug: it did not plumb this interface (KubeVirt serves the interfaces it plumbs)"
                }
            };
            unserved.push((status.name.clone(), not_served(reason)));
            continue;
        };
        let names = PlumbingNames::for_pod_iface(&pod.name);
        let device = domain
            .and_then(|d| d.interface_by_alias(&format!("ua-{}", status.name)))
            .filter(|d| d.target_dev.as_deref() == Some(names.tap.as_str()));
        let Some(mac) = device.and_then(|d| d.mac) else {
            continue;
        };
        let dns = dns(pod.name.as_str());
        let server_mac = Mac::locally_administered_from(pod.name.as_str());
        let lease6 = Lease6Config::from_record(&record, mac, server_mac, &dns);
        let lease = LeaseConfig::from_record(&record, mac, dns, Some(vmi.name.clone()));
        if lease.is_none() && lease6.is_none() {
            unserved.push((
                status.name.clone(),
                not_served(
                    "not served: the pod interface had no address from IPAM (an L2 network)",
                ),
            ));
            continue;
        }
        desired.push(Desired {
            network: status.name.clone(),
            tap: names.tap,
            server_mac,
            lease,
            lease6,
        });
    }
    (desired, unserved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domain_xml::{DomainInterface, RootPorts};
    use crate::netns::LinkKind;

    const POD: &str = "pod9a6a0c3b4d8";
    const TAP: &str = "tap9a6a0c3b4d8";
    const VM_MAC: &str = "02:00:00:00:00:09";

    fn vmi() -> Vmi {
        Vmi::parse(
            r#"{"kind":"VirtualMachineInstance","metadata":{"name":"vm1","namespace":"ns"},"spec":{"domain":{"devices":{"interfaces":[
                {"name":"dyniface1","bridge":{}}]}},
                "networks":[{"name":"dyniface1","multus":{"networkName":"nad1"}}]}}"#,
        )
        .unwrap()
    }

    fn pod_link(alias: Option<String>) -> Link {
        Link {
            alias,
            ..Link::fixture(3, POD, LinkKind::Veth)
        }
    }

    fn record(addresses: &[&str]) -> String {
        PodLinkRecord {
            network: Some("dyniface1".into()),
            mac: VM_MAC.parse().unwrap(),
            mtu: 1400,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            routes: vec!["169.254.255.2/32>169.254.2.1".parse().unwrap()],
            previous_alias: None,
        }
        .to_alias()
        .unwrap()
    }

    fn domain(target: &str) -> DomainState {
        DomainState {
            running: true,
            persistent: true,
            migration: crate::hypervisor::Migration::None,
            arrived_by_migration: false,
            qemu: None,
            devices_unknown: false,
            interfaces: vec![DomainInterface {
                alias: Some("ua-dyniface1".into()),
                mac: Some(VM_MAC.parse().unwrap()),
                target_dev: Some(target.into()),
                link_up: true,
                model: Some("virtio".into()),
                queues: None,
                mtu: Some(1400),
                pci: None,
                xml: String::new(),
                ..Default::default()
            }],
            root_ports: RootPorts::with_free(4, 3),
        }
    }

    fn status(phase: Phase) -> InterfaceStatus {
        InterfaceStatus {
            pod_interface_name: Some(POD.into()),
            ..InterfaceStatus::new("dyniface1", phase)
        }
    }

    /// `desired_servers` for one interface in `phase` on the tap `target`,
    /// with no DNS.
    fn servers(
        links: &[Link],
        target: &str,
        phase: Phase,
    ) -> (Vec<Desired>, Vec<(String, DhcpStatus)>) {
        desired_servers(
            &vmi(),
            links,
            Some(&domain(target)),
            &[status(phase)],
            &|_: &str| Dns::default(),
        )
    }

    /// The reason of the first interface without a server.
    fn reason(unserved: &[(String, DhcpStatus)]) -> &str {
        unserved[0].1.reason.as_deref().unwrap()
    }

    #[test]
    fn an_attached_interface_nicplug_plumbed_with_ipv4_is_served() {
        let links = [pod_link(Some(record(&["169.254.2.5/24"])))];
        for phase in [Phase::Attached, Phase::Ready] {
            let (desired, unserved) = servers(&links, TAP, phase);
            assert!(unserved.is_empty());
            let [want] = desired.as_slice() else {
                panic!("{desired:?}");
            };
            assert_eq!(want.tap.as_str(), TAP);
            let lease = want.lease.as_ref().unwrap();
            assert_eq!(lease.client.to_string(), VM_MAC);
            assert_eq!(lease.address.to_string(), "169.254.2.5");
            assert_eq!(lease.hostname.as_deref(), Some("vm1"));
            assert_eq!(want.lease6, None, "no IPv6 of IPAM's");
            assert_eq!(want.server_mac, Mac::locally_administered_from(POD));
        }
    }

    #[test]
    fn an_ipv6_address_of_ipams_is_served_alone_or_beside_ipv4() {
        for (addresses, v4) in [
            (
                &["169.254.2.5/24", "fe80::ff:fe00:9/64", "fe80::2:5/64"][..],
                true,
            ),
            (&["fe80::ff:fe00:9/64", "fe80::2:5/64"][..], false),
        ] {
            let links = [pod_link(Some(record(addresses)))];
            let (desired, unserved) = servers(&links, TAP, Phase::Ready);
            assert!(unserved.is_empty());
            let lease6 = desired[0].lease6.as_ref().unwrap();
            assert_eq!(lease6.address.to_string(), "fe80::2:5");
            assert_eq!(lease6.client.to_string(), VM_MAC);
            assert_eq!(desired[0].lease.is_some(), v4);
        }
    }

    #[test]
    fn no_server_for_l2_kubevirt_or_unattached_interfaces() {
        // Only the kernel's own link-local address (EUI-64 of the MAC).
        let l2 = [pod_link(Some(record(&["fe80::ff:fe00:9/64"])))];
        let (desired, unserved) = servers(&l2, TAP, Phase::Ready);
        assert!(desired.is_empty());
        assert!(reason(&unserved).contains("no address from IPAM"));

        // KubeVirt's layout: no nicplug record on the pod link.
        let kubevirt = [pod_link(None)];
        let (desired, unserved) = servers(&kubevirt, TAP, Phase::Ready);
        assert!(desired.is_empty());
        assert!(reason(&unserved).contains("did not plumb"));

        // A device on another tap is not the one nicplug plumbed.
        let links = [pod_link(Some(record(&["169.254.2.5/24"])))];
        let (desired, _) = servers(&links, "tapkubevirt", Phase::Ready);
        assert!(desired.is_empty());

        for phase in [
            Phase::Pending,
            Phase::Plumbed,
            Phase::Detaching,
            Phase::Failed,
        ] {
            let (desired, unserved) = servers(&links, TAP, phase);
            assert!(desired.is_empty() && unserved.is_empty(), "{phase:?}");
        }
    }
}
