//! Bad command lines and bad configuration get a clear error and exit code 2, never a panic
//! or a half-started node.

use std::process::Command;

fn choreo(args: &[&str]) -> (i32, String) {
    let bin = std::env::var("CHOREO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_choreo").into());
    let out = Command::new(bin).args(args).output().expect("run choreo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn unknown_context_is_refused() {
    let (code, out) = choreo(&["node", "--context", "shop", "--nats", "nats://127.0.0.1:1"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("unknown context \"shop\"") && out.contains("customers, orders"),
        "{out}"
    );
}

#[test]
fn node_without_context_is_refused() {
    let (code, out) = choreo(&["node", "--nats", "nats://127.0.0.1:1"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no context to host"), "{out}");
}

#[test]
fn bad_config_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "contexts = [\"orders\"]\nack_wait = 5\n").unwrap();
    let (code, out) = choreo(&["node", "--config", unknown.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("is not valid") && out.contains("ack_wait"),
        "{out}"
    );

    let unsafe_wait = dir.path().join("wait.toml");
    std::fs::write(
        &unsafe_wait,
        "contexts = [\"orders\"]\n[consumer]\nack_wait = \"1s\"\n",
    )
    .unwrap();
    let (code, out) = choreo(&["node", "--config", unsafe_wait.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("at least 3x external_timeout"), "{out}");

    // Durations are written with their unit.
    let bare = dir.path().join("bare.toml");
    std::fs::write(
        &bare,
        "contexts = [\"orders\"]\n[consumer]\nack_wait = 30\n",
    )
    .unwrap();
    let (code, out) = choreo(&["node", "--config", bare.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("30 has no unit"), "{out}");

    let (code, out) = choreo(&["node", "--config", "/nonexistent/choreo.toml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot read config file"), "{out}");
}

#[test]
fn bad_arguments_are_refused() {
    let (code, out) = choreo(&["load", "--fail-stock", "150"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a percentage"), "{out}");
    let (code, out) = choreo(&["node", "--context", "orders", "--metrics", "nowhere"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not host:port"), "{out}");
    let (code, out) = choreo(&["sim", "--payment-failure-rate", "2"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a rate"), "{out}");
    // Durations on the command line say their unit, as in the config.
    let (code, out) = choreo(&["load", "--timeout", "60"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a duration"), "{out}");
    // A command's payload is a JSON object, checked before anything is sent.
    let (code, out) = choreo(&["send", "loans", "LendBook", "{oops"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not JSON"), "{out}");
    let (code, out) = choreo(&["query", "loans", "loan", "[1]"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a JSON object"), "{out}");
}

/// A refused connection is retried, and says so while it waits.
#[test]
fn unreachable_nats_is_a_clear_error() {
    let (code, out) = choreo(&["orders", "show", "o1", "--nats", "nats://127.0.0.1:1"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{out}"
    );
    assert!(
        out.contains("NATS at nats://127.0.0.1:1 refused the connection; retrying for"),
        "{out}"
    );
}

/// A URL that cannot work fails at once, naming the URL, from the CLI and from a node.
#[test]
fn a_bad_nats_url_fails_at_once() {
    let within = std::time::Duration::from_secs(2);
    let started = std::time::Instant::now();
    let (code, out) = choreo(&["verify", "--nats", "foo://bar"]);
    assert!(started.elapsed() < within, "{:?}: {out}", started.elapsed());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("cannot connect to NATS at foo://bar: not a NATS URL"),
        "{out}"
    );
    assert!(!out.contains("retrying"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", choreo::procs::free_port());
    let started = std::time::Instant::now();
    let (code, out) = choreo(&[
        "node",
        "--context",
        "inventory",
        "--nats",
        "foo://bar",
        "--data",
        dir.path().to_str().unwrap(),
        "--metrics",
        &metrics,
    ]);
    assert!(started.elapsed() < within, "{:?}: {out}", started.elapsed());
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("cannot connect to NATS at foo://bar: not a NATS URL"),
        "{out}"
    );
}
