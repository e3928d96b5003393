//! nicplug's end-to-end rig: a "launcher pod" network namespace with its own libvirt
//! daemon (in a private mount namespace) running a tiny TCG guest, and a "node" network
//! namespace that runs the real CNI bridge plugin to put `pod<hash>` interfaces into the
//! pod namespace, as Multus does. See docs/testing.md.
//!
//! Used by every end-to-end test (`mod support;`) and by examples
//! (`#[path = "../tests/support/mod.rs"] mod support;`).
#![allow(dead_code)]

mod cni;
mod guest;
pub mod util;

pub use cni::{CNI_PATH, CniNet, CniResult, MacvtapLan};
pub use guest::{GuestExec, GuestIface};
pub use util::{Clock, poll};

use serde_json::{Value, json};
use std::cell::{Cell, RefCell};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Prefix of every rig's namespaces and directories.
const PREFIX: &str = "nicplug";
/// Where rig directories go (override with `NICPLUG_RIG_TMP`).
const DEFAULT_TMP: &str = "/tmp";
/// Debian's busybox-static, used for `ping` in the node netns.
const BUSYBOX: &str = "/bin/busybox";

/// Runs its argv (libvirtd) as a child and reaps every orphan reparented to it: QEMU
/// daemonizes, so its parent is the nearest child subreaper, else PID 1, and this machine's
/// PID 1 reaps lazily; libvirt's destroy waits (kill(pid, 0)) until the zombie is gone,
/// which made every teardown ~1.2 s slower. perl is in perl-base (Essential).
/// SIGTERM/SIGINT are forwarded; exits with the child's status. 157 = SYS_prctl,
/// 36 = PR_SET_CHILD_SUBREAPER (x86_64).
const REAPER: &str = "syscall(157, 36, 1, 0, 0, 0) == 0 or die qq(prctl: $!); \
    my $c = fork() // die qq(fork: $!); if ($c == 0) { exec(@ARGV) or die qq(exec: $!) } \
    $SIG{TERM} = $SIG{INT} = sub { kill(q(TERM), $c) }; \
    while (1) { my $w = waitpid(-1, 0); if ($w == $c) { exit($? & 127 ? 1 : $? >> 8) } \
    exit(0) if $w == -1 }";

/// Serializes rigs within one process (2 cores, TCG guests).
static RIG_LOCK: Mutex<()> = Mutex::new(());
static RIG_SEQ: AtomicU32 = AtomicU32::new(0);

/// Sends `sig` to exactly this pid (a process the test started).
pub fn kill_pid(pid: i32, sig: i32) {
    util::kill(pid, sig);
}

/// Returns false (after a loud SKIP line) when not root. Under `CI=true` it panics
/// instead, since CI runs as root and a skipped end-to-end test would hide a failure.
pub fn require_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let test = current_test();
    let msg = format!("SKIP {test}: needs root (creates network namespaces and a libvirt daemon)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}; CI=true, so not skipping");
    }
    eprintln!("\n*** {msg} ***\n");
    false
}

/// The running test's name: libtest names each test's thread after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string()
}

/// How to build a rig.
#[derive(Clone, Debug)]
pub struct RigOptions {
    /// Spare (empty) `pcie-root-port` controllers the guest can hot-plug into.
    pub root_ports: u32,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the guest kernel command line (e.g. `pcie_ports=compat`).
    pub kernel_cmdline_extra: String,
    /// `virsh define` + `start` (like KubeVirt) when true, else `virsh create` (transient).
    pub persistent: bool,
    /// KubeVirt's non-root launcher: libvirtd runs as uid/gid 107 in session mode
    /// (`XDG_RUNTIME_DIR=/var/run`, socket `/var/run/libvirt/libvirt-sock`, also reachable
    /// as `virtqemud-sock`), so QEMU runs as 107 too, and [`Rig::sidecar_cmd`] runs
    /// programs the way the injected sidecar runs: uid/gid 107 with only `CAP_NET_ADMIN`,
    /// the socket directory mounted read-only, `/dev/net/tun` usable (mode 0666, as on a
    /// node). Default: the environment variable `NICPLUG_RIG_NONROOT=1`, else false (a
    /// root system daemon, QEMU as Debian's `libvirt-qemu`).
    pub non_root: bool,
    /// Which guest boots: the busybox initramfs (default) or the Debian disk image.
    pub guest: Guest,
}

/// The rig's guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Guest {
    /// `scripts/build-guest`: Debian's kernel + a busybox/qemu-ga initramfs, no
    /// disk, boots in ~4 s under TCG. Kernel names NICs (eth0, eth1, ...).
    #[default]
    Busybox,
    /// `scripts/build-guest-debian`: a debootstrapped Debian with systemd, udev
    /// (predictable NIC names), systemd-networkd (DHCP on every en* NIC) and
    /// qemu-guest-agent, booted from a raw ext4 disk on `pcie-root` (bus 0, so
    /// every root port stays free for hot-plug), 1 GiB of memory.
    Debian,
}

/// Memory the Debian guest gets at least (systemd, udev, networkd).
pub const DEBIAN_MEMORY_MIB: u32 = 1024;

/// The uid and gid of KubeVirt's non-root launcher (its `qemu` user), which the
/// non-root rig runs libvirtd, QEMU and the sidecar as.
pub const NONROOT_ID: u32 = 107;

/// The libvirt URI the sidecar uses in the non-root rig: the one `deploy/cluster/policy.yaml`
/// passes, resolved inside the sidecar's mount namespace.
pub const NONROOT_SIDECAR_URI: &str = "qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock";

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            root_ports: 4,
            vcpus: 2,
            memory_mib: 256,
            kernel_cmdline_extra: String::new(),
            persistent: true,
            non_root: std::env::var("NICPLUG_RIG_NONROOT").is_ok_and(|v| v == "1"),
            guest: Guest::Busybox,
        }
    }
}

impl RigOptions {
    /// The default with root system daemons whatever `NICPLUG_RIG_NONROOT`
    /// says: what a migration source needs (`Rig::start_target` has no
    /// non-root shape yet).
    pub fn root_launcher() -> Self {
        RigOptions {
            non_root: false,
            ..RigOptions::default()
        }
    }
}

/// One launcher pod + node + running guest. Everything is torn down on drop.
pub struct Rig {
    /// Network namespace of the launcher pod (libvirtd and QEMU run here).
    pub pod_ns: String,
    /// Network namespace of the node (CNI bridge plugin, traffic peer).
    pub node_ns: String,
    /// `qemu+unix:///system?socket=<dir>/run/libvirt-sock`.
    pub libvirt_uri: String,
    /// `default_vmi-<n>`.
    pub domain: String,
    /// The rig's private directory (libvirt state, logs, IPAM, console log).
    pub dir: PathBuf,
    /// Unique id `<pid>-<n>`.
    pub id: String,
    /// The guest's serial console log.
    pub console_log: PathBuf,
    /// Whether the domain is persistent (defined) or transient.
    pub persistent: bool,
    /// KubeVirt's non-root launcher shape (see [`RigOptions::non_root`]).
    pub non_root: bool,
    /// The guest that boots.
    pub guest: Guest,
    /// From the domain's start to the first answer of its guest agent (the
    /// last start, see [`Rig::start_domain`]).
    pub boot_to_agent: Cell<Duration>,
    clock: Clock,
    /// The reaper running libvirtd. Interior mutability: tests hold `&Rig` (through
    /// `Nicplug`) while they kill and restart the daemon or the domain.
    daemon: RefCell<Option<Child>>,
    /// libvirtd is stopped by SIGSTOP (`freeze_daemon`); Drop continues it first.
    daemon_frozen: Cell<bool>,
    qemu_pid: Cell<i32>,
    qemu_uid: Cell<u32>,
    qemu_gid: Cell<u32>,
    netns_made: Vec<String>,
    domain_started: Cell<bool>,
    keep: bool,
    /// host-local IPAM state: the node's, shared by every pod on it.
    ipam_dir: PathBuf,
    /// A second pod of the same node ([`Rig::start_target`]) runs under the first
    /// one's lock.
    _guard: Option<MutexGuard<'static, ()>>,
}

