//! The VMI document from a file, watched.
//!
//! The parent directory is watched (inotify through `notify`), not the file:
//! editors and `kubectl ... > tmp && mv tmp vmi.json` replace the file by
//! rename, and downward-API volumes swap a `..data` symlink, both of which a
//! watch on the file itself would miss. Every event re-reads the path
//! (following symlinks); unchanged content is ignored. A bad document is
//! reported with the file and the problem, and the last good spec stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::model::vmi::{Vmi, VmiError};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read VMI file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid VMI document in {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: VmiError,
    },
    #[error("cannot watch directory {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Reads and parses the VMI document at `path`.
pub fn load(path: &Path) -> Result<Vmi, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Vmi::parse(&text).map_err(|source| SourceError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Events of one burst (a rename is several) are read as one.
const SETTLE: Duration = Duration::from_millis(10);

/// Publishes the document at `path` into `tx` now and after every change,
/// until `shutdown`.
pub async fn watch_file(
    path: PathBuf,
    tx: watch::Sender<Option<Vmi>>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |_event| {
        let _ = events_tx.send(());
    })
    .map_err(|source| SourceError::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| SourceError::Watch {
            path: dir.clone(),
            source,
        })?;

    let mut last_text: Option<String> = None;
    let mut last_error: Option<String> = None;
    loop {
        let text = std::fs::read_to_string(&path);
        let outcome = match text {
            Ok(text) if last_text.as_deref() == Some(&text) => None,
            Ok(text) => {
                let parsed = Vmi::parse(&text).map_err(|source| SourceError::Parse {
                    path: path.clone(),
                    source,
                });
                last_text = Some(text);
                Some(parsed)
            }
            Err(source) => {
                last_text = None;
                Some(Err(SourceError::Read {
                    path: path.clone(),
                    source,
                }))
            }
        };
        match outcome {
            Some(Ok(vmi)) => {
                last_error = None;
                let changed = tx.borrow().as_ref() != Some(&vmi);
                if changed {
                    info!(file = %path.display(), interfaces = vmi.interfaces.len(), "VMI spec loaded");
                    tx.send_replace(Some(vmi));
                }
            }
            Some(Err(e)) => {
                let message = crate::agent::error_chain(&e);
                if last_error.as_deref() != Some(&message) {
                    error!(error = %message, "keeping the last good VMI spec");
                    last_error = Some(message);
                }
            }
            None => {}
        }

        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            event = events.recv() => {
                if event.is_none() {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(SETTLE).await;
        while events.try_recv().is_ok() {}
    }
}
