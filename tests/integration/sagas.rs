//! Sagas end to end across separate node processes: each compensation path, deadlines that
//! fire after a `kill -9` of the saga's node, and an operator retry of a parked instance.
//! Each ends with `choreo verify` clean.

use std::time::Duration;

use choreo::load::{self, LoadConfig};
use choreo::verify;

use crate::harness::{self, choreo, eventually, TestShop};

const SAGA: &str = "order-fulfilment";

fn only(kind: &str, orders: usize) -> LoadConfig {
    let mut c = crate::order_flow::mix(orders, 0.0);
    c.fail_stock_pct = 0.0;
    c.fail_payment_pct = 0.0;
    c.fail_shipping_pct = 0.0;
    match kind {
        "stock" => c.fail_stock_pct = 100.0,
        "payment" => c.fail_payment_pct = 100.0,
        "shipping" => c.fail_shipping_pct = 100.0,
        _ => {}
    }
    c
}

/// `choreo verify --only <run>` through the CLI: exit code 0 and "verify: OK".
fn verify_cli(t: &TestShop, run_id: &str) {
    let (ok, out) = choreo(t, &["verify", "--only", run_id]);
    assert!(ok && out.contains("verify: OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_compensation_path_end_to_end() {
    let t = harness::start(choreo::contexts::KNOWN, true, "").await;
    // (failure, the history must show these commands, in this order, after the failure)
    let cases = [
        (
            "none",
            vec![
                "ConfirmOrder, ShipOrder",
                "CommitStock, CapturePayment",
                "CompleteOrder",
            ],
            "Completed",
        ),
        (
            "stock",
            vec!["sent CancelPayment", "CancelOrder"],
            "Cancelled",
        ),
        (
            "payment",
            vec!["sent ReleaseStock", "CancelOrder"],
            "Cancelled",
        ),
        (
            "shipping",
            vec![
                "ConfirmOrder, ShipOrder",
                "ReleaseStock, CancelPayment",
                "CancelOrder",
            ],
            "Cancelled",
        ),
    ];
    for (kind, expected, end) in cases {
        let report = load::run(&t.bus, &only(kind, 3), |_| {})
            .await
            .expect("load");
        assert!(
            report.ok() && report.unfinished == 0,
            "{kind}: {:?}",
            report.unexpected
        );
        verify_cli(&t, &report.run_id);
        let (id, _) = &report.orders[0];
        let (ok, shown) = choreo(&t, &["saga", "show", id]);
        assert!(ok, "{shown}");
        assert!(
            shown.contains(&format!("state    {end}")),
            "{kind}: {shown}"
        );
        assert!(
            shown.contains("OrderPlaced") && shown.contains("(start) -> AwaitingStockAndPayment"),
            "{shown}"
        );
        let mut at = 0;
        for e in expected {
            let pos = shown[at..]
                .find(e)
                .unwrap_or_else(|| panic!("{kind}: history lacks {e:?} after byte {at}:\n{shown}"));
            at += pos + e.len();
        }
    }
    let (ok, listed) = choreo(&t, &["saga", "list", "--state", "Cancelled"]);
    assert!(ok && listed.contains("9 instance(s)"), "{listed}");
    t.shop.stop().unwrap();
}

/// Payments is down, so orders wait on their `awaiting` deadline; the saga's node is killed
/// and stays down past the deadlines; after its restart they fire (late) and compensate.
/// The orders node's flushes are slowed for its first seconds so that the instances are
/// visible well before they are durable (what the test must wait for before the kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_fire_after_kill_9_and_compensate() {
    let config = r#"
[sagas.order-fulfilment]
awaiting = "3s"
[faults]
enabled = true
[[faults.rules]]
point = "store_flush"
action = "delay"
context = "orders"
delay = "1s"
duration = "3s"
"#;
    let mut t = harness::start(
        &["customers", "orders", "inventory", "shipping"],
        true,
        config,
    )
    .await;
    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &only("none", 10), |_| {}).await });
    let waiting = || async {
        let v = choreo::client::saga(
            &t.bus,
            SAGA,
            "list",
            serde_json::json!({"state": "AwaitingStockAndPayment"}),
        )
        .await;
        v.map(|v| v["count"] == 10).unwrap_or(false)
    };
    assert!(
        eventually(Duration::from_secs(20), waiting).await,
        "10 instances wait for payment"
    );
    // Inspection reads the store, which shows a transaction before it is durable. Wait
    // until the saga's consumer of OrderPlaced acked all ten (as handled, or as the
    // duplicate of a handling inside PlaceOrder's transaction): both come after the flush
    // and the changelog append. Killed before, the node takes instances back, and the
    // redeliveries start them again with fresh deadlines.
    let addr = t.shop.node("orders").unwrap().metrics_addr.clone();
    let durable = || async {
        let acked = |outcome| {
            let labels = [
                ("consumer", "orders_order_fulfilment_orders_evt"),
                ("outcome", outcome),
            ];
            harness::metric(&addr, "choreo_messages_total", &labels)
        };
        acked("acked") + acked("duplicate") >= 10.0
    };
    assert!(
        eventually(Duration::from_secs(20), durable).await,
        "the saga acked the 10 OrderPlaced"
    );
    t.shop.kill9("orders").unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await; // every deadline passes while down
    t.shop.restart("orders").await.unwrap();
    let addr = t.shop.node("orders").unwrap().metrics_addr.clone();
    let fired = || async {
        harness::metric(
            &addr,
            "choreo_saga_deadlines_fired_total",
            &[("deadline", "awaiting")],
        ) >= 10.0
    };
    assert!(
        eventually(Duration::from_secs(20), fired).await,
        "deadlines fired after the restart"
    );
    let late = harness::metric(&addr, "choreo_saga_deadline_lateness_seconds_sum", &[]);
    assert!(
        late >= 10.0,
        "each fired at least ~1.5 s late, measured: total {late} s"
    );
    // Compensation waits for payments; bring it up.
    t.shop.add_node("payments").await.unwrap();
    let report = run.await.unwrap().expect("load");
    assert_eq!(
        (report.unfinished, report.cancelled),
        (0, 10),
        "all compensated and cancelled"
    );
    let v = verify::run(&t.bus, Some(&report.run_id)).await.unwrap();
    assert_eq!(v.violations(), 0, "{:#?}", v.checks);
    verify_cli(&t, &report.run_id);
    let (_, shown) = choreo(&t, &["saga", "show", &report.orders[0].0]);
    assert!(
        shown.contains("deadline")
            && shown.contains("awaiting")
            && shown.contains("no stock and payment answer"),
        "{shown}"
    );
    t.shop.stop().unwrap();
}

