//! SELinux labels of taps, as KubeVirt does it.
//!
//! The kernel labels a tun/tap device with the SELinux context of the task
//! that *creates* it (`selinux_tun_dev_alloc_security`: the creator's SID;
//! the `sockcreate` context is deliberately ignored for tun sockets). When
//! QEMU later opens the tap (TUNSETIFF on the existing device), a different
//! context needs `tun_socket { relabelfrom relabelto }` between the two,
//! which container policies deny. So the tap must be created *in QEMU's
//! context*. KubeVirt's virt-handler (kubevirt/kubevirt,
//! `pkg/network/driver/virtchroot`, `AddTapDeviceWithSELinuxLabel`, and
//! `pkg/virt-handler/selinux` `ContextExecutor`) does that by reading the
//! launcher process' context from `/proc/<pid>/attr/current`, writing it to
//! `/proc/thread-self/attr/exec` (setexeccon) on a locked OS thread, and
//! exec'ing `virt-chroot create-tap` in it; with SELinux disabled it simply
//! runs the command.
//!
//! nicplug runs inside the launcher pod, so it already is where KubeVirt
//! has to get to: Kubernetes gives every container of a pod the pod's
//! SELinux options (type and MCS level), nicplug's container included, and
//! its taps get QEMU's context by construction. What this module decides is
//! whether that holds: [`check`] compares nicplug's own context with QEMU's
//! (a pure function, unit-tested), [`TapLabel::observe`] reads both from
//! `/proc` when SELinux is enabled, and is a no-op otherwise.
//!
//! Wired at tap creation (`Netlink::create_tap`): [`TapLabel::for_owner`]
//! finds the QEMU process of the tap's owner uid and observes both contexts
//! (nothing is read when SELinux is disabled), then [`admit_tap`] decides:
//! disabled, matching or unknown (QEMU not visible) create the tap; a
//! differing context refuses before anything is created, with both contexts
//! in the error, instead of QEMU failing later with a bare "Permission
//! denied" on the attach. nicplug does not switch its own context
//! (KubeVirt's `setexeccon` + exec needs the `transition` permission that
//! virt-handler's policy has and a container's has not).

use std::path::Path;

use super::NetnsError;

/// What nicplug knows about the label its taps will get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapLabel {
    /// SELinux is not enabled: no labels, nothing to do.
    Disabled,
    /// nicplug runs in QEMU's context: its taps carry that label.
    Matches(String),
    /// QEMU runs in another context: a tap nicplug creates would be denied
    /// to QEMU unless the policy allows relabelling between the two.
    Differs { own: String, qemu: String },
    /// QEMU's context cannot be read (its process is not visible: no shared
    /// process namespace), so the match cannot be checked.
    Unknown { own: String },
}

impl TapLabel {
    /// Reads the contexts from `/proc` (`qemu_pid` when the QEMU process is
    /// visible) if SELinux is enabled.
    pub fn observe(qemu_pid: Option<i32>) -> Self {
        let own = read_context(Path::new("/proc/thread-self/attr/current"));
        let qemu = qemu_pid.and_then(|p| {
            read_context(&Path::new("/proc").join(p.to_string()).join("attr/current"))
        });
        check(enabled(), own, qemu)
    }

    /// [`TapLabel::observe`] for the QEMU process run by `uid` (the tap's
    /// owner); `Disabled` without reading `/proc` when SELinux is off.
    pub fn for_owner(uid: u32) -> Self {
        if !enabled() {
            return TapLabel::Disabled;
        }
        Self::observe(qemu_pid_of(uid))
    }
}

/// Whether a tap may be created given its label decision: everything but a
/// known mismatch with QEMU's context.
pub fn admit_tap(tap: &crate::model::IfName, label: &TapLabel) -> Result<(), NetnsError> {
    match label {
        TapLabel::Disabled | TapLabel::Matches(_) => Ok(()),
        TapLabel::Unknown { own } => {
            tracing::debug!(%tap, context = %own, "QEMU's SELinux context not visible; the tap gets nicplug's");
            Ok(())
        }
        TapLabel::Differs { own, qemu } => Err(NetnsError::SelinuxContext {
            tap: tap.clone(),
            own: own.clone(),
            qemu: qemu.clone(),
        }),
    }
}

/// The first `qemu-system*` process owned by `uid` in this network namespace.
fn qemu_pid_of(uid: u32) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path();
            if std::fs::metadata(&path).ok()?.uid() != uid || !super::in_our_netns(&path) {
                return None;
            }
            let cmdline = std::fs::read(path.join("cmdline")).ok()?;
            let argv0 = cmdline.split(|b| *b == 0).next()?;
            String::from_utf8_lossy(argv0)
                .contains("qemu-system")
                .then_some(pid)
        })
}

