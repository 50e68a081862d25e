//! The shipped dashboards and rules against a real Prometheus scraping real nodes under load:
//! every panel query and every rule expression is evaluated through Prometheus' HTTP API.
//! Also: promtool's rule unit tests, and the dashboards checked against the code's metrics.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use choreo::load;
use choreo::procs::{free_port, Proc};
use serde_json::Value;

use crate::harness::{self, eventually};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} not found: run scripts/install-prometheus.sh (make setup)")
        })
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.0; (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn query(port: u16, expr: &str) -> Result<usize, String> {
    let (status, body) = get(port, &format!("/api/v1/query?query={}", encode(expr)));
    let v: Value =
        serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    Ok(v["data"]["result"].as_array().map_or(0, |a| a.len()))
}

/// Every dashboard panel target: (dashboard, panel title, expr, may be empty).
fn panel_queries() -> Vec<(String, String, String, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("dashboards/grafana")).unwrap() {
        let path = entry.unwrap().path();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let dash = d["title"].as_str().unwrap().to_string();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$context", ".+");
                out.push((
                    dash.clone(),
                    p["title"].as_str().unwrap().to_string(),
                    expr,
                    t["choreoMayBeEmpty"] == true,
                ));
            }
        }
    }
    out.sort();
    out
}

/// Every `choreo_*` metric name registered in `runtime/src/telemetry/metrics.rs` and by the
/// shop (`src/business.rs`).
fn code_metrics() -> BTreeSet<String> {
    let read = |f: &str| std::fs::read_to_string(root().join(f)).unwrap();
    let src = read("runtime/src/telemetry/metrics.rs")
        + &read("runtime/src/telemetry/access.rs")
        + &read("src/business.rs");
    src.split('"')
        .filter(|s| s.starts_with("choreo_") && !s.contains(' '))
        .map(str::to_string)
        .collect()
}

/// Every `choreo_*` metric a text uses (histogram suffixes stripped).
fn used_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("choreo_") {
        if i > 0 && text.as_bytes()[i - 1] == b':' {
            continue; // a recording rule name
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |n, s| {
                n.strip_suffix(s).map(str::to_string).unwrap_or(n)
            });
        out.insert(base);
    }
    out
}

#[test]
fn dashboards_and_rules_use_only_metrics_the_code_exports_and_the_table_lists_them_all() {
    let code = code_metrics();
    assert!(code.len() >= 20, "found {code:?}");
    let table = std::fs::read_to_string(root().join("dashboards/README.md")).unwrap();
    for m in &code {
        assert!(
            table.contains(&format!("`{m}`")),
            "{m} is missing from the table in dashboards/README.md"
        );
    }
    let mut texts =
        vec![std::fs::read_to_string(root().join("dashboards/rules/choreo.rules.yml")).unwrap()];
    for (_, _, expr, _) in panel_queries() {
        texts.push(expr);
    }
    for t in texts {
        for m in used_metrics(&t) {
            assert!(
                code.contains(&m),
                "{m} is used by a dashboard or rule but not exported by the code"
            );
        }
    }
}

#[test]
fn promtool_rule_unit_tests_pass() {
    let rules = root().join("dashboards/rules");
    let check = std::process::Command::new(bin("promtool"))
        .args(["check", "rules", "choreo.rules.yml"])
        .current_dir(&rules)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = std::process::Command::new(bin("promtool"))
        .args(["test", "rules", "choreo.rules.test.yml"])
        .current_dir(&rules)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    println!("{out}");
    assert!(test.status.success() && out.contains("SUCCESS"), "{out}");
}

