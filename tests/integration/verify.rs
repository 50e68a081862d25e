//! `choreo verify` against what the nodes did: a dead-lettered command had no effect, so it
//! is not counted as sent.

use std::time::Duration;

use bytes::Bytes;
use runtime::wire::envelope::{new_id, now_ms};
use runtime::{wire::subjects, Envelope};

use crate::harness::{self, eventually};

/// One valid `AddStock` and two that are dead-lettered (a declared type on the wrong
/// subject; oversized), all for the same sku and all decodable as `AddStock`: verify finds
/// the stock added by the valid one and no violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_add_stock_is_not_counted_as_sent() {
    let t = harness::start(&["all"], false, "").await;
    let sku = format!("dlq-{}", new_id());
    let subject = subjects::command("inventory", "AddStock");
    harness::add_stock(&t, &sku, 1).await;

    // `Choreo-Type: CommitStock` on the AddStock subject: dead-lettered as malformed.
    let mismatched = Envelope::first(new_id(), "CommitStock", "test", now_ms());
    let body = Bytes::from(serde_json::json!({ "sku": sku, "qty": 5 }).to_string());
    t.bus.publish(&subject, &mismatched, body).await.unwrap();
    // Over the node's 64 KiB limit, still a well-formed AddStock (trailing whitespace).
    let oversized = Envelope::first(new_id(), "AddStock", "test", now_ms());
    let mut body = serde_json::json!({ "sku": sku, "qty": 7 })
        .to_string()
        .into_bytes();
    body.extend(std::iter::repeat_n(b' ', 70 * 1024));
    t.bus
        .publish(&subject, &oversized, Bytes::from(body))
        .await
        .unwrap();

    let ours = |p: &Bytes| String::from_utf8_lossy(p).contains(sku.as_str());
    assert!(
        eventually(Duration::from_secs(15), || async {
            harness::dead_letters(&t.bus)
                .await
                .iter()
                .filter(|(_, p)| ours(p))
                .count()
                == 2
        })
        .await,
        "both invalid commands dead-lettered"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            harness::sku(&t.bus, &sku).await.0 == 1
        })
        .await,
        "the valid command applied"
    );

    let v = choreo::verify::run(&t.bus, None).await.expect("verify");
    let stock = &v.checks["stock"];
    assert!(stock.checked > 0, "stock checked");
    assert!(stock.violations.is_empty(), "{:#?}", stock.violations);
    // Inventory's own invariant, declared on its context and asked of its node.
    let declared = &v.checks["inventory.stock"];
    assert!(declared.checked > 0, "inventory.stock checked");
    assert!(declared.violations.is_empty(), "{:#?}", declared.violations);
    let (ok, out) = harness::choreo(&t, &["verify"]);
    assert!(ok && out.contains("verify: OK"), "{out}");
    assert!(out.contains("inventory.stock checked"), "{out}");
}
