//! Persistent tap creation through `/dev/net/tun`.
//!
//! Taps cannot be created over rtnetlink (the kernel answers EOPNOTSUPP), so
//! nicplug does what `ip tuntap add` does:
//!
//! 1. open `/dev/net/tun`; the tun file's socket belongs to the network
//!    namespace of the *opening thread*, and so will the tap; `TUNGETFEATURES`
//!    says whether the driver supports every flag of step 2;
//! 2. `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus
//!    `IFF_MULTI_QUEUE` only for multiqueue taps: the flags must match the way
//!    QEMU/libvirt open the tap later, or the attach fails with EINVAL;
//! 3. `TUNSETOWNER` and `TUNSETGROUP`, which take the id **by value**
//!    (the `tun-rs` crate passes a pointer and so sets a garbage owner);
//! 4. `TUNSETPERSIST 1`, last: if any earlier step fails, closing the fd
//!    destroys the half-made tap, so no wrong tap is ever left behind;
//! 5. close the fd.
//!
//! [`NetnsHandle`] makes step 1 safe on a multi-threaded runtime: the tap is
//! created on the calling thread when that thread already is in the target
//! namespace (always so when the whole process lives in the pod netns, and
//! then no `CAP_SYS_ADMIN` is needed), otherwise on a short-lived helper
//! thread that `setns`es into it first. A tokio worker thread is never moved.

use std::ffi::c_int;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::{Mode, fstat};

use super::{NetnsError, TapSpec};

// TUNSETIFF is declared `_IOW('T', 202, int)` but takes a `struct ifreq *`
// that the kernel writes back (the name it chose): read-write.
nix::ioctl_readwrite_bad!(tunsetiff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_read_bad!(tungetfeatures, libc::TUNGETFEATURES, libc::c_uint);

/// An ioctl that takes its argument by value (TUNSETOWNER, TUNSETGROUP,
/// TUNSETPERSIST: the kernel reads the id from the argument itself).
fn set_by_value(fd: c_int, request: libc::Ioctl, value: libc::c_ulong) -> nix::Result<()> {
    // SAFETY: the request passes no memory, only `value`; `fd` is a valid
    // descriptor for the duration of the call (the caller owns it).
    let rc = unsafe { libc::ioctl(fd, request, value) };
    nix::errno::Errno::result(rc).map(drop)
}

/// The TUNSETIFF flags for a tap of this spec.
pub fn tap_flags(multi_queue: bool) -> c_int {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    flags
}

/// Creates persistent tap `spec.name` in the network namespace of the
/// calling thread, owned by `spec.owner`. Fails with EBUSY (from TUNSETIFF)
/// if a tap of that name exists and is attached, and with EINVAL if it exists
/// with other queue flags. MTU, master and up are set over rtnetlink later.
pub fn create_persistent_tap(spec: &TapSpec) -> Result<(), NetnsError> {
    let err = |op: &'static str| {
        let tap = spec.name.clone();
        move |source| NetnsError::Tap { tap, op, source }
    };
    let fd = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("open /dev/net/tun"))?;
    let raw = fd.as_raw_fd();
    let flags = tap_flags(spec.multi_queue);
    let mut features: libc::c_uint = 0;
    // SAFETY: `raw` is an open /dev/net/tun fd owned by `fd` for this whole
    // function; TUNGETFEATURES writes one unsigned int into `features`.
    unsafe { tungetfeatures(raw, &mut features) }.map_err(err("TUNGETFEATURES"))?;
    let missing = flags as libc::c_uint & !(features | libc::IFF_TAP as libc::c_uint);
    if missing != 0 {
        return Err(NetnsError::Tap {
            tap: spec.name.clone(),
            op: "TUNGETFEATURES (the tun driver lacks a flag the tap needs)",
            source: nix::Error::EOPNOTSUPP,
        });
    }

    // SAFETY: `ifreq` is a plain C struct (name array + union of integers and
    // pointers); all-zeroes is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // IfName guarantees 1..=15 bytes without NUL, so the name plus its
    // terminating NUL (already zeroed) fits into IFNAMSIZ.
    for (dst, src) in ifr.ifr_name.iter_mut().zip(spec.name.as_str().bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;

    // SAFETY: `raw` is an open /dev/net/tun fd (see above); TUNSETIFF reads
    // and writes back one `struct ifreq`, and `ifr` is a valid, initialised
    // one, borrowed mutably for the call.
    unsafe { tunsetiff(raw, &mut ifr) }.map_err(err("TUNSETIFF"))?;
    set_by_value(raw, libc::TUNSETOWNER, spec.owner.uid.into()).map_err(err("TUNSETOWNER"))?;
    set_by_value(raw, libc::TUNSETGROUP, spec.owner.gid.into()).map_err(err("TUNSETGROUP"))?;
    set_by_value(raw, libc::TUNSETPERSIST, 1).map_err(err("TUNSETPERSIST"))?;
    drop(fd);
    Ok(())
}

