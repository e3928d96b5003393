//! `cargo bench --bench hotplug` (as root; `scripts/bench` wraps it): nicplug's
//! hot-plug and unplug latency per phase on the end-to-end rig (real libvirtd
//! in the pod netns, TCG guest with its agent, the real CNI bridge plugin),
//! interleaved with two baselines on the same rig and the same network:
//! `floor` (examples/floor.rs: nicplug's exact calls, straight-line) and
//! `script` (operator.sh: iproute2 + virsh). Then a burst of 8 interfaces in
//! one VMI update, nicplug's idle footprint with 8 interfaces plugged, a
//! restart with them plugged, 8 back-to-back single plugs (the burst's
//! baseline), rounds that time when the user's network works: the pod
//! interface appears -> the first packet from the node reaches the guest, and
//! rounds of a macvtap NIC (KubeVirt's macvtap binding plugin: nothing to
//! build) against the bridge cycles of the same run.
//!
//! Every stamp is CLOCK_MONOTONIC: nicplug's status file (`monotonicNs`), the
//! floor's own output, the harness's netlink listener in the pod netns (when
//! the pod interface appears), its libvirt event listener (DEVICE_ADDED /
//! DEVICE_REMOVED, stamped on arrival), and line arrival for the script.
//! It reports numbers; it never fails because of one. See docs/benchmarks.md.
//!
//! Knobs (env): NICPLUG_BENCH_RUNS (plug/unplug cycles per variant and
//! uplink rounds, 40), NICPLUG_BENCH_BURSTS (3), NICPLUG_BENCH_IDLE_SECS (60),
//! NICPLUG_BENCH_OUT (results/), NICPLUG_BENCH_FLOOR (the floor binary),
//! NICPLUG_BENCH_STRICT=1 (fail when a measurement produced no numbers: what
//! CI's short run checks).

#[path = "../../tests/e2e/mod.rs"]
mod e2e;
mod footprint;
mod linkwatch;
mod plot;
mod stats;
#[path = "../../tests/support/mod.rs"]
mod support;
mod uplink;

use nicplug::plan::Phase;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use e2e::{Nicplug, nicplug_binary, pod_iface, vmi_doc, vmi_doc_states, with_binding};
use linkwatch::{LinkEvent, LinkWatch, mono_ns};
use nicplug::hypervisor::device_xml::{DeviceBackend, InterfaceDevice};
use nicplug::hypervisor::events::DomainEvent;
use nicplug::hypervisor::libvirt::Libvirt;
use nicplug::model::{IfName, Mac, PlumbingNames};
use stats::ms;
use support::{CniNet, MacvtapLan, Rig, RigOptions};

/// The network of the latency cycles (the burst uses dyniface1..8).
const NET_INDEX: u8 = 1;
const BURST: u8 = 8;
/// Quiet time before each CNI ADD and before each unplug, for every variant.
const SETTLE: Duration = Duration::from_millis(300);
/// How often the harness reads nicplug's status file. The stamps come from
/// the file's content, so this bounds only how soon the harness moves on.
const STATUS_POLL: Duration = Duration::from_millis(5);
const VARIANTS: [&str; 3] = ["nicplug", "floor", "script"];
/// The network of the uplink rounds: its own node bridge, made after the
/// node namespace stopped running duplicate address detection.
const UPLINK_NET_INDEX: u8 = 20;
/// How often the echo train sends: the resolution of the uplink stamp.
const ECHO_EVERY: Duration = Duration::from_millis(2);
/// The node LAN of the macvtap rounds.
const MACVTAP_LAN: u8 = 30;
/// The macvtap rounds' network.
const MACVTAP_NETWORK: &str = "lan";

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

/// The harness's observers: link events of the pod netns and libvirt
/// domain events, each stamped on arrival.
struct Observers {
    links: mpsc::Receiver<LinkEvent>,
    devices: mpsc::Receiver<(DomainEvent, u64)>,
    stop: Arc<AtomicBool>,
    link_thread: Option<std::thread::JoinHandle<()>>,
    _libvirt: Libvirt,
}

