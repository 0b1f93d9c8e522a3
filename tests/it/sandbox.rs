//! Hostile programs in the code sandbox: each must be contained, reported, and
//! leave no process behind.

use cantante::task::sandbox::{
    run_python, run_tests, SandboxLimits, SandboxOutcome, Status, Verdict,
};
use std::process::Command;
use std::time::{Duration, Instant};

fn limits(secs: u64) -> SandboxLimits {
    SandboxLimits {
        wall: Duration::from_secs(secs),
        cpu_secs: secs,
        ..Default::default()
    }
}

fn marker(name: &str) -> String {
    format!("cantante_it_{name}_{}", std::process::id())
}

/// No process of the run's uid, and none whose command line has `marker`, survives.
fn assert_no_leftovers(o: &SandboxOutcome, marker: &str) {
    assert_no_leftovers_of(o.isolation.uid, marker)
}

fn assert_no_leftovers_of(uid: Option<u32>, marker: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut live = Vec::new();
        if let Some(u) = uid {
            live.extend(live_pids(&["-U", &u.to_string()]));
        }
        live.extend(live_pids(&["-f", marker]));
        if live.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leftover sandbox processes (uid {uid:?}, marker {marker}): {live:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids (with state and command) matched by `pgrep args`, zombies excluded:
/// a zombie runs no code; its reaping is up to the machine's init.
fn live_pids(args: &[&str]) -> Vec<String> {
    let out = Command::new("pgrep").args(args).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            (state != 'Z')
                .then(|| format!("{pid} {state} {}", stat.split(' ').nth(1).unwrap_or("")))
        })
        .collect()
}

