//! One nicplug per pod network namespace.
//!
//! Two agents in one pod race each other's attaches and tear down each
//! other's plumbing, so a second one must refuse to start. The lock is an
//! abstract unix socket: its name lives in the network namespace (exactly
//! the scope nicplug manages), the kernel releases it when the process dies
//! however it dies (no stale lock file), and it needs no writable file
//! system (the sidecar's root is read-only). A second instance learns the
//! holder's pid from the socket's peer credentials, for its error message.

use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

/// The lock's name in the abstract namespace.
const NAME: &[u8] = b"nicplug/agent";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("another nicplug is already running in this network namespace{}", holder(.pid))]
    Running { pid: Option<i32> },
    #[error("cannot take the instance lock (abstract unix socket @nicplug/agent)")]
    Lock(#[source] std::io::Error),
}

fn holder(pid: &Option<i32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// Held for the life of the agent; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _listener: UnixListener,
}

impl InstanceLock {
    /// Takes the lock of the current network namespace, or says who has it.
    pub fn acquire() -> Result<Self, InstanceError> {
        let addr = SocketAddr::from_abstract_name(NAME).map_err(InstanceError::Lock)?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => Ok(Self {
                _listener: listener,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(InstanceError::Running {
                pid: UnixStream::connect_addr(&addr)
                    .ok()
                    .and_then(|s| peer_pid(&s)),
            }),
            Err(e) => Err(InstanceError::Lock(e)),
        }
    }
}

/// The pid of the process that listens on the other end (SO_PEERCRED).
fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by `stream`; `cred` and `len`
    // are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_in_the_same_namespace_is_refused_with_the_holder() {
        // The test process's own namespace: the name is unique to nicplug,
        // and a running agent there would rightly make this fail.
        let first = InstanceLock::acquire().expect("the first lock");
        match InstanceLock::acquire() {
            Err(InstanceError::Running { pid }) => {
                assert_eq!(pid, Some(std::process::id() as i32));
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        InstanceLock::acquire().expect("free again once released");
    }
}
