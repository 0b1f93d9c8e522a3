//! Sandboxed execution of untrusted Python (model-written MBPP solutions and
//! their tests). Replaces the reference's bare subprocess with rlimits (spec
//! §2.3 "Subprocess limits", §3.2 MBPP metric) by a real sandbox (design §5):
//!
//! - resource limits (`setrlimit`): CPU seconds, address space, file size,
//!   process count, open files, no core dumps; plus a wall-clock timeout;
//! - a fresh unprivileged uid per run when we are root (RLIMIT_NPROC does not
//!   bind root, and a unique uid keeps concurrent runs from sharing the count);
//! - new network, PID and mount namespaces (via util-linux `unshare`): no
//!   network (only a down loopback), killing the namespace's first process ends
//!   every descendant (even ones that called `setsid`), `/` is read-only and
//!   the run's private temp dir is mounted on `/tmp`, so nothing written
//!   persists after the run;
//! - a scrubbed environment (PATH and LANG only), stdin closed, output capped,
//!   the whole process group killed on timeout, the temp dir deleted afterwards.
//!
//! Where namespaces are refused (or we are not root) the sandbox degrades to
//! rlimits + process group + uid drop (when root) + a network namespace if
//! allowed, and says so once (a tracing warning). In that mode `/tmp` stays
//! writable and shared. `CANTANTE_SANDBOX_NAMESPACES=0` forces it (for tests);
//! `CANTANTE_PYTHON` picks the interpreter.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable naming the Python interpreter (default `python3`).
pub const PYTHON_ENV: &str = "CANTANTE_PYTHON";

/// Set to `0` to disable namespaces (testing the degraded mode).
pub const NAMESPACES_ENV: &str = "CANTANTE_SANDBOX_NAMESPACES";

/// Programs whose output exceeds `output_bytes` times this factor are killed.
const DRAIN_FACTOR: usize = 16;
/// First uid of the range handed to sandboxed runs.
const UID_BASE: u32 = 1_200_000_000;
/// Size of the uid range.
const UID_RANGE: u64 = 100_000_000;
/// Marker written by [`run_tests`] programs after their assertion ran.
const DONE_MARKER: &str = "__cantante_test_done__";

/// Resource limits of one sandboxed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxLimits {
    /// Wall-clock timeout.
    pub wall: Duration,
    /// CPU-time limit in seconds (RLIMIT_CPU).
    pub cpu_secs: u64,
    /// Address-space limit in bytes (RLIMIT_AS).
    pub memory_bytes: u64,
    /// Largest file the program may write (RLIMIT_FSIZE).
    pub file_bytes: u64,
    /// Process/thread limit for the run's uid (RLIMIT_NPROC).
    pub max_procs: u64,
    /// Bytes of stdout and of stderr kept (each); the rest is drained and dropped.
    pub output_bytes: usize,
    /// Python interpreter (None = `$CANTANTE_PYTHON`, else `python3` on PATH).
    pub interpreter: Option<PathBuf>,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            wall: Duration::from_secs(10),
            cpu_secs: 10,
            memory_bytes: 512 << 20,
            file_bytes: 16 << 20,
            max_procs: 16,
            output_bytes: 64 << 10,
            interpreter: None,
        }
    }
}

/// How a sandboxed program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Exit code 0.
    Ok,
    /// Non-zero exit code.
    Failed(i32),
    /// Killed after the wall-clock timeout.
    Timeout,
    /// Killed for exceeding the CPU-time limit.
    CpuLimit,
    /// Ran out of address space (Python `MemoryError`).
    MemoryExceeded,
    /// Killed for writing far more output than the cap.
    OutputLimit,
    /// Killed by a signal (number).
    Killed(i32),
}

