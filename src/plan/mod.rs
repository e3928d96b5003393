//! The pure heart of nicplug: `(desired, observed) -> steps`.
//!
//! [`plan`] compares the VMI spec with the observed pod namespace and live
//! domain and returns, per spec interface, the phase it is in and the
//! idempotent steps that move it on. It does no I/O, so every case is a unit
//! test. The agent applies the steps in order; if one fails it applies the
//! interface's `rollback` steps, which return the pod to what it was before
//! nicplug touched it.

use std::fmt;
use std::net::IpAddr;

mod direct;
pub mod placement;

use serde::{Deserialize, Serialize};

use crate::hypervisor::{
    DeviceBackend, DomainInterface, DomainState, GuestView, InterfaceDevice, Migration, QemuVersion,
};
use crate::model::names::is_ordinal_pod_iface;
use crate::model::record::RecordError;
use crate::model::vmi::{Binding, NetworkSource, PodIfaceScheme, SpecInterface, SpecState, Vmi};
use crate::model::{IfName, IpCidr, Mac, Owner, PlumbingNames, PodLinkRecord, PodRoute};
use crate::netns::{CniDone, CniProgress, Link, LinkKind, TapSpec};
use placement::PortPool;

/// Where an interface stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// In the spec; waiting for the pod interface or the domain.
    Pending,
    /// Bridge, pod link and tap are in place; the device is not attached yet.
    Plumbed,
    /// A migration target: the plumbing is in place for the device that
    /// arrives with the domain (nothing is attached here; the domain is not
    /// running here yet).
    Prepared,
    /// The domain has the device.
    Attached,
    /// The guest agent reports the device's MAC: the guest sees the NIC.
    Ready,
    /// The last attempt failed; `message` says why. Retried with backoff.
    Failed,
    /// A hot-plug request nicplug cannot serve: a secondary network with a
    /// binding other than `bridge` (SR-IOV, passt, a plugin); `message` says
    /// which.
    Unsupported,
    /// The VM's primary network (the pod network, any binding, or Multus'
    /// default network): KubeVirt sets it up at VM start, nicplug leaves it
    /// alone. Listed so the table shows every spec interface; not a problem.
    NotManaged,
    /// A detach was requested; waiting for the guest to release the device.
    Detaching,
    /// The guest did not release the device within the detach timeout;
    /// plumbing stays, the detach is retried with backoff.
    DetachPending,
    /// The spec says `absent` and nothing of the interface is left.
    Detached,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One idempotent change to the pod namespace or the domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write the pod link's original state into its ifalias, before anything
    /// else changes it.
    RecordPodLink {
        pod: IfName,
        alias: String,
    },
    EnsureBridge {
        bridge: IfName,
        mac: Mac,
    },
    /// Enslave the pod link, removing only the `addresses` and `routes` of
    /// its record (an address CNI adds later stays until the next pass
    /// records it).
    EnslavePodLink {
        pod: IfName,
        bridge: IfName,
        mac: Mac,
        addresses: Vec<IpCidr>,
        routes: Vec<PodRoute>,
    },
    EnsureTap {
        spec: TapSpec,
        bridge: IfName,
    },
    /// Attach live, and to the persistent config when the domain is persistent.
    Attach {
        device: InterfaceDevice,
        persistent: bool,
    },
    /// Request the device's removal. The agent waits for the guest off the
    /// loop and stops this interface's steps here until the device is gone.
    Detach {
        alias: String,
        persistent: bool,
    },
    /// Update the live device's `<link state>`.
    SetLinkState {
        device: DomainInterface,
        up: bool,
        persistent: bool,
    },
    /// Take the live device's link down and, a second later, up again
    /// (live only): the guest's DHCP client renews on the carrier flap, what a passt NIC
    /// needs after a migration (KubeVirt's `link-refresh` method).
    RefreshLink {
        device: DomainInterface,
    },
    ReleasePodLink {
        pod: IfName,
        record: PodLinkRecord,
    },
    DeleteLink {
        name: IfName,
    },
}

impl Step {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Step::RecordPodLink { .. } => "record-pod-link",
            Step::EnsureBridge { .. } => "ensure-bridge",
            Step::EnslavePodLink { .. } => "enslave-pod-link",
            Step::EnsureTap { .. } => "ensure-tap",
            Step::Attach { .. } => "attach-device",
            Step::Detach { .. } => "detach-device",
            Step::SetLinkState { .. } => "set-link-state",
            Step::RefreshLink { .. } => "refresh-link",
            Step::ReleasePodLink { .. } => "release-pod-link",
            Step::DeleteLink { .. } => "delete-link",
        }
    }
}

/// The plan of one spec interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfacePlan {
    pub name: String,
    pub pod_iface: Option<IfName>,
    /// The MAC the VM sees, once known.
    pub mac: Option<Mac>,
    /// The phase once `steps` are done (the current phase when there are none).
    pub phase: Phase,
    pub message: Option<String>,
    pub steps: Vec<Step>,
    /// Undoes whatever `steps` may have done; applied when a step fails.
    pub rollback: Vec<Step>,
    /// The network left the spec: its status entry goes once it is unplugged.
    pub departed: bool,
    /// Failed for want of a free PCIe root port: worth retrying as soon as
    /// one frees, whatever the backoff says.
    pub needs_root_port: bool,
    /// Plumbing that went missing under a live device and that `steps`
    /// rebuild: someone removed it, an operator should hear of it.
    pub repairs: Vec<String>,
    /// The VM's uplink, for an attached device on plumbing of nicplug's.
    pub uplink: Option<Uplink>,
}

/// The pod link on the bridge: the VM's uplink. Until it is there, the
/// guest may see the NIC but no traffic flows, so the interface is not
/// Ready ([`confirmed_phase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Uplink {
    /// The pod link is on the bridge once the plan's steps are done.
    pub ready: bool,
    /// Which rule said CNI is done with the pod link; absent while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_done: Option<CniDone>,
}

impl InterfacePlan {
    fn new(name: &str, phase: Phase) -> Self {
        Self {
            name: name.to_string(),
            pod_iface: None,
            mac: None,
            phase,
            message: None,
            steps: Vec::new(),
            rollback: Vec::new(),
            departed: false,
            needs_root_port: false,
            repairs: Vec::new(),
            uplink: None,
        }
    }

    fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Notes where the uplink of `pod` stands: on the bridge already
    /// (`on_bridge`), or joining it with this plan's steps.
    fn set_uplink(&mut self, pod: &Link, on_bridge: bool) {
        let joins = self
            .steps
            .iter()
            .any(|s| matches!(s, Step::EnslavePodLink { .. }));
        self.uplink = Some(Uplink {
            ready: on_bridge || joins,
            cni_done: match pod.cni {
                CniProgress::Done(rule) => Some(rule),
                CniProgress::Settling | CniProgress::AwaitingNetworkStatus => None,
            },
        });
    }
}

