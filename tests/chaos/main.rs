//! The chaos suite: the shop under steady load (every context in its own process, real
//! nats-server, real sled files), one fault per scenario, then drain and `verify`.
//!
//! Each scenario reports orders placed, completed and cancelled, orders lost (never
//! terminal), invariant violations (from `choreo verify`, plus the scenario's own checks),
//! the time to recover after the fault ended (until the first order placed after it
//! completed) and the time to drain (until every order placed before it had ended). The
//! table is printed and written as JSON (`CHOREO_CHAOS_OUT`, default
//! `target/chaos/summary.json`).
//!
//! `cargo test --test chaos` runs the short matrix (the default test command runs it in CI);
//! `CHOREO_CHAOS=full` runs every scenario, for each seed in `CHOREO_CHAOS_SEEDS` (`make
//! chaos`). The `without_*` tests switch one mechanism off (`[danger]`) and show that the
//! same kind of fault then loses or doubles orders.

#[path = "../integration/harness.rs"]
#[allow(dead_code)]
mod harness;
mod proxy;
mod scenarios;

use scenarios::{Fault, Outcome, Scenario};

/// One chaos run at a time: each starts nats-server, five nodes and the simulators.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn seeds(default: &[u64]) -> Vec<u64> {
    std::env::var("CHOREO_CHAOS_SEEDS")
        .ok()
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().parse().expect("CHOREO_CHAOS_SEEDS: numbers"))
                .collect()
        })
        .unwrap_or_else(|| default.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_matrix() {
    let _one = SERIAL.lock().await;
    let full = std::env::var("CHOREO_CHAOS").is_ok_and(|v| v == "full");
    let matrix = if full {
        scenarios::full()
    } else {
        scenarios::short()
    };
    let only = std::env::var("CHOREO_CHAOS_ONLY").ok();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for seed in seeds(if full { &[1, 2] } else { &[1] }) {
        for s in matrix
            .iter()
            .filter(|s| only.as_deref().is_none_or(|o| s.name.contains(o)))
        {
            eprintln!("chaos: {} (seed {seed})", s.name);
            let o = scenarios::run(s, seed).await;
            eprintln!("  -> {}", o.line());
            outcomes.push(o);
        }
    }
    scenarios::report(&outcomes, if full { "full" } else { "short" });
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(Outcome::line)
        .collect();
    assert!(
        failed.is_empty(),
        "scenarios failed:\n{}",
        failed.join("\n")
    );
}

/// Runs `s` with one mechanism switched off; it must lose or double something.
async fn without(s: Scenario) -> Outcome {
    let _one = SERIAL.lock().await;
    let o = scenarios::run(&s, 1).await;
    eprintln!("{}", o.line());
    assert!(
        o.error.is_none(),
        "the scenario itself must run: {:?}",
        o.error
    );
    o
}

/// `crash-after_commit-orders` on a `PlaceOrder`, with one `[danger]` switch on.
fn crash_after_placing_an_order(suffix: &str, switch: &str) -> Scenario {
    Scenario::new(
        &format!("crash-after_commit-{suffix}"),
        Fault::Crash {
            context: "orders",
            point: "after-commit",
            msg_type: Some("PlaceOrder"),
        },
    )
    .danger(switch)
}

/// The inbox: replayed commands and events (same `Choreo-Id`, new `Nats-Msg-Id`, so the
/// server's duplicate window does not catch them). With the inbox, `replays` has 0
/// violations; without it a replayed `AddStock` is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_inbox_replays_double_effects() {
    let o =
        without(Scenario::new("replays-no-inbox", Fault::Replays).danger("disable_inbox = true"))
            .await;
    assert!(
        o.violations > 0,
        "replays without the inbox must double something: {}",
        o.line()
    );
}

/// The outbox: a crash after the commit, before anything was published. With the outbox
/// the entries are published by the next start (`crash-after_commit`: 0 violations);
/// without it the order's events are gone and the order never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_outbox_a_crash_after_commit_loses_orders() {
    let o = without(crash_after_placing_an_order(
        "no-outbox",
        "disable_outbox = true",
    ))
    .await;
    assert!(
        o.lost > 0,
        "a crash after commit without the outbox must lose orders: {}",
        o.line()
    );
}

/// The group commit (durable before ack): a crash right after the commit of a
/// `PlaceOrder`. With it the commit is on disk before the ack, and the next start publishes
/// the outbox (`crash-after_commit-orders`: 0 lost); without it the message was acked from
/// memory, so the order is neither stored nor redelivered. (`kill -9` at a random moment
/// shows the same only when it falls between an ack and sled's next background flush.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_group_commit_a_crash_after_the_ack_loses_orders() {
    let o = without(crash_after_placing_an_order(
        "no-group-commit",
        "disable_group_commit = true",
    ))
    .await;
    assert!(
        o.lost + o.violations > 0,
        "a crash after an ack from memory must lose orders: {}",
        o.line()
    );
}
