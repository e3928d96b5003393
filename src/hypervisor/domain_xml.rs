//! Reads what nicplug needs from a live domain XML: its network interfaces
//! and its hot-pluggable PCIe root ports. Nothing else of the domain is
//! modelled, and nicplug never writes a domain back (only device fragments).

use std::collections::BTreeSet;
use std::fmt;

use quick_xml::Reader;
use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};

use crate::model::{Mac, Owner};

#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    #[error("malformed XML at byte {position}")]
    Xml {
        position: u64,
        #[source]
        source: quick_xml::Error,
    },
    #[error("invalid attribute {attr} of <{element}>: {value:?}")]
    Attribute {
        element: &'static str,
        attr: &'static str,
        value: String,
    },
    #[error("<{element}> has no attribute {attr}")]
    MissingAttribute {
        element: &'static str,
        attr: &'static str,
    },
    #[error("control character {found:?} at byte {position}: not allowed in XML 1.0")]
    ControlCharacter { position: usize, found: char },
    #[error("element at bytes {start}..{end} does not start and end on a character")]
    Slice { start: usize, end: usize },
}

/// PCI address limits (domain:bus:slot.function), as libvirt checks them.
const PCI_LIMITS: [(&str, u32); 4] = [
    ("domain", 0xffff),
    ("bus", 0xff),
    ("slot", 0x1f),
    ("function", 0x7),
];

/// One `<interface>` of the domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainInterface {
    /// `<alias name>`: `ua-<network>` for user-defined aliases.
    pub alias: Option<String>,
    pub mac: Option<Mac>,
    /// `<target dev>`: the tap QEMU uses.
    pub target_dev: Option<String>,
    /// `<source dev>`: the pod link a passt backend uses.
    pub source_dev: Option<String>,
    /// `<backend type>`: `passt` for a device whose traffic passt carries.
    pub backend: Option<String>,
    /// `<link state>`; absent means up.
    pub link_up: bool,
    pub model: Option<String>,
    /// `<driver queues>`.
    pub queues: Option<u32>,
    /// `<mtu size>`.
    pub mtu: Option<u32>,
    /// `<address type='pci'>`: where the device sits (its bus is the root
    /// port's index when it is on a root port).
    pub pci: Option<PciAddress>,
    /// The element's own XML, as libvirt printed it: the base for a live
    /// update of the device (libvirt wants the whole device back).
    pub xml: String,
}

/// A PCI address, `domain:bus:slot.function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

impl DomainInterface {
    /// Whether passt carries the device's traffic (KubeVirt's passt binding).
    pub fn is_passt(&self) -> bool {
        self.backend.as_deref() == Some("passt")
    }
}

impl PciAddress {
    /// The one device slot of the bus a PCIe root port provides.
    pub fn on_root_port(index: RootPortIndex) -> Self {
        Self {
            domain: 0,
            bus: index.0,
            slot: 0,
            function: 0,
        }
    }
}

impl fmt::Display for PciAddress {
    /// The form Linux uses in sysfs (`0000:05:00.0`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

/// A `pcie-root-port` controller's index: the number of the bus it provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RootPortIndex(pub u8);

impl fmt::Display for RootPortIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What sits on a root port's bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupant {
    Free,
    /// A network interface, with its alias if it has one.
    Interface {
        alias: Option<String>,
    },
    /// Any other device (disk, controller, host device, ...).
    OtherDevice,
}

/// One hot-pluggable `pcie-root-port` of the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPort {
    pub index: RootPortIndex,
    pub occupant: Occupant,
}

/// Hot-pluggable PCIe root ports of the domain (`hotplug='off'` ones are
/// left out), ordered by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootPorts {
    pub ports: Vec<RootPort>,
}

impl RootPorts {
    pub fn total(&self) -> usize {
        self.ports.len()
    }

    /// Ports nothing sits on.
    pub fn free(&self) -> usize {
        self.ports
            .iter()
            .filter(|p| p.occupant == Occupant::Free)
            .count()
    }

    /// Test fixture: ports 1..=total, of which the first `total - free`
    /// hold some other device.
    #[cfg(test)]
    pub fn with_free(total: usize, free: usize) -> Self {
        let ports = (1..=total)
            .map(|i| RootPort {
                index: RootPortIndex(i as u8),
                occupant: if i <= total - free {
                    Occupant::OtherDevice
                } else {
                    Occupant::Free
                },
            })
            .collect();
        Self { ports }
    }