/// The guest's confirmation, the one phase decided after the steps ran: an
/// Attached interface whose device's MAC the guest agent reports, and whose
/// uplink (if nicplug plumbs it) is in place, is Ready.
pub fn confirmed_phase(
    phase: Phase,
    device: Option<&DomainInterface>,
    guest: Option<&GuestView>,
    uplink: Option<Uplink>,
) -> Phase {
    let seen = match (device.and_then(|d| d.mac), guest) {
        (Some(mac), Some(GuestView::Interfaces(guest))) => guest.iter().any(|g| g.mac == Some(mac)),
        _ => false,
    };
    if phase == Phase::Attached && seen && uplink.is_none_or(|u| u.ready) {
        Phase::Ready
    } else {
        phase
    }
}

/// What the plan reads.
pub struct Observed<'a> {
    pub links: &'a [Link],
    /// `None` when the domain is not defined.
    pub domain: Option<&'a DomainState>,
    /// The uid/gid taps are created for; `None` when unknown.
    pub tap_owner: Option<Owner>,
    /// Coexistence with KubeVirt's own hotplug: also remove the `k6t-H` and
    /// `tapH` KubeVirt built (and leaks) once their network is gone from
    /// both the spec and the domain. Only safe when the spec is complete and
    /// authoritative (the VMI from the API).
    pub clean_kubevirt_leftovers: bool,
    /// KubeVirt runs beside nicplug (coexistence): its virt-handler plumbs
    /// every spec network at a VM's start and on a migration target, so a
    /// pod without the domain gets nothing prepared by nicplug (it would
    /// race virt-handler); KubeVirt's layout, once there, is adopted.
    pub kubevirt_plumbs: bool,
    /// Networks whose device arrived here with a live migration (the
    /// agent saw them `Prepared`) and whose guest was not told yet.
    pub migrated_in: &'a [String],
}

impl Observed<'_> {
    fn link(&self, name: &IfName) -> Option<&Link> {
        self.links.iter().find(|l| &l.name == name)
    }
}

/// Which pod interface naming scheme the pod uses: ordinal only when some
/// hot-pluggable network's `netN` link exists and none of their hashed names does.
pub fn pod_iface_scheme(vmi: &Vmi, links: &[Link]) -> PodIfaceScheme {
    let present = |scheme| {
        vmi.interfaces
            .iter()
            .filter(|i| i.is_hotpluggable())
            .any(|i| links.iter().any(|l| l.name == i.pod_iface(scheme)))
    };
    if !present(PodIfaceScheme::Hashed) && present(PodIfaceScheme::Ordinal) {
        PodIfaceScheme::Ordinal
    } else {
        PodIfaceScheme::Hashed
    }
}

/// Plans every interface of the spec, in spec order (which is also the order
/// devices are attached in, so guest NIC order follows the spec), then the
/// networks nicplug plugged that have left the spec.
pub fn plan(vmi: &Vmi, observed: &Observed<'_>) -> Vec<InterfacePlan> {
    if let Some(domain) = observed
        .domain
        .filter(|d| d.migration == Migration::Outgoing)
    {
        // The domain may still resume here: plan as for a domain that runs
        // here, and hold every change until the migration finished.
        let here = DomainState {
            running: true,
            ..domain.clone()
        };
        let view = Observed {
            links: observed.links,
            domain: Some(&here),
            tap_owner: observed.tap_owner,
            clean_kubevirt_leftovers: observed.clean_kubevirt_leftovers,
            kubevirt_plumbs: observed.kubevirt_plumbs,
            migrated_in: observed.migrated_in,
        };
        return plan_here(vmi, &view)
            .into_iter()
            .map(|p| hold(p, domain, MIGRATING_OUT))
            .collect();
    }
    plan_here(vmi, observed)
}

/// Why a change waits while the domain leaves.
pub const MIGRATING_OUT: &str =
    "the domain is migrating to another pod: this change waits until the migration finished";
/// Why a change waits while the domain arrives.
const MIGRATING_IN: &str =
    "the domain is migrating here: this change waits until the migration finished";

/// Holds a plan's changes while a migration runs: nothing is attached,
/// detached or torn down; the phase is what the domain has now.
fn hold(mut plan: InterfacePlan, domain: &DomainState, why: &str) -> InterfacePlan {
    if plan.steps.is_empty() {
        return plan;
    }
    let has_device = domain
        .interface_by_alias(&format!("ua-{}", plan.name))
        .is_some();
    plan.steps.clear();
    plan.rollback.clear();
    plan.repairs.clear();
    plan.needs_root_port = false;
    plan.phase = if has_device {
        Phase::Attached
    } else {
        Phase::Pending
    };
    plan.with_message(why)
}

/// [`plan`] for a domain that is not leaving.
fn plan_here(vmi: &Vmi, observed: &Observed<'_>) -> Vec<InterfacePlan> {
    let scheme = pod_iface_scheme(vmi, observed.links);
    let mut budget = Budget {
        pool: port_pool(vmi, observed.domain),
        macs: observed
            .domain
            .map(|d| d.interfaces.iter().filter_map(|i| i.mac).collect())
            .unwrap_or_default(),
    };
    let mut plans: Vec<InterfacePlan> = vmi
        .interfaces
        .iter()
        .map(|spec| plan_interface(vmi, spec, scheme, observed, &mut budget))
        .collect();
    plans.extend(plan_departed(vmi, observed));
    plans
}

/// The VM's primary network: never hot-plugged (by KubeVirt either), so
/// neither a request nor a problem.
fn is_primary(spec: &SpecInterface) -> bool {
    spec.binding != Binding::Passt
        && matches!(
            spec.source,
            NetworkSource::Pod | NetworkSource::Multus { default: true, .. }
        )
}

/// The position of a hot-pluggable interface among the spec's hot-pluggable
/// interfaces (absent ones count): what its preferred root port follows.
fn hotplug_position(vmi: &Vmi, name: &str) -> Option<usize> {
    vmi.interfaces
        .iter()
        .filter(|i| i.is_hotpluggable())
        .position(|i| i.name == name)
}

/// The root ports hot-plugged interfaces are placed on (see
/// [`placement`]): free ones and those of secondary networks' devices
/// (`ua-<name>` of no primary or other-binding interface of the spec), with
/// the preferred ports of interfaces not on them kept for them.
fn port_pool(vmi: &Vmi, domain: Option<&DomainState>) -> PortPool {
    let Some(domain) = domain else {
        return PortPool::new(&Default::default(), |_| false);
    };
    let secondary = |alias: Option<&str>| {
        alias
            .and_then(|a| a.strip_prefix("ua-"))
            .is_some_and(|network| {
                !vmi.interfaces
                    .iter()
                    .any(|i| i.name == network && !i.is_hotpluggable())
            })
    };
    let mut pool = PortPool::new(&domain.root_ports, secondary);
    // Not on its preferred port: no device yet (or none any more), or one
    // somewhere else, which may come back to it after an unplug.
    let elsewhere: Vec<usize> = vmi
        .interfaces
        .iter()
        .filter(|i| i.is_hotpluggable())
        .enumerate()
        .filter(|(k, i)| {
            let bus = domain
                .interface_by_alias(&i.alias())
                .and_then(|d| d.pci)
                .map(|a| a.bus);
            bus.is_none() || bus != pool.preferred(*k).map(|p| p.0)
        })
        .map(|(k, _)| k)
        .collect();
    pool.reserve(elsewhere);
    pool
}

