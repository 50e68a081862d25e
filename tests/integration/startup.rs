//! A node started while its server accepts connections but JetStream does not answer yet (a
//! server still starting, or recovering a large store after a restart) keeps trying to
//! create its streams and becomes ready once JetStream answers, instead of exiting.

use std::time::Duration;

use choreo::procs::{find_nats_server, free_port, NatsServer, Proc};
use choreo::shop::Node;

use crate::harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_for_jetstream_to_answer_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // A server without JetStream on the port: connecting works, JetStream requests get no
    // responder.
    let mut bare = Proc::spawn(
        "nats-server",
        &find_nats_server().unwrap(),
        &[
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        &dir.path().join("bare.log"),
        &[],
    )
    .unwrap();
    bare.wait_listening(port, Duration::from_secs(15)).unwrap();

    let log = dir.path().join("customers.log");
    let url = format!("nats://127.0.0.1:{port}");
    let mut node =
        Node::spawn("customers", &url, &dir.path().join("data"), &log, None, &[]).unwrap();
    let metrics = node.metrics_addr.clone();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let node_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        node.proc.is_running(),
        "the node exited while JetStream did not answer:\n{}",
        node_log()
    );
    assert_ne!(
        harness::http_status(&metrics, "/readyz"),
        200,
        "not ready without its streams"
    );
    assert!(
        node_log().contains("JetStream did not answer; retrying"),
        "the wait is logged:\n{}",
        node_log()
    );

    // The same port, now with JetStream: the node reconnects, creates its streams, is ready.
    bare.kill9();
    let _server = NatsServer::start(&dir.path().join("nats"), Some(port), false).unwrap();
    assert!(
        harness::readyz_becomes(&metrics, 200, Duration::from_secs(30)).await,
        "ready once JetStream answers:\n{}",
        node_log()
    );
    assert!(node.proc.is_running());
    node.proc.terminate(Duration::from_secs(10)).unwrap();
}
