//! The pull loop of one durable consumer: binds to it, takes messages while its bulkhead
//! has room, runs each in a task of its own ([`super::process`], then [`super::settle`]),
//! and at shutdown gives back what it buffered and waits for what is in handling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::watch;

use super::consumer::{ConsumerActor, Panicked};
use super::context::ContextRuntime;
use super::disposition::Outcome;
use super::process::{Delivery, Handling};
use crate::component::{DynComponent, Subscription};
use crate::resilience::bulkhead::Bulkhead;
use crate::resilience::guard::{guarded, Interrupted};
use crate::resilience::retry::RetryPolicy;
use crate::telemetry::metrics;
use crate::wire::bus::BusError;

/// The JetStream message stream of a consumer, kept across restarts of its actor: a
/// restarted loop continues on the same subscription (dropping it would strand prefetched
/// and redelivered messages in its open pull requests until `ack_wait`).
pub(crate) type Slot = Arc<tokio::sync::Mutex<Option<jetstream::consumer::pull::Stream>>>;

/// One run of a consumer's pull loop and what its message tasks share.
pub(crate) struct PullLoop {
    pub(super) rt: Arc<ContextRuntime>,
    pub(super) handling: Arc<Handling>,
    actor: Addr<ConsumerActor>,
    stream: Slot,
    bulkhead: Bulkhead,
    redelivered: Arc<AtomicBool>,
}

impl PullLoop {
    pub(crate) fn new(
        rt: Arc<ContextRuntime>,
        component: Arc<dyn DynComponent>,
        sub: Arc<Subscription>,
        durable: Arc<str>,
        actor: Addr<ConsumerActor>,
        stream: Slot,
        redelivered: Arc<AtomicBool>,
    ) -> Self {
        let bulkhead = Bulkhead::new(rt.cfg.max_in_flight(component.name()), rt.context, &durable);
        let handling = Arc::new(Handling {
            context: rt.context,
            policy: rt.cfg.policy(component.name()).clone(),
            component,
            sub,
            durable,
            store: rt.store.clone(),
            commit: rt.commit.clone(),
            calls: Arc::new(rt.external.clone()),
            max_message_bytes: rt.cfg.max_message_bytes,
            #[cfg(feature = "faults")]
            faults: rt.faults.clone(),
            #[cfg(feature = "danger")]
            ack_before_crash: rt.cfg.danger.disable_group_commit,
        });
        PullLoop {
            rt,
            handling,
            actor,
            stream,
            bulkhead,
            redelivered,
        }
    }

    pub(super) fn policy(&self) -> &RetryPolicy {
        &self.handling.policy
    }

    pub(super) fn durable(&self) -> &str {
        &self.handling.durable
    }