/// What the plugs of one pass share and use up, in spec order.
struct Budget {
    /// Root ports neither in use nor taken by an earlier plug of this pass.
    pool: PortPool,
    /// MACs of the domain's devices and of earlier plugs of this pass.
    macs: Vec<Mac>,
}

fn plan_interface(
    vmi: &Vmi,
    spec: &SpecInterface,
    scheme: PodIfaceScheme,
    observed: &Observed<'_>,
    budget: &mut Budget,
) -> InterfacePlan {
    if is_primary(spec) {
        return InterfacePlan::new(&spec.name, Phase::NotManaged);
    }
    if let Some(reason) = spec.unsupported_reason() {
        return InterfacePlan::new(&spec.name, Phase::Unsupported).with_message(reason);
    }
    if let Some(kind) = direct::Direct::of(&spec.binding) {
        let pod_iface = kind.pod_iface(spec.pod_iface(scheme), observed);
        return direct::plan(kind, vmi, spec, pod_iface, observed, budget);
    }
    let names = PlumbingNames::for_pod_iface(&spec.pod_iface(scheme));
    let mut plan = InterfacePlan::new(&spec.name, Phase::Pending);
    plan.pod_iface = Some(names.pod.clone());

    let case = PrepareCase {
        vmi,
        spec,
        names: &names,
        observed,
    };
    let Some(domain) = observed.domain else {
        // A migration target before the domain arrives (or a pod whose VM
        // has not started yet): the taps must exist before QEMU starts.
        return case.prepare(None, plan);
    };
    match domain.migration {
        Migration::Incoming => return case.prepare(Some(domain), plan),
        Migration::Departed => return migrated_away(plan, &names, observed),
        Migration::None | Migration::Outgoing => {}
    }
    let device = domain.interface_by_alias(&spec.alias());
    let kubevirt_layout = observed.link(&names.kubevirt_renamed_pod).is_some();
    plan.mac = device.and_then(|d| d.mac);

    if spec.state == SpecState::Absent {
        return unplug(
            plan,
            &spec.alias(),
            &names,
            observed,
            domain,
            Phase::Detached,
        );
    }
    if let Some(device) = device {
        if !domain.running {
            // In the definition, not in a guest that runs here (shut off,
            // or a migration still arriving).
            return plan.with_message("the domain is not running");
        }
        // Attached by nicplug or by KubeVirt: adopt it.
        let pod_gone = observed.link(&names.pod).is_none();
        if pod_gone && domain.running && !kubevirt_layout && observed.link(&names.bridge).is_some()
        {
            // Multus removed the pod interface under a device nicplug plugged:
            // the device has no uplink any more. Unplug, and wait for the pod
            // interface to come back.
            let plan = unplug(
                plan,
                &spec.alias(),
                &names,
                observed,
                domain,
                Phase::Pending,
            );
            return plan.with_message(format!("pod interface {} is gone", names.pod));
        }
        plan.phase = Phase::Attached;
        if let Some(pod) = observed.link(&names.pod)
            && !kubevirt_layout
        {
            match repair_plumbing(spec, &names, pod, device, observed, domain) {
                Some(repair) if !repair.missing.is_empty() => return repair.apply_to(plan),
                Some(first_enslave) => plan.steps.extend(first_enslave.steps),
                None => plan.steps.extend(clear_late_addresses(pod, &names)),
            }
            if pod.master.is_none() {
                plan.message = cni_settling(pod);
            }
            plan.set_uplink(pod, pod.master.is_some());
        }
        if let Some(message) = off_preferred_port(vmi, spec, device, domain) {
            plan.message = Some(message);
        }
        plan.steps.extend(link_state_step(spec, device, domain));
        return plan;
    }
    if !domain.running {
        return plan.with_message("the domain is not running");
    }
    if kubevirt_layout {
        return plan.with_message(format!(
            "KubeVirt is plumbing this network ({} exists)",
            names.kubevirt_renamed_pod
        ));
    }
    let Some(pod) = observed.link(&names.pod) else {
        // Leftovers of an attempt whose pod interface went away.
        plan.steps = teardown(&names, observed);
        return plan.with_message(format!("waiting for pod interface {}", names.pod));
    };
    let case = PlugCase {
        vmi,
        spec,
        names: &names,
        pod,
        observed,
        domain,
    };
    plug(&case, budget, plan)
}

/// The domain shut off here because it migrated to another pod: it cannot
/// come back (a new migration would go to a new pod), so its tap and bridge
/// go. The pod link stays as the plumbing left it (nicplug's record in its
/// alias, the bridge's MAC, no addresses): given back, it would carry its
/// original MAC, which the VM keeps in the target pod, onto the same network,
/// and the node's bridge would send the VM's traffic here. CNI DEL deletes it
/// by name when the pod goes. KubeVirt's layout stays KubeVirt's.
fn migrated_away(
    mut plan: InterfacePlan,
    names: &PlumbingNames,
    observed: &Observed<'_>,
) -> InterfacePlan {
    if observed.link(&names.kubevirt_renamed_pod).is_none() {
        plan.steps = delete_bridge_and_tap(names, observed);
    }
    plan.with_message("the domain migrated to another pod")
}

/// One spec interface on a migration target.
struct PrepareCase<'a> {
    vmi: &'a Vmi,
    spec: &'a SpecInterface,
    names: &'a PlumbingNames,
    observed: &'a Observed<'a>,
}

