//! Security: each context's identity may do only what its code needs (the operator made
//! its streams and consumers before its nodes started, so it may create none). Every
//! refusal is the server's (nothing changed, checked as the operator), counted by the
//! refused process and in the server's log; a responder never answers on a reply subject
//! that is not an inbox; an unknown key, a certificate from another CA and plaintext to
//! the TLS port cannot connect, each with a clear error.

use std::time::Duration;

use runtime::telemetry::access::PERMISSION_VIOLATIONS;
use runtime::wire::bus::Bus;
use runtime::wire::identity::{inbox_prefix, Identity, NatsAuth};
use runtime::wire::subjects;

use crate::harness::{self, eventually, metric, TestShop};

/// What a case tries.
#[derive(Debug, Clone, Copy)]
enum Op {
    Publish,
    Subscribe,
}

/// One forbidden operation: who tries it, what, on which subject.
struct Case {
    who: &'static str,
    what: &'static str,
    op: Op,
    subject: String,
}

fn case(who: &'static str, what: &'static str, op: Op, subject: impl Into<String>) -> Case {
    Case {
        who,
        what,
        op,
        subject: subject.into(),
    }
}

/// A connection as identity `who` of the shop, its violations counted under `label`.
async fn connect_as(t: &TestShop, who: &str, label: &str) -> Bus {
    let identity = Identity {
        auth: t.shop.auth(who),
        inbox_prefix: choreo::contexts::KNOWN
            .contains(&who)
            .then(|| inbox_prefix(subjects::namespace(), who)),
        label: label.to_string(),
    };
    Bus::connect_as(&t.shop.nats.url, label, Duration::from_secs(5), &identity)
        .await
        .unwrap_or_else(|e| panic!("{who} connects: {e}"))
}

