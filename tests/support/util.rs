//! Small process helpers shared by the rig: run a command and fail loudly, step timing,
//! signals by pid, base64.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` and returns its output whatever the exit status (panics only if it cannot start).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// Runs `cmd`; `Ok(stdout)` on exit 0, else `Err("<cmd>: exit N: <stderr>")`.
pub fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = output(cmd);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            {
                let so = String::from_utf8_lossy(&out.stdout);
                if so.trim().is_empty() {
                    String::new()
                } else {
                    format!(" (stdout: {})", so.trim())
                }
            }
        ))
    }
}

/// Runs `cmd`, panicking with its stderr on failure; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `f` every `every` until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// True if a process with this pid exists (zombies included).
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// The command name (`/proc/<pid>/comm`) of a live process.
pub fn pid_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sends `sig` to exactly this pid.
pub fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a specific positive pid has no memory-safety implications.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; for a process that is not our child
/// (we cannot reap it, so "gone" means /proc/<pid> vanished or it is a zombie).
pub fn terminate_foreign(pid: i32, grace: Duration) {
    if !pid_alive(pid) {
        return;
    }
    kill(pid, libc::SIGTERM);
    let gone = || !pid_alive(pid) || is_zombie(pid);
    if poll(grace, Duration::from_millis(20), || gone().then_some(())).is_none() {
        kill(pid, libc::SIGKILL);
        poll(Duration::from_secs(5), Duration::from_millis(20), || {
            gone().then_some(())
        });
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Real uid and gid of a process, from `/proc/<pid>/status`.
pub fn pid_uid_gid(pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u32> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// Last `n` lines of a text file (empty string if unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Standard base64 (with or without padding) to bytes; invalid characters are skipped.
pub fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some((c - b'A') as u32),
            b'a'..=b'z' => Some((c - b'a' + 26) as u32),
            b'0'..=b'9' => Some((c - b'0' + 52) as u32),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Step logger: `[rig <tag> +<ms>ms] message` on stderr.
pub struct Clock {
    tag: String,
    start: Instant,
}

impl Clock {
    pub fn new(tag: &str) -> Clock {
        Clock {
            tag: tag.to_string(),
            start: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn log(&self, msg: &str) {
        eprintln!(
            "[rig {} +{}ms] {msg}",
            self.tag,
            self.start.elapsed().as_millis()
        );
    }
}