impl Observers {
    fn start(rig: &Rig) -> Observers {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, links) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let ns = format!("/run/netns/{}", rig.pod_ns);
        let stop2 = stop.clone();
        let link_thread = std::thread::spawn(move || {
            // This thread alone moves into the pod netns; the socket stays there.
            let f = std::fs::File::open(&ns).expect("pod netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // Real-time priority (best effort) so the "exists" stamp is not
            // late behind busy CFS tasks; it sleeps in poll otherwise.
            let param = libc::sched_param { sched_priority: 10 };
            // SAFETY: sets this thread's own scheduling policy.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
            let mut watch = LinkWatch::open().expect("netlink link watch");
            ready_tx.send(()).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                for e in watch.next(Duration::from_millis(200)).expect("netlink") {
                    let _ = tx.send(e);
                }
            }
        });
        ready.recv().expect("link watch started");
        let (events_tx, mut events_rx) = tokio::sync::broadcast::channel(1024);
        let libvirt = Libvirt::connect(&rig.libvirt_uri, events_tx).expect("libvirt listener");
        let (dtx, devices) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                match events_rx.blocking_recv() {
                    Ok(e) => {
                        let at = mono_ns();
                        if dtx.send((e, at)).is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        });
        Observers {
            links,
            devices,
            stop,
            link_thread: Some(link_thread),
            _libvirt: libvirt,
        }
    }

    fn drain(&self) {
        while self.links.try_recv().is_ok() {}
        while self.devices.try_recv().is_ok() {}
    }

    /// When `name` first appeared (RTM_NEWLINK) since the last drain.
    fn link_appeared(&self, name: &str, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self
                .links
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no RTM_NEWLINK for {name} within {timeout:?}"));
            if e.new && e.name.as_deref() == Some(name) {
                return e.at_ns;
            }
        }
    }

    /// When DEVICE_ADDED (`added`) or DEVICE_REMOVED of `alias` arrived.
    fn device_event(&self, added: bool, alias: &str, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (e, at) = self.devices.recv_timeout(left).unwrap_or_else(|_| {
                panic!("no device event (added={added}) for {alias} within {timeout:?}")
            });
            match e {
                DomainEvent::DeviceAdded { alias: a, .. } if added && a == alias => return at,
                DomainEvent::DeviceRemoved { alias: a, .. } if !added && a == alias => {
                    return at;
                }
                _ => {}
            }
        }
    }
}

impl Drop for Observers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.link_thread.take() {
            let _ = t.join();
        }
    }
}

/// A baseline process in the pod netns whose stdout lines are stamped on
/// arrival; killed (by its pid) if still running when dropped.
struct Baseline {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(String, u64)>,
    what: &'static str,
    stderr: PathBuf,
}