/// The veth between a rig's pod and its migration target pod carries the
/// migration stream: `169.254.88.1` (source) and `.2` (target), link-local.
pub const MIGRATION_LINK: &str = "mig0";
const MIGRATION_SOURCE_ADDR: &str = "169.254.88.1";
pub const MIGRATION_TARGET_ADDR: &str = "169.254.88.2";

/// A distinct libvirt `host_uuid` per rig (libvirt refuses to migrate to "the same host").
fn host_uuid(id: &str) -> String {
    let n = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("6e696370-6c75-4467-a000-{:012x}", n & 0xffff_ffff_ffff)
}

fn guest_dir() -> PathBuf {
    std::env::var_os("NICPLUG_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nicplug/guest"))
}

fn debian_guest_dir() -> PathBuf {
    std::env::var_os("NICPLUG_GUEST_DEBIAN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nicplug/guest-debian"))
}

/// Runs a guest build script of `scripts/` (cached and idempotent) with its
/// output directory in `dir_var`, and returns the kernel it left there: the
/// decompressed ELF one when there is one (it boots ~3.5 s faster under TCG:
/// PVH entry, no XZ).
fn build_guest(script: &str, dir_var: &str, dir: &Path) -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(script);
    let t0 = Instant::now();
    let out = Command::new(&script)
        .env(dir_var, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    eprintln!("{}: {} ms", script.display(), t0.elapsed().as_millis());
    if !out.status.success() {
        return Err(format!("{} failed: {err}", script.display()));
    }
    ["vmlinux", "vmlinuz"]
        .iter()
        .map(|k| dir.join(k))
        .find(|k| k.exists())
        .ok_or_else(|| format!("no kernel in {}", dir.display()))
}

/// Runs `scripts/build-guest` once per process: the busybox guest's kernel
/// and initramfs.
fn ensure_guest() -> Result<(PathBuf, PathBuf), String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let kernel = BUILT
        .get_or_init(|| build_guest("build-guest", "NICPLUG_GUEST_DIR", &guest_dir()))
        .clone()?;
    Ok((kernel, guest_dir().join("initramfs.img")))
}

/// The Debian guest's files (kernel, initramfs, disk image)
/// ([`Guest::Debian`]).
struct DebianGuest {
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
}

/// Runs `scripts/build-guest-debian` once per process (a build from nothing
/// takes a few minutes: debootstrap downloads ~300 packages from the host's
/// Debian mirror).
fn ensure_debian_guest() -> Result<DebianGuest, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = debian_guest_dir();
    let kernel = BUILT
        .get_or_init(|| build_guest("build-guest-debian", "NICPLUG_GUEST_DEBIAN_DIR", &dir))
        .clone()?;
    Ok(DebianGuest {
        kernel,
        initrd: dir.join("initrd.img"),
        disk: dir.join("disk.img"),
    })
}