impl PrepareCase<'_> {
    /// Plumbing for the device that arrives with the domain, nothing
    /// attached: the same bridge, pod link and tap as a plug builds, the tap
    /// with the queue mode the incoming device has (or the spec asks for).
    /// `domain` is the incoming domain, `None` before it exists.
    fn prepare(&self, domain: Option<&DomainState>, mut plan: InterfacePlan) -> InterfacePlan {
        let (spec, names, observed) = (self.spec, self.names, self.observed);
        let device = domain.and_then(|d| d.interface_by_alias(&spec.alias()));
        plan.mac = device.and_then(|d| d.mac).or(spec.mac);
        if spec.state == SpecState::Absent {
            let in_use = domain.is_some_and(|d| {
                d.devices_unknown
                    || d.interfaces.iter().any(|i| {
                        i.alias.as_deref() == Some(spec.alias().as_str())
                            || i.target_dev.as_deref() == Some(names.tap.as_str())
                    })
            });
            if in_use {
                // The arriving QEMU holds the tap: the unplug happens once it
                // runs here.
                return plan.with_message(MIGRATING_IN);
            }
            plan.steps = teardown(names, observed);
            plan.phase = Phase::Detached;
            return plan;
        }
        if observed.link(&names.kubevirt_renamed_pod).is_some() {
            // KubeVirt's virt-handler plumbs this network: adopt what it
            // built, build nothing beside it.
            if observed.link(&names.tap).is_some() {
                plan.phase = Phase::Prepared;
                return plan.with_message("KubeVirt's plumbing is in place");
            }
            return plan.with_message(format!(
                "KubeVirt is plumbing this network ({} exists)",
                names.kubevirt_renamed_pod
            ));
        }
        if observed.kubevirt_plumbs {
            return plan.with_message("KubeVirt plumbs this network before the domain arrives");
        }
        let Some(pod) = observed.link(&names.pod) else {
            if domain.is_none() {
                plan.steps = teardown(names, observed);
            }
            return plan.with_message(format!("waiting for pod interface {}", names.pod));
        };
        if let Some(waiting) = cni_settling(pod) {
            return plan.with_message(waiting);
        }
        let absent = DomainState::default();
        let case = PlugCase {
            vmi: self.vmi,
            spec,
            names,
            pod,
            observed,
            domain: domain.unwrap_or(&absent),
        };
        match case.check_prepare(device) {
            Ok(checked) => {
                let mut plan = case.steps(checked, plan);
                plan.steps.retain(|s| !matches!(s, Step::Attach { .. }));
                plan.phase = Phase::Prepared;
                plan
            }
            // With the domain here, QEMU holds what taps there are (it opened
            // them at its incoming start), and a source finishing its
            // migration reads the same for a moment (paused for it, the job
            // over, not yet shut off): nothing is torn down, and the next
            // pass sees where the domain went.
            Err(refusal) if domain.is_some() => plan.with_message(refusal.into_message()),
            Err(refusal) => refuse(&case, refusal, plan),
        }
    }
}

/// The live device's link state change the spec's `state` asks for, if any.
fn link_state_step(
    spec: &SpecInterface,
    device: &DomainInterface,
    domain: &DomainState,
) -> Option<Step> {
    let want_up = spec.state != SpecState::Down;
    (device.link_up != want_up).then(|| Step::SetLinkState {
        device: device.clone(),
        up: want_up,
        persistent: domain.persistent,
    })
}

/// Says so when an attached device is not on its preferred root port (its
/// port was taken when it was plugged, or someone else attached it there):
/// it stays there, devices are never moved.
fn off_preferred_port(
    vmi: &Vmi,
    spec: &SpecInterface,
    device: &DomainInterface,
    domain: &DomainState,
) -> Option<String> {
    let bus = device.pci?.bus;
    let port = domain
        .root_ports
        .ports
        .iter()
        .find(|p| p.index.0 == bus)?
        .index;
    let preferred = port_pool(vmi, Some(domain)).preferred(hotplug_position(vmi, &spec.name)?);
    match preferred {
        Some(preferred) if preferred == port => None,
        Some(preferred) => Some(format!(
            "on root port {port}, not its preferred port {preferred}"
        )),
        None => Some(format!(
            "on root port {port}: the spec has more hot-plug interfaces than the domain has hot-plug root ports"
        )),
    }
}

/// How to put back plumbing that went missing under a live device.
struct Repair {
    /// What is missing; empty when the only step is the pod link's first
    /// enslave, deferred while CNI configured it (no repair).
    missing: Vec<String>,
    steps: Vec<Step>,
    /// The tap was deleted: QEMU's handle on it is dead.
    dead_tap: Option<DeadTap>,
}

/// What to do about a device whose tap was deleted under it.
enum DeadTap {
    /// Detach it; the next pass attaches it again on the new tap.
    Reattach(Step),
    /// Leave it: detaching would stop QEMU (the message says why).
    Keep(String),
}

impl Repair {
    fn apply_to(self, mut plan: InterfacePlan) -> InterfacePlan {
        let missing = self.missing.join(", ");
        plan.repairs = self.missing;
        plan.steps = self.steps;
        let message = match self.dead_tap {
            Some(DeadTap::Reattach(detach)) => {
                plan.steps.push(detach);
                plan.phase = Phase::Detaching;
                format!(
                    "{missing} missing under the live device: recreated, re-attaching the device"
                )
            }
            Some(DeadTap::Keep(why)) => {
                plan.phase = Phase::Failed;
                format!("{missing} missing under the live device: {why}")
            }
            None => format!("{missing} missing under the live device: recreated"),
        };
        plan.with_message(message)
    }
}

/// Whether QEMU lost its handle on the live device's tap: the tap was
/// deleted (and maybe made again, which QEMU's descriptor does not follow).
fn tap_is_dead(tap: Option<&Link>) -> bool {
    tap.is_none_or(|t| t.tap.as_ref().is_some_and(|info| info.held == Some(false)))
}

/// Why a device whose tap died is not detached, when its QEMU would exit
/// on the detach; `None` when it lives through it.
fn dead_tap_detach_stops_qemu(names: &PlumbingNames, qemu: Option<QemuVersion>) -> Option<String> {
    if qemu.is_some_and(QemuVersion::survives_dead_tap_unplug) {
        return None;
    }
    let qemu = qemu.map_or_else(|| "of unknown version".to_string(), |v| v.to_string());
    Some(format!(
        "tap {} was deleted under the device, so QEMU's handle on it is dead and the NIC carries no traffic; \
         not detaching it, since QEMU {qemu} exits when such a device is unplugged: migrate or restart the VM",
        names.tap
    ))
}

