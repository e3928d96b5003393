//! A document in a file, watched and re-parsed on every change.
//!
//! The parent directory is watched (inotify through `notify`), not the file:
//! editors and `kubectl ... > tmp && mv tmp file` replace the file by
//! rename, and downward-API volumes swap a `..data` symlink, both of which a
//! watch on the file itself would miss. Every event re-reads the path
//! (following symlinks); unchanged content is ignored. A bad document is
//! reported once with the file and the problem, and the last good value stays.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {what} file {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} document in {path}")]
    Parse {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot watch directory {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// Events of one burst (a rename is several) are read as one.
const SETTLE: Duration = Duration::from_millis(10);

/// How a watched document is parsed and named in logs.
pub struct Document<T> {
    /// What the file holds, for messages: "VMI", "network-status".
    pub what: &'static str,
    pub parse: fn(&str) -> Result<T, Box<dyn std::error::Error + Send + Sync>>,
    /// A short summary for the "loaded" log line.
    pub summary: fn(&T) -> String,
}

/// Publishes the document at `path` into `tx` now and after every change,
/// until `shutdown`.
pub async fn watch_file<T: PartialEq>(
    path: PathBuf,
    doc: Document<T>,
    tx: watch::Sender<Option<T>>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let watch_error = |source| SourceError::Watch {
        path: dir.clone(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reading the file is an access event of the watched directory:
        // reacting to it would re-read forever.
        if event.is_ok_and(|e| !matches!(e.kind, EventKind::Access(_))) {
            let _ = events_tx.send(());
        }
    })
    .map_err(watch_error)?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;

    let mut last_text: Option<String> = None;
    let mut last_error: Option<String> = None;
    loop {
        let outcome = match std::fs::read_to_string(&path) {
            Ok(text) if last_text.as_deref() == Some(&text) => None,
            Ok(text) => {
                let parsed = (doc.parse)(&text).map_err(|source| SourceError::Parse {
                    what: doc.what,
                    path: path.clone(),
                    source,
                });
                last_text = Some(text);
                Some(parsed)
            }
            Err(source) => {
                last_text = None;
                Some(Err(SourceError::Read {
                    what: doc.what,
                    path: path.clone(),
                    source,
                }))
            }
        };
        match outcome {
            Some(Ok(value)) => {
                last_error = None;
                if tx.borrow().as_ref() != Some(&value) {
                    info!(file = %path.display(), summary = %Summary((doc.summary)(&value)), "{} loaded", doc.what);
                    tx.send_replace(Some(value));
                }
            }
            Some(Err(e)) => {
                let message = crate::agent::error_chain(&e);
                if last_error.as_deref() != Some(&message) {
                    error!(error = %message, "keeping the last good {}", doc.what);
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

struct Summary(String);

impl Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
