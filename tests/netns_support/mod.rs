//! Helpers for the real-kernel tests of the pod-netns layer: throwaway
//! network namespaces with drop guards, running library code on a thread
//! inside one, and `ip -j` snapshots to check the kernel state independently
//! of nicplug's own reader.
//!
//! Safety rules kept here: every link and address is made inside a namespace
//! the test created; only link-local addresses are used; the root namespace
//! is never touched (the test thread itself never `setns`es).

use std::future::Future;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether the test may run. Not root: prints a SKIP line and returns false,
/// except under CI (`CI=true`), which runs as root and must not skip.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (creates network namespaces), and CI must not skip it");
    }
    // Written to the stderr handle, not with println!, so libtest's output
    // capture does not swallow it: a skip must be visible.
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: needs root (creates network namespaces)"
    );
    false
}

/// A network namespace created for one test, deleted on drop (also when the
/// test panics). Deleting the namespace destroys every link in it.
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nptest-{}-{}-{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n <ns> args...`, panics on failure, returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip -n <ns> -j args...` parsed.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {full:?}: bad json: {e}"))
    }

    /// `ip -d -j link show dev` of one link.
    pub fn link_json(&self, dev: &str) -> Value {
        let v = self.ip_json(&["-d", "link", "show", "dev", dev]);
        v.as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_else(|| panic!("no link {dev}"))
    }

    /// Addresses of `dev` as "addr/prefix" strings, sorted.
    pub fn addresses(&self, dev: &str) -> Vec<String> {
        let v = self.ip_json(&["addr", "show", "dev", dev]);
        let mut out: Vec<String> = v[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        out.sort();
        out
    }

    /// Waits until no address of the namespace is tentative (IPv6 DAD done),
    /// so snapshots taken a moment apart are comparable.
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self.ip(&["-j", "addr", "show"]);
            if !out.contains("\"tentative\"") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "addresses still tentative: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The whole link and address state of the namespace, without counters,
    /// timers and other fields that change on their own.
    pub fn snapshot(&self) -> Value {
        self.settle();
        let mut links = self.ip_json(&["-d", "link", "show"]);
        let mut addrs = self.ip_json(&["addr", "show"]);
        strip_volatile(&mut links);
        strip_volatile(&mut addrs);
        serde_json::json!({ "links": links, "addrs": addrs })
    }

    /// Runs `f` to completion on a fresh thread that has `setns`ed into this
    /// namespace, on a current-thread tokio runtime built on that thread (a
    /// tokio worker thread is never moved between namespaces).
    pub fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = self.path();
        let thread = std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                enter(&path);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                runtime.block_on(f())
            })
            .expect("spawn netns thread");
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl TestNs {
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

/// Moves the calling thread into the namespace at `path`. Only for threads
/// a test spawned for that purpose, never the test's own thread.
pub fn enter(path: &str) {
    let ns = std::fs::File::open(path).expect("open netns file");
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("setns into the test netns");
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete test netns {}", self.name);
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn strip_volatile(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|k, _| {
                !(k.ends_with("_timer")
                    || k.starts_with("stats")
                    || k.starts_with("carrier_")
                    || k == "gc_timer")
            });
            map.values_mut().for_each(strip_volatile);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

/// A pod namespace with a CNI-like pod interface: one end of a veth pair,
/// MTU 1400, a link-local IPv4 address (with broadcast, as CNI adds it) and
/// the kernel's fe80:: address, an alias set by "someone else"; the peer end
/// lives in a second namespace.
pub struct PodEnv {
    pub pod: TestNs,
    pub peer: TestNs,
}

pub const POD_IF: &str = "pod9a6a0c3b4d8";
pub const BRIDGE: &str = "k6t-9a6a0c3b4d8";
pub const TAP: &str = "tap9a6a0c3b4d8";
pub const ORIGINAL_ALIAS: &str = "cni secondary network";

impl PodEnv {
    pub fn new(tag: &str) -> Self {
        let pod = TestNs::new(tag);
        let peer = TestNs::new(&format!("{tag}-peer"));
        pod.ip(&[
            "link", "add", POD_IF, "mtu", "1400", "type", "veth", "peer", "name", "peer0", "netns",
            &peer.name,
        ]);
        pod.ip(&["addr", "add", "169.254.10.2/24", "brd", "+", "dev", POD_IF]);
        pod.ip(&["link", "set", "dev", POD_IF, "alias", ORIGINAL_ALIAS]);
        pod.ip(&["link", "set", POD_IF, "up"]);
        peer.ip(&["link", "set", "peer0", "up"]);
        // Wait for the kernel's link-local address and its DAD.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pod.addresses(POD_IF).iter().any(|a| a.starts_with("fe80:")) {
            assert!(Instant::now() < deadline, "no fe80:: address appeared");
            std::thread::sleep(Duration::from_millis(50));
        }
        pod.settle();
        Self { pod, peer }
    }
}
