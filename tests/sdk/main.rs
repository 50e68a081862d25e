//! An application built on the runtime from outside this workspace: a crate made in a
//! temporary directory, with the runtime as a path dependency and no patch section, built
//! by cargo and run as a node against a real nats-server. Its saga's deadline fires.
//!
//! The application is `tests/sdk/loans.rs`; it is built in `target/sdk` (its own target
//! directory: the one this test runs from is locked by `cargo test`), offline, with this
//! workspace's lock file, so it uses the versions the workspace was tested with.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use choreo::procs::{free_port, NatsServer, Proc};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct LendBook {
    loan: String,
    book: String,
    due_in_ms: u64,
}
runtime::message!(LendBook, Command);

/// Builds `tests/sdk/loans.rs` as a crate of its own; returns its binary.
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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--offline"])
        .current_dir(&app)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "the out-of-tree crate does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

    let bus = choreo::client::connect(&nats.url, Duration::from_secs(15))
        .await
        .unwrap();
    let loan = |id: &str| {
        let bus = bus.clone();
        let req = serde_json::json!({ "loan": id });
        async move { choreo::client::query(&bus, "loans", "loan", req).await }
    };
    let until = Instant::now() + Duration::from_secs(30);
    while loan("l-1").await.is_err() {
        assert!(
            Instant::now() < until,
            "the node never answered:\n{}",
            node_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let lend = LendBook {
        loan: "l-1".into(),
        book: "Dune".into(),
        due_in_ms: 1_500,
    };
    choreo::client::send_command(&bus, "loans", &lend)
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let status = loan("l-1").await.unwrap()["status"].clone();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "overdue" {
            break;
        }
        assert!(
            Instant::now() < until,
            "never overdue; statuses {seen:?}\n{}",
            node_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Lent first, then overdue: the deadline fired, it did not start that way.
    assert!(seen.contains(&serde_json::json!("lent")), "{seen:?}");

    let saga = choreo::client::saga(&bus, "loan", "show", serde_json::json!({ "id": "l-1" }))
        .await
        .unwrap();
    assert_eq!(saga["status"], "Overdue", "{saga}");
    let history = saga["history"].as_array().unwrap();
    let last = history.last().unwrap();
    assert_eq!(
        (
            last["trigger"].as_str(),
            last["from"].as_str(),
            last["to"].as_str()
        ),
        (Some("deadline"), Some("Lent"), Some("Overdue")),
        "{saga}"
    );

    let status = node.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status:?}\n{}", node_log());
}
