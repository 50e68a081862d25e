//! Children die with their parent: `kill -9` of `choreo demo` leaves no nats-server, node or
//! simulator running (Linux: the parent-death signal set in `procs::Proc::spawn`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `(parent pid, state)` of a process from `/proc/<pid>/stat`; `None` once it is gone.
fn stat(pid: u32) -> Option<(u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let mut rest = s[s.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, state))
}

/// The pids of the running children of `parent`.
fn children(parent: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| stat(*pid).is_some_and(|(ppid, _)| ppid == parent))
        .collect();
    out.sort_unstable();
    out
}

/// Running: it exists and is not a zombie (a killed child whose new parent does not reap).
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state)| state != 'Z' && state != 'X')
}

#[test]
fn kill_9_of_the_demo_takes_its_children_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = std::fs::File::create(dir.path().join("demo.stderr")).unwrap();
    let bin = std::env::var("CHOREO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_choreo").into());
    let mut demo = Command::new(bin)
        .args(["demo", "--orders", "3", "--keep-running", "--dir"])
        .arg(dir.path().join("demo"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start choreo demo");
    let (tx, rx) = mpsc::channel();
    let stdout = demo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("still running") => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = demo.kill();
                let err = std::fs::read_to_string(dir.path().join("demo.stderr"));
                panic!(
                    "the demo did not reach --keep-running:\n{}\n{}",
                    seen.join("\n"),
                    err.unwrap_or_default()
                );
            }
        }
    }
    let kids = children(demo.id());
    // nats-server, five nodes, the simulators.
    assert!(kids.len() >= 7, "children of the demo: {kids:?}");

    demo.kill().unwrap();
    demo.wait().unwrap();
    let gone_by = Instant::now() + Duration::from_secs(5);
    while kids.iter().any(|p| alive(*p)) && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = kids.iter().copied().filter(|p| alive(*p)).collect();
    for pid in &left {
        // Clean up after a failure: these are this test's grandchildren.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(
        left.is_empty(),
        "children still running 5 s after kill -9 of their parent: {left:?} of {kids:?}"
    );
}