impl Baseline {
    fn spawn(mut cmd: std::process::Command, what: &'static str, stderr: PathBuf) -> Baseline {
        let err = std::fs::File::create(&stderr).unwrap();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {what} baseline: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((line, mono_ns())).is_err() {
                    break;
                }
            }
        });
        Baseline {
            stdin: child.stdin.take(),
            child,
            lines,
            what,
            stderr,
        }
    }

    /// Waits for the line starting with `step`; returns (its stamp if it
    /// carries one, its arrival).
    fn expect(&self, step: &str, timeout: Duration) -> (Option<u64>, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((line, at)) = self.lines.recv_timeout(left) else {
                panic!(
                    "{} baseline: no `{step}` within {timeout:?}; stderr:\n{}",
                    self.what,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            };
            let mut words = line.split_whitespace();
            if words.next() == Some(step) {
                return (words.next().and_then(|w| w.parse().ok()), at);
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn finish(mut self) {
        self.stdin.take();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "{} baseline exited with {status}; stderr:\n{}",
            self.what,
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

type Sample = BTreeMap<&'static str, f64>;

struct Bench<'a> {
    rig: &'a Rig,
    obs: Observers,
    net: CniNet,
    network: String,
    pod: String,
    alias: String,
    floor: PathBuf,
    script: PathBuf,
    template: PathBuf,
}

/// The status entry of `name` once it is in `phase` (5 ms polls).
fn wait_entry(nic: &Nicplug, name: &str, phase: Phase, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(entry) = nic.entry(name)
            && entry["phase"] == phase.to_string()
        {
            return entry;
        }
        if Instant::now() > deadline {
            panic!(
                "{name} not {phase} within {timeout:?}: {:?}\nnicplug log tail:\n{}",
                nic.entry(name),
                tail(&nic.log(), 30)
            );
        }
        std::thread::sleep(STATUS_POLL);
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `monotonicNs` of a phase transition in a status entry.
fn try_transition(entry: &Value, phase: Phase) -> Option<u64> {
    entry["phaseTransitions"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["phase"] == phase.to_string()))
        .and_then(|t| t["monotonicNs"].as_u64())
}

fn transition(entry: &Value, phase: Phase) -> u64 {
    try_transition(entry, phase).unwrap_or_else(|| panic!("no {phase} transition in {entry}"))
}

/// `text` without ANSI colour escapes (nicplug's text log has them).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// nicplug's debug log line for the attach step: its duration in µs.
fn attach_elapsed_us(log: &str) -> Option<u64> {
    strip_ansi(log)
        .lines()
        .rev()
        .find(|l| l.contains("step done") && l.contains("attach-device"))
        .and_then(|l| l.split("elapsed_us=").nth(1))
        .and_then(|v| {
            v.trim_matches(|c: char| !c.is_ascii_digit())
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
}

impl Bench<'_> {
    fn cni_add(&self) -> (u64, u64) {
        self.obs.drain();
        let cni = self.rig.cni_add(&self.net, &self.pod);
        let returned = mono_ns();
        let _ = cni;
        let exists = self.obs.link_appeared(&self.pod, Duration::from_secs(10));
        (exists, returned)
    }

    fn nicplug_cycle(&self, nic: &mut Nicplug) -> Sample {
        let _ = std::fs::remove_file(&nic.status_path);
        nic.set_spec(&[self.network.as_str()]);
        nic.start();
        wait_entry(nic, &self.network, Phase::Pending, Duration::from_secs(20));
        std::thread::sleep(SETTLE);
        let log_offset = nic.log().len();
        let (exists, returned) = self.cni_add();
        let entry = wait_entry(nic, &self.network, Phase::Ready, Duration::from_secs(30));
        let added = self
            .obs
            .device_event(true, &self.alias, Duration::from_secs(10));
        let seen = entry["podInterfaceSeen"]["monotonicNs"]
            .as_u64()
            .expect("podInterfaceSeen");
        let plumbed = transition(&entry, Phase::Plumbed);
        let ready = transition(&entry, Phase::Ready);
        // When the guest already reports the MAC in the pass that saw
        // DEVICE_ADDED, nicplug publishes Ready directly: Attached = Ready.
        let attached = try_transition(&entry, Phase::Attached).unwrap_or(ready);
        let log = nic.log();
        let attach_us = attach_elapsed_us(&log[log_offset.min(log.len())..]);

        std::thread::sleep(SETTLE);
        self.obs.drain();
        nic.set_spec_states(&[(self.network.as_str(), "absent")]);
        let changed = mono_ns();
        let entry = wait_entry(nic, &self.network, Phase::Detached, Duration::from_secs(40));
        let removed = self
            .obs
            .device_event(false, &self.alias, Duration::from_secs(10));
        let detaching = transition(&entry, Phase::Detaching);
        let gone = transition(&entry, Phase::Detached);
        self.rig.cni_del(&self.net, &self.pod);
        assert!(nic.stop(), "nicplug exits cleanly");

        let mut s = Sample::new();
        s.insert("cni_returned", ms_between(exists, returned));
        s.insert("noticed", ms_between(exists, seen));
        s.insert("plumbed", ms_between(exists, plumbed));
        s.insert("device_added", ms_between(exists, added));
        if let Some(us) = attach_us {
            s.insert(
                "attach_returned",
                ms_between(exists, plumbed) + us as f64 / 1e3,
            );
        }
        s.insert("attached", ms_between(exists, attached));
        s.insert("ready", ms_between(exists, ready));
        s.insert("s_plumbing", ms_between(seen, plumbed));
        s.insert("s_attach", ms_between(plumbed, added));
        s.insert("s_guest", ms_between(added, ready));
        s.insert("u_detach", ms_between(changed, detaching));
        s.insert("u_removed", ms_between(changed, removed));
        s.insert("u_gone", ms_between(changed, gone));
        s.insert("u_cleanup", ms_between(removed, gone));
        s
    }

    /// The floor and the script share one shape; `own_stamps` says whether
    /// the program prints its own monotonic stamps (floor) or the harness
    /// stamps line arrival (script).
    fn baseline_cycle(&self, mut proc_: Baseline, own_stamps: bool) -> Sample {
        let t = Duration::from_secs(30);
        let at = |(own, arrived): (Option<u64>, u64)| {
            if own_stamps {
                own.expect("floor lines carry a stamp")
            } else {
                arrived
            }
        };
        proc_.expect("ready", t);
        std::thread::sleep(SETTLE);
        let (exists, returned) = self.cni_add();
        let noticed = at(proc_.expect("noticed", t));
        let plumbed = at(proc_.expect("plumbed", t));
        let attached = at(proc_.expect("attached", t));
        let ready = at(proc_.expect("guest", t));
        let added = self
            .obs
            .device_event(true, &self.alias, Duration::from_secs(10));

        std::thread::sleep(SETTLE);
        self.obs.drain();
        let changed = mono_ns();
        proc_.send("unplug\n");
        let detach = at(proc_.expect("detach", t));
        let _ = at(proc_.expect("removed", t));
        let gone = at(proc_.expect("gone", t));
        let removed = self
            .obs
            .device_event(false, &self.alias, Duration::from_secs(10));
        proc_.finish();
        self.rig.cni_del(&self.net, &self.pod);

        let mut s = Sample::new();
        s.insert("cni_returned", ms_between(exists, returned));
        s.insert("noticed", ms_between(exists, noticed));
        s.insert("plumbed", ms_between(exists, plumbed));
        s.insert("device_added", ms_between(exists, added));
        s.insert("attach_returned", ms_between(exists, attached));
        s.insert("ready", ms_between(exists, ready));
        s.insert("s_plumbing", ms_between(noticed, plumbed));
        s.insert("s_attach", ms_between(plumbed, added));
        s.insert("s_guest", ms_between(added, ready));
        s.insert("u_detach", ms_between(changed, detach));
        s.insert("u_removed", ms_between(changed, removed));
        s.insert("u_gone", ms_between(changed, gone));
        s.insert("u_cleanup", ms_between(removed, gone));
        s
    }

    fn floor_cycle(&self) -> Sample {
        let mut cmd = self.rig.pod_cmd(self.floor.to_str().unwrap());
        cmd.args(["--network", &self.network, "--tap-owner"])
            .arg(format!("{}:{}", self.rig.qemu_uid(), self.rig.qemu_gid()))
            .args(["--uri", &self.rig.libvirt_uri, "--domain", &self.rig.domain]);
        let p = Baseline::spawn(cmd, "floor", self.rig.dir.join("floor.stderr"));
        self.baseline_cycle(p, true)
    }

    fn script_cycle(&self) -> Sample {
        let pod = IfName::new(self.pod.clone()).unwrap();
        let names = PlumbingNames::for_pod_iface(&pod);
        let bridge_mac = Mac::locally_administered_from(&self.pod);
        let mut cmd = self.rig.pod_cmd("sh");
        cmd.arg(&self.script)
            .args([
                self.pod.as_str(),
                names.bridge.as_str(),
                names.tap.as_str(),
                &bridge_mac.to_string(),
                &self.rig.qemu_uid().to_string(),
                &self.rig.qemu_gid().to_string(),
                &self.rig.libvirt_uri,
                &self.rig.domain,
            ])
            .arg(&self.template);
        let p = Baseline::spawn(cmd, "script", self.rig.dir.join("script.stderr"));
        self.baseline_cycle(p, false)
    }

    /// One macvtap round: the NIC's VMI update first, then macvtap-cni's
    /// pod link appears (as in the bridge cycles); the unplug leaves the
    /// macvtap to CNI DEL.
    fn macvtap_round(&self, nic: &Nicplug, lan: &MacvtapLan) -> Sample {
        let network = MACVTAP_NETWORK;
        let pod = pod_iface(network);
        let alias = format!("ua-{network}");
        let spec = |state| {
            with_binding(
                vmi_doc_states(self.rig, &[(network, state)]),
                network,
                "macvtap",
            )
        };
        nic.write_vmi(&spec("up"));
        wait_entry(nic, network, Phase::Pending, Duration::from_secs(20));
        std::thread::sleep(SETTLE);
        self.obs.drain();
        self.rig.macvtap_add(lan, &pod, None);
        let exists = self.obs.link_appeared(&pod, Duration::from_secs(10));
        let entry = wait_entry(nic, network, Phase::Ready, Duration::from_secs(30));
        let added = self.obs.device_event(true, &alias, Duration::from_secs(10));
        let ready = transition(&entry, Phase::Ready);

        std::thread::sleep(SETTLE);
        self.obs.drain();
        nic.write_vmi(&spec("absent"));
        let changed = mono_ns();
        let entry = wait_entry(nic, network, Phase::Detached, Duration::from_secs(40));
        let gone = transition(&entry, Phase::Detached);
        self.rig.macvtap_del(&pod);
        let mut s = Sample::new();
        s.insert("device_added", ms_between(exists, added));
        s.insert("ready", ms_between(exists, ready));
        s.insert("u_gone", ms_between(changed, gone));
        s
    }

    /// One uplink round on `net`: the NIC gets a MAC of its own (so only the
    /// guest can answer its link-local address), the echo train starts when
    /// CNI ADD returned, and the round ends with the unplug.
    fn uplink_round(&self, nic: &Nicplug, net: &CniNet, round: u8) -> Uplink {
        let network = net.name.as_str();
        let pod = pod_iface(network);
        let mac = [0x02, 0x6e, 0x70, 0x00, net.octet(), round];
        let mut doc = vmi_doc(self.rig, &[network]);
        doc["spec"]["domain"]["devices"]["interfaces"][1]["macAddress"] =
            json!(Mac::from_bytes(mac).to_string());
        nic.write_vmi(&doc);
        wait_entry(nic, network, Phase::Pending, Duration::from_secs(20));
        std::thread::sleep(SETTLE);
        self.obs.drain();
        self.rig.cni_add(net, &pod);
        let guest = uplink::link_local(mac);
        let neighbour = util_ok(self.rig.node_cmd("ip").args([
            "-6",
            "neigh",
            "replace",
            &guest.to_string(),
            "lladdr",
            &Mac::from_bytes(mac).to_string(),
            "dev",
            &net.bridge,
            "nud",
            "permanent",
        ]));
        assert!(neighbour, "static neighbour for {guest} on the node");
        let train = uplink::EchoTrain::start(
            &format!("/run/netns/{}", self.rig.node_ns),
            &net.bridge,
            guest,
            ECHO_EVERY,
        );
        let exists = self.obs.link_appeared(&pod, Duration::from_secs(10));
        let entry = wait_entry(nic, network, Phase::Ready, Duration::from_secs(30));
        let first = train
            .first_answered(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the guest never answered {guest} over {network}"));
        let ready = transition(&entry, Phase::Ready);
        nic.set_spec_states(&[(network, "absent")]);
        wait_entry(nic, network, Phase::Detached, Duration::from_secs(40));
        self.rig.cni_del(net, &pod);
        Uplink {
            ready_ms: ms_between(exists, ready),
            first_packet_ms: ms_between(exists, first),
        }
    }
}

/// Whether `cmd` ran and exited 0.
fn util_ok(cmd: &mut std::process::Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}

/// One uplink round: from the pod interface appearing.
pub struct Uplink {
    pub ready_ms: f64,
    pub first_packet_ms: f64,
}

/// Prepares the uplink rounds: the node stops running duplicate address
/// detection for links made from now on (its bridge's link-local address is
/// usable at once), and the guest brings a new NIC up within 20 ms (the
/// rig's init polls every 200 ms) without detection either. So the rounds
/// time nicplug's path, not the guests' or the node's address setup.
fn prepare_uplink(rig: &Rig) {
    assert!(
        util_ok(
            rig.node_cmd("sysctl")
                .args(["-qw", "net.ipv6.conf.default.accept_dad=0"])
        ),
        "node sysctl"
    );
    let (code, out) = rig.guest_exec(&[
        "/bin/sh",
        "-c",
        "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad; \
         cat > /tmp/linkup.sh <<'EOF'\n\
         while true; do for d in /sys/class/net/*; do n=${d##*/}; [ $n = lo ] && continue; \
         i=$(cat $d/ifindex); grep -qx $i /tmp/up 2>/dev/null && continue; echo $i >> /tmp/up; \
         ip link set $n up; done; usleep 20000; done\nEOF\n\
         for d in /sys/class/net/*; do cat $d/ifindex >> /tmp/up; done; \
         sh /tmp/linkup.sh </dev/null >/dev/null 2>&1 &",
    ]);
    assert_eq!(code, 0, "guest link-up loop: {out}");
}

/// nicplug's device XML for `network` with `@MAC@`/`@MTU@` placeholders.
fn device_template(network: &str) -> String {
    let pod = IfName::new(pod_iface(network)).unwrap();
    let placeholder: Mac = "02:00:00:00:00:01".parse().unwrap();
    let xml = InterfaceDevice {
        network: network.to_string(),
        link: PlumbingNames::for_pod_iface(&pod).tap,
        backend: DeviceBackend::Tap,
        model: "virtio".into(),
        mac: placeholder,
        mtu: 9999,
        queues: None,
        link_up: true,
        // The baselines let libvirt choose the port, as KubeVirt does.
        address: None,
    }
    .to_xml()
    .unwrap();
    xml.replace(&placeholder.to_string(), "@MAC@")
        .replace("'9999'", "'@MTU@'")
}

fn floor_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NICPLUG_BENCH_FLOOR") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/hotplug-<hash> -> target/release/examples/floor
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/floor");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --release --example floor` (scripts/bench does)",
        path.display()
    );
    path
}

struct Burst {
    all_ready_ms: f64,
    first_ready_ms: f64,
    ready_ms: Vec<f64>,
    all_gone_ms: Option<f64>,
}

fn burst_nets() -> Vec<(CniNet, String)> {
    (1..=BURST)
        .map(|i| {
            let net = CniNet::new(i);
            let name = net.name.clone();
            (net, name)
        })
        .collect()
}

/// Adds 8 pod interfaces, then one VMI update with all 8; returns when all
/// are Ready. With `unplug`, removes them again in one update.
fn burst(rig: &Rig, nic: &Nicplug, unplug: bool) -> Burst {
    let nets = burst_nets();
    for (net, name) in &nets {
        rig.cni_add(net, &pod_iface(name));
    }
    std::thread::sleep(SETTLE);
    let names: Vec<&str> = nets.iter().map(|(_, n)| n.as_str()).collect();
    nic.set_spec(&names);
    let t0 = mono_ns();
    let mut ready = Vec::new();
    for name in &names {
        let entry = wait_entry(nic, name, Phase::Ready, Duration::from_secs(60));
        ready.push(ms_between(t0, transition(&entry, Phase::Ready)));
    }
    let mut b = Burst {
        all_ready_ms: ready.iter().cloned().fold(f64::MIN, f64::max),
        first_ready_ms: ready.iter().cloned().fold(f64::MAX, f64::min),
        ready_ms: ready,
        all_gone_ms: None,
    };
    if unplug {
        std::thread::sleep(SETTLE);
        b.all_gone_ms = Some(burst_unplug(rig, nic));
    }
    b
}

fn burst_unplug(rig: &Rig, nic: &Nicplug) -> f64 {
    let nets = burst_nets();
    let states: Vec<(&str, &str)> = nets.iter().map(|(_, n)| (n.as_str(), "absent")).collect();
    nic.set_spec_states(&states);
    let t0 = mono_ns();
    let mut last = 0.0f64;
    for (_, name) in &nets {
        let entry = wait_entry(nic, name, Phase::Detached, Duration::from_secs(60));
        last = last.max(ms_between(t0, transition(&entry, Phase::Detached)));
    }
    for (net, name) in &nets {
        rig.cni_del(net, &pod_iface(name));
    }
    nic.set_spec(&[]);
    last
}

/// 8 back-to-back single plugs (pod interfaces already there): each VMI
/// update adds one interface once the previous one is Ready. The burst's
/// baseline; then all 8 are unplugged in one update. Ready of each, from the
/// first update.
fn singles(rig: &Rig, nic: &Nicplug) -> Vec<f64> {
    let nets = burst_nets();
    for (net, name) in &nets {
        rig.cni_add(net, &pod_iface(name));
    }
    std::thread::sleep(SETTLE);
    let names: Vec<&str> = nets.iter().map(|(_, n)| n.as_str()).collect();
    let t0 = mono_ns();
    let mut ready = Vec::new();
    for i in 1..=names.len() {
        nic.set_spec(&names[..i]);
        let entry = wait_entry(nic, names[i - 1], Phase::Ready, Duration::from_secs(60));
        ready.push(ms_between(t0, transition(&entry, Phase::Ready)));
    }
    std::thread::sleep(SETTLE);
    burst_unplug(rig, nic);
    ready
}

/// Stops nicplug with the burst's 8 interfaces plugged and starts it again:
/// from the new process's start to all 8 Ready.
fn restart_all_ready(nic: &mut Nicplug) -> f64 {
    assert!(nic.stop(), "nicplug exits cleanly");
    let _ = std::fs::remove_file(&nic.status_path);
    let t0 = mono_ns();
    nic.start();
    burst_nets()
        .iter()
        .map(|(_, name)| {
            let entry = wait_entry(nic, name, Phase::Ready, Duration::from_secs(60));
            ms_between(t0, transition(&entry, Phase::Ready))
        })
        .fold(0.0f64, f64::max)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let first_line = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "kernel": kernel,
        "qemu": first_line("qemu-system-x86_64", &["--version"]),
        "libvirt": first_line("libvirtd", &["--version"]),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    if !support::require_root() {
        return;
    }
    let runs = env_num("NICPLUG_BENCH_RUNS", 40) as usize;
    let bursts = env_num("NICPLUG_BENCH_BURSTS", 3).max(1) as usize;
    let idle = Duration::from_secs(env_num("NICPLUG_BENCH_IDLE_SECS", 60));
    let out_dir = std::env::var_os("NICPLUG_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results"));
    let nicplug_bin = nicplug_binary();
    let floor = floor_binary();
    eprintln!(
        "bench: nicplug {} floor {} ({runs} cycles per variant, {bursts} bursts, {} s idle)",
        nicplug_bin.display(),
        floor.display(),
        idle.as_secs()
    );
    let started = Instant::now();
    let load_before = loadavg();

    // One vCPU, as the soak: a two-vCPU TCG guest stopped answering its
    // agent for good in the third burst of a full run (docs/testing.md).
    let rig = Rig::start(RigOptions {
        root_ports: 10,
        vcpus: 1,
        ..RigOptions::default()
    });
    let network = CniNet::new(NET_INDEX).name;
    let script = rig.dir.join("operator.sh");
    std::fs::write(&script, include_str!("operator.sh")).unwrap();
    let template = rig.dir.join("device.xml.in");
    std::fs::write(&template, device_template(&network)).unwrap();
    let bench = Bench {
        rig: &rig,
        obs: Observers::start(&rig),
        net: CniNet::new(NET_INDEX),
        pod: pod_iface(&network),
        alias: format!("ua-{network}"),
        network,
        floor,
        script,
        template,
    };
    // Multus' network-status, as the rig's CNI ADD writes it: CNI's done
    // signal, what a deployment gives nicplug (deploy/).
    let mut nic = Nicplug::new(&rig, &[]);
    let with_network_status = vec![
        "--network-status".to_string(),
        rig.network_status_path().display().to_string(),
    ];
    nic.args.clone_from(&with_network_status);

    // One discarded warm-up cycle each, then interleaved A B C A B C ...
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for i in 0..=runs {
        for variant in VARIANTS {
            let t = Instant::now();
            let s = match variant {
                "nicplug" => bench.nicplug_cycle(&mut nic),
                "floor" => bench.floor_cycle(),
                _ => bench.script_cycle(),
            };
            eprintln!(
                "bench: {} {variant:<7} exists->DEVICE_ADDED {:>7} ms  ->Ready {:>7} ms  unplug gone {:>7} ms  ({} ms)",
                if i == 0 {
                    "warm-up".to_string()
                } else {
                    format!("{i:>3}/{runs}")
                },
                ms(s["device_added"]),
                ms(s["ready"]),
                ms(s["u_gone"]),
                t.elapsed().as_millis()
            );
            if i > 0 {
                samples.entry(variant).or_default().push(s);
            }
        }
    }

    // macvtap rounds, against the bridge cycles above.
    let lan = MacvtapLan::new(MACVTAP_LAN);
    let _ = std::fs::remove_file(&nic.status_path);
    nic.set_spec(&[]);
    nic.start();
    let mut macvtap = Vec::new();
    for round in 0..=runs {
        let s = bench.macvtap_round(&nic, &lan);
        eprintln!(
            "bench: macvtap {round:>3}/{runs}: exists->DEVICE_ADDED {:>7} ms  ->Ready {:>7} ms  unplug gone {:>7} ms",
            ms(s["device_added"]),
            ms(s["ready"]),
            ms(s["u_gone"])
        );
        // The first round makes the LAN: a warm-up.
        if round > 0 {
            macvtap.push(s);
        }
    }
    nic.set_spec(&[]);
    assert!(nic.stop(), "nicplug exits cleanly");

    // Burst of 8, then idle footprint with the last burst plugged.
    let _ = std::fs::remove_file(&nic.status_path);
    nic.set_spec(&[]);
    nic.start();
    wait_entry(&nic, "default", Phase::NotManaged, Duration::from_secs(20));
    let mut bursts_done = Vec::new();
    for b in 0..bursts {
        let last = b + 1 == bursts;
        let r = burst(&rig, &nic, !last);
        eprintln!(
            "bench: burst {}/{bursts}: first Ready {} ms, all 8 Ready {} ms, all gone {}",
            b + 1,
            ms(r.first_ready_ms),
            ms(r.all_ready_ms),
            r.all_gone_ms
                .map_or("-".into(), |g| format!("{} ms", ms(g)))
        );
        bursts_done.push(r);
    }
    // Let the fast guest polling after the plug run out before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let pid = nic.pid().expect("nicplug runs");
    eprintln!(
        "bench: idle footprint of nicplug (pid {pid}) for {} s",
        idle.as_secs()
    );
    let fp = footprint::measure(pid, idle, Duration::from_millis(250));
    let restart_ms = restart_all_ready(&mut nic);
    eprintln!(
        "bench: restart with 8 plugged: all Ready {} ms after the start",
        ms(restart_ms)
    );
    let gone = burst_unplug(&rig, &nic);
    eprintln!("bench: last burst unplugged in {} ms", ms(gone));
    let singles = singles(&rig, &nic);
    eprintln!(
        "bench: 8 back-to-back single plugs: all Ready {} ms",
        ms(*singles.last().unwrap())
    );

    prepare_uplink(&rig);
    let uplink_net = CniNet::new(UPLINK_NET_INDEX);
    // With network-status, then without (the settle window ends CNI's turn).
    let mut uplinks = [Vec::new(), Vec::new()];
    for (rule, rounds) in ["network-status", "settle window"].iter().zip(&mut uplinks) {
        if *rule == "settle window" {
            nic.set_spec(&[]);
            assert!(nic.stop(), "nicplug exits cleanly");
            nic.args.clear();
            nic.start();
        }
        for round in 0..=runs {
            let u = bench.uplink_round(&nic, &uplink_net, round as u8);
            eprintln!(
                "bench: uplink ({rule}) {round:>3}/{runs}: exists -> Ready {} ms, -> first packet in the guest {} ms",
                ms(u.ready_ms),
                ms(u.first_packet_ms)
            );
            // The first round makes the node bridge: a warm-up, as for the cycles.
            if round > 0 {
                rounds.push(u);
            }
        }
    }
    let [uplinks, uplinks_window] = uplinks;
    nic.set_spec(&[]);
    assert!(nic.stop(), "nicplug exits cleanly");
    drop(bench);
    let load_after = loadavg();
    let resync = 30.0;

    let report = report::Report {
        runs,
        samples,
        bursts: bursts_done,
        singles,
        restart_ms,
        uplinks,
        uplinks_window,
        macvtap,
        footprint: fp,
        machine: machine(),
        load: (load_before, load_after),
        resync_s: resync,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let stem = report.write(&out_dir, plot::draw);
    let missing = report.missing();
    if std::env::var("NICPLUG_BENCH_STRICT").as_deref() == Ok("1") && !missing.is_empty() {
        panic!("bench: no numbers for: {}", missing.join(", "));
    }
    // nicplug's debug log of the whole run (every restart appends), for
    // explaining outliers: per-step `elapsed_us`, events, guest queries.
    let _ = std::fs::copy(&nic.log_path, out_dir.join(format!("{stem}-nicplug.log")));
    drop(nic);
    drop(rig);
}

mod report;
