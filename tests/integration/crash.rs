//! `kill -9` of context nodes in the middle of a run, then a restart: no order lost, no
//! effect doubled.

use std::time::Duration;

use choreo::{load, verify};

use crate::harness;
use crate::order_flow::mix;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_then_restart_loses_and_doubles_nothing() {
    let mut t = harness::start(choreo::contexts::KNOWN, true, "").await;
    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &mix(200, 40.0), |_| {}).await });

    // The orders node hosts the fulfilment saga; payments talks to the gateway.
    for ctx in ["orders", "payments"] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        t.shop.kill9(ctx).unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        t.shop
            .restart(ctx)
            .await
            .expect("node restarts on its data");
    }

    let report = run.await.unwrap().expect("load completes");
    assert_eq!(report.placed, 200);
    assert_eq!(report.unfinished, 0, "no order lost");
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let v = verify::run(&t.bus, Some(&report.run_id)).await.unwrap();
    assert!(v.ledgers_checked);
    assert_eq!(v.checks["once"].checked, 200);
    assert_eq!(
        v.violations(),
        0,
        "no effect doubled, nothing half done: {:#?}",
        v.checks
    );
    t.shop.stop().unwrap();
}
