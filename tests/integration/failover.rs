//! Two nodes of one context: one owns the partition, the other stands by and takes it over
//! when the owner is killed (its disk lost or not) or stopped for longer than its lease,
//! restoring the state from the changelog on JetStream; and the loss of a stream's leader
//! among three nats-servers. Every order ends as set up and nothing is doubled. The runs are
//! on a cluster of three nats-servers on loopback with everything replicated three times
//! (R3), except one takeover on the single server of the default set-up.

use std::time::{Duration, Instant};

use choreo::shop::Node;
use choreo::{load, verify};
use nix::sys::signal::Signal;

use crate::harness::{self, metric, TestShop};
use crate::order_flow::mix;

/// A short lease, so that takeovers come within seconds.
const TTL: Duration = Duration::from_secs(5);

/// A short lease, so that takeovers come within seconds; a snapshot whenever a takeover
/// replays `snapshot_after` records or more.
fn config(snapshot_after: u64) -> String {
    format!(
        "[ownership]\nlease_ttl = \"{}s\"\nsnapshot_after = {snapshot_after}\n",
        TTL.as_secs()
    )
}

/// Snapshots after one record: every takeover after the first message puts one.
const SNAPSHOTS: u64 = 1;
/// No snapshot: the whole log stays, with every owner's records.
const NO_SNAPSHOTS: u64 = 1_000_000;

fn owned(addr: &str) -> Option<f64> {
    harness::try_metric(
        addr,
        "choreo_partition_owned",
        &[("context", "orders"), ("partition", "0")],
    )
}

/// The shop (on `servers` nats-servers) with a second orders node, once that one says it
/// stands by.
async fn with_standby(servers: usize, snapshot_after: u64) -> (TestShop, Node) {
    let config = config(snapshot_after);
    let t = if servers > 1 {
        harness::start_cluster(choreo::contexts::KNOWN, true, &config).await
    } else {
        harness::start(choreo::contexts::KNOWN, true, &config).await
    };
    if let Some(route) = t.shop.nats.route_port() {
        // The servers route to each other over TLS: a route port expects the handshake
        // first and says nothing in plaintext (a plaintext one sends its INFO at once).
        use std::io::Read;
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", route)).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut said = [0u8; 4];
        let n = raw.read(&mut said).unwrap_or(0);
        assert_ne!(&said[..n], b"INFO", "the route port talks plaintext");
    }
    let standby = t.shop.spawn_standby("orders", "orders-2").unwrap();
    let addr = standby.metrics_addr.clone();
    assert!(
        harness::eventually(Duration::from_secs(20), || {
            let addr = addr.clone();
            async move { owned(&addr) == Some(0.0) }
        })
        .await,
        "the second orders node stands by"
    );
    (t, standby)
}

/// The orders node that owns the partition: the first one, as it started first.
fn owner_addr(t: &mut TestShop) -> String {
    t.shop.node("orders").unwrap().metrics_addr.clone()
}

/// The epoch of every record of the orders changelog, in order.
async fn changelog_epochs(t: &TestShop) -> Vec<u64> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    let stream = t
        .bus
        .js
        .get_stream(runtime::wire::subjects::changelog_stream("orders"))
        .await
        .unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = reader.messages().await.unwrap();
    let mut epochs = Vec::new();
    while let Some(m) = messages.next().await {
        let m = m.unwrap();
        let epoch = m
            .headers
            .as_ref()
            .and_then(|h| h.get(runtime::wire::changelog::EPOCH_HEADER))
            .and_then(|v| v.as_str().parse().ok())
            .expect("every record names its epoch");
        epochs.push(epoch);
        if m.info().unwrap().stream_sequence >= last {
            break;
        }
    }
    epochs
}

/// The snapshots of orders in the object store.
async fn snapshots(t: &TestShop) -> usize {
    use futures::StreamExt;
    let store = t
        .bus
        .js
        .get_object_store(runtime::wire::subjects::snapshot_bucket("orders"))
        .await
        .unwrap();
    let mut list = store.list().await.unwrap();
    let mut n = 0;
    while let Some(info) = list.next().await {
        let info = info.unwrap();
        if !info.deleted && info.name.starts_with("orders.p0.") {
            n += 1;
        }
    }
    n
}

/// No record of an earlier owner after a later owner's first: the fence held.
fn fenced_in_order(epochs: &[u64]) -> Vec<(u64, usize)> {
    assert!(
        epochs.windows(2).all(|w| w[0] <= w[1]),
        "an old owner's record landed after a newer owner's: {epochs:?}"
    );
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for e in epochs {
        match runs.last_mut() {
            Some((last, n)) if last == e => *n += 1,
            _ => runs.push((*e, 1)),
        }
    }
    runs
}

