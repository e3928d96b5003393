//! The `<interface>` device XML nicplug attaches: the same fragment KubeVirt's
//! launcher builds for a bridge- or macvtap-binding interface (and its passt
//! plugin's sidecar for a passt one), so KubeVirt recognises and adopts the
//! device.

use std::fmt::Write;

use super::domain_xml::PciAddress;
use crate::model::vmi::ForwardedPort;
use crate::model::{IfName, Mac};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceXmlError {
    #[error("network name {0:?} cannot form a libvirt alias: use letters, digits, '-' and '_'")]
    Alias(String),
    #[error("interface model {0:?} is not a libvirt model name")]
    Model(String),
    #[error("port protocol {0:?}: passt forwards TCP and UDP only")]
    Protocol(String),
}

/// Everything the device XML says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceDevice {
    /// VMI network name; the alias is `ua-<network>`.
    pub network: String,
    /// The link the device uses: its tap (`<target dev>`), or, with passt,
    /// the pod link passt binds (`<source dev>`).
    pub link: IfName,
    pub backend: DeviceBackend,
    /// The VMI spec model (`virtio` maps to `virtio-non-transitional`).
    pub model: String,
    pub mac: Mac,
    pub mtu: u32,
    /// `Some(n)` with n > 1 adds `<driver name='vhost' queues='n'/>`.
    pub queues: Option<u32>,
    pub link_up: bool,
    /// Where the device goes; `None` lets libvirt choose (what KubeVirt does).
    pub address: Option<PciAddress>,
}

/// What carries the device's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceBackend {
    /// QEMU's tap: `<interface type='ethernet'>`, the tap opened by libvirt
    /// (`managed='no'`: it exists already).
    Tap,
    /// passt, which libvirt starts in the pod for the device:
    /// `<interface type='user'>` with `<backend type='passt'/>`, forwarding
    /// `forwards` (none: every TCP and UDP port) from the pod to the guest.
    Passt { forwards: Vec<ForwardedPort> },
}

impl InterfaceDevice {
    /// Multiqueue taps are only for more than one queue (facts.md: a
    /// multiqueue tap attached with one queue fails).
    pub fn multi_queue(&self) -> bool {
        self.queues.is_some_and(|q| q > 1)
    }

    pub fn alias(&self) -> String {
        format!("ua-{}", self.network)
    }

    /// The libvirt model type.
    pub fn libvirt_model(&self) -> &str {
        match self.model.as_str() {
            "virtio" => "virtio-non-transitional",
            other => other,
        }
    }

    /// Whether the device can be written as XML at all; the planner checks
    /// this before it touches anything.
    pub fn validate(&self) -> Result<(), DeviceXmlError> {
        let valid = |s: &str, extra: &[char]| {
            !s.is_empty()
                && s.chars().all(|c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c)
                })
        };
        if !valid(&self.network, &[]) {
            return Err(DeviceXmlError::Alias(self.network.clone()));
        }
        if !valid(&self.model, &['.']) {
            return Err(DeviceXmlError::Model(self.model.clone()));
        }
        if let DeviceBackend::Passt { forwards } = &self.backend
            && let Some(other) = forwards
                .iter()
                .find(|f| f.protocol != "TCP" && f.protocol != "UDP")
        {
            return Err(DeviceXmlError::Protocol(other.protocol.clone()));
        }
        Ok(())
    }

    pub fn to_xml(&self) -> Result<String, DeviceXmlError> {
        self.validate()?;
        // The alias and model were checked above. A link name is any IfName:
        // no control characters (IfName refuses them, and XML 1.0 cannot
        // carry them), but quotes, '<' and '&' are legal in a Linux name, so
        // it is escaped.
        let link = quick_xml::escape::escape(self.link.as_str());
        let mut xml = String::new();
        match &self.backend {
            DeviceBackend::Tap => {
                xml.push_str("<interface type='ethernet'>\n");
                let _ = writeln!(xml, "  <target dev='{link}' managed='no'/>");
            }
            DeviceBackend::Passt { .. } => {
                xml.push_str("<interface type='user'>\n");
                let _ = writeln!(xml, "  <source dev='{link}'/>");
                xml.push_str("  <backend type='passt'/>\n");
            }
        }
        let _ = writeln!(xml, "  <model type='{}'/>", self.libvirt_model());
        let _ = writeln!(xml, "  <mac address='{}'/>", self.mac);
        match &self.backend {
            DeviceBackend::Tap => {
                let _ = writeln!(xml, "  <mtu size='{}'/>", self.mtu);
            }
            // passt offers the guest its own MTU (DHCP, NDP).
            DeviceBackend::Passt { forwards } => port_forwards(&mut xml, forwards),
        }
        let _ = writeln!(xml, "  <alias name='{}'/>", self.alias());
        if self.multi_queue() {
            let queues = self.queues.unwrap_or(1);
            let _ = writeln!(xml, "  <driver name='vhost' queues='{queues}'/>");
        }
        if !self.link_up {
            xml.push_str("  <link state='down'/>\n");
        }
        if let Some(a) = self.address {
            let _ = writeln!(
                xml,
                "  <address type='pci' domain='{:#06x}' bus='{:#04x}' slot='{:#04x}' function='{:#x}'/>",
                a.domain, a.bus, a.slot, a.function
            );
        }
        xml.push_str("</interface>\n");
        Ok(xml)
    }
}

