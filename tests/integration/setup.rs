//! The set-up the two commands run: `make demo` installs only what the demo needs
//! (nats-server), `make test` also Prometheus; no set-up script stops processes it did not
//! start.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The commands `make <target>` would run (`make -n`: printed, not run).
fn make_dry_run(target: &str) -> String {
    let out = Command::new("make")
        .args(["-n", target])
        .current_dir(root())
        .output()
        .expect("run make -n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_demo_installs_only_nats_server_and_the_tests_prometheus_too() {
    let demo = make_dry_run("demo");
    assert!(demo.contains("install-nats.sh"), "{demo}");
    assert!(!demo.contains("install-prometheus.sh"), "{demo}");
    let test = make_dry_run("test");
    assert!(
        test.contains("install-nats.sh") && test.contains("install-prometheus.sh"),
        "{test}"
    );
}

#[test]
fn set_up_scripts_kill_nothing() {
    for entry in std::fs::read_dir(root().join("scripts")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sh") {
            let text = std::fs::read_to_string(&path).unwrap();
            for word in ["pkill", "killall", "kill "] {
                assert!(
                    !text
                        .lines()
                        .any(|l| !l.trim_start().starts_with('#') && l.contains(word)),
                    "{} runs {word}",
                    path.display()
                );
            }
        }
    }
}

/// The runtime's rooms import each other without a cycle, and no file of it is over 600
/// lines (`scripts/module-graph.py`, which ARCHITECTURE.md describes).
#[test]
fn the_runtime_has_no_import_cycle() {
    let out = std::process::Command::new("python3")
        .arg(root().join("scripts/module-graph.py"))
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("no cycle between rooms"), "{text}");
    assert!(text.contains("files over 600 lines: none"), "{text}");
}
