//! A panic in handler code neither kills the node nor loses the message: the runtime catches
//! it, naks the message, the supervisor restarts the consumer actor, and the redelivered
//! message is applied once.

use std::time::Duration;

use crate::harness::{self, eventually};

const PANIC_TWICE: &str = r#"
[faults]
enabled = true
[[faults.rules]]
point = "handler"
action = "panic"
msg_type = "AddStock"
times = 2
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_is_caught_restarted_and_redelivered() {
    let mut t = harness::start(&["inventory"], false, PANIC_TWICE).await;
    harness::add_stock(&t, "panicky", 4).await;

    assert!(
        eventually(Duration::from_secs(15), || async {
            harness::sku(&t.bus, "panicky").await.0 == 4
        })
        .await,
        "the message is redelivered after the panics and applied"
    );
    assert!(t.shop.dead_node().is_none(), "the node survived");
    let addr = t.shop.node("inventory").unwrap().metrics_addr.clone();
    assert_eq!(
        harness::metric(&addr, "choreo_handler_panics_total", &[]),
        2.0
    );
    assert!(
        harness::metric(&addr, "choreo_supervisor_restarts_total", &[]) >= 1.0,
        "actor restarted"
    );
    assert_eq!(
        harness::metric(
            &addr,
            "choreo_faults_injected_total",
            &[("action", "panic")]
        ),
        2.0
    );
    assert_eq!(
        harness::metric(&addr, "choreo_dead_letters_total", &[]),
        0.0,
        "nothing dead-lettered"
    );
    // Applied once, not once per delivery.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(harness::sku(&t.bus, "panicky").await.0, 4);
    t.shop.stop().unwrap();
}
