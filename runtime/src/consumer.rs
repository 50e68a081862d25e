//! Consumer actors: one supervised actix actor per durable consumer, and the path of one
//! message through decode, inbox, external call, transaction, group commit and ack.
//!
//! The actor is a thin shell: it owns the pull loop (a tokio task on the node's worker
//! threads) and restarts it. Handler code runs inside `catch_unwind`; a panic naks the
//! message (it is redelivered) and stops the actor, which its `Supervisor` restarts with
//! back-off, at most `supervision.max_restarts` times in `supervision.window_ms`; beyond
//! that the consumer stays stopped for a window and the node reports not ready.
//!
//! Every outcome maps explicitly to one acknowledgement (see `resilience` for the order in
//! which the policies stack):
//! - handled (a business rejection is an event, so handled too) or duplicate: ack, after
//!   the store is durable;
//! - transient (`HandleError::Retry`, external failure or timeout, handler timeout, panic):
//!   `retry.immediate` retries at once, then nak with the policy's back-off, counted against
//!   `retry.budget`;
//! - the external system's breaker is open: nak with the breaker's delay, not counted;
//! - the store cannot be flushed: nak, not counted (the node is the problem);
//! - undecodable, unknown type, missing header, oversized, `HandleError::Permanent`, budget
//!   exhausted: dead letter (awaited, and recorded locally), then term.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::bus::{Bus, DeadLetter};
use crate::component::{DynComponent, HandleCtx, HandleError, Kind, Outgoing, Subscription};
use crate::config::NodeConfig;
use crate::envelope::{self, Envelope};
use crate::external;
use crate::faults::{FaultAction, FaultPoint, FaultRule, Faults};
use crate::flusher::{AfterDurable, Decide, GroupCommit};
use crate::local::{Handled, Taken};
use crate::metrics::{self, Health};
use crate::outbox::Relay;
use crate::resilience::breaker::Breakers;
use crate::resilience::retry::RetryPolicy;
use crate::store::{CommitError, Committed, DecideError, OutboxEntry, StateError, Store};
use crate::subjects;

/// What every consumer of one context shares.
pub struct ContextRuntime {
    pub context: &'static str,
    pub faults: Arc<Faults>,
    pub breakers: Arc<Breakers>,
    pub health: Health,
    pub store: Store,
    pub commit: GroupCommit,
    pub relay: Relay,
    pub bus: Bus,
    pub cfg: Arc<NodeConfig>,
}

impl ContextRuntime {
    /// Commits a transition that does not come from the bus (a deadline, an operator
    /// command) through the same path as a message: the inbox mark `inbox_key` and the
    /// outbox entries in the next batch transaction, group commit, then the outbox relay.
    pub async fn commit_local<F>(
        &self,
        inbox_key: &str,
        cause: &Envelope,
        scope: &str,
        f: F,
    ) -> Result<Committed, LocalError>
    where
        F: Fn(&dyn crate::store::StateTx) -> Result<Vec<Outgoing>, HandleError> + Send + 'static,
    {
        let now = envelope::now_ms();
        let (context, scope, cause) = (self.context, scope.to_string(), cause.clone());
        let decide: Decide = Box::new(move |tx| {
            let out = f(tx).map_err(split_tx)?;
            Ok(to_outbox(context, &scope, &cause, out, now))
        });
        match self
            .commit
            .commit(inbox_key.to_string(), now, decide, None)
            .await
        {
            Ok(Committed::Written { outbox }) => {
                // Empty unless the group commit is switched off: then the entries come back
                // here and go to the relay from memory.
                self.relay.durable(outbox);
                Ok(Committed::Written { outbox: Vec::new() })
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
                amount_cents: o.amount_cents,
                handled_by: Vec::new(),
            }
        })
        .collect()
}

/// The transaction step of handling a decoded message: the component's decision (with the
/// external system's reply, if it asked for a call) as outbox entries.
pub(crate) fn handler_decide(
    context: &'static str,
    component: Arc<dyn DynComponent>,
    scope: Arc<str>,
    env: Arc<Envelope>,
    input: Arc<dyn std::any::Any + Send + Sync>,
    reply: Option<serde_json::Value>,
    now: u64,
) -> Decide {
    Box::new(move |tx| {
        let hctx = HandleCtx {
            envelope: &env,
            now_ms: now,
            external: reply.as_ref(),
        };
        let out = component
            .handle(tx, input.as_ref(), &hctx)
            .map_err(split_tx)?;
        Ok(to_outbox(context, &scope, &env, out, now))
    })
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
    /// Restarts within the current supervision window.
    restarts: VecDeque<Instant>,
    /// Stopped after exceeding the restart limit.
    given_up: bool,
    /// The JetStream message stream, kept across restarts: a restarted loop continues on the
    /// same subscription (dropping it would strand prefetched and redelivered messages in
    /// its open pull requests until `ack_wait`).
    stream: Slot,
    /// Messages this consumer handled in memory (see `local`): their JetStream copy is acked.
    handled: Arc<Handled>,
}