/// Checks the plumbing under a device nicplug plugged (its record names
/// this network and the device uses its tap): someone may have deleted or
/// unplugged part of it. Level-triggered, like everything else: what is
/// missing is recreated on the next pass.
fn repair_plumbing(
    spec: &SpecInterface,
    names: &PlumbingNames,
    pod: &Link,
    device: &DomainInterface,
    observed: &Observed<'_>,
    domain: &DomainState,
) -> Option<Repair> {
    let record = record_of(pod)?.ok()?;
    if record.network.as_deref() != Some(spec.name.as_str())
        || device.target_dev.as_deref() != Some(names.tap.as_str())
    {
        return None;
    }
    let bridge = observed
        .link(&names.bridge)
        .filter(|b| b.kind == LinkKind::Bridge && b.up);
    let tap = observed.link(&names.tap);
    let enslaved = |link: &Link| bridge.is_some_and(|b| link.master == Some(b.index)) && link.up;
    let mut repair = Repair {
        missing: Vec::new(),
        steps: Vec::new(),
        dead_tap: None,
    };
    if bridge.is_none() {
        repair.missing.push(format!("bridge {}", names.bridge));
        repair.steps.push(Step::EnsureBridge {
            bridge: names.bridge.clone(),
            mac: Mac::locally_administered_from(names.pod.as_str()),
        });
    }
    let mut record = record;
    if !enslaved(pod) {
        // Never enslaved yet (still its own MAC, no master): the plug left
        // that until CNI was done with the link. What CNI added since the
        // record was taken is recorded at once (DHCP serves from it).
        let first_time = pod.master.is_none() && pod.mac == Some(record.mac);
        if first_time {
            let (absorbed, record_step) = absorb_late_addresses(pod, names, record).ok()?;
            record = absorbed;
            repair.steps.extend(record_step);
        } else {
            repair
                .missing
                .push(format!("pod interface {} on the bridge", names.pod));
        }
        if !first_time || cni_settling(pod).is_none() {
            repair.steps.push(Step::EnslavePodLink {
                pod: names.pod.clone(),
                bridge: names.bridge.clone(),
                mac: Mac::locally_administered_from(names.pod.as_str()),
                addresses: record.addresses.clone(),
                routes: record.routes.clone(),
            });
        }
    }
    if !tap.is_some_and(enslaved) {
        let owner = observed.tap_owner?;
        repair.missing.push(match tap {
            Some(_) => format!("tap {} on the bridge", names.tap),
            None => format!("tap {}", names.tap),
        });
        repair.steps.push(Step::EnsureTap {
            spec: TapSpec {
                name: names.tap.clone(),
                owner,
                mtu: record.mtu,
                multi_queue: device.queues.is_some_and(|q| q > 1),
            },
            bridge: names.bridge.clone(),
        });
    } else if tap_is_dead(tap) {
        repair
            .missing
            .push(format!("QEMU's handle on tap {}", names.tap));
    }
    if tap_is_dead(tap) {
        repair.dead_tap = Some(match dead_tap_detach_stops_qemu(names, domain.qemu) {
            None => DeadTap::Reattach(Step::Detach {
                alias: spec.alias(),
                persistent: domain.persistent,
            }),
            Some(why) => DeadTap::Keep(why),
        });
    }
    (!repair.steps.is_empty() || repair.dead_tap.is_some()).then_some(repair)
}

/// An enslaved pod link carries no address; one that CNI added late (after
/// the attach) is recorded as original state at once and removed again once
/// CNI is done with the link.
fn clear_late_addresses(pod: &Link, names: &PlumbingNames) -> Vec<Step> {
    let Some(Ok(record)) = record_of(pod) else {
        return Vec::new();
    };
    let (Some(mac), false, Some(_)) = (pod.mac, pod.addresses.is_empty(), pod.master) else {
        return Vec::new();
    };
    let mut steps = Vec::new();
    let record = match absorb_late_addresses(pod, names, record) {
        Ok((record, record_step)) => {
            steps.extend(record_step);
            record
        }
        Err(_) => return steps,
    };
    if cni_settling(pod).is_some() {
        // Recorded at once (the DHCP server serves from the record), taken
        // away once CNI is done.
        return steps;
    }
    steps.push(Step::EnslavePodLink {
        pod: names.pod.clone(),
        bridge: names.bridge.clone(),
        mac,
        addresses: record.addresses,
        routes: record.routes,
    });
    steps
}

/// How long a pod link must have been there, with the same addresses and
/// routes, before nicplug changes it (see [`cni_settling`]): CNI adds the
/// addresses and then, a few netlink calls later, the routes through them;
/// on a loaded node those calls can be far apart.
pub const CNI_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a pod link waits for its network-status entry before the
/// settle window decides instead: the entry normally follows CNI ADD within
/// a second or two (Multus patches the annotation, the API or kubelet's
/// downward-API file brings it), and a source that stopped updating must
/// not leave the VM without its uplink for good.
pub const NETWORK_STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the pod link is still CNI's to configure, if it is; until then the
/// plug attaches the device but leaves the pod link as it is (its MAC, its
/// addresses, off the bridge). CNI's IPAM adds the addresses, waits for
/// every IPv6 address of the link to leave duplicate address detection (the
/// reference plugins' `SettleAddresses`), then adds its routes, and the
/// bridge plugin then announces each IPv4 address with a gratuitous ARP
/// from the MAC the link has at that moment. A route via a gateway fails
/// ("network is unreachable") if nicplug took the addresses away meanwhile,
/// and the whole CNI ADD with it; and an announcement with the bridge's MAC
/// (nicplug's enslave sets it) sends the VM's traffic into the pod
/// namespace from every neighbour that takes it (both seen on the rig). So
/// nicplug waits until a link has been there, with the same addresses and
/// routes, for [`CNI_SETTLE`], and has no tentative address CNI waits for.
/// The kernel's own link-local address alone is not waited for: CNI
/// settles only when it added IPv6.
fn cni_settling(pod: &Link) -> Option<String> {
    match pod.cni {
        CniProgress::Settling => {
            return Some(format!(
                "waiting for CNI to finish pod interface {}: it appeared or its addresses or routes changed in the last {} ms",
                pod.name,
                CNI_SETTLE.as_millis()
            ));
        }
        CniProgress::AwaitingNetworkStatus => {
            return Some(format!(
                "waiting for CNI to finish pod interface {}: Multus' network-status has no entry for it yet (the settle window decides after {} s)",
                pod.name,
                NETWORK_STATUS_WAIT.as_secs()
            ));
        }
        CniProgress::Done(_) => {}
    }
    let kernels = pod.mac.map(|m| m.eui64_link_local());
    let own = |a: &IpCidr| matches!(a.addr, IpAddr::V6(v6) if Some(v6) == kernels);
    let cni_added_ipv6 = pod.addresses.iter().any(|a| a.addr.is_ipv6() && !own(a));
    let waited: Vec<String> = pod
        .tentative
        .iter()
        .filter(|a| cni_added_ipv6 || !own(a))
        .map(ToString::to_string)
        .collect();
    (!waited.is_empty()).then(|| {
        format!(
            "waiting for CNI to finish pod interface {}: {} in duplicate address detection",
            pod.name,
            waited.join(", ")
        )
    })
}

/// The nicplug record in a link's alias, if it carries one.
fn record_of(link: &Link) -> Option<Result<PodLinkRecord, RecordError>> {
    link.alias
        .as_deref()
        .filter(|a| PodLinkRecord::is_record(a))
        .map(PodLinkRecord::from_alias)
}

/// The step writing `record` into the pod link's alias.
fn record_step(names: &PlumbingNames, record: &PodLinkRecord) -> Result<Step, String> {
    let alias = record
        .to_alias()
        .map_err(|e| format!("cannot record the state of {}: {e}", names.pod))?;
    Ok(Step::RecordPodLink {
        pod: names.pod.clone(),
        alias,
    })
}

/// nicplug removes every address right after recording, so an address on
/// the link that the record lacks was added by CNI after nicplug first acted
/// (IPAM runs after the link appears): it belongs to the original state, and
/// so do routes CNI added with it (the kernel drops them when the address
/// goes). Returns the record with such addresses and routes, and the step
/// to save it.
fn absorb_late_addresses(
    pod: &Link,
    names: &PlumbingNames,
    mut record: PodLinkRecord,
) -> Result<(PodLinkRecord, Option<Step>), String> {
    let late: Vec<IpCidr> = pod
        .addresses
        .iter()
        .filter(|a| !record.addresses.contains(a))
        .copied()
        .collect();
    let late_routes: Vec<_> = pod
        .routes
        .iter()
        .filter(|r| !record.routes.contains(r))
        .cloned()
        .collect();
    if late.is_empty() && late_routes.is_empty() {
        return Ok((record, None));
    }
    record.addresses.extend(late);
    record.routes.extend(late_routes);
    let step = record_step(names, &record)?;
    Ok((record, Some(step)))
}