/// A network namespace, held open by fd, with its identity (device and inode
/// of the nsfs file) for cheap "is this thread already there" checks.
#[derive(Debug)]
pub struct NetnsHandle {
    fd: OwnedFd,
    id: (u64, u64),
}

impl NetnsHandle {
    /// The network namespace of the calling thread (not of the process: a
    /// thread may have `setns`ed away from its siblings).
    pub fn of_current_thread() -> Result<Self, NetnsError> {
        let fd = open(
            "/proc/thread-self/ns/net",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| NetnsError::Namespace {
            op: "open /proc/thread-self/ns/net",
            source,
        })?;
        let id = ns_id(&fd)?;
        Ok(Self { fd, id })
    }

    /// Whether the calling thread is in this namespace.
    pub fn is_current(&self) -> Result<bool, NetnsError> {
        Ok(Self::of_current_thread()?.id == self.id)
    }

    /// Runs `f` on a thread that is in this namespace: the calling thread if
    /// it already is, else a fresh helper thread that `setns`es first (and
    /// dies afterwards, so no pooled thread is ever left in a foreign netns).
    pub fn run<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, NetnsError> + Send,
    ) -> Result<T, NetnsError> {
        if self.is_current()? {
            return f();
        }
        let fd = self.fd.as_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|source| {
                        NetnsError::Namespace {
                            op: "setns into the pod network namespace",
                            source,
                        }
                    })?;
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

fn ns_id(fd: &OwnedFd) -> Result<(u64, u64), NetnsError> {
    let st = fstat(fd).map_err(|source| NetnsError::Namespace {
        op: "fstat the namespace file",
        source,
    })?;
    #[allow(clippy::unnecessary_cast)] // st_dev/st_ino widths differ by target
    Ok((st.st_dev as u64, st.st_ino as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_carry_multi_queue_only_when_asked() {
        let single = tap_flags(false);
        assert_eq!(single & libc::IFF_MULTI_QUEUE, 0);
        assert_ne!(single & libc::IFF_TAP, 0);
        assert_ne!(single & libc::IFF_NO_PI, 0);
        assert_ne!(single & libc::IFF_VNET_HDR, 0);
        assert_eq!(single & libc::IFF_TUN, 0);
        assert_ne!(tap_flags(true) & libc::IFF_MULTI_QUEUE, 0);
    }

    #[test]
    fn ioctl_numbers_match_linux_if_tun_h() {
        // Values from <linux/if_tun.h> on x86_64/aarch64 (_IOW/_IOR('T', n, int)).
        assert_eq!(libc::TUNSETIFF, 0x400454ca);
        assert_eq!(libc::TUNSETOWNER, 0x400454cc);
        assert_eq!(libc::TUNGETFEATURES, 0x800454cf);
    }

    #[test]
    fn current_thread_is_in_its_own_netns() {
        let ns = NetnsHandle::of_current_thread().unwrap();
        assert!(ns.is_current().unwrap());
        assert_eq!(ns.run(|| Ok(7)).unwrap(), 7);
    }
}
