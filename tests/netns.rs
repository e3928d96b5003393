//! Real-kernel tests of the pod-netns layer ([`Netlink`], taps, link events).
//!
//! Each test builds its own namespaces (see `netns_support`), runs the
//! library on a thread inside the pod namespace, and checks the result both
//! through [`PodNetwork::links`] and through `ip -j` output, so a bug in our
//! own reader cannot hide a bug in our writer.

mod netns_support;

use std::sync::Arc;
use std::time::Duration;

use nicplug::model::{IfName, Mac, Owner, PodLinkRecord};
use nicplug::netns::netlink::Netlink;
use nicplug::netns::watch::{LinkEvents, SubscribeOptions};
use nicplug::netns::{Link, LinkKind, NetnsError, PodNetwork, TapSpec};
use serde_json::Value;

use netns_support::{BRIDGE, ORIGINAL_ALIAS, POD_IF, PodEnv, TAP, TestNs, require_root};

const QEMU: Owner = Owner {
    uid: 64055,
    gid: 64055,
};

fn name(s: &str) -> IfName {
    IfName::new(s).unwrap()
}

fn bridge_mac() -> Mac {
    Mac::locally_administered_from(BRIDGE)
}

fn pod_new_mac() -> Mac {
    Mac::locally_administered_from("pod link while enslaved")
}

fn tap_spec(multi_queue: bool) -> TapSpec {
    TapSpec {
        name: name(TAP),
        owner: QEMU,
        mtu: 1400,
        multi_queue,
    }
}

fn find<'a>(links: &'a [Link], n: &str) -> &'a Link {
    links
        .iter()
        .find(|l| l.name.as_str() == n)
        .unwrap_or_else(|| panic!("link {n} not listed"))
}

/// Reads the pod link's original state the way the planner will: into a
/// record, which then goes into the link's alias.
async fn record_of_pod_link(net: &Netlink) -> PodLinkRecord {
    let links = net.links().await.unwrap();
    let pod = find(&links, POD_IF);
    PodLinkRecord {
        network: Some("dyniface1".into()),
        mac: pod.mac.unwrap(),
        mtu: pod.mtu,
        addresses: pod.addresses.clone(),
        routes: pod.routes.clone(),
        previous_alias: pod.alias.clone(),
    }
}

/// The whole plug sequence nicplug runs for one network.
async fn plug(net: &Netlink, record: &PodLinkRecord, multi_queue: bool) {
    net.set_alias(&name(POD_IF), Some(&record.to_alias().unwrap()))
        .await
        .unwrap();
    net.ensure_bridge(&name(BRIDGE), bridge_mac())
        .await
        .unwrap();
    net.enslave_pod_link(
        &name(POD_IF),
        &name(BRIDGE),
        pod_new_mac(),
        &record.addresses,
        &record.routes,
    )
    .await
    .unwrap();
    net.ensure_tap(&tap_spec(multi_queue), &name(BRIDGE))
        .await
        .unwrap();
}

/// The whole unplug sequence.
async fn unplug(net: &Netlink, record: &PodLinkRecord) {
    net.release_pod_link(&name(POD_IF), record).await.unwrap();
    net.delete_link(&name(TAP)).await.unwrap();
    net.delete_link(&name(BRIDGE)).await.unwrap();
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or(uid.to_string(), |u| u.name)
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map_or(gid.to_string(), |g| g.name)
}

fn has_flag(link: &Value, flag: &str) -> bool {
    link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f.as_str() == Some(flag))
}

#[test]
fn plumbing_builds_the_bridge_binding_layout() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("plumb");
    let (record, links) = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        (record, net.links().await.unwrap())
    });
    assert_eq!(record.addresses.len(), 2, "{record:?}");
    assert_eq!(record.previous_alias.as_deref(), Some(ORIGINAL_ALIAS));

    // Through our own reader.
    let bridge = find(&links, BRIDGE);
    let pod = find(&links, POD_IF);
    let tap = find(&links, TAP);
    assert_eq!(bridge.kind, LinkKind::Bridge);
    assert!(bridge.up);
    assert_eq!(bridge.mac, Some(bridge_mac()));
    assert_eq!(pod.kind, LinkKind::Veth);
    assert_eq!(pod.master, Some(bridge.index));
    assert!(pod.up);
    assert_eq!(pod.mac, Some(pod_new_mac()));
    assert_eq!(pod.addresses, vec![]);
    assert_eq!(pod.learning, Some(false));
    assert_eq!(pod.alias, Some(record.to_alias().unwrap()));
    assert_eq!(
        PodLinkRecord::from_alias(pod.alias.as_ref().unwrap()).unwrap(),
        record
    );
    assert_eq!(tap.kind, LinkKind::Tun);
    assert!(tap.mac.is_some(), "a tap (not a tun) has a MAC");
    let info = tap.tap.as_ref().unwrap();
    assert_eq!(info.owner, Some(QEMU.uid));
    assert_eq!(info.group, Some(QEMU.gid));
    assert!(!info.multi_queue);
    assert!(info.vnet_hdr);
    assert!(info.persist);
    assert_eq!(tap.mtu, 1400);
    assert_eq!(tap.master, Some(bridge.index));
    assert!(tap.up);

    // Independently, through iproute2.
    let br = env.pod.link_json(BRIDGE);
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert!(has_flag(&br, "UP"));
    assert_eq!(br["address"], bridge_mac().to_string());
    assert_eq!(br["linkinfo"]["info_data"]["stp_state"], 0);
    assert_eq!(br["linkinfo"]["info_data"]["vlan_filtering"], 0);

    let p = env.pod.link_json(POD_IF);
    assert_eq!(p["master"], BRIDGE);
    assert!(has_flag(&p, "UP"));
    assert_eq!(p["address"], pod_new_mac().to_string());
    assert_eq!(p["linkinfo"]["info_slave_kind"], "bridge");
    assert_eq!(p["linkinfo"]["info_slave_data"]["learning"], false);
    assert_eq!(p["ifalias"], record.to_alias().unwrap());
    assert_eq!(p["inet6_addr_gen_mode"], "none");
    assert_eq!(p["mtu"], 1400);
    // Give the kernel a chance to (wrongly) re-add a link-local address.
    env.pod.settle();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(env.pod.addresses(POD_IF), Vec::<String>::new());

    let t = env.pod.link_json(TAP);
    let data = &t["linkinfo"]["info_data"];
    assert_eq!(t["linkinfo"]["info_kind"], "tun");
    assert_eq!(data["type"], "tap");
    assert_eq!(data["pi"], false);
    assert_eq!(data["vnet_hdr"], true);
    assert_eq!(data["multi_queue"], false);
    assert_eq!(data["persist"], true);
    assert_eq!(data["user"], user_name(QEMU.uid));
    assert_eq!(data["group"], group_name(QEMU.gid));
    assert_eq!(t["mtu"], 1400);
    assert_eq!(t["master"], BRIDGE);
    assert!(has_flag(&t, "UP"));

    // The bridge kept its own MAC although its ports have others.
    assert_eq!(
        env.pod.link_json(BRIDGE)["address"],
        bridge_mac().to_string()
    );
    drop(env.peer);
}

