//! Consumer actors: one supervised actix actor per durable consumer, and the path of one
//! message through decode, inbox, external call, transaction, group commit and ack.
//!
//! The actor is a thin shell: it owns the pull loop (a tokio task on the node's worker
//! threads) and restarts it. Handler code runs inside `catch_unwind`; a panic naks the
//! message (it is redelivered) and stops the actor, which its `Supervisor` restarts.
//!
//! Every outcome maps explicitly to one acknowledgement:
//! - processed or duplicate           -> ack, after the store is durable;
//! - `HandleError::Retry`, store, bus -> nak with the configured back-off delay;
//! - undecodable, unknown, oversized,
//!   `HandleError::Permanent`, budget
//!   exhausted                        -> dead letter (awaited), then term.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::bus::{Bus, DeadLetter};
use crate::component::{DynComponent, HandleCtx, HandleError, Kind, Outgoing, Subscription};
use crate::config::NodeConfig;
use crate::envelope::{self, Envelope};
use crate::external;
use crate::faults::{FaultAction, FaultPoint, Faults};
use crate::flusher::GroupCommit;
use crate::metrics;
use crate::outbox::Relay;
use crate::store::{CommitError, Committed, DecideError, OutboxEntry, StateError, Store};
use crate::subjects;

/// What every consumer of one context shares.
pub struct ContextRuntime {
    pub context: &'static str,
    pub faults: Arc<Faults>,
    pub store: Store,
    pub commit: GroupCommit,
    pub relay: Relay,
    pub bus: Bus,
    pub cfg: Arc<NodeConfig>,
}

impl ContextRuntime {
    /// Commits a transition that does not come from the bus (a deadline, an operator
    /// command) through the same path as a message: one transaction with the inbox mark
    /// `inbox_key` and the outbox entries, group commit, then the outbox relay.
    pub async fn commit_local<F>(
        &self,
        inbox_key: &str,
        cause: &Envelope,
        scope: &str,
        f: F,
    ) -> Result<Committed, LocalError>
    where
        F: Fn(&dyn crate::store::StateTx) -> Result<Vec<Outgoing>, HandleError>,
    {
        let now = envelope::now_ms();
        let result = self.store.commit(inbox_key, now, |tx| {
            let out = f(tx).map_err(split_tx)?;
            Ok(to_outbox(self.context, scope, cause, out, now))
        });
        match result {
            Ok(Committed::Written { outbox_keys }) => {
                self.commit
                    .durable()
                    .await
                    .map_err(|e| LocalError::Store(e.to_string()))?;
                self.relay.durable(outbox_keys.clone());
                Ok(Committed::Written { outbox_keys })
            }
            Ok(Committed::Duplicate) => Ok(Committed::Duplicate),
            Err(CommitError::Handler(e)) => Err(LocalError::Handler(e)),
            Err(CommitError::Store(e)) => Err(LocalError::Store(e.to_string())),
        }
    }
}

/// Failure of [`ContextRuntime::commit_local`].
#[derive(Debug)]
pub enum LocalError {
    Handler(HandleError),
    Store(String),
}

impl std::fmt::Display for LocalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalError::Handler(HandleError::Retry(m)) => write!(f, "retry later: {m}"),
            LocalError::Handler(HandleError::Permanent(m)) => write!(f, "{m}"),
            LocalError::Handler(HandleError::State(s)) => write!(f, "state: {s:?}"),
            LocalError::Store(m) => write!(f, "store: {m}"),
        }
    }
}

/// Separates a transaction conflict (sled retries it) from the handler's own error.
fn split_tx(e: HandleError) -> DecideError<HandleError> {
    match e {
        HandleError::State(StateError::Tx(t)) => DecideError::Tx(t),
        other => DecideError::Handler(other),
    }
}

/// Turns what a handler sends into outbox entries with ids derived from the cause.
pub(crate) fn to_outbox(
    context: &str,
    scope: &str,
    cause: &Envelope,
    out: Vec<Outgoing>,
    now: u64,
) -> Vec<OutboxEntry> {
    out.into_iter()
        .enumerate()
        .map(|(i, o)| {
            let subject = match o.kind {
                Kind::Event => subjects::event(context, o.msg_type),
                Kind::Command => {
                    subjects::command(o.context.as_deref().unwrap_or(context), o.msg_type)
                }
            };
            OutboxEntry {
                subject,
                envelope: Envelope::caused_by(cause, scope, i, o.msg_type, context, now),
                payload: o.payload,
            }
        })
        .collect()
}

