//! The benchmark's floor: nicplug's exact plumbing and libvirt attach of one
//! network, done straight-line by a minimal program (no watching of the VMI,
//! no planning, no status), using nicplug's own library calls. It runs in the
//! pod netns and reacts to the pod interface itself through a netlink link
//! subscription opened before it says `ready`, so it starts working the
//! moment the kernel announces the link (no "go" message from the harness):
//! this is the earliest any agent could start.
//!
//! Protocol on stdout, one line per step, `<step> <CLOCK_MONOTONIC ns>`:
//! `ready`, `noticed` (the RTM_NEWLINK datagram was received), `plumbed`
//! (alias record, bridge, enslaved pod link, tap: right before the attach),
//! `attached` (`Hypervisor::attach` returned: DEVICE_ADDED seen),
//! `guest` (the guest agent reports the MAC; polled every `--guest-poll-ms`),
//! then after `unplug` on stdin: `detach` (right before the detach call),
//! `removed` (DEVICE_REMOVED seen), `gone` (tap, pod link release, bridge).
//!
//! Run by `cargo bench --bench hotplug`; by hand, as root, in a rig's pod netns:
//! `ip netns exec POD floor --network dyniface1 --tap-owner 64055:64055 --uri URI --domain D`

#[path = "../benches/hotplug/linkwatch.rs"]
mod linkwatch;

use std::io::BufRead;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::broadcast;

use nicplug::hypervisor::libvirt::Libvirt;
use nicplug::hypervisor::{DeviceBackend, InterfaceDevice};
use nicplug::hypervisor::{GuestView, Hypervisor};
use nicplug::model::names::hashed_pod_iface;
use nicplug::model::{Mac, Owner, PlumbingNames, PodLinkRecord};
use nicplug::netns::netlink::Netlink;
use nicplug::netns::{PodNetwork, TapSpec};

use linkwatch::{LinkWatch, mono_ns};

#[derive(Parser)]
struct Args {
    /// VMI network name; the pod interface is KubeVirt's hashed name of it.
    #[arg(long)]
    network: String,
    /// UID:GID of QEMU (the tap owner).
    #[arg(long)]
    tap_owner: Owner,
    #[arg(long)]
    uri: String,
    #[arg(long)]
    domain: String,
    /// How often to ask the guest agent for the MAC after the attach.
    #[arg(long, default_value_t = 5)]
    guest_poll_ms: u64,
}

fn say(step: &str, at: u64) {
    println!("{step} {at}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let pod = hashed_pod_iface(&args.network);
    let names = PlumbingNames::for_pod_iface(&pod);
    // Subscribed before anything else: the link cannot appear unseen.
    let mut watch = LinkWatch::open().context("netlink link subscription")?;
    let (events, _keep) = broadcast::channel(64);
    let hyp = Libvirt::connect(&args.uri, events)?;
    let net = Netlink::new()?;
    let domain = hyp
        .domain(&args.domain)
        .await?
        .context("the domain does not exist")?;
    let persistent = domain.persistent;
    say("ready", mono_ns());

    // 1. React to the pod interface (blocking the only runtime thread is
    //    fine: nothing else runs until it exists).
    let link = watch
        .wait_new(pod.as_str(), Duration::from_secs(120))?
        .with_context(|| format!("{pod} did not appear"))?;
    say("noticed", link.at_ns);
    drop(watch);
    let mac: Mac = link
        .mac_string()
        .context("RTM_NEWLINK without a MAC")?
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mtu = link.mtu.context("RTM_NEWLINK without an MTU")?;

    // 2. Plumbing: the same calls, in the same order, as nicplug's steps.
    let record = PodLinkRecord {
        network: Some(args.network.clone()),
        mac,
        mtu,
        addresses: Vec::new(),
        routes: Vec::new(),
        previous_alias: None,
    };
    net.set_alias(&pod, Some(&record.to_alias()?)).await?;
    let bridge_mac = Mac::locally_administered_from(pod.as_str());
    net.ensure_bridge(&names.bridge, bridge_mac).await?;
    net.enslave_pod_link(&pod, &names.bridge, bridge_mac, &record.addresses, &[])
        .await?;
    let tap = TapSpec {
        name: names.tap.clone(),
        owner: args.tap_owner,
        mtu,
        multi_queue: false,
    };
    net.ensure_tap(&tap, &names.bridge).await?;
    let device = InterfaceDevice {
        network: args.network.clone(),
        link: names.tap.clone(),
        backend: DeviceBackend::Tap,
        model: "virtio".into(),
        mac,
        mtu,
        queues: None,
        link_up: true,
        // The floor lets libvirt choose the port, as KubeVirt does.
        address: None,
    };
    device.validate()?;
    say("plumbed", mono_ns());

    // 3. Attach: returns once DEVICE_ADDED for the alias arrived.
    hyp.attach(&args.domain, &device, persistent, Duration::from_secs(10))
        .await?;
    say("attached", mono_ns());

    // 4. The guest reports the MAC.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(GuestView::Interfaces(ifaces)) = hyp.guest_interfaces(&args.domain).await?
            && ifaces.iter().any(|i| i.mac == Some(mac))
        {
            say("guest", mono_ns());
            break;
        }
        if Instant::now() > deadline {
            bail!("the guest did not report {mac} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(args.guest_poll_ms)).await;
    }

    // 5. Unplug when told.
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "unplug" {
        bail!("expected `unplug` on stdin, got {line:?}");
    }
    say("detach", mono_ns());
    hyp.detach(
        &args.domain,
        &device.alias(),
        persistent,
        Duration::from_secs(30),
    )
    .await?;
    say("removed", mono_ns());
    net.delete_link(&names.tap).await?;
    net.release_pod_link(&pod, &record).await?;
    net.delete_link(&names.bridge).await?;
    say("gone", mono_ns());
    Ok(())
}