#[test]
fn plumbing_twice_changes_nothing() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("twice");
    let (record, first_links) = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        (record, net.links().await.unwrap())
    });
    let first = env.pod.snapshot();
    let second_links = env.pod.run(move || async move {
        let net = Netlink::new().unwrap();
        plug(&net, &record, false).await;
        net.links().await.unwrap()
    });
    let second = env.pod.snapshot();
    assert_eq!(first, second);
    // Ignore addresses the kernel gives the bridge on its own timeline.
    let strip = |links: Vec<Link>| -> Vec<Link> {
        links
            .into_iter()
            .map(|mut l| {
                if l.name.as_str() == BRIDGE {
                    l.addresses.clear();
                }
                l
            })
            .collect()
    };
    assert_eq!(strip(first_links), strip(second_links));
}

#[test]
fn multi_queue_tap_gets_iff_multi_queue() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("mq");
    let links = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, true).await;
        net.links().await.unwrap()
    });
    let tap = find(&links, TAP).tap.clone().unwrap();
    assert!(tap.multi_queue);
    assert!(tap.vnet_hdr && tap.persist);
    let t = env.pod.link_json(TAP);
    assert_eq!(t["linkinfo"]["info_data"]["multi_queue"], true);
    assert_eq!(t["linkinfo"]["info_data"]["type"], "tap");
}

#[test]
fn a_mismatched_unused_tap_is_recreated() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("retap");
    env.pod.ip(&["link", "add", BRIDGE, "type", "bridge"]);
    env.pod.ip(&[
        "tuntap",
        "add",
        "dev",
        TAP,
        "mode",
        "tap",
        "user",
        "107",
        "group",
        "107",
        "multi_queue",
        "vnet_hdr",
    ]);
    let links = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        net.ensure_tap(&tap_spec(false), &name(BRIDGE))
            .await
            .unwrap();
        net.links().await.unwrap()
    });
    let info = find(&links, TAP).tap.clone().unwrap();
    assert_eq!((info.owner, info.group), (Some(QEMU.uid), Some(QEMU.gid)));
    assert!(!info.multi_queue);
    assert_eq!(
        env.pod.link_json(TAP)["linkinfo"]["info_data"]["multi_queue"],
        false
    );
}

/// Holds a tap open the way QEMU does (TUNSETIFF on /dev/net/tun), on the
/// calling thread's namespace, until dropped.
fn hold_tap_open(tap: &str) -> std::fs::File {
    open_tap(tap, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
}

/// `tap` opened with `flags` (the opener's flags replace the tap's).
fn open_tap(tap: &str, flags: libc::c_int) -> std::fs::File {
    nix::ioctl_write_ptr_bad!(
        tunsetiff,
        nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
        libc::ifreq
    );
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: all-zeroes is a valid `ifreq` (plain integers and arrays).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(tap.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: the fd is open for the whole call, `ifr` is a valid ifreq.
    unsafe { tunsetiff(std::os::fd::AsRawFd::as_raw_fd(&file), &ifr) }.unwrap();
    file
}

#[test]
fn a_mismatched_tap_in_use_is_refused_not_recreated() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("busytap");
    env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        net.ensure_bridge(&name(BRIDGE), bridge_mac())
            .await
            .unwrap();
        let other_owner = TapSpec {
            owner: Owner { uid: 107, gid: 107 },
            ..tap_spec(false)
        };
        net.ensure_tap(&other_owner, &name(BRIDGE)).await.unwrap();
        let index = find(&net.links().await.unwrap(), TAP).index;
        let qemu = hold_tap_open(TAP);
        let err = net
            .ensure_tap(&tap_spec(false), &name(BRIDGE))
            .await
            .unwrap_err();
        assert!(matches!(err, NetnsError::TapInUse { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "tap tap9a6a0c3b4d8 is in use but has owner 107, not 64055, \
             has group 107, not 64055"
        );
        let links = net.links().await.unwrap();
        assert_eq!(
            find(&links, TAP).index,
            index,
            "the busy tap was left alone"
        );
        drop(qemu);
        net.ensure_tap(&tap_spec(false), &name(BRIDGE))
            .await
            .unwrap();
        let info = find(&net.links().await.unwrap(), TAP).tap.clone().unwrap();
        assert_eq!(info.owner, Some(QEMU.uid));
    });
}

/// The Netlink is made in the pod namespace but used from a thread in
/// another (the peer's): links and the tap must still land in the pod
/// namespace. (A bug would put the tap into the peer namespace, which the
/// test also created, never into the machine's own.)
#[test]
fn operations_stay_in_the_namespace_of_the_creating_thread() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("where");
    let (net_tx, net_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let pod_path = env.pod.path();
    // Owns the runtime that drives the Netlink's connection.
    let driver = std::thread::spawn(move || {
        netns_support::enter(&pod_path);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            net_tx.send(Netlink::new().unwrap()).unwrap();
            let _ = done_rx.await;
        });
    });
    let net = net_rx.recv().unwrap();
    env.peer.run(move || async move {
        net.ensure_bridge(&name(BRIDGE), bridge_mac())
            .await
            .unwrap();
        net.ensure_tap(&tap_spec(false), &name(BRIDGE))
            .await
            .unwrap();
    });
    done_tx.send(()).unwrap();
    driver.join().unwrap();
    assert_eq!(env.pod.link_json(TAP)["master"], BRIDGE);
    let peer_links = env.peer.ip_json(&["link", "show"]);
    assert!(
        !peer_links.to_string().contains(TAP),
        "tap leaked into the peer namespace: {peer_links}"
    );
}