/// One durable consumer: a component's subscription to one source.
pub struct ConsumerActor {
    rt: Arc<ContextRuntime>,
    component: Arc<dyn DynComponent>,
    sub: Arc<Subscription>,
    durable: Arc<str>,
    node_shutdown: watch::Receiver<bool>,
    run_stop: Option<watch::Sender<bool>>,
    run: Option<JoinHandle<()>>,
}

impl ConsumerActor {
    pub fn new(
        rt: Arc<ContextRuntime>,
        component: Arc<dyn DynComponent>,
        sub: Subscription,
        node_shutdown: watch::Receiver<bool>,
    ) -> Self {
        let durable = durable_name(rt.context, component.name(), &sub);
        ConsumerActor {
            rt,
            component,
            sub: Arc::new(sub),
            durable: durable.into(),
            node_shutdown,
            run_stop: None,
            run: None,
        }
    }
}

/// Durable consumer name: `<context>_<component>_<source>_<kind>`.
pub fn durable_name(context: &str, component: &str, sub: &Subscription) -> String {
    format!("{context}_{component}_{}_{}", sub.source, sub.kind.token())
        .replace(['.', ' ', '-'], "_")
}

impl Actor for ConsumerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let (stop_tx, stop_rx) = watch::channel(false);
        self.run_stop = Some(stop_tx);
        let pull = PullLoop {
            rt: self.rt.clone(),
            component: self.component.clone(),
            sub: self.sub.clone(),
            durable: self.durable.clone(),
            actor: ctx.address(),
        };
        let shutdown = self.node_shutdown.clone();
        self.run = Some(tokio::spawn(pull.run(stop_rx, shutdown)));
        tracing::debug!(consumer = %self.durable, "consumer started");
    }
}

impl Supervised for ConsumerActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        metrics::ACTOR_RESTARTS
            .with_label_values(&[self.rt.context, &self.durable])
            .inc();
        tracing::warn!(consumer = %self.durable, "consumer restarting after a handler panic");
        // The old loop drains (naks what it buffered, finishes in-flight work) on its own.
        if let Some(stop) = self.run_stop.take() {
            let _ = stop.send(true);
        }
        self.run = None;
    }
}

/// Sent by the pull loop when handler code panicked.
#[derive(Message)]
#[rtype(result = "()")]
struct Panicked;