async fn finish_clean(
    t: &TestShop,
    run: tokio::task::JoinHandle<anyhow::Result<load::LoadReport>>,
    n: usize,
) {
    let report = run.await.unwrap().expect("load completes");
    assert_eq!(report.placed, n);
    assert_eq!(report.unfinished, 0, "no order lost");
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    let v = verify::run(&t.bus, Some(&report.run_id)).await.unwrap();
    assert!(v.ledgers_checked);
    assert_eq!(v.checks["once"].checked, n);
    assert_eq!(
        v.violations(),
        0,
        "nothing doubled, nothing half done: {:#?}",
        v.checks
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_of_a_context_one_owns_the_other_stands_by() {
    let (mut t, mut standby) = with_standby(3, SNAPSHOTS).await;
    let owner = owner_addr(&mut t);
    assert_eq!(
        owned(&owner),
        Some(1.0),
        "the first node owns the partition"
    );

    // The orders line names the owner and the standby (node names hold a '/'). The bucket's
    // reads may come from a replica a moment behind its leader: asked until it shows both.
    let mut out = String::new();
    let shown = harness::eventually(Duration::from_secs(10), || {
        let (ok, text) = harness::choreo(&t, &["cluster", "status"]);
        out = text;
        let line = out
            .lines()
            .find(|l| l.starts_with("orders "))
            .unwrap_or_default()
            .to_string();
        async move { ok && !line.contains("NONE") && line.matches('/').count() == 2 }
    })
    .await;
    assert!(shown, "an owner and one standby for orders: {out}");

    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &mix(400, 100.0), |_| {}).await });
    finish_clean(&t, run, 400).await;
    // One of the two owns the partition (on this busy machine an owner may lose its lease
    // and the other take over; the run must end clean either way).
    let addrs = [standby.metrics_addr.clone(), owner.clone()];
    let one_owner = harness::eventually(Duration::from_secs(10), || {
        let n = addrs.iter().filter(|a| owned(a) == Some(1.0)).count();
        async move { n == 1 }
    })
    .await;
    assert!(one_owner, "exactly one owner");
    standby.proc.kill9();
    t.shop.stop().unwrap();
}