#[test]
fn unplug_gives_back_the_pre_plug_state_idempotently() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("unplug");
    let before = env.pod.snapshot();
    let record = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        record
    });
    assert_ne!(env.pod.snapshot(), before, "plug changed nothing?");
    let again = record.clone();
    env.pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &record).await;
    });
    let after = env.pod.snapshot();
    assert_eq!(after, before);
    assert_eq!(
        env.pod.link_json(POD_IF)["ifalias"],
        ORIGINAL_ALIAS,
        "the previous alias is back"
    );
    env.pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &again).await;
    });
    assert_eq!(env.pod.snapshot(), before);
}

#[test]
fn release_clears_the_alias_when_there_was_none() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("noalias");
    env.pod.ip(&["link", "set", "dev", POD_IF, "alias", ""]);
    let before = env.pod.snapshot();
    env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        assert_eq!(record.previous_alias, None);
        plug(&net, &record, false).await;
        unplug(&net, &record).await;
    });
    assert_eq!(env.pod.snapshot(), before);
    assert!(env.pod.link_json(POD_IF).get("ifalias").is_none());
}

#[test]
fn delete_of_a_missing_link_is_ok_and_kinds_are_checked() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("kinds");
    env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        net.delete_link(&name("nosuchlink0")).await.unwrap();
        match net.ensure_bridge(&name(POD_IF), bridge_mac()).await {
            Err(NetnsError::WrongKind {
                link,
                found,
                expected,
            }) => {
                assert_eq!(link.as_str(), POD_IF);
                assert_eq!(found, "veth");
                assert_eq!(expected, "bridge");
            }
            other => panic!("expected WrongKind, got {other:?}"),
        }
        net.ensure_bridge(&name(BRIDGE), bridge_mac())
            .await
            .unwrap();
        let tap_over_veth = TapSpec {
            name: name(POD_IF),
            ..tap_spec(false)
        };
        let err = net
            .ensure_tap(&tap_over_veth, &name(BRIDGE))
            .await
            .unwrap_err();
        assert!(matches!(err, NetnsError::WrongKind { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "link pod9a6a0c3b4d8 exists but is a veth, not a tap"
        );
        let missing = net
            .enslave_pod_link(&name("nosuchlink0"), &name(BRIDGE), pod_new_mac(), &[], &[])
            .await
            .unwrap_err();
        assert!(matches!(missing, NetnsError::NotFound(_)), "{missing:?}");
    });
}

