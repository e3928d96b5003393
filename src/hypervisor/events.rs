//! libvirt domain events, forwarded into a tokio broadcast channel.
//!
//! The `virt` crate has no event API, so this registers the raw callbacks of
//! `virt-sys`. libvirt's default event loop must be registered before the
//! first connection is opened and run on a thread of its own
//! ([`ensure_event_loop`]); callbacks run on that thread and only send into
//! the channel. Waiters subscribe *before* they trigger what they wait for.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt_sys as sys;

use super::HypervisorError;

/// A domain event nicplug reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    DeviceAdded {
        domain: String,
        alias: String,
    },
    DeviceRemoved {
        domain: String,
        alias: String,
    },
    DeviceRemovalFailed {
        domain: String,
        alias: String,
    },
    /// Started, stopped, suspended, defined, migrated, ...
    Lifecycle {
        domain: String,
    },
    AgentLifecycle {
        domain: String,
        connected: bool,
    },
    /// The connection to the daemon closed (daemon stopped or restarted,
    /// keepalive timeout): whatever was read through it may be stale.
    ConnectionClosed,
}

impl DomainEvent {
    /// The domain the event is about; empty for connection events.
    pub fn domain(&self) -> &str {
        match self {
            DomainEvent::DeviceAdded { domain, .. }
            | DomainEvent::DeviceRemoved { domain, .. }
            | DomainEvent::DeviceRemovalFailed { domain, .. }
            | DomainEvent::Lifecycle { domain }
            | DomainEvent::AgentLifecycle { domain, .. } => domain,
            DomainEvent::ConnectionClosed => "",
        }
    }
}

static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

/// Registers libvirt's default event loop implementation and runs it on a
/// dedicated thread, once per process. Must run before `Connect::open`.
pub fn ensure_event_loop() -> Result<(), HypervisorError> {
    EVENT_LOOP
        .get_or_init(|| {
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| {
                    loop {
                        if let Err(e) = virt::event::event_run_default_impl() {
                            tracing::error!(error = %e, "libvirt event loop iteration failed");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .clone()
        .map_err(|message| HypervisorError::Libvirt {
            op: "start the event loop",
            message,
        })
}

/// Where callbacks deliver: the generation counter is bumped *before* the
/// event is sent, so whoever sees the event also sees a cache of the domain
/// taken before it as stale.
#[derive(Clone)]
pub struct EventSink {
    pub tx: broadcast::Sender<DomainEvent>,
    pub generation: Arc<AtomicU64>,
}

type Sender = EventSink;

type GenericCallback = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
type DeviceCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);
type LifecycleCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type AgentLifecycleCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void);

/// Callback registrations on one connection; deregistered on drop.
pub struct Registration {
    conn: Connect,
    ids: Vec<c_int>,
    close_callback: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        for id in &self.ids {
            // SAFETY: the connection pointer is valid while `self.conn` lives
            // and `id` came from a successful registration on it.
            unsafe {
                sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), *id);
            }
        }
        if self.close_callback {
            // SAFETY: as above; `connection_closed` is the callback that was
            // registered on this connection.
            unsafe {
                sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(connection_closed));
            }
        }
    }
}

