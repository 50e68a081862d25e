//! Fault injection at run time: `choreo chaos inject|list|clear` against a live node, the
//! fault counted in metrics, and refusals (faults off in the config, bad rules).

use std::time::Duration;

use runtime::wire::envelope::new_id;

use crate::harness::{self, eventually, inject};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cli_injects_counts_and_clears_faults() {
    let mut t = harness::start(&["inventory"], false, "[faults]\nenabled = true\nseed = 3").await;
    let (ok, out) = inject(
        &t,
        "inventory",
        "handler",
        "error",
        &["--times", "2", "--type", "AddStock"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("installed"), "{out}");
    // Without --context: every context running nodes host (only inventory runs here).
    let (ok, out) = harness::choreo(&t, &["chaos", "list"]);
    assert!(ok && out.starts_with("inventory: "), "{out}");
    assert!(
        out.contains("\"point\":\"handler\"") && out.lines().count() == 1,
        "{out}"
    );

    let sku = format!("faulty-{}", new_id());
    harness::add_stock(&t, &sku, 3).await;
    // Two injected errors, then the retry applies it, once.
    assert!(
        eventually(Duration::from_secs(15), || async {
            harness::sku(&t.bus, &sku).await.0 == 3
        })
        .await
    );
    let addr = t.shop.node("inventory").unwrap().metrics_addr.clone();
    let fired = harness::metric(
        &addr,
        "choreo_faults_injected_total",
        &[("point", "handler"), ("action", "error")],
    );
    assert_eq!(fired, 2.0);

    let (ok, out) = harness::choreo(&t, &["chaos", "clear", "--context", "inventory"]);
    assert!(ok && out.contains("\"cleared\":1"), "{out}");

    // Refused: a bad rule (by the node); a context no node hosts (no responder).
    let (ok, out) = inject(&t, "inventory", "handler", "delay", &[]);
    assert!(!ok && out.contains("needs a delay"), "{out}");
    let (ok, out) = inject(&t, "warehouse", "handler", "error", &[]);
    assert!(
        !ok && out.contains("is a node hosting warehouse running?"),
        "{out}"
    );
    t.shop.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_faults_off_refuses_them() {
    let t = harness::start(&["inventory"], false, "").await;
    let (ok, out) = inject(&t, "inventory", "after-commit", "crash", &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("fault injection is off"), "{out}");
    t.shop.stop().unwrap();
}