impl Status {
    /// Whether the program exited with code 0.
    pub fn success(&self) -> bool {
        matches!(self, Status::Ok)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Ok => write!(f, "ok"),
            Status::Failed(c) => write!(f, "failed (exit code {c})"),
            Status::Timeout => write!(f, "timeout"),
            Status::CpuLimit => write!(f, "CPU time limit exceeded"),
            Status::MemoryExceeded => write!(f, "memory limit exceeded"),
            Status::OutputLimit => write!(f, "output limit exceeded"),
            Status::Killed(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Which protections were active for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Isolation {
    /// New network namespace (no network).
    pub net_namespace: bool,
    /// New PID namespace (all descendants die with the run).
    pub pid_namespace: bool,
    /// New mount namespace (read-only `/`, private `/tmp`).
    pub mount_namespace: bool,
    /// The unprivileged uid the code ran as, if privileges were dropped.
    pub uid: Option<u32>,
    /// Resource limits applied.
    pub rlimits: bool,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.rlimits {
            parts.push("rlimits".to_string());
        }
        if let Some(u) = self.uid {
            parts.push(format!("uid {u}"));
        }
        if self.net_namespace {
            parts.push("net-ns".into());
        }
        if self.pid_namespace {
            parts.push("pid-ns".into());
        }
        if self.mount_namespace {
            parts.push("mount-ns".into());
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        f.write_str(&parts.join(", "))
    }
}

/// Result of one sandboxed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxOutcome {
    /// How the program ended.
    pub status: Status,
    /// Captured stdout (at most `output_bytes`, lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (at most `output_bytes`, lossy UTF-8).
    pub stderr: String,
    /// Wall time of the run.
    pub wall: Duration,
    /// Whether stdout or stderr was cut at the cap.
    pub truncated: bool,
    /// Protections that were active.
    pub isolation: Isolation,
}

/// Errors that prevent a sandboxed run from starting.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The Python interpreter could not be found.
    #[error("python interpreter `{0}` not found (set CANTANTE_PYTHON or install python3)")]
    Interpreter(String),
    /// An I/O step (temp dir, spawn, wait) failed.
    #[error("sandbox: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { what, source }
}

/// How programs are launched on this machine (probed once).
#[derive(Debug, Clone)]
enum Mode {
    /// `unshare` with net/pid/mount namespaces, then `setpriv` to a fresh uid.
    Namespaces { unshare: PathBuf, setpriv: PathBuf },
    /// Direct spawn with rlimits; `net` = a network namespace could be entered.
    /// `setpriv` (if found) drops to the run's uid while keeping root's right to
    /// reach the interpreter (e.g. under a 0700 `/root`); else `setuid` in-process.
    Plain { net: bool, setpriv: Option<PathBuf> },
}

/// Shell run as the namespace's first process: private mounts, then drop to the uid.
const NS_SCRIPT: &str = r#"set -e
W="$1"; U="$2"; SP="$3"; shift 3
mount --bind "$W" /tmp
mount -o remount,bind,ro /
for d in /var/tmp /dev/shm /run/lock; do
  if [ -d "$d" ]; then mount -t tmpfs -o size=8m,mode=1777 cantante-sbx "$d" 2>/dev/null || true; fi
done
cd /tmp
set +e
"$SP" --reuid="$U" --regid="$U" --clear-groups --no-new-privs -- "$@"
exit $?
"#;

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mode() -> &'static Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    MODE.get_or_init(|| {
        let plain = || Mode::Plain {
            net: probe_plain_net(),
            setpriv: find_tool("setpriv"),
        };
        if matches!(
            std::env::var(NAMESPACES_ENV).as_deref(),
            Ok("0") | Ok("off") | Ok("false")
        ) {
            tracing::warn!("sandbox: namespaces disabled by {NAMESPACES_ENV}; only rlimits, a process group and (as root) a uid drop protect the host");
            return plain();
        }
        if !is_root() {
            tracing::warn!("sandbox: not running as root, so no namespaces and no uid drop; only rlimits and a process group protect the host");
            return plain();
        }
        let (Some(unshare), Some(setpriv), Some(truebin)) =
            (find_tool("unshare"), find_tool("setpriv"), find_tool("true"))
        else {
            tracing::warn!("sandbox: util-linux `unshare`/`setpriv` not found; running without namespaces (rlimits, process group and uid drop only)");
            return plain();
        };
        let m = Mode::Namespaces { unshare, setpriv };
        let dir = match tempfile::Builder::new().prefix("cantante-probe-").tempdir() {
            Ok(d) => d,
            Err(_) => return plain(),
        };
        let uid = next_uid();
        let ok = prepare_dir(dir.path(), Some(uid)).is_ok()
            && build_command(&m, &truebin, &[], dir.path(), Some(uid), &SandboxLimits::default())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .stdin(Stdio::null())
                .output()
                .map(|o| {
                    if !o.status.success() {
                        tracing::debug!(stderr = %String::from_utf8_lossy(&o.stderr), "namespace probe failed");
                    }
                    o.status.success()
                })
                .unwrap_or(false);
        if ok {
            tracing::debug!("sandbox: using net/pid/mount namespaces and a per-run uid");
            m
        } else {
            tracing::warn!("sandbox: the kernel refused new namespaces; running without them (rlimits, process group and uid drop only)");
            plain()
        }
    })
}

