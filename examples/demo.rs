//! The main job, shown step by step on the project's rig: a launcher pod with
//! a running VM, nicplug running inside it, a network hot-plugged the way
//! Multus does it, the VMI document updated, the guest seeing the new NIC,
//! and a ping from the node reaching the guest over it. Then everything is
//! cleaned up. Run with `scripts/demo` (as root).

#[path = "../tests/e2e/mod.rs"]
mod e2e;
#[path = "../tests/support/mod.rs"]
mod support;

use nicplug::plan::Phase;
use std::time::{Duration, Instant};

use e2e::{Nicplug, pod_iface};
use support::{CniNet, Rig, RigOptions};

fn step(start: Instant, what: &str) {
    println!(
        "[{:>7.1} ms] {what}",
        start.elapsed().as_secs_f64() * 1000.0
    );
}

fn main() {
    if !support::require_root() {
        std::process::exit(1);
    }
    let start = Instant::now();
    println!("nicplug demo: hot-plug a NIC into a running VM\n");
    let rig = Rig::start(RigOptions::default());
    step(
        start,
        &format!(
            "launcher pod {} with libvirtd and running VM {} (TCG, guest agent up)",
            rig.pod_ns, rig.domain
        ),
    );

    let mut nicplug = Nicplug::new(&rig, &[]);
    nicplug.start();
    nicplug.wait_phase("default", Phase::NotManaged, Duration::from_secs(10));
    step(
        start,
        "nicplug runs in the pod namespace; VMI has only the pod network",
    );

    let network = "dyniface1";
    nicplug.set_spec(&[network]);
    nicplug.wait_phase(network, Phase::Pending, Duration::from_secs(10));
    step(
        start,
        &format!(
            "VMI updated: bridge interface {network} added; nicplug waits for {}",
            pod_iface(network)
        ),
    );

    let net = CniNet::new(1);
    let cni = rig.cni_add(&net, &pod_iface(network));
    let t0 = Instant::now();
    step(
        start,
        &format!(
            "CNI bridge plugin (as Multus) put {} into the pod: MAC {}, IP {:?}",
            cni.ifname, cni.mac, cni.ips
        ),
    );
    nicplug.wait_phase(network, Phase::Attached, Duration::from_secs(20));
    let attached = t0.elapsed();
    step(
        start,
        &format!(
            "nicplug built k6t/tap plumbing and attached ua-{network}: {:.1} ms after the pod interface appeared",
            attached.as_secs_f64() * 1000.0
        ),
    );
    let guest = rig
        .wait_guest_mac(&cni.mac, Duration::from_secs(30))
        .expect("guest sees the NIC");
    let seen = t0.elapsed();
    step(
        start,
        &format!(
            "guest agent reports {} with MAC {}: {:.1} ms after the pod interface appeared",
            guest.name,
            guest.mac,
            seen.as_secs_f64() * 1000.0
        ),
    );

    let addr = net.addr(50);
    e2e::set_guest_address(&rig, &guest.name, None, &addr);
    step(
        start,
        &format!(
            "guest address {addr}/24 set on {} through the guest agent",
            guest.name
        ),
    );
    let reached = rig.ping_from_node(&net, &addr);
    step(
        start,
        &format!(
            "ping from the node namespace to {addr}: {}",
            if reached { "reply" } else { "NO REPLY" }
        ),
    );

    println!(
        "\nstatus document ({}):\n{}",
        nicplug.status_path.display(),
        serde_json::to_string_pretty(&nicplug.status().unwrap()).unwrap()
    );
    println!(
        "pod namespace links: {}",
        e2e::pod_link_names(&rig).join(" ")
    );

    nicplug.stop();
    drop(nicplug);
    drop(rig);
    step(start, "cleaned up: VM, libvirtd, namespaces");
    if !reached {
        std::process::exit(1);
    }
}
