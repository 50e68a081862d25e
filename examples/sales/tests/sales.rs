//! The sales example on real processes: a nats-server and one `sales` node per context.
//! Orders are billed, approved and shipped, or declined and cancelled; with Billing
//! stopped, the billing deadline cancels an order and the compensation refunds the bill
//! that comes late; bad input is dead-lettered; `choreo saga` and `choreo dlq` answer from
//! the nodes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use choreo::client;
use choreo::procs::{free_port, NatsServer, Proc};
use runtime::wire::bus::Bus;
use serde_json::{json, Value};

const ORDERS: usize = 20;
/// Every seventh order is over Billing's credit limit.
const DECLINED: [usize; 3] = [0, 7, 14];

/// The `choreo` binary built beside this test (by `cargo test --workspace`).
fn choreo_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("choreo");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --bin choreo` first",
        bin.display()
    );
    bin
}

struct Nodes {
    dir: PathBuf,
    nats_url: String,
    config: PathBuf,
}

impl Nodes {
    fn start(&self, context: &str) -> Proc {
        let data = self.dir.join(context).display().to_string();
        let metrics = format!("127.0.0.1:{}", free_port());
        let config = self.config.display().to_string();
        let args: Vec<String> = [
            "--context",
            context,
            "--nats",
            &self.nats_url,
            "--data",
            &data,
            "--metrics",
            &metrics,
            "--config",
            &config,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.dir.join(format!("{context}.log"));
        Proc::spawn(
            context,
            Path::new(env!("CARGO_BIN_EXE_sales")),
            &args,
            &log,
            &[],
        )
        .unwrap()
    }

    fn log(&self, context: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{context}.log"))).unwrap_or_default()
    }
}

/// Polls `check` every 100 ms until it gives a value, for at most 30 s.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn state(bus: &Bus, context: &str, aggregate: &str, order: &str) -> Option<Value> {
    client::query(bus, context, aggregate, json!({ "order": order }))
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_fulfilled_or_cancelled_and_late_billing_is_compensated() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(&dir.path().join("nats"), None, false).unwrap();
    let config = dir.path().join("sales.toml");
    std::fs::write(&config, "[sagas.order-fulfilment]\nbilling = \"2s\"\n").unwrap();
    let nodes = Nodes {
        dir: dir.path().to_path_buf(),
        nats_url: nats.url.clone(),
        config,
    };
    let sales = nodes.start("sales");
    let mut billing = nodes.start("billing");
    let shipping = nodes.start("shipping");
    let bus = client::connect(&nats.url, Duration::from_secs(15))
        .await
        .unwrap();
    for (context, aggregate) in [
        ("sales", "order"),
        ("billing", "bill"),
        ("shipping", "shipment"),
    ] {
        eventually(&format!("{context} to answer"), || {
            state(&bus, context, aggregate, "none")
        })
        .await;
    }

    let cents = |i: usize| {
        if DECLINED.contains(&i) {
            250_000
        } else {
            1_000 + i as u64
        }
    };
    for i in 0..ORDERS {
        let order = json!({ "order": format!("o-{i}"), "customer": "c-1", "cents": cents(i) });
        client::send_json(&bus, "sales", "PlaceOrder", &order)
            .await
            .unwrap();
    }
    for i in 0..ORDERS {
        let order = format!("o-{i}");
        let (status, want) = match DECLINED.contains(&i) {
            true => ("cancelled", "declined"),
            false => ("approved", "billed"),
        };
        let o = eventually(&format!("{order} {status}"), || async {
            let o = state(&bus, "sales", "order", &order).await?;
            (o["status"] == status).then_some(o)
        })
        .await;
        assert_eq!(o["cents"], cents(i), "{order}");
        let bill = state(&bus, "billing", "bill", &order).await.unwrap();
        if want == "declined" {
            assert_eq!(
                (&bill["declined"], &bill["billed_cents"]),
                (&json!(true), &json!(0))
            );
            continue;
        }
        assert_eq!(
            (&bill["billed_cents"], &bill["voided"]),
            (&json!(cents(i)), &json!(false))
        );
        eventually(&format!("{order} shipped"), || async {
            let s = state(&bus, "shipping", "shipment", &order).await?;
            (s["shipped"] == true).then_some(())
        })
        .await;
    }

    // Billing stops: the billing deadline cancels the order and asks for a refund.
    assert!(billing
        .terminate(Duration::from_secs(20))
        .unwrap()
        .success());
    let late = json!({ "order": "o-late", "customer": "c-2", "cents": 500 });
    client::send_json(&bus, "sales", "PlaceOrder", &late)
        .await
        .unwrap();
    eventually("o-late cancelled by the billing deadline", || async {
        let o = state(&bus, "sales", "order", "o-late").await?;
        (o["status"] == "cancelled").then_some(())
    })
    .await;
    // Billing comes back with BillCustomer and RefundCustomer waiting, handled in either
    // order: billed late then refunded, or voided first and then not billed. Either way
    // nothing stays charged; the saga stays ended.
    billing = nodes.start("billing");
    let bill = eventually("o-late voided", || async {
        let b = state(&bus, "billing", "bill", "o-late").await?;
        (b["voided"] == true).then_some(b)
    })
    .await;
    assert!(
        [json!(0), json!(500)].contains(&bill["billed_cents"]),
        "{bill}"
    );

    // Bad input is dead-lettered with its reason.
    client::send_json(&bus, "sales", "PlaceOrder", &json!({ "order": "o-bad" }))
        .await
        .unwrap();

    let choreo = |args: &[&str]| {
        let out = Command::new(choreo_bin())
            .args(args)
            .args(["--nats", &nats.url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "choreo {args:?}: {text}{err}");
        println!("$ choreo {}\n{text}", args.join(" "));
        text
    };
    let graph = choreo(&["saga", "graph", "order-fulfilment"]);
    assert!(
        graph.contains("Billing --> Cancelled: deadline:billing"),
        "{graph}"
    );
    assert!(
        graph.contains("Billing --> Shipping: CustomerBilled"),
        "{graph}"
    );
    let show = choreo(&["saga", "show", "o-late", "--saga", "order-fulfilment"]);
    assert!(show.contains("Cancelled"), "{show}");
    let show = choreo(&[
        "saga",
        "show",
        "o-late",
        "--saga",
        "order-fulfilment",
        "--json",
    ]);
    let saga: Value = serde_json::from_str(&show).unwrap();
    let history = saga["history"].as_array().unwrap();
    let cancel = history.iter().find(|h| h["to"] == "Cancelled").unwrap();
    assert_eq!(cancel["trigger"], "deadline", "{saga}");
    let list = choreo(&["saga", "list", "--saga", "order-fulfilment"]);
    for order in ["o-1", "o-7", "o-late"] {
        assert!(list.contains(order), "{order} not listed: {list}");
    }
    let dlq = eventually("o-bad dead-lettered", || async {
        let dlq = choreo(&["dlq", "list", "--context", "sales"]);
        (dlq.contains("PlaceOrder") && dlq.contains("malformed")).then_some(dlq)
    })
    .await;
    assert!(
        dlq.contains("customer"),
        "the reason names the missing field: {dlq}"
    );

    for (context, mut node) in [
        ("sales", sales),
        ("billing", billing),
        ("shipping", shipping),
    ] {
        let status = node.terminate(Duration::from_secs(20)).unwrap();
        assert!(
            status.success(),
            "{context}: {status:?}\n{}",
            nodes.log(context)
        );
    }
}
