//! The watched VMI file source against the real filesystem and inotify:
//! every way a file gets replaced in practice is picked up, and a bad
//! document keeps the last good spec.

use std::path::Path;
use std::time::Duration;

use nicplug::model::vmi::Vmi;
use nicplug::sources::vmi_file::watch_file;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn doc(name: &str, networks: &[&str]) -> String {
    let ifaces: Vec<String> = networks
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","bridge":{{}}}}"#))
        .collect();
    let nets: Vec<String> = networks
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","multus":{{"networkName":"{n}"}}}}"#))
        .collect();
    format!(
        r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"{name}","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[{}]}}}},"networks":[{}]}}}}"#,
        ifaces.join(","),
        nets.join(",")
    )
}

/// Waits (bounded, so a bug fails instead of hanging) for a spec with `n` interfaces.
async fn expect_interfaces(rx: &mut watch::Receiver<Option<Vmi>>, n: usize) {
    let wait = rx.wait_for(|v| v.as_ref().is_some_and(|v| v.interfaces.len() == n));
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("spec with {n} interfaces never arrived"))
        .unwrap();
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nicplug-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn replace_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn rename_in_place_write_and_bad_documents() {
    let dir = temp_dir("vmi-rename");
    let path = dir.join("vmi.json");
    std::fs::write(&path, doc("vm", &["a"])).unwrap();
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_file(path.clone(), tx, stop.clone()));

    expect_interfaces(&mut rx, 1).await;
    replace_by_rename(&path, &doc("vm", &["a", "b"]));
    expect_interfaces(&mut rx, 2).await;
    std::fs::write(&path, doc("vm", &["a", "b", "c"])).unwrap();
    expect_interfaces(&mut rx, 3).await;

    // Malformed, then missing: the last good spec stays.
    replace_by_rename(&path, "{\"metadata\": ");
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.borrow().as_ref().unwrap().interfaces.len(), 3);
    // And recovery.
    replace_by_rename(&path, &doc("vm", &["z"]));
    expect_interfaces(&mut rx, 1).await;

    stop.cancel();
    task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn downward_api_data_symlink_swap() {
    // Kubelet's layout: vmi -> ..data/vmi, ..data -> ..<timestamp>/, and an
    // update creates a new timestamped dir and renames a new ..data link over the old one.
    let dir = temp_dir("vmi-dataswap");
    let v1 = dir.join("..2026_11_27_10_00_00.1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("vmi"), doc("vm", &["a"])).unwrap();
    std::os::unix::fs::symlink("..2026_11_27_10_00_00.1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/vmi", dir.join("vmi")).unwrap();

    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_file(dir.join("vmi"), tx, stop.clone()));
    expect_interfaces(&mut rx, 1).await;

    let v2 = dir.join("..2026_11_27_10_05_00.2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("vmi"), doc("vm", &["a", "b"])).unwrap();
    std::os::unix::fs::symlink("..2026_11_27_10_05_00.2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    expect_interfaces(&mut rx, 2).await;

    stop.cancel();
    task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_unchanged_file_is_not_read_again() {
    use notify::{EventKind, RecursiveMode, Watcher, event::AccessKind};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let dir = temp_dir("vmi-idle");
    let path = dir.join("vmi.json");
    std::fs::write(&path, doc("vm", &["a"])).unwrap();
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_file(path.clone(), tx, stop.clone()));
    expect_interfaces(&mut rx, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Count how often anyone opens the file while nothing changes: the
    // watcher's own reads are access events in the directory it watches,
    // and must not make it read again.
    let opens = Arc::new(AtomicUsize::new(0));
    let counter = opens.clone();
    let watched = path.clone();
    let mut spy = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && matches!(e.kind, EventKind::Access(AccessKind::Open(_)))
            && e.paths.contains(&watched)
        {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    })
    .unwrap();
    spy.watch(&dir, RecursiveMode::NonRecursive).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        opens.load(Ordering::SeqCst),
        0,
        "the idle watcher keeps reading its file"
    );

    stop.cancel();
    task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