/// Messages and consumers of every context's stream, as the operator sees them.
async fn streams(bus: &Bus) -> Vec<(String, u64, Vec<String>)> {
    let mut out = Vec::new();
    for c in choreo::contexts::KNOWN {
        let s = bus
            .stream_state(&subjects::stream(c))
            .await
            .expect("the stream is still there");
        let mut consumers: Vec<String> = s.consumers.into_iter().map(|c| c.name).collect();
        consumers.sort();
        out.push((s.name, s.messages, consumers));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forbidden_operation_is_refused_counted_and_changes_nothing() {
    let t = harness::start(choreo::contexts::KNOWN, true, "").await;
    // Some history in every stream: orders placed and ended.
    let cfg = crate::order_flow::mix(20, 0.0);
    let report = choreo::load::run(&t.bus, &cfg, |_| {}).await.expect("load");
    assert_eq!(report.unfinished, 0, "{report:?}");
    let before = streams(&t.bus).await;
    // Another context's durable consumer on the orders stream.
    let theirs = before
        .iter()
        .find(|(name, _, _)| name == "CHOREO_ORDERS")
        .and_then(|(_, _, consumers)| consumers.iter().find(|c| c.starts_with("inventory_")))
        .expect("inventory consumes orders events")
        .clone();

    let cases = vec![
        case(
            "payments",
            "publish another context's event",
            Op::Publish,
            "choreo.orders.evt.OrderPlaced",
        ),
        case(
            "inventory",
            "send a command it does not send",
            Op::Publish,
            "choreo.payments.cmd.CapturePayment",
        ),
        case(
            "orders",
            "send an undeclared command",
            Op::Publish,
            "choreo.customers.cmd.RegisterCustomer",
        ),
        case(
            "payments",
            "delete another context's stream",
            Op::Publish,
            "$JS.API.STREAM.DELETE.CHOREO_ORDERS",
        ),
        case(
            "payments",
            "delete its own stream",
            Op::Publish,
            "$JS.API.STREAM.DELETE.CHOREO_PAYMENTS",
        ),
        case(
            "payments",
            "purge another context's stream",
            Op::Publish,
            "$JS.API.STREAM.PURGE.CHOREO_ORDERS",
        ),
        case(
            "payments",
            "create a stream",
            Op::Publish,
            "$JS.API.STREAM.CREATE.CHOREO_EVIL",
        ),
        case(
            "payments",
            "change its own stream",
            Op::Publish,
            "$JS.API.STREAM.UPDATE.CHOREO_PAYMENTS",
        ),
        case(
            "payments",
            "create a consumer on another's stream",
            Op::Publish,
            "$JS.API.CONSUMER.CREATE.CHOREO_ORDERS.evil",
        ),
        case(
            "payments",
            "read another context's consumer",
            Op::Publish,
            format!("$JS.API.CONSUMER.INFO.CHOREO_ORDERS.{theirs}"),
        ),
        case(
            "payments",
            "pull from another context's consumer",
            Op::Publish,
            format!("$JS.API.CONSUMER.MSG.NEXT.CHOREO_ORDERS.{theirs}"),
        ),
        case(
            "payments",
            "delete another context's consumer",
            Op::Publish,
            format!("$JS.API.CONSUMER.DELETE.CHOREO_ORDERS.{theirs}"),
        ),
        case(
            "payments",
            "write another context's lease",
            Op::Publish,
            "$KV.CHOREO_LEASES.orders.p0",
        ),
        case(
            "payments",
            "append to another context's changelog",
            Op::Publish,
            "choreo.changelog.orders.p0",
        ),
        case(
            "payments",
            "subscribe to everything",
            Op::Subscribe,
            "choreo.>",
        ),
        case(
            "payments",
            "read another context's inbox",
            Op::Subscribe,
            "_INBOX_choreo_orders.>",
        ),
        case(
            "payments",
            "read the clients' inbox",
            Op::Subscribe,
            "_INBOX.>",
        ),
        case(
            "payments",
            "inject a fault",
            Op::Publish,
            "choreo.admin.orders.faults",
        ),
        case(
            "client",
            "publish an event",
            Op::Publish,
            "choreo.payments.evt.PaymentCaptured",
        ),
        case(
            "client",
            "inject a fault",
            Op::Publish,
            "choreo.admin.payments.faults",
        ),
        case(
            "client",
            "retry a saga",
            Op::Publish,
            "choreo.saga.order-fulfilment.retry",
        ),
        case(
            "client",
            "delete a stream",
            Op::Publish,
            "$JS.API.STREAM.DELETE.CHOREO_DLQ",
        ),
        case(
            "sim",
            "send a command",
            Op::Publish,
            "choreo.orders.cmd.CancelOrder",
        ),
    ];

    for (i, c) in cases.iter().enumerate() {
        let label = format!("neg{i}");
        let bus = connect_as(&t, c.who, &label).await;
        // Twice: each attempt is refused and counted.
        for _ in 0..2 {
            match c.op {
                Op::Publish => {
                    let _ = bus.client.publish(c.subject.clone(), "{}".into()).await;
                }
                Op::Subscribe => {
                    let sub = bus.client.subscribe(c.subject.clone()).await.unwrap();
                    std::mem::forget(sub);
                }
            }
            bus.client.flush().await.unwrap();
        }
        let op = match c.op {
            Op::Publish => "publish",
            Op::Subscribe => "subscribe",
        };
        let counter = PERMISSION_VIOLATIONS.with_label_values(&[&label, op]);
        assert!(
            eventually(Duration::from_secs(5), || async { counter.get() >= 2 }).await,
            "{} may {} ({}): refused {} times",
            c.who,
            c.what,
            c.subject,
            counter.get()
        );
    }
    let logged = t.shop.violations();
    for c in &cases {
        assert!(
            logged
                .iter()
                .any(|l| l.contains(&format!("\"{}\"", c.subject))),
            "the server did not log refusing {} to {}",
            c.who,
            c.subject
        );
    }

    // Requests whose reply subject is a stream's or the JetStream API's: not answered.
    let orders_metrics = t
        .shop
        .nodes
        .iter()
        .find(|n| n.context == "orders")
        .unwrap()
        .metrics_addr
        .clone();
    let client = connect_as(&t, "client", "client").await;
    client
        .client
        .publish_with_reply(
            subjects::query("orders", "summary"),
            subjects::event("orders", "OrderPlaced"),
            "{}".into(),
        )
        .await
        .unwrap();
    client.client.flush().await.unwrap();
    t.bus
        .client
        .publish_with_reply(
            subjects::saga(sagas::NAMES[0], "list"),
            "$JS.API.STREAM.DELETE.CHOREO_ORDERS",
            "{}".into(),
        )
        .await
        .unwrap();
    t.bus.client.flush().await.unwrap();
    for service in ["query", "saga"] {
        let refused = || async {
            metric(
                &orders_metrics,
                "choreo_refused_replies_total",
                &[("service", service)],
            ) >= 1.0
        };
        assert!(
            eventually(Duration::from_secs(5), refused).await,
            "orders answered a {service} request on a reply subject that is not an inbox"
        );
    }

    // Nothing changed: the same streams, messages and consumers.
    assert_eq!(streams(&t.bus).await, before);
    // And the shop still works, with no refusal of its own.
    let report = choreo::load::run(&t.bus, &cfg, |_| {}).await.expect("load");
    assert_eq!(report.unfinished, 0, "{report:?}");
    for n in &t.shop.nodes {
        assert_eq!(
            metric(
                &n.metrics_addr,
                "choreo_nats_permission_violations_total",
                &[]
            ),
            0.0,
            "{} was refused something",
            n.context
        );
    }
    // Dropped, not stopped: the server's log holds the refusals above.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_another_ca_and_plaintext_cannot_connect() {
    let t = harness::start(&["customers"], false, "").await;
    let url = &t.shop.nats.url;
    let dir = tempfile::tempdir().unwrap();
    let operator = t.shop.auth(choreo::auth::OPERATOR);
    let attempt = |auth: NatsAuth| async move {
        let identity = Identity {
            auth,
            ..Default::default()
        };
        match Bus::connect_as(url, "test", Duration::from_secs(3), &identity).await {
            Ok(_) => panic!("connected"),
            Err(e) => e.to_string(),
        }
    };

    // A key the server does not know.
    let unknown = dir.path().join("unknown.nk");
    std::fs::write(&unknown, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let e = attempt(NatsAuth {
        seed_file: Some(unknown),
        ..operator.clone()
    })
    .await;
    assert!(e.contains("refused the credentials"), "{e}");
    // No key at all.
    let e = attempt(NatsAuth {
        seed_file: None,
        ..operator.clone()
    })
    .await;
    assert!(e.contains("refused the credentials"), "{e}");
    // The server's certificate checked against another CA.
    let (other, _) = choreo::auth::self_signed_ca("another CA").unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.pem()).unwrap();
    let e = attempt(NatsAuth {
        tls_ca: Some(other_ca),
        ..operator.clone()
    })
    .await;
    assert!(e.contains("TLS failed"), "{e}");
    // Without the CA: the system's roots do not know the shop's either.
    let e = attempt(NatsAuth {
        tls_ca: None,
        ..operator.clone()
    })
    .await;
    assert!(e.contains("TLS"), "{e}");

    // Plaintext to the TLS port: the server says TLS is required and answers nothing.
    use std::io::{BufRead, BufReader, Write};
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", t.shop.nats.port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(raw.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    raw.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    assert!(
        !rest.contains("PONG"),
        "the server answered plaintext: {rest}"
    );

    // The right key and CA do connect.
    let identity = Identity {
        auth: operator,
        ..Default::default()
    };
    Bus::connect_as(url, "test", Duration::from_secs(3), &identity)
        .await
        .expect("the operator connects");
    t.shop.stop().unwrap();
}