    /// Binds to the durable consumer (retrying while NATS or the stream is unavailable),
    /// unless a previous run left its stream; `None` if stopped meanwhile.
    async fn bind(
        &self,
        stop: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<tokio::sync::OwnedMutexGuard<Option<jetstream::consumer::pull::Stream>>> {
        let mut slot = self.stream.clone().lock_owned().await;
        let h = &self.handling;
        let max = self.rt.cfg.max_in_flight(h.component.name());
        while slot.is_none() {
            let attempt = async {
                let spec = self.rt.cfg.consumer_spec(h.component.name());
                let c = self
                    .rt
                    .bus
                    .durable_consumer(&h.durable, h.sub.source, h.sub.filter_subjects(), &spec)
                    .await?;
                // What a previous run of this node had in flight comes back now.
                if !self.redelivered.swap(true, Ordering::SeqCst) {
                    if let Err(e) = self
                        .rt
                        .bus
                        .redeliver_unacked(h.sub.source, &h.durable)
                        .await
                    {
                        tracing::warn!(consumer = %h.durable, error = %e, "cannot ask for unacked messages at once; they come back after ack_wait");
                    }
                }
                // A 1 s heartbeat: a pull lost with a server restart or a cut connection is
                // noticed after two missed beats and issued again.
                c.stream()
                    .max_messages_per_batch(max)
                    .heartbeat(Duration::from_secs(1))
                    .expires(Duration::from_secs(10))
                    .messages()
                    .await
                    .map_err(|e| BusError::JetStream {
                        what: format!("pull {}", h.durable),
                        message: e.to_string(),
                    })
            };
            match attempt.await {
                Ok(m) => *slot = Some(m),
                Err(e) => {
                    tracing::warn!(consumer = %h.durable, error = %e, "cannot bind consumer; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                        _ = shutdown.changed() => {}
                    }
                    if *stop.borrow() || *shutdown.borrow() {
                        return None;
                    }
                }
            }
        }
        Some(slot)
    }

    /// Runs until `stop` (a restart of the actor) or `shutdown` (the node's) turns true.
    pub(crate) async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(mut slot) = self.bind(&mut stop, &mut shutdown).await else {
            return;
        };
        let this = Arc::new(self);
        let messages = slot.as_mut().expect("bound above");
        loop {
            let place = tokio::select! {
                p = this.bulkhead.enter() => p,
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
                        this.handle(msg).await;
                        drop(place);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(consumer = %this.durable(), error = %e, "pull error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    tracing::warn!(consumer = %this.durable(), "message stream ended; binding again");
                    *slot = None;
                    return;
                }
            }
        }
        if !*shutdown.borrow() {
            // A restart: the next run continues on the same stream.
            return;
        }
        // Shutdown: give back what was buffered but not started (at most one batch). Each is
        // naked with a delay, so that it is not delivered straight back into this loop (a nak
        // without one came back at once, again and again, until the server gave up on it at
        // max_deliver); the next run of the node asks for it at its start anyway.
        let batch = this.rt.cfg.max_in_flight(this.handling.component.name());
        let mut returned = 0;
        while returned < batch {
            let next = tokio::time::timeout(Duration::from_millis(20), messages.next()).await;
            let Ok(Some(Ok(msg))) = next else { break };
            let _ = msg
                .ack_with(AckKind::Nak(Some(this.rt.cfg.ack_wait())))
                .await;
            returned += 1;
        }
        *slot = None;
        // Finish in-flight work.
        let _ = this.bulkhead.drained(this.rt.cfg.ack_wait()).await;
        tracing::debug!(consumer = %this.durable(), returned, "consumer drained");
    }

    /// One message: processed under the handler guard, then settled, and counted.
    async fn handle(&self, msg: jetstream::Message) {
        let started = std::time::Instant::now();
        let timeout = self.policy().handler_timeout;
        let delivery = Delivery {
            subject: &msg.subject,
            headers: msg.headers.as_ref(),
            payload: &msg.payload,
            size: crate::wire::envelope::message_size(msg.headers.as_ref(), &msg.payload),
            #[cfg(feature = "danger")]
            message: Some(&msg),
        };
        let processed = guarded(timeout, self.handling.process(&delivery)).await;
        let (msg_type, outcome) = match processed {
            Ok(r) => r,
            Err(interrupted) => {
                if let Interrupted::Panicked(what) = &interrupted {
                    metrics::HANDLER_PANICS
                        .with_label_values(&[self.rt.context, self.durable()])
                        .inc();
                    tracing::error!(consumer = %self.durable(), subject = %msg.subject, panic = %what, "handler panicked");
                    // Restart the actor; `send` (not `do_send`) so the request is not lost.
                    let _ = self.actor.send(Panicked).await;
                }
                let why = interrupted.to_string();
                ("unknown", Outcome::Transient(why))
            }
        };
        let disposition = self.settle(msg, msg_type, outcome).await;
        let label = disposition.label();
        metrics::MESSAGES
            .with_label_values(&[self.rt.context, self.durable(), label])
            .inc();
        metrics::HANDLER_SECONDS
            .with_label_values(&[self.rt.context, msg_type, label])
            .observe(started.elapsed().as_secs_f64());
    }
}
