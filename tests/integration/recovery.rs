//! How soon work resumes after a failure, with the consumers' `ack_wait` long (2 minutes,
//! its default is 30 s): nothing may wait for it where the runtime knows better. The long
//! wait keeps the two apart whatever else the machine is doing.

use std::time::Duration;

use choreo::load::{self, LoadConfig, LoadReport};
use choreo::verify;
use runtime::wire::envelope::now_ms;

use crate::harness;

/// The harness config with a long `ack_wait` instead of its short one.
fn long_ack_wait() -> String {
    harness::TEST_CONFIG.replace("ack_wait = \"3s\"", "ack_wait = \"2m\"")
}

fn load(orders: usize, rate: f64) -> LoadConfig {
    LoadConfig {
        orders,
        rate,
        concurrency: orders,
        customers: 20,
        fail_stock_pct: 3.0,
        fail_payment_pct: 3.0,
        fail_shipping_pct: 2.0,
        timeout: Duration::from_secs(180),
        max_duration: None,
        seed: 11,
    }
}

/// Seconds from `at` (Unix ms) until every order placed before it had ended.
fn drained_after(report: &LoadReport, at: u64) -> f64 {
    report
        .timeline
        .iter()
        .filter(|(placed, _)| *placed < at)
        .filter_map(|(_, ended)| *ended)
        .max()
        .map_or(0.0, |e| e.saturating_sub(at) as f64 / 1000.0)
}

/// `kill -9` of every node at 200 orders/s, then a restart: each node asks the server at
/// start for what its previous run had not acked, so the orders in flight at the kill end
/// seconds after the nodes are ready, not `ack_wait` later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_in_flight_at_a_kill_of_every_node_end_soon_after_the_restart() {
    let mut t = harness::start_config(choreo::contexts::KNOWN, true, &long_ack_wait()).await;
    let bus = t.bus.clone();
    let running = tokio::spawn(async move { load::run(&bus, &load(1_600, 200.0), |_| {}).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ctx in choreo::contexts::KNOWN {
        t.shop.kill9(ctx).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for ctx in choreo::contexts::KNOWN {
        t.shop.respawn(ctx).unwrap();
    }
    t.shop.wait_ready(Duration::from_secs(60)).await.unwrap();
    let ready = now_ms();
    let report = running.await.unwrap().expect("load runs");
    assert_eq!(report.unfinished, 0, "{:?}", report.unexpected);
    assert!(report.ok(), "{:?}", report.unexpected);
    let drain = drained_after(&report, ready);
    println!("orders in flight at the kill ended {drain:.1} s after the nodes were ready");
    assert!(
        drain < 60.0,
        "the orders in flight ended {drain:.1} s after the restart (ack_wait is 120 s)"
    );
    let v = verify::run(&t.bus, Some(&report.run_id)).await.unwrap();
    assert_eq!(v.violations(), 0, "{:#?}", v.checks);
    t.shop.stop().unwrap();
}

/// The gateway fails every request for 10 s at 20 orders/s: the breaker opens and payments
/// messages are naked with the time it has left. Once the gateway works again the backlog
/// drains in seconds: a message naked on its second or third delivery comes back after its
/// own delay (with the consumer's former back-off list, the server added `ack_wait` to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_an_open_breaker_delayed_drains_soon_after_the_outage() {
    let mut t = harness::start_config(choreo::contexts::KNOWN, true, &long_ack_wait()).await;
    let bus = t.bus.clone();
    let running = tokio::spawn(async move { load::run(&bus, &load(500, 20.0), |_| {}).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let gateway = |rate: f64| serde_json::json!({ "failure_rate": rate });
    choreo::client::control_external(&t.bus, "payment-gateway", gateway(1.0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    choreo::client::control_external(&t.bus, "payment-gateway", gateway(0.0))
        .await
        .unwrap();
    let outage_ended = now_ms();
    let report = running.await.unwrap().expect("load runs");
    assert_eq!(report.unfinished, 0);
    assert!(
        report.ok(),
        "nothing cancelled by the outage: {:?}",
        report.unexpected
    );
    let payments = t.shop.node("payments").unwrap().metrics_addr.clone();
    assert!(
        harness::metric(
            &payments,
            "choreo_messages_total",
            &[("outcome", "delayed")]
        ) > 0.0,
        "the breaker opened and delayed messages"
    );
    let drain = drained_after(&report, outage_ended);
    println!("the orders placed before the outage ended had ended {drain:.1} s after it");
    assert!(
        drain < 60.0,
        "the backlog drained {drain:.1} s after the outage (the breaker opens for 5 s; ack_wait is 120 s)"
    );
}

/// A node stopped gracefully under load gives back what it had buffered without pulling it
/// again: every message comes back to the next run of the node, none is delivered so often
/// on the way out that the server gives up on it (`max_deliver`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_under_load_gives_back_what_was_buffered() {
    let mut t = harness::start(choreo::contexts::KNOWN, true, "").await;
    let bus = t.bus.clone();
    let running = tokio::spawn(async move { load::run(&bus, &load(600, 100.0), |_| {}).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.shop
        .stop_node("payments")
        .expect("payments stops cleanly");
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.shop.restart("payments").await.expect("payments back");
    let report = running.await.unwrap().expect("load runs");
    assert_eq!(report.unfinished, 0, "{:?}", report.unexpected);
    assert!(report.ok(), "{:?}", report.unexpected);
    let dead = harness::dead_letters(&t.bus).await;
    assert!(dead.is_empty(), "{} dead letters", dead.len());
    t.shop.stop().unwrap();
}