/// Detaches the device if there is one, then removes nicplug's plumbing.
/// The agent stops at `Detach` until the device is gone, so tap and bridge
/// are never removed from under a live device. `done` is the phase once
/// nothing is left.
fn unplug(
    mut plan: InterfacePlan,
    alias: &str,
    names: &PlumbingNames,
    observed: &Observed<'_>,
    domain: &DomainState,
    done: Phase,
) -> InterfacePlan {
    let kubevirt_layout = observed.link(&names.kubevirt_renamed_pod).is_some();
    let in_use = domain.interfaces.iter().any(|i| {
        i.alias.as_deref() == Some(alias) || i.target_dev.as_deref() == Some(names.tap.as_str())
    });
    if in_use {
        if !domain.running {
            // Only the domain that runs here is ours to change (a migration
            // target receives its devices with the migration).
            return plan.with_message("the domain is not running here");
        }
        if tap_is_dead(observed.link(&names.tap))
            && let Some(why) = dead_tap_detach_stops_qemu(names, domain.qemu)
        {
            // Plumbing stays too: the device still points at the tap's name.
            plan.phase = Phase::Failed;
            return plan.with_message(why);
        }
        plan.phase = Phase::Detaching;
        plan.steps.push(Step::Detach {
            alias: alias.to_string(),
            persistent: domain.persistent,
        });
    } else {
        plan.phase = done;
    }
    if !kubevirt_layout {
        plan.steps.extend(teardown(names, observed));
    } else if observed.clean_kubevirt_leftovers {
        // KubeVirt's renamed pod link and dummy stay KubeVirt's and CNI's;
        // its bridge and tap are removed once no device uses them.
        plan.steps.extend(delete_bridge_and_tap(names, observed));
    }
    plan
}

/// Deletes the tap and the bridge of `names`, those that exist.
fn delete_bridge_and_tap(names: &PlumbingNames, observed: &Observed<'_>) -> Vec<Step> {
    [&names.tap, &names.bridge]
        .into_iter()
        .filter(|name| observed.link(name).is_some())
        .map(|name| Step::DeleteLink { name: name.clone() })
        .collect()
}

/// Networks that left the spec but still have a device that nicplug plugged,
/// or nicplug's plumbing: unplug them. Devices nicplug cannot prove it made
/// (no record naming the network, KubeVirt's layout) are left alone.
fn plan_departed(vmi: &Vmi, observed: &Observed<'_>) -> Vec<InterfacePlan> {
    let in_spec = |network: &str| vmi.interfaces.iter().any(|i| i.name == network);
    let mut departed: Vec<(String, PlumbingNames)> = Vec::new();
    let mut held: Vec<InterfacePlan> = Vec::new();
    // Pod links carrying a record of a network that left the spec.
    for link in observed.links {
        if let Some(network) = record_of(link).and_then(Result::ok).and_then(|r| r.network)
            && !in_spec(&network)
        {
            departed.push((network, PlumbingNames::for_pod_iface(&link.name)));
        }
    }
    // Devices whose pod link is already gone (CNI DEL came first) but whose
    // bridge, which only nicplug creates without an `H-nic`, is still there.
    if let Some(domain) = observed.domain {
        for device in &domain.interfaces {
            let Some(network) = device.alias.as_deref().and_then(|a| a.strip_prefix("ua-")) else {
                continue;
            };
            let Some(pod) = device.target_dev.as_deref().and_then(pod_iface_of_tap) else {
                continue;
            };
            let names = PlumbingNames::for_pod_iface(&pod);
            if let Some(Err(e)) = observed.link(&names.pod).and_then(record_of)
                && !in_spec(network)
            {
                held.push(corrupt_departed(network, &names, &e));
                continue;
            }
            let ours = observed.link(&names.pod).is_none()
                && observed.link(&names.bridge).is_some()
                && observed.link(&names.kubevirt_renamed_pod).is_none();
            if !in_spec(network) && ours && !departed.iter().any(|(n, _)| n == network) {
                departed.push((network.to_string(), names));
            }
        }
    }
    if observed
        .domain
        .is_some_and(|d| d.migration == Migration::Departed)
    {
        // Left the spec while the domain left the pod: only the plumbing goes.
        return departed
            .into_iter()
            .map(|(network, names)| {
                let mut plan = InterfacePlan::new(&network, Phase::Detached);
                plan.departed = true;
                plan.pod_iface = Some(names.pod.clone());
                migrated_away(plan, &names, observed)
            })
            .chain(held)
            .collect();
    }
    // A domain that stopped here (QEMU gone in the middle of an unplug, say)
    // is planned as well: its plumbing is kept under the devices its
    // definition still has, and removed where it has none, and either way
    // the network stays listed until nothing of it is left. An arriving
    // domain's devices come with the migration: nothing is planned there.
    let Some(domain) = observed
        .domain
        .filter(|d| d.running || d.migration == Migration::None)
    else {
        return held;
    };
    let mut plans: Vec<InterfacePlan> = departed
        .into_iter()
        .map(|(network, names)| {
            let mut plan = InterfacePlan::new(&network, Phase::Detaching);
            plan.departed = true;
            plan.pod_iface = Some(names.pod.clone());
            let alias = format!("ua-{network}");
            plan.mac = domain.interface_by_alias(&alias).and_then(|d| d.mac);
            let mut plan = unplug(plan, &alias, &names, observed, domain, Phase::Detached);
            plan.message = Some(match plan.message.take() {
                Some(why) => format!("the network left the spec; {why}"),
                None => "the network left the spec".to_string(),
            });
            plan
        })
        .collect();
    plans.extend(held);
    for device in &domain.interfaces {
        let Some(network) = device.alias.as_deref().and_then(|a| a.strip_prefix("ua-")) else {
            continue;
        };
        if in_spec(network) || plans.iter().any(|p| p.name == network) {
            continue;
        }
        plans.extend(direct::departed(network, device, observed, domain));
    }
    if observed.clean_kubevirt_leftovers && domain.running {
        plans.extend(kubevirt_leftovers(vmi, observed, domain, &plans));
    }
    plans
}

/// A device of a network that left the spec, on the tap of a pod link whose
/// record does not parse: what to give back is unknown, so nothing is
/// touched, and the status says why.
fn corrupt_departed(network: &str, names: &PlumbingNames, e: &RecordError) -> InterfacePlan {
    let mut plan = InterfacePlan::new(network, Phase::Failed).with_message(format!(
        "the network left the spec, but pod interface {} has a corrupt nicplug record: {e}; its device and plumbing are left as they are",
        names.pod
    ));
    plan.departed = true;
    plan.pod_iface = Some(names.pod.clone());
    plan
}