/// KubeVirt's port forwards: every TCP and UDP port when the interface
/// lists none, else a range per listed port, by protocol. Not bound to a
/// device: KubeVirt's sidecar adds `dev='eth0'`, which Debian 12's passt
/// (0.0~git20230309) refuses ("Invalid port specifier %eth0/all"), and the
/// pod link is the pod's one external link anyway.
fn port_forwards(xml: &mut String, forwards: &[ForwardedPort]) {
    if forwards.is_empty() {
        xml.push_str("  <portForward proto='tcp'/>\n  <portForward proto='udp'/>\n");
        return;
    }
    for (protocol, proto) in [("TCP", "tcp"), ("UDP", "udp")] {
        let ports: Vec<u16> = forwards
            .iter()
            .filter(|f| f.protocol == protocol)
            .map(|f| f.port)
            .collect();
        if ports.is_empty() {
            continue;
        }
        let _ = writeln!(xml, "  <portForward proto='{proto}'>");
        for port in ports {
            let _ = writeln!(xml, "    <range start='{port}'/>");
        }
        xml.push_str("  </portForward>\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> InterfaceDevice {
        InterfaceDevice {
            network: "dyniface1".into(),
            link: IfName::new("tap9a6a0c3b4d8").unwrap(),
            backend: DeviceBackend::Tap,
            model: "virtio".into(),
            mac: "02:00:00:aa:bb:01".parse().unwrap(),
            mtu: 1400,
            queues: None,
            link_up: true,
            address: None,
        }
    }

    #[test]
    fn golden_plain() {
        assert_eq!(
            device().to_xml().unwrap(),
            include_str!("../../fixtures/device/plain.xml")
        );
    }

    #[test]
    fn golden_multiqueue_link_down_e1000e() {
        let dev = InterfaceDevice {
            queues: Some(4),
            link_up: false,
            model: "e1000e".into(),
            ..device()
        };
        assert!(dev.multi_queue());
        assert_eq!(
            dev.to_xml().unwrap(),
            include_str!("../../fixtures/device/multiqueue-down-e1000e.xml")
        );
    }

    #[test]
    fn golden_placed_on_a_root_port() {
        let dev = InterfaceDevice {
            address: Some(PciAddress::on_root_port(
                crate::hypervisor::domain_xml::RootPortIndex(0x0b),
            )),
            ..device()
        };
        let xml = dev.to_xml().unwrap();
        assert_eq!(xml, include_str!("../../fixtures/device/placed.xml"));
        let parsed = crate::hypervisor::domain_xml::parse_devices(&format!(
            "<domain><devices>{xml}</devices></domain>"
        ))
        .unwrap();
        assert_eq!(
            parsed.interfaces[0].pci.unwrap().to_string(),
            "0000:0b:00.0"
        );
    }

    #[test]
    fn one_queue_is_single_queue() {
        let dev = InterfaceDevice {
            queues: Some(1),
            ..device()
        };
        assert!(!dev.multi_queue());
        assert!(!dev.to_xml().unwrap().contains("<driver"));
    }

    #[test]
    fn rejects_names_that_would_break_the_xml() {
        let dev = InterfaceDevice {
            network: "a'b".into(),
            ..device()
        };
        assert_eq!(dev.to_xml(), Err(DeviceXmlError::Alias("a'b".into())));
        let dev = InterfaceDevice {
            model: "virtio'/><x".into(),
            ..device()
        };
        assert!(matches!(dev.to_xml(), Err(DeviceXmlError::Model(_))));
        // A tap name with XML's special characters is escaped, and reads back.
        let dev = InterfaceDevice {
            link: IfName::new("t'<&\"x").unwrap(),
            ..device()
        };
        let xml = format!(
            "<domain><devices>{}</devices></domain>",
            dev.to_xml().unwrap()
        );
        let parsed = crate::hypervisor::domain_xml::parse_devices(&xml).unwrap();
        assert_eq!(parsed.interfaces[0].target_dev.as_deref(), Some("t'<&\"x"));
    }

    #[test]
    fn generated_xml_reads_back() {
        let xml = format!(
            "<domain><devices>{}</devices></domain>",
            device().to_xml().unwrap()
        );
        let parsed = crate::hypervisor::domain_xml::parse_devices(&xml).unwrap();
        let iface = &parsed.interfaces[0];
        assert_eq!(iface.alias.as_deref(), Some("ua-dyniface1"));
        assert_eq!(iface.mac, Some(device().mac));
        assert_eq!(iface.target_dev.as_deref(), Some("tap9a6a0c3b4d8"));
        assert_eq!(iface.mtu, Some(1400));
    }
}
