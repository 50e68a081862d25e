//! A consumer that is behind never loses messages silently: a full stream refuses new ones
//! (publishers wait) instead of discarding what a consumer has not read, and what is lost
//! anyway (an operator's age limit) is counted, logged and shown.

use std::time::Duration;

use choreo::load::{self, LoadConfig};
use choreo::verify;

use crate::harness;

fn orders(n: usize, rate: f64, timeout: Duration) -> LoadConfig {
    LoadConfig {
        orders: n,
        rate,
        concurrency: n,
        customers: 10,
        fail_stock_pct: 0.0,
        fail_payment_pct: 0.0,
        fail_shipping_pct: 0.0,
        timeout,
        max_duration: None,
        seed: 3,
    }
}

/// The scaled-down stream-limit scenario: CHOREO_ORDERS limited to 512 KiB, payments
/// stopped while 900 orders are placed at 100/s. Its events fill the stream, which then
/// refuses new messages: the load's PlaceOrder and the orders node's outbox wait. Once
/// payments is back every order completes, nothing is missed, `verify` is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_makes_publishers_wait_and_loses_nothing() {
    let extra = "[stream]\nmax_bytes = 524288\n[sagas.order-fulfilment]\nawaiting = \"90s\"\n";
    let mut t = harness::start(choreo::contexts::KNOWN, true, extra).await;
    t.shop.stop_node("payments").expect("payments stops");
    let bus = t.bus.clone();
    let load = tokio::spawn(async move {
        load::run(&bus, &orders(900, 100.0, Duration::from_secs(60)), |_| {}).await
    });
    // The stream fills up while payments is away.
    let orders_node = t.shop.node("orders").unwrap().metrics_addr.clone();
    let full = harness::eventually(Duration::from_secs(30), || {
        let fill = harness::try_metric(
            &orders_node,
            "choreo_stream_fill_ratio",
            &[("stream", "CHOREO_ORDERS")],
        );
        async move { fill.is_some_and(|f| f > 0.85) }
    })
    .await;
    assert!(full, "CHOREO_ORDERS filled up");
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.shop.restart("payments").await.expect("payments back");
    let report = load.await.unwrap().expect("load runs");
    assert_eq!(report.placed, 900);
    assert_eq!(
        (report.completed, report.unfinished),
        (900, 0),
        "every order completes: {:?}",
        report.unexpected
    );
    let payments = t.shop.node("payments").unwrap().metrics_addr.clone();
    assert_eq!(
        harness::metric(&payments, "choreo_consumer_missed_messages_total", &[]),
        0.0
    );
    let v = verify::run(&t.bus, Some(&report.run_id)).await.unwrap();
    assert_eq!(v.violations(), 0, "{:#?}", v.checks);
    t.shop.stop().unwrap();
}

/// With an age limit, a consumer behind by more than it loses messages: the node counts
/// them (`choreo_consumer_missed_messages_total`), logs them, and `choreo streams` shows
/// the gap and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_removed_before_a_consumer_acked_them_are_counted_and_shown() {
    let extra = "[stream]\nmax_age = \"2s\"\nduplicate_window = \"1s\"\n";
    let mut t = harness::start(choreo::contexts::KNOWN, true, extra).await;
    t.shop.stop_node("payments").expect("payments stops");
    // Orders are placed; payments never sees their OrderPlaced.
    let report = load::run(&t.bus, &orders(5, 0.0, Duration::from_secs(3)), |_| {})
        .await
        .expect("load runs");
    assert_eq!(report.placed, 5);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (ok, out) = harness::choreo(&t, &["streams"]);
    assert!(!ok, "choreo streams exits 1 on a gap:\n{out}");
    let line = out
        .lines()
        .find(|l| l.contains("payments_billing_orders_evt"))
        .unwrap_or_else(|| panic!("no payments consumer in:\n{out}"));
    assert!(line.contains("MISSED"), "{line}");

    t.shop.restart("payments").await.expect("payments back");
    let payments = t.shop.node("payments").unwrap().metrics_addr.clone();
    let counted = harness::eventually(Duration::from_secs(20), || {
        let missed = harness::try_metric(
            &payments,
            "choreo_consumer_missed_messages_total",
            &[
                ("consumer", "payments_billing_orders_evt"),
                ("reason", "removed"),
            ],
        );
        async move { missed.is_some_and(|m| m >= 5.0) }
    })
    .await;
    assert!(counted, "the payments node counts what it missed");
    let log = std::fs::read_to_string(t.shop.logs().join("payments.log")).unwrap_or_default();
    assert!(
        log.contains("removed from the stream before this consumer acked them"),
        "logged"
    );
}
