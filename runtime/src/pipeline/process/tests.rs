//! The path of one message against a real store and group commit, with the external
//! system faked: every outcome `process` can come to.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;
use crate::component::{
    Component, DecodeError, ExternalCall, HandleCtx, HandleError, Outgoing, Subscription,
};
use crate::pipeline::relay::Relay;
use crate::store::{load, read, save, KeyedEntries, StateRead, StateTx};
use crate::wire::external::ExternalError;

/// Commands of context `t`: `Add {n}` adds n (n = 99: not yet, n = 98: never), `Charge {n}`
/// asks the gateway first and records its reply.
struct Counter {
    handled: AtomicU32,
}

#[derive(serde::Deserialize)]
struct Input {
    n: u32,
}

impl Component for Counter {
    type Input = (String, u32);
    fn name(&self) -> &'static str {
        "counter"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::commands("t", &["Add", "Charge"])]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Self::Input, DecodeError> {
        let i: Input = serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed {
            msg_type: msg_type.into(),
            error: e.to_string(),
        })?;
        Ok((msg_type.to_string(), i.n))
    }
    fn plan(
        &self,
        _state: &dyn StateRead,
        input: &Self::Input,
    ) -> Result<Option<ExternalCall>, HandleError> {
        Ok((input.0 == "Charge").then(|| ExternalCall {
            system: "gw",
            subject: "choreo.ext.gw.charge".into(),
            body: format!("{{\"n\":{}}}", input.1),
        }))
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Self::Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        self.handled.fetch_add(1, Ordering::SeqCst);
        match input.1 {
            99 => return Err(HandleError::Retry("not yet".into())),
            98 => return Err(HandleError::Permanent("never".into())),
            _ => {}
        }
        let total: u32 = load(tx, "total")?.unwrap_or(0);
        save(tx, "total", &(total + input.1))?;
        if let Some(reply) = ctx.external {
            save(tx, "reply", reply)?;
        }
        Ok(vec![Outgoing {
            kind: crate::component::Kind::Event,
            context: None,
            msg_type: "Added",
            payload: format!("{{\"total\":{}}}", total + input.1),
        }])
    }
}

/// The gateway: answers with what it is set to, and counts the calls.
#[derive(Default)]
struct Gateway {
    answer: Mutex<Option<Result<serde_json::Value, CallError>>>,
    calls: AtomicU32,
}

impl Calls for Gateway {
    fn call<'a>(
        &'a self,
        call: &'a ExternalCall,
        _msg_type: &'a str,
        _payload: &'a [u8],
    ) -> BoxFuture<'a, Result<serde_json::Value, CallError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = match &*self.answer.lock().unwrap() {
            Some(Ok(v)) => Ok(v.clone()),
            Some(Err(CallError::Open(d))) => Err(CallError::Open(*d)),
            _ => Err(CallError::Failed(ExternalError::Timeout {
                system: call.system,
                timeout: Duration::from_millis(5),
            })),
        };
        Box::pin(async move { answer })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    handling: Handling,
    counter: Arc<Counter>,
    gateway: Arc<Gateway>,
    handed: tokio::sync::mpsc::UnboundedReceiver<KeyedEntries>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 20).unwrap();
    let (relay, handed) = Relay::detached();
    let commit = GroupCommit::start(
        &store,
        dir.path(),
        "t",
        Default::default(),
        relay,
        Default::default(),
    )
    .unwrap();
    let counter = Arc::new(Counter {
        handled: AtomicU32::new(0),
    });
    let gateway = Arc::new(Gateway::default());
    let sub = Component::subscriptions(&*counter).remove(0);
    let handling = Handling {
        context: "t",
        component: counter.clone(),
        sub: Arc::new(sub),
        durable: "t_counter_t_cmd".into(),
        store,
        commit,
        calls: gateway.clone(),
        policy: RetryPolicy {
            immediate: 2,
            ..Default::default()
        },
        max_message_bytes: 1024,
        #[cfg(feature = "faults")]
        faults: Arc::new(crate::faults::Faults::new(&Default::default())),
        #[cfg(feature = "danger")]
        ack_before_crash: false,
    };
    Fixture {
        _dir: dir,
        handling,
        counter,
        gateway,
        handed,
    }
}

/// A message `msg_type` with `body` under id `id`, on `subject` (default: its own).
struct Msg {
    subject: String,
    headers: Option<HeaderMap>,
    payload: bytes::Bytes,
}

fn msg(id: &str, msg_type: &str, body: &str) -> Msg {
    let env = Envelope::first(id.into(), msg_type, "test", 1);
    Msg {
        subject: subjects::command("t", msg_type),
        headers: Some(env.to_headers()),
        payload: bytes::Bytes::from(body.to_string()),
    }
}

impl Fixture {
    async fn process(&self, m: &Msg) -> Outcome {
        let d = Delivery {
            subject: &m.subject,
            headers: m.headers.as_ref(),
            payload: &m.payload,
            size: m.payload.len(),
            #[cfg(feature = "danger")]
            message: None,
        };
        self.handling.process(&d).await.1
    }