#[test]
fn link_events_notify_after_subscribe() {
    if !require_root() {
        return;
    }
    let ns = TestNs::new("events");
    let ns_name = ns.name.clone();
    ns.run(move || async move {
        let events = LinkEvents::subscribe().await.unwrap();
        let notify = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(events.run(notify.clone()));
        // Made by another process, so the event is the kernel's, not ours.
        let status = tokio::process::Command::new("ip")
            .args(["-n", &ns_name, "link", "add", "evbr0", "type", "bridge"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(10), notify.notified())
            .await
            .expect("no link event within 10 s");
        task.abort();
    });
}

/// CNI's IPAM may add an address after nicplug recorded the pod link (the
/// link appears before its address). Enslaving removes only what the record
/// holds, so the late address stays until the planner's next pass records it
/// (`absorb_late_addresses`) and removes it: it is never lost.
#[test]
fn an_address_added_after_recording_survives_the_enslave() {
    if !require_root() {
        return;
    }
    const LATE: &str = "169.254.10.2/24";
    let env = PodEnv::new("late");
    // The link as CNI shows it first: no IPv4 address yet.
    env.pod.ip(&["addr", "del", LATE, "dev", POD_IF]);
    let before = env.pod.snapshot();
    let ns = env.pod.name.clone();
    let (record, links) = env.pod.run(|| async move {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        net.set_alias(&name(POD_IF), Some(&record.to_alias().unwrap()))
            .await
            .unwrap();
        net.ensure_bridge(&name(BRIDGE), bridge_mac())
            .await
            .unwrap();
        // IPAM, between recording and enslaving.
        let status = tokio::process::Command::new("ip")
            .args(["-n", &ns, "addr", "add", LATE, "brd", "+", "dev", POD_IF])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        net.enslave_pod_link(
            &name(POD_IF),
            &name(BRIDGE),
            pod_new_mac(),
            &record.addresses,
            &record.routes,
        )
        .await
        .unwrap();
        (record, net.links().await.unwrap())
    });
    let late: nicplug::model::IpCidr = LATE.parse().unwrap();
    assert!(!record.addresses.contains(&late), "{record:?}");
    assert_eq!(
        find(&links, POD_IF).addresses,
        vec![late],
        "the address CNI added after the record was taken must survive the enslave"
    );

    // The planner's next pass: the late address joins the record, and the
    // enslave removes it.
    let mut absorbed = record.clone();
    absorbed.addresses.push(late);
    let after_absorb = absorbed.clone();
    let links = env.pod.run(move || async move {
        let net = Netlink::new().unwrap();
        net.set_alias(&name(POD_IF), Some(&absorbed.to_alias().unwrap()))
            .await
            .unwrap();
        net.enslave_pod_link(
            &name(POD_IF),
            &name(BRIDGE),
            pod_new_mac(),
            &absorbed.addresses,
            &absorbed.routes,
        )
        .await
        .unwrap();
        net.links().await.unwrap()
    });
    assert_eq!(find(&links, POD_IF).addresses, vec![]);

    // Unplug gives CNI its address back.
    env.pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &after_absorb).await;
    });
    assert!(env.pod.addresses(POD_IF).contains(&LATE.to_string()));
    env.pod.ip(&["addr", "del", LATE, "dev", POD_IF]);
    assert_eq!(env.pod.snapshot(), before);
}

/// CNI may add an address after nicplug enslaved the pod link, and nicplug
/// waits for CNI to settle before it takes the address away. Meanwhile the
/// pod namespace must not answer ARP for it: the node would learn the
/// bridge's MAC for what is the VM's address, and send the VM's traffic into
/// the pod namespace until that neighbour entry aged out.
#[test]
fn the_pod_namespace_answers_no_arp_for_an_address_the_pod_link_still_holds() {
    if !require_root() {
        return;
    }
    const CNI_ADDRESS: &str = "169.254.10.2";
    let env = PodEnv::new("arp");
    env.peer
        .ip(&["addr", "add", "169.254.10.1/24", "dev", "peer0"]);
    let record = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        record
    });
    // CNI, late: the address is back on the enslaved pod link.
    env.pod.ip(&[
        "addr",
        "add",
        &format!("{CNI_ADDRESS}/24"),
        "brd",
        "+",
        "dev",
        POD_IF,
    ]);
    let arping = std::process::Command::new("ip")
        .args(["netns", "exec", &env.peer.name, "busybox", "arping"])
        .args(["-c", "2", "-w", "3", "-I", "peer0", CNI_ADDRESS])
        .output()
        .unwrap();
    let neighbours = env.peer.ip(&["neigh", "show", "dev", "peer0"]);
    assert!(
        !arping.status.success(),
        "the pod namespace answered ARP for {CNI_ADDRESS}: {}; node neighbours: {neighbours}",
        String::from_utf8_lossy(&arping.stdout)
    );
    assert!(has_flag(&env.pod.link_json(BRIDGE), "NOARP"));
    env.pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &record).await;
    });
}

/// A DHCPDISCOVER from `client` as a guest sends it: broadcast, from
/// 0.0.0.0:68 to 255.255.255.255:67 (checksums left to offload, as virtio
/// does).
fn discover_frame(client: Mac) -> Vec<u8> {
    use dhcproto::Encodable;
    use dhcproto::v4::{DhcpOption, Message, MessageType};
    let unspecified = std::net::Ipv4Addr::UNSPECIFIED;
    let mut message = Message::new(
        unspecified,
        unspecified,
        unspecified,
        unspecified,
        &client.octets(),
    );
    message
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    let payload = message.to_vec().unwrap();
    let udp_len = 8 + payload.len();
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&client.octets());
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0]);
    frame[16..18].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0, 255, 255, 255, 255]);
    frame.extend_from_slice(&68u16.to_be_bytes());
    frame.extend_from_slice(&67u16.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&payload);
    frame
}

/// Counts the DHCP replies from `server` that arrive on the guest's end of
/// the tap until `stop` is set.
fn count_replies(
    guest: std::fs::File,
    server: Mac,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    std::thread::spawn(move || {
        let mut guest = guest;
        let mut replies = 0;
        let mut buffer = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut poll = libc::pollfd {
                fd: guest.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the length given.
            if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
                continue;
            }
            let n = guest.read(&mut buffer).unwrap();
            let frame = &buffer[..n];
            let udp_source_port = frame.get(34..36);
            if n > 36 && frame[6..12] == server.octets() && udp_source_port == Some(&[0, 67]) {
                replies += 1;
            }
        }
        replies
    })
}