#[test]
fn infinite_loop_times_out() {
    let m = marker("loop");
    let t0 = Instant::now();
    let o = run_python(
        &format!("# {m}\nwhile True:\n    pass\n"),
        &SandboxLimits {
            cpu_secs: 30,
            ..limits(2)
        },
    )
    .unwrap();
    assert_eq!(o.status, Status::Timeout, "{o:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    assert_no_leftovers(&o, &m);
}

#[test]
fn cpu_limit_is_reported() {
    let o = run_python(
        "while True:\n    pass\n",
        &SandboxLimits {
            wall: Duration::from_secs(30),
            cpu_secs: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(o.status, Status::CpuLimit, "{o:?}");
    assert!(o.wall < Duration::from_secs(25), "{:?}", o.wall);
}

#[test]
fn fork_bomb_is_contained() {
    let m = marker("forkbomb");
    // Every child re-execs into a process whose argv carries the marker and keeps forking.
    let code = format!(
        "# {m}\nimport os\nn = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n        else:\n            n += 1\n            if n == 3:\n                print('forked', flush=True)\n    except OSError:\n        pass\n"
    );
    let o = run_python(&code, &limits(2)).unwrap();
    assert!(
        matches!(o.status, Status::Timeout | Status::CpuLimit),
        "{o:?}"
    );
    assert!(o.stdout.contains("forked"), "{o:?}");
    assert_no_leftovers(&o, &m);
    // The machine still runs programs.
    let ok = run_python("print('alive')", &limits(5)).unwrap();
    assert_eq!(ok.stdout, "alive\n", "{ok:?}");
}

#[test]
fn memory_hog_is_stopped() {
    let lim = SandboxLimits {
        memory_bytes: 256 << 20,
        ..limits(5)
    };
    let o = run_python(
        "x = []\nwhile True:\n    x.append(bytearray(10**7))\n",
        &lim,
    )
    .unwrap();
    assert_eq!(o.status, Status::MemoryExceeded, "{o:?}");
    assert!(o.stderr.contains("MemoryError"));
    let o = run_python("b = bytearray(2**34)\nprint('allocated')", &lim).unwrap();
    assert_eq!(o.status, Status::MemoryExceeded, "{o:?}");
    assert!(!o.stdout.contains("allocated"));
}

#[test]
fn huge_output_is_capped() {
    let m = marker("flood");
    let lim = SandboxLimits {
        output_bytes: 4096,
        ..limits(10)
    };
    let o = run_python(
        &format!("# {m}\nimport sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
        &lim,
    )
    .unwrap();
    assert_eq!(o.status, Status::OutputLimit, "{o:?}");
    assert!(o.truncated);
    assert_eq!(o.stdout.len(), 4096);
    assert!(o.wall < Duration::from_secs(9), "{:?}", o.wall);
    assert_no_leftovers(&o, &m);
    // Moderate overflow: the program finishes normally, output is cut.
    let o = run_python("print('y' * 20000)\nprint('end')", &lim).unwrap();
    assert_eq!(o.status, Status::Ok);
    assert!(o.truncated && o.stdout.len() == 4096 && !o.stdout.contains("end"));
}

#[test]
fn writes_outside_the_temp_dir_do_not_persist() {
    let pid = std::process::id();
    let targets = [
        format!("/tmp/cantante_escape_{pid}"),
        format!("/var/tmp/cantante_escape_{pid}"),
        format!("/root/cantante_escape_{pid}"),
        format!("{}/cantante_escape_{pid}", env!("CARGO_MANIFEST_DIR")),
    ];
    let code = format!(
        "paths = {targets:?}\nfor p in paths:\n    try:\n        open(p, 'w').write('escaped')\n        print('wrote', p)\n    except Exception as e:\n        print('refused', p, type(e).__name__)\nopen('local.txt', 'w').write('fine')\nprint(open('local.txt').read())\n"
    );
    let o = run_python(&code, &limits(5)).unwrap();
    assert_eq!(o.status, Status::Ok, "{o:?}");
    assert!(
        o.stdout.contains("fine"),
        "the private work dir must be writable: {o:?}"
    );
    for p in &targets {
        assert!(
            !std::path::Path::new(p).exists(),
            "{p} persisted outside the sandbox: {}",
            o.stdout
        );
    }
    // A file-size limit also applies inside the work dir.
    let lim = SandboxLimits {
        file_bytes: 1 << 20,
        ..limits(5)
    };
    let o = run_python(
        "open('big', 'w').write('z' * (4 << 20))\nprint('done')",
        &lim,
    )
    .unwrap();
    assert!(!o.status.success() && !o.stdout.contains("done"), "{o:?}");
}

#[test]
fn network_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket\nfor host, port in [('127.0.0.1', {port}), ('8.8.8.8', 53), ('1.1.1.1', 443)]:\n    s = socket.socket()\n    s.settimeout(1)\n    try:\n        s.connect((host, port))\n        print('CONNECTED', host)\n    except OSError as e:\n        print('blocked', host, e)\n"
    );
    let o = run_python(&code, &limits(8)).unwrap();
    assert_eq!(o.status, Status::Ok, "{o:?}");
    assert!(!o.stdout.contains("CONNECTED"), "{}", o.stdout);
    assert_eq!(o.stdout.matches("blocked").count(), 3, "{}", o.stdout);
    assert!(
        listener.accept().is_err(),
        "the sandbox reached the host's loopback"
    );
    if std::env::var("CANTANTE_REQUIRE_NETNS").is_ok() {
        assert!(o.isolation.net_namespace);
    }
}

#[test]
fn environment_secrets_are_not_visible() {
    // SAFETY (edition 2021): set_var is fine; no test reads this variable concurrently.
    std::env::set_var("CANTANTE_SECRET", "hunter2-do-not-leak");
    let code = "import os\nprint(sorted(os.environ))\nprint(os.environ.get('CANTANTE_SECRET'))\nfor p in ['/proc/1/environ', '/proc/self/environ']:\n    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print('denied', p)\n";
    let o = run_python(code, &limits(5)).unwrap();
    assert_eq!(o.status, Status::Ok, "{o:?}");
    assert!(!o.stdout.contains("hunter2"), "{}", o.stdout);
    assert!(o.stdout.contains("None"));
}

#[test]
fn detached_children_die_with_the_run() {
    let m = marker("detached");
    let code = format!(
        "# {m}\nimport os, sys, time\nc = os.fork()\nif c == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\ntime.sleep(0.3)\nos.kill(c, 0)\nprint('child alive', flush=True)\n"
    );
    let o = run_python(&code, &limits(5)).unwrap();
    assert_eq!(o.status, Status::Ok, "{o:?}");
    assert!(o.stdout.contains("child alive"), "{o:?}");
    assert_no_leftovers(&o, &m);
}

#[test]
fn a_hanging_test_does_not_hide_the_others() {
    let code = "def f(x):\n    if x == 0:\n        while True:\n            pass\n    return x\n";
    let tests: Vec<String> = vec![
        "assert f(1) == 1".into(),
        "assert f(0) == 0".into(),
        "assert f(2) == 3".into(),
    ];
    let r = run_tests(code, "", &tests, &limits(3));
    let v: Vec<Verdict> = r.results.iter().map(|t| t.verdict).collect();
    assert_eq!(
        v,
        [Verdict::Pass, Verdict::Timeout, Verdict::Fail],
        "{}",
        r.summary()
    );
}

#[test]
fn cli_reports_verdicts_and_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let code = d.path().join("sol.py");
    let tests = d.path().join("tests.txt");
    std::fs::write(&code, "def double(x):\n    return 2 * x\nprint('loaded')\n").unwrap();
    std::fs::write(&tests, "assert double(2) == 4\nassert double(3) == 7\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_cantante");
    let out = Command::new(bin)
        .args(["sandbox", "--code"])
        .arg(&code)
        .args(["--timeout", "5"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("status: ok") && s.contains("loaded") && s.contains("isolation:"),
        "{s}"
    );
    let out = Command::new(bin)
        .args(["sandbox", "--code"])
        .arg(&code)
        .arg("--tests")
        .arg(&tests)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert!(
        s.contains("Passed 1/2") && s.contains("FAIL assert double(3) == 7"),
        "{s}"
    );
    let out = Command::new(bin)
        .args(["sandbox", "--code", "/nonexistent/x.py"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        e.starts_with("error: cannot read --code /nonexistent/x.py"),
        "{e}"
    );
}

#[test]
fn degraded_mode_without_namespaces_still_cleans_up() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the degraded mode can only kill escaped children when run as root");
        return;
    }
    let m = marker("degraded");
    let d = tempfile::tempdir().unwrap();
    let code = d.path().join("detach.py");
    std::fs::write(
        &code,
        format!("# {m}\nimport os, sys, time\nc = os.fork()\nif c == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\ntime.sleep(0.3)\nos.kill(c, 0)\nprint('child alive', flush=True)\nprint('uid', os.getuid())\n"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_cantante");
    let out = Command::new(bin)
        .env("CANTANTE_SANDBOX_NAMESPACES", "0")
        .args(["sandbox", "--timeout", "5", "--code"])
        .arg(&code)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("isolation: rlimits, uid ") && !s.contains("pid-ns"),
        "{s}"
    );
    assert!(s.contains("child alive"), "{s}");
    let uid: u32 = s
        .lines()
        .find_map(|l| l.strip_prefix("uid "))
        .and_then(|u| u.trim().parse().ok())
        .expect("uid line");
    assert!(uid >= 1_000_000, "{s}");
    assert_no_leftovers_of(Some(uid), &m);
    std::fs::write(&code, format!("# {m}\nwhile True:\n    pass\n")).unwrap();
    let out = Command::new(bin)
        .env("CANTANTE_SANDBOX_NAMESPACES", "0")
        .args(["sandbox", "--timeout", "1", "--code"])
        .arg(&code)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert!(s.contains("status: timeout"), "{s}");
}
