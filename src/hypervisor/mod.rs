//! The hypervisor seam: the running libvirt domain as nicplug sees it, and
//! the two things it does to it (attach and, later, detach a device).
//!
//! Protocol of a hot-plug, step by step:
//! 1. [`Hypervisor::domain`] reads the live domain XML: which `ua-<name>`
//!    devices exist and how many hot-pluggable PCIe root ports are free.
//! 2. The caller builds the device XML ([`device_xml`]) for one interface.
//! 3. [`Hypervisor::attach`] registers a DEVICE_ADDED waiter for the alias,
//!    *then* calls `virDomainAttachDeviceFlags` (LIVE, plus CONFIG when the
//!    domain is persistent), then waits for the event with a timeout.
//!
//! And of an unplug: [`Hypervisor::detach`] registers DEVICE_REMOVED and
//! DEVICE_REMOVAL_FAILED waiters, *then* calls `virDomainDetachDeviceAlias`
//! (asynchronous: the guest must acknowledge the PCIe unplug), then waits. A
//! guest that does not answer leaves the device in place: the caller keeps
//! the plumbing and retries.

use std::future::Future;
use std::time::Duration;

use crate::model::{IpCidr, Mac, Owner};

pub mod device_xml;
pub mod domain_xml;
pub mod events;
pub mod libvirt;
pub mod worker;

pub use domain_xml::{DomainInterface, DomainState};

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("libvirt: {op} failed: {message}")]
    Libvirt { op: &'static str, message: String },
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
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
    #[error("no DEVICE_ADDED event for {alias} within {timeout:?}")]
    AttachTimeout { alias: String, timeout: Duration },
    #[error("guest has not released the device")]
    DetachTimeout { alias: String, timeout: Duration },
    #[error("the guest refused to release {alias} (DEVICE_REMOVAL_FAILED)")]
    DetachFailed { alias: String },
    #[error("libvirt event loop is not running")]
    EventLoop,
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

    /// Attaches `device_xml` (whose alias is `alias`) live, and to the
    /// persistent config when `persistent`; returns once DEVICE_ADDED for the
    /// alias arrived, or fails after `timeout`.
    fn attach(
        &self,
        domain: &str,
        device_xml: &str,
        alias: &str,
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

    /// Sets the link state of a device, given its live XML
    /// (`virDomainUpdateDeviceFlags`).
    fn set_link_state(
        &self,
        domain: &str,
        interface_xml: &str,
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

    /// The uid/gid the domain's QEMU process runs as, when it runs.
    fn qemu_owner(
        &self,
        domain: &str,
    ) -> impl Future<Output = Result<Option<Owner>, HypervisorError>> + Send;
}
