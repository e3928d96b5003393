//! The VMI parser, JSON (input starting with '{') and YAML (anything else),
//! and the API path (an already parsed JSON value).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nicplug::model::vmi::Vmi;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(vmi) = Vmi::parse(text) {
        // What was accepted is usable: every derived name is computable.
        for iface in &vmi.interfaces {
            let _ = iface.alias();
            let _ = iface.pod_iface(nicplug::model::vmi::PodIfaceScheme::Hashed);
            let _ = iface.pod_iface(nicplug::model::vmi::PodIfaceScheme::Ordinal);
            let _ = iface.unsupported_reason();
        }
        let _ = vmi.domain_name();
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = Vmi::from_json_value(value);
    }
});
