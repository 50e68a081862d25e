//! An application built on the runtime from outside this workspace: a crate made in a
//! temporary directory, with the runtime as a path dependency and no patch section, built
//! by cargo and run as a node against a real nats-server. Its aggregate decides commands sent
//! with `choreo send`, its saga's deadline fires (or is cancelled by a return), bad input
//! is dead-lettered, and `choreo saga` and `choreo dlq` work on it.
//!
//! The application is `tests/sdk/loans.rs`; it is built in `target/sdk` (its own target
//! directory: the one this test runs from is locked by `cargo test`), offline, with this
//! workspace's lock file, so it uses the versions the workspace was tested with.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use choreo::procs::{free_port, NatsServer, Proc};

/// Builds `tests/sdk/loans.rs` as a crate of its own and runs its test; returns its binary.
fn build_out_of_tree(root: &Path, dir: &Path) -> std::path::PathBuf {
    let app = dir.join("loans");
    std::fs::create_dir_all(app.join("src")).unwrap();
    let manifest = format!(
        "[package]\nname = \"loans\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [dependencies]\nruntime = {{ path = {:?} }}\n\
         serde = {{ version = \"1\", features = [\"derive\"] }}\nserde_json = \"1\"\n\n\
         [profile.dev]\ndebug = 0\n",
        root.join("runtime").display().to_string()
    );
    assert!(!manifest.contains("[patch"));
    std::fs::write(app.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(root.join("tests/sdk/loans.rs"), app.join("src/main.rs")).unwrap();
    std::fs::copy(root.join("Cargo.lock"), app.join("Cargo.lock")).unwrap();
    let target = root.join("target/sdk");
    let cargo = |command: &str| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([command, "--offline"])
            .current_dir(&app)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("run cargo");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "cargo {command}:\n{text}{err}");
        text
    };
    cargo("build");
    // Its given/when/then tests of the saga and the aggregate.
    let tested = cargo("test");
    for test in [
        "a_loan_is_overdue_once_its_due_date_passes",
        "a_book_is_lent_once_and_a_returned_loan_is_not_overdue",
    ] {
        assert!(tested.contains(&format!("{test} ... ok")), "{tested}");
    }
    target.join("debug/loans")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_tree_crate_runs_a_context_and_a_saga_whose_deadline_fires() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let bin = build_out_of_tree(root, dir.path());

    let nats = NatsServer::start(&dir.path().join("nats"), None, false).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data").display().to_string();
    let log = dir.path().join("loans.log");
    let args = ["--context", "loans", "--nats", &nats.url, "--data", &data];
    let args: Vec<String> = args
        .iter()
        .chain(&["--metrics", metrics.as_str()])
        .map(|s| s.to_string())
        .collect();
    let mut node = Proc::spawn("loans", &bin, &args, &log, &[]).unwrap();
    let node_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // `choreo` with this server: the operator tools work on any application's node.
    let choreo = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_choreo"))
            .args(args)
            .args(["--nats", &nats.url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "choreo {args:?}: {text}{err}");
        text
    };
    let bus = runtime::client::connect(&nats.url, Duration::from_secs(15))
        .await
        .unwrap();
    let loan = |id: &str| {
        let bus = bus.clone();
        let req = serde_json::json!({ "loan": id });
        async move { runtime::client::query(&bus, "loans", "loan", req).await }
    };
    let until = Instant::now() + Duration::from_secs(30);
    while loan("l-1").await.is_err() {
        assert!(Instant::now() < until, "no answer:\n{}", node_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A loan returned in time: the saga ends, its deadline with it.
    choreo(&[
        "send",
        "loans",
        "LendBook",
        r#"{"loan": "l-2", "book": "Emma", "due_in_ms": 1500}"#,
    ]);
    choreo(&["send", "loans", "ReturnBook", r#"{"loan": "l-2"}"#]);
    let lend = r#"{"loan": "l-1", "book": "Dune", "due_in_ms": 1500}"#;
    choreo(&["send", "loans", "LendBook", lend]);
    let until = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let state = loan("l-1").await.unwrap();
        let status = (state["book"].clone(), state["overdue"].clone());
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status.1 == true {
            break;
        }
        assert!(
            Instant::now() < until,
            "never overdue; states {seen:?}\n{}",
            node_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Lent first, then overdue: the deadline fired, it did not start that way.
    let lent = (serde_json::json!("Dune"), serde_json::json!(false));
    assert!(seen.contains(&lent), "{seen:?}");
    let query = choreo(&["query", "loans", "loan", r#"{"loan": "l-1"}"#]);
    assert!(query.contains(r#""overdue": true"#), "{query}");
    let returned = loan("l-2").await.unwrap();
    assert_eq!(
        (&returned["returned"], &returned["overdue"]),
        (&serde_json::json!(true), &serde_json::json!(false)),
        "{returned}"
    );

    // The saga's graph and history come from its node, not from a list in the CLI.
    let graph = choreo(&["saga", "graph", "due-date"]);
    assert!(graph.contains("Lent --> Overdue: deadline:due"), "{graph}");
    let show = choreo(&["saga", "show", "l-1", "--saga", "due-date", "--json"]);
    let saga: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(saga["status"], "Overdue", "{saga}");
    let last = saga["history"].as_array().unwrap().last().unwrap().clone();
    let step = ["trigger", "from", "to"].map(|k| last[k].as_str().unwrap_or(""));
    assert_eq!(step, ["deadline", "Lent", "Overdue"], "{saga}");
    // Without --saga: the one saga the running nodes host.
    let show = choreo(&["saga", "show", "l-2", "--json"]);
    let saga: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(saga["status"], "Returned", "{saga}");

    // Bad input to the application's context is dead-lettered with its reason.
    choreo(&["send", "loans", "LendBook", r#"{"loan": 7}"#]);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let dlq = choreo(&["dlq", "list", "--context", "loans"]);
        if dlq.contains("LendBook") && dlq.contains("malformed") {
            break;
        }
        assert!(
            Instant::now() < until,
            "not dead-lettered: {dlq}\n{}",
            node_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let status = node.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status:?}\n{}", node_log());
}

/// The application stays small: at most 150 lines of code, at most 20% of them wiring
/// rather than the domain, as `scripts/count-code.py` counts them (its doc says how).
#[test]
fn the_application_is_small_and_mostly_domain() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("scripts/count-code.py"))
        .arg(root.join("tests/sdk/loans.rs"))
        .args(["--max-lines", "150", "--max-boilerplate", "20"])
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
}

/// docs/guide.md shows, block after block, the whole of `tests/sdk/loans.rs`: the guide's
/// code is the code the test above builds and runs.
#[test]
fn the_guide_shows_the_code_the_test_builds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/guide.md")).unwrap();
    let code = std::fs::read_to_string(root.join("tests/sdk/loans.rs")).unwrap();
    let mut blocks: Vec<String> = Vec::new();
    let mut open: Option<String> = None;
    for line in guide.lines() {
        match (&mut open, line) {
            (None, "```rust") => open = Some(String::new()),
            (Some(_), "```") => blocks.push(open.take().unwrap()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(blocks.len() > 3, "{} rust blocks", blocks.len());
    assert!(
        blocks.join("\n") == code,
        "docs/guide.md's rust blocks are not tests/sdk/loans.rs: update the guide"
    );
}