/// Whether a child may enter a new network namespace (plain mode only).
fn probe_plain_net() -> bool {
    let Some(truebin) = find_tool("true") else {
        return false;
    };
    let mut cmd = Command::new(truebin);
    // SAFETY: unshare is async-signal-safe; the closure only calls it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A fresh unprivileged uid for one run (unique within this process until the range wraps).
fn next_uid() -> u32 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let base = super::splitmix64(std::process::id() as u64);
    UID_BASE + ((base.wrapping_add(c)) % UID_RANGE) as u32
}

fn prepare_dir(dir: &Path, uid: Option<u32>) -> std::io::Result<()> {
    if let Some(u) = uid {
        std::os::unix::fs::chown(dir, Some(u), Some(u))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Resolve the interpreter to an absolute path (cached): pyenv-style shims need
/// the parent's environment, so ask the interpreter for `sys.executable` once.
fn resolve_interpreter(limits: &SandboxLimits) -> Result<PathBuf, SandboxError> {
    static CACHE: OnceLock<Mutex<std::collections::HashMap<PathBuf, PathBuf>>> = OnceLock::new();
    let wanted = limits
        .interpreter
        .clone()
        .or_else(|| {
            std::env::var_os(PYTHON_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("python3"));
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(&wanted).cloned()) {
        return Ok(p);
    }
    let out = Command::new(&wanted)
        .args(["-c", "import sys; print(sys.executable)"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|_| SandboxError::Interpreter(wanted.display().to_string()))?;
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || exe.is_empty() {
        return Err(SandboxError::Interpreter(wanted.display().to_string()));
    }
    let path = std::fs::canonicalize(&exe).unwrap_or_else(|_| PathBuf::from(exe));
    if let Ok(mut c) = cache.lock() {
        c.insert(wanted, path.clone());
    }
    Ok(path)
}

/// Build the command for one run (not yet spawned). `program` with `args` is
/// what finally runs inside the sandbox, with `dir` as its working directory.
fn build_command(
    mode: &Mode,
    program: &Path,
    args: &[&str],
    dir: &Path,
    uid: Option<u32>,
    limits: &SandboxLimits,
) -> Command {
    let mut cmd;
    let mut drop_uid = None;
    let mut enter_net = false;
    match mode {
        Mode::Namespaces { unshare, setpriv } => {
            cmd = Command::new(unshare);
            cmd.args([
                "--net",
                "--pid",
                "--mount",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                NS_SCRIPT,
                "sh",
            ]);
            cmd.arg(dir);
            cmd.arg(uid.unwrap_or(65534).to_string());
            cmd.arg(setpriv);
            cmd.arg(program);
            cmd.args(args);
            cmd.current_dir("/");
        }
        Mode::Plain { net, setpriv } => {
            match (setpriv, uid) {
                (Some(sp), Some(u)) => {
                    cmd = Command::new(sp);
                    cmd.args([
                        format!("--reuid={u}"),
                        format!("--regid={u}"),
                        "--clear-groups".into(),
                        "--no-new-privs".into(),
                        "--".into(),
                    ]);
                    cmd.arg(program);
                }
                _ => {
                    cmd = Command::new(program);
                    drop_uid = uid;
                }
            }
            cmd.args(args);
            cmd.current_dir(dir);
            enter_net = *net;
        }
    }
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("HOME", "/tmp");
    let rl = limits.clone();
    // SAFETY: the closure runs between fork and exec and only calls
    // async-signal-safe libc functions on values captured by copy.
    unsafe {
        cmd.pre_exec(move || {
            let set = |res, soft: u64, hard: u64| {
                let r = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                libc::setrlimit(res, &r)
            };
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            set(libc::RLIMIT_CPU, rl.cpu_secs.max(1), rl.cpu_secs.max(1) + 1);
            set(libc::RLIMIT_AS, rl.memory_bytes, rl.memory_bytes);
            set(libc::RLIMIT_FSIZE, rl.file_bytes, rl.file_bytes);
            set(libc::RLIMIT_NPROC, rl.max_procs, rl.max_procs);
            set(libc::RLIMIT_CORE, 0, 0);
            set(libc::RLIMIT_NOFILE, 256, 256);
            if enter_net && libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(u) = drop_uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(u) != 0
                    || libc::setuid(u) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            }
            Ok(())
        });
    }
    cmd
}

/// Kill every process owned by `uid` (plain mode cleanup for runs that escaped
/// their process group). The helper itself is spared by `kill(-1, …)`.
fn kill_uid(uid: u32) {
    let Some(truebin) = find_tool("true") else {
        return;
    };
    let mut cmd = Command::new(truebin);
    // SAFETY: async-signal-safe calls only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::kill(-1, libc::SIGKILL);
            Ok(())
        });
    }
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Read a stream: keep the first `cap` bytes, drain the rest; flag floods.
fn spawn_reader<R: Read + Send + 'static>(
    mut r: R,
    cap: usize,
    flood: Arc<AtomicBool>,
    tx: mpsc::Sender<(Vec<u8>, bool)>,
) {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut total = 0usize;
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if kept.len() < cap {
                        let take = n.min(cap - kept.len());
                        kept.extend_from_slice(&buf[..take]);
                    }
                    total += n;
                    if total > cap.saturating_mul(DRAIN_FACTOR).max(1 << 20) {
                        flood.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
        let _ = tx.send((kept, total > cap));
    });
}

