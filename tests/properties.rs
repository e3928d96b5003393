//! Properties of the model's text forms: what is printed parses back to the
//! same value, device XML reads back through the domain XML reader with the
//! same interface fields, and no parser panics on any input.

use std::net::IpAddr;

use nicplug::hypervisor::device_xml::{DeviceBackend, InterfaceDevice};
use nicplug::hypervisor::domain_xml::{PciAddress, RootPortIndex, parse_devices};
use nicplug::model::names::PlumbingNames;
use nicplug::model::network_status;
use nicplug::model::vmi::{ForwardedPort, Vmi};
use nicplug::model::{IfName, IpCidr, Mac, Owner, PodLinkRecord, PodRoute};
use proptest::prelude::*;

/// Interface names the kernel takes: 1..=15 bytes without '/', ':',
/// whitespace or control characters (non-ASCII included).
fn ifname() -> impl Strategy<Value = IfName> {
    "[^/:\\s\\p{Cc}]{1,15}".prop_filter_map("kernel name", |s| IfName::new(s).ok())
}

fn mac() -> impl Strategy<Value = Mac> {
    any::<[u8; 6]>()
        .prop_map(|mut b| {
            b[0] &= 0xfe; // unicast
            b
        })
        .prop_filter("not zero", |b| *b != [0; 6])
        .prop_map(Mac::from_bytes)
}

fn cidr() -> impl Strategy<Value = IpCidr> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| IpCidr::new(IpAddr::from(a), p).unwrap()),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, p)| IpCidr::new(IpAddr::from(a), p).unwrap()),
    ]
}

/// Any route a record can carry: gateway and preferred source of the
/// destination's family, any table but RT_TABLE_UNSPEC, any other value.
fn route() -> impl Strategy<Value = PodRoute> {
    let family_v4 = any::<bool>();
    family_v4.prop_flat_map(|v4| {
        let addr = move || -> BoxedStrategy<IpAddr> {
            if v4 {
                any::<[u8; 4]>().prop_map(IpAddr::from).boxed()
            } else {
                any::<[u8; 16]>().prop_map(IpAddr::from).boxed()
            }
        };
        let max = if v4 { 32 } else { 128 };
        (
            (addr(), 0u8..=max),
            proptest::option::of(addr()),
            1u32..,
            any::<u8>(),
            any::<u8>(),
            any::<u32>(),
            proptest::option::of(addr()),
            any::<u8>(),
            any::<bool>(),
        )
            .prop_map(
                |(
                    (dst, prefix),
                    gateway,
                    table,
                    protocol,
                    scope,
                    metric,
                    source,
                    preference,
                    onlink,
                )| {
                    PodRoute {
                        destination: IpCidr::new(dst, prefix).unwrap(),
                        gateway,
                        table,
                        protocol,
                        scope,
                        metric,
                        preferred_source: source,
                        preference,
                        onlink,
                    }
                },
            )
    })
}

/// VMI network names nicplug accepts.
fn network() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9_-]{0,62}"
}