    /// Test fixture: the occupants after `interfaces` changed (a fake
    /// hypervisor's attach or detach).
    #[cfg(test)]
    pub fn refresh(&mut self, interfaces: &[DomainInterface]) {
        for port in &mut self.ports {
            let interface = interfaces
                .iter()
                .find(|i| i.pci.is_some_and(|a| a.bus == port.index.0));
            port.occupant = match (interface, &port.occupant) {
                (Some(i), _) => Occupant::Interface {
                    alias: i.alias.clone(),
                },
                (None, Occupant::OtherDevice) => Occupant::OtherDevice,
                (None, _) => Occupant::Free,
            };
        }
    }
}

/// What nicplug knows of the domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainState {
    pub running: bool,
    pub persistent: bool,
    /// Where a live migration has the domain, as this pod's daemon sees it.
    pub migration: super::Migration,
    /// Running here since a live migration brought it (libvirt's running
    /// reason `migrated`, until the next state change).
    pub arrived_by_migration: bool,
    pub interfaces: Vec<DomainInterface>,
    pub root_ports: RootPorts,
    /// The QEMU that runs it; `None` when libvirt did not say.
    pub qemu: Option<super::QemuVersion>,
    /// The live XML was not read, so `interfaces` and `root_ports` say
    /// nothing: libvirt 11 answers it for an arriving domain only once the
    /// migration is over.
    pub devices_unknown: bool,
}

impl DomainState {
    pub fn interface_by_alias(&self, alias: &str) -> Option<&DomainInterface> {
        self.interfaces
            .iter()
            .find(|i| i.alias.as_deref() == Some(alias))
    }
}

/// The devices part of a domain XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainDevices {
    pub interfaces: Vec<DomainInterface>,
    pub root_ports: RootPorts,
    /// The uid:gid of the DAC security label (`<seclabel model='dac'>`):
    /// the user QEMU runs as.
    pub dac_owner: Option<Owner>,
}

/// The value of attribute `name` of `e` (element `element`), unescaped. A
/// value that does not unescape, or holds a control character (from a
/// character reference such as `&#1;`), is an error: such values are passed
/// on into device XML, which must stay valid.
fn attr(
    e: &BytesStart<'_>,
    element: &'static str,
    name: &'static str,
) -> Result<Option<String>, DomainXmlError> {
    let Some(found) = e.attributes().flatten().find(|a| a.key.as_ref() == name) else {
        return Ok(None);
    };
    let bad = |value: String| DomainXmlError::Attribute {
        element,
        attr: name,
        value,
    };
    let value = found
        .normalized_value(XmlVersion::Implicit1_0)
        .map_err(|_| bad(found.value.to_string()))?
        .into_owned();
    if value.chars().any(char::is_control) {
        return Err(bad(value));
    }
    Ok(Some(value))
}

/// Attribute `name` of `e`, which must be there.
fn required(
    e: &BytesStart<'_>,
    element: &'static str,
    name: &'static str,
) -> Result<String, DomainXmlError> {
    attr(e, element, name)?.ok_or(DomainXmlError::MissingAttribute {
        element,
        attr: name,
    })
}

/// Attribute `name` of `e` as a number up to `max`, if present.
fn number(
    e: &BytesStart<'_>,
    element: &'static str,
    name: &'static str,
    max: u32,
) -> Result<Option<u32>, DomainXmlError> {
    let Some(value) = attr(e, element, name)? else {
        return Ok(None);
    };
    match parse_number(&value).filter(|n| *n <= max) {
        Some(n) => Ok(Some(n)),
        None => Err(DomainXmlError::Attribute {
            element,
            attr: name,
            value,
        }),
    }
}

/// Parses a number as libvirt writes it: `0x01` (PCI addresses) or decimal.
fn parse_number(value: &str) -> Option<u32> {
    match value.strip_prefix("0x") {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
            value.parse().ok()
        }
        None => None,
    }
}