/// Whether the process `pid` has exited (without reaping it, so its pid — the
/// process group id — cannot be reused before we kill the group).
fn has_exited(pid: libc::pid_t) -> bool {
    // SAFETY: siginfo is plain data; waitid only writes into it.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        r == 0 && info.si_pid() != 0
    }
}

/// Run a Python program in the sandbox and report how it ended.
pub fn run_python(code: &str, limits: &SandboxLimits) -> Result<SandboxOutcome, SandboxError> {
    let interp = resolve_interpreter(limits)?;
    let mode = mode();
    let uid = is_root().then(next_uid);
    let dir = tempfile::Builder::new()
        .prefix("cantante-sbx-")
        .tempdir()
        .map_err(io_err("create temp dir"))?;
    prepare_dir(dir.path(), uid).map_err(io_err("prepare temp dir"))?;
    let prog = dir.path().join("prog.py");
    std::fs::write(&prog, code).map_err(io_err("write program"))?;
    let (prog_arg, isolation) = match mode {
        Mode::Namespaces { .. } => (
            PathBuf::from("/tmp/prog.py"),
            Isolation {
                net_namespace: true,
                pid_namespace: true,
                mount_namespace: true,
                uid,
                rlimits: true,
            },
        ),
        Mode::Plain { net, .. } => (
            prog.clone(),
            Isolation {
                net_namespace: *net,
                uid,
                rlimits: true,
                ..Default::default()
            },
        ),
    };
    let prog_str = prog_arg.to_string_lossy().into_owned();
    let mut cmd = build_command(
        mode,
        &interp,
        &["-I", "-B", &prog_str],
        dir.path(),
        uid,
        limits,
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(io_err("spawn"))?;
    let pid = child.id() as libc::pid_t;
    let flood = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (tx2, rx2) = mpsc::channel();
    if let Some(o) = child.stdout.take() {
        spawn_reader(o, limits.output_bytes, flood.clone(), tx);
    }
    if let Some(e) = child.stderr.take() {
        spawn_reader(e, limits.output_bytes, flood.clone(), tx2);
    }
    let deadline = start + limits.wall;
    let mut timed_out = false;
    let mut flooded = false;
    let mut sleep = Duration::from_millis(1);
    loop {
        if has_exited(pid) {
            break;
        }
        if flood.load(Ordering::SeqCst) {
            flooded = true;
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(20));
    }
    // Kill the whole group (stragglers too; the leader is not reaped yet, so
    // the group id is still ours). In namespace mode the leader's death also
    // kills the namespace's init, and with it every descendant.
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let status = child.wait().map_err(io_err("wait"))?;
    let wall = start.elapsed();
    if let (Mode::Plain { .. }, Some(u)) = (mode, uid) {
        kill_uid(u);
    }
    let grace = Duration::from_secs(2);
    let (out, t1) = rx.recv_timeout(grace).unwrap_or_default();
    let (err, t2) = rx2.recv_timeout(grace).unwrap_or_default();
    let stdout = String::from_utf8_lossy(&out).into_owned();
    let stderr = String::from_utf8_lossy(&err).into_owned();
    let status = if flooded {
        Status::OutputLimit
    } else if timed_out {
        Status::Timeout
    } else {
        classify(status, &stderr, matches!(mode, Mode::Namespaces { .. }))
    };
    tracing::trace!(%status, ?wall, "sandbox run finished");
    Ok(SandboxOutcome {
        status,
        stdout,
        stderr,
        wall,
        truncated: t1 || t2,
        isolation,
    })
}

fn classify(status: std::process::ExitStatus, stderr: &str, via_shell: bool) -> Status {
    let signal = status.signal().or_else(|| {
        // The namespace wrapper (a shell) reports a child's death by signal N as 128+N.
        let c = status.code()?;
        (via_shell && c > 128 && c <= 128 + 64).then_some(c - 128)
    });
    if let Some(sig) = signal {
        return match sig {
            libc::SIGXCPU => Status::CpuLimit,
            _ => Status::Killed(sig),
        };
    }
    match status.code() {
        Some(0) => Status::Ok,
        Some(c) => {
            if last_line(stderr).contains("MemoryError") {
                Status::MemoryExceeded
            } else {
                Status::Failed(c)
            }
        }
        None => Status::Killed(0),
    }
}

/// The last non-empty line of `text`, trimmed.
pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// Verdict of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The assertion held.
    Pass,
    /// The assertion failed (`AssertionError`).
    Fail,
    /// The program ran out of wall or CPU time.
    Timeout,
    /// Any other error (exception, syntax error, crash, early exit).
    Error,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Timeout => "TIMEOUT",
            Verdict::Error => "ERROR",
        })
    }
}