/// A compensation that keeps failing parks the instance in CompensationFailed, visible to
/// `saga stuck`; `saga retry` after the cause is gone completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_failed_is_visible_and_retry_completes_it() {
    // CancelPayment fails on its first 6 deliveries: 2 sends (first + one resend) x 3
    // failed deliveries each (the retry budget), then dead-lettered; the instance parks.
    // The retry's send succeeds.
    let config = r#"
external_timeout = "1s"
[consumer]
ack_wait = "3s"
max_deliver = 100
[retry]
immediate = 0
base = "200ms"
max = "500ms"
jitter = false
budget = 3
handler_timeout = "2500ms"
[sagas.order-fulfilment]
compensation = "1500ms"
max_attempts = 1
[faults]
enabled = true
[[faults.rules]]
point = "handler"
action = "error"
msg_type = "CancelPayment"
times = 6
"#;
    let t = harness::start_config(choreo::contexts::KNOWN, true, config).await;
    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &only("stock", 1), |_| {}).await });
    let parked = || async {
        let v = choreo::client::saga(
            &t.bus,
            SAGA,
            "list",
            serde_json::json!({"state": "CompensationFailed"}),
        )
        .await;
        v.map(|v| v["count"] == 1).unwrap_or(false)
    };
    assert!(
        eventually(Duration::from_secs(40), parked).await,
        "parked in CompensationFailed"
    );
    let (ok, stuck) = choreo(&t, &["saga", "stuck", "--older-than", "0s"]);
    assert!(
        ok && stuck.contains("CompensationFailed") && stuck.contains("1 instance(s)"),
        "{stuck}"
    );
    let id = stuck
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let (ok, retried) = choreo(&t, &["saga", "retry", &id]);
    assert!(ok, "{retried}");
    let report = run.await.unwrap().expect("load");
    assert_eq!((report.unfinished, report.cancelled), (0, 1));
    verify_cli(&t, &report.run_id);
    let (_, shown) = choreo(&t, &["saga", "show", &id]);
    assert!(
        shown.contains("retry") && shown.contains("CompensationFailed -> Compensating"),
        "{shown}"
    );
    t.shop.stop().unwrap();
}

/// Ended instances are kept for `store.saga_retention_ms`, then removed with their
/// history: inspection answers for recent ones, and the store does not grow without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_instances_are_removed_after_their_retention() {
    let mut t = harness::start(
        choreo::contexts::KNOWN,
        true,
        "[store]\nsaga_retention = \"3s\"\n",
    )
    .await;
    let report = load::run(&t.bus, &only("none", 10), |_| {}).await.unwrap();
    assert_eq!(report.completed, 10);
    let (id, _) = &report.orders[0];
    // Recent: inspectable.
    let (ok, out) = choreo(&t, &["saga", "show", id, "--saga", SAGA]);
    assert!(ok && out.contains("Completed"), "{out}");
    let orders = t.shop.node("orders").unwrap().metrics_addr.clone();
    let gone = eventually(Duration::from_secs(20), || {
        let (_, out) = choreo(&t, &["saga", "show", id, "--saga", SAGA]);
        async move { out.contains("no order-fulfilment instance") }
    })
    .await;
    assert!(gone, "the ended instance is removed after its retention");
    let (ok, out) = choreo(&t, &["saga", "list", "--saga", SAGA, "--json"]);
    assert!(ok, "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["count"], 0, "{out}");
    let counted = eventually(Duration::from_secs(10), || {
        let n = harness::metric(&orders, "choreo_saga_instances", &[("state", "Completed")]);
        async move { n == 0.0 }
    })
    .await;
    assert!(counted, "the gauge counts stored instances");
}
