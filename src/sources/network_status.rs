//! Multus' network-status from a file (the raw JSON array or a downward-API
//! annotations file), watched; the format is in [`crate::model::network_status`].

use std::path::PathBuf;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::watched::{self, Document, SourceError};
use crate::model::network_status::{NetworkStatus, parse};

/// Largest network-status file read: an entry is about 300 bytes, so this
/// holds hundreds of networks; a bigger file is not the annotation.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

fn document() -> Document<Vec<NetworkStatus>> {
    Document {
        what: "network-status",
        max_bytes: MAX_FILE_BYTES,
        parse: |text| parse(text).map_err(Into::into),
        summary: |entries| format!("{} networks", entries.len()),
    }
}

/// Publishes the network-status at `path` into `tx` now and after every change.
pub async fn watch_file(
    path: PathBuf,
    tx: watch::Sender<Option<Vec<NetworkStatus>>>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    watched::watch_file(path, document(), tx, shutdown).await
}