/// Finds the first character XML 1.0 forbids.
fn raw_control(xml: &str) -> Option<char> {
    xml.chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

proptest! {
    #[test]
    fn ifname_prints_what_it_parsed(name in ifname()) {
        let again: IfName = name.to_string().parse().unwrap();
        prop_assert_eq!(again, name);
    }

    #[test]
    fn derived_link_names_are_valid_for_any_link(name in ifname()) {
        let names = PlumbingNames::for_pod_iface(&name);
        for derived in [&names.bridge, &names.tap, &names.kubevirt_renamed_pod] {
            prop_assert!(IfName::new(derived.as_str()).is_ok(), "{} from {}", derived, name);
        }
    }

    #[test]
    fn mac_round_trips_in_every_spelling(mac in mac()) {
        let text = mac.to_string();
        prop_assert_eq!(text.parse::<Mac>().unwrap(), mac);
        prop_assert_eq!(text.to_uppercase().parse::<Mac>().unwrap(), mac);
        prop_assert_eq!(text.replace(':', "-").parse::<Mac>().unwrap(), mac);
    }

    #[test]
    fn route_round_trips(route in route()) {
        let text = route.to_string();
        prop_assert!(!text.contains([' ', ',']), "{}", text);
        prop_assert_eq!(text.parse::<PodRoute>().unwrap(), route);
    }

    #[test]
    fn cidr_round_trips(cidr in cidr()) {
        prop_assert_eq!(cidr.to_string().parse::<IpCidr>().unwrap(), cidr);
    }

    #[test]
    fn owner_round_trips(uid: u32, gid: u32) {
        let owner = Owner { uid, gid };
        prop_assert_eq!(owner.to_string().parse::<Owner>().unwrap(), owner);
    }

    #[test]
    fn record_round_trips_through_the_alias(
        network in proptest::option::of(network()),
        mac in mac(),
        mtu in 68u32..=65535,
        addresses in proptest::collection::vec(cidr(), 0..4),
        routes in proptest::collection::vec(route(), 0..4),
        previous_alias in proptest::option::of("\\PC{0,40}"),
    ) {
        let record = PodLinkRecord { network, mac, mtu, addresses, routes, previous_alias };
        // Too long for an ifalias is an error, never a truncated record.
        if let Ok(alias) = record.to_alias() {
            prop_assert!(alias.len() <= 255);
            prop_assert_eq!(PodLinkRecord::from_alias(&alias).unwrap(), record);
        }
    }

    /// Device XML from any accepted input is XML without raw control
    /// characters, and the domain XML reader reads back what was written.
    #[test]
    fn device_xml_reads_back_the_same_interface(
        network in network(),
        link in ifname(),
        passt in proptest::option::of(proptest::collection::vec(
            (prop_oneof![Just("TCP"), Just("UDP")], 1u16..=65535),
            0..4,
        )),
        model in prop_oneof![
            Just("virtio".to_string()),
            Just("e1000e".to_string()),
            "[A-Za-z0-9_.-]{1,12}",
        ],
        mac in mac(),
        mtu in 68u32..=65535,
        queues in proptest::option::of(1u32..=256),
        link_up: bool,
        bus in proptest::option::of(0u8..=255),
    ) {
        let address = bus.map(|b| PciAddress::on_root_port(RootPortIndex(b)));
        let backend = match passt {
            None => DeviceBackend::Tap,
            Some(ports) => DeviceBackend::Passt {
                forwards: ports
                    .into_iter()
                    .map(|(protocol, port)| ForwardedPort { protocol: protocol.into(), port })
                    .collect(),
            },
        };
        let device = InterfaceDevice { network, link, backend, model, mac, mtu, queues, link_up, address };
        let xml = device.to_xml().unwrap();
        prop_assert_eq!(raw_control(&xml), None);
        let mut reader = quick_xml::Reader::from_str(&xml);
        loop {
            match reader.read_event() {
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(e) => prop_assert!(false, "{e}: {xml}"),
            }
        }
        let domain = format!("<domain><devices>{xml}</devices></domain>");
        let read = parse_devices(&domain).unwrap();
        prop_assert_eq!(read.interfaces.len(), 1);
        let iface = &read.interfaces[0];
        prop_assert_eq!(iface.alias.clone(), Some(device.alias()));
        prop_assert_eq!(iface.mac, Some(device.mac));
        prop_assert_eq!(iface.model.as_deref(), Some(device.libvirt_model()));
        if let DeviceBackend::Passt { .. } = device.backend {
            prop_assert!(iface.is_passt());
            prop_assert_eq!(iface.source_dev.as_deref(), Some(device.link.as_str()));
            prop_assert_eq!(iface.target_dev.as_deref(), None);
            prop_assert_eq!(iface.mtu, None);
        } else {
            prop_assert!(!iface.is_passt());
            prop_assert_eq!(iface.target_dev.as_deref(), Some(device.link.as_str()));
            prop_assert_eq!(iface.mtu, Some(device.mtu));
        }
        prop_assert_eq!(iface.link_up, device.link_up);
        prop_assert_eq!(iface.queues, device.queues.filter(|q| *q > 1));
        prop_assert_eq!(iface.pci, device.address);
    }

    /// Any text: an answer, never a panic.
    #[test]
    fn parsers_never_panic(text in "\\PC{0,200}") {
        let _ = Vmi::parse(&text);
        let _ = network_status::parse(&text);
        let _ = network_status::go_unquote(&text);
        let _ = PodLinkRecord::from_alias(&text);
        let _ = PodLinkRecord::from_alias(&format!("nicplug/v1 {text}"));
        let _ = PodLinkRecord::from_alias(&format!("nicplug/v2 mac=02:00:00:00:00:01 mtu=1500 rt={text}"));
        let _ = text.parse::<PodRoute>();
        let _ = parse_devices(&text);
    }
}