/// Result of one test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// The test statement.
    pub test: String,
    /// Verdict.
    pub verdict: Verdict,
    /// Short detail (the error line), empty on pass.
    pub detail: String,
}

/// Results of running code against a list of tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestReport {
    /// One result per test, in input order.
    pub results: Vec<TestResult>,
    /// Protections active for the runs (None if no run started).
    pub isolation: Option<Isolation>,
}

impl TestReport {
    /// Number of passing tests.
    pub fn passed(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.verdict == Verdict::Pass)
            .count()
    }
    /// Number of tests.
    pub fn total(&self) -> usize {
        self.results.len()
    }
    /// Whether there was at least one test and all passed.
    pub fn all_passed(&self) -> bool {
        !self.results.is_empty() && self.passed() == self.total()
    }
    /// "Passed k/n" followed by one line per test.
    pub fn summary(&self) -> String {
        let mut s = format!("Passed {}/{}", self.passed(), self.total());
        for (i, r) in self.results.iter().enumerate() {
            s.push_str(&format!(
                "\n{}. {} {}",
                i + 1,
                r.verdict,
                shorten(&r.test, 160)
            ));
            if !r.detail.is_empty() {
                s.push_str(&format!(" -- {}", shorten(&r.detail, 200)));
            }
        }
        s
    }
}

/// Cut `s` to at most `n` chars (on a char boundary), marking the cut.
pub fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

