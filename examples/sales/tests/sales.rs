//! The sales example on real processes: a nats-server and one `sales` node per context.
//! Orders are billed, approved and shipped, or declined and cancelled; with Billing
//! stopped, the billing deadline cancels an order and the compensation refunds the bill
//! that comes late; bad input is dead-lettered; `choreo saga` and `choreo dlq` answer from
//! the nodes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use choreo::procs::{free_port, NatsServer, Proc};
use runtime::client;
use runtime::wire::bus::Bus;
use serde_json::{json, Value};

/// What a client of the application declares of its wire contract: the messages it sends
/// and waits for (JSON on the wire; no dependency on the application's crate).
#[derive(serde::Serialize, serde::Deserialize)]
struct PlaceOrder {
    order: String,
    customer: String,
    cents: u64,
}
runtime::message!(PlaceOrder, Command, "sales");

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderApproved {
    order: String,
}
runtime::message!(OrderApproved, Event, "sales");

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
    /// A nats-server in `dir`, and nodes against it reading `config` (a TOML text).
    fn new(dir: &Path, config: &str) -> (NatsServer, Nodes) {
        let nats = NatsServer::start(&dir.join("nats"), None, false).unwrap();
        let path = dir.join("sales.toml");
        std::fs::write(&path, config).unwrap();
        let nodes = Nodes {
            dir: dir.to_path_buf(),
            nats_url: nats.url.clone(),
            config: path,
        };
        (nats, nodes)
    }

    /// Runs `choreo ARGS` against this server, in namespace `ns` if given.
    fn choreo(&self, ns: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(choreo_bin());
        cmd.args(args).args(["--nats", &self.nats_url]);
        if let Some(ns) = ns {
            cmd.args(["--namespace", ns]);
        }
        cmd.output().unwrap()
    }

    /// Like [`Nodes::choreo`], asserting success; prints and returns the output.
    fn choreo_ok(&self, ns: Option<&str>, args: &[&str]) -> String {
        let out = self.choreo(ns, args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "choreo {args:?}: {text}{err}");
        println!("$ choreo {}\n{text}", args.join(" "));
        text
    }

    fn start(&self, context: &str) -> Proc {
        self.start_in(context, context, &[])
    }

    /// A node hosting `context`, named `name` (its data directory and log), with `extra`
    /// arguments.
    fn start_in(&self, name: &str, context: &str, extra: &[&str]) -> Proc {
        let data = self.dir.join(name).display().to_string();
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
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        let log = self.dir.join(format!("{name}.log"));
        let bin = Path::new(env!("CARGO_BIN_EXE_sales"));
        Proc::spawn(name, bin, &args, &log, &[]).unwrap()
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
    let config = "[sagas.order-fulfilment]\nbilling = \"2s\"\n";
    let (nats, nodes) = Nodes::new(dir.path(), config);
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
    // A client's typed API: watch for an event, send the commands, wait for the event.
    let approved = client::watch::<OrderApproved>(&bus).await.unwrap();
    for i in 0..ORDERS {
        let (order, customer) = (format!("o-{i}"), "c-1".to_string());
        let cents = cents(i);
        client::send(
            &bus,
            &PlaceOrder {
                order,
                customer,
                cents,
            },
        )
        .await
        .unwrap();
    }
    let last = format!("o-{}", ORDERS - 1);
    let seen = approved
        .until(|e| e.order == last, Duration::from_secs(30))
        .await;
    assert_eq!(seen.unwrap().order, last);
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

    let choreo = |args: &[&str]| nodes.choreo_ok(None, args);
    let running = choreo(&["contexts", "--json"]);
    let running: Value = serde_json::from_str(&running).unwrap();
    let found: Vec<(String, Value, Value)> = running
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["context"].as_str().unwrap().to_string(),
                c["queries"].clone(),
                c["sagas"].clone(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                "billing".to_string(),
                json!(["bill", "invariant-charges"]),
                json!([])
            ),
            (
                "sales".to_string(),
                json!(["order"]),
                json!(["order-fulfilment"])
            ),
            ("shipping".to_string(), json!(["shipment"]), json!([])),
        ],
        "{running}"
    );
    choreo(&["contexts"]);
    let graph = choreo(&["saga", "graph", "order-fulfilment"]);
    assert!(
        graph.contains("Billing --> Cancelled: BillingDeclined|deadline:billing"),
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
    // Any application's declared invariants; the shop's are not this application's.
    let verify = choreo(&["verify"]);
    assert!(
        verify.contains("billing.charges checked") && verify.contains("verify: OK"),
        "{verify}"
    );
    assert!(
        verify.contains("the shop's invariants: not checked"),
        "{verify}"
    );
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

/// Two copies of the application in two namespaces on one nats-server: each has its own
/// streams and subjects, the same order id lives once in each, and neither sees the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_namespaces_share_one_server_without_seeing_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, nodes) = Nodes::new(dir.path(), "");
    let run = |ns: &str, args: &[&str]| nodes.choreo(Some(ns), args);
    let choreo = |ns: &str, args: &[&str]| nodes.choreo_ok(Some(ns), args);
    let mut apps = Vec::new();
    for ns in ["east", "west"] {
        apps.push(nodes.start_in(ns, "all", &["--namespace", ns]));
    }
    for (ns, cents) in [("east", 1100), ("west", 2200)] {
        // It may have to wait for the node to create its streams.
        let order = format!(r#"{{"order": "o-1", "customer": "c-{ns}", "cents": {cents}}}"#);
        eventually(&format!("{ns} to take the order"), || async {
            let sent = run(ns, &["send", "sales", "PlaceOrder", &order]);
            sent.status.success().then_some(())
        })
        .await;
    }
    let only_east = r#"{"order": "o-east", "customer": "c", "cents": 10}"#;
    choreo("east", &["send", "sales", "PlaceOrder", only_east]);
    for (ns, order, cents) in [
        ("east", "o-1", 1100),
        ("west", "o-1", 2200),
        ("east", "o-east", 10),
    ] {
        let request = format!(r#"{{"order": "{order}"}}"#);
        eventually(&format!("{ns} {order} approved"), || async {
            let out = run(ns, &["query", "sales", "order", &request]);
            let o: Value = serde_json::from_slice(&out.stdout).ok()?;
            (o["status"] == "approved" && o["cents"] == cents).then_some(())
        })
        .await;
    }
    let west = choreo(
        "west",
        &["query", "sales", "order", r#"{"order": "o-east"}"#],
    );
    let west: Value = serde_json::from_str(&west).unwrap();
    assert_eq!(west["status"], Value::Null, "west saw east's order: {west}");
    let listed = choreo("west", &["saga", "list", "--saga", "order-fulfilment"]);
    assert!(
        listed.contains("o-1") && !listed.contains("o-east"),
        "{listed}"
    );
    // Discovery sees one namespace: west's three contexts, not east's.
    let running: Value = serde_json::from_str(&choreo("west", &["contexts", "--json"])).unwrap();
    let contexts: Vec<&str> = running
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["context"].as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["billing", "sales", "shipping"], "{running}");
    let streams = choreo("east", &["streams"]);
    assert!(streams.contains("EAST_SALES"), "{streams}");
    assert!(!streams.contains("WEST_"), "{streams}");

    for (ns, mut app) in ["east", "west"].into_iter().zip(apps) {
        let status = app.terminate(Duration::from_secs(20)).unwrap();
        assert!(status.success(), "{ns}: {status:?}\n{}", nodes.log(ns));
    }
}
