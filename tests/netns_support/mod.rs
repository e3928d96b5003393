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
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    // libtest names each test's thread after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
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

impl TestNs {
    /// Links, addresses and routes of every table, for "nothing else
    /// changed" checks: [`TestNs::snapshot`] plus `ip -j route show table
    /// all` (IPv4 and IPv6), each route list sorted by its JSON text so that
    /// the order in which the kernel lists equal-prefix routes of different
    /// links does not matter. Every configurable field is kept.
    pub fn snapshot_with_routes(&self) -> Value {
        let mut snapshot = self.snapshot();
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            let mut table = self.ip_json(&[family, "route", "show", "table", "all"]);
            strip_volatile(&mut table);
            routes.extend(table.as_array().cloned().unwrap_or_default());
        }
        routes.sort_by_key(|r| r.to_string());
        snapshot["routes"] = Value::Array(routes);
        snapshot
    }

    /// Every per-interface IPv4 and IPv6 sysctl of the namespace (including
    /// `all` and `default`) as sorted `path:value` lines, for "nicplug
    /// changed no other link's settings" checks. Unreadable entries
    /// (`stable_secret` when unset) are left out.
    pub fn interface_sysctls(&self) -> Vec<String> {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sh",
                "-c",
                "grep -r . /proc/sys/net/ipv4/conf /proc/sys/net/ipv6/conf 2>/dev/null; true",
            ],
        );
        let mut lines: Vec<String> = out.lines().map(String::from).collect();
        lines.sort();
        lines
    }

    /// `/proc/sys/<key>` as the namespace sees it (read by `ip netns exec`).
    pub fn sysctl(&self, key: &str) -> String {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "cat",
                &format!("/proc/sys/{key}"),
            ],
        )
        .trim()
        .to_string()
    }
}

/// One frame an AF_PACKET socket saw on a link.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Sent by this namespace's own stack (PACKET_OUTGOING), as opposed to
    /// received from the wire.
    pub outgoing: bool,
    pub bytes: Vec<u8>,
}

impl Frame {
    pub fn source_mac(&self) -> String {
        mac_text(self.bytes.get(6..12).unwrap_or_default())
    }

    /// Source and destination MAC, ethertype, and for IPv6 the ICMPv6 type
    /// (135 NS, 133 RS, 143 MLDv2 report ...), for failure messages; with
    /// `NICPLUG_TEST_HEX` set, the whole frame in hex too.
    pub fn describe(&self) -> String {
        let b = &self.bytes;
        if b.len() < 14 {
            return format!("runt frame of {} bytes", b.len());
        }
        let ethertype = u16::from_be_bytes([b[12], b[13]]);
        let mut text = format!(
            "{} -> {} ethertype 0x{ethertype:04x}",
            mac_text(&b[6..12]),
            mac_text(&b[0..6])
        );
        if ethertype == 0x86dd && b.len() >= 54 {
            // Next header right after the fixed IPv6 header, or after one
            // hop-by-hop header (MLD reports carry router alert).
            let mut next = b[20];
            let mut at = 54;
            if next == 0 && b.len() >= 62 {
                next = b[54];
                at = 54 + (usize::from(b[55]) + 1) * 8;
            }
            if next == 58 && b.len() > at {
                text.push_str(&format!(" icmpv6 type {}", b[at]));
            }
        }
        if std::env::var_os("NICPLUG_TEST_HEX").is_some() {
            let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
            text.push_str(&format!(" [{}]", hex.join("")));
        }
        text
    }
}

fn mac_text(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Captures every frame on one link of a test namespace with an AF_PACKET
/// socket, on a thread of its own that `setns`es into that namespace, from
/// [`Capture::start`] (which returns once the socket is bound) until
/// [`Capture::stop`]. Dropping it stops it too.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Frame>>>,
}

impl Capture {
    pub fn start(ns: &TestNs, dev: &str) -> Capture {
        let path = ns.path();
        let dev = std::ffi::CString::new(dev).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            enter(&path);
            let fd = packet_socket(&dev);
            ready_tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !stopping.load(Ordering::Relaxed) {
                // SAFETY: all-zero is a valid sockaddr_ll.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: `buf` and `from` are valid for the lengths given
                // and outlive the call; `fd` is an open socket.
                let n = unsafe {
                    libc::recvfrom(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
                        _ => panic!("capture: recvfrom: {e}"),
                    }
                }
                frames.push(Frame {
                    outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
                    bytes: buf[..n as usize].to_vec(),
                });
            }
            frames
        });
        ready_rx
            .recv()
            .expect("capture thread died before binding its socket");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the capture and returns every frame seen.
    pub fn stop(mut self) -> Vec<Frame> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().unwrap();
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An AF_PACKET socket for every protocol, bound to `dev` of the calling
/// thread's namespace, with a 100 ms receive timeout.
fn packet_socket(dev: &std::ffi::CStr) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned right below.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    assert!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: `dev` is a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(dev.as_ptr()) };
    assert!(index != 0, "no link {dev:?} in the capture namespace");
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind(2) with a properly sized sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert!(
        rc == 0,
        "bind AF_PACKET: {}",
        std::io::Error::last_os_error()
    );
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt(2) with a timeval option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    fd
}