/// The decision, from whether SELinux is enabled and the two contexts.
pub fn check(enabled: bool, own: Option<String>, qemu: Option<String>) -> TapLabel {
    let own = match (enabled, own) {
        (true, Some(own)) => own,
        // Enabled but our own context unreadable: as libselinux does
        // (is_selinux_enabled needs a readable context), treat as disabled.
        _ => return TapLabel::Disabled,
    };
    match qemu {
        Some(qemu) if qemu == own => TapLabel::Matches(own),
        Some(qemu) => TapLabel::Differs { own, qemu },
        None => TapLabel::Unknown { own },
    }
}

/// A context as `/proc/<pid>/attr/current` holds it: trailing NUL and
/// newline trimmed; empty, "kernel" (no policy loaded) and unreadable are none.
pub fn parse_context(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let text = text.trim_end_matches(['\0', '\n']).trim();
    (!text.is_empty() && text != "kernel" && text.split(':').count() >= 3).then(|| text.to_string())
}

fn read_context(path: &Path) -> Option<String> {
    parse_context(&std::fs::read(path).ok()?)
}

/// Whether SELinux is enabled, as libselinux decides it: selinuxfs is
/// mounted (at its standard place; containers get it read-only).
fn enabled() -> bool {
    Path::new("/sys/fs/selinux/enforce").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAUNCHER: &str = "system_u:system_r:container_t:s0:c101,c202";

    #[test]
    fn disabled_is_a_no_op_whatever_the_contexts() {
        assert_eq!(
            check(false, Some(LAUNCHER.into()), Some(LAUNCHER.into())),
            TapLabel::Disabled
        );
        assert_eq!(check(false, None, None), TapLabel::Disabled);
        assert_eq!(check(true, None, Some(LAUNCHER.into())), TapLabel::Disabled);
    }

    #[test]
    fn the_same_context_as_qemu_matches() {
        assert_eq!(
            check(true, Some(LAUNCHER.into()), Some(LAUNCHER.into())),
            TapLabel::Matches(LAUNCHER.into())
        );
    }

    #[test]
    fn another_level_or_type_differs() {
        // Another pod's MCS level: QEMU could not open the tap.
        let other = "system_u:system_r:container_t:s0:c7,c8";
        assert_eq!(
            check(true, Some(LAUNCHER.into()), Some(other.into())),
            TapLabel::Differs {
                own: LAUNCHER.into(),
                qemu: other.into()
            }
        );
        // KubeVirt's optional launcher type (selinuxLauncherType).
        let typed = "system_u:system_r:virt_launcher.process:s0:c101,c202";
        assert!(matches!(
            check(true, Some(LAUNCHER.into()), Some(typed.into())),
            TapLabel::Differs { .. }
        ));
    }

    #[test]
    fn an_invisible_qemu_is_unknown() {
        assert_eq!(
            check(true, Some(LAUNCHER.into()), None),
            TapLabel::Unknown {
                own: LAUNCHER.into()
            }
        );
    }

    #[test]
    fn proc_attr_current_is_parsed_like_libselinux() {
        assert_eq!(
            parse_context(format!("{LAUNCHER}\0").as_bytes()).as_deref(),
            Some(LAUNCHER)
        );
        assert_eq!(
            parse_context(format!("{LAUNCHER}\n").as_bytes()).as_deref(),
            Some(LAUNCHER)
        );
        assert_eq!(parse_context(b"kernel\0"), None);
        assert_eq!(parse_context(b""), None);
        assert_eq!(parse_context(b"unconfined"), None);
        assert_eq!(parse_context(&[0xff, 0xfe]), None);
    }

    #[test]
    fn only_a_known_mismatch_refuses_the_tap() {
        let tap = crate::model::IfName::new("tap0").unwrap();
        assert!(admit_tap(&tap, &TapLabel::Disabled).is_ok());
        assert!(admit_tap(&tap, &TapLabel::Matches(LAUNCHER.into())).is_ok());
        assert!(
            admit_tap(
                &tap,
                &TapLabel::Unknown {
                    own: LAUNCHER.into()
                }
            )
            .is_ok()
        );
        let other = "system_u:system_r:container_t:s0:c7,c8";
        let err = admit_tap(
            &tap,
            &check(true, Some(LAUNCHER.into()), Some(other.into())),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(LAUNCHER) && text.contains(other) && text.contains("tap0"),
            "{text}"
        );
    }

    #[test]
    fn for_owner_is_a_no_op_without_selinux() {
        if !Path::new("/sys/fs/selinux/enforce").exists() {
            assert_eq!(TapLabel::for_owner(0), TapLabel::Disabled);
        }
    }

    #[test]
    fn observing_here_is_a_no_op_without_selinux() {
        // This machine has no SELinux: whatever the pid, nothing to do.
        if !Path::new("/sys/fs/selinux/enforce").exists() {
            assert_eq!(
                TapLabel::observe(Some(std::process::id() as i32)),
                TapLabel::Disabled
            );
        }
    }
}