type Slot = Arc<tokio::sync::Mutex<Option<jetstream::consumer::pull::Stream>>>;

impl ConsumerActor {
    pub fn new(
        rt: Arc<ContextRuntime>,
        component: Arc<dyn DynComponent>,
        sub: Subscription,
        node_shutdown: watch::Receiver<bool>,
        handled: Arc<Handled>,
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
            restarts: VecDeque::new(),
            given_up: false,
            stream: Arc::new(tokio::sync::Mutex::new(None)),
            handled,
        }
    }

    /// Starts the pull loop after `delay`.
    fn spawn_loop(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        self.run_stop = Some(stop_tx);
        let pull = PullLoop {
            rt: self.rt.clone(),
            component: self.component.clone(),
            sub: self.sub.clone(),
            durable: self.durable.clone(),
            actor: ctx.address(),
            stream: self.stream.clone(),
            handled: self.handled.clone(),
        };
        let mut shutdown = self.node_shutdown.clone();
        self.run = Some(tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop_rx.changed() => return,
                    _ = shutdown.changed() => return,
                }
            }
            pull.run(stop_rx, shutdown).await
        }));
    }
}

/// The inbox mark of message `id` handled by consumer `durable` (both delivery paths, so
/// that the inbox lets one of them commit).
pub(crate) fn inbox_key(durable: &str, id: &str) -> String {
    format!("{durable}/{id}")
}

/// Durable consumer name: `<context>_<component>_<source>_<kind>`.
pub fn durable_name(context: &str, component: &str, sub: &Subscription) -> String {
    format!("{context}_{component}_{}_{}", sub.source, sub.kind.token())
        .replace(['.', ' ', '-'], "_")
}

impl Actor for ConsumerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let sup = &self.rt.cfg.supervision;
        if self.given_up {
            // Past the restart limit: stay stopped for a window, then try again.
            let window = Duration::from_millis(sup.window_ms);
            ctx.run_later(window, |act, ctx| {
                act.given_up = false;
                act.restarts.clear();
                act.rt.health.recover();
                metrics::SUPERVISOR_GIVEN_UP.with_label_values(&[act.rt.context, &act.durable]).set(0);
                tracing::warn!(consumer = %act.durable, "consumer resumes after its restart limit window");
                act.spawn_loop(ctx, Duration::ZERO);
            });
            return;
        }
        let delay = match self.restarts.len() {
            0 => 0,
            n => sup.backoff_ms[(n - 1).min(sup.backoff_ms.len() - 1)],
        };
        self.spawn_loop(ctx, Duration::from_millis(delay));
        tracing::debug!(consumer = %self.durable, delay_ms = delay, "consumer started");
    }
}

impl Supervised for ConsumerActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        metrics::ACTOR_RESTARTS
            .with_label_values(&[self.rt.context, &self.durable])
            .inc();
        // The old loop drains (naks what it buffered, finishes in-flight work) on its own.
        if let Some(stop) = self.run_stop.take() {
            let _ = stop.send(true);
        }
        self.run = None;
        let sup = &self.rt.cfg.supervision;
        let now = Instant::now();
        let window = Duration::from_millis(sup.window_ms);
        self.restarts.retain(|t| now.duration_since(*t) < window);
        self.restarts.push_back(now);
        if self.restarts.len() > sup.max_restarts && !self.given_up {
            self.given_up = true;
            self.rt.health.degrade();
            metrics::SUPERVISOR_GIVEN_UP
                .with_label_values(&[self.rt.context, &self.durable])
                .set(1);
            tracing::error!(
                consumer = %self.durable,
                restarts = self.restarts.len(),
                window_ms = sup.window_ms,
                "restart limit exceeded: consumer stopped, node not ready"
            );
        } else {
            tracing::warn!(consumer = %self.durable, restarts = self.restarts.len(), "consumer restarting after a handler panic");
        }
    }
}

/// Sent by the pull loop when handler code panicked.
#[derive(Message)]
#[rtype(result = "()")]
struct Panicked;