fn start_prometheus(dir: &Path, targets: &[String]) -> (Proc, u16) {
    let port = free_port();
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n  - job_name: choreo\n    static_configs:\n      - targets: [{}]\n",
        root().join("dashboards/rules/choreo.rules.yml").display(),
        targets.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let args: Vec<String> = vec![
        format!("--config.file={}", dir.join("prometheus.yml").display()),
        format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
    ];
    (
        Proc::spawn(
            "prometheus",
            &bin("prometheus"),
            &args,
            &dir.join("prometheus.log"),
            &[],
        )
        .unwrap(),
        port,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_panel_and_rule() {
    let mut t = harness::start(choreo::contexts::KNOWN, true, "").await;
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = t
        .shop
        .nodes
        .iter()
        .map(|n| n.metrics_addr.clone())
        .collect();
    let (_prom, port) = start_prometheus(dir.path(), &targets);
    assert!(
        eventually(Duration::from_secs(30), || async {
            get(port, "/-/ready").0 == 200
        })
        .await,
        "prometheus ready"
    );

    // Traffic with every kind of outcome, and one dead letter.
    let report = load::run(&t.bus, &crate::order_flow::mix(60, 0.0), |_| {})
        .await
        .unwrap();
    assert!(report.ok());
    // The shop's own business metric, counted by its hook on published messages.
    for (context, msg_type) in [("orders", "OrderPlaced"), ("payments", "PaymentCaptured")] {
        let addr = t.shop.node(context).unwrap().metrics_addr.clone();
        let labels = [("msg_type", msg_type)];
        let cents = harness::metric(&addr, "choreo_business_amount_cents_total", &labels);
        assert!(cents > 0.0, "{context} counted no {msg_type} amount");
    }
    publish_malformed_order(&t.bus).await;
    // Saga gauges are refreshed every 5 s, lag every 5 s; scrapes every 1 s.
    let ready = || async {
        query(port, "choreo_saga_instances{state=\"Completed\"} > 0").unwrap_or(0) > 0
            && query(port, "choreo_dead_letters_total").unwrap_or(0) > 0
            && query(port, "choreo_consumer_pending_messages").unwrap_or(0) > 0
    };
    if !eventually(Duration::from_secs(40), ready).await {
        let diag: Vec<String> = [
            "up",
            "choreo_saga_instances",
            "choreo_dead_letters_total",
            "choreo_consumer_pending_messages",
        ]
        .iter()
        .map(|q| format!("{q}: {:?}", query(port, q)))
        .collect();
        let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        panic!("series not scraped: {diag:?}\n{}", tail.join("\n"));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut problems = Vec::new();
    let mut listed = Vec::new();
    for (dash, title, expr, may_be_empty) in panel_queries() {
        match query(port, &expr) {
            Ok(0) if !may_be_empty => {
                problems.push(format!("{dash} / {title}: no series for {expr}"))
            }
            Ok(n) => listed.push(format!("panel  {dash} / {title}: {n} series")),
            Err(e) => problems.push(format!("{dash} / {title}: {e} in {expr}")),
        }
    }
    let (_, rules) = get(port, "/api/v1/rules");
    let rules: Value = serde_json::from_str(&rules).unwrap();
    let mut n_rules = 0;
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            n_rules += 1;
            let name = r["name"].as_str().unwrap();
            if r["health"] != "ok" {
                problems.push(format!(
                    "rule {name}: health {} {}",
                    r["health"], r["lastError"]
                ));
            }
            match query(port, r["query"].as_str().unwrap()) {
                Ok(n) => listed.push(format!("rule   {name}: {n} series, health {}", r["health"])),
                Err(e) => problems.push(format!("rule {name}: {e}")),
            }
        }
    }
    println!("{}", listed.join("\n"));
    assert_eq!(n_rules, 22, "every rule loaded");
    assert!(problems.is_empty(), "problems:\n{}", problems.join("\n"));
    // A few figures must be right, not just present.
    assert!(
        query(
            port,
            "choreo_messages_published_total{msg_type=\"OrderPlaced\"} >= 60"
        )
        .unwrap()
            > 0
    );
    t.shop.stop().unwrap();
}

/// Publishes a `PlaceOrder` whose body is not JSON: one dead letter.
async fn publish_malformed_order(bus: &runtime::wire::bus::Bus) {
    let env = runtime::Envelope::first(
        runtime::wire::envelope::new_id(),
        "PlaceOrder",
        "test",
        runtime::wire::envelope::now_ms(),
    );
    bus.publish(
        &runtime::wire::subjects::command("orders", "PlaceOrder"),
        &env,
        "{not json".into(),
    )
    .await
    .unwrap();
}

/// Counters exist at 0 from a node's start, so the first dead letter is an increase that
/// Prometheus sees (a series that first appears at 1 is not), and every breaker state and
/// dead-letter reason is there before anything happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_first_dead_letter_of_a_node() {
    let mut t = harness::start(&["orders", "payments"], false, "").await;
    let payments = t.shop.node("payments").unwrap().metrics_addr.clone();
    let orders = t.shop.node("orders").unwrap().metrics_addr.clone();
    assert_eq!(
        harness::metric(
            &orders,
            "choreo_dead_letters_total",
            &[("reason", "malformed")]
        ),
        0.0
    );
    for state in ["closed", "open", "half_open"] {
        let at = |v| {
            harness::try_metric(
                &payments,
                "choreo_breaker_state",
                &[("system", "payment-gateway"), ("state", state)],
            ) == Some(v)
        };
        assert!(
            at(if state == "closed" { 1.0 } else { 0.0 }),
            "breaker {state}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (_prom, port) = start_prometheus(dir.path(), &[orders.clone(), payments]);
    let scraped = || async {
        query(port, "count_over_time(choreo_dead_letters_total{reason=\"malformed\", context=\"orders\"}[1m]) >= 2")
            .unwrap_or(0)
            > 0
    };
    assert!(
        eventually(Duration::from_secs(30), scraped).await,
        "the series scraped at 0"
    );
    publish_malformed_order(&t.bus).await;
    let seen = || async {
        query(
            port,
            "choreo:dead_letters:increase10m{context=\"orders\"} > 0",
        )
        .unwrap_or(0)
            > 0
    };
    assert!(
        eventually(Duration::from_secs(30), seen).await,
        "the first dead letter is an increase: {:?}",
        query(port, "choreo_dead_letters_total{context=\"orders\"}")
    );
}

/// Replies to a `$SRV` discovery request, collected for a second.
async fn srv(bus: &runtime::wire::bus::Bus, subject: &str) -> Vec<Value> {
    use futures::StreamExt;
    let inbox = bus.client.new_inbox();
    let mut sub = bus.client.subscribe(inbox.clone()).await.unwrap();
    bus.client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1000), sub.next()).await {
        out.push(serde_json::from_slice(&m.payload).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_register_with_the_service_api_and_readiness_follows_nats() {
    let mut t = harness::start(&["orders", "inventory"], false, "").await;
    let infos = srv(&t.bus, "$SRV.INFO").await;
    let names: BTreeSet<String> = infos
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["choreo-inventory".to_string(), "choreo-orders".to_string()])
    );
    let orders = infos.iter().find(|i| i["name"] == "choreo-orders").unwrap();
    assert_eq!(orders["version"], env!("CARGO_PKG_VERSION"));
    let subjects: Vec<&str> = orders["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert!(
        subjects.contains(&"choreo.orders.query.order"),
        "{subjects:?}"
    );
    assert_eq!(srv(&t.bus, "$SRV.PING").await.len(), 2);
    // STATS carry the messages each context handled.
    let env = runtime::Envelope::first(
        runtime::wire::envelope::new_id(),
        "AddStock",
        "test",
        runtime::wire::envelope::now_ms(),
    );
    let body = serde_json::json!({"sku": "s", "qty": 1}).to_string();
    t.bus
        .publish(
            &runtime::wire::subjects::command("inventory", "AddStock"),
            &env,
            body.into(),
        )
        .await
        .unwrap();
    let handled = || async {
        srv(&t.bus, "$SRV.STATS.choreo-inventory")
            .await
            .iter()
            .any(|s| {
                s["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["data"]["messages_handled"].as_u64().unwrap_or(0) >= 1)
            })
    };
    assert!(
        eventually(Duration::from_secs(15), handled).await,
        "STATS count handled messages"
    );

    // Readiness follows the NATS connection.
    let addr = t.shop.node("inventory").unwrap().metrics_addr.clone();
    assert_eq!(harness::http_status(&addr, "/readyz"), 200);
    assert_eq!(harness::http_status(&addr, "/healthz"), 200);
    t.shop.nats.kill9();
    assert!(
        harness::readyz_becomes(&addr, 503, Duration::from_secs(15)).await,
        "not ready without NATS"
    );
    assert_eq!(
        harness::http_status(&addr, "/healthz"),
        200,
        "alive all the same"
    );
    t.shop.nats.start_again().unwrap();
    assert!(
        harness::readyz_becomes(&addr, 200, Duration::from_secs(30)).await,
        "ready again once NATS is back"
    );
}