/// Kills the owner under load (and with `lose_disk` deletes its data directory): the standby
/// takes over within the lease's time to live plus 5 s and the run ends clean.
async fn kill_the_owner(lose_disk: bool, servers: usize) {
    let (mut t, standby) = with_standby(servers, SNAPSHOTS).await;
    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &mix(400, 100.0), |_| {}).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.shop.kill9("orders").unwrap();
    let killed = Instant::now();
    if lose_disk {
        std::fs::remove_dir_all(t.shop.data_dir().join("orders")).unwrap();
    }
    let addr = standby.metrics_addr.clone();
    assert!(
        harness::eventually(TTL + Duration::from_secs(5), || {
            let addr = addr.clone();
            async move { owned(&addr) == Some(1.0) && harness::http_status(&addr, "/readyz") == 200 }
        })
        .await,
        "the standby serves within the lease TTL + 5 s"
    );
    println!(
        "takeover after kill -9{}: {:.1} s (lease TTL {} s)",
        if lose_disk { " and the lost disk" } else { "" },
        killed.elapsed().as_secs_f64(),
        TTL.as_secs()
    );
    finish_clean(&t, run, 400).await;
    // The snapshot the takeover put removed the old owner's records; what is left is the
    // new owner's, from its fence record on.
    fenced_in_order(&changelog_epochs(&t).await);
    // From its log, which a restart in place (a lease it lost on this busy machine) keeps.
    let log = std::fs::read_to_string(t.shop.logs().join("orders-2.log")).unwrap();
    assert!(
        log.contains("restored the partition from its changelog"),
        "the standby restored the state from the changelog"
    );
    assert!(
        snapshots(&t).await >= 1,
        "the takeover put a snapshot of orders"
    );
    // The standby now stands in for the killed node.
    *t.shop.node("orders").unwrap() = standby;
    if lose_disk {
        // Its disk goes too: a third node restores from the snapshot and the records after.
        t.shop.kill9("orders").unwrap();
        std::fs::remove_dir_all(t.shop.data_dir().join("../data-orders-2")).unwrap();
        let third = t.shop.spawn_standby("orders", "orders-3").unwrap();
        *t.shop.node("orders").unwrap() = third;
        t.shop.wait_ready(Duration::from_secs(60)).await.unwrap();
        let log = std::fs::read_to_string(t.shop.logs().join("orders-3.log")).unwrap();
        assert!(log.contains("restored the partition's snapshot"), "{log}");
        let v = verify::run(&t.bus, None).await.unwrap();
        assert_eq!(v.checks["once"].checked, 400);
        assert_eq!(
            v.violations(),
            0,
            "the snapshot and its tail hold every order: {:#?}",
            v.checks
        );
    }
    t.shop.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_the_standby_takes_over() {
    kill_the_owner(false, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_single_server_too_the_standby_takes_over() {
    kill_the_owner(false, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owners_disk_lost_the_standby_restores_from_jetstream() {
    kill_the_owner(true, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_owner_loses_its_lease_and_lands_nothing_after_it() {
    let (mut t, standby) = with_standby(3, NO_SNAPSHOTS).await;
    let owner = owner_addr(&mut t);
    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &mix(400, 100.0), |_| {}).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.shop
        .node("orders")
        .unwrap()
        .proc
        .signal(Signal::SIGSTOP)
        .unwrap();
    let addr = standby.metrics_addr.clone();
    assert!(
        harness::eventually(TTL * 2 + Duration::from_secs(5), || {
            let addr = addr.clone();
            async move { owned(&addr) == Some(1.0) }
        })
        .await,
        "the standby takes over from the stopped owner"
    );
    tokio::time::sleep(TTL * 2).await;
    t.shop
        .node("orders")
        .unwrap()
        .proc
        .signal(Signal::SIGCONT)
        .unwrap();
    // The old owner notices and restarts in place as a standby; what it tried to append
    // meanwhile was refused or not tried.
    assert!(
        harness::eventually(Duration::from_secs(20), || {
            let owner = owner.clone();
            async move { owned(&owner) == Some(0.0) }
        })
        .await,
        "the old owner stands by after SIGCONT"
    );
    let restarts = metric(
        &owner,
        "choreo_node_restarts_in_place_total",
        &[("reason", "lease_lost")],
    );
    assert!(
        restarts >= 1.0,
        "it gave the partition up by restarting in place"
    );
    finish_clean(&t, run, 400).await;
    let log = std::fs::read_to_string(t.shop.logs().join("orders.log")).unwrap();
    let lost = log.matches("lost the partition's lease").count();
    let refused = log.matches("append refused").count() + log.matches("not appended").count();
    let runs = fenced_in_order(&changelog_epochs(&t).await);
    println!(
        "old owner after SIGCONT: lease loss logged {lost}x, appends refused or not tried {refused}, \
         restarts in place {restarts}; changelog records by epoch {runs:?}"
    );
    assert!(lost >= 1, "the old owner logged its loss");
    assert!(
        runs.len() >= 2,
        "two owners appended, one after the other: {runs:?}"
    );
    let mut old = std::mem::replace(t.shop.node("orders").unwrap(), standby);
    old.proc.kill9();
    t.shop.stop().unwrap();
}

async fn stream_leader(t: &TestShop, stream: &str) -> String {
    let mut s = t.bus.js.get_stream(stream).await.unwrap();
    let info = s.info().await.unwrap();
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a replicated stream has a leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_stream_leader_publishing_resumes() {
    let mut t = harness::start_cluster(choreo::contexts::KNOWN, true, &config(SNAPSHOTS)).await;
    let orders = runtime::wire::subjects::stream("orders");
    let bus = t.bus.clone();
    let run = tokio::spawn(async move { load::run(&bus, &mix(400, 100.0), |_| {}).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = stream_leader(&t, &orders).await;
    t.shop
        .server(&leader)
        .expect("the leader is one of ours")
        .kill9();
    let killed = Instant::now();
    finish_clean(&t, run, 400).await;
    let new_leader = stream_leader(&t, &orders).await;
    println!(
        "killed {leader}, the leader of {orders}; {new_leader} leads it now; the run ended clean {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    assert_ne!(new_leader, leader);
    t.shop.stop().unwrap();
}

/// A node of two contexts takes the first lease, then stands by for the second (another
/// node holds it): the first is renewed all the while, not left to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_kept_while_its_node_stands_by_for_another() {
    use choreo::shop::{Shop, ShopOptions};
    let dir = tempfile::tempdir().unwrap();
    let node_config = dir.path().join("node.toml");
    let text = format!("{}\n{}", harness::TEST_CONFIG, config(NO_SNAPSHOTS));
    std::fs::write(&node_config, text).unwrap();
    // Anonymous: a node of two contexts needs an identity with both contexts' rights, and
    // the shop makes those only for the nodes it starts itself.
    let shop = Shop::start(ShopOptions {
        contexts: vec!["payments".into()],
        sim: None,
        node_config: Some(node_config),
        secure: false,
        ..ShopOptions::new(dir.path().to_path_buf())
    })
    .await
    .expect("payments starts");
    let mut both = shop.spawn_standby("orders,payments", "both").unwrap();
    let bus = shop.operator().await.unwrap();
    let orders = || async {
        runtime::client::partitions(&bus)
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.context == "orders")
    };
    assert!(
        harness::eventually(Duration::from_secs(20), || async {
            orders().await.is_some_and(|p| p.owner.is_some())
        })
        .await,
        "the node of orders and payments takes orders"
    );
    let owner = orders().await.and_then(|p| p.owner);
    tokio::time::sleep(3 * TTL).await;
    let p = orders().await.expect("orders' lease");
    assert_eq!(p.owner, owner, "orders changed hands");
    let renewed = p.renewed_ms_ago.expect("renewed");
    assert!(
        renewed < TTL.as_millis() as u64,
        "orders' lease was last renewed {renewed} ms ago while its node stood by for payments"
    );
    let payments = runtime::client::partitions(&bus).await.unwrap();
    let payments = payments.iter().find(|p| p.context == "payments").unwrap();
    assert_eq!(payments.standby.len(), 1, "{payments:?}");
    both.proc.kill9();
    shop.stop().unwrap();
}