fn tmp_base() -> PathBuf {
    std::env::var_os("NICPLUG_RIG_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TMP))
}

/// Shared cache of libvirt's QEMU capabilities: probing takes ~2 s per fresh daemon.
/// The session daemon of the non-root rig keeps its own (probed as another user).
fn caps_cache(non_root: bool) -> PathBuf {
    let name = if non_root {
        "libvirt-qemu-caps-session"
    } else {
        "libvirt-qemu-caps"
    };
    guest_dir()
        .parent()
        .map(|p| p.join(name))
        .unwrap_or_else(|| PathBuf::from("/var/cache/nicplug").join(name))
}

/// `chown -R uid:gid path` (symlinks themselves, not their targets).
fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))?;
    if fs::symlink_metadata(path)
        .map_err(|e| e.to_string())?
        .is_dir()
    {
        for e in fs::read_dir(path).map_err(|e| e.to_string())?.flatten() {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn copy_dir_files(from: &Path, to: &Path) {
    let Ok(entries) = fs::read_dir(from) else {
        return;
    };
    let _ = fs::create_dir_all(to);
    for e in entries.flatten() {
        let dst = to.join(e.file_name());
        if e.path().is_file() && !dst.exists() {
            // Write then rename, so a concurrent reader never sees half a file.
            let tmp = to.join(format!(
                ".{}.{}",
                e.file_name().to_string_lossy(),
                std::process::id()
            ));
            if fs::copy(e.path(), &tmp).is_ok() {
                let _ = fs::rename(&tmp, &dst);
            }
            let _ = fs::remove_file(&tmp);
        }
    }
}

impl Rig {
    /// Starts a rig: namespaces, libvirt daemon, guest; returns once the guest agent answers.
    /// Panics with a clear message (console log tail included) after cleaning up.
    pub fn start(opts: RigOptions) -> Rig {
        let guard = RIG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let n = RIG_SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let dir = tmp_base().join(format!("{PREFIX}-rig-{id}"));
        // The session daemon also serves root (DAC lets root connect to its socket).
        let libvirt_uri = format!(
            "qemu+unix:///{}?socket={}",
            if opts.non_root { "session" } else { "system" },
            dir.join("run/libvirt-sock").display()
        );
        let mut rig = Rig {
            pod_ns: format!("{PREFIX}-pod-{id}"),
            node_ns: format!("{PREFIX}-node-{id}"),
            libvirt_uri,
            domain: format!("default_vmi-{n}"),
            console_log: dir.join("console.log"),
            dir,
            clock: Clock::new(&id),
            id,
            persistent: opts.persistent,
            non_root: opts.non_root,
            guest: opts.guest,
            boot_to_agent: Cell::new(Duration::ZERO),
            daemon: RefCell::new(None),
            daemon_frozen: Cell::new(false),
            qemu_pid: Cell::new(0),
            qemu_uid: Cell::new(0),
            qemu_gid: Cell::new(0),
            netns_made: Vec::new(),
            domain_started: Cell::new(false),
            keep: std::env::var("NICPLUG_KEEP_RIG").is_ok_and(|v| v == "1"),
            ipam_dir: PathBuf::new(),
            _guard: Some(guard),
        };
        rig.ipam_dir = rig.dir.join("ipam");
        reap_stale();
        if let Err(e) = rig.setup(&opts) {
            let msg = format!(
                "Rig::start failed: {e}\n--- guest console ({}) ---\n{}\n--- libvirtd log ---\n{}",
                rig.console_log.display(),
                rig.console_tail(40),
                util::tail(&rig.dir.join("libvirtd.log"), 20),
            );
            drop(rig);
            panic!("{msg}");
        }
        rig.log(&format!(
            "ready ({}): pod={} node={} domain={} qemu pid={} uid={} uri={}",
            if rig.non_root {
                "non-root launcher"
            } else {
                "root launcher"
            },
            rig.pod_ns,
            rig.node_ns,
            rig.domain,
            rig.qemu_pid(),
            rig.qemu_uid(),
            rig.libvirt_uri
        ));
        rig
    }

    fn setup(&mut self, opts: &RigOptions) -> Result<(), String> {
        let (kernel, initrd, disk) = match opts.guest {
            Guest::Busybox => {
                let (kernel, initrd) = ensure_guest()?;
                (kernel, initrd, None)
            }
            Guest::Debian => {
                let g = ensure_debian_guest()?;
                (g.kernel, g.initrd, Some(g.disk))
            }
        };
        self.log("guest image ready");
        let (g_kernel, g_initrd, g_disk) =
            self.setup_pod(&kernel, &initrd, disk.as_deref(), true)?;

        // The domain.
        let xml = domain_xml(
            &self.domain,
            opts,
            &g_kernel,
            &g_initrd,
            g_disk.as_deref(),
            &self.console_log,
        );
        let xml_path = self.dir.join("domain.xml");
        fs::write(&xml_path, &xml).map_err(|e| e.to_string())?;
        let xml_arg = xml_path.display().to_string();
        if opts.persistent {
            self.virsh_try(&["define", &xml_arg])?;
            self.log("domain defined");
            self.virsh_try(&["start", &self.domain.clone()])?;
        } else {
            self.virsh_try(&["create", &xml_arg])?;
        }
        self.domain_started.set(true);
        self.log("domain started");
        copy_dir_files(&self.caps_dir(), &caps_cache(self.non_root));

        self.record_qemu()?;
        self.wait_guest_agent(self.boot_timeout())
    }

    /// A second launcher pod on this rig's node, as a migration target: its own pod netns
    /// and libvirt daemon (own mount namespace, directories and `host_uuid`), the same
    /// node netns, CNI networks and IPAM, the domain's name, no domain yet, and a veth
    /// ([`MIGRATION_LINK`]) to this pod for the migration stream. Dropped before this rig
    /// (declare it after). Panics with the daemon's log on failure.
    pub fn start_target(&self) -> Rig {
        assert!(!self.non_root, "start_target: the root rig only");
        let n = RIG_SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let dir = tmp_base().join(format!("{PREFIX}-rig-{id}"));
        let mut rig = Rig {
            pod_ns: format!("{PREFIX}-pod-{id}"),
            node_ns: self.node_ns.clone(),
            libvirt_uri: format!(
                "qemu+unix:///system?socket={}",
                dir.join("run/libvirt-sock").display()
            ),
            domain: self.domain.clone(),
            console_log: dir.join("console.log"),
            dir,
            clock: Clock::new(&id),
            id,
            persistent: true,
            non_root: false,
            daemon: RefCell::new(None),
            daemon_frozen: Cell::new(false),
            qemu_pid: Cell::new(0),
            qemu_uid: Cell::new(0),
            qemu_gid: Cell::new(0),
            netns_made: Vec::new(),
            domain_started: Cell::new(false),
            keep: self.keep,
            ipam_dir: self.ipam_dir.clone(),
            guest: self.guest,
            boot_to_agent: Cell::new(Duration::ZERO),
            _guard: None,
        };
        let setup = ensure_guest()
            .and_then(|(kernel, initrd)| rig.setup_pod(&kernel, &initrd, None, false))
            .and_then(|_| {
                let (src, dst) = (&self.pod_ns, &rig.pod_ns);
                util::try_run(Command::new("ip").args([
                    "-n",
                    src,
                    "link",
                    "add",
                    MIGRATION_LINK,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    MIGRATION_LINK,
                    "netns",
                    dst,
                ]))?;
                for (ns, addr) in [(src, MIGRATION_SOURCE_ADDR), (dst, MIGRATION_TARGET_ADDR)] {
                    let cidr = format!("{addr}/30");
                    util::try_run(Command::new("ip").args([
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &cidr,
                        "dev",
                        MIGRATION_LINK,
                    ]))?;
                    util::try_run(Command::new("ip").args([
                        "-n",
                        ns,
                        "link",
                        "set",
                        MIGRATION_LINK,
                        "up",
                    ]))?;
                }
                Ok(())
            });
        if let Err(e) = setup {
            let msg = format!(
                "start_target failed: {e}\n--- libvirtd log ---\n{}",
                util::tail(&rig.dir.join("libvirtd.log"), 20)
            );
            drop(rig);
            panic!("{msg}");
        }
        rig.log(&format!(
            "migration target ready: pod={} node={} uri={}",
            rig.pod_ns, rig.node_ns, rig.libvirt_uri
        ));
        rig
    }

    /// `virsh migrate` of the domain to `target` (started by [`Rig::start_target`]) the way
    /// KubeVirt migrates (`VIR_MIGRATE_LIVE | PEER2PEER | PERSIST_DEST`), the stream over
    /// [`MIGRATION_LINK`]; `extra` is appended. For a migration the test runs beside
    /// (a child process); [`Rig::migrate_to`] runs it to the end.
    pub fn migrate_command(&self, target: &Rig, extra: &[&str]) -> Command {
        let mut c = Command::new("virsh");
        c.args(["-q", "-c", &self.libvirt_uri])
            .args(["migrate", "--live", "--p2p", "--persistent", &self.domain])
            .arg(&target.libvirt_uri)
            .args([
                "--migrateuri",
                &format!("tcp://{MIGRATION_TARGET_ADDR}:49152"),
            ])
            .args(["--listen-address", MIGRATION_TARGET_ADDR])
            .args(extra);
        c
    }

    /// Runs [`Rig::migrate_command`] to the end; returns how long it took, or virsh's
    /// error. Then [`Rig::adopt_migrated_domain`] on `target`.
    pub fn migrate_to(&self, target: &Rig, extra: &[&str]) -> Result<Duration, String> {
        let t0 = Instant::now();
        let result = util::try_run(&mut self.migrate_command(target, extra));
        let took = t0.elapsed();
        self.log(&format!(
            "migration to {}: {} ({} ms)",
            target.pod_ns,
            match &result {
                Ok(_) => "done".to_string(),
                Err(e) => format!("failed: {}", e.trim()),
            },
            took.as_millis()
        ));
        target.adopt_migrated_domain()?;
        result.map(|_| took)
    }

    /// On a migration target: once the domain runs here, records its QEMU, and from now
    /// on Drop destroys and undefines it. Nothing when it does not run here.
    pub fn adopt_migrated_domain(&self) -> Result<(), String> {
        if let Ok(state) = self.virsh_try(&["domstate", &self.domain])
            && state.trim() == "running"
        {
            self.domain_started.set(true);
            self.record_qemu()?;
        }
        Ok(())
    }

    /// Directories, configuration, network namespaces (the node's too when
    /// `with_node`) and the libvirt daemon of one launcher pod; returns the pod's private
    /// copies of the guest kernel, initramfs and disk.
    fn setup_pod(
        &mut self,
        kernel: &Path,
        initrd: &Path,
        disk: Option<&Path>,
        with_node: bool,
    ) -> Result<(PathBuf, PathBuf, Option<PathBuf>), String> {
        // Per-rig directories that replace libvirt's system paths inside its mount namespace.
        for sub in [
            "run",
            "lib",
            "cache/qemu/capabilities",
            "log",
            "etc/qemu",
            "ipam",
            "cni",
            "guest",
            "nicplug-run",
        ] {
            fs::create_dir_all(self.dir.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        // libvirt's qemu user must traverse to the console log and guest files.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        fs::write(
            self.dir.join("etc/libvirtd.conf"),
            format!("# nicplug rig\nhost_uuid = \"{}\"\n", host_uuid(&self.id)),
        )
        .map_err(|e| e.to_string())?;
        // stdio_handler=file: no virtlogd. namespaces=[]: QEMU sees the real /dev (taps).
        // security_driver=none: no AppArmor (DAC still runs, QEMU stays libvirt-qemu).
        // remember_owner=0: no xattrs left on files when a rig is killed.
        fs::write(
            self.dir.join("etc/qemu.conf"),
            "stdio_handler = \"file\"\nnamespaces = []\nsecurity_driver = \"none\"\nremember_owner = 0\n",
        )
        .map_err(|e| e.to_string())?;
        // libvirt chowns kernel/initrd to the QEMU user: give it private copies.
        let g_kernel = self
            .dir
            .join("guest")
            .join(kernel.file_name().unwrap_or_default());
        let g_initrd = self
            .dir
            .join("guest")
            .join(initrd.file_name().unwrap_or_default());
        fs::copy(kernel, &g_kernel).map_err(|e| format!("copy {}: {e}", kernel.display()))?;
        fs::copy(initrd, &g_initrd).map_err(|e| format!("copy {}: {e}", initrd.display()))?;
        // The guest writes to its disk: each rig boots a private (sparse) copy.
        let g_disk = match disk {
            Some(disk) => {
                let to = self.dir.join("guest/disk.img");
                util::try_run(Command::new("cp").arg("--sparse=always").arg(disk).arg(&to))?;
                self.log("disk image copied");
                Some(to)
            }
            None => None,
        };
        copy_dir_files(&caps_cache(self.non_root), &self.caps_dir());
        // Hides /dev/kvm from the daemon: with a root-only /dev/kvm libvirt's caps cache is
        // invalidated on every start ("KVM was enabled when probing...") = 2 s per probe.
        let nokvm = self.dir.join("nokvm");
        fs::write(&nokvm, "").map_err(|e| e.to_string())?;
        fs::set_permissions(&nokvm, fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;

        if self.non_root {
            self.setup_non_root()?;
        }

        // Network namespaces.
        let mut namespaces = vec![self.pod_ns.clone()];
        if with_node {
            namespaces.push(self.node_ns.clone());
        }
        for ns in namespaces {
            util::try_run(Command::new("ip").args(["netns", "add", &ns]))?;
            self.netns_made.push(ns.clone());
            util::try_run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
        }
        self.log("namespaces created");

        self.spawn_daemon()?;
        Ok((g_kernel, g_initrd, g_disk))
    }

    /// Where the daemon keeps its probed QEMU capabilities (inside the rig directory).
    fn caps_dir(&self) -> PathBuf {
        if self.non_root {
            // $XDG_CACHE_HOME/libvirt/qemu/capabilities, XDG_CACHE_HOME=/var/cache/libvirt
            self.dir.join("cache/libvirt/qemu/capabilities")
        } else {
            self.dir.join("cache/qemu/capabilities")
        }
    }

    /// The non-root launcher's files: the session daemon's configuration (its
    /// `XDG_CONFIG_HOME` is `/var/lib/libvirt`, i.e. `<dir>/lib`), a passwd/group pair
    /// with a `qemu` user 107 (libvirtd refuses clients whose uid has no passwd entry in
    /// its view, and needs one for itself), a 0666 `/dev/net/tun` node (the machine's is
    /// 0600; a node's is 0666), and the whole directory owned by 107, as the pod's
    /// volumes are.
    fn setup_non_root(&self) -> Result<(), String> {
        let conf = self.dir.join("lib/libvirt");
        fs::create_dir_all(&conf).map_err(|e| format!("mkdir {}: {e}", conf.display()))?;
        fs::create_dir_all(self.caps_dir()).map_err(|e| e.to_string())?;
        fs::write(
            conf.join("libvirtd.conf"),
            "# nicplug rig: session defaults\n",
        )
        .map_err(|e| e.to_string())?;
        // Session mode ignores user/group/namespaces; DAC is the kernel's alone.
        fs::write(
            conf.join("qemu.conf"),
            "stdio_handler = \"file\"\nsecurity_driver = \"none\"\nremember_owner = 0\n",
        )
        .map_err(|e| e.to_string())?;
        copy_dir_files(&caps_cache(true), &self.caps_dir());
        let id = NONROOT_ID;
        let passwd = fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
        let mut passwd: String = passwd
            .lines()
            .filter(|l| l.split(':').nth(2) != Some(&id.to_string()) && !l.starts_with("qemu:"))
            .map(|l| format!("{l}\n"))
            .collect();
        passwd.push_str(&format!(
            "qemu:x:{id}:{id}:KubeVirt launcher:/var/lib/libvirt:/usr/sbin/nologin\n"
        ));
        fs::write(self.dir.join("passwd"), passwd).map_err(|e| e.to_string())?;
        let group = fs::read_to_string("/etc/group").map_err(|e| e.to_string())?;
        let mut group: String = group.lines().map(|l| format!("{l}\n")).collect();
        if !group
            .lines()
            .any(|l| l.split(':').nth(2) == Some(&id.to_string()))
        {
            group.push_str(&format!("qemu:x:{id}:\n"));
        }
        fs::write(self.dir.join("group"), group).map_err(|e| e.to_string())?;
        let tun = self.dir.join("tun").display().to_string();
        util::try_run(Command::new("mknod").args(["-m", "0666", &tun, "c", "10", "200"]))?;
        chown_tree(&self.dir, id, id)?;
        // /dev/kvm stays hidden behind a root-only file (see `setup`).
        chown_tree(&self.dir.join("nokvm"), 0, 0)?;
        Ok(())
    }

    /// A command that runs `program` in the pod the way the injected sidecar runs
    /// (`deploy/cluster/policy.yaml`): in the root rig as root in the pod netns; in the non-root
    /// rig also in a private mount namespace with the rig's libvirt socket directory
    /// mounted read-only at `/var/run/libvirt` (the `libvirt-runtime` volume) and a 0666
    /// `/dev/net/tun` (the device plugin's), as uid/gid 107 without supplementary groups,
    /// with no-new-privs and exactly `CAP_NET_ADMIN` and `CAP_NET_RAW` (inheritable,
    /// ambient, bounding),
    /// and `XDG_*` pointing at a writable `<dir>/nicplug-run` (the `nicplug-run`
    /// emptyDir). The caller appends the program's arguments.
    pub fn sidecar_cmd(&self, program: &str) -> Command {
        if !self.non_root {
            return self.pod_cmd(program);
        }
        let d = self.dir.display();
        let id = NONROOT_ID;
        let script = format!(
            "set -e; mount --bind -o ro {d}/run /run/libvirt; mount --bind {d}/tun /dev/net/tun; \
             exec setpriv --reuid={id} --regid={id} --clear-groups --no-new-privs \
             --inh-caps=-all,+net_admin,+net_raw --ambient-caps=-all,+net_admin,+net_raw \
             --bounding-set=-all,+net_admin,+net_raw \"$@\""
        );
        let run = self.dir.join("nicplug-run");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.pod_ns])
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script, "sidecar", program])
            .env("XDG_RUNTIME_DIR", &run)
            .env("XDG_CONFIG_HOME", &run)
            .env("XDG_CACHE_HOME", &run);
        c
    }

    /// The libvirt URI as the sidecar sees it ([`Rig::sidecar_cmd`]): deploy/'s in the
    /// non-root rig, the rig's socket path otherwise.
    pub fn sidecar_libvirt_uri(&self) -> String {
        if self.non_root {
            NONROOT_SIDECAR_URI.to_string()
        } else {
            self.libvirt_uri.clone()
        }
    }

    /// Spawns libvirtd (under the reaper) in the pod netns and a fresh private mount
    /// namespace with the rig's bind mounts, and waits until it answers. Used by `setup`
    /// and by `start_daemon` (a restart after `kill_daemon`).
    fn spawn_daemon(&self) -> Result<(), String> {
        // libvirtd inside the pod netns, in a private mount namespace.
        let d = self.dir.display().to_string();
        let id = NONROOT_ID;
        let exec = if self.non_root {
            // Session mode as 107: sockets in $XDG_RUNTIME_DIR/libvirt = /var/run/libvirt,
            // the domain configs and channel sockets under $XDG_CONFIG_HOME/libvirt, the
            // caps and QEMU logs under $XDG_CACHE_HOME/libvirt. No capabilities at all.
            format!(
                "mount --bind {d}/passwd /etc/passwd; mount --bind {d}/group /etc/group; \
                 mount --bind {d}/tun /dev/net/tun; \
                 exec setpriv --reuid={id} --regid={id} --clear-groups --no-new-privs \
                 --inh-caps=-all --bounding-set=-all \
                 env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/libvirt \
                 XDG_RUNTIME_DIR=/var/run XDG_CONFIG_HOME=/var/lib/libvirt \
                 XDG_CACHE_HOME=/var/cache/libvirt \
                 perl -e '{REAPER}' /usr/sbin/libvirtd --pid-file {d}/libvirtd.pid"
            )
        } else {
            format!("exec perl -e '{REAPER}' /usr/sbin/libvirtd --pid-file {d}/libvirtd.pid")
        };
        let script = format!(
            "set -e; mkdir -p /run/libvirt; \
             if [ -e /dev/kvm ]; then mount --bind {d}/nokvm /dev/kvm; fi; \
             mount --bind {d}/run /run/libvirt; \
             mount --bind {d}/lib /var/lib/libvirt; \
             mount --bind {d}/cache /var/cache/libvirt; \
             mount --bind {d}/log /var/log/libvirt; \
             mount --bind {d}/etc /etc/libvirt; \
             {exec}"
        );
        // Appended to: a restarted daemon keeps the first one's log.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("libvirtd.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.pod_ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn libvirtd: {e}"))?;
        *self.daemon.borrow_mut() = Some(child);
        let sock = self.dir.join("run/libvirt-sock");
        let up = poll(Duration::from_secs(30), Duration::from_millis(50), || {
            if let Some(Ok(Some(status))) = self.daemon.borrow_mut().as_mut().map(|c| c.try_wait())
            {
                return Some(Err(format!("libvirtd exited early: {status}")));
            }
            (sock.exists() && self.daemon_pid() > 0 && self.virsh_try(&["uri"]).is_ok())
                .then_some(Ok(()))
        });
        up.unwrap_or_else(|| Err("libvirtd did not open its socket within 30 s".into()))?;
        let pid = self.daemon_pid();
        if util::pid_comm(pid).as_deref() != Some("libvirtd") {
            return Err(format!(
                "pid {pid} is {:?}, not libvirtd",
                util::pid_comm(pid)
            ));
        }
        if self.non_root {
            // KubeVirt's socket name (virtqemud); Debian 12's monolithic libvirtd names it
            // libvirt-sock. Connecting through the symlink is connecting to the socket.
            let link = self.dir.join("run/virtqemud-sock");
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink("libvirt-sock", &link)
                    .map_err(|e| format!("symlink {}: {e}", link.display()))?;
            }
        }
        self.log(&format!("libvirtd up (pid {pid})"));
        Ok(())
    }

    /// Records the domain's QEMU pid and uid/gid, and checks it runs in the pod netns.
    fn record_qemu(&self) -> Result<(), String> {
        // QEMU: its pid, uid, and that it really runs in the pod netns.
        // The session daemon's QEMU state dir is $XDG_RUNTIME_DIR/libvirt/qemu/run.
        let pidfile = self.dir.join(format!(
            "run/qemu/{}{}.pid",
            if self.non_root { "run/" } else { "" },
            self.domain
        ));
        let qpid: i32 = fs::read_to_string(&pidfile)
            .map_err(|e| format!("read {}: {e}", pidfile.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("bad QEMU pidfile: {e}"))?;
        self.qemu_pid.set(qpid);
        let (uid, gid) = util::pid_uid_gid(qpid).ok_or("QEMU process vanished")?;
        self.qemu_uid.set(uid);
        self.qemu_gid.set(gid);
        let ns_ino = |p: &str| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        let want = ns_ino(&format!("/run/netns/{}", self.pod_ns));
        let got = ns_ino(&format!("/proc/{qpid}/ns/net"));
        if want.is_none() || want != got {
            return Err(format!(
                "QEMU pid {qpid} is not in netns {} ({got:?} vs {want:?})",
                self.pod_ns
            ));
        }
        Ok(())
    }

    /// Waits until the guest agent answers `guest-ping` (fails at once if the domain stops
    /// running).
    /// How long the guest may take to boot to a connected agent (generous:
    /// an answer at all, not a speed check).
    fn boot_timeout(&self) -> Duration {
        match self.guest {
            Guest::Busybox => Duration::from_secs(60),
            Guest::Debian => Duration::from_secs(300),
        }
    }

    fn wait_guest_agent(&self, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        let ping = poll(timeout, Duration::from_millis(200), || {
            if self.agent(&json!({"execute": "guest-ping"}), 1).is_ok() {
                return Some(Ok(()));
            }
            match self.virsh_try(&["domstate", &self.domain]) {
                Ok(s) if s.trim() != "running" => Some(Err(format!("domain is {}", s.trim()))),
                _ => None,
            }
        });
        ping.unwrap_or_else(|| {
            Err(format!(
                "guest agent did not answer guest-ping within {timeout:?}"
            ))
        })?;
        self.boot_to_agent.set(t0.elapsed());
        self.log(&format!(
            "guest agent answers ({} ms after start)",
            t0.elapsed().as_millis()
        ));
        Ok(())
    }

    /// Logs `msg` with the rig id and elapsed ms since the rig started.
    pub fn log(&self, msg: &str) {
        self.clock.log(msg);
    }

    /// Time since `Rig::start` began.
    pub fn elapsed(&self) -> Duration {
        self.clock.elapsed()
    }

    /// libvirtd's pid (from its pidfile).
    pub fn daemon_pid(&self) -> i32 {
        fs::read_to_string(self.dir.join("libvirtd.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends `signal` to libvirtd (by the pid in its pidfile, checked to be libvirtd) and
    /// returns that pid. For SIGKILL and SIGTERM it waits until the daemon and its reaper
    /// are gone; QEMU keeps running (reparented), as in a pod whose daemon died. A frozen
    /// daemon is continued after a SIGTERM so it can act on it. Panics if the daemon is not
    /// running or does not exit within 30 s.
    pub fn kill_daemon(&self, signal: i32) -> i32 {
        let pid = self.daemon_pid();
        assert!(
            self.daemon.borrow().is_some() && util::pid_comm(pid).as_deref() == Some("libvirtd"),
            "kill_daemon: no libvirtd running (pid {pid} is {:?})",
            util::pid_comm(pid)
        );
        util::kill(pid, signal);
        if signal != libc::SIGKILL && signal != libc::SIGTERM {
            self.log(&format!("libvirtd {pid}: sent signal {signal}"));
            return pid;
        }
        if self.daemon_frozen.get() {
            util::kill(pid, libc::SIGCONT);
            self.daemon_frozen.set(false);
        }
        let mut child = self.daemon.borrow_mut().take().expect("checked above");
        let exited = poll(Duration::from_secs(30), Duration::from_millis(10), || {
            child.try_wait().ok().flatten()
        });
        if exited.is_none() {
            // Put it back so Drop stops it.
            *self.daemon.borrow_mut() = Some(child);
            panic!("libvirtd {pid} did not exit within 30 s of signal {signal}");
        }
        poll(Duration::from_secs(10), Duration::from_millis(10), || {
            (!util::pid_alive(pid) || util::pid_comm(pid).as_deref() != Some("libvirtd"))
                .then_some(())
        });
        self.log(&format!(
            "libvirtd {pid} stopped by signal {signal} ({:?}); QEMU {} alive: {}",
            exited.unwrap(),
            self.qemu_pid(),
            util::pid_alive(self.qemu_pid())
        ));
        pid
    }

    /// Starts libvirtd again after `kill_daemon`, exactly as `Rig::start` did (same pod netns,
    /// a private mount namespace with the same bind mounts); it reconnects to the running
    /// QEMU. Waits until the domain is listed as running again. Panics on failure.
    pub fn start_daemon(&self) {
        assert!(
            self.daemon.borrow().is_none(),
            "start_daemon: libvirtd still running"
        );
        let _ = fs::remove_file(self.dir.join("libvirtd.pid"));
        if let Err(e) = self.spawn_daemon() {
            panic!(
                "start_daemon: {e}\n--- libvirtd log ---\n{}",
                util::tail(&self.dir.join("libvirtd.log"), 20)
            );
        }
        if self.domain_started.get() {
            let running = poll(Duration::from_secs(30), Duration::from_millis(50), || {
                self.virsh_try(&["domstate", &self.domain])
                    .ok()
                    .filter(|s| s.trim() == "running")
            });
            assert!(
                running.is_some(),
                "start_daemon: {} not running after the restart: {:?}",
                self.domain,
                self.virsh_try(&["domstate", &self.domain])
            );
        }
    }

    /// Freezes libvirtd (SIGSTOP): it keeps its sockets but answers nothing.
    pub fn freeze_daemon(&self) {
        let pid = self.daemon_pid();
        assert_eq!(
            util::pid_comm(pid).as_deref(),
            Some("libvirtd"),
            "pid {pid}"
        );
        util::kill(pid, libc::SIGSTOP);
        self.daemon_frozen.set(true);
        self.log(&format!("libvirtd {pid} frozen (SIGSTOP)"));
    }

    /// Continues a frozen libvirtd (SIGCONT).
    pub fn thaw_daemon(&self) {
        let pid = self.daemon_pid();
        if util::pid_comm(pid).as_deref() == Some("libvirtd") {
            util::kill(pid, libc::SIGCONT);
        }
        self.daemon_frozen.set(false);
        self.log(&format!("libvirtd {pid} continued (SIGCONT)"));
    }

    /// `virsh destroy` (the domain stays defined when persistent); QEMU is gone on return.
    pub fn destroy_domain(&self) {
        self.virsh(&["destroy", &self.domain]);
        self.log("domain destroyed");
    }

    /// `virsh start` of the (persistent) domain again, then waits for its guest agent.
    pub fn start_domain(&self) {
        self.virsh(&["start", &self.domain]);
        let r = self
            .record_qemu()
            .and_then(|()| self.wait_guest_agent(self.boot_timeout()));
        if let Err(e) = r {
            panic!(
                "start_domain: {e}\n--- guest console ---\n{}",
                self.console_tail(40)
            );
        }
        self.log(&format!(
            "domain started again (QEMU pid {})",
            self.qemu_pid()
        ));
    }

    /// The pid of the rig's direct child: the reaper that runs libvirtd.
    pub fn reaper_pid(&self) -> i32 {
        self.daemon
            .borrow()
            .as_ref()
            .map(|c| c.id() as i32)
            .unwrap_or(0)
    }

    /// The guest's QEMU process.
    pub fn qemu_pid(&self) -> i32 {
        self.qemu_pid.get()
    }

    /// uid QEMU runs as (Debian's `libvirt-qemu`): the owner taps need.
    pub fn qemu_uid(&self) -> u32 {
        self.qemu_uid.get()
    }

    pub fn qemu_gid(&self) -> u32 {
        self.qemu_gid.get()
    }

    /// `ip netns exec <pod_ns> <program>`.
    pub fn pod_cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.pod_ns, program]);
        c
    }

    /// `ip netns exec <node_ns> <program>`.
    pub fn node_cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.node_ns, program]);
        c
    }

    /// Runs `ip <args>` in the pod netns, panicking on failure; returns stdout.
    pub fn pod_ip(&self, args: &[&str]) -> String {
        util::run(Command::new("ip").args(["-n", &self.pod_ns]).args(args))
    }

    /// The node netns' neighbour table (`ip neigh`), for failure messages.
    pub fn node_neighbours(&self) -> String {
        self.node_ip(&["neigh"])
    }

    /// Runs `ip <args>` in the node netns, panicking on failure; returns stdout.
    pub fn node_ip(&self, args: &[&str]) -> String {
        util::run(Command::new("ip").args(["-n", &self.node_ns]).args(args))
    }

    /// `virsh -c <uri> <args>`; panics with stderr on failure.
    /// Attaches `device` (device XML) to the live domain with virsh, as
    /// KubeVirt's launcher attaches what it rendered; `name` names the file.
    pub fn attach_live(&self, name: &str, device: &str) {
        let file = self.dir.join(name);
        fs::write(&file, device).unwrap();
        self.virsh(&[
            "attach-device",
            &self.domain,
            &file.to_string_lossy(),
            "--live",
        ]);
    }

    pub fn virsh(&self, args: &[&str]) -> String {
        self.virsh_try(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `virsh -c <uri> <args>`; `Err(message)` on failure.
    pub fn virsh_try(&self, args: &[&str]) -> Result<String, String> {
        util::try_run(
            Command::new("virsh")
                .args(["-q", "-c", &self.libvirt_uri])
                .args(args),
        )
    }

    /// The QEMU libvirt runs (`virsh version`'s hypervisor line, as
    /// libvirt's version number).
    pub fn qemu_version(&self) -> nicplug::hypervisor::QemuVersion {
        let out = self.virsh(&["version"]);
        let version = out
            .lines()
            .find(|l| l.contains("hypervisor") && l.contains("QEMU"))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("no QEMU in virsh version: {out}"));
        let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
        nicplug::hypervisor::QemuVersion(
            parts[0] * 1_000_000 + parts[1] * 1_000 + parts.get(2).copied().unwrap_or(0),
        )
    }

    /// Live domain XML.
    pub fn domain_xml(&self) -> String {
        self.virsh(&["dumpxml", &self.domain])
    }

    /// Inactive (persistent config) domain XML.
    pub fn domain_config_xml(&self) -> String {
        self.virsh(&["dumpxml", "--inactive", &self.domain])
    }

    /// `pcie-root-port` controllers of the live domain no device sits behind.
    pub fn free_root_ports(&self) -> u32 {
        free_root_ports(&self.domain_xml())
    }

    /// Last `n` lines of the guest's serial console.
    pub fn console_tail(&self, n: usize) -> String {
        util::tail(&self.console_log, n)
    }

    /// Sends one guest-agent command; returns its `return` value.
    pub fn agent(&self, cmd: &Value, timeout_s: u32) -> Result<Value, String> {
        let out = self.virsh_try(&[
            "qemu-agent-command",
            "--timeout",
            &timeout_s.to_string(),
            &self.domain,
            &cmd.to_string(),
        ])?;
        let v: Value = serde_json::from_str(out.trim())
            .map_err(|e| format!("guest agent reply {out:?}: {e}"))?;
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    /// `guest-network-get-interfaces`, or the error.
    pub fn try_guest_interfaces(&self) -> Result<Vec<GuestIface>, String> {
        self.agent(&json!({"execute": "guest-network-get-interfaces"}), 5)
            .map(|r| GuestIface::parse_all(&r))
    }

    /// The guest's interfaces as its agent reports them (panics if the agent fails).
    pub fn guest_interfaces(&self) -> Vec<GuestIface> {
        self.try_guest_interfaces()
            .unwrap_or_else(|e| panic!("guest-network-get-interfaces: {e}"))
    }

    /// Polls the guest agent until it reports an interface with `mac` (any case).
    pub fn wait_guest_mac(&self, mac: &str, timeout: Duration) -> Option<GuestIface> {
        let mac = mac.to_ascii_lowercase();
        poll(timeout, Duration::from_millis(100), || {
            self.try_guest_interfaces()
                .ok()?
                .into_iter()
                .find(|i| i.mac == mac)
        })
    }

    /// Polls the guest agent until the NIC with `mac` holds `address`; true
    /// if it did in time.
    pub fn wait_guest_address(&self, mac: &str, address: &str, timeout: Duration) -> bool {
        let mac = mac.to_ascii_lowercase();
        poll(timeout, Duration::from_millis(20), || {
            self.try_guest_interfaces()
                .ok()?
                .into_iter()
                .find(|i| i.mac == mac && i.has_ip(address))
        })
        .is_some()
    }

    /// Polls the guest agent until no interface has `mac`; true if it went away in time.
    pub fn wait_guest_mac_gone(&self, mac: &str, timeout: Duration) -> bool {
        let mac = mac.to_ascii_lowercase();
        poll(timeout, Duration::from_millis(100), || {
            let ifaces = self.try_guest_interfaces().ok()?;
            (!ifaces.iter().any(|i| i.mac == mac)).then_some(())
        })
        .is_some()
    }

    /// Runs argv in the guest (guest-exec, no shell: use `["/bin/sh", "-c", ...]` for one);
    /// returns (exit code, stdout). Panics if the agent fails or it runs over 30 s.
    pub fn guest_exec(&self, argv: &[&str]) -> (i32, String) {
        let r = self.guest_exec_full(argv);
        (r.code, r.stdout)
    }

    /// Like `guest_exec`, but `None` instead of a panic when the agent does not answer.
    pub fn guest_exec_try(&self, argv: &[&str]) -> Option<(i32, String)> {
        let (path, args) = argv.split_first()?;
        let ret = self
            .agent(
                &json!({"execute": "guest-exec", "arguments": {
                    "path": path, "arg": args, "capture-output": true}}),
                2,
            )
            .ok()?;
        let pid = ret["pid"].as_i64()?;
        let status = poll(Duration::from_secs(10), Duration::from_millis(50), || {
            let s = self
                .agent(
                    &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
                    2,
                )
                .ok()?;
            s["exited"].as_bool().unwrap_or(false).then_some(s)
        })?;
        let out = util::base64_decode(status["out-data"].as_str().unwrap_or(""));
        Some((
            status["exitcode"].as_i64().unwrap_or(-1) as i32,
            String::from_utf8_lossy(&out).into_owned(),
        ))
    }

    /// Like `guest_exec`, with stderr too.
    pub fn guest_exec_full(&self, argv: &[&str]) -> GuestExec {
        let (path, args) = argv.split_first().expect("guest_exec: empty argv");
        let ret = self
            .agent(
                &json!({"execute": "guest-exec", "arguments": {
                    "path": path, "arg": args, "capture-output": true}}),
                10,
            )
            .unwrap_or_else(|e| panic!("guest-exec {argv:?}: {e}"));
        let pid = ret["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("guest-exec {argv:?}: no pid in {ret}"));
        let status = poll(Duration::from_secs(30), Duration::from_millis(50), || {
            let s = self
                .agent(
                    &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
                    10,
                )
                .unwrap_or_else(|e| panic!("guest-exec-status {argv:?}: {e}"));
            s["exited"].as_bool().unwrap_or(false).then_some(s)
        })
        .unwrap_or_else(|| panic!("guest-exec {argv:?} did not exit within 30 s"));
        let text = |k: &str| {
            String::from_utf8_lossy(&util::base64_decode(status[k].as_str().unwrap_or("")))
                .into_owned()
        };
        GuestExec {
            code: status["exitcode"]
                .as_i64()
                .or_else(|| status["signal"].as_i64().map(|s| 128 + s))
                .unwrap_or(-1) as i32,
            stdout: text("out-data"),
            stderr: text("err-data"),
        }
    }

    fn cni(&self, command: &str, net: &CniNet, ifname: &str) -> Result<String, String> {
        let ipam = self.ipam_dir.display().to_string();
        let conf = net.config(&ipam).to_string();
        fs::write(self.dir.join(format!("cni/{}.json", net.name)), &conf)
            .map_err(|e| e.to_string())?;
        let mut cmd = self.node_cmd(&format!("{CNI_PATH}/bridge"));
        cmd.env("CNI_COMMAND", command)
            .env("CNI_NETNS", format!("/run/netns/{}", self.pod_ns))
            .env("CNI_IFNAME", ifname)
            .env("CNI_CONTAINERID", format!("{PREFIX}-rig-{}", self.id))
            .env("CNI_PATH", CNI_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn CNI bridge: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(conf.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "CNI {command} {} {ifname} failed ({}): {stdout} {}",
                net.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// CNI ADD with the real bridge plugin, run in the node netns: `ifname` appears in the
    /// pod netns with a link-local address, its peer on `net.bridge` in the node netns.
    /// The node's bridge also gets `net.node_addr()` so the node can ping the guest.
    pub fn cni_add(&self, net: &CniNet, ifname: &str) -> CniResult {
        let t0 = Instant::now();
        let out = self
            .cni("ADD", net, ifname)
            .unwrap_or_else(|e| panic!("{e}"));
        let raw: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("CNI ADD result {out:?}: {e}"));
        let res = CniResult::parse(raw, ifname).unwrap_or_else(|e| panic!("{e}"));
        self.node_ip(&["addr", "replace", &net.node_addr(), "dev", &net.bridge]);
        if net.ipv6 {
            self.node_ip(&[
                "-6",
                "addr",
                "replace",
                &net.node_addr6(),
                "dev",
                &net.bridge,
            ]);
        }
        self.log(&format!(
            "cni ADD {} {ifname}: mac {} ips {:?} ({} ms)",
            net.name,
            res.mac,
            res.ips,
            t0.elapsed().as_millis()
        ));
        // As Multus does once CNI ADD returned.
        let entry = json!({
            "name": format!("default/{}", net.name),
            "interface": ifname,
            "ips": res.ips.iter().map(|ip| ip.split('/').next().unwrap()).collect::<Vec<_>>(),
            "mac": res.mac,
        });
        self.edit_network_status(|entries| {
            entries.retain(|e| e["interface"] != ifname);
            entries.push(entry);
        });
        res
    }

    /// Multus' network-status of the pod, as the rig's CNI ADD and DEL keep
    /// it (the raw JSON array; `nicplug run --network-status` reads it).
    pub fn network_status_path(&self) -> PathBuf {
        self.dir.join("network-status.json")
    }

    /// Rewrites the network-status file (rename-replace, as kubelet swaps a
    /// downward-API file), starting from the pod network's entry.
    fn edit_network_status(&self, edit: impl FnOnce(&mut Vec<Value>)) {
        let path = self.network_status_path();
        let mut entries: Vec<Value> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_else(|| {
                vec![json!({"name": "kindnet", "interface": "eth0", "default": true})]
            });
        edit(&mut entries);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, Value::Array(entries).to_string()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// CNI DEL (panics on failure).
    pub fn cni_del(&self, net: &CniNet, ifname: &str) {
        let t0 = Instant::now();
        self.cni("DEL", net, ifname)
            .unwrap_or_else(|e| panic!("{e}"));
        self.edit_network_status(|entries| entries.retain(|e| e["interface"] != ifname));
        self.log(&format!(
            "cni DEL {} {ifname} ({} ms)",
            net.name,
            t0.elapsed().as_millis()
        ));
    }

    /// A LAN for macvtap networks in the node netns: a veth pair, `lower`
    /// (macvtap-cni's lower device) and `peer` with `lan.node_addr()`, the
    /// node-side host the guest reaches. Idempotent.
    pub fn macvtap_lan(&self, lan: &MacvtapLan) {
        if util::try_run(Command::new("ip").args(["-n", &self.node_ns, "link", "show", &lan.lower]))
            .is_ok()
        {
            return;
        }
        self.node_ip(&[
            "link", "add", &lan.lower, "type", "veth", "peer", "name", &lan.peer,
        ]);
        self.node_ip(&["link", "set", &lan.lower, "up"]);
        self.node_ip(&["link", "set", &lan.peer, "up"]);
        self.node_ip(&["addr", "replace", &lan.node_addr(), "dev", &lan.peer]);
    }

    /// What macvtap-cni's ADD does (its device plugin made the macvtap on
    /// the node's lower link): a bridge-mode macvtap on `lan.lower`, moved
    /// into the pod netns, given `mac` (Multus' `mac` argument, when the spec
    /// has one) and renamed `ifname`, set up, and `/dev/tap<index>` given to
    /// QEMU's user; then Multus' network-status entry. Returns the MAC.
    pub fn macvtap_add(&self, lan: &MacvtapLan, ifname: &str, mac: Option<&str>) -> String {
        let t0 = Instant::now();
        self.macvtap_lan(lan);
        let staged = format!("mvt{}", lan.n);
        self.node_ip(&[
            "link", "add", "link", &lan.lower, "name", &staged, "type", "macvtap", "mode", "bridge",
        ]);
        self.node_ip(&["link", "set", &staged, "up"]);
        self.node_ip(&["link", "set", &staged, "netns", &self.pod_ns]);
        if let Some(mac) = mac {
            self.pod_ip(&["link", "set", &staged, "address", mac]);
        }
        self.pod_ip(&["link", "set", &staged, "name", ifname]);
        self.pod_ip(&["link", "set", ifname, "up"]);
        let out = self.pod_ip(&["-o", "link", "show", ifname]);
        let index = out.split(':').next().unwrap().trim();
        let dev = format!("/dev/tap{index}");
        util::run(
            Command::new("chown")
                .arg(format!("{}:{}", self.qemu_uid(), self.qemu_gid()))
                .arg(&dev),
        );
        let mac = self.link_mac(ifname);
        self.log(&format!(
            "macvtap ADD {ifname} on {}: mac {mac}, {dev} ({} ms)",
            lan.lower,
            t0.elapsed().as_millis()
        ));
        let entry = json!({
            "name": format!("default/{}", lan.name()),
            "interface": ifname,
            "mac": mac,
        });
        self.edit_network_status(|entries| {
            entries.retain(|e| e["interface"] != ifname);
            entries.push(entry);
        });
        mac
    }

    /// macvtap-cni's DEL: the link goes (its device plugin makes a new one).
    pub fn macvtap_del(&self, ifname: &str) {
        self.pod_ip(&["link", "del", ifname]);
        self.edit_network_status(|entries| entries.retain(|e| e["interface"] != ifname));
        self.log(&format!("macvtap DEL {ifname}"));
    }

    /// `ip -d link show` of a pod link, for comparing before and after.
    pub fn pod_link_details(&self, ifname: &str) -> String {
        self.pod_ip(&["-d", "link", "show", ifname])
    }

    fn link_mac(&self, ifname: &str) -> String {
        let out = self.pod_ip(&["-o", "link", "show", ifname]);
        let after = out.split("link/ether ").nth(1).expect("an ethernet link");
        after.split_whitespace().next().unwrap().to_string()
    }

    /// Pings `addr` from the node netns over `net`'s bridge (a few tries of `ping -c1 -W1`).
    pub fn ping_from_node(&self, net: &CniNet, addr: &str) -> bool {
        for _ in 0..5 {
            let mut cmd = self.node_cmd(BUSYBOX);
            cmd.args(["ping", "-c1", "-W1"]);
            if addr.contains(':') {
                cmd.args(["-I", &net.bridge]);
            }
            cmd.arg(addr);
            if util::output(&mut cmd).status.success() {
                return true;
            }
        }
        false
    }

    /// Normalized `ip -d -j link` + `ip -j addr` of the pod netns (links sorted by name;
    /// counters, ifindexes and address lifetimes dropped) and `ip -j route show table
    /// all` (IPv4, IPv6; as listed) for before/after comparisons.
    pub fn pod_links_snapshot(&self) -> String {
        snapshot(&self.pod_ns)
    }

    /// Same as `pod_links_snapshot`, for the node netns.
    pub fn node_links_snapshot(&self) -> String {
        snapshot(&self.node_ns)
    }
}

fn snapshot(ns: &str) -> String {
    fn strip(v: &mut Value) {
        const VOLATILE: [&str; 7] = [
            "stats",
            "stats64",
            "ifindex",
            "link_index",
            "valid_life_time",
            "preferred_life_time",
            "link_netnsid",
        ];
        match v {
            Value::Object(m) => {
                for k in VOLATILE {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let parse = |args: &[&str]| -> Vec<Value> {
        let out = util::run(Command::new("ip").args(["-n", ns]).args(args));
        let mut v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j: {e}: {out}"));
        strip(&mut v);
        let mut a = v.as_array().cloned().unwrap_or_default();
        a.sort_by(|x, y| x["ifname"].as_str().cmp(&y["ifname"].as_str()));
        a
    };
    let links = parse(&["-d", "-j", "link", "show"]);
    let addrs: Vec<Value> = parse(&["-j", "addr", "show"])
        .into_iter()
        .map(|a| json!({"ifname": a["ifname"], "addr_info": a["addr_info"]}))
        .collect();
    // Every table's routes, as the kernel lists them (no field of a route changes
    // on its own): CNI's routes on the pod link must come back too.
    let route_dump = |family: &str| -> Value {
        let out = util::run(
            Command::new("ip").args(["-n", ns, "-j", family, "route", "show", "table", "all"]),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j route: {e}: {out}"))
    };
    let routes = json!({"ipv4": route_dump("-4"), "ipv6": route_dump("-6")});
    serde_json::to_string_pretty(&json!({"links": links, "addrs": addrs, "routes": routes}))
        .expect("json")
}

/// Counts `pcie-root-port` controllers of a domain XML that no `<address bus=...>` uses.
pub fn free_root_ports(xml: &str) -> u32 {
    let mut ports = Vec::new();
    let mut used = std::collections::HashSet::new();
    for tag in xml.split('<').skip(1) {
        let attr = |name: &str| -> Option<String> {
            let i = tag.find(&format!(" {name}="))? + name.len() + 2;
            let q = tag[i..].chars().next()?;
            let rest = &tag[i + 1..];
            Some(rest[..rest.find(q)?].to_string())
        };
        if tag.starts_with("controller ")
            && attr("type").as_deref() == Some("pci")
            && attr("model").as_deref() == Some("pcie-root-port")
        {
            if let Some(i) = attr("index").and_then(|s| s.parse::<u32>().ok()) {
                ports.push(i);
            }
        } else if tag.starts_with("address ")
            && attr("type").as_deref() == Some("pci")
            && let Some(b) = attr("bus")
            && let Ok(b) = u32::from_str_radix(b.trim_start_matches("0x"), 16)
        {
            used.insert(b);
        }
    }
    ports.iter().filter(|p| !used.contains(p)).count() as u32
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The rig's domain: q35 TCG, direct kernel boot, guest agent channel, no NIC; a
/// root disk on `pcie-root` when `disk` is given (the Debian guest).
pub fn domain_xml(
    name: &str,
    opts: &RigOptions,
    kernel: &Path,
    initrd: &Path,
    disk: Option<&Path>,
    console: &Path,
) -> String {
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
    let mut disk_xml = String::new();
    let mut memory_mib = opts.memory_mib;
    if let Some(disk) = disk {
        cmdline.push_str(" root=/dev/vda rw");
        memory_mib = memory_mib.max(DEBIAN_MEMORY_MIB);
        // Slot 4 of bus 0 (the virtio-serial controller has slot 3): an
        // integrated endpoint, no root port used.
        disk_xml = format!(
            "    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='unsafe'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
",
            xml_escape(&disk.display().to_string())
        );
    }
    if !opts.kernel_cmdline_extra.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(opts.kernel_cmdline_extra.trim());
    }
    let mut ports = String::new();
    for i in 1..=opts.root_ports {
        ports.push_str(&format!(
            "    <controller type='pci' index='{i}' model='pcie-root-port'/>\n"
        ));
    }
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disk_xml}    <controller type='pci' index='0' model='pcie-root'/>
{ports}    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </controller>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
        mem = memory_mib,
        vcpus = opts.vcpus,
        kernel = xml_escape(&kernel.display().to_string()),
        initrd = xml_escape(&initrd.display().to_string()),
        cmdline = xml_escape(&cmdline),
        console = xml_escape(&console.display().to_string()),
    )
}

impl Drop for Rig {
    fn drop(&mut self) {
        let t0 = Instant::now();
        if self.daemon_frozen.get() {
            self.thaw_daemon();
        }
        if self.daemon.borrow().is_some() && self.domain_started.get() {
            if let Err(e) = self.virsh_try(&["destroy", &self.domain])
                && !e.contains("not running")
            {
                self.log(&format!("cleanup: {e}"));
            }
            self.log("cleanup: domain destroyed");
            if self.persistent {
                let _ = self.virsh_try(&["undefine", &self.domain]);
            }
        }
        let daemon_child = self.daemon.borrow_mut().take();
        if let Some(mut child) = daemon_child {
            let daemon = self.daemon_pid();
            // SIGTERM to the reaper, which forwards it to libvirtd and exits with it.
            util::kill(child.id() as i32, libc::SIGTERM);
            let exited = poll(Duration::from_secs(10), Duration::from_millis(20), || {
                child.try_wait().ok().flatten()
            });
            if exited.is_none() {
                self.log(&format!(
                    "cleanup: libvirtd {daemon} ignored SIGTERM, killing"
                ));
                if util::pid_comm(daemon).as_deref() == Some("libvirtd") {
                    util::kill(daemon, libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            self.log("cleanup: libvirtd stopped");
        }
        // QEMU should be gone with the destroy; make sure (only the pid this rig recorded).
        let qemu_pid = self.qemu_pid();
        if qemu_pid > 0 && util::pid_comm(qemu_pid).is_some_and(|c| c.starts_with("qemu")) {
            self.log(&format!("cleanup: QEMU {} still alive, killing", qemu_pid));
            util::terminate_foreign(qemu_pid, Duration::from_secs(5));
        }
        for ns in self.netns_made.drain(..).rev() {
            if let Err(e) = util::try_run(Command::new("ip").args(["netns", "del", &ns])) {
                eprintln!("[rig {}] cleanup: {e}", self.id);
            }
        }
        if self.keep {
            self.log(&format!(
                "NICPLUG_KEEP_RIG=1: keeping {}",
                self.dir.display()
            ));
        } else if self.dir.exists()
            && let Err(e) = fs::remove_dir_all(&self.dir)
        {
            self.log(&format!("cleanup: rm {}: {e}", self.dir.display()));
        }
        self.log(&format!("torn down ({} ms)", t0.elapsed().as_millis()));
    }
}

/// Cleans up after rigs of processes that died without running Drop (SIGKILL, abort):
/// their QEMU and libvirtd (by the pids their own pidfiles recorded), netns and directory.
fn reap_stale() {
    let Ok(out) = util::try_run(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    let prefixes = [format!("{PREFIX}-pod-"), format!("{PREFIX}-node-")];
    for line in out.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(id) = prefixes.iter().find_map(|p| name.strip_prefix(p.as_str())) else {
            continue;
        };
        let Some(owner) = id.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if util::pid_alive(owner) {
            continue;
        }
        eprintln!("[rig] reaping stale {name} (owner pid {owner} is gone)");
        let dir = tmp_base().join(format!("{PREFIX}-rig-{id}"));
        let read_pid = |p: PathBuf| {
            fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        };
        for e in ["run/qemu", "run/qemu/run"]
            .iter()
            .filter_map(|d| fs::read_dir(dir.join(d)).ok())
            .flatten()
            .flatten()
        {
            {
                if e.path().extension().is_some_and(|x| x == "pid")
                    && let Some(p) = read_pid(e.path())
                    && util::pid_comm(p).is_some_and(|c| c.starts_with("qemu"))
                {
                    util::terminate_foreign(p, Duration::from_secs(5));
                }
            }
        }
        if let Some(p) = read_pid(dir.join("libvirtd.pid"))
            && util::pid_comm(p).as_deref() == Some("libvirtd")
        {
            util::terminate_foreign(p, Duration::from_secs(10));
        }
        let _ = util::try_run(Command::new("ip").args(["netns", "del", name]));
        let _ = fs::remove_dir_all(&dir);
    }
}
