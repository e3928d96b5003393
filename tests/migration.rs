//! End-to-end: a real libvirt live migration (TCG, peer-to-peer, as KubeVirt
//! migrates) of a guest with NICs nicplug hot-plugged, from one launcher pod to
//! another on the same node: two pod netns, each with its own libvirt daemon,
//! the same node netns and CNI bridges. Needs root; see docs/testing.md.

mod e2e;
mod support;

use nicplug::plan::Phase;
use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use nicplug::hypervisor::domain_xml::parse_devices;
use support::{CniNet, Rig, RigOptions, poll};

const NETS: [&str; 2] = ["dyniface1", "dyniface2"];
const WAIT: Duration = Duration::from_secs(60);

/// NIC 2's network is dual-stack: IPv6 service moves with the VM too.
fn nets() -> [CniNet; 2] {
    [CniNet::new(1), CniNet::dual_stack(2)]
}

/// The source pod: nicplug plugged both NICs, the guest sees them, the first
/// has a link-local address the node pings. Returns the VM's MACs.
fn plug_in_source<'a>(rig: &'a Rig) -> (Nicplug<'a>, Vec<String>) {
    let mut nicplug = Nicplug::new(rig, &NETS);
    nicplug.start();
    let macs: Vec<String> = NETS
        .iter()
        .zip(nets())
        .map(|(n, net)| rig.cni_add(&net, &pod_iface(n)).mac)
        .collect();
    for n in NETS {
        nicplug.wait_phase(n, Phase::Ready, WAIT);
    }
    let guest = rig
        .wait_guest_mac(&macs[0], WAIT)
        .expect("guest sees NIC 1");
    set_guest_address(rig, &guest.name, None, &nets()[0].addr(50));
    assert!(rig.ping_from_node(&nets()[0], &nets()[0].addr(50)));
    (nicplug, macs)
}

/// nicplug in the target pod, started exactly as in the source: no QEMU runs
/// there yet, so QEMU's user comes from the daemon's capabilities.
fn target_nicplug<'a>(target: &'a Rig, networks: &[&str]) -> Nicplug<'a> {
    let mut nicplug = Nicplug::new(target, networks);
    nicplug.start();
    nicplug
}

/// Each of `networks`' taps in `target` belongs to QEMU's user, `owner` (the
/// source's QEMU): the one the incoming QEMU opens it as.
fn assert_tap_owner(target: &Rig, networks: &[&str], owner: u32) {
    for n in networks {
        let tap = format!("tap{}", suffix(n));
        let read = |what: &str| {
            let out = target
                .pod_cmd("cat")
                .arg(format!("/sys/class/net/{tap}/{what}"))
                .output()
                .expect("cat runs");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(
            (read("owner"), read("group")),
            (owner.to_string(), owner.to_string()),
            "owner of {tap}"
        );
    }
}

/// nicplug in the target pod, once Multus made the pod interfaces there
/// (at the pod's creation), with every interface Prepared.
fn prepared_target<'a>(rig: &Rig, target: &'a Rig) -> Nicplug<'a> {
    for (n, net) in NETS.iter().zip(nets()) {
        target.cni_add(&net, &pod_iface(n));
    }
    let nicplug = target_nicplug(target, &NETS);
    wait_prepared(&nicplug);
    assert_tap_owner(target, &NETS, rig.qemu_uid());
    nicplug
}

fn wait_prepared(nicplug: &Nicplug<'_>) {
    for n in NETS {
        nicplug.wait_phase(n, Phase::Prepared, WAIT);
    }
}

/// The interface devices of a live domain: (alias, MAC, queues, tap), sorted.
fn devices(rig: &Rig) -> Vec<(String, String, Option<u32>, String)> {
    let mut d: Vec<_> = parse_devices(&rig.domain_xml())
        .unwrap()
        .interfaces
        .into_iter()
        .map(|i| {
            (
                i.alias.unwrap_or_default(),
                i.mac.map(|m| m.to_string()).unwrap_or_default(),
                i.queues,
                i.target_dev.unwrap_or_default(),
            )
        })
        .collect();
    d.sort();
    d
}

fn readyz(nicplug: &Nicplug<'_>) -> u16 {
    nicplug
        .api("/readyz", Duration::from_secs(5))
        .map(|(code, _)| code)
        .unwrap_or(0)
}

