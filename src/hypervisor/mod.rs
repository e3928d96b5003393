//! The hypervisor seam: the running libvirt domain as nicplug sees it, and
//! the two things it does to it (attach and, later, detach a device).
//!
//! Protocol of a hot-plug, step by step:
//! 1. [`Hypervisor::domain`] reads the live domain XML: which `ua-<name>`
//!    devices exist and how many hot-pluggable PCIe root ports are free.
//! 2. The caller describes the device ([`InterfaceDevice`]); the XML is
//!    made here ([`device_xml`]), behind the seam.
//! 3. [`Hypervisor::attach`] registers a DEVICE_ADDED waiter for the alias,
//!    *then* calls `virDomainAttachDeviceFlags` (LIVE, plus CONFIG when the
//!    domain is persistent), then waits for the event with a timeout.
//!
//! And of an unplug: [`Hypervisor::detach`] registers DEVICE_REMOVED and
//! DEVICE_REMOVAL_FAILED waiters, *then* calls `virDomainDetachDeviceAlias`
//! (asynchronous: the guest must acknowledge the PCIe unplug), then waits. A
//! guest that does not answer leaves the device in place: the caller keeps
//! the plumbing and retries.
//!
//! Every device change first reads the domain's state and job in the same
//! call and refuses ([`HypervisorError::Migrating`]) while a live migration
//! runs: the domain (and its devices) may be moving to another pod.

use std::future::Future;
use std::time::Duration;

use crate::model::{IpCidr, Mac, Owner};

pub mod device_xml;
pub mod domain_xml;
pub mod events;
pub mod libvirt;
pub mod worker;

pub use device_xml::{DeviceBackend, InterfaceDevice};
pub use domain_xml::{DomainInterface, DomainState};

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt: {op} failed: {message}")]
    Libvirt { op: &'static str, message: String },
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    /// libvirt refused the URI itself: retrying cannot help.
    #[error("libvirt rejects the URI {uri}: {message}")]
    InvalidUri { uri: String, message: String },
    /// The daemon did not answer in time (hung, stopped, or a socket that
    /// accepts and never answers).
    #[error("libvirt did not answer ({op})")]
    Unresponsive {
        op: &'static str,
        #[source]
        source: worker::CallError,
    },
    #[error("domain {0} not found")]
    NoDomain(String),
    #[error("cannot parse the domain XML")]
    DomainXml(#[from] domain_xml::DomainXmlError),
    #[error("cannot write the device XML")]
    DeviceXml(#[from] device_xml::DeviceXmlError),
    #[error("no DEVICE_ADDED event for {alias} within {timeout:?}")]
    AttachTimeout { alias: String, timeout: Duration },
    #[error("guest has not released the device")]
    DetachTimeout { alias: String, timeout: Duration },
    #[error("the guest refused to release {alias} (DEVICE_REMOVAL_FAILED)")]
    DetachFailed { alias: String },
    /// The domain stopped while a detach waited for the guest; its
    /// definition still has the device.
    #[error("the domain stopped before the guest released {alias}")]
    StoppedDuringDetach { alias: String },
    #[error("libvirt event loop is not running")]
    EventLoop,
    /// A device change met a migration in flight: nothing was changed.
    #[error("the domain is migrating ({migration:?}): its devices do not change now")]
    Migrating { migration: Migration },
}

/// A domain's state as an operator reads it (libvirt's state and reason,
/// condensed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainLifecycle {
    /// Running (or paused by a user): takes devices.
    Running,
    /// Paused for another reason than a user's request.
    Paused,
    /// Paused for a migration: on a target, the domain is arriving and its
    /// devices come with it; nicplug attaches nothing.
    Migrating,
    /// Running, with a migration to another pod in flight.
    MigratingOut,
    /// Shut off because it migrated to another pod.
    Migrated,
    /// Defined, not running.
    ShutOff,
    ShuttingDown,
    Crashed,
    /// Suspended by the guest (S3/S4).
    Suspended,
    /// No domain of that name is defined.
    Absent,
    /// libvirt did not answer the last pass.
    Unknown,
}

impl DomainLifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Migrating => "migrating",
            Self::MigratingOut => "migrating-out",
            Self::Migrated => "migrated",
            Self::ShutOff => "shut-off",
            Self::ShuttingDown => "shutting-down",
            Self::Crashed => "crashed",
            Self::Suspended => "suspended",
            Self::Absent => "absent",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for DomainLifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a live migration has the domain, as the daemon of this pod sees
/// it (libvirt's job and state). A migration moves the domain, with its live
/// XML and so its devices, to a daemon in another pod: nothing is plugged or
/// unplugged on either side while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Migration {
    /// No migration job: the domain stays where it is.
    #[default]
    None,
    /// Arriving here (paused, a migration-in job): its devices come with it
    /// and need their taps before QEMU starts.
    Incoming,
    /// Leaving (a migration-out job): it may still fail and resume here, so
    /// nothing of its plumbing may go.
    Outgoing,
    /// Shut off here because it migrated to another pod (reason migrated):
    /// gone for good from this pod.
    Departed,
}

