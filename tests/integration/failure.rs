//! Failure isolation: a 30 s payment gateway outage under load, a slow carrier beside fast
//! handlers, a poison message and its replay, a panicking handler, restart limits.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use bytes::Bytes;
use choreo::load::{self, LoadConfig};
use choreo::verify;
use futures::StreamExt;
use runtime::wire::subjects;

use crate::harness::{self, add_stock, choreo, eventually, TestShop, TEST_CONFIG};

fn normal_orders(n: usize, rate: f64) -> LoadConfig {
    let mut c = crate::order_flow::mix(n, rate);
    c.fail_stock_pct = 0.0;
    c.fail_payment_pct = 0.0;
    c.fail_shipping_pct = 0.0;
    c.concurrency = 512;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_down_30s_opens_the_breaker_and_cancels_nothing() {
    let breaker = "[breaker]\nwindow = 10\nmin_calls = 5\nfailure_rate = 0.5\nopen = \"2s\"\n";
    let mut t = harness::start(choreo::contexts::KNOWN, true, breaker).await;
    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &normal_orders(150, 4.0), |_| {}).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, out) = choreo(&t, &["sim-set", "payment-gateway", "--failure-rate", "1"]);
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let payments = t.shop.node("payments").unwrap().metrics_addr.clone();
    let opened = harness::metric(
        &payments,
        "choreo_breaker_transitions_total",
        &[("system", "payment-gateway"), ("to", "open")],
    );
    let delayed = harness::metric(
        &payments,
        "choreo_messages_total",
        &[("outcome", "delayed")],
    );
    assert!(opened >= 1.0, "the breaker opened during the outage");
    assert!(delayed > 0.0, "messages were delayed, not failed");
    assert_eq!(
        harness::metric(
            &payments,
            "choreo_breaker_state",
            &[("system", "payment-gateway")]
        ) as i64
            % 2,
        1,
        "open or probing"
    );
    let (ok, _) = choreo(&t, &["sim-set", "payment-gateway", "--failure-rate", "0"]);
    assert!(ok);

    let report = run.await.unwrap().expect("load");
    assert_eq!(
        (report.placed, report.unfinished, report.cancelled),
        (150, 0, 0),
        "no order cancelled by the outage"
    );
    let v = verify::run(&t.bus, Some(&report.run_id)).await.unwrap();
    assert_eq!(v.violations(), 0, "{:#?}", v.checks);
    assert!(
        harness::dead_letters(&t.bus).await.is_empty(),
        "nothing dead-lettered"
    );
    assert!(
        harness::metric(
            &payments,
            "choreo_breaker_transitions_total",
            &[("to", "closed")]
        ) >= 1.0,
        "closed again"
    );
    let log = std::fs::read_to_string(t.shop.logs().join("payments.log")).unwrap();
    assert!(
        log.contains("circuit breaker state change"),
        "the breaker's state changes are logged"
    );
    t.shop.stop().unwrap();
}

