//! A document in a file, watched and re-parsed on every change.
//!
//! The parent directory is watched (inotify through `notify`), not the file:
//! editors and `kubectl ... > tmp && mv tmp file` replace the file by
//! rename, and downward-API volumes swap a `..data` symlink, both of which a
//! watch on the file itself would miss. Every event re-reads the path
//! (following symlinks); unchanged content is ignored. A bad document is
//! reported once with the file and the problem, and the last good value stays.
//!
//! Input is bounded before it is parsed: a file larger than the document's
//! `max_bytes` is refused from its metadata, and read with a cap in case it
//! grows meanwhile; parsers bound nesting (see `model::depth`). Reading and
//! parsing run on the blocking pool: the runtime is single-threaded, and a
//! slow document must not stall the reconcile loop.

use std::fmt::Display;
use std::io::Read;
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
    #[error("{what} file {path} is larger than {limit} bytes")]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        limit: u64,
    },
    #[error("{what} file {path} is not UTF-8")]
    NotUtf8 {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::string::FromUtf8Error,
    },
    #[error("parsing the {what} document in {path} panicked")]
    Panicked { what: &'static str, path: PathBuf },
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
    /// Largest file accepted, in bytes.
    pub max_bytes: u64,
    pub parse: fn(&str) -> Result<T, Box<dyn std::error::Error + Send + Sync>>,
    /// A short summary for the "loaded" log line.
    pub summary: fn(&T) -> String,
}

/// Reads `path` as UTF-8 text of at most `limit` bytes: the size is checked
/// before reading, so a huge file is never loaded, and the read stops at
/// `limit + 1` bytes in case the file grew since (or is a pipe or device,
/// whose metadata says 0).
pub fn read_bounded(what: &'static str, path: &Path, limit: u64) -> Result<String, SourceError> {
    let read_error = |source| SourceError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let too_large = || SourceError::TooLarge {
        what,
        path: path.to_path_buf(),
        limit,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    if len > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|source| SourceError::NotUtf8 {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `work` on the blocking pool; `None` when `shutdown` came first.
async fn off_the_loop<R: Send + 'static>(
    shutdown: &CancellationToken,
    work: impl FnOnce() -> R + Send + 'static,
) -> Option<Result<R, tokio::task::JoinError>> {
    tokio::select! {
        _ = shutdown.cancelled() => None,
        joined = tokio::task::spawn_blocking(work) => Some(joined),
    }
}

/// Publishes the document at `path` into `tx` now and after every change,
/// until `shutdown`.
pub async fn watch_file<T: PartialEq + Send + 'static>(
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
        let (what, limit, parse) = (doc.what, doc.max_bytes, doc.parse);
        let panicked = || SourceError::Panicked {
            what,
            path: path.clone(),
        };
        let read = {
            let path = path.clone();
            off_the_loop(&shutdown, move || read_bounded(what, &path, limit)).await
        };
        let outcome = match read {
            None => return Ok(()),
            Some(Err(_)) => Some(Err(panicked())),
            Some(Ok(Ok(text))) if last_text.as_deref() == Some(&text) => None,
            Some(Ok(Ok(text))) => {
                match off_the_loop(&shutdown, move || {
                    let parsed = parse(&text);
                    (text, parsed)
                })
                .await
                {
                    None => return Ok(()),
                    Some(Err(_)) => {
                        last_text = None;
                        Some(Err(panicked()))
                    }
                    Some(Ok((text, parsed))) => {
                        last_text = Some(text);
                        Some(parsed.map_err(|source| SourceError::Parse {
                            what,
                            path: path.clone(),
                            source,
                        }))
                    }
                }
            }
            Some(Ok(Err(e))) => {
                last_text = None;
                Some(Err(e))
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
                let message = crate::error::error_chain(&e);
                if last_error.as_deref() != Some(&message) {
                    if tx.borrow().is_some() {
                        error!(error = %message, "keeping the last good {}", doc.what);
                    } else {
                        error!(error = %message, "no valid {} yet; waiting for one", doc.what);
                    }
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