/// The QEMU that runs the domain, as libvirt reports it
/// (`virConnectGetVersion`: major * 1 000 000 + minor * 1 000 + micro).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion(pub u32);

impl QemuVersion {
    /// Whether QEMU lives through the unplug of a device whose tap was
    /// deleted under it. QEMU 10.0 does not: when the guest lets go of the
    /// device, QEMU sets the header size on the dead tap and exits
    /// ("TUNSETVNETHDRSZ ioctl() failed: File descriptor in bad state.
    /// Exiting."), taking the whole VM with it. QEMU 7.2 lives, and
    /// re-attaching the device heals the NIC. 8.x and 9.x were not tried:
    /// taken as 10.0, the side that loses a NIC, not a VM.
    pub fn survives_dead_tap_unplug(self) -> bool {
        self.0 < 8_000_000
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0;
        write!(f, "{}.{}.{}", v / 1_000_000, v / 1_000 % 1_000, v % 1_000)
    }
}

/// One interface as the guest agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    /// The name inside the guest (`eth0`).
    pub name: String,
    pub mac: Option<Mac>,
    pub addresses: Vec<IpCidr>,
}

/// What the guest agent says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestView {
    Interfaces(Vec<GuestInterface>),
    /// No agent answers; the reason as libvirt gives it.
    NotConnected(String),
}

/// Operations on the VM's libvirt domain.
pub trait Hypervisor: Send + Sync {
    /// The live domain, or `None` when no such domain is defined.
    fn domain(
        &self,
        domain: &str,
    ) -> impl Future<Output = Result<Option<DomainState>, HypervisorError>> + Send;

    /// Attaches `device` live, and to the persistent config when
    /// `persistent`; returns once DEVICE_ADDED for its alias arrived, or
    /// fails after `timeout`.
    fn attach(
        &self,
        domain: &str,
        device: &InterfaceDevice,
        persistent: bool,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Detaches the device `alias` live (and from the persistent config when
    /// `persistent`); returns once DEVICE_REMOVED arrived or the live domain no
    /// longer has it. A device that is already gone is success: KubeVirt's
    /// launcher may have detached it first.
    fn detach(
        &self,
        domain: &str,
        alias: &str,
        persistent: bool,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Sets the link state of a live device (`virDomainUpdateDeviceFlags`
    /// with its live XML).
    fn set_link_state(
        &self,
        domain: &str,
        device: &DomainInterface,
        up: bool,
        persistent: bool,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// The guest's interfaces through the guest agent; `None` when no answer
    /// is available this time (an earlier query is still running).
    fn guest_interfaces(
        &self,
        domain: &str,
    ) -> impl Future<Output = Result<Option<GuestView>, HypervisorError>> + Send;

    /// How often the connection to the hypervisor was re-established.
    fn reconnects(&self) -> u64 {
        0
    }

    /// The state of `domain` as the last domain read found it, when this
    /// hypervisor knows more than [`DomainState::running`] says (`None`:
    /// ask `running`).
    fn lifecycle(&self, _domain: &str) -> Option<DomainLifecycle> {
        None
    }

    /// The uid/gid the domain's QEMU process runs as, when it runs; when
    /// it does not, what tells without a QEMU (a session daemon's user, a system
    /// daemon's DAC base label in its capabilities), if anything.
    fn qemu_owner(
        &self,
        domain: &str,
    ) -> impl Future<Output = Result<Option<Owner>, HypervisorError>> + Send;
}