fn wait_ready(nicplug: &Nicplug<'_>) {
    let t0 = Instant::now();
    while readyz(nicplug) != 200 {
        assert!(
            t0.elapsed() < WAIT,
            "not ready: {:?}\n{}",
            nicplug.api("/readyz", Duration::from_secs(5)),
            nicplug.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A ping every 20 ms from the node to `addr`, for the downtime.
struct PingTrain {
    child: Child,
    started: Instant,
}

const PING_INTERVAL_MS: u64 = 20;

impl PingTrain {
    fn start(rig: &Rig, addr: &str) -> Self {
        let child = rig
            .node_cmd("/bin/busybox")
            .args(["ping", "-i", "0.02", addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        PingTrain {
            child,
            started: Instant::now(),
        }
    }

    /// Stops it (by its pid) and returns the longest run of lost replies
    /// between two answered ones, in ms, and how many were answered.
    fn stop(mut self) -> (u64, usize) {
        support::kill_pid(self.child.id() as i32, libc::SIGINT);
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = self.child.wait();
        let seqs: Vec<u64> = out
            .lines()
            .filter_map(|l| l.split("seq=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        let gap = seqs
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]).saturating_sub(1))
            .max()
            .unwrap_or(0);
        let sent = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or("");
        eprintln!(
            "ping train: {} replies in {:?}, last seq {:?} ({sent})",
            seqs.len(),
            self.started.elapsed(),
            seqs.last()
        );
        (gap * PING_INTERVAL_MS, seqs.len())
    }
}

/// A process in a pod that holds a single-queue tap open (attached), the
/// way a stray user would; stopped by its pid on drop.
struct TapHolder(Child);

/// TUNSETIFF (0x400454ca) with the flags nicplug's single-queue taps have
/// (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR = 0x5002), then sleeps. perl is in
/// perl-base (Essential), as the rig's reaper.
const HOLD_TAP: &str = "open(my $t, '+<', '/dev/net/tun') or die qq(tun: $!); \
    ioctl($t, 0x400454ca, pack('a16 s', $ARGV[0], 0x5002)) or die qq(TUNSETIFF: $!); \
    $| = 1; print qq(held\\n); sleep 600";

impl TapHolder {
    fn start(rig: &Rig, tap: &str) -> Self {
        let mut child = rig
            .pod_cmd("perl")
            .args(["-e", HOLD_TAP, tap])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = [0u8; 5];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        assert_eq!(&line, b"held\n");
        TapHolder(child)
    }
}

impl Drop for TapHolder {
    fn drop(&mut self) {
        support::kill_pid(self.0.id() as i32, libc::SIGKILL);
        let _ = self.0.wait();
    }
}

/// What the source pod must look like once the domain has left: nicplug's
/// taps and bridges gone, each pod link still carrying nicplug's record,
/// with the bridge's MAC and no address, so that the VM's MAC (its original
/// one) is on the network only where the VM now runs; CNI DEL deletes it.
fn assert_source_given_back(rig: &Rig, nicplug: &Nicplug<'_>, macs: &[String]) {
    let t0 = Instant::now();
    while !plumbing_links(rig).is_empty() {
        assert!(
            t0.elapsed() < WAIT,
            "source plumbing stays: {:?}\n{}",
            plumbing_links(rig),
            nicplug.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (n, mac) in NETS.iter().zip(macs) {
        let link = pod_link(rig, &pod_iface(n)).expect("pod link stays for CNI DEL");
        assert_ne!(
            link["address"].as_str(),
            Some(mac.as_str()),
            "{n}: {link}\n{}",
            nicplug.log()
        );
        assert!(link["master"].is_null(), "{n}: {link}");
        assert!(
            link["ifalias"]
                .as_str()
                .is_some_and(|a| a.starts_with("nicplug/")),
            "{n}: {link}"
        );
        assert!(pod_addresses(rig, &pod_iface(n)).is_empty(), "{n}");
        // The pass that removed the links publishes right after.
        nicplug.wait_phase(n, Phase::Pending, WAIT);
    }
    let log = nicplug.log();
    assert!(!log.contains("detaching"), "the source detached: {log}");
    assert_valid_status(&nicplug.status().unwrap());
}

/// The target after a successful migration: every device exactly once, as
/// in the source; nicplug adopted them (Ready), attached nothing.
fn assert_target_adopted(
    target: &Rig,
    nicplug: &Nicplug<'_>,
    before: &[(String, String, Option<u32>, String)],
) {
    assert_eq!(devices(target), before, "the devices moved as they were");
    for n in NETS {
        assert_eq!(devices_named(target, n), 1, "{n} once");
        nicplug.wait_phase(n, Phase::Ready, WAIT);
    }
    let log = nicplug.log();
    assert!(!log.contains("attached mac"), "the target attached: {log}");
    assert_valid_status(&nicplug.status().unwrap());
    assert_eq!(readyz(nicplug), 200);
}

#[test]
fn live_migration_moves_hot_plugged_nics_to_prepared_taps() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::root_launcher());
    let (source, macs) = plug_in_source(&rig);
    let before = devices(&rig);
    let target = rig.start_target();
    let target_ips: Vec<Vec<String>> = NETS
        .iter()
        .zip(nets())
        .map(|(n, net)| target.cni_add(&net, &pod_iface(n)).ips)
        .collect();
    let started = Instant::now();
    let nicplug = target_nicplug(&target, &NETS);
    wait_prepared(&nicplug);
    wait_ready(&nicplug);
    let prepared = started.elapsed();
    assert_tap_owner(&target, &NETS, rig.qemu_uid());
    assert_eq!(plumbing_links(&target), expected_plumbing(&NETS));
    assert_eq!(
        nicplug.status().unwrap()["agent"]["domain"]["state"],
        "absent"
    );

    let ping = PingTrain::start(&rig, &nets()[0].addr(50));
    std::thread::sleep(Duration::from_millis(500));
    let took = rig
        .migrate_to(&target, &[])
        .expect("the migration succeeds");
    std::thread::sleep(Duration::from_secs(2));
    let (downtime_ms, replies) = ping.stop();
    eprintln!(
        "timing: target prepared and ready {prepared:?} after nicplug started; \
         migration (virsh migrate) {took:?}; ping downtime through NIC 1 {downtime_ms} ms \
         ({PING_INTERVAL_MS} ms pings, {replies} answered)"
    );
    assert!(replies > 0, "the guest answered pings at all");

    assert_target_adopted(&target, &nicplug, &before);
    assert!(
        target.ping_from_node(&nets()[0], &nets()[0].addr(50)),
        "the node reaches the guest in the target pod"
    );
    // DHCP is served in the target from the target's record: NIC 2's lease
    // is the target pod interface's IPAM address.
    let guest = target
        .wait_guest_mac(&macs[1], WAIT)
        .expect("NIC 2 in the target");
    let (_, out) = target.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!(
            "ip link set {0} up; udhcpc -i {0} -s /bin/true -n -q -t 10 -T 1 </dev/null >/dev/null 2>&1; echo exit=$?",
            guest.name
        ),
    ]);
    assert!(out.contains("exit=0"), "no lease in the target: {out}");
    let dhcp = poll(WAIT, Duration::from_millis(50), || {
        nicplug
            .entry("dyniface2")
            .map(|e| e["dhcp"].clone())
            .filter(|d| d["lastLease"]["time"].is_string())
    })
    .expect("the target's server leased");
    assert_eq!(dhcp["address"], target_ips[1][0].as_str(), "{dhcp}");
    // And IPv6 from the target's record. Busybox has no DHCPv6 client, but
    // its kernel takes router advertisements: after a link bounce, its
    // router solicitation is answered by the target's nicplug (the source's
    // servers stopped with the hand-off, and the node sends none).
    let target_v6 = target_ips[1].iter().find(|ip| ip.contains(':')).unwrap();
    assert_eq!(dhcp["ipv6Address"], target_v6.as_str(), "{dhcp}");
    let gateway6 = nets()[1].addr6(1);
    let (code, out) = target.guest_exec(&[
        "/bin/sh",
        "-c",
        &format!(
            "ip link set {0} down; ip -6 route flush dev {0}; ip -6 route show default dev {0}; ip link set {0} up",
            guest.name
        ),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("via"), "the route is gone first: {out}");
    let routes = poll(WAIT, Duration::from_millis(200), || {
        let (_, out) = target.guest_exec(&[
            "/bin/sh",
            "-c",
            &format!("ip -6 route show default dev {}", guest.name),
        ]);
        out.contains(&format!("via {gateway6}")).then_some(out)
    });
    assert!(
        routes.is_some(),
        "no advertisement from the target: the guest has no default route via {gateway6}"
    );
    assert_eq!(
        rig.virsh(&["domstate", &rig.domain]).trim(),
        "shut off",
        "the source keeps the definition, shut off"
    );
    assert_source_given_back(&rig, &source, &macs);
    assert_eq!(
        source.entry("dyniface1").unwrap()["message"],
        "the domain migrated to another pod"
    );
    // The source pod is deleted: CNI DEL finds each pod link by name.
    for (n, net) in NETS.iter().zip(nets()) {
        rig.cni_del(&net, &pod_iface(n));
        assert!(pod_link(&rig, &pod_iface(n)).is_none(), "{n}");
    }
    assert!(
        target.ping_from_node(&nets()[0], &nets()[0].addr(50)),
        "the VM stays reachable after the source pod's CNI DEL"
    );
}

#[test]
fn a_migration_failing_on_the_target_leaves_the_vm_working_on_the_source() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::root_launcher());
    let (source, _) = plug_in_source(&rig);
    let before = devices(&rig);
    let target = rig.start_target();
    let nicplug = prepared_target(&rig, &target);
    // The first tap made unusable: another process holds its one queue, so
    // the arriving QEMU's open fails (EBUSY); nicplug sees a good tap.
    let _holder = TapHolder::start(&target, &format!("tap{}", suffix(NETS[0])));
    let err = rig
        .migrate_to(&target, &[])
        .expect_err("the target cannot open its taps");
    eprintln!("migration failed as planned: {}", err.trim());

    assert_eq!(rig.virsh(&["domstate", &rig.domain]).trim(), "running");
    assert_eq!(devices(&rig), before, "nothing detached in the source");
    assert!(
        rig.ping_from_node(&nets()[0], &nets()[0].addr(50)),
        "NIC 1 still works"
    );
    let guest_macs: Vec<String> = rig.guest_interfaces().into_iter().map(|i| i.mac).collect();
    for (alias, mac, ..) in &before {
        assert!(guest_macs.contains(mac), "{alias}: {guest_macs:?}");
    }
    // Both converged: the source as before, the target still prepared.
    std::thread::sleep(Duration::from_secs(2));
    for n in NETS {
        assert_eq!(source.phase(n), Some(Phase::Ready), "source {n}");
        assert_eq!(nicplug.phase(n), Some(Phase::Prepared), "target {n}");
    }
    assert_eq!(plumbing_links(&rig), expected_plumbing(&NETS));
    assert!(!source.log().contains("detaching"));
    assert!(
        !target
            .virsh(&["list", "--all", "--name"])
            .contains(&rig.domain),
        "no domain left in the target"
    );
}

/// Starts a migration slow enough to stay in flight (1 MiB/s), adds a third
/// NIC to both specs and both pods while it runs, and returns once the source
/// holds it (no device) and the target prepared it. Returns `virsh migrate`.
fn third_nic_during_migration(
    rig: &Rig,
    source: &Nicplug<'_>,
    target: &Rig,
    nicplug: &Nicplug<'_>,
) -> Child {
    // 1 MiB/s keeps the migration in flight until the test lets it finish.
    let mut migration = rig
        .migrate_command(target, &["--bandwidth", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while target
        .virsh_try(&["domstate", &rig.domain])
        .map_or(true, |s| s.trim() != "paused")
    {
        assert!(t0.elapsed() < WAIT, "the incoming domain never showed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The third NIC: in the spec on both sides, its pod interface in both pods.
    let three = ["dyniface1", "dyniface2", "dyniface3"];
    let net3 = CniNet::new(3);
    source.set_spec(&three);
    nicplug.set_spec(&three);
    rig.cni_add(&net3, &pod_iface("dyniface3"));
    target.cni_add(&net3, &pod_iface("dyniface3"));
    nicplug.wait_phase("dyniface3", Phase::Prepared, WAIT);
    let t0 = Instant::now();
    let held = loop {
        if let Some(entry) = source.entry("dyniface3")
            && entry["message"]
                .as_str()
                .is_some_and(|m| m.contains("migrating to another pod"))
        {
            break entry;
        }
        assert!(t0.elapsed() < WAIT, "{}", source.log_tail(30));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(held["phase"], "Pending", "{held}");
    assert!(
        migration.try_wait().unwrap().is_none(),
        "still migrating: the NIC waited for it"
    );
    assert_eq!(devices_named(rig, "dyniface3"), 0);
    migration
}

#[test]
fn a_nic_added_during_the_migration_is_plugged_once_on_the_target() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::root_launcher());
    let (source, _) = plug_in_source(&rig);
    let target = rig.start_target();
    let nicplug = prepared_target(&rig, &target);
    let mut migration = third_nic_during_migration(&rig, &source, &target, &nicplug);
    let three = ["dyniface1", "dyniface2", "dyniface3"];
    // Let it finish: lift the bandwidth limit (again, until it is done: a
    // change can come too early in an iteration to stick).
    let t0 = Instant::now();
    let status = loop {
        rig.virsh(&["migrate-setspeed", &rig.domain, "8000"]);
        if let Some(status) = poll(Duration::from_secs(2), Duration::from_millis(50), || {
            migration.try_wait().unwrap()
        }) {
            break status;
        }
        assert!(t0.elapsed() < WAIT, "the migration does not finish");
    };
    let mut err = String::new();
    migration
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "migration: {err}");
    target.adopt_migrated_domain().unwrap();

    for n in three {
        nicplug.wait_phase(n, Phase::Ready, WAIT);
        assert_eq!(devices_named(&target, n), 1, "{n} once");
    }
    let attached = nicplug
        .log()
        .lines()
        .filter(|l| l.contains("attached mac"))
        .count();
    assert_eq!(attached, 1, "only the new NIC, once:\n{}", nicplug.log());
    assert!(
        !source
            .log()
            .lines()
            .any(|l| l.contains("dyniface3") && l.contains("attached mac")),
        "the source never plugged it"
    );
    assert_valid_status(&nicplug.status().unwrap());
    assert_valid_status(&source.status().unwrap());
}

/// Each link of a pod: name, MAC, master, alias, addresses (what nicplug
/// would change; the bridges' timers are left out).
fn target_layout(rig: &Rig) -> Vec<String> {
    let mut links: Vec<String> = pod_link_names(rig)
        .into_iter()
        .map(|name| {
            let l = pod_link(rig, &name).unwrap();
            format!(
                "{name} {} master={} alias={} up={} {:?}",
                l["address"],
                l["master"],
                l["ifalias"],
                l["operstate"],
                pod_addresses(rig, &name)
            )
        })
        .collect();
    links.sort();
    links
}

#[test]
fn a_cancelled_migration_applies_the_held_nic_on_the_source() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::root_launcher());
    let (source, _) = plug_in_source(&rig);
    let before = devices(&rig);
    let target = rig.start_target();
    let nicplug = prepared_target(&rig, &target);
    let mut migration = third_nic_during_migration(&rig, &source, &target, &nicplug);
    // Cancelled (as KubeVirt's migration abort does): the domain stays here.
    rig.virsh(&["domjobabort", &rig.domain]);
    let status = migration.wait().unwrap();
    assert!(!status.success(), "the migration was cancelled");
    assert_eq!(rig.virsh(&["domstate", &rig.domain]).trim(), "running");
    // The held NIC is plugged here now, once; the others are as they were.
    source.wait_phase("dyniface3", Phase::Ready, WAIT);
    assert_eq!(devices_named(&rig, "dyniface3"), 1);
    let now = devices(&rig);
    for device in &before {
        assert!(now.contains(device), "{device:?} still there: {now:?}");
    }
    for n in NETS {
        assert_eq!(source.phase(n), Some(Phase::Ready), "{n}");
    }
    assert!(!source.log().contains("detaching"));
    assert!(
        rig.ping_from_node(&nets()[0], &nets()[0].addr(50)),
        "NIC 1 still works"
    );
    // The target is back to waiting for a domain: still prepared, nothing attached.
    assert!(
        !target
            .virsh(&["list", "--all", "--name"])
            .contains(&rig.domain),
        "no domain left in the target"
    );
    for n in ["dyniface1", "dyniface2", "dyniface3"] {
        nicplug.wait_phase(n, Phase::Prepared, WAIT);
    }
    assert!(!nicplug.log().contains("attached mac"));
    assert_valid_status(&source.status().unwrap());
    assert_valid_status(&nicplug.status().unwrap());
}

#[test]
fn a_target_in_kubevirts_layout_is_adopted_and_nothing_built() {
    if !support::require_root() {
        return;
    }
    let rig = Rig::start(RigOptions::root_launcher());
    let (source, macs) = plug_in_source(&rig);
    let before = devices(&rig);
    let target = rig.start_target();
    // virt-handler's layout, built before the hand-off (no nicplug needed).
    for (n, net) in NETS.iter().zip(nets()) {
        kubevirt_layout(&target, &net, n, rig.qemu_uid());
    }
    let layout = target_layout(&target);
    let nicplug = target_nicplug(&target, &NETS);
    wait_prepared(&nicplug);
    wait_ready(&nicplug);
    assert_eq!(
        target_layout(&target),
        layout,
        "nicplug built or changed nothing"
    );
    let took = rig
        .migrate_to(&target, &[])
        .expect("the migration succeeds");
    eprintln!(
        "timing: migration (virsh migrate) into KubeVirt's layout, no nicplug preparation: {took:?}"
    );
    assert_target_adopted(&target, &nicplug, &before);
    for n in NETS {
        let nic = pod_link(&target, &format!("{}-nic", suffix(n))).unwrap();
        assert!(
            nic["ifalias"].is_null(),
            "no nicplug record on KubeVirt's link: {nic}"
        );
    }
    assert!(target.ping_from_node(&nets()[0], &nets()[0].addr(50)));
    assert_source_given_back(&rig, &source, &macs);
}
