//! The status document: per VMI interface, KubeVirt's `status.interfaces`
//! field names plus nicplug's phase and message. Written atomically (temp
//! file + rename) and only when it changed.

use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::plan::Phase;

/// A point in time on two clocks: wall time for people, CLOCK_MONOTONIC
/// nanoseconds for comparing with other processes on the same machine
/// (benchmark harnesses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timestamp {
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub monotonic_ns: u64,
}

impl Timestamp {
    pub fn now() -> Self {
        Self {
            time: SystemTime::now(),
            monotonic_ns: monotonic_ns(),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// When an interface entered a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    pub phase: Phase,
    #[serde(flatten)]
    pub at: Timestamp,
}

/// One VMI interface: KubeVirt's `status.interfaces` fields, then nicplug's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The VMI interface (and network) name.
    pub name: String,
    /// The interface name inside the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The first of `ip_addresses`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_interface_name: Option<String>,
    /// Comma-joined sources of this entry, as KubeVirt writes them
    /// (`domain, guest-agent, multus-status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_source: Option<String>,
    /// `up` or `down`, as the domain has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_count: Option<u32>,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When nicplug first saw the pod interface of this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_interface_seen: Option<Timestamp>,
    /// When each phase was entered, oldest first (the latest entry per phase).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transitions: Vec<PhaseTransition>,
}

impl InterfaceStatus {
    pub fn new(name: impl Into<String>, phase: Phase) -> Self {
        Self {
            name: name.into(),
            interface_name: None,
            mac: None,
            ip_address: None,
            ip_addresses: Vec::new(),
            pod_interface_name: None,
            info_source: None,
            link_state: None,
            queue_count: None,
            phase,
            message: None,
            pod_interface_seen: None,
            phase_transitions: Vec::new(),
        }
    }

    /// When the current phase was entered.
    pub fn phase_since(&self) -> Option<&Timestamp> {
        self.phase_transitions
            .iter()
            .rev()
            .find(|t| t.phase == self.phase)
            .map(|t| &t.at)
    }
}

/// An interface the guest agent reports that matches no domain device
/// (loopback excluded), like KubeVirt's guest-only entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestInterfaceStatus {
    pub interface_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
}

/// KubeVirt caps guest-only interfaces at this many.
pub const MAX_GUEST_ONLY: usize = 10;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDocument {
    pub interfaces: Vec<InterfaceStatus>,
    /// Interfaces only the guest knows, at most [`MAX_GUEST_ONLY`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_interfaces: Vec<GuestInterfaceStatus>,
    /// Whether the guest agent answers (`None` while nothing is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent_connected: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write status file {path}")]
pub struct StatusError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Writes the document to `path` atomically: readers see the old or the new
/// document, never a partial one.
pub fn write_atomically(path: &Path, doc: &StatusDocument) -> Result<(), StatusError> {
    let err = |source| StatusError {
        path: path.to_path_buf(),
        source,
    };
    let mut json = serde_json::to_vec_pretty(doc).map_err(|e| err(e.into()))?;
    json.push(b'\n');
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubevirt_field_names_and_atomic_replace() {
        let doc = StatusDocument {
            interfaces: vec![InterfaceStatus {
                pod_interface_name: Some("pod9a6a0c3b4d8".into()),
                mac: Some("02:00:00:aa:bb:01".into()),
                link_state: Some("up".into()),
                info_source: Some("domain".into()),
                phase_transitions: vec![PhaseTransition {
                    phase: Phase::Attached,
                    at: Timestamp::now(),
                }],
                ..InterfaceStatus::new("dyniface1", Phase::Attached)
            }],
            ..StatusDocument::default()
        };
        let dir = std::env::temp_dir().join(format!("nicplug-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("status.json");
        write_atomically(&path, &doc).unwrap();
        write_atomically(&path, &doc).unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let iface = &value["interfaces"][0];
        assert_eq!(iface["podInterfaceName"], "pod9a6a0c3b4d8");
        assert_eq!(iface["infoSource"], "domain");
        assert_eq!(iface["linkState"], "up");
        assert_eq!(iface["phase"], "Attached");
        assert!(iface.get("message").is_none());
        assert_eq!(iface["phaseTransitions"][0]["phase"], "Attached");
        assert!(
            iface["phaseTransitions"][0]["time"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        assert!(
            iface["phaseTransitions"][0]["monotonicNs"]
                .as_u64()
                .unwrap()
                > 0
        );
        // The document reads back (the CLI and tests parse it).
        let back: StatusDocument = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(back.interfaces[0].name, "dyniface1");
        // only the status file is left, no temp files
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