/// A guest that floods its DHCP server is read no faster than the server's
/// frame budget (so a flood cannot take the agent's one thread), and is
/// served again once it stops.
#[test]
fn a_guest_flooding_the_dhcp_server_is_answered_at_a_bounded_rate() {
    use nicplug::dhcp::task::{FRAME_BURST, FRAMES_PER_SECOND};
    use nicplug::dhcp::{Desired, Dns, LeaseConfig, Servers};
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !require_root() {
        return;
    }
    const FLOOD: usize = 5000;
    let env = PodEnv::new("flood");
    let (flood_replies, flood_took, later_replies) = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        // The test is QEMU: it holds the tap and speaks for the guest.
        let guest = open_tap(TAP, libc::IFF_TAP | libc::IFF_NO_PI);
        let lease = LeaseConfig::from_record(&record, record.mac, Dns::default(), None).unwrap();
        let mut servers = Servers::new(None);
        servers.reconcile(vec![Desired {
            network: "flood".into(),
            tap: name(TAP),
            server_mac: bridge_mac(),
            lease: Some(lease),
            lease6: None,
        }]);
        while !servers.status("flood").is_some_and(|s| s.served) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let frame = discover_frame(record.mac);
        let round = |frames: usize, listen: Duration| {
            let stop = Arc::new(AtomicBool::new(false));
            let counter = count_replies(guest.try_clone().unwrap(), bridge_mac(), stop.clone());
            let mut writer = guest.try_clone().unwrap();
            let frame = frame.clone();
            async move {
                let started = std::time::Instant::now();
                tokio::task::spawn_blocking(move || {
                    for _ in 0..frames {
                        // A full queue drops the frame, as for a real guest.
                        let _ = writer.write(&frame);
                    }
                })
                .await
                .unwrap();
                tokio::time::sleep(listen).await;
                stop.store(true, Ordering::Relaxed);
                let replies = tokio::task::spawn_blocking(move || counter.join().unwrap())
                    .await
                    .unwrap();
                (replies, started.elapsed())
            }
        };
        let (flood_replies, flood_took) = round(FLOOD, Duration::from_secs(1)).await;
        // The budget refills; one DISCOVER is answered again.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (later_replies, _) = round(1, Duration::from_secs(2)).await;
        servers.stop_all();
        (flood_replies, flood_took, later_replies)
    });
    // What the budget allows over the whole round, with a share of slack.
    let allowed =
        FRAME_BURST as f64 + f64::from(FRAMES_PER_SECOND) * flood_took.as_secs_f64() + 1.0;
    eprintln!(
        "flood: {FLOOD} DISCOVERs, {flood_replies} OFFERs in {flood_took:?} (budget {allowed:.0})"
    );
    assert!(flood_replies > 0, "the server answered the flood at all");
    assert!(
        (flood_replies as f64) <= allowed,
        "{flood_replies} replies to a flood of {FLOOD} in {flood_took:?}: more than the budget's {allowed:.0}"
    );
    assert_eq!(later_replies, 1, "served again after the flood");
}

/// Polls for `wait`: fails as soon as `dev` carries an IPv6 address.
fn assert_no_ipv6_for(ns: &TestNs, devs: &[&str], wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    loop {
        for dev in devs {
            let v6: Vec<String> = ns
                .addresses(dev)
                .into_iter()
                .filter(|a| a.contains(':'))
                .collect();
            assert!(v6.is_empty(), "{dev} has IPv6 addresses {v6:?}");
        }
        if std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The bridge and the tap are plumbing, not hosts: no IPv6 address (no
/// `fe80::`, so no DAD, router or multicast-listener traffic of their own),
/// no DAD, no router advertisements, set before either is up.
#[test]
fn bridge_and_tap_carry_no_ipv6() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("noip6");
    let qemu = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        // QEMU opens the tap: it gets carrier, the point where the kernel
        // would configure IPv6 on it.
        hold_tap_open(TAP)
    });
    assert!(has_flag(&env.pod.link_json(TAP), "LOWER_UP"));
    assert!(has_flag(&env.pod.link_json(BRIDGE), "LOWER_UP"));
    assert_no_ipv6_for(&env.pod, &[BRIDGE, TAP], Duration::from_millis(1500));
    for dev in [BRIDGE, TAP] {
        assert_eq!(
            env.pod.link_json(dev)["inet6_addr_gen_mode"],
            "none",
            "{dev}"
        );
        for knob in ["accept_dad", "accept_ra"] {
            assert_eq!(
                env.pod.sysctl(&format!("net/ipv6/conf/{dev}/{knob}")),
                "0",
                "{dev} {knob}"
            );
        }
    }
    drop(qemu);
}

/// Nothing of nicplug's plumbing may speak on the tenant network: while the
/// pod link is recorded, bridged and the tap made, the node side of the pod
/// link (the veth peer) receives no frame from any MAC but the VM's (the pod
/// link's original MAC, which the guest gets).
#[test]
fn plumbing_sends_nothing_onto_the_pod_wire() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("wire");
    let capture = netns_support::Capture::start(&env.peer, "peer0");
    let record = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        record
    });
    // DAD starts within rtr_solicit_delay (1 s) of carrier, router
    // solicitations follow DAD (1 s), MLD reports come at once.
    std::thread::sleep(Duration::from_secs(3));
    let frames = capture.stop();
    let vm_mac = record.mac.to_string();
    let leaked: Vec<String> = frames
        .iter()
        .filter(|f| !f.outgoing && f.source_mac() != vm_mac)
        .map(|f| f.describe())
        .collect();
    assert!(
        leaked.is_empty(),
        "frames from the pod side that the VM ({vm_mac}) did not send: {leaked:#?}"
    );
    eprintln!(
        "captured {} frames on the node side, {} from the pod side",
        frames.len(),
        frames.iter().filter(|f| !f.outgoing).count()
    );
}

