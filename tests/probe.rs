//! `nicplug probe healthz|readyz`, the command the injected sidecar's exec
//! probes run (deploy/cluster/policy.yaml): exit 0 exactly when the endpoint
//! answers 200, the body on stdout; otherwise exit 1 with the status and the
//! body (what kubelet shows in the probe's event). A stand-in API on a unix
//! socket answers; no root, no agent.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

/// Serves one request per connection on `socket`: `/healthz` 200,
/// `/readyz` `ready_code`.
fn serve(socket: &Path, ready_code: u16) {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).expect("header") <= 2 {
                    break;
                }
            }
            let (code, body) = match line.split_whitespace().nth(1) {
                Some("/healthz") => (200, "ok\n".to_string()),
                Some("/readyz") if ready_code == 200 => (200, "ok\n".to_string()),
                Some("/readyz") => (
                    ready_code,
                    "not ready: libvirt (connection refused)\n".to_string(),
                ),
                _ => (404, "not found\n".to_string()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

fn probe(socket: &Path, endpoint: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nicplug"))
        .args(["probe", endpoint, "--socket"])
        .arg(socket)
        .output()
        .expect("run nicplug probe");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nicplug-probe-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[test]
fn ready_agent_passes_both_probes() {
    let dir = scratch("ready");
    let socket = dir.join("api.sock");
    serve(&socket, 200);
    assert_eq!(probe(&socket, "healthz"), (0, "ok\n".into(), String::new()));
    assert_eq!(probe(&socket, "readyz"), (0, "ok\n".into(), String::new()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn not_ready_fails_readiness_only_with_the_reason() {
    let dir = scratch("unready");
    let socket = dir.join("api.sock");
    serve(&socket, 503);
    assert_eq!(probe(&socket, "healthz").0, 0, "alive while not ready");
    let (code, out, err) = probe(&socket, "readyz");
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(
        err.contains("/readyz: 503") && err.contains("libvirt (connection refused)"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_agent_fails_both() {
    let dir = scratch("none");
    let socket = dir.join("api.sock");
    for endpoint in ["healthz", "readyz"] {
        let (code, _, err) = probe(&socket, endpoint);
        assert_eq!(code, 1, "{endpoint}");
        assert!(
            err.starts_with(&format!("nicplug probe: /{endpoint}: ")),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
