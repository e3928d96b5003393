//! End-to-end on the rig: stable guest NIC placement. Each hot-plugged
//! interface goes on the root port its position in the spec names
//! (docs/design.md, "Stable guest NIC placement"), checked in the live
//! domain XML, in the status document and in the guest's sysfs. Needs root;
//! see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::collections::BTreeMap;
use std::time::Duration;

use e2e::*;
use support::{CniNet, Rig, RigOptions};

const PLUG: Duration = Duration::from_secs(30);

/// The PCI address (`0000:01:00.0`) of device `alias` in the live domain.
fn domain_address(rig: &Rig, alias: &str) -> Option<String> {
    address_in(&rig.domain_xml(), alias)
}

/// The PCI address of device `alias` in the persistent definition.
fn config_address(rig: &Rig, alias: &str) -> Option<String> {
    address_in(&rig.domain_config_xml(), alias)
}

fn address_in(domain_xml: &str, alias: &str) -> Option<String> {
    nicplug::hypervisor::domain_xml::parse_devices(domain_xml)
        .unwrap()
        .interfaces
        .into_iter()
        .find(|i| i.alias.as_deref() == Some(alias))
        .and_then(|i| i.pci)
        .map(|a| a.to_string())
}

/// The PCI address the guest's NIC `name` sits on: the PCI function its
/// `/sys/class/net/<name>/device` (a virtio device) hangs under.
fn guest_pci_address(rig: &Rig, name: &str) -> String {
    let (code, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!("readlink -f /sys/class/net/{name}/device"),
    ]);
    assert_eq!(code, 0, "readlink in the guest: {out}");
    // /sys/devices/pci0000:00/0000:00:02.0/0000:01:00.0/virtio1
    let path = out.trim();
    let parent = path.rsplit('/').nth(1).unwrap_or_default();
    assert!(
        parent.len() == 12 && parent.as_bytes()[4] == b':',
        "unexpected sysfs path {path}"
    );
    parent.to_string()
}

/// Where one plugged network ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placed {
    /// In the live domain XML.
    domain: String,
    /// In the status document.
    status: String,
    /// In the guest's sysfs.
    guest: String,
    /// The guest's name for the NIC.
    name: String,
}

/// Waits until `network` is Attached and the guest sees `mac`, then reads
/// where it sits.
fn where_placed(rig: &Rig, nicplug: &Nicplug<'_>, network: &str, mac: &str) -> Placed {
    nicplug.wait_phase(network, Phase::Attached, PLUG);
    let guest = rig
        .wait_guest_mac(mac, PLUG)
        .unwrap_or_else(|| panic!("the guest does not see {mac} of {network}"));
    let entry = nicplug.entry(network).unwrap();
    Placed {
        domain: domain_address(rig, &format!("ua-{network}")).expect("device has an address"),
        status: entry["pciAddress"].as_str().unwrap_or_default().to_string(),
        guest: guest_pci_address(rig, &guest.name),
        name: guest.name,
    }
}

/// The address a root port's device gets: bus = the port's index.
fn on_port(index: u8) -> String {
    format!("0000:{index:02x}:00.0")
}

/// Plugs `order` (CNI ADD one at a time, each once the previous one is
/// Attached) with `spec` listing them all, on a fresh rig; returns where
/// each landed.
fn plug_all(
    rig: &Rig,
    nicplug: &Nicplug<'_>,
    nets: &BTreeMap<&str, CniNet>,
    spec: &[&str],
    order: &[&str],
) -> BTreeMap<String, (String, Placed)> {
    nicplug.set_spec(spec);
    let mut out = BTreeMap::new();
    for network in order {
        let cni = rig.cni_add(&nets[network], &pod_iface(network));
        let at = where_placed(rig, nicplug, network, &cni.mac);
        rig.log(&format!("{network}: {at:?}"));
        assert_eq!(
            at.domain, at.status,
            "{network}: status says what the domain has"
        );
        assert_eq!(at.domain, at.guest, "{network}: the guest sees it there");
        assert_eq!(
            config_address(rig, &format!("ua-{network}")).as_ref(),
            Some(&at.domain),
            "{network}: the persistent definition has the same address"
        );
        out.insert(network.to_string(), (cni.mac, at));
    }
    out
}

#[test]
fn nics_land_on_the_ports_their_spec_position_names() {
    if !support::require_root() {
        return;
    }
    let opts = RigOptions {
        root_ports: 4,
        ..RigOptions::default()
    };
    let nets: BTreeMap<&str, CniNet> = [("red", 40), ("green", 41), ("blue", 42), ("white", 43)]
        .into_iter()
        .map(|(n, i)| (n, CniNet::new(i)))
        .collect();
    let spec = ["red", "green", "blue"];

    let first = {
        let rig = Rig::start(opts.clone());
        let mut nicplug = Nicplug::new(&rig, &[]);
        nicplug.start();
        // The rig's domain has no other device on a root port: the pool is
        // ports 1..=4, the k-th hot-plug interface of the spec goes on port k+1.
        let placed = plug_all(&rig, &nicplug, &nets, &spec, &spec);
        for (k, network) in spec.iter().enumerate() {
            assert_eq!(placed[*network].1.domain, on_port(k as u8 + 1), "{network}");
            // Once CNI is done with the pod link (until then the message
            // says nicplug waits for it).
            let quiet = support::poll(Duration::from_secs(5), Duration::from_millis(50), || {
                nicplug
                    .entry(network)
                    .filter(|e| e.get("message").is_none())
            });
            assert!(
                quiet.is_some(),
                "{network}: no fallback, no message: {:?}",
                nicplug.entry(network)
            );
        }

        // Unplug the middle one and plug a fourth. libvirt alone would put
        // the new NIC on green's freed port 2 (and the guest would give it
        // green's name); nicplug keeps port 2 for green.
        nicplug.set_spec_states(&[
            ("red", "up"),
            ("green", "absent"),
            ("blue", "up"),
            ("white", "up"),
        ]);
        nicplug.wait_phase("green", Phase::Detached, PLUG);
        assert!(rig.wait_guest_mac_gone(&placed["green"].0, PLUG));
        let white_cni = rig.cni_add(&nets["white"], &pod_iface("white"));
        let white = where_placed(&rig, &nicplug, "white", &white_cni.mac);
        assert_eq!(white.domain, on_port(4), "white takes its own port");
        assert_eq!(white.domain, white.guest);
        assert_eq!(rig.free_root_ports(), 1, "green's port stays free");
        for network in ["red", "blue"] {
            let (mac, before) = &placed[network];
            let now = where_placed(&rig, &nicplug, network, mac);
            assert_eq!(&now, before, "{network} kept its address and guest name");
        }

        // Green comes back: its port is free, it gets it again.
        nicplug.set_spec(&["red", "green", "blue", "white"]);
        let green = where_placed(&rig, &nicplug, "green", &placed["green"].0);
        assert_eq!(green.domain, on_port(2), "green is back on its port");
        assert_eq!(green.guest, on_port(2));
        assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
        placed
    };

    // The same spec on a fresh VM, the pod interfaces appearing in reverse
    // order: the same addresses.
    let rig = Rig::start(opts);
    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    let reversed: Vec<&str> = spec.iter().rev().copied().collect();
    let again = plug_all(&rig, &nicplug, &nets, &spec, &reversed);
    for network in spec {
        assert_eq!(
            again[network].1.domain, first[network].1.domain,
            "{network}: same spec, same address"
        );
    }
    assert!(!nicplug.log().contains("ERROR"), "{}", nicplug.log());
}