/// A teardown that cannot do one sub-step still does every other one and
/// reports every failure; the record stays in the alias so the next pass
/// can finish the job.
#[test]
fn release_does_every_sub_step_and_reports_every_failure() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("relfail");
    let before = env.pod.snapshot();
    let (record, err) = env.pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        // A multicast MAC and an MTU beyond the veth maximum: the kernel
        // refuses both.
        let impossible = PodLinkRecord {
            mac: Mac::from_bytes([0x01, 0x00, 0x5e, 0, 0, 1]),
            mtu: 70_000,
            ..record.clone()
        };
        let err = net
            .release_pod_link(&name(POD_IF), &impossible)
            .await
            .unwrap_err();
        (record, err)
    });
    let message = err.to_string();
    eprintln!("release error: {message}");
    // Everything that could be done was done.
    let p = env.pod.link_json(POD_IF);
    assert!(p.get("master").is_none(), "still enslaved: {p}");
    assert_eq!(
        env.pod.addresses(POD_IF).len(),
        2,
        "addresses not restored after the MAC failed"
    );
    // ... and every failure is reported.
    assert!(message.contains("set mac"), "{message}");
    assert!(message.contains("set mtu"), "{message}");
    // The record is kept for the retry.
    assert_eq!(p["ifalias"], record.to_alias().unwrap());

    env.pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &record).await;
    });
    assert_eq!(env.pod.snapshot(), before);
}

/// Waits until `dev` has its kernel link-local address and DAD is over.
fn wait_for_link_local(ns: &TestNs, dev: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ns.addresses(dev).iter().any(|a| a.starts_with("fe80:")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no fe80:: address on {dev}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ns.settle();
}

/// The entries of a snapshot list (`links`, `addrs` or `routes`) that do not
/// belong to one of `ours`, as text.
fn others(snapshot: &Value, list: &str, ours: &[&str]) -> Vec<String> {
    snapshot[list]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            let dev = e.get("ifname").or_else(|| e.get("dev"));
            !dev.and_then(Value::as_str)
                .is_some_and(|d| ours.contains(&d))
        })
        .map(Value::to_string)
        .collect()
}

fn entry_of(snapshot: &Value, list: &str, dev: &str) -> Value {
    snapshot[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ifname"] == dev)
        .cloned()
        .unwrap_or_else(|| panic!("no {dev} in {list}"))
}

/// Whether a `/proc/sys/net/ipv*/conf/<link>/...` line is about the pod
/// link, the bridge or the tap.
fn ours_in_path(line: &str) -> bool {
    [POD_IF, BRIDGE, TAP]
        .iter()
        .any(|dev| line.contains(&format!("/conf/{dev}/")))
}

/// Ownership: with decoys in the namespace (another network's pod link with
/// an address and a foreign alias, a foreign bridge and tap, an unrelated
/// veth with an address and a route, a primary `eth0` with a default route),
/// a whole plug and unplug through the real [`Netlink`] changes no decoy,
/// and gives the pod link back exactly.
#[test]
fn plug_and_unplug_touch_no_decoy() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("decoy");
    let (pod, peer) = (&env.pod, &env.peer);
    let other = nicplug::model::names::hashed_pod_iface("another-network");
    let other = other.as_str();
    pod.ip(&[
        "link", "add", other, "mtu", "1450", "type", "veth", "peer", "name", "peer1", "netns",
        &peer.name,
    ]);
    pod.ip(&["addr", "add", "169.254.20.2/24", "brd", "+", "dev", other]);
    pod.ip(&["link", "set", "dev", other, "alias", "cni: another network"]);
    pod.ip(&["link", "set", other, "up"]);
    peer.ip(&["link", "set", "peer1", "up"]);

    pod.ip(&["link", "add", "k6t-foreign", "type", "bridge"]);
    pod.ip(&[
        "tuntap",
        "add",
        "dev",
        "tapforeign",
        "mode",
        "tap",
        "user",
        "107",
        "group",
        "107",
        "vnet_hdr",
    ]);
    pod.ip(&["link", "set", "tapforeign", "master", "k6t-foreign"]);
    pod.ip(&["link", "set", "tapforeign", "up"]);
    pod.ip(&["link", "set", "k6t-foreign", "up"]);

    pod.ip(&[
        "link", "add", "vdecoy0", "type", "veth", "peer", "name", "vdecoy1",
    ]);
    pod.ip(&["addr", "add", "169.254.30.2/24", "dev", "vdecoy0"]);
    pod.ip(&["link", "set", "vdecoy0", "up"]);
    pod.ip(&["link", "set", "vdecoy1", "up"]);
    pod.ip(&[
        "route",
        "add",
        "169.254.31.0/24",
        "via",
        "169.254.30.1",
        "dev",
        "vdecoy0",
    ]);

    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer2", "netns", &peer.name,
    ]);
    pod.ip(&["addr", "add", "169.254.40.2/24", "brd", "+", "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    peer.ip(&["link", "set", "peer2", "up"]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.40.1",
        "dev",
        "eth0",
    ]);
    pod.ip(&[
        "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
    ]);
    for dev in [other, "vdecoy0", "vdecoy1", "eth0"] {
        wait_for_link_local(pod, dev);
    }

    let before = pod.snapshot_with_routes();
    let sysctls_before = pod.interface_sysctls();
    let record = pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        record
    });
    let plugged = pod.snapshot_with_routes();
    let sysctls_plugged = pod.interface_sysctls();
    pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &record).await;
    });
    let after = pod.snapshot_with_routes();

    // Settings: no other link's (nor `all`/`default`) changed while plugged;
    // afterwards everything, the pod link's included, is as before.
    let not_ours = |lines: &[String]| -> Vec<String> {
        lines.iter().filter(|l| !ours_in_path(l)).cloned().collect()
    };
    assert_eq!(
        not_ours(&sysctls_plugged),
        not_ours(&sysctls_before),
        "sysctls of other links (or all/default) changed while plugged"
    );
    assert_eq!(
        pod.interface_sysctls(),
        sysctls_before,
        "sysctls differ after unplug"
    );

    let ours = [POD_IF, BRIDGE, TAP];
    for list in ["links", "addrs", "routes"] {
        let decoys = others(&before, list, &ours);
        assert!(decoys.len() > 3, "{list}: {decoys:#?}");
        assert_eq!(
            others(&plugged, list, &ours),
            decoys,
            "{list} while plugged"
        );
        assert_eq!(others(&after, list, &ours), decoys, "{list} after unplug");
    }
    for list in ["links", "addrs"] {
        assert_eq!(
            entry_of(&after, list, POD_IF),
            entry_of(&before, list, POD_IF),
            "the pod link in {list}"
        );
    }
    for dev in [BRIDGE, TAP] {
        assert!(
            !after["links"].to_string().contains(dev),
            "{dev} left behind"
        );
    }
}

