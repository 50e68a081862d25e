//! The shop's order flow end to end across one process per context.

use std::time::Duration;

use choreo::load::{self, LoadConfig};
use choreo::verify;

use crate::harness;

pub(crate) fn mix(orders: usize, rate: f64) -> LoadConfig {
    LoadConfig {
        orders,
        rate,
        concurrency: 128,
        customers: 10,
        fail_stock_pct: 10.0,
        fail_payment_pct: 10.0,
        fail_shipping_pct: 5.0,
        timeout: Duration::from_secs(60),
        max_duration: None,
        seed: 42,
    }
}

/// Places `orders` of the mix as fast as they complete; every one ends as set up and
/// `verify` finds no violation.
async fn run_and_verify(t: &harness::TestShop, orders: usize) -> load::LoadReport {
    let report = load::run(&t.bus, &mix(orders, 0.0), |_| {})
        .await
        .expect("load runs");
    assert_eq!(report.unfinished, 0);
    assert!(report.ok(), "{:?}", report.unexpected);
    let v = verify::run(&t.bus, Some(&report.run_id)).await.unwrap();
    assert_eq!(v.violations(), 0, "{:#?}", v.checks);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_orders_end_completed_or_cancelled_with_effects_once() {
    let mut t = harness::start(choreo::contexts::KNOWN, true, "").await;
    let report = load::run(&t.bus, &mix(200, 0.0), |_| {})
        .await
        .expect("load runs");
    assert_eq!(report.placed, 200);
    assert_eq!(report.unfinished, 0, "every order reaches a terminal state");
    assert_eq!(report.completed + report.cancelled, 200);
    assert!(
        report.unexpected.is_empty(),
        "orders ended otherwise than set up: {:?}",
        report.unexpected
    );
    let failing = report
        .orders
        .iter()
        .filter(|(_, k)| *k != load::Kind::Normal)
        .count();
    assert!(
        failing > 20 && report.completed > 100,
        "the mix has both outcomes: {failing} set to fail"
    );
    assert_eq!(report.cancelled, failing);

    let v = verify::run(&t.bus, Some(&report.run_id))
        .await
        .expect("verify");
    assert!(v.ledgers_checked, "gateway and carrier ledgers reachable");
    assert_eq!(v.orders, 200);
    // Completed orders: stock committed, payment captured exactly once at the gateway, one
    // dispatch; cancelled orders: stock released or never reserved, nothing captured.
    for name in ["terminal", "agreement", "money", "once"] {
        assert_eq!(v.checks[name].checked, 200, "{name} checked every order");
    }
    assert_eq!(v.violations(), 0, "invariants hold: {:#?}", v.checks);

    // A context's own messages in the sender's transaction: the saga's ConfirmOrder and
    // CompleteOrder were handled by the orders aggregate, and OrderPlaced by the saga, in
    // the transaction that wrote them, and their JetStream copies were acked as duplicates;
    // the invariants above held with it.
    let orders = t.shop.node("orders").unwrap().metrics_addr.clone();
    let in_tx = harness::metric(&orders, "choreo_handled_in_transaction_total", &[]);
    assert!(
        in_tx > 0.0,
        "messages handled in their sender's transaction"
    );
    let copies = harness::metric(
        &orders,
        "choreo_messages_total",
        &[("outcome", "duplicate")],
    );
    assert!(
        copies > 0.0 && copies <= in_tx,
        "{copies} copies acked as duplicates of {in_tx}"
    );
    t.shop.stop().expect("every node stops cleanly on SIGTERM");
}

/// `[consumer] own_messages_in_transaction = false`: every message takes the round trip
/// through JetStream, and the orders end the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_messages_through_jetstream_when_not_in_the_transaction() {
    let config = harness::TEST_CONFIG.replace(
        "[consumer]\n",
        "[consumer]\nown_messages_in_transaction = false\n",
    );
    let mut t = harness::start_config(choreo::contexts::KNOWN, true, &config).await;
    run_and_verify(&t, 30).await;
    let orders = t.shop.node("orders").unwrap().metrics_addr.clone();
    assert_eq!(
        harness::metric(&orders, "choreo_handled_in_transaction_total", &[]),
        0.0
    );
    assert!(harness::metric(&orders, "choreo_messages_total", &[("outcome", "acked")]) > 0.0);
    t.shop.stop().unwrap();
}

/// Logical boundaries are not physical ones: all five contexts in one node process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_contexts_in_one_process() {
    let mut t = harness::start(&["all"], true, "").await;
    let report = run_and_verify(&t, 40).await;
    // Contexts hosted together still talk through JetStream: only a context's own
    // messages are handled in their sender's transaction.
    let node = t.shop.node("all").unwrap().metrics_addr.clone();
    assert!(
        harness::metric(
            &node,
            "choreo_messages_total",
            &[("context", "inventory"), ("outcome", "acked")]
        ) > 0.0
    );
    assert_eq!(
        harness::metric(
            &node,
            "choreo_handled_in_transaction_total",
            &[("context", "inventory")]
        ),
        0.0
    );

    // The orders read model, through the CLI.
    let (id, _) = &report.orders[0];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_choreo"))
        .args(["orders", "show", id, "--nats", &t.shop.nats.url])
        .envs(t.shop.env(choreo::auth::CLIENT))
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON order");
    assert_eq!(shown["order_id"], id.as_str());
    assert!(
        matches!(shown["status"].as_str(), Some("Completed" | "Cancelled")),
        "{shown}"
    );
    t.shop.stop().unwrap();
}
