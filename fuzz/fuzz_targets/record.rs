//! The pod link record in an ifalias: parsing, and the round trip of what
//! parsed; and the link names derived from a pod link's name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nicplug::model::names::PlumbingNames;
use nicplug::model::{IfName, PodLinkRecord};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(record) = PodLinkRecord::from_alias(text)
        && let Ok(alias) = record.to_alias()
    {
        assert_eq!(PodLinkRecord::from_alias(&alias).as_ref(), Ok(&record));
    }
    // A link carrying a record can have any name the kernel allows.
    if let Ok(name) = IfName::new(text) {
        let names = PlumbingNames::for_pod_iface(&name);
        for derived in [&names.bridge, &names.tap, &names.kubevirt_renamed_pod] {
            assert!(
                IfName::new(derived.as_str()).is_ok(),
                "{derived} from {name}"
            );
        }
    }
});
