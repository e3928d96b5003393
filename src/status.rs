//! The status document: per VMI interface, KubeVirt's `status.interfaces`
//! field names plus nicplug's phase and message. Written atomically (temp
//! file + rename) and only when it changed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::plan::Phase;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The VMI interface (and network) name.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_interface_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `up` or `down`, as the domain has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_state: Option<String>,
    /// Comma-joined sources of this entry, as KubeVirt writes them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info_source: Option<String>,
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatusDocument {
    pub interfaces: Vec<InterfaceStatus>,
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
                name: "dyniface1".into(),
                pod_interface_name: Some("pod9a6a0c3b4d8".into()),
                mac: Some("02:00:00:aa:bb:01".into()),
                link_state: Some("up".into()),
                info_source: Some("domain".into()),
                phase: Phase::Attached,
                message: None,
            }],
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
        // only the status file is left, no temp files
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
