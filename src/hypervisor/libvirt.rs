//! [`Hypervisor`] over a real libvirt daemon (the `virt` crate).
//!
//! libvirt calls block, and a daemon can hang without closing its socket
//! (stopped, deadlocked, or a socket that accepts and never answers). So no
//! libvirt call ever runs on the async runtime: calls go as jobs to a
//! [`Worker`], a thread of its own that also opens (and reopens) the
//! connection, and every call waits for its answer with a timeout. A worker
//! stuck in a call longer than that is abandoned and replaced (a bounded
//! number of times), so one hung call never blocks the calls after it.
//! Guest agent queries have their own worker: a slow agent must not delay an
//! attach.
//!
//! Each call that fails because libvirt is unreachable or does not answer
//! makes [`Hypervisor::unavailable`] say why, until a call succeeds again;
//! the connection's close callback bumps the event generation (the cached
//! domain is stale) and wakes the loop, so an outage is noticed at once.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt_sys as sys;

use super::domain_xml::{self, DomainState, parse_devices};
use super::events::{self, DomainEvent, EventSink, Registration};
use super::worker::Worker;
use super::{
    DomainInterface, DomainLifecycle, GuestInterface, GuestView, Hypervisor, HypervisorError,
    InterfaceDevice, Migration,
};
use crate::model::{IpCidr, Owner};

/// KubeVirt's non-root launcher socket.
pub const KUBEVIRT_SOCKET: &str = "/var/run/libvirt/virtqemud-sock";

/// The URI nicplug uses when none is given: KubeVirt's non-root socket when
/// it exists, else the system daemon.
pub fn default_uri() -> String {
    if std::path::Path::new(KUBEVIRT_SOCKET).exists() {
        format!("qemu+unix:///session?socket={KUBEVIRT_SOCKET}")
    } else {
        "qemu:///system".into()
    }
}

struct Connection {
    conn: Arc<Connect>,
    _events: Registration,
}

/// A domain read, valid while no event arrived since (same generation) and
/// for at most [`CACHE_MAX_AGE`].
struct CachedDomain {
    name: String,
    generation: u64,
    read_at: Instant,
    state: Option<(DomainState, Option<Owner>)>,
    lifecycle: DomainLifecycle,
}

/// How long a call to the daemon (connect included) may take before
/// libvirt counts as not answering. Normal calls take milliseconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a guest agent query may take before the agent counts as not
/// answering (the call itself goes on in the background).
const AGENT_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Safety net for events lost without a reconnect.
const CACHE_MAX_AGE: Duration = Duration::from_secs(10);

/// What the worker threads share: the connection, opened and reopened by
/// whichever worker needs it, never on the async runtime.
struct Shared {
    uri: String,
    events: EventSink,
    connection: Mutex<Option<Connection>>,
    /// Since when a worker is inside `Connect::open`; others fail rather
    /// than queue behind a connect that may hang.
    connecting: Mutex<Option<Instant>>,
    reconnects: AtomicU64,
}

/// The live domain is cached between events: a reconcile woken by netlink
/// costs no libvirt round trip, and every domain event (device added or
/// removed, lifecycle, connection closed) or own attach invalidates it.
pub struct Libvirt {
    shared: Arc<Shared>,
    /// Domain reads, attach, detach, update.
    control: Worker<Shared>,
    /// Guest agent queries, which may be slow for reasons of the guest.
    agent: Worker<Shared>,
    cache: Mutex<Option<CachedDomain>>,
    agent_query_busy: Arc<AtomicBool>,
    /// QEMU's user from the capabilities, with the connection (the
    /// reconnect count) it was read on.
    capabilities_owner: Mutex<Option<(u64, Option<Owner>)>>,
}