impl Handler<Panicked> for ConsumerActor {
    type Result = ();
    fn handle(&mut self, _: Panicked, ctx: &mut Self::Context) {
        if !self.given_up {
            ctx.stop();
        }
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
    stream: Slot,
    handled: Arc<Handled>,
}

/// The result of one attempt at handling a decoded message.
enum Attempt {
    /// Acked; the outcome label.
    Done(&'static str),
    Transient(String),
    Permanent(String),
    /// The external system's breaker is open: come back after this.
    Delayed(Duration),
    /// The store could not be made durable: not the message's fault.
    StoreBroken(String),
}

impl PullLoop {
    fn policy(&self) -> &RetryPolicy {
        self.rt.cfg.policy(self.component.name())
    }

    async fn run(self, mut stop: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        // The bulkhead: at most `max` in handling, and at most `max` prefetched (the queue).
        let max = this.rt.cfg.max_in_flight(this.component.name());
        let permits = Arc::new(Semaphore::new(max));
        let stopped =
            |s: &watch::Receiver<bool>, n: &watch::Receiver<bool>| *s.borrow() || *n.borrow();
        // The previous run's stream (after a restart), or bind to the durable consumer,
        // retrying while NATS or the stream is unavailable.
        let mut slot = this.stream.clone().lock_owned().await;
        while slot.is_none() {
            let attempt = async {
                let c = this
                    .rt
                    .bus
                    .durable_consumer(&this.durable, &this.sub, &this.rt.cfg)
                    .await?;
                // A 1 s heartbeat: a pull lost with a server restart or a cut connection is
                // noticed after two missed beats and issued again.
                c.stream()
                    .max_messages_per_batch(max)
                    .heartbeat(Duration::from_secs(1))
                    .expires(Duration::from_secs(10))
                    .messages()
                    .await
                    .map_err(|e| crate::bus::BusError::JetStream {
                        what: format!("pull {}", this.durable),
                        message: e.to_string(),
                    })
            };
            match attempt.await {
                Ok(m) => *slot = Some(m),
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
        }
        let messages = slot.as_mut().expect("bound above");
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
                    tracing::warn!(consumer = %this.durable, "message stream ended; binding again");
                    *slot = None;
                    return;
                }
            }
        }
        if !*shutdown.borrow() {
            // A restart: the next run continues on the same stream.
            return;
        }
        // Shutdown: stop pulling and give back what was buffered but not started, so another
        // node gets it now instead of after ack_wait.
        let mut returned = 0;
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_millis(20), messages.next()).await
        {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            returned += 1;
        }
        *slot = None;
        // Finish in-flight work.
        let _ =
            tokio::time::timeout(this.rt.cfg.ack_wait(), permits.acquire_many(max as u32)).await;
        tracing::debug!(consumer = %this.durable, returned, "consumer drained");
    }

    async fn process_guarded(&self, msg: jetstream::Message) {
        let started = Instant::now();
        let in_use = metrics::BULKHEAD_IN_USE.with_label_values(&[self.rt.context, &self.durable]);
        in_use.inc();
        let timeout = Duration::from_millis(self.policy().handler_timeout_ms);
        let guarded = AssertUnwindSafe(self.process(&msg)).catch_unwind();
        let (msg_type, outcome) = match tokio::time::timeout(timeout, guarded).await {
            Ok(Ok(r)) => r,
            Ok(Err(panic)) => {
                let what = panic_message(&panic);
                metrics::HANDLER_PANICS
                    .with_label_values(&[self.rt.context, &self.durable])
                    .inc();
                tracing::error!(consumer = %self.durable, subject = %msg.subject, panic = %what, "handler panicked");
                let outcome = self
                    .fail(&msg, "unknown", &format!("handler panicked: {what}"))
                    .await;
                // Restart the actor; `send` (not `do_send`) so the request is not silently lost.
                let _ = self.actor.send(Panicked).await;
                ("unknown", outcome)
            }
            Err(_) => {
                let why = format!("handler timed out after {} ms", timeout.as_millis());
                ("unknown", self.fail(&msg, "unknown", &why).await)
            }
        };
        in_use.dec();
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
        let span = tracing::info_span!(
            "message",
            context = rt.context,
            consumer = %self.durable,
            msg_type = %env.msg_type,
            id = %env.id,
            correlation = %env.correlation_id,
            causation = %env.causation_id,
            trace_id = %env.trace_id(),
        );
        let (msg_type, outcome) = self
            .process_envelope(msg, Arc::new(env))
            .instrument(span.clone())
            .await;
        span.in_scope(|| tracing::debug!(outcome, "handled"));
        (msg_type, outcome)
    }

    /// The path of a message whose envelope was read, inside its tracing span.
    async fn process_envelope(
        &self,
        msg: &jetstream::Message,
        env: Arc<Envelope>,
    ) -> (&'static str, &'static str) {
        let Some(msg_type) = self.sub.declared(&env.msg_type) else {
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
        let inbox_key = inbox_key(&self.durable, &env.id);
        let handled_here = match self.handled.take(&inbox_key) {
            Taken::Done => true,
            Taken::No => false,
            // Its in-memory handling is running: wait for it rather than run it twice.
            Taken::InFlight(ended) => {
                let limit = Duration::from_millis(self.policy().handler_timeout_ms);
                self.handled.wait(&inbox_key, ended, limit).await
            }
        };
        if handled_here {
            // Handled in memory when its sender committed it in this node, and durable.
            return (msg_type, self.ack(msg, "handled_in_node").await);
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
        let mut immediate = 0;
        loop {
            let attempt = match self.inject(FaultPoint::Handler, msg, msg_type).await {
                Some(a) => a,
                None => self.attempt(msg, &env, msg_type, &inbox_key, &input).await,
            };
            let outcome = match attempt {
                Attempt::Done(outcome) => outcome,
                Attempt::Transient(_) if immediate < self.policy().immediate => {
                    immediate += 1;
                    continue;
                }
                Attempt::Transient(why) => self.fail(msg, msg_type, &why).await,
                Attempt::Permanent(why) => self.dead_letter(msg, "permanent", &why).await,
                Attempt::Delayed(after) => {
                    // Spread the wake-ups so the backlog drains gradually once it closes.
                    let jitter = Duration::from_millis(fastrand::u64(
                        0..=after.as_millis() as u64 / 2 + 100,
                    ));
                    let _ = msg.ack_with(AckKind::Nak(Some(after + jitter))).await;
                    "delayed"
                }
                Attempt::StoreBroken(why) => self.nak_uncounted(msg, &why).await,
            };
            return (msg_type, outcome);
        }
    }

    /// Plan, external call behind its breaker, transaction, group commit, ack.
    async fn attempt(
        &self,
        msg: &jetstream::Message,
        env: &Arc<Envelope>,
        msg_type: &str,
        inbox_key: &str,
        input: &Arc<dyn std::any::Any + Send + Sync>,
    ) -> Attempt {
        let rt = &self.rt;
        let reply = match self.component.plan(rt.store.reader(), input.as_ref()) {
            Ok(None) => None,
            Ok(Some(call)) => {
                // A duplicate must not call the external system again (the transaction's
                // inbox check is the authoritative one; this saves the call).
                match rt.store.seen(inbox_key) {
                    Ok(true) => return Attempt::Done(self.ack_durable(msg, "duplicate").await),
                    Ok(false) => {}
                    Err(e) => return Attempt::StoreBroken(format!("store: {e}")),
                }
                let breaker = rt.breakers.get(call.system);
                let permit = match breaker.acquire(envelope::now_ms()) {
                    Ok(p) => p,
                    Err(open) => return Attempt::Delayed(open.retry_after),
                };
                let timeout = Duration::from_millis(rt.cfg.external_timeout_ms);
                let fault =
                    rt.faults
                        .fire(FaultPoint::ExternalCall, rt.context, msg_type, &msg.payload);
                let result = match fault.map(|f| (f.action, f.delay_ms)) {
                    None => external::call(&rt.bus.client, &call, timeout).await,
                    Some((FaultAction::Crash, _)) => crash(FaultPoint::ExternalCall, msg_type),
                    Some((FaultAction::Panic, _)) => {
                        panic!("injected fault at external_call for {msg_type}")
                    }
                    Some((FaultAction::Error, _)) => Err(external::ExternalError::Failed {
                        system: call.system,
                        message: "injected error".into(),
                    }),
                    Some((FaultAction::Delay, ms)) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        external::call(&rt.bus.client, &call, timeout).await
                    }
                    // The system acts on the request; its reply is lost on the way back.
                    Some((FaultAction::Drop, _)) => external::call(&rt.bus.client, &call, timeout)
                        .await
                        .and(Err(external::ExternalError::Timeout {
                            system: call.system,
                            timeout,
                        })),
                };
                breaker.record(permit, result.is_ok(), envelope::now_ms());
                match result {
                    Ok(v) => Some(v),
                    Err(e) => return Attempt::Transient(e.to_string()),
                }
            }
            Err(e) => return classify(e),
        };
        let now = envelope::now_ms();
        let decide = handler_decide(
            rt.context,
            self.component.clone(),
            self.durable.clone(),
            env.clone(),
            input.clone(),
            reply,
            now,
        );
        // The after_commit fault point runs where the group commit answers (see
        // `AfterDurable`): an injected crash there leaves durable outbox entries for the
        // next start-up scan; any other fault comes back here and skips the ack (the
        // redelivery is absorbed by the inbox).
        let from_memory = rt.cfg.danger.disable_group_commit;
        let fired = rt
            .faults
            .armed()
            .then(|| Arc::new(std::sync::OnceLock::new()));
        let after = fired
            .as_ref()
            .map(|f| self.after_commit(msg, msg_type, from_memory, f.clone()));
        // Durable, and its outbox entries with the relay, when it returns (unless the group
        // commit is switched off).
        let result = rt
            .commit
            .commit(inbox_key.to_string(), now, decide, after)
            .await;
        match result {
            Ok(Committed::Written { outbox }) => {
                if from_memory {
                    // Chaos-suite switch: ack what is only in memory (sled writes it out
                    // within a second), then hand the entries over.
                    if let Err(e) = msg.double_ack().await {
                        tracing::warn!(consumer = %self.durable, error = %e, "ack failed");
                    }
                    rt.relay.durable(outbox);
                }
                let fault = match fired.as_ref().and_then(|f| f.get()) {
                    Some(rule) => self.apply(rule, FaultPoint::AfterCommit, msg_type).await,
                    None => None,
                };
                match fault {
                    Some(a) => a,
                    None if from_memory => Attempt::Done("acked"),
                    None => Attempt::Done(self.ack(msg, "acked").await),
                }
            }
            // With the group commit on, the answer came after a flush that followed this
            // transaction, so the first delivery's commit is durable too.
            Ok(Committed::Duplicate) if !from_memory => {
                // A copy that lost the race to its in-memory handling (see `local`).
                let _ = self.handled.take(inbox_key);
                Attempt::Done(self.ack(msg, "duplicate").await)
            }
            Ok(Committed::Duplicate) => Attempt::Done(self.ack_durable(msg, "duplicate").await),
            Err(CommitError::Handler(e)) => classify(e),
            Err(CommitError::Store(e)) => Attempt::StoreBroken(format!("store: {e}")),
        }
    }

    /// The `after_commit` fault point, run by the group commit once the message's
    /// transaction is durable (before its entries reach the relay): a crash aborts there; any
    /// other rule that fires is left in `fired` for the attempt to apply. With `[danger]
    /// disable_group_commit` it runs right after the transaction, and a crash first acks
    /// the message (the server confirms it): acked, never redelivered, never on disk, its
    /// outbox entries gone with it, which is the window the group commit closes. The
    /// commit thread waits for that ack, so no later transaction writes this one out first.
    fn after_commit(
        &self,
        msg: &jetstream::Message,
        msg_type: &str,
        from_memory: bool,
        fired: Arc<std::sync::OnceLock<FaultRule>>,
    ) -> AfterDurable {
        let (faults, context) = (self.rt.faults.clone(), self.rt.context);
        let (msg_type, payload) = (msg_type.to_string(), msg.payload.clone());
        let ack_first = from_memory.then(|| (msg.clone(), tokio::runtime::Handle::current()));
        Box::new(move || {
            let point = FaultPoint::AfterCommit;
            let Some(rule) = faults.fire(point, context, &msg_type, &payload) else {
                return;
            };
            if rule.action == FaultAction::Crash {
                if let Some((msg, runtime)) = ack_first {
                    let _ = runtime.block_on(msg.double_ack());
                }
                crash(point, &msg_type);
            }
            let _ = fired.set(rule);
        })
    }

    /// Applies an injected fault, if a rule fires. `Some` ends the attempt.
    async fn inject(
        &self,
        point: FaultPoint,
        msg: &jetstream::Message,
        msg_type: &str,
    ) -> Option<Attempt> {
        let rule = self
            .rt
            .faults
            .fire(point, self.rt.context, msg_type, &msg.payload)?;
        self.apply(&rule, point, msg_type).await
    }

    /// Applies a fault rule that fired at `point`. `Some` ends the attempt.
    async fn apply(&self, rule: &FaultRule, point: FaultPoint, msg_type: &str) -> Option<Attempt> {
        match rule.action {
            FaultAction::Panic => panic!("injected fault at {} for {msg_type}", point.label()),
            FaultAction::Crash => crash(point, msg_type),
            FaultAction::Error => Some(Attempt::Transient(format!(
                "injected error at {}",
                point.label()
            ))),
            FaultAction::Delay => {
                tokio::time::sleep(Duration::from_millis(rule.delay_ms)).await;
                None
            }
            // Neither ack nor nak: the server redelivers after ack_wait.
            FaultAction::Drop => Some(Attempt::Done("dropped")),
        }
    }

    fn failure_key(&self, msg: &jetstream::Message) -> String {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        format!("{}/{seq}", self.durable)
    }

    /// A transient failure: counted; nak with the policy's delay, or dead-letter once the
    /// budget is spent.
    async fn fail(&self, msg: &jetstream::Message, msg_type: &str, why: &str) -> &'static str {
        let policy = self.policy();
        let key = self.failure_key(msg);
        let failures = self
            .rt
            .store
            .add_failure(&key)
            .unwrap_or_else(|_| msg.info().map(|i| i.delivered as u32).unwrap_or(1));
        if policy.exhausted(failures) {
            let reason = format!("retries exhausted after {failures} failed deliveries: {why}");
            return self.dead_letter(msg, "retries_exhausted", &reason).await;
        }
        let delay = policy.delay(failures);
        tracing::warn!(consumer = %self.durable, msg_type, failures, ?delay, error = %why, "handler failed; will retry");
        let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        "retried"
    }

    /// A failure that is not the message's fault: nak without spending its budget.
    async fn nak_uncounted(&self, msg: &jetstream::Message, why: &str) -> &'static str {
        tracing::error!(consumer = %self.durable, error = %why, "cannot handle messages now; will retry");
        let _ = msg
            .ack_with(AckKind::Nak(Some(self.policy().delay(1))))
            .await;
        "retried"
    }

    /// Acks a message whose effect may still be only in memory (a duplicate of a message
    /// committed by a concurrent delivery): wait for durability first.
    async fn ack_durable(&self, msg: &jetstream::Message, outcome: &'static str) -> &'static str {
        if let Err(e) = self.rt.commit.durable().await {
            return self.nak_uncounted(msg, &e.to_string()).await;
        }
        self.ack(msg, outcome).await
    }

    async fn ack(&self, msg: &jetstream::Message, outcome: &'static str) -> &'static str {
        if let Err(e) = msg.ack().await {
            // Not fatal: the message is redelivered and absorbed by the inbox.
            tracing::warn!(consumer = %self.durable, error = %e, "ack failed");
        }
        if msg.info().map(|i| i.delivered > 1).unwrap_or(false) {
            let _ = self.rt.store.clear_failures(&self.failure_key(msg));
        }
        outcome
    }

    /// Dead-letters the message (awaiting the DLQ publish ack), records it locally, then
    /// terminates it.
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
        let headers: serde_json::Map<String, serde_json::Value> = msg
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::json!(v.first().map(|x| x.as_str()).unwrap_or("")),
                )
            })
            .collect();
        let record = serde_json::json!({
            "consumer": &*self.durable, "subject": msg.subject.as_str(), "category": category,
            "reason": reason, "delivered": delivered, "stream_sequence": seq,
            "at_ms": envelope::now_ms(), "headers": headers,
        });
        let key = self.failure_key(msg);
        let _ = self.rt.store.record_dead_letter(&key, &record);
        let _ = self.rt.store.clear_failures(&key);
        tracing::warn!(consumer = %self.durable, subject = %msg.subject, category, reason, "dead-lettered");
        metrics::DEAD_LETTERS
            .with_label_values(&[self.rt.context, category])
            .inc();
        let _ = msg.ack_with(AckKind::Term).await;
        "dead_lettered"
    }
}

/// Maps a handler's error to an attempt outcome.
/// An injected crash: abort at once, like `kill -9` (no destructors, no flush).
pub(crate) fn crash(point: FaultPoint, what: &str) -> ! {
    tracing::error!(
        point = point.label(),
        what,
        "injected crash: aborting the process"
    );
    std::process::abort();
}

fn classify(e: HandleError) -> Attempt {
    match e {
        HandleError::Retry(why) => Attempt::Transient(why),
        HandleError::Permanent(why) => Attempt::Permanent(why),
        HandleError::State(s) => Attempt::Transient(format!("state: {s:?}")),
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