/// KubeVirt's bridges (`k6t-H` with its `tapH`) of networks in neither the
/// spec nor the domain: KubeVirt leaks them on unplug (kubevirt#14074) and
/// they break the next plug of the same network.
fn kubevirt_leftovers(
    vmi: &Vmi,
    observed: &Observed<'_>,
    domain: &DomainState,
    planned: &[InterfacePlan],
) -> Vec<InterfacePlan> {
    let spec_bridges: Vec<IfName> = vmi
        .interfaces
        .iter()
        .flat_map(|i| {
            [
                i.pod_iface(PodIfaceScheme::Hashed),
                i.pod_iface(PodIfaceScheme::Ordinal),
            ]
        })
        .map(|pod| PlumbingNames::for_pod_iface(&pod).bridge)
        .collect();
    observed
        .links
        .iter()
        .filter(|l| l.kind == LinkKind::Bridge && !spec_bridges.contains(&l.name))
        .filter_map(|bridge| {
            let suffix = bridge.name.as_str().strip_prefix("k6t-")?;
            let pod = if is_ordinal_pod_iface(suffix) {
                IfName::new(suffix).ok()?
            } else {
                IfName::new(format!("pod{suffix}")).ok()?
            };
            let names = PlumbingNames::for_pod_iface(&pod);
            let in_use = domain
                .interfaces
                .iter()
                .any(|i| i.target_dev.as_deref() == Some(names.tap.as_str()));
            let already = planned
                .iter()
                .any(|p| p.pod_iface.as_ref() == Some(&names.pod));
            if in_use || already || observed.link(&names.pod).is_some() {
                return None;
            }
            let mut plan = InterfacePlan::new(bridge.name.as_str(), Phase::Detached);
            plan.departed = true;
            plan.steps = delete_bridge_and_tap(&names, observed);
            Some(plan.with_message("KubeVirt's plumbing of a network that is gone"))
        })
        .collect()
}

/// The pod interface a KubeVirt tap name belongs to: `tapH` -> `podH` for
/// hashed names, `tapN` -> `netN` for ordinal ones.
fn pod_iface_of_tap(tap: &str) -> Option<IfName> {
    let suffix = tap.strip_prefix("tap")?;
    let pod = if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()) {
        format!("net{suffix}")
    } else {
        format!("pod{suffix}")
    };
    IfName::new(pod).ok()
}

/// Why a plug cannot go ahead now.
enum Refusal {
    /// Fails the interface and removes what nicplug had built for it.
    Fail(String),
    /// Fails the interface and leaves the pod link alone: it is not in a
    /// state nicplug may change.
    HandsOff(String),
    /// Every root port is in use; retried as soon as one frees.
    NoRootPort(String),
}

impl Refusal {
    fn into_message(self) -> String {
        match self {
            Refusal::Fail(message) | Refusal::HandsOff(message) | Refusal::NoRootPort(message) => {
                message
            }
        }
    }
}

/// One interface to plug, with what the plan reads for it.
struct PlugCase<'a> {
    vmi: &'a Vmi,
    spec: &'a SpecInterface,
    names: &'a PlumbingNames,
    pod: &'a Link,
    observed: &'a Observed<'a>,
    domain: &'a DomainState,
}

/// What a plug attaches, once every check passed.
struct Checked {
    record: PodLinkRecord,
    record_step: Option<Step>,
    owner: Owner,
    device: InterfaceDevice,
}

fn plug(case: &PlugCase<'_>, budget: &mut Budget, mut plan: InterfacePlan) -> InterfacePlan {
    match case.check(budget, &mut plan) {
        Ok(checked) => case.steps(checked, plan),
        Err(refusal) => refuse(case, refusal, plan),
    }
}

/// The plan of an interface whose plug (or preparation) cannot go ahead.
fn refuse(case: &PlugCase<'_>, refusal: Refusal, mut plan: InterfacePlan) -> InterfacePlan {
    plan.phase = Phase::Failed;
    let message = match refusal {
        Refusal::Fail(message) => {
            plan.steps = teardown(case.names, case.observed);
            message
        }
        Refusal::HandsOff(message) => message,
        Refusal::NoRootPort(message) => {
            plan.steps = teardown(case.names, case.observed);
            plan.needs_root_port = true;
            message
        }
    };
    plan.with_message(message)
}