/// Time until `n` StockReserved events for freshly placed orders are seen.
async fn reservation_time(t: &TestShop, n: usize) -> Duration {
    let cfg = normal_orders(n, 0.0);
    let run_id = format!("bh{:06x}", fastrand::u32(..1 << 24));
    let customers = load::prepare(&t.bus, &cfg, &run_id).await.unwrap();
    let stream = t
        .bus
        .js
        .get_stream(subjects::stream("inventory"))
        .await
        .unwrap();
    let watch = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects::event("inventory", "StockReserved"),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut events = watch.messages().await.unwrap();
    let start = Instant::now();
    for i in 0..n {
        let cmd = orders::PlaceOrder {
            order_id: format!("{run_id}-o{i}"),
            customer_id: customers[i % customers.len()].clone(),
            items: vec![orders::LineItem {
                sku: "sku-1".into(),
                qty: 1,
                unit_price_cents: 100,
            }],
            payment_method: "card_visa".into(),
        };
        choreo::client::send_command(&t.bus, "orders", &cmd)
            .await
            .unwrap();
    }
    let mut seen = 0;
    while seen < n {
        let m = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("reservations keep coming");
        if String::from_utf8_lossy(&m.unwrap().unwrap().payload).contains(run_id.as_str()) {
            seen += 1;
        }
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_carrier_leaves_orders_and_inventory_throughput() {
    // One node hosts every context; the carrier answers in 2 s (timeout 5 s).
    let config = TEST_CONFIG
        .replace("external_timeout = \"1s\"", "external_timeout = \"5s\"")
        .replace("ack_wait = \"3s\"", "ack_wait = \"20s\"")
        .replace("handler_timeout = \"2500ms\"", "handler_timeout = \"15s\"");
    let t = harness::start_config(&["all"], true, &config).await;
    let n = 150;
    let fast = reservation_time(&t, n).await;
    let (ok, out) = choreo(&t, &["sim-set", "carrier", "--latency", "2s"]);
    assert!(ok, "{out}");
    let slow = reservation_time(&t, n).await;
    let shipping_busy = harness::metric(
        &t.shop.nodes[0].metrics_addr,
        "choreo_bulkhead_in_use",
        &[("consumer", "shipping_dispatch_shipping_cmd")],
    );
    let (fast_rate, slow_rate) = (n as f64 / fast.as_secs_f64(), n as f64 / slow.as_secs_f64());
    println!("orders reserved: {fast_rate:.0}/s with a fast carrier, {slow_rate:.0}/s with a 2 s carrier (shipping bulkhead in use: {shipping_busy})");
    assert!(
        shipping_busy > 0.0,
        "the carrier was slow while we measured"
    );
    assert!(
        slow_rate >= 0.5 * fast_rate,
        "orders and inventory keep their throughput: {slow_rate:.0}/s vs {fast_rate:.0}/s"
    );
    t.shop.stop().unwrap();
}

const POISON: &str = r#"
[retry]
immediate = 0
base = "50ms"
max = "200ms"
jitter = false
budget = 3
handler_timeout = "2500ms"
[faults]
enabled = true
[[faults.rules]]
point = "handler"
action = "error"
msg_type = "AddStock"
payload_contains = "poison-sku"
times = 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_then_replayed_once() {
    let config = TEST_CONFIG.split("[retry]").next().unwrap().to_string() + POISON;
    let t = harness::start_config(&["inventory"], false, &config).await;
    let env = add_stock(&t, "poison-sku", 5).await;
    let listed = || async {
        let (_, out) = choreo(&t, &["dlq", "list", "--reason", "retries exhausted"]);
        out.contains(&env.id[..20]).then_some(out)
    };
    let mut out = None;
    for _ in 0..50 {
        out = listed().await;
        if out.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = out.expect("dead-lettered after its budget");
    assert!(
        out.contains("retries exhausted after 3 failed deliveries: injected error"),
        "{out}"
    );
    assert_eq!(harness::sku(&t.bus, "poison-sku").await.0, 0, "not applied");
    let seq = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();

    // The cause is gone (the fault fired its 3 times): replay.
    let (ok, replayed) = choreo(&t, &["dlq", "replay", &seq]);
    assert!(ok && replayed.contains(&env.id), "{replayed}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            harness::sku(&t.bus, "poison-sku").await.0 == 5
        })
        .await
    );
    // Replayed once more (say from a copy): the inbox absorbs it.
    let body = Bytes::from(serde_json::json!({ "sku": "poison-sku", "qty": 5 }).to_string());
    let mut again = env.clone();
    again.occurred_at_ms += 1;
    let mut h = again.to_headers();
    h.insert("Nats-Msg-Id", "another-copy");
    t.bus
        .js
        .publish_with_headers(subjects::command("inventory", "AddStock"), h, body)
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        harness::sku(&t.bus, "poison-sku").await.0,
        5,
        "applied exactly once"
    );
    let (_, left) = choreo(&t, &["dlq", "list"]);
    assert!(left.contains("0 dead letter(s)"), "{left}");
    let (ok, _) = choreo(&t, &["dlq", "replay", &seq]);
    assert!(!ok, "a replayed dead letter is gone");
}