/// Refuses characters XML 1.0 does not allow (C0 controls but tab, LF, CR):
/// quick-xml reads and writes them without complaint.
fn check_chars(xml: &str) -> Result<(), DomainXmlError> {
    match xml
        .char_indices()
        .find(|(_, c)| c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\r' | '\u{7f}'))
    {
        Some((position, found)) => Err(DomainXmlError::ControlCharacter { position, found }),
        None => Ok(()),
    }
}

fn slice(xml: &str, start: usize, end: usize) -> Result<String, DomainXmlError> {
    xml.get(start..end)
        .map(str::to_string)
        .ok_or(DomainXmlError::Slice { start, end })
}

/// What the scan of a domain XML collects, element by element.
#[derive(Default)]
struct DeviceScan {
    /// Element names from the root down to the current element.
    path: Vec<String>,
    interfaces: Vec<DomainInterface>,
    /// The `<interface>` being read, and where its XML starts.
    interface: Option<(DomainInterface, usize)>,
    /// (index, hotplug allowed) of the pcie-root-port controllers.
    ports: Vec<(u32, bool)>,
    port: Option<(u32, bool)>,
    /// Buses that a device other than an `<interface>` sits on.
    other_buses: BTreeSet<u32>,
    in_dac_label: bool,
    dac_owner: Option<Owner>,
}

impl DeviceScan {
    fn in_devices(&self) -> bool {
        self.path.len() >= 2 && self.path[0] == "domain" && self.path[1] == "devices"
    }

    /// An element opens at byte `start` of the document.
    fn open(&mut self, e: &BytesStart<'_>, start: usize) -> Result<String, DomainXmlError> {
        let name = e.local_name().as_ref().to_string();
        let depth = self.path.len();
        if depth == 1 && self.path[0] == "domain" && name == "seclabel" {
            self.in_dac_label = attr(e, "seclabel", "model")?.as_deref() == Some("dac");
        }
        if !self.in_devices() {
            return Ok(name);
        }
        match (depth, name.as_str()) {
            // A device element directly under <devices>.
            (2, "interface") => {
                let iface = DomainInterface {
                    link_up: true,
                    ..Default::default()
                };
                self.interface = Some((iface, start));
            }
            (2, "controller")
                if attr(e, "controller", "type")?.as_deref() == Some("pci")
                    && attr(e, "controller", "model")?.as_deref() == Some("pcie-root-port") =>
            {
                // A PCI controller's index is the bus number it provides.
                let index = number(e, "controller", "index", 0xff)?.ok_or(
                    DomainXmlError::MissingAttribute {
                        element: "controller",
                        attr: "index",
                    },
                )?;
                self.port = Some((index, true));
            }
            // A direct child of a device.
            (3, _) => self.device_child(&name, e)?,
            _ => {}
        }
        Ok(name)
    }

    fn device_child(&mut self, name: &str, e: &BytesStart<'_>) -> Result<(), DomainXmlError> {
        if name == "address" && attr(e, "address", "type")?.as_deref() == Some("pci") {
            let mut parts = [0u32; 4];
            for (value, (part, max)) in parts.iter_mut().zip(PCI_LIMITS) {
                *value = number(e, "address", part, max)?.unwrap_or(0);
            }
            let [domain, bus, slot, function] = parts;
            match self.interface.as_mut() {
                Some((iface, _)) if self.path[2] == "interface" => {
                    // In range: checked against PCI_LIMITS above.
                    iface.pci = Some(PciAddress {
                        domain: domain as u16,
                        bus: bus as u8,
                        slot: slot as u8,
                        function: function as u8,
                    });
                }
                _ => {
                    self.other_buses.insert(bus);
                }
            }
        }
        if self.path[2] == "controller"
            && name == "target"
            && let Some(port) = self.port.as_mut()
        {
            port.1 = attr(e, "target", "hotplug")?.as_deref() != Some("off");
        }
        if let (Some((iface, _)), "interface") = (self.interface.as_mut(), self.path[2].as_str()) {
            read_interface_child(iface, name, e)?;
        }
        Ok(())
    }

    /// The device element `name` under <devices> closed at byte `end`.
    fn close_device(&mut self, name: &str, xml: &str, end: usize) -> Result<(), DomainXmlError> {
        match name {
            "interface" => {
                if let Some((mut iface, start)) = self.interface.take() {
                    iface.xml = slice(xml, start, end)?;
                    self.interfaces.push(iface);
                }
            }
            "controller" => self.ports.extend(self.port.take()),
            _ => {}
        }
        Ok(())
    }

    fn finish(self) -> DomainDevices {
        let mut hotpluggable: Vec<u8> = self
            .ports
            .iter()
            .filter(|p| p.1)
            // The index was read with a limit of 0xff.
            .map(|p| p.0 as u8)
            .collect();
        hotpluggable.sort_unstable();
        hotpluggable.dedup();
        let ports = hotpluggable
            .into_iter()
            .map(|index| {
                let interface = self
                    .interfaces
                    .iter()
                    .find(|i| i.pci.is_some_and(|a| a.domain == 0 && a.bus == index));
                let occupant = match interface {
                    Some(i) => Occupant::Interface {
                        alias: i.alias.clone(),
                    },
                    None if self.other_buses.contains(&u32::from(index)) => Occupant::OtherDevice,
                    None => Occupant::Free,
                };
                RootPort {
                    index: RootPortIndex(index),
                    occupant,
                }
            })
            .collect();
        DomainDevices {
            interfaces: self.interfaces,
            root_ports: RootPorts { ports },
            dac_owner: self.dac_owner,
        }
    }
}

/// Parses the interfaces and root ports out of a domain XML.
pub fn parse_devices(xml: &str) -> Result<DomainDevices, DomainXmlError> {
    check_chars(xml)?;
    let mut reader = Reader::from_str(xml);
    let mut scan = DeviceScan::default();
    loop {
        let before = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|source| DomainXmlError::Xml {
            position: reader.buffer_position(),
            source,
        })?;
        let end = reader.buffer_position() as usize;
        match &event {
            Event::Start(e) => {
                let name = scan.open(e, before)?;
                scan.path.push(name);
            }
            Event::Empty(e) => {
                // <interface/> or <controller/> closes where it opens.
                let name = scan.open(e, before)?;
                if scan.in_devices() && scan.path.len() == 2 {
                    scan.close_device(&name, xml, end)?;
                }
            }
            Event::End(_) => {
                let name = scan.path.pop();
                if scan.in_devices() && scan.path.len() == 2 {
                    scan.close_device(name.as_deref().unwrap_or_default(), xml, end)?;
                }
            }
            Event::Text(text)
                if scan.in_dac_label && scan.path.len() == 3 && scan.path[2] == "label" =>
            {
                let label: &str = text;
                scan.dac_owner = parse_dac_label(label);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(scan.finish())
}

/// QEMU's user as the connection's capabilities name it: the base label of
/// the DAC security model (`<host><secmodel><model>dac</model><baselabel
/// type='kvm'>+64055:+64055</baselabel>`), what a system daemon gives every
/// QEMU it starts unless the domain says otherwise. It tells before any QEMU
/// runs (a migration target). libvirt prints one label per virtualization
/// type, all from the same `user`/`group` of qemu.conf: `kvm` (what KubeVirt
/// runs) is taken first, then `qemu` (TCG), then any.
pub fn dac_base_owner(capabilities: &str) -> Result<Option<Owner>, DomainXmlError> {
    check_chars(capabilities)?;
    let mut reader = Reader::from_str(capabilities);
    let mut path: Vec<String> = Vec::new();
    // The current secmodel's model and labels (type, text).
    let mut model = String::new();
    let mut labels: Vec<(String, String)> = Vec::new();
    let mut label_type = None;
    let mut dac: Vec<(String, String)> = Vec::new();
    loop {
        let event = reader.read_event().map_err(|source| DomainXmlError::Xml {
            position: reader.buffer_position(),
            source,
        })?;
        match &event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_string();
                if name == "baselabel" {
                    label_type = Some(attr(e, "baselabel", "type")?.unwrap_or_default());
                }
                path.push(name);
            }
            Event::End(_) => {
                let closed = path.pop();
                if closed.as_deref() == Some("secmodel") {
                    if model == "dac" {
                        dac.append(&mut labels);
                    }
                    model.clear();
                    labels.clear();
                }
            }
            Event::Text(text) => {
                let text: &str = text;
                let at = |p: &[&str]| path.iter().map(String::as_str).eq(p.iter().copied());
                if at(&["capabilities", "host", "secmodel", "model"]) {
                    model = text.trim().to_string();
                } else if at(&["capabilities", "host", "secmodel", "baselabel"]) {
                    labels.push((label_type.take().unwrap_or_default(), text.to_string()));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let owner_of = |virt: Option<&str>| {
        dac.iter()
            .filter(|(t, _)| virt.is_none_or(|v| t == v))
            .find_map(|(_, label)| parse_dac_label(label))
    };
    Ok(owner_of(Some("kvm"))
        .or_else(|| owner_of(Some("qemu")))
        .or_else(|| owner_of(None)))
}

/// `interface_xml` with its `<link>` element replaced by `<link state='up|down'/>`:
/// the document for `virDomainUpdateDeviceFlags`.
pub fn with_link_state(interface_xml: &str, up: bool) -> Result<String, DomainXmlError> {
    use quick_xml::events::BytesStart;
    let mut reader = Reader::from_str(interface_xml);
    let mut writer = quick_xml::Writer::new(Vec::new());
    let mut depth = 0usize;
    let mut skipping_link = false;
    let state = if up { "up" } else { "down" };
    loop {
        let event = reader.read_event().map_err(|source| DomainXmlError::Xml {
            position: reader.buffer_position(),
            source,
        })?;
        let write = match &event {
            Event::Eof => break,
            Event::Start(e) => {
                depth += 1;
                if depth == 2 && e.local_name().as_ref() == "link" {
                    skipping_link = true;
                }
                !skipping_link
            }
            Event::Empty(e) => {
                let is_link = depth == 1 && e.local_name().as_ref() == "link";
                !(skipping_link || is_link)
            }
            Event::End(e) => {
                let closing_link = skipping_link && depth == 2;
                depth = depth.saturating_sub(1);
                if closing_link {
                    skipping_link = false;
                    false
                } else {
                    if depth == 0 && e.local_name().as_ref() == "interface" {
                        let mut link = BytesStart::new("link");
                        link.push_attribute(("state", state));
                        writer
                            .write_event(Event::Empty(link))
                            .expect("writing to a Vec");
                    }
                    true
                }
            }
            _ => !skipping_link,
        };
        if write {
            writer.write_event(event).expect("writing to a Vec");
        }
    }
    Ok(String::from_utf8_lossy(&writer.into_inner()).into_owned())
}

/// Parses a DAC label, `+64055:+64055` or `107:107`.
fn parse_dac_label(label: &str) -> Option<Owner> {
    label.trim().replace('+', "").parse().ok()
}

fn read_interface_child(
    iface: &mut DomainInterface,
    name: &str,
    e: &BytesStart<'_>,
) -> Result<(), DomainXmlError> {
    // libvirt always prints these attributes; without them the element is
    // not libvirt's.
    match name {
        "alias" => iface.alias = Some(required(e, "alias", "name")?),
        "mac" => {
            let value = required(e, "mac", "address")?;
            iface.mac = Some(value.parse().map_err(|_| DomainXmlError::Attribute {
                element: "mac",
                attr: "address",
                value,
            })?);
        }
        "target" => iface.target_dev = attr(e, "target", "dev")?,
        "source" => iface.source_dev = attr(e, "source", "dev")?,
        "backend" => iface.backend = attr(e, "backend", "type")?,
        "link" => iface.link_up = attr(e, "link", "state")?.as_deref() != Some("down"),
        "model" => iface.model = attr(e, "model", "type")?,
        "driver" => iface.queues = number(e, "driver", "queues", u32::MAX)?,
        "mtu" => {
            iface.mtu = Some(number(e, "mtu", "size", u32::MAX)?.ok_or(
                DomainXmlError::MissingAttribute {
                    element: "mtu",
                    attr: "size",
                },
            )?)
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = include_str!("../../fixtures/domain/running-two-nics.xml");

    #[test]
    fn reads_interfaces_and_ports() {
        let devices = parse_devices(DOMAIN).unwrap();
        assert_eq!(devices.interfaces.len(), 2);
        let first = &devices.interfaces[0];
        assert_eq!(first.alias.as_deref(), Some("ua-default"));
        assert_eq!(first.target_dev.as_deref(), Some("tap0"));
        assert!(first.link_up);
        let second = &devices.interfaces[1];
        assert_eq!(second.alias.as_deref(), Some("ua-dyniface1"));
        assert_eq!(second.mac.unwrap().to_string(), "02:00:00:aa:bb:01");
        assert_eq!(second.target_dev.as_deref(), Some("tap9a6a0c3b4d8"));
        assert!(!second.link_up);
        assert_eq!(second.queues, Some(2));
        assert_eq!(second.mtu, Some(1400));
        assert_eq!(second.model.as_deref(), Some("virtio-non-transitional"));
        // 5 root ports, one with hotplug off; buses 1 and 2 are taken by the NICs, 3 by the serial controller.
        assert_eq!(devices.root_ports.total(), 4);
        assert_eq!(devices.root_ports.free(), 1);
        let occupants: Vec<(u8, &Occupant)> = devices
            .root_ports
            .ports
            .iter()
            .map(|p| (p.index.0, &p.occupant))
            .collect();
        let iface = |alias: &str| Occupant::Interface {
            alias: Some(alias.into()),
        };
        assert_eq!(
            occupants,
            [
                (1, &iface("ua-default")),
                (2, &iface("ua-dyniface1")),
                (3, &Occupant::OtherDevice),
                (4, &Occupant::Free)
            ]
        );
        assert_eq!(second.pci.unwrap().to_string(), "0000:02:00.0");
        assert_eq!(devices.dac_owner, Some(Owner { uid: 107, gid: 107 }));
    }

    /// What libvirt 11.3's system daemon prints (the rig's, `virsh
    /// capabilities`, trimmed): QEMU runs as `libvirt-qemu`.
    const CAPABILITIES: &str = "<capabilities>
  <host>
    <uuid>2f6b4a7e-0000-4000-8000-000000000001</uuid>
    <cpu><arch>x86_64</arch></cpu>
    <secmodel>
      <model>none</model>
      <doi>0</doi>
    </secmodel>
    <secmodel>
      <model>dac</model>
      <doi>0</doi>
      <baselabel type='kvm'>+64055:+64055</baselabel>
      <baselabel type='qemu'>+64055:+64055</baselabel>
    </secmodel>
  </host>
  <guest><os_type>hvm</os_type></guest>
</capabilities>";

    #[test]
    fn qemu_user_from_the_capabilities_dac_base_label() {
        let owner = Owner {
            uid: 64055,
            gid: 64055,
        };
        assert_eq!(dac_base_owner(CAPABILITIES).unwrap(), Some(owner));
        // kvm first, then qemu, whatever the order.
        let mixed = CAPABILITIES
            .replace("type='kvm'>+64055:+64055", "type='qemu'>+1:+2")
            .replacen("type='qemu'>+64055:+64055", "type='kvm'>+107:+107", 1);
        assert_eq!(
            dac_base_owner(&mixed).unwrap(),
            Some(Owner { uid: 107, gid: 107 })
        );
        let tcg_only = CAPABILITIES.replace("<baselabel type='kvm'>+64055:+64055</baselabel>", "");
        assert_eq!(dac_base_owner(&tcg_only).unwrap(), Some(owner));
        // A label of another model (selinux) is no user.
        let selinux = CAPABILITIES.replace("<model>dac</model>", "<model>selinux</model>");
        assert_eq!(dac_base_owner(&selinux).unwrap(), None);
        assert_eq!(
            dac_base_owner("<capabilities><host/></capabilities>").unwrap(),
            None
        );
        assert!(dac_base_owner("<capabilities></host>").is_err());
    }

    #[test]
    fn keeps_each_interface_xml_and_rewrites_its_link_state() {
        let devices = parse_devices(DOMAIN).unwrap();
        let second = &devices.interfaces[1].xml;
        assert!(
            second.starts_with("<interface type='ethernet'>"),
            "{second}"
        );
        assert!(second.ends_with("</interface>"), "{second}");
        assert!(second.contains("ua-dyniface1"));

        let up = with_link_state(second, true).unwrap();
        assert!(up.contains("<link state=\"up\"/>"), "{up}");
        assert!(!up.contains("state='down'"), "{up}");
        let reparsed = parse_devices(&format!("<domain><devices>{up}</devices></domain>")).unwrap();
        assert!(reparsed.interfaces[0].link_up);
        assert_eq!(
            reparsed.interfaces[0].alias.as_deref(),
            Some("ua-dyniface1")
        );
        assert_eq!(reparsed.interfaces[0].queues, Some(2));

        let first = &devices.interfaces[0].xml;
        let down = with_link_state(first, false).unwrap();
        let reparsed =
            parse_devices(&format!("<domain><devices>{down}</devices></domain>")).unwrap();
        assert!(!reparsed.interfaces[0].link_up);
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(parse_devices("<domain><devices><interface></devices>").is_err());
    }
}
