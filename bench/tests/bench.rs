//! `choreo-bench` end to end, kept short: the whole shop in separate processes, one short
//! phase of each kind, the JSON report read back. (Its numbers are measured, not asserted:
//! performance targets live in the benchmark itself.)
//!
//! The bench starts the shop with the `choreo` binary next to its own, so this test needs
//! it built in the same profile: `cargo test --workspace` builds every binary of the
//! workspace; for this package alone, `cargo build --bin choreo` first.

use std::path::Path;
use std::process::Command;

use choreo_bench::report::Report;

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

#[test]
fn bench_reports_every_phase_and_the_stages_of_the_fixed_rate_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.json");
    let bench = Path::new(env!("CARGO_BIN_EXE_choreo-bench"));
    let choreo = bench.with_file_name("choreo");
    assert!(
        choreo.is_file() || std::env::var_os("CHOREO_BIN").is_some(),
        "no {}: build it (`cargo build --bin choreo`) or set CHOREO_BIN",
        choreo.display()
    );
    let run = Command::new(bench)
        .arg("--dir")
        .arg(dir.path().join("work"))
        .args([
            "--max-duration",
            "2s",
            "--concurrency",
            "32",
            "--rates",
            "40",
        ])
        .args(["--rate-duration", "3s", "--sync", "default", "--out"])
        .arg(&out)
        .output()
        .expect("run choreo-bench");
    let text =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{text}");
    assert!(text.contains("stages, rate-40 sync=default"), "{text}");

    let report: Report = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let names: Vec<&str> = report.phases.iter().map(|p| p.phase.as_str()).collect();
    assert_eq!(names, ["max", "rate-40"]);
    for p in &report.phases {
        assert!(p.placed > 0, "{}: nothing placed", p.phase);
        assert_eq!(p.unfinished, 0, "{}", p.phase);
        assert_eq!(p.completed + p.cancelled, p.placed, "{}", p.phase);
        assert!(
            p.cpu_seconds["orders"] > 0.0,
            "{}: {:?}",
            p.phase,
            p.cpu_seconds
        );
    }
    // The host's probe, taken before the shop started, and the machine's CPU per phase.
    let host = report.host.as_ref().expect("the host probe");
    assert!(
        host.cpu_loop_ms > 0.0 && host.wake_round_trip_us_p50 > 0.0,
        "{host:?}"
    );
    assert!(text.contains("host: cpu loop"), "{text}");
    for p in &report.phases {
        let cpu = p.machine_cpu.expect("the machine's CPU during the phase");
        // The shop was running orders: some of a core at least, never more than all of them.
        assert!(
            cpu.cores_busy > 0.0 && cpu.cores_busy <= cores(),
            "{}: {cpu:?}",
            p.phase
        );
        assert!(
            (0.0..=100.0).contains(&cpu.steal_pct),
            "{}: {cpu:?}",
            p.phase
        );
        // And second by second, from the phase's first order on.
        assert!(!p.machine_by_second.is_empty(), "{}", p.phase);
        for s in &p.machine_by_second {
            assert!(s.usage.cores_busy <= cores(), "{}: {s:?}", p.phase);
            assert!(
                s.second <= p.seconds.ceil() as u64 + 1,
                "{}: {s:?}",
                p.phase
            );
        }
    }
    assert!(
        report.phases[0].stages.is_none(),
        "the max phase has no stages"
    );
    // The fixed-rate phase started once the max phase's message ids had left the 10 s
    // duplicate window (the max phase has no read-back to wait through) and after a `sync`.
    assert_eq!(report.phases[0].settled_seconds, 0.0);
    assert!(
        report.phases[1].settled_seconds >= 9.0,
        "settled {} s",
        report.phases[1].settled_seconds
    );

    let rate = &report.phases[1];
    let stages = rate
        .stages
        .as_ref()
        .expect("stages of the fixed-rate phase");
    let stage = |source: &str, t: &str| {
        stages
            .stages
            .iter()
            .find(|s| s.source == source && s.msg_type == t)
            .unwrap_or_else(|| panic!("no stage {source} {t}: {stages:?}"))
    };
    // Every order's messages were read back: one OrderPlaced and one terminal event each.
    assert_eq!(stage("orders", "OrderPlaced").messages, rate.placed);
    assert_eq!(stage("orders", "OrderCompleted").messages, rate.completed);
    for s in &stages.stages {
        assert!(s.to_stream_ms.p50 >= 0.0, "{s:?}");
        assert!(s.to_stream_ms.p99 >= s.to_stream_ms.p50, "{s:?}");
    }
    // A handler's event has a cause in the phase; the client's PlaceOrder does not.
    assert!(stage("payments", "PaymentAuthorized")
        .from_cause_ms
        .is_some());
    assert!(stage("client", "PlaceOrder").from_cause_ms.is_none());
    // The slowest 1% of the orders, each blamed on one stage.
    assert_eq!(stages.slowest_orders, rate.placed.div_ceil(100));
    assert_eq!(
        stages.slowest_by_stage.values().sum::<usize>(),
        stages.slowest_orders
    );
    // Latency by second of placing: every order in one of the phase's seconds (3, or 4 if
    // the last order was placed late).
    assert!(
        text.contains("p99 of the orders placed in each second"),
        "{text}"
    );
    let seconds: Vec<u64> = rate.by_second.iter().map(|s| s.second).collect();
    assert!(
        seconds.starts_with(&[0, 1, 2]) && seconds.len() <= 4,
        "{:?}",
        rate.by_second
    );
    assert_eq!(
        rate.by_second.iter().map(|s| s.orders).sum::<usize>(),
        rate.completed + rate.cancelled
    );
    for s in &rate.by_second {
        assert!(s.p50_ms <= s.p99_ms && s.p99_ms <= s.max_ms, "{s:?}");
    }
}