/// The program that runs `code`, then `setup` (MBPP's setup code may use the
/// solution's classes, e.g. task 367 builds `Node` trees), then one `test`, then writes a marker
/// (so code that exits early, e.g. `sys.exit(0)`, cannot pass a test).
pub fn test_program(code: &str, setup: &str, test: &str) -> String {
    format!(
        "{code}\n\n{setup}\n{test}\nimport sys as _cantante_sys\n_cantante_sys.stdout.flush()\n_cantante_sys.stderr.write('\\n{DONE_MARKER}\\n')\n"
    )
}

/// Run `code + setup + test` for each test, each in its own sandboxed program
/// (in parallel), so a hanging test cannot hide the others' results.
pub fn run_tests(code: &str, setup: &str, tests: &[String], limits: &SandboxLimits) -> TestReport {
    let runs: Vec<(TestResult, Option<Isolation>)> = tests
        .par_iter()
        .map(|t| {
            let prog = test_program(code, setup, t);
            match run_python(&prog, limits) {
                Ok(o) => (judge(t, &o), Some(o.isolation)),
                Err(e) => (
                    TestResult {
                        test: t.clone(),
                        verdict: Verdict::Error,
                        detail: e.to_string(),
                    },
                    None,
                ),
            }
        })
        .collect();
    let isolation = runs.iter().find_map(|(_, i)| *i);
    TestReport {
        results: runs.into_iter().map(|(r, _)| r).collect(),
        isolation,
    }
}

fn judge(test: &str, o: &SandboxOutcome) -> TestResult {
    let err_line = || shorten(last_line(&o.stderr), 200);
    let (verdict, detail) = match o.status {
        Status::Ok if o.stderr.contains(DONE_MARKER) => (Verdict::Pass, String::new()),
        Status::Ok => (
            Verdict::Error,
            "program exited before the test ran".to_string(),
        ),
        Status::Timeout | Status::CpuLimit => (Verdict::Timeout, o.status.to_string()),
        Status::Failed(_) if last_line(&o.stderr).starts_with("AssertionError") => {
            (Verdict::Fail, err_line())
        }
        Status::Failed(_) => (Verdict::Error, err_line()),
        other => (Verdict::Error, other.to_string()),
    };
    TestResult {
        test: test.to_string(),
        verdict,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> SandboxLimits {
        SandboxLimits {
            wall: Duration::from_secs(5),
            cpu_secs: 5,
            ..Default::default()
        }
    }

    #[test]
    fn runs_hello() {
        let o = run_python("print('hello')", &quick()).unwrap();
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert_eq!(o.stdout, "hello\n");
        assert!(!o.truncated);
    }

    #[test]
    fn reports_exit_code_and_stderr() {
        let o = run_python(
            "import sys\nprint('x', file=sys.stderr)\nsys.exit(3)",
            &quick(),
        )
        .unwrap();
        assert_eq!(o.status, Status::Failed(3));
        assert_eq!(o.stderr.trim(), "x");
    }

    #[test]
    fn tests_pass_fail_error_and_early_exit() {
        let code = "def add(a, b):\n    return a + b\n";
        let tests: Vec<String> = vec![
            "assert add(1, 2) == 3".into(),
            "assert add(1, 2) == 4".into(),
            "assert mul(1, 2) == 2".into(),
        ];
        let r = run_tests(code, "", &tests, &quick());
        let v: Vec<Verdict> = r.results.iter().map(|r| r.verdict).collect();
        assert_eq!(v, [Verdict::Pass, Verdict::Fail, Verdict::Error]);
        assert!(
            r.results[2].detail.contains("NameError"),
            "{:?}",
            r.results[2]
        );
        assert!(r.summary().starts_with("Passed 1/3"));
        assert!(!r.all_passed());
        let cheat = run_tests("import sys\nsys.exit(0)", "", &tests[..1], &quick());
        assert_eq!(cheat.results[0].verdict, Verdict::Error);
        let setup = run_tests(
            "def f(): return X",
            "X = 5",
            &["assert f() == 5".into()],
            &quick(),
        );
        assert!(setup.all_passed(), "{}", setup.summary());
    }
}
