//! Consumer actors: one supervised actix actor per durable consumer.
//!
//! The actor is a thin shell: it owns the pull loop ([`super::pull`], a tokio task on the
//! node's worker threads) and restarts it. A panic in handler code is caught around the
//! message; the loop tells the actor, which stops and is restarted by its `Supervisor` with
//! back-off, at most `supervision.max_restarts` times in `supervision.window`; beyond
//! that the consumer stays stopped for a window and the node reports not ready. The
//! JetStream message stream is kept across restarts, so nothing prefetched is stranded.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::context::ContextRuntime;
use super::decide::durable_name;
use super::pull::{PullLoop, Slot};
use crate::component::{DynComponent, Subscription};
use crate::telemetry::metrics;

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
    /// Whether this process has asked the server to redeliver what the consumer had not
    /// acked (once, at its first bind: see [`crate::wire::bus::Bus::redeliver_unacked`]).
    redelivered: Arc<AtomicBool>,
    /// The JetStream message stream, kept across restarts: a restarted loop continues on the
    /// same subscription (dropping it would strand prefetched and redelivered messages in
    /// its open pull requests until `ack_wait`).
    stream: Slot,
}

impl ConsumerActor {
    /// The actor of `component`'s durable consumer for `sub`; it stops its pull loop when
    /// `node_shutdown` turns true.
    pub(crate) fn new(
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
            restarts: VecDeque::new(),
            given_up: false,
            redelivered: Arc::default(),
            stream: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Starts the pull loop after `delay`.
    fn spawn_loop(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        self.run_stop = Some(stop_tx);
        let pull = PullLoop::new(
            self.rt.clone(),
            self.component.clone(),
            self.sub.clone(),
            self.durable.clone(),
            ctx.address(),
            self.stream.clone(),
            self.redelivered.clone(),
        );
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

impl Actor for ConsumerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let sup = &self.rt.cfg.supervision;
        if self.given_up {
            // Past the restart limit: stay stopped for a window, then try again.
            let window = sup.window;
            ctx.run_later(window, |act, ctx| {
                act.given_up = false;
                act.restarts.clear();
                act.rt.health.recover();
                metrics::SUPERVISOR_GIVEN_UP
                    .with_label_values(&[act.rt.context, &act.durable])
                    .set(0);
                tracing::warn!(consumer = %act.durable, "consumer resumes after its restart limit window");
                act.spawn_loop(ctx, Duration::ZERO);
            });
            return;
        }
        let delay = match self.restarts.len() {
            0 => Duration::ZERO,
            n => sup.backoff[(n - 1).min(sup.backoff.len() - 1)],
        };
        self.spawn_loop(ctx, delay);
        tracing::debug!(consumer = %self.durable, ?delay, "consumer started");
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
        let window = sup.window;
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
                window = ?sup.window,
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
pub(crate) struct Panicked;

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
