//! Guest-agent data as the rig returns it.

use serde_json::Value;

/// One guest network interface, from `guest-network-get-interfaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestIface {
    /// Name inside the guest (`eth0`, ...).
    pub name: String,
    /// Hardware address, lowercase (empty for interfaces without one).
    pub mac: String,
    /// Addresses with prefix, e.g. `169.254.2.50/24`, `fe80::1/64`.
    pub ips: Vec<String>,
}

impl GuestIface {
    /// Parses the `return` array of `guest-network-get-interfaces`.
    pub fn parse_all(ret: &Value) -> Vec<GuestIface> {
        ret.as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|i| GuestIface {
                name: i["name"].as_str().unwrap_or_default().to_string(),
                mac: i["hardware-address"]
                    .as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
                ips: i["ip-addresses"]
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|a| {
                        Some(format!(
                            "{}/{}",
                            a["ip-address"].as_str()?,
                            a["prefix"].as_u64()?
                        ))
                    })
                    .collect(),
            })
            .collect()
    }

    /// True if the guest reports this address (without prefix) on the interface.
    pub fn has_ip(&self, addr: &str) -> bool {
        self.ips.iter().any(|ip| ip.split('/').next() == Some(addr))
    }
}

/// The result of `guest-exec` once the process exited.
#[derive(Clone, Debug)]
pub struct GuestExec {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}