/// Events are only triggers, so losing some must cost nothing but a
/// re-read: with the receive queue shrunk to the kernel's minimum and 300
/// links made while nobody reads, the kernel drops events and reports
/// ENOBUFS; the watcher counts it, still wakes the consumer, whose re-read
/// then sees every link, and it keeps delivering events afterwards.
#[test]
fn link_events_survive_a_receive_queue_overflow() {
    if !require_root() {
        return;
    }
    const LINKS: usize = 300;
    let ns = TestNs::new("enobufs");
    let ns_name = ns.name.clone();
    ns.run(move || async move {
        let options = SubscribeOptions { receive_buffer: 1 };
        let events = LinkEvents::subscribe_with(options).await.unwrap();
        let overflows = events.overflows();
        // The burst, in one `ip -batch` process, before anyone reads.
        let batch: String = (0..LINKS)
            .map(|i| format!("link add burst{i} type bridge\n"))
            .collect();
        let mut ip = tokio::process::Command::new("ip")
            .args(["-n", &ns_name, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = ip.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, batch.as_bytes())
            .await
            .unwrap();
        drop(stdin);
        assert!(ip.wait().await.unwrap().success());

        let notify = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(events.run(notify.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while overflows.count() == 0 {
            tokio::time::timeout_at(deadline, notify.notified())
                .await
                .expect("no overflow reported within 10 s");
        }
        eprintln!("overflows after the burst: {}", overflows.count());
        // The consumer was woken at (or after) the overflow: its re-read.
        let net = Netlink::new().unwrap();
        let links = net.links().await.unwrap();
        let burst = links
            .iter()
            .filter(|l| l.name.as_str().starts_with("burst"))
            .count();
        assert_eq!(burst, LINKS);

        // Drain what is left of the burst, then: still awake?
        while tokio::time::timeout(Duration::from_millis(500), notify.notified())
            .await
            .is_ok()
        {}
        let status = tokio::process::Command::new("ip")
            .args(["-n", &ns_name, "link", "add", "after0", "type", "bridge"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(10), notify.notified())
            .await
            .expect("no wake-up for a link made after the overflow");
        assert!(!task.is_finished(), "the watcher stopped");
        task.abort();
    });
}

/// `ip -j <family> route show table all` and `ip -j addr` and `ip -j rule`
/// of the namespace, raw: compared byte for byte.
fn raw_routing_state(ns: &TestNs) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for args in [
        &["-j", "-4", "route", "show", "table", "all"][..],
        &["-j", "-6", "route", "show", "table", "all"],
        &["-j", "addr", "show"],
        &["-j", "-4", "rule", "show"],
        &["-j", "-6", "rule", "show"],
    ] {
        out.push((args.join(" "), ns.ip(args)));
    }
    out
}

/// Routes of `ip -j route show table all` whose device is `dev`.
fn routes_of(ns: &TestNs, family: &str, dev: &str) -> Vec<Value> {
    let all = ns.ip_json(&[family, "route", "show", "table", "all"]);
    all.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dev"] == dev)
        .cloned()
        .collect()
}

#[test]
fn routes_cni_made_come_back_byte_for_byte() {
    if !require_root() {
        return;
    }
    let env = PodEnv::new("routes");
    let pod = &env.pod;
    // No previous alias: it would take 26 of the record's 255 bytes.
    pod.ip(&["link", "set", "dev", POD_IF, "alias", ""]);
    // What a CNI plugin may leave on the pod link: a host route and a
    // subnet route via a gateway, a direct route, a default route in a
    // secondary table, a route with its own metric, protocol and source,
    // IPv6 via a link-local gateway; and policy rules pointing at the table.
    for route in [
        &[
            "route",
            "add",
            "169.254.255.10/32",
            "via",
            "169.254.10.1",
            "dev",
            POD_IF,
        ][..],
        &["route", "add", "169.254.20.0/24", "dev", POD_IF],
        &[
            "route",
            "add",
            "default",
            "via",
            "169.254.10.1",
            "dev",
            POD_IF,
            "table",
            "100",
        ],
        &[
            "route",
            "add",
            "169.254.30.0/24",
            "via",
            "169.254.10.1",
            "dev",
            POD_IF,
            "table",
            "100",
            "metric",
            "50",
            "proto",
            "static",
        ],
        &[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", POD_IF, "table", "100",
        ],
        &[
            "rule",
            "add",
            "from",
            "169.254.10.2",
            "table",
            "100",
            "priority",
            "100",
        ],
        &[
            "-6", "rule", "add", "oif", POD_IF, "table", "100", "priority", "100",
        ],
    ] {
        pod.ip(route);
    }
    pod.settle();
    let before = raw_routing_state(pod);
    let kernel_routes: usize = ["-4", "-6"]
        .iter()
        .map(|f| {
            routes_of(pod, f, POD_IF)
                .iter()
                .filter(|r| r["protocol"] == "kernel")
                .count()
        })
        .sum();
    assert!(
        kernel_routes >= 4,
        "connected, local, broadcast, fe80: {before:?}"
    );

    let (record, plugged) = pod.run(|| async {
        let net = Netlink::new().unwrap();
        let record = record_of_pod_link(&net).await;
        plug(&net, &record, false).await;
        (record, net.links().await.unwrap())
    });
    let recorded: Vec<String> = record.routes.iter().map(ToString::to_string).collect();
    assert_eq!(
        recorded,
        [
            "0.0.0.0/0>169.254.10.1~t100",
            "169.254.30.0/24>169.254.10.1~t100~p4~m50",
            "169.254.20.0/24",
            "169.254.255.10/32>169.254.10.1",
            "::/0>fe80::1~t100",
        ]
        .map(String::from)
        .to_vec(),
        "every non-kernel route, in dump order, nothing the kernel makes"
    );
    assert!(
        record.to_alias().unwrap().starts_with("nicplug/v2 "),
        "{record:?}"
    );
    // No route of CNI's is left through the bridge port: the kernel dropped
    // the IPv4 ones with the addresses (its own included), enslave removed
    // the recorded IPv6 one the kernel keeps (only its own ff00::/8 stays).
    assert!(
        find(&plugged, POD_IF).routes.is_empty(),
        "{:?}",
        find(&plugged, POD_IF).routes
    );
    for family in ["-4", "-6"] {
        let left: Vec<Value> = routes_of(pod, family, POD_IF)
            .into_iter()
            .filter(|r| r["protocol"] != "kernel")
            .collect();
        assert_eq!(left, Vec::<Value>::new());
    }
    // Rules name no link index: plumbing leaves them alone.
    assert_eq!(raw_routing_state(pod)[3..], before[3..], "rules unchanged");

    let again = record.clone();
    pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &record).await;
    });
    pod.settle();
    let after = raw_routing_state(pod);
    for ((what, b), (_, a)) in before.iter().zip(&after) {
        assert_eq!(a, b, "{what} differs after release");
    }
    // Idempotent: a second release (a restart after the last sub-step)
    // changes nothing.
    pod.run(move || async move {
        let net = Netlink::new().unwrap();
        unplug(&net, &again).await;
    });
    assert_eq!(raw_routing_state(pod), before);
}