impl Handler<Panicked> for ConsumerActor {
    type Result = ();
    fn handle(&mut self, _: Panicked, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Asks the actor for its pull loop so the node can wait for it to drain at shutdown.
#[derive(Message)]
#[rtype(result = "Option<JoinHandle<()>>")]
pub struct TakeRun;

impl Handler<TakeRun> for ConsumerActor {
    type Result = Option<JoinHandle<()>>;
    fn handle(&mut self, _: TakeRun, _ctx: &mut Self::Context) -> Self::Result {
        self.run.take()
    }
}

struct PullLoop {
    rt: Arc<ContextRuntime>,
    component: Arc<dyn DynComponent>,
    sub: Arc<Subscription>,
    durable: Arc<str>,
    actor: Addr<ConsumerActor>,
}

impl PullLoop {
    async fn run(self, mut stop: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let max = this.rt.cfg.consumer.max_in_flight;
        let permits = Arc::new(Semaphore::new(max));
        let stopped =
            |s: &watch::Receiver<bool>, n: &watch::Receiver<bool>| *s.borrow() || *n.borrow();
        // Bind to the durable consumer, retrying while NATS or the stream is unavailable.
        let mut messages = loop {
            let attempt = async {
                let c = this
                    .rt
                    .bus
                    .durable_consumer(&this.durable, &this.sub, &this.rt.cfg)
                    .await?;
                c.stream()
                    .max_messages_per_batch(max)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(|e| crate::bus::BusError::JetStream {
                        what: format!("pull {}", this.durable),
                        message: e.to_string(),
                    })
            };
            match attempt.await {
                Ok(m) => break m,
                Err(e) => {
                    tracing::warn!(consumer = %this.durable, error = %e, "cannot bind consumer; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                        _ = shutdown.changed() => {}
                    }
                    if stopped(&stop, &shutdown) {
                        return;
                    }
                }
            }
        };
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore open"),
                _ = stop.changed() => break,
                _ = shutdown.changed() => break,
            };
            let next = tokio::select! {
                m = messages.next() => m,
                _ = stop.changed() => break,
                _ = shutdown.changed() => break,
            };
            match next {
                Some(Ok(msg)) => {
                    let this = this.clone();
                    tokio::spawn(async move {
                        this.process_guarded(msg).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(consumer = %this.durable, error = %e, "pull error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    tracing::warn!(consumer = %this.durable, "message stream ended");
                    break;
                }
            }
        }
        // Stop pulling: give back what was buffered but not started, so another node (or
        // the restarted actor) gets it now instead of after ack_wait.
        let mut returned = 0;
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_millis(20), messages.next()).await
        {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            returned += 1;
        }
        drop(messages);
        // Finish in-flight work.
        let _ =
            tokio::time::timeout(this.rt.cfg.ack_wait(), permits.acquire_many(max as u32)).await;
        tracing::debug!(consumer = %this.durable, returned, "consumer drained");
    }

    async fn process_guarded(&self, msg: jetstream::Message) {
        let started = Instant::now();
        let msg = Arc::new(msg);
        let result = AssertUnwindSafe(self.process(&msg)).catch_unwind().await;
        let (msg_type, outcome) = match result {
            Ok(r) => r,
            Err(panic) => {
                let what = panic_message(&panic);
                metrics::HANDLER_PANICS
                    .with_label_values(&[self.rt.context, &self.durable])
                    .inc();
                tracing::error!(consumer = %self.durable, subject = %msg.subject, panic = %what, "handler panicked");
                let outcome = self
                    .fail(&msg, "unknown", &format!("handler panicked: {what}"), false)
                    .await;
                // Restart the actor; `send` (not `do_send`) so the request is not silently lost.
                let _ = self.actor.send(Panicked).await;
                ("unknown", outcome)
            }
        };
        metrics::MESSAGES
            .with_label_values(&[self.rt.context, &self.durable, outcome])
            .inc();
        metrics::HANDLER_SECONDS
            .with_label_values(&[self.rt.context, msg_type, outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The path of one message. Returns the (bounded) type label and the outcome label.
    async fn process(&self, msg: &jetstream::Message) -> (&'static str, &'static str) {
        let rt = &self.rt;
        let size = msg.length.max(msg.payload.len());
        if size > rt.cfg.max_message_bytes {
            let reason = format!(
                "oversized: {size} bytes > limit {}",
                rt.cfg.max_message_bytes
            );
            return ("unknown", self.dead_letter(msg, "oversized", &reason).await);
        }
        let env = match Envelope::from_headers(msg.headers.as_ref()) {
            Ok(env) => env,
            Err(e) => {
                return (
                    "unknown",
                    self.dead_letter(msg, "missing_header", &e.to_string())
                        .await,
                )
            }
        };
        let Some(msg_type) = self.sub.types.iter().copied().find(|t| *t == env.msg_type) else {
            let reason = format!("unknown message type {:?} on {}", env.msg_type, msg.subject);
            return (
                "unknown",
                self.dead_letter(msg, "unknown_type", &reason).await,
            );
        };
        if subjects::last_token(&msg.subject) != env.msg_type {
            let reason = format!(
                "type header {:?} does not match subject {}",
                env.msg_type, msg.subject
            );
            return ("unknown", self.dead_letter(msg, "malformed", &reason).await);
        }
        if let Some(outcome) = self.inject(FaultPoint::Handler, msg, msg_type).await {
            return (msg_type, outcome);
        }
        let inbox_key = format!("{}/{}", self.durable, env.id);
        match rt.store.seen(&inbox_key) {
            Ok(true) => return (msg_type, self.ack_durable(msg, "duplicate").await),
            Ok(false) => {}
            Err(e) => {
                return (
                    msg_type,
                    self.fail(msg, msg_type, &format!("store: {e}"), false)
                        .await,
                )
            }
        }
        let input = match self.component.decode(msg_type, &msg.payload) {
            Ok(i) => i,
            Err(e) => {
                return (
                    msg_type,
                    self.dead_letter(msg, "malformed", &e.to_string()).await,
                )
            }
        };
        let reply = match self.component.plan(rt.store.reader(), input.as_ref()) {
            Ok(None) => None,
            Ok(Some(call)) => {
                let timeout = Duration::from_millis(rt.cfg.external_timeout_ms);
                match external::call(&rt.bus.client, &call, timeout).await {
                    Ok(v) => Some(v),
                    Err(e) => {
                        return (
                            msg_type,
                            self.fail(msg, msg_type, &e.to_string(), false).await,
                        )
                    }
                }
            }
            Err(e) => return (msg_type, self.handle_error(msg, msg_type, e).await),
        };
        let now = envelope::now_ms();
        let hctx = HandleCtx {
            envelope: &env,
            now_ms: now,
            external: reply.as_ref(),
        };
        let result = rt.store.commit(&inbox_key, now, |tx| {
            let out = self
                .component
                .handle(tx, input.as_ref(), &hctx)
                .map_err(split_tx)?;
            Ok(to_outbox(rt.context, &self.durable, &env, out, now))
        });
        match result {
            Ok(Committed::Written { outbox_keys }) => {
                if let Err(e) = rt.commit.durable().await {
                    return (
                        msg_type,
                        self.fail(msg, msg_type, &e.to_string(), true).await,
                    );
                }
                if let Some(outcome) = self.inject(FaultPoint::AfterCommit, msg, msg_type).await {
                    // The effect is durable; the redelivery is absorbed by the inbox and the
                    // outbox entries are published by the next start-up scan.
                    return (msg_type, outcome);
                }
                rt.relay.durable(outbox_keys);
                (msg_type, self.ack(msg, "acked").await)
            }
            Ok(Committed::Duplicate) => (msg_type, self.ack_durable(msg, "duplicate").await),
            Err(CommitError::Handler(e)) => (msg_type, self.handle_error(msg, msg_type, e).await),
            Err(CommitError::Store(e)) => (
                msg_type,
                self.fail(msg, msg_type, &format!("store: {e}"), false)
                    .await,
            ),
        }
    }

    /// Applies an injected fault, if a rule fires. `Some(outcome)` ends the message's path.
    async fn inject(
        &self,
        point: FaultPoint,
        msg: &jetstream::Message,
        msg_type: &str,
    ) -> Option<&'static str> {
        let rule = self.rt.faults.fire(point, msg_type)?;
        match rule.action {
            FaultAction::Panic => panic!("injected fault at {point:?} for {msg_type}"),
            FaultAction::Crash => {
                tracing::error!(?point, msg_type, "injected crash: aborting the process");
                std::process::abort();
            }
            FaultAction::Error => Some(
                self.fail(
                    msg,
                    msg_type,
                    &format!("injected error at {point:?}"),
                    false,
                )
                .await,
            ),
            FaultAction::Delay => {
                tokio::time::sleep(Duration::from_millis(rule.delay_ms)).await;
                None
            }
        }
    }

    async fn handle_error(
        &self,
        msg: &jetstream::Message,
        msg_type: &str,
        e: HandleError,
    ) -> &'static str {
        match e {
            HandleError::Retry(why) => self.fail(msg, msg_type, &why, false).await,
            HandleError::Permanent(why) => self.dead_letter(msg, "permanent", &why).await,
            HandleError::State(s) => {
                self.fail(msg, msg_type, &format!("state: {s:?}"), false)
                    .await
            }
        }
    }

    /// A retryable failure: nak with back-off, or dead-letter once the budget is spent.
    async fn fail(
        &self,
        msg: &jetstream::Message,
        msg_type: &str,
        why: &str,
        store_broken: bool,
    ) -> &'static str {
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
        if delivered >= self.rt.cfg.consumer.max_deliver && !store_broken {
            let reason = format!("retries exhausted after {delivered} deliveries: {why}");
            return self.dead_letter(msg, "retries_exhausted", &reason).await;
        }
        let delay = self.rt.cfg.retry_delay(delivered);
        tracing::warn!(consumer = %self.durable, msg_type, delivered, ?delay, error = %why, "handler failed; will retry");
        let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        "retried"
    }

    /// Acks a message whose effect may still be only in memory (a duplicate of a message
    /// committed by a concurrent delivery): wait for durability first.
    async fn ack_durable(&self, msg: &jetstream::Message, outcome: &'static str) -> &'static str {
        if let Err(e) = self.rt.commit.durable().await {
            return self.fail(msg, "unknown", &e.to_string(), true).await;
        }
        self.ack(msg, outcome).await
    }

    async fn ack(&self, msg: &jetstream::Message, outcome: &'static str) -> &'static str {
        if let Err(e) = msg.ack().await {
            // Not fatal: the message is redelivered and absorbed by the inbox.
            tracing::warn!(consumer = %self.durable, error = %e, "ack failed");
        }
        outcome
    }

    /// Dead-letters the message (awaiting the DLQ publish ack), then terminates it.
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        category: &'static str,
        reason: &str,
    ) -> &'static str {
        let (delivered, seq) = msg
            .info()
            .map(|i| (i.delivered, i.stream_sequence))
            .unwrap_or((1, 0));
        let dl = DeadLetter {
            context: self.rt.context,
            consumer: &self.durable,
            subject: &msg.subject,
            reason,
            delivered,
            stream_sequence: seq,
            headers: msg.headers.as_ref(),
            payload: msg.payload.clone(),
        };
        if let Err(e) = self.rt.bus.dead_letter(&dl).await {
            tracing::error!(consumer = %self.durable, error = %e, "dead-letter publish failed; will retry");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return "retried";
        }
        tracing::warn!(consumer = %self.durable, subject = %msg.subject, category, reason, "dead-lettered");
        metrics::DEAD_LETTERS
            .with_label_values(&[self.rt.context, category])
            .inc();
        let _ = msg.ack_with(AckKind::Term).await;
        "dead_lettered"
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".into()
    }
}
