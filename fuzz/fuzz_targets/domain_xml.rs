//! The live domain XML reader, and the link-state rewrite of every interface
//! it returns (which must read back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nicplug::hypervisor::domain_xml::{parse_devices, with_link_state};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(devices) = parse_devices(text) else {
        return;
    };
    assert!(devices.root_ports.free() <= devices.root_ports.total());
    // Root ports come ordered by index, each once.
    assert!(
        devices
            .root_ports
            .ports
            .windows(2)
            .all(|w| w[0].index < w[1].index)
    );
    for iface in &devices.interfaces {
        for up in [true, false] {
            if let Ok(xml) = with_link_state(&iface.xml, up) {
                let _ = parse_devices(&format!("<domain><devices>{xml}</devices></domain>"));
            }
        }
    }
});