/// CNI adds a pod link's routes after its addresses, and the record must
/// hold them: a route added alone (no link or address change with it)
/// wakes the loop, or nicplug would not record it before the 30 s resync.
#[test]
fn a_route_added_alone_wakes_the_loop() {
    if !require_root() {
        return;
    }
    let ns = TestNs::new("routewake");
    ns.ip(&["link", "add", "rw0", "type", "bridge"]);
    ns.ip(&["addr", "add", "169.254.31.2/24", "dev", "rw0"]);
    ns.ip(&["link", "set", "rw0", "up"]);
    let ns_name = ns.name.clone();
    ns.run(move || async move {
        let events = LinkEvents::subscribe().await.unwrap();
        let notify = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(events.run(notify.clone()));
        // Whatever the setup still queues, then quiet.
        while tokio::time::timeout(Duration::from_millis(500), notify.notified())
            .await
            .is_ok()
        {}
        for route in [
            vec![
                "route",
                "add",
                "169.254.255.7/32",
                "via",
                "169.254.31.1",
                "dev",
                "rw0",
            ],
            vec![
                "-6",
                "route",
                "add",
                "fe80::7/128",
                "dev",
                "rw0",
                "table",
                "100",
            ],
        ] {
            let status = tokio::process::Command::new("ip")
                .args(["-n", &ns_name])
                .args(&route)
                .status()
                .await
                .unwrap();
            assert!(status.success(), "ip {route:?}");
            tokio::time::timeout(Duration::from_secs(5), notify.notified())
                .await
                .unwrap_or_else(|_| panic!("no wake-up for ip {route:?}"));
        }
        task.abort();
    });
}

/// An IPv6 address in duplicate address detection is observed as tentative
/// (what CNI's IPAM waits for before it adds its routes, and so does the
/// planner), and no longer once DAD is over.
#[test]
fn a_tentative_ipv6_address_is_observed_until_dad_is_over() {
    if !require_root() {
        return;
    }
    let ns = TestNs::new("dad");
    ns.ip(&[
        "link", "add", "dad0", "type", "veth", "peer", "name", "dad1",
    ]);
    ns.ip(&["link", "set", "dad1", "up"]);
    ns.ip(&["link", "set", "dad0", "up"]);
    ns.ip(&["addr", "add", "fe80::31:2/64", "dev", "dad0"]);
    ns.run(|| async {
        let net = Netlink::new().unwrap();
        let ipam: nicplug::model::IpCidr = "fe80::31:2/64".parse().unwrap();
        let links = net.links().await.unwrap();
        let dad0 = find(&links, "dad0");
        assert!(dad0.addresses.contains(&ipam), "{dad0:?}");
        assert!(
            dad0.tentative.contains(&ipam),
            "right after the add: {dad0:?}"
        );
        let t0 = std::time::Instant::now();
        loop {
            let links = net.links().await.unwrap();
            if !find(&links, "dad0").tentative.contains(&ipam) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "DAD never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let links = net.links().await.unwrap();
        assert!(find(&links, "dad0").addresses.contains(&ipam));
    });
}
