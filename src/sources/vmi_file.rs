//! The VMI document from a file (`kubectl get vmi NAME -o json|yaml`), watched.

use std::path::PathBuf;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::watched::{self, Document, SourceError};
use crate::model::vmi::Vmi;

/// Largest VMI file read. A VMI with dozens of disks, interfaces and a
/// cloud-init payload stays in the low hundreds of KiB (the API server's
/// own object limit is 1.5 MiB); parsing a bigger file only costs memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

fn document() -> Document<Vmi> {
    Document {
        what: "VMI",
        max_bytes: MAX_FILE_BYTES,
        parse: |text| Vmi::parse(text).map_err(Into::into),
        summary: |vmi| format!("{} interfaces", vmi.interfaces.len()),
    }
}

/// Publishes the VMI at `path` into `tx` now and after every change.
pub async fn watch_file(
    path: PathBuf,
    tx: watch::Sender<Option<Vmi>>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    watched::watch_file(path, document(), tx, shutdown).await
}