/// Registers nicplug's callbacks for every domain of `conn`.
pub fn register(conn: &Connect, tx: &Sender) -> Result<Registration, HypervisorError> {
    let mut registration = Registration {
        conn: conn.clone(),
        ids: Vec::new(),
        close_callback: false,
    };
    // SAFETY: (all transmutes below) libvirt calls each callback with the
    // signature that belongs to its event ID; registering through the
    // generic type and casting is the documented VIR_DOMAIN_EVENT_CALLBACK
    // idiom of the C API.
    let callbacks: [(sys::virDomainEventID, GenericCallback); 5] = unsafe {
        [
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                std::mem::transmute::<DeviceCallback, GenericCallback>(device_added),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                std::mem::transmute::<DeviceCallback, GenericCallback>(device_removed),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                std::mem::transmute::<DeviceCallback, GenericCallback>(device_removal_failed),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                std::mem::transmute::<LifecycleCallback, GenericCallback>(lifecycle),
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
                std::mem::transmute::<AgentLifecycleCallback, GenericCallback>(agent_lifecycle),
            ),
        ]
    };
    for (event_id, callback) in callbacks {
        let opaque = Box::into_raw(Box::new(tx.clone())).cast::<c_void>();
        // SAFETY: the connection is valid; `opaque` is a leaked Box<Sender>
        // that libvirt hands back to the callback and finally to
        // `free_sender`, which reclaims it exactly once.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                event_id as c_int,
                Some(callback),
                opaque,
                Some(free_sender),
            )
        };
        if id < 0 {
            // SAFETY: registration failed, so libvirt did not take `opaque`.
            drop(unsafe { Box::from_raw(opaque.cast::<Sender>()) });
            return Err(HypervisorError::Libvirt {
                op: "register domain events",
                message: virt::error::Error::last_error().to_string(),
            });
        }
        registration.ids.push(id);
    }
    let opaque = Box::into_raw(Box::new(tx.clone())).cast::<c_void>();
    // SAFETY: as for the event callbacks above: `opaque` is reclaimed by
    // `free_sender` once libvirt is done with it.
    let rc = unsafe {
        sys::virConnectRegisterCloseCallback(
            conn.as_ptr(),
            Some(connection_closed),
            opaque,
            Some(free_sender),
        )
    };
    if rc < 0 {
        // SAFETY: registration failed, so libvirt did not take `opaque`.
        drop(unsafe { Box::from_raw(opaque.cast::<Sender>()) });
        return Err(HypervisorError::Libvirt {
            op: "register the connection close callback",
            message: virt::error::Error::last_error().to_string(),
        });
    }
    registration.close_callback = true;
    Ok(registration)
}

unsafe extern "C" fn connection_closed(_: sys::virConnectPtr, _reason: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` is the Sender given at registration, alive until
    // `free_sender` runs after the last callback.
    let tx = unsafe { &*opaque.cast::<Sender>() };
    tx.generation.fetch_add(1, Ordering::SeqCst);
    let _ = tx.tx.send(DomainEvent::ConnectionClosed);
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: `opaque` is the Box<Sender> leaked in `register`; libvirt calls
    // the free callback once, after the last event callback.
    drop(unsafe { Box::from_raw(opaque.cast::<Sender>()) });
}

/// Sends an event built from the domain's name; never panics into C.
///
/// # Safety
/// `dom` must be a valid domain pointer and `opaque` the Sender of `register`.
unsafe fn send(
    dom: sys::virDomainPtr,
    opaque: *mut c_void,
    make: impl FnOnce(String) -> DomainEvent,
) {
    // SAFETY: per this function's contract.
    let (name, tx) = unsafe { (sys::virDomainGetName(dom), &*opaque.cast::<Sender>()) };
    if name.is_null() {
        return;
    }
    // SAFETY: libvirt returns a NUL-terminated name owned by `dom`, valid
    // for the duration of the callback; it is copied at once.
    let domain = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    tx.generation.fetch_add(1, Ordering::SeqCst);
    // No receiver is fine: nobody waits right now.
    let _ = tx.tx.send(make(domain));
}

/// # Safety
/// `alias` must be NULL or a NUL-terminated string valid for the call.
unsafe fn alias_of(alias: *const c_char) -> String {
    if alias.is_null() {
        return String::new();
    }
    // SAFETY: per this function's contract.
    unsafe { CStr::from_ptr(alias) }
        .to_string_lossy()
        .into_owned()
}

/// A DEVICE_* callback forwarding the event as `DomainEvent::$variant`.
macro_rules! device_callback {
    ($name:ident, $variant:ident) => {
        unsafe extern "C" fn $name(
            _: sys::virConnectPtr,
            dom: sys::virDomainPtr,
            alias: *const c_char,
            opaque: *mut c_void,
        ) {
            // SAFETY: libvirt passes a valid domain, alias and our opaque.
            unsafe {
                let alias = alias_of(alias);
                send(dom, opaque, |domain| DomainEvent::$variant {
                    domain,
                    alias,
                });
            }
        }
    };
}

device_callback!(device_added, DeviceAdded);
device_callback!(device_removed, DeviceRemoved);
device_callback!(device_removal_failed, DeviceRemovalFailed);

unsafe extern "C" fn lifecycle(
    _: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes a valid domain and our opaque.
    unsafe { send(dom, opaque, |domain| DomainEvent::Lifecycle { domain }) };
    0
}

unsafe extern "C" fn agent_lifecycle(
    _: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    state: c_int,
    _reason: c_int,
    opaque: *mut c_void,
) {
    let connected = state == sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED as c_int;
    // SAFETY: libvirt passes a valid domain and our opaque.
    unsafe {
        send(dom, opaque, |domain| DomainEvent::AgentLifecycle {
            domain,
            connected,
        })
    };
}