fn libvirt_error(op: &'static str, e: virt::error::Error) -> HypervisorError {
    HypervisorError::Libvirt {
        op,
        message: e.message().to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The live connection, reopened if libvirt closed it. Blocks: runs on a
    /// worker thread only.
    fn connection(&self) -> Result<Arc<Connect>, HypervisorError> {
        {
            let mut guard = lock(&self.connection);
            if let Some(c) = guard.as_ref() {
                if c.conn.is_alive().unwrap_or(false) {
                    return Ok(c.conn.clone());
                }
                tracing::warn!(uri = %self.uri, "libvirt connection lost, reconnecting");
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                self.events.generation.fetch_add(1, Ordering::SeqCst);
                *guard = None;
            }
        }
        {
            let mut connecting = lock(&self.connecting);
            if let Some(since) = *connecting {
                return Err(HypervisorError::Connect {
                    uri: self.uri.clone(),
                    message: format!(
                        "the connection attempt started {}s ago has not finished",
                        since.elapsed().as_secs()
                    ),
                });
            }
            *connecting = Some(Instant::now());
        }
        let opened = self.open();
        *lock(&self.connecting) = None;
        let connection = opened?;
        let conn = connection.conn.clone();
        *lock(&self.connection) = Some(connection);
        Ok(conn)
    }

    fn open(&self) -> Result<Connection, HypervisorError> {
        events::ensure_event_loop()?;
        // Errors come back as values; libvirt's default handler would also
        // print each one to stderr.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&self.uri)).map_err(|e| {
            let message = e.message().to_string();
            // The URI itself is wrong (no such driver, transport or
            // parameter): no daemon coming up will change that.
            if e.code()
                .is_any(vec![ErrorNumber::NoConnect, ErrorNumber::InvalidArg])
            {
                HypervisorError::InvalidUri {
                    uri: self.uri.clone(),
                    message,
                }
            } else {
                HypervisorError::Connect {
                    uri: self.uri.clone(),
                    message,
                }
            }
        })?;
        let registration = events::register(&conn, &self.events)?;
        Ok(Connection {
            conn: Arc::new(conn),
            _events: registration,
        })
    }
}

impl Libvirt {
    /// A handle on the daemon at `uri` that forwards events of all domains
    /// into `events` (the domain may not exist yet, e.g. on a migration
    /// target). Does no I/O: the first call connects, on a worker thread.
    pub fn new(uri: &str, events: broadcast::Sender<DomainEvent>) -> Self {
        let shared = Arc::new(Shared {
            uri: uri.to_string(),
            events: EventSink {
                tx: events,
                generation: Arc::default(),
            },
            connection: Mutex::new(None),
            connecting: Mutex::new(None),
            reconnects: AtomicU64::new(0),
        });
        Self {
            control: Worker::new("control", shared.clone()),
            agent: Worker::new("agent", shared.clone()),
            shared,
            cache: Mutex::new(None),
            agent_query_busy: Arc::default(),
            capabilities_owner: Mutex::new(None),
        }
    }

    /// Like [`Libvirt::new`], then connects on the calling thread (blocks;
    /// for tools and benchmarks outside the agent).
    pub fn connect(
        uri: &str,
        events: broadcast::Sender<DomainEvent>,
    ) -> Result<Self, HypervisorError> {
        let libvirt = Self::new(uri, events);
        libvirt.shared.connection()?;
        Ok(libvirt)
    }

    /// Runs `f` with the connection and the domain name on `worker`.
    async fn call<T: Send + 'static>(
        &self,
        worker: &Worker<Shared>,
        op: &'static str,
        timeout: Duration,
        domain: &str,
        f: impl FnOnce(&Connect, &str) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let domain = domain.to_string();
        worker
            .call(timeout, move |shared: &Shared| {
                shared.connection().and_then(|conn| f(&conn, &domain))
            })
            .await
            .map_err(|source| HypervisorError::Unresponsive { op, source })?
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        domain: &str,
        f: impl FnOnce(&Connect, &str) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        self.call(&self.control, op, CALL_TIMEOUT, domain, f).await
    }
}