impl PlugCase<'_> {
    /// Everything that must hold before anything is touched; takes a root
    /// port and the MAC from `budget` when it does.
    fn check(&self, budget: &mut Budget, plan: &mut InterfacePlan) -> Result<Checked, Refusal> {
        let (record, record_step) = self.original_state()?;
        let vm_mac = self.vm_mac(&record, budget)?;
        plan.mac = Some(vm_mac);
        self.check_master()?;
        let owner = self.tap_owner()?;
        let device = InterfaceDevice {
            network: self.spec.name.clone(),
            link: self.names.tap.clone(),
            backend: DeviceBackend::Tap,
            model: self.spec.model.clone(),
            mac: vm_mac,
            mtu: record.mtu,
            queues: self.vmi.multiqueue.filter(|_| self.spec.model == "virtio"),
            link_up: self.spec.state != SpecState::Down,
            address: None,
        };
        device
            .validate()
            .map_err(|e| Refusal::Fail(e.to_string()))?;
        // Free ports are counted as this pass leaves them: in use, or taken
        // by an earlier plug.
        let position = hotplug_position(self.vmi, &self.spec.name).unwrap_or(usize::MAX);
        let Some(placement) = budget.pool.take(position) else {
            let total = self.domain.root_ports.total();
            return Err(Refusal::NoRootPort(format!(
                "no free PCIe root port for hotplug: {total} of {total} in use"
            )));
        };
        let device = InterfaceDevice {
            address: Some(placement.address()),
            ..device
        };
        if placement.fallback.is_some() {
            plan.message = Some(placement.to_string());
        }
        budget.macs.push(vm_mac);
        Ok(Checked {
            record,
            record_step,
            owner,
            device,
        })
    }

    /// What a migration target builds for the device arriving with the
    /// domain (`device`, once the incoming domain is defined): no root port
    /// or MAC is taken (the domain brings its own), the tap's queue mode is
    /// the incoming device's.
    fn check_prepare(&self, device: Option<&DomainInterface>) -> Result<Checked, Refusal> {
        let (record, record_step) = self.original_state()?;
        self.check_master()?;
        let owner = self.tap_owner()?;
        let spec_queues = self.vmi.multiqueue.filter(|_| self.spec.model == "virtio");
        let device = InterfaceDevice {
            network: self.spec.name.clone(),
            link: self.names.tap.clone(),
            backend: DeviceBackend::Tap,
            model: self.spec.model.clone(),
            mac: device
                .and_then(|d| d.mac)
                .or(self.spec.mac)
                .unwrap_or(record.mac),
            mtu: record.mtu,
            queues: device.map_or(spec_queues, |d| d.queues),
            link_up: self.spec.state != SpecState::Down,
            // Nothing is attached here: the arriving device keeps its address.
            address: None,
        };
        device
            .validate()
            .map_err(|e| Refusal::Fail(e.to_string()))?;
        Ok(Checked {
            record,
            record_step,
            owner,
            device,
        })
    }

    /// A pod link enslaved to something else than its bridge is not ours.
    fn check_master(&self) -> Result<(), Refusal> {
        let bridge = self.observed.link(&self.names.bridge);
        if let Some(master) = self.pod.master
            && bridge.is_none_or(|b| b.index != master)
        {
            return Err(Refusal::HandsOff(format!(
                "pod interface {} is enslaved to another link",
                self.names.pod
            )));
        }
        Ok(())
    }

    fn tap_owner(&self) -> Result<Owner, Refusal> {
        self.observed.tap_owner.ok_or_else(|| {
            Refusal::Fail("cannot tell which user QEMU runs as; pass --tap-owner".into())
        })
    }

    /// The pod link's original state: from its record when nicplug already
    /// enslaved it, otherwise as it is now (with the step that records it).
    fn original_state(&self) -> Result<(PodLinkRecord, Option<Step>), Refusal> {
        let (pod, names) = (self.pod, self.names);
        match record_of(pod) {
            Some(Ok(record)) => absorb_late_addresses(pod, names, record).map_err(Refusal::Fail),
            Some(Err(e)) => Err(Refusal::HandsOff(format!(
                "pod interface {} has a corrupt nicplug record: {e}",
                names.pod
            ))),
            None => {
                let mac = pod.mac.ok_or_else(|| {
                    Refusal::Fail(format!("pod interface {} has no MAC address", names.pod))
                })?;
                if !pod.unrecordable_routes.is_empty() {
                    // Flushing the addresses would drop it for good.
                    return Err(Refusal::Fail(format!(
                        "pod interface {} has a route nicplug cannot record and give back: {}",
                        names.pod,
                        pod.unrecordable_routes.join("; ")
                    )));
                }
                let record = PodLinkRecord {
                    network: Some(self.spec.name.clone()),
                    mac,
                    mtu: pod.mtu,
                    addresses: pod.addresses.clone(),
                    routes: pod.routes.clone(),
                    previous_alias: pod.alias.clone(),
                };
                let step = record_step(names, &record).map_err(Refusal::Fail)?;
                Ok((record, Some(step)))
            }
        }
    }

    /// The MAC the VM gets: the spec's, else the pod link's original one;
    /// unicast, and not another device's.
    fn vm_mac(&self, record: &PodLinkRecord, budget: &Budget) -> Result<Mac, Refusal> {
        let vm_mac = self.spec.mac.unwrap_or(record.mac);
        let source = if self.spec.mac.is_some() {
            "macAddress".to_string()
        } else {
            format!("the MAC of pod interface {}", self.names.pod)
        };
        if vm_mac.is_multicast() || vm_mac.octets() == [0; 6] {
            return Err(Refusal::Fail(format!(
                "{source} {vm_mac} is not a unicast address"
            )));
        }
        if budget.macs.contains(&vm_mac) {
            return Err(Refusal::Fail(format!(
                "{source} {vm_mac} is already used by another device of the domain"
            )));
        }
        Ok(vm_mac)
    }

    /// The steps of what is not in place yet, then the attach, with the
    /// rollback that undoes all of it.
    fn steps(&self, checked: Checked, mut plan: InterfacePlan) -> InterfacePlan {
        let (names, pod) = (self.names, self.pod);
        let Checked {
            record,
            record_step,
            owner,
            device,
        } = checked;
        let bridge_mac = Mac::locally_administered_from(names.pod.as_str());
        let bridge = self.observed.link(&names.bridge);
        let tap = self.observed.link(&names.tap);
        let tap_spec = TapSpec {
            name: names.tap.clone(),
            owner,
            mtu: record.mtu,
            multi_queue: device.multi_queue(),
        };
        plan.steps.extend(record_step);
        if !bridge.is_some_and(|b| b.kind == LinkKind::Bridge && b.up && b.mac == Some(bridge_mac))
        {
            plan.steps.push(Step::EnsureBridge {
                bridge: names.bridge.clone(),
                mac: bridge_mac,
            });
        }
        let enslaved = |link: &Link| bridge.is_some_and(|b| link.master == Some(b.index));
        let pod_done = enslaved(pod)
            && pod.mac == Some(bridge_mac)
            && pod.addresses.is_empty()
            && pod.routes.is_empty()
            && pod.up
            && pod.learning == Some(false);
        if !pod_done {
            match cni_settling(pod) {
                // The device goes in now, the pod link joins the bridge once
                // CNI is done with it (a later pass).
                Some(waiting) => plan.message = Some(waiting),
                None => plan.steps.push(Step::EnslavePodLink {
                    pod: names.pod.clone(),
                    bridge: names.bridge.clone(),
                    mac: bridge_mac,
                    addresses: record.addresses.clone(),
                    routes: record.routes.clone(),
                }),
            }
        }
        plan.set_uplink(pod, pod_done);
        let tap_done = tap.is_some_and(|t| {
            enslaved(t)
                && t.up
                && t.mtu == tap_spec.mtu
                && t.tap.as_ref().is_some_and(|i| {
                    i.multi_queue == tap_spec.multi_queue && i.owner == Some(owner.uid)
                })
        });
        if !tap_done {
            plan.steps.push(Step::EnsureTap {
                spec: tap_spec,
                bridge: names.bridge.clone(),
            });
        }
        plan.steps.push(Step::Attach {
            device,
            persistent: self.domain.persistent,
        });
        plan.rollback = vec![
            Step::DeleteLink {
                name: names.tap.clone(),
            },
            Step::ReleasePodLink {
                pod: names.pod.clone(),
                record,
            },
            Step::DeleteLink {
                name: names.bridge.clone(),
            },
        ];
        plan.phase = Phase::Attached;
        plan
    }
}

/// Steps that remove nicplug's plumbing of a network that has no device:
/// the tap, then the pod link's release (restoring its recorded state),
/// then the bridge. Only what exists is touched.
fn teardown(names: &PlumbingNames, observed: &Observed<'_>) -> Vec<Step> {
    let mut steps = Vec::new();
    if observed.link(&names.tap).is_some() {
        steps.push(Step::DeleteLink {
            name: names.tap.clone(),
        });
    }
    if let Some(pod) = observed.link(&names.pod)
        && let Some(Ok(record)) = record_of(pod)
    {
        steps.push(Step::ReleasePodLink {
            pod: names.pod.clone(),
            record,
        });
    }
    if observed.link(&names.bridge).is_some() {
        steps.push(Step::DeleteLink {
            name: names.bridge.clone(),
        });
    }
    steps
}

#[cfg(test)]
mod tests;