const BOOM: &str = r#"
[faults]
enabled = true
[[faults.rules]]
point = "handler"
action = "panic"
msg_type = "AddStock"
payload_contains = "boom-sku"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_on_one_message_restarts_while_others_flow_then_dead_letters_it() {
    let retry = "[retry]\nimmediate = 0\nbase = \"50ms\"\nmax = \"200ms\"\nbudget = 3\nhandler_timeout = \"2500ms\"\n";
    let config = TEST_CONFIG.split("[retry]").next().unwrap().to_string() + retry + BOOM;
    let mut t = harness::start_config(&["inventory"], false, &config).await;
    add_stock(&t, "boom-sku", 1).await;
    for i in 0..30 {
        add_stock(&t, &format!("calm-{i}"), 2).await;
    }
    let all_calm = || async {
        let v = choreo::client::query(&t.bus, "inventory", "stock", serde_json::json!({}))
            .await
            .unwrap();
        (0..30).all(|i| v[format!("calm-{i}")]["added"] == 2)
    };
    assert!(
        eventually(Duration::from_secs(15), all_calm).await,
        "other messages keep flowing"
    );
    let reason = harness::wait_dead_letter(&t.bus, |_, p| {
        String::from_utf8_lossy(p).contains("boom-sku")
    })
    .await;
    assert!(
        reason.contains("retries exhausted after 3") && reason.contains("handler panicked"),
        "{reason}"
    );
    let addr = t.shop.node("inventory").unwrap().metrics_addr.clone();
    assert_eq!(
        harness::metric(&addr, "choreo_handler_panics_total", &[]),
        3.0
    );
    assert!(harness::metric(&addr, "choreo_supervisor_restarts_total", &[]) >= 3.0);
    assert_eq!(
        harness::metric(&addr, "choreo_supervisor_stopped", &[]),
        0.0,
        "restart limit held"
    );
    assert_eq!(harness::http_status(&addr, "/readyz"), 200);
    assert!(t.shop.dead_node().is_none());
    assert_eq!(harness::sku(&t.bus, "boom-sku").await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_restart_limit_the_node_is_not_ready_then_resumes() {
    let more = "[retry]\nimmediate = 0\nbase = \"50ms\"\nmax = \"100ms\"\nbudget = 3\nhandler_timeout = \"2500ms\"\n\
                [supervision]\nmax_restarts = 4\nwindow = \"2s\"\nbackoff = [\"0s\"]\n";
    let config = TEST_CONFIG.split("[retry]").next().unwrap().to_string() + more + BOOM;
    let mut t = harness::start_config(&["inventory"], false, &config).await;
    let addr = t.shop.node("inventory").unwrap().metrics_addr.clone();
    assert_eq!(harness::http_status(&addr, "/readyz"), 200);
    // A bug that panics on many messages in a row (a crash loop).
    for _ in 0..10 {
        add_stock(&t, "boom-sku", 1).await;
    }
    let became_not_ready = harness::readyz_becomes(&addr, 503, Duration::from_secs(10)).await;
    if !became_not_ready {
        let log = std::fs::read_to_string(t.shop.logs().join("inventory.log")).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| l.contains("restart") || l.contains("panicked"))
            .take(40)
            .collect();
        panic!(
            "never not ready: panics {}, restarts {}, stopped {}\n{}",
            harness::metric(&addr, "choreo_handler_panics_total", &[]),
            harness::metric(&addr, "choreo_supervisor_restarts_total", &[]),
            harness::metric(&addr, "choreo_supervisor_stopped", &[]),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert_eq!(
        harness::metric(&addr, "choreo_supervisor_stopped", &[]),
        1.0
    );
    let panics_when_stopped = harness::metric(&addr, "choreo_handler_panics_total", &[]);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        harness::metric(&addr, "choreo_handler_panics_total", &[]),
        panics_when_stopped,
        "stopped: no spinning"
    );
    // After each window it resumes; the poison messages reach their budget and are
    // dead-lettered, and the node is ready again.
    let all_dead = || async { harness::dead_letters(&t.bus).await.len() == 10 };
    assert!(
        eventually(Duration::from_secs(60), all_dead).await,
        "all 10 dead-lettered"
    );
    assert!(
        harness::readyz_becomes(&addr, 200, Duration::from_secs(15)).await,
        "ready again"
    );
    add_stock(&t, "after", 3).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            harness::sku(&t.bus, "after").await.0 == 3
        })
        .await
    );
    assert!(t.shop.dead_node().is_none());
}
