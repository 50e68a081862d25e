//! Duplicates are absorbed: by JetStream inside its duplicate window (same `Nats-Msg-Id`),
//! and by the consumer's inbox after it (a new NATS message carrying the same envelope id).
//! `AddStock` is deliberately not idempotent in the domain (it adds every time), so only
//! deduplication keeps the stock right.

use std::time::Duration;

use bytes::Bytes;
use runtime::wire::envelope::{new_id, now_ms};
use runtime::{wire::subjects, Envelope};

use crate::harness::{self, eventually};

/// A one-second duplicate window, so the test can step past it.
const SHORT_WINDOW: &str = "[stream]\nduplicate_window = \"1s\"\n";

fn add_stock(sku: &str, qty: u64) -> (Envelope, Bytes) {
    let env = Envelope::first(new_id(), "AddStock", "test", now_ms());
    (
        env,
        Bytes::from(serde_json::json!({ "sku": sku, "qty": qty }).to_string()),
    )
}

/// True once the sku's stock (first of [`harness::sku`]) is `qty`, within 10 s.
async fn stock_becomes(t: &harness::TestShop, sku: &str, qty: u64) -> bool {
    eventually(Duration::from_secs(10), || async {
        harness::sku(&t.bus, sku).await.0 == qty
    })
    .await
}

/// True once the context's node has counted a message absorbed as a duplicate, within 10 s.
async fn duplicate_absorbed(t: &mut harness::TestShop, context: &str) -> bool {
    let addr = t.shop.node(context).unwrap().metrics_addr.clone();
    let absorbed = || harness::metric(&addr, "choreo_messages_total", &[("outcome", "duplicate")]);
    eventually(Duration::from_secs(10), || async { absorbed() >= 1.0 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_command_twice_inside_the_window_changes_state_once() {
    let t = harness::start(&["inventory"], false, "").await;
    let (env, body) = add_stock("dup-a", 7);
    let subject = subjects::command("inventory", "AddStock");
    assert!(
        !t.bus.publish(&subject, &env, body.clone()).await.unwrap(),
        "first publish is stored"
    );
    assert!(
        t.bus.publish(&subject, &env, body).await.unwrap(),
        "JetStream reports the repeat as a duplicate"
    );
    assert!(stock_becomes(&t, "dup-a", 7).await);
    // A later, different command is applied: the node is still consuming.
    let (env2, body2) = add_stock("dup-a", 1);
    t.bus.publish(&subject, &env2, body2).await.unwrap();
    assert!(stock_becomes(&t, "dup-a", 8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_command_after_the_window_is_absorbed_by_the_inbox() {
    let mut t = harness::start(&["inventory"], false, SHORT_WINDOW).await;
    let (env, body) = add_stock("dup-b", 5);
    let subject = subjects::command("inventory", "AddStock");
    t.bus.publish(&subject, &env, body.clone()).await.unwrap();
    assert!(stock_becomes(&t, "dup-b", 5).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dup = t.bus.publish(&subject, &env, body).await.unwrap();
    assert!(!dup, "past the window JetStream stores the message again");
    assert!(
        duplicate_absorbed(&mut t, "inventory").await,
        "the inbox absorbed it"
    );
    assert_eq!(harness::sku(&t.bus, "dup-b").await.0, 5, "stock added once");
}

/// Inbox marks expire a generation at a time: a duplicate is still absorbed after one
/// rotation (its mark is then in the previous generation, which is still read), and applied
/// again after the second (that generation is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_marks_expire_a_generation_at_a_time() {
    let extra =
        format!("{SHORT_WINDOW}[store]\ninbox_retention = \"4s\"\ninbox_prune_interval = \"1s\"\n");
    let mut t = harness::start(&["inventory"], false, &extra).await;
    let log = t.shop.logs().join("inventory.log");
    let rotations = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("inbox rotated")
            .count()
    };
    let (env, body) = add_stock("dup-r", 3);
    let subject = subjects::command("inventory", "AddStock");
    t.bus.publish(&subject, &env, body.clone()).await.unwrap();
    assert!(stock_becomes(&t, "dup-r", 3).await);
    // Past JetStream's duplicate window, and past the next rotation.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = rotations();
    assert!(
        eventually(Duration::from_secs(15), || async { rotations() > before }).await,
        "the inbox rotates"
    );
    let rotated = rotations();
    assert!(!t.bus.publish(&subject, &env, body.clone()).await.unwrap());
    assert!(
        duplicate_absorbed(&mut t, "inventory").await,
        "absorbed by the previous generation"
    );
    assert_eq!(harness::sku(&t.bus, "dup-r").await.0, 3);
    assert_eq!(rotations(), rotated, "no second rotation in between");
    // One more rotation drops the generation that held the mark.
    assert!(eventually(Duration::from_secs(15), || async { rotations() > rotated }).await);
    assert!(!t.bus.publish(&subject, &env, body).await.unwrap());
    assert!(
        stock_becomes(&t, "dup-r", 6).await,
        "past two retention periods the same message is applied again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_event_twice_changes_state_once() {
    let mut t = harness::start(&["inventory", "payments"], true, SHORT_WINDOW).await;
    let stock = subjects::command("inventory", "AddStock");
    let (env, body) = add_stock("dup-c", 10);
    t.bus.publish(&stock, &env, body).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            harness::sku(&t.bus, "dup-c").await.1 == 10
        })
        .await
    );

    // An OrderPlaced event, as the orders context would publish it.
    let placed = Envelope::first(new_id(), "OrderPlaced", "orders", now_ms());
    let payload = Bytes::from(
        serde_json::json!({
            "order_id": "dup-order", "customer_id": "c1", "total_cents": 300, "payment_method": "card",
            "items": [{ "sku": "dup-c", "qty": 3, "unit_price_cents": 100 }]
        })
        .to_string(),
    );
    let subject = subjects::event("orders", "OrderPlaced");
    t.bus
        .publish(&subject, &placed, payload.clone())
        .await
        .unwrap();
    assert!(
        t.bus
            .publish(&subject, &placed, payload.clone())
            .await
            .unwrap(),
        "inside the window: dropped by JetStream"
    );
    let authorized = || async {
        choreo::client::query(
            &t.bus,
            "payments",
            "payment",
            serde_json::json!({"order_id": "dup-order"}),
        )
        .await
        .is_ok()
    };
    assert!(eventually(Duration::from_secs(10), authorized).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            harness::sku(&t.bus, "dup-c").await.1 == 7
        })
        .await
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !t.bus.publish(&subject, &placed, payload).await.unwrap(),
        "past the window it is stored again"
    );
    for ctx in ["inventory", "payments"] {
        let addr = t.shop.node(ctx).unwrap().metrics_addr.clone();
        let absorbed = || async {
            harness::metric(&addr, "choreo_messages_total", &[("outcome", "duplicate")]) >= 1.0
        };
        assert!(
            eventually(Duration::from_secs(10), absorbed).await,
            "{ctx} absorbed the repeat"
        );
    }
    assert_eq!(
        harness::sku(&t.bus, "dup-c").await.1,
        7,
        "stock reserved once"
    );
    let ledger = choreo::client::query_external(&t.bus, "payment-gateway")
        .await
        .unwrap();
    assert_eq!(
        ledger["effects"]["dup-order"]["authorized"], 1,
        "authorized once at the gateway"
    );
    assert_eq!(ledger["requests"], 1, "the gateway was asked once");
}