    fn total(&self) -> Option<u32> {
        read(self.handling.store.reader(), "total").unwrap()
    }

    fn handled(&self) -> u32 {
        self.counter.handled.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_handled_message_is_durable_and_its_events_reach_the_relay_once() {
    let mut f = fixture();
    let add = msg("m1", "Add", r#"{"n":3}"#);
    assert_eq!(f.process(&add).await, Outcome::Handled);
    assert_eq!(f.total(), Some(3));
    let handed = f
        .handed
        .try_recv()
        .expect("its event was handed to the relay");
    assert_eq!(handed.len(), 1);
    assert_eq!(handed[0].1.subject, "choreo.t.evt.Added");
    // The same message again: a duplicate, not applied twice.
    assert_eq!(f.process(&add).await, Outcome::Duplicate);
    assert_eq!(f.total(), Some(3));
    assert!(f.handed.try_recv().is_err());
}

#[tokio::test]
async fn bad_input_is_poison_with_its_reason() {
    let f = fixture();
    let reason = |o: Outcome| match o {
        Outcome::Poison(reason, detail) => (reason, detail),
        other => panic!("not poison: {other:?}"),
    };
    let mut big = msg("m1", "Add", r#"{"n":1}"#);
    big.payload = bytes::Bytes::from(vec![b' '; 2048]);
    assert_eq!(
        reason(f.process(&big).await),
        (
            DlqReason::Oversized,
            "oversized: 2048 bytes > limit 1024".into()
        )
    );
    let mut bare = msg("m2", "Add", r#"{"n":1}"#);
    bare.headers = None;
    assert_eq!(reason(f.process(&bare).await).0, DlqReason::MissingHeader);
    let unknown = msg("m3", "Subtract", r#"{"n":1}"#);
    assert_eq!(reason(f.process(&unknown).await).0, DlqReason::UnknownType);
    let mut elsewhere = msg("m4", "Add", r#"{"n":1}"#);
    elsewhere.subject = subjects::command("t", "Charge");
    let (why, detail) = reason(f.process(&elsewhere).await);
    assert_eq!(why, DlqReason::Malformed);
    assert!(detail.contains("does not match subject"), "{detail}");
    let garbled = msg("m5", "Add", r#"{"n":"#);
    assert_eq!(reason(f.process(&garbled).await).0, DlqReason::Malformed);
    assert_eq!(f.handled(), 0, "no handler ran");
    assert_eq!(f.total(), None);
}

#[tokio::test]
async fn a_transient_failure_is_retried_at_once_then_left_to_the_disposition() {
    let f = fixture();
    let outcome = f.process(&msg("m1", "Add", r#"{"n":99}"#)).await;
    assert_eq!(outcome, Outcome::Transient("not yet".into()));
    assert_eq!(f.handled(), 3, "the attempt and two immediate retries");
    assert!(!f.handling.store.seen("t_counter_t_cmd/m1").unwrap());
}

#[tokio::test]
async fn a_permanent_failure_is_not_retried() {
    let f = fixture();
    let outcome = f.process(&msg("m1", "Add", r#"{"n":98}"#)).await;
    assert_eq!(outcome, Outcome::Permanent("never".into()));
    assert_eq!(f.handled(), 1);
}

#[tokio::test]
async fn the_external_call_comes_before_the_transaction_and_not_for_a_duplicate() {
    let f = fixture();
    let charge = msg("c1", "Charge", r#"{"n":5}"#);
    *f.gateway.answer.lock().unwrap() = Some(Ok(serde_json::json!({"approved": true})));
    assert_eq!(f.process(&charge).await, Outcome::Handled);
    let reply: serde_json::Value = read(f.handling.store.reader(), "reply").unwrap().unwrap();
    assert_eq!(reply["approved"], true, "the handler got the reply");
    assert_eq!(f.gateway.calls.load(Ordering::SeqCst), 1);
    // Redelivered: the inbox says it was handled, and the system is not called again.
    assert_eq!(f.process(&charge).await, Outcome::Duplicate);
    assert_eq!(f.gateway.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_open_breaker_delays_and_a_failed_call_is_transient() {
    let f = fixture();
    *f.gateway.answer.lock().unwrap() = Some(Err(CallError::Open(Duration::from_secs(3))));
    let outcome = f.process(&msg("c1", "Charge", r#"{"n":5}"#)).await;
    assert_eq!(outcome, Outcome::BreakerOpen(Duration::from_secs(3)));
    assert_eq!(
        f.gateway.calls.load(Ordering::SeqCst),
        1,
        "not retried at once"
    );
    *f.gateway.answer.lock().unwrap() = None;
    let outcome = f.process(&msg("c2", "Charge", r#"{"n":5}"#)).await;
    assert!(
        matches!(&outcome, Outcome::Transient(why) if why.contains("no reply")),
        "{outcome:?}"
    );
    assert_eq!(
        f.gateway.calls.load(Ordering::SeqCst),
        4,
        "three more calls"
    );
    assert_eq!(f.handled(), 0, "no transaction without the reply");
}
