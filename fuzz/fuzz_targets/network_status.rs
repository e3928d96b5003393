//! Multus network-status: the JSON array, the downward-API annotations file
//! and Go's string unquoting on their own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nicplug::sources::network_status;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = network_status::parse(text);
    let _ = network_status::go_unquote(text);
});
