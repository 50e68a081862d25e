//! Test harness: a real nats-server on a free port and real `choreo node` processes (one per
//! context) in a temporary directory, all killed when the guard drops.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::HeaderMap;
use bytes::Bytes;
use choreo::shop::{Shop, ShopOptions};
use futures::StreamExt;
use runtime::wire::bus::Bus;
use runtime::wire::envelope::{new_id, now_ms};
use runtime::{wire::subjects, Envelope};

/// Node settings for tests: short ack wait and back-off so redeliveries take seconds.
pub(crate) const TEST_CONFIG: &str = r#"
external_timeout = "1s"
[consumer]
ack_wait = "3s"
max_deliver = 100
max_in_flight = 64
[retry]
immediate = 1
base = "50ms"
max = "1s"
budget = 20
handler_timeout = "2500ms"
"#;

pub(crate) struct TestShop {
    pub(crate) shop: Shop,
    pub(crate) bus: Bus,
    _dir: tempfile::TempDir,
}

/// Starts the given contexts (one process each), with or without simulators; `extra_config`
/// is appended to [`TEST_CONFIG`] (e.g. a `[stream]` table).
pub(crate) async fn start(contexts: &[&str], sim: bool, extra_config: &str) -> TestShop {
    start_config(contexts, sim, &format!("{TEST_CONFIG}\n{extra_config}")).await
}

/// Like [`start`] on a cluster of three nats-servers on loopback, every stream, consumer,
/// changelog and the lease bucket replicated three times.
pub(crate) async fn start_cluster(contexts: &[&str], sim: bool, extra_config: &str) -> TestShop {
    let config = format!("{TEST_CONFIG}\n{extra_config}\n[stream]\nreplicas = 3\n");
    start_on(contexts, sim, &config, 3).await
}

/// Like [`start`] with a whole node config instead of [`TEST_CONFIG`] plus extras.
pub(crate) async fn start_config(contexts: &[&str], sim: bool, config: &str) -> TestShop {
    start_on(contexts, sim, config, 1).await
}

async fn start_on(contexts: &[&str], sim: bool, config: &str, servers: usize) -> TestShop {
    let dir = tempfile::tempdir().expect("tempdir");
    if std::env::var("CHOREO_TEST_KEEP").is_ok() {
        eprintln!("test directory kept: {}", dir.path().display());
    }
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, config).unwrap();
    let opts = ShopOptions {
        contexts: contexts.iter().map(|s| s.to_string()).collect(),
        sim: sim.then(Vec::new),
        node_config: Some(cfg),
        servers,
        ..ShopOptions::new(dir.path().to_path_buf())
    };
    let shop = Shop::start(opts).await.expect("shop starts");
    let bus = shop.operator().await.expect("connect");
    let dir = if std::env::var("CHOREO_TEST_KEEP").is_ok() {
        let kept = dir.keep();
        tempfile::tempdir_in(kept.parent().unwrap()).unwrap()
    } else {
        dir
    };
    TestShop {
        shop,
        bus,
        _dir: dir,
    }
}

/// Every message in the dead-letter stream: (headers, payload).
pub(crate) async fn dead_letters(bus: &Bus) -> Vec<(HeaderMap, Bytes)> {
    let Ok(stream) = bus.js.get_stream(subjects::dlq_stream()).await else {
        return vec![];
    };
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("dlq consumer");
    let mut msgs = c.messages().await.expect("dlq messages");
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        out.push((m.headers.clone().unwrap_or_default(), m.payload.clone()));
    }
    out
}

/// Waits until a dead letter matching `pred` appears; returns its reason.
pub(crate) async fn wait_dead_letter(
    bus: &Bus,
    pred: impl Fn(&HeaderMap, &Bytes) -> bool,
) -> String {
    for _ in 0..40 {
        if let Some((h, _)) = dead_letters(bus)
            .await
            .into_iter()
            .find(|(h, p)| pred(h, p))
        {
            return h
                .get("Choreo-Dlq-Reason")
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("no matching dead letter arrived");
}

/// Reads one metric value (summed over series whose labels contain every `labels` pair)
/// from a node's /metrics endpoint.
pub(crate) fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    try_metric(addr, name, labels).expect("metrics endpoint")
}

/// Like [`metric`], `None` where the endpoint does not answer (a node restarting).
pub(crate) fn try_metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    choreo::shop::metric(addr, name, labels)
}

/// The `added`/`available` numbers of one sku from the inventory read model.
pub(crate) async fn sku(bus: &Bus, sku: &str) -> (u64, u64) {
    let v = choreo::client::query(bus, "inventory", "stock", serde_json::json!({}))
        .await
        .expect("stock query");
    (
        v[sku]["added"].as_u64().unwrap_or(0),
        v[sku]["available"].as_u64().unwrap_or(0),
    )
}

/// Polls `f` until it returns true or `timeout` passes.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the node's `/readyz` answers `status` within `within`.
pub(crate) async fn readyz_becomes(addr: &str, status: u16, within: Duration) -> bool {
    eventually(within, || {
        let st = http_status(addr, "/readyz");
        async move { st == status }
    })
    .await
}

/// HTTP status of `GET path` on a node's metrics endpoint.
pub(crate) fn http_status(addr: &str, path: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Runs the `choreo` binary with `args` against the shop's server; (success, output).
pub(crate) fn choreo(t: &TestShop, args: &[&str]) -> (bool, String) {
    let bin = std::env::var("CHOREO_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_choreo").into());
    let out = std::process::Command::new(bin)
        .args(args)
        .args(["--nats", &t.shop.nats.url])
        .envs(t.shop.env(choreo::auth::OPERATOR))
        .output()
        .expect("run choreo");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Publishes an `AddStock` command with a fresh envelope; returns the envelope.
pub(crate) async fn add_stock(t: &TestShop, sku: &str, qty: u64) -> Envelope {
    let env = Envelope::first(new_id(), "AddStock", "test", now_ms());
    let body = Bytes::from(serde_json::json!({ "sku": sku, "qty": qty }).to_string());
    t.bus
        .publish(
            &subjects::command("inventory", "AddStock"),
            &env,
            body.clone(),
        )
        .await
        .unwrap();
    env
}

/// `choreo chaos inject` with the given context, point, action and further flags.
pub(crate) fn inject(
    t: &TestShop,
    context: &str,
    point: &str,
    action: &str,
    extra: &[&str],
) -> (bool, String) {
    let mut args = vec![
        "chaos",
        "inject",
        "--context",
        context,
        "--point",
        point,
        "--action",
        action,
    ];
    args.extend_from_slice(extra);
    choreo(t, &args)
}