fn lookup(conn: &Connect, name: &str) -> Result<Option<virt::domain::Domain>, HypervisorError> {
    match conn.lookup_domain_by_name(name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.code().is(ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(libvirt_error("look up the domain", e)),
    }
}

type DomainRead = (Option<(DomainState, Option<Owner>)>, DomainLifecycle);

fn read_domain(conn: &Connect, name: &str) -> Result<DomainRead, HypervisorError> {
    let Some(dom) = lookup(conn, name)? else {
        return Ok((None, DomainLifecycle::Absent));
    };
    let StateRead {
        running,
        lifecycle,
        migration,
        arrived_by_migration,
    } = domain_state(&dom)?;
    let persistent = dom
        .is_persistent()
        .map_err(|e| libvirt_error("read the domain state", e))?;
    let qemu = conn
        .hyp_version()
        .ok()
        .filter(|v| *v > 0)
        .map(super::QemuVersion);
    if migration == Migration::Incoming {
        // libvirt 11.3's virDomainGetXMLDesc of an arriving domain waits for
        // the migration job to end (9.0 answered at once): with a slow
        // migration every read would time out. Its devices come with it; a
        // target prepares from the spec and removes nothing meanwhile.
        let state = DomainState {
            running,
            persistent,
            migration,
            qemu,
            devices_unknown: true,
            ..DomainState::default()
        };
        return Ok((Some((state, None)), lifecycle));
    }
    let xml = dom
        .xml_desc(0)
        .map_err(|e| libvirt_error("read the live domain XML", e))?;
    let devices = parse_devices(&xml)?;
    let state = DomainState {
        running,
        persistent,
        migration,
        arrived_by_migration,
        interfaces: devices.interfaces,
        root_ports: devices.root_ports,
        qemu,
        devices_unknown: false,
    };
    Ok((
        Some((state, devices.dac_owner.filter(|_| running))),
        lifecycle,
    ))
}

impl Hypervisor for Libvirt {
    async fn domain(&self, domain: &str) -> Result<Option<DomainState>, HypervisorError> {
        Ok(self.read_cached(domain).await?.map(|(state, _)| state))
    }

    async fn attach(
        &self,
        domain: &str,
        device: &InterfaceDevice,
        persistent: bool,
        timeout: Duration,
    ) -> Result<(), HypervisorError> {
        let xml = device.to_xml()?;
        let alias = &device.alias();
        // Subscribe before the call: DEVICE_ADDED can beat the call's return.
        let mut rx = self.shared.events.tx.subscribe();
        self.invalidate();
        let mut flags = sys::VIR_DOMAIN_AFFECT_LIVE;
        if persistent {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        self.blocking("attach the device", domain, move |conn, name| {
            let dom = lookup(conn, name)?.ok_or_else(|| HypervisorError::NoDomain(name.into()))?;
            refuse_during_migration(&dom)?;
            dom.attach_device_flags(&xml, flags)
                .map_err(|e| libvirt_error("attach the device", e))
        })
        .await?;

        let added = self
            .wait_for(&mut rx, domain, alias, timeout, |e| match e {
                DomainEvent::DeviceAdded { alias, .. } => Some((alias.clone(), true)),
                _ => None,
            })
            .await?;
        match added {
            Some(_) => Ok(()),
            None if self.has_device(domain, alias).await? => Ok(()),
            None => Err(HypervisorError::AttachTimeout {
                alias: alias.to_string(),
                timeout,
            }),
        }
    }

    async fn detach(
        &self,
        domain: &str,
        alias: &str,
        persistent: bool,
        timeout: Duration,
    ) -> Result<(), HypervisorError> {
        let mut rx = self.shared.events.tx.subscribe();
        self.invalidate();
        let alias_owned = alias.to_string();
        let requested = self
            .blocking("detach the device", domain, move |conn, name| {
                let Some(dom) = lookup(conn, name)? else {
                    return Ok(false);
                };
                refuse_during_migration(&dom)?;
                // Detach from each definition that still has the device: after
                // an attempt the guest did not answer, the persistent config
                // no longer has it while the live domain still does.
                let has = |flags: u32| -> Result<bool, HypervisorError> {
                    let xml = dom
                        .xml_desc(flags)
                        .map_err(|e| libvirt_error("read the domain XML", e))?;
                    Ok(parse_devices(&xml)?
                        .interfaces
                        .iter()
                        .any(|i| i.alias.as_deref() == Some(alias_owned.as_str())))
                };
                let mut flags = 0;
                if has(0)? {
                    flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
                }
                if persistent && has(sys::VIR_DOMAIN_XML_INACTIVE)? {
                    flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
                }
                if flags & sys::VIR_DOMAIN_AFFECT_LIVE == 0 {
                    if flags != 0 {
                        detach_alias(&dom, &alias_owned, flags)
                            .map_err(|e| libvirt_error("detach the device", e))?;
                    }
                    return Ok(false);
                }
                match detach_alias(&dom, &alias_owned, flags) {
                    // Someone else (KubeVirt's launcher) was faster.
                    Err(e) if e.code().is(ErrorNumber::DeviceMissing) => Ok(false),
                    other => other
                        .map(|()| true)
                        .map_err(|e| libvirt_error("detach the device", e)),
                }
            })
            .await?;
        if !requested {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let outcome = self
                .wait_for(&mut rx, domain, alias, left, |e| match e {
                    DomainEvent::DeviceRemoved { alias, .. } => {
                        Some((alias.clone(), Removal::Removed))
                    }
                    DomainEvent::DeviceRemovalFailed { alias, .. } => {
                        Some((alias.clone(), Removal::Refused))
                    }
                    // The domain stopped, say (QEMU gone mid-unplug): no
                    // event for the device comes any more. Look now rather
                    // than at the timeout.
                    DomainEvent::Lifecycle { .. } => Some((alias.to_string(), Removal::Look)),
                    _ => None,
                })
                .await?;
            return match outcome {
                Some(Removal::Removed) => Ok(()),
                Some(Removal::Refused) => Err(HypervisorError::DetachFailed {
                    alias: alias.to_string(),
                }),
                Some(Removal::Look) => match self.domain(domain).await? {
                    Some(d) if d.interface_by_alias(alias).is_some() => {
                        if d.running {
                            // Some other change (a definition update):
                            // the guest may still release it.
                            continue;
                        }
                        Err(HypervisorError::StoppedDuringDetach {
                            alias: alias.to_string(),
                        })
                    }
                    _ => Ok(()),
                },
                None if !self.has_device(domain, alias).await? => Ok(()),
                None => Err(HypervisorError::DetachTimeout {
                    alias: alias.to_string(),
                    timeout,
                }),
            };
        }
    }

    async fn set_link_state(
        &self,
        domain: &str,
        device: &DomainInterface,
        up: bool,
        persistent: bool,
    ) -> Result<(), HypervisorError> {
        let xml = super::domain_xml::with_link_state(&device.xml, up)?;
        self.invalidate();
        let result = self
            .blocking("update the link state", domain, move |conn, name| {
                let dom =
                    lookup(conn, name)?.ok_or_else(|| HypervisorError::NoDomain(name.into()))?;
                refuse_during_migration(&dom)?;
                let mut flags = sys::VIR_DOMAIN_AFFECT_LIVE;
                if persistent {
                    flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
                }
                dom.update_device_flags(&xml, flags)
                    .map_err(|e| libvirt_error("update the link state", e))
            })
            .await;
        self.invalidate();
        result
    }

    fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    fn lifecycle(&self, domain: &str) -> Option<DomainLifecycle> {
        lock(&self.cache)
            .as_ref()
            .filter(|c| c.name == domain)
            .map(|c| c.lifecycle)
    }

    /// `virDomainInterfaceAddresses` with the agent as source. A hung agent
    /// would block the call for libvirt's agent timeout, so the wait is
    /// bounded here and only one query is in flight at a time.
    async fn guest_interfaces(&self, domain: &str) -> Result<Option<GuestView>, HypervisorError> {
        if self.agent_query_busy.swap(true, Ordering::SeqCst) {
            return Ok(None);
        }
        // Cleared when the job is done with, run or not.
        let busy = ClearOnDrop(self.agent_query_busy.clone());
        let op = "query the guest agent";
        let query = self.call(
            &self.agent,
            op,
            AGENT_QUERY_TIMEOUT,
            domain,
            move |conn, name| {
                let _busy = busy;
                let Some(dom) = lookup(conn, name)? else {
                    return Ok(GuestView::NotConnected("the domain is not defined".into()));
                };
                match agent_interfaces(&dom) {
                    Ok(ifaces) => Ok(GuestView::Interfaces(ifaces)),
                    Err(e)
                        if e.code().is_any(vec![
                            ErrorNumber::AgentUnresponsive,
                            ErrorNumber::AgentUnsynced,
                            ErrorNumber::OperationInvalid,
                        ]) =>
                    {
                        Ok(GuestView::NotConnected(e.message().to_string()))
                    }
                    Err(e) => Err(libvirt_error(op, e)),
                }
            },
        );
        match query.await {
            Err(HypervisorError::Unresponsive { .. }) => Ok(Some(GuestView::NotConnected(
                format!("the guest agent did not answer within {AGENT_QUERY_TIMEOUT:?}"),
            ))),
            other => other.map(Some),
        }
    }

    /// From the domain's DAC label (system daemons), else from the QEMU
    /// process itself (when its pid namespace is visible), else from the
    /// owner of a session daemon's socket (KubeVirt's non-root launcher runs
    /// QEMU as the daemon's user), else from the DAC base label of the
    /// connection's capabilities (the user a system daemon starts QEMU as).
    async fn qemu_owner(&self, domain: &str) -> Result<Option<Owner>, HypervisorError> {
        let (running, label) = self
            .read_cached(domain)
            .await?
            .map_or((false, None), |(d, owner)| (d.running, owner));
        // No QEMU to ask (a migration target before the domain arrives):
        // only what the daemon says tells.
        let found = if running {
            label.or_else(|| qemu_process_owner(domain))
        } else {
            None
        };
        match found.or_else(|| session_socket_owner(&self.shared.uri)) {
            Some(owner) => Ok(Some(owner)),
            None => self.capabilities_owner().await,
        }
    }
}

impl Libvirt {
    /// [`domain_xml::dac_base_owner`] of the connection's capabilities, read
    /// once per connection: the daemon's qemu.conf does not change under a
    /// running daemon, a restarted one may have another.
    async fn capabilities_owner(&self) -> Result<Option<Owner>, HypervisorError> {
        let connection = self.shared.reconnects.load(Ordering::Relaxed);
        if let Some((seen, owner)) = *lock(&self.capabilities_owner)
            && seen == connection
        {
            return Ok(owner);
        }
        let owner = self
            .blocking("read the capabilities", "", |conn, _| {
                let xml = conn
                    .capabilities()
                    .map_err(|e| libvirt_error("read the capabilities", e))?;
                Ok(domain_xml::dac_base_owner(&xml)?)
            })
            .await?;
        *lock(&self.capabilities_owner) = Some((connection, owner));
        Ok(owner)
    }
}

impl Libvirt {
    fn invalidate(&self) {
        *lock(&self.cache) = None;
    }

    async fn read_cached(
        &self,
        domain: &str,
    ) -> Result<Option<(DomainState, Option<Owner>)>, HypervisorError> {
        // Read the generation before the domain: an event racing the read
        // makes the entry stale rather than wrongly fresh.
        let generation = self.shared.events.generation.load(Ordering::SeqCst);
        if let Some(c) = lock(&self.cache).as_ref()
            && c.name == domain
            && c.generation == generation
            && c.read_at.elapsed() < CACHE_MAX_AGE
            // A migration in flight ends without an event when it fails on
            // the source: read such a domain every time.
            && c.state
                .as_ref()
                .is_none_or(|(d, _)| matches!(d.migration, Migration::None | Migration::Departed))
        {
            return Ok(c.state.clone());
        }
        tracing::debug!(domain, "reading the live domain");
        let (state, lifecycle) = self
            .blocking("read the live domain", domain, read_domain)
            .await?;
        *lock(&self.cache) = Some(CachedDomain {
            name: domain.to_string(),
            generation,
            read_at: Instant::now(),
            state: state.clone(),
            lifecycle,
        });
        Ok(state)
    }

    /// Waits for the first event of `domain` that `matches` maps to
    /// `(alias, value)` with our alias; `None` on timeout. A lagging receiver
    /// (missed events) also ends the wait with `None`, so the caller falls
    /// back to the live XML.
    async fn wait_for<T>(
        &self,
        rx: &mut broadcast::Receiver<DomainEvent>,
        domain: &str,
        alias: &str,
        timeout: Duration,
        matches: impl Fn(&DomainEvent) -> Option<(String, T)>,
    ) -> Result<Option<T>, HypervisorError> {
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(event) if event.domain() == domain => {
                        if let Some((a, value)) = matches(&event)
                            && a == alias
                        {
                            return Ok(Some(value));
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Ok(None),
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(HypervisorError::EventLoop);
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Ok(None))
    }

    async fn has_device(&self, domain: &str, alias: &str) -> Result<bool, HypervisorError> {
        Ok(self
            .domain(domain)
            .await?
            .is_some_and(|d| d.interface_by_alias(alias).is_some()))
    }
}

/// What an event says about a detach in flight.
enum Removal {
    Removed,
    Refused,
    /// Something happened to the domain: look whether it still has the device.
    Look,
}

/// Clears a flag when dropped.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// The owner of the QEMU process whose `-name guest=<domain>` matches, in
/// this process' network namespace (QEMU shares the pod's).
fn qemu_process_owner(domain: &str) -> Option<Owner> {
    use std::os::unix::fs::MetadataExt;
    let wanted = format!("guest={domain},");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        let is_qemu = args
            .next()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"));
        if is_qemu
            && crate::netns::in_our_netns(&path)
            && args.any(|a| {
                let a = String::from_utf8_lossy(a);
                a.starts_with(&wanted) || a == wanted.trim_end_matches(',')
            })
        {
            let meta = std::fs::metadata(&path).ok()?;
            return Some(Owner {
                uid: meta.uid(),
                gid: meta.gid(),
            });
        }
    }
    None
}

/// The owner of the socket of a `qemu+unix:///session?socket=...` URI.
fn session_socket_owner(uri: &str) -> Option<Owner> {
    use std::os::unix::fs::MetadataExt;
    if !uri.contains("/session") {
        return None;
    }
    let socket = uri.split_once("socket=")?.1.split('&').next()?;
    let meta = std::fs::metadata(socket).ok()?;
    Some(Owner {
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// `virDomainDetachDeviceAlias`, which the `virt` crate does not wrap.
fn detach_alias(
    dom: &virt::domain::Domain,
    alias: &str,
    flags: u32,
) -> Result<(), virt::error::Error> {
    let alias = std::ffi::CString::new(alias).map_err(|_| virt::error::Error::last_error())?;
    // SAFETY: `dom` is a live domain handle for the duration of the call and
    // `alias` a NUL-terminated string that outlives it.
    let rc = unsafe { sys::virDomainDetachDeviceAlias(dom.as_ptr(), alias.as_ptr(), flags) };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// The guest agent's view of the interfaces, through
/// `virDomainInterfaceAddresses` (the `virt` wrapper leaks the result).
fn agent_interfaces(dom: &virt::domain::Domain) -> Result<Vec<GuestInterface>, virt::error::Error> {
    let mut raw: *mut sys::virDomainInterfacePtr = std::ptr::null_mut();
    // SAFETY: `dom` is live for the call; libvirt allocates the array and
    // its elements and hands ownership to us through `raw`.
    let count = unsafe {
        sys::virDomainInterfaceAddresses(
            dom.as_ptr(),
            &mut raw,
            sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
            0,
        )
    };
    if count < 0 {
        return Err(virt::error::Error::last_error());
    }
    let text = |p: *const std::ffi::c_char| -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated string owned by the libvirt struct,
            // valid until that struct is freed below; copied at once.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let mut interfaces = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        // SAFETY: libvirt returned `count` valid element pointers.
        let iface = unsafe { *raw.add(i) };
        // SAFETY: each element is a valid virDomainInterface.
        let (name, hwaddr, naddrs, addrs) = unsafe {
            (
                (*iface).name,
                (*iface).hwaddr,
                (*iface).naddrs,
                (*iface).addrs,
            )
        };
        let mut addresses = Vec::new();
        for j in 0..naddrs as usize {
            // SAFETY: `addrs` has `naddrs` elements.
            let a = unsafe { *addrs.add(j) };
            if let Ok(addr) = text(a.addr).parse()
                && let Ok(cidr) = IpCidr::new(addr, a.prefix as u8)
            {
                addresses.push(cidr);
            }
        }
        interfaces.push(GuestInterface {
            name: text(name),
            mac: text(hwaddr).parse().ok(),
            addresses,
        });
        // SAFETY: frees the element (and its strings and addresses) once.
        unsafe { sys::virDomainInterfaceFree(iface) };
    }
    if !raw.is_null() {
        // SAFETY: the array itself was allocated by libvirt with malloc.
        unsafe { libc::free(raw.cast()) };
    }
    Ok(interfaces)
}

/// What [`domain_state`] reads.
struct StateRead {
    running: bool,
    lifecycle: DomainLifecycle,
    migration: Migration,
    /// Running since an incoming migration (reason `migrated`).
    arrived_by_migration: bool,
}

/// Whether the domain runs *here* and takes devices: running, or paused by a
/// user. An incoming migration (paused, reason migration or starting up) is
/// not: its devices arrive with the migration, nicplug must attach nothing.
/// And the state for people, and where a migration has it.
fn domain_state(dom: &virt::domain::Domain) -> Result<StateRead, HypervisorError> {
    let (mut state, mut reason) = (-1, -1);
    // SAFETY: `dom` is live for the call; the out-pointers are valid ints.
    let rc = unsafe { sys::virDomainGetState(dom.as_ptr(), &mut state, &mut reason, 0) };
    if rc < 0 {
        return Err(libvirt_error(
            "read the domain state",
            virt::error::Error::last_error(),
        ));
    }
    let running = state == sys::VIR_DOMAIN_RUNNING as i32
        || (state == sys::VIR_DOMAIN_PAUSED as i32 && reason == sys::VIR_DOMAIN_PAUSED_USER as i32);
    let migrated_away = state == sys::VIR_DOMAIN_SHUTOFF as i32
        && reason == sys::VIR_DOMAIN_SHUTOFF_MIGRATED as i32;
    let paused_for_migration = state == sys::VIR_DOMAIN_PAUSED as i32
        && (reason == sys::VIR_DOMAIN_PAUSED_MIGRATION as i32
            || reason == sys::VIR_DOMAIN_PAUSED_POSTCOPY as i32);
    let migration = if migrated_away {
        Migration::Departed
    } else if state == sys::VIR_DOMAIN_SHUTOFF as i32 {
        Migration::None
    } else {
        match migration_job(dom)? {
            // A target's daemon keeps no statistics of an incoming job
            // ("available only on the source host"): paused for a migration
            // without an outgoing job is arriving.
            Migration::None if paused_for_migration => Migration::Incoming,
            job => job,
        }
    };
    let lifecycle = match state as u32 {
        _ if migration == Migration::Outgoing => DomainLifecycle::MigratingOut,
        _ if migration == Migration::Incoming => DomainLifecycle::Migrating,
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => DomainLifecycle::Running,
        sys::VIR_DOMAIN_PAUSED if running => DomainLifecycle::Running,
        sys::VIR_DOMAIN_PAUSED
            if reason == sys::VIR_DOMAIN_PAUSED_MIGRATION as i32
                || reason == sys::VIR_DOMAIN_PAUSED_POSTCOPY as i32 =>
        {
            DomainLifecycle::Migrating
        }
        sys::VIR_DOMAIN_PAUSED => DomainLifecycle::Paused,
        sys::VIR_DOMAIN_SHUTDOWN => DomainLifecycle::ShuttingDown,
        sys::VIR_DOMAIN_SHUTOFF if migrated_away => DomainLifecycle::Migrated,
        sys::VIR_DOMAIN_SHUTOFF => DomainLifecycle::ShutOff,
        sys::VIR_DOMAIN_CRASHED => DomainLifecycle::Crashed,
        sys::VIR_DOMAIN_PMSUSPENDED => DomainLifecycle::Suspended,
        _ => DomainLifecycle::Unknown,
    };
    Ok(StateRead {
        running,
        lifecycle,
        migration,
        arrived_by_migration: state == sys::VIR_DOMAIN_RUNNING as i32
            && reason == sys::VIR_DOMAIN_RUNNING_MIGRATED as i32,
    })
}

/// A migration that starts raises no event on the source, so the caller's
/// domain read may predate it: every device change asks first, in the same
/// worker job, right before the change.
fn refuse_during_migration(dom: &virt::domain::Domain) -> Result<(), HypervisorError> {
    match domain_state(dom)?.migration {
        Migration::None | Migration::Departed => Ok(()),
        migration => Err(HypervisorError::Migrating { migration }),
    }
}

/// The domain's active job, if it is a migration (`virDomainGetJobStats`,
/// whose `operation` says which way; libvirt 3.3 and later). Raw: `virt`'s
/// `job_stats` builds a slice from the NULL array libvirt returns when no
/// job runs.
fn migration_job(dom: &virt::domain::Domain) -> Result<Migration, HypervisorError> {
    let (mut job_type, mut nparams): (c_int, c_int) = (0, 0);
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    // SAFETY: `dom` is live for the call; the out-pointers are valid. libvirt
    // allocates `params` (or leaves it NULL); it is freed below, once.
    let rc = unsafe {
        sys::virDomainGetJobStats(dom.as_ptr(), &mut job_type, &mut params, &mut nparams, 0)
    };
    if rc < 0 {
        // The domain stopped between the two calls, or the driver keeps no
        // jobs: no migration this pass can see.
        tracing::debug!(
            error = %virt::error::Error::last_error(),
            "cannot read the domain's job"
        );
        return Ok(Migration::None);
    }
    let mut operation: c_int = -1;
    if !params.is_null() {
        // SAFETY: `params` holds `nparams` entries from libvirt; the name is
        // a NUL-terminated literal; `operation` is a valid int. Then the
        // array is freed exactly once.
        unsafe {
            sys::virTypedParamsGetInt(params, nparams, c"operation".as_ptr(), &mut operation);
            sys::virTypedParamsFree(params, nparams);
        }
    }
    if job_type == sys::VIR_DOMAIN_JOB_NONE as c_int {
        return Ok(Migration::None);
    }
    Ok(match operation {
        o if o == sys::VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT as c_int => Migration::Outgoing,
        o if o == sys::VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN as c_int => Migration::Incoming,
        _ => Migration::None,
    })
}

/// libvirt's driver names (the part of a URI scheme before `+`).
const DRIVERS: [&str; 17] = [
    "qemu",
    "test",
    "lxc",
    "xen",
    "libxl",
    "vbox",
    "vmwareplayer",
    "vmwarews",
    "vmwarefusion",
    "esx",
    "gsx",
    "vpx",
    "bhyve",
    "ch",
    "openvz",
    "vz",
    "hyperv",
];

/// The transports libvirt's remote driver knows (after `+`).
const TRANSPORTS: [&str; 7] = ["unix", "ssh", "libssh", "libssh2", "tls", "tcp", "ext"];

/// Checks the shape of a libvirt URI before anything connects:
/// `driver[+transport]://[host]/path[?params]`. A URI that fails here can
/// never work, unlike a daemon that is not up yet.
pub fn check_uri(uri: &str) -> Result<(), String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err("expected driver[+transport]://[host]/path, e.g. qemu:///system".into());
    };
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if !DRIVERS.contains(&driver) {
        return Err(format!(
            "unknown driver {driver:?} (libvirt's are {})",
            DRIVERS.join(", ")
        ));
    }
    if let Some(t) = transport
        && !TRANSPORTS.contains(&t)
    {
        return Err(format!(
            "unknown transport {t:?} (one of {})",
            TRANSPORTS.join(", ")
        ));
    }
    if rest.chars().any(char::is_control) {
        return Err("control characters in the URI".into());
    }
    Ok(())
}

#[cfg(test)]
mod uri_tests {
    use super::check_uri;

    #[test]
    fn uri_shapes() {
        for good in [
            "qemu:///system",
            "qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock",
            "test:///default",
            "qemu+ssh://root@host/system",
        ] {
            assert_eq!(check_uri(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("bogus://x", "unknown driver \"bogus\""),
            ("qemu+bogus:///system", "unknown transport \"bogus\""),
            ("nonsense", "expected driver"),
        ] {
            let e = check_uri(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
