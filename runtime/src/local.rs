//! Same-node delivery: a message a node sends to a subscription it hosts itself (the order
//! saga's `ConfirmOrder` to the orders aggregate in the same process, the aggregate's
//! `OrderConfirmed` back to the saga) is handed to that consumer in memory once the
//! transaction that wrote it is durable, ahead of its round trip through the relay,
//! JetStream and the pull.
//!
//! It is an accelerator, never the only path: the relay still publishes the message and the
//! consumer still receives it from JetStream. The in-memory handling is the JetStream path's
//! transaction (same inbox key, so the inbox lets exactly one of the two commit); when it
//! committed and is durable first, the JetStream copy is acked without being handled
//! ([`Handled`]), otherwise it is handled as usual and absorbed by the inbox. Anything the
//! in-memory handling cannot do the plain way (an external call, a handler error, a panic, a
//! full bulkhead, an armed fault rule, a `[danger]` switch) it leaves to the JetStream copy,
//! which has the retries, dead letters and fault points.
//!
//! In the sender's transaction: when the consumer belongs to the sender's own context (the
//! same store), the message is handled inside the transaction that wrote it ([`Chain`]),
//! as a batch item of its own (its inbox mark, its state changes, its outbox entries), not
//! in a transaction of its own after the flush: one transaction and one flush fewer, and no
//! wait for them. The same rules apply (no external call, no handler error or panic, no
//! armed fault rule); what they exclude is left to the JetStream copy, and writes nothing.

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{watch, Semaphore};

use crate::component::{DynComponent, Kind, Subscription};
use crate::consumer::{handler_decide, inbox_key, ContextRuntime};
use crate::envelope::{self, Envelope};
use crate::metrics;
use crate::store::{Chain, Committed, DecideError, KeyedEntries, Link, OutboxEntry, TxRead};
use crate::subjects;

/// Inbox keys held at most per consumer before the set is emptied (see [`Handled`]).
const MAX_HANDLED: usize = 65_536;

/// The node's routes from a subject to the consumers it hosts for it; empty until
/// [`LocalRoutes::install`]. Shared by every context's relay handle.
pub struct LocalRoutes {
    routes: OnceLock<HashMap<String, Vec<Arc<LocalConsumer>>>>,
    runtime: tokio::runtime::Handle,
}

impl LocalRoutes {
    /// Empty routes; must be called inside the node's tokio runtime (the handling is spawned
    /// on it from the flusher thread).
    pub fn new() -> Arc<LocalRoutes> {
        Arc::new(LocalRoutes {
            routes: OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Installs the node's consumers (once; later calls are ignored).
    pub fn install(&self, consumers: Vec<Arc<LocalConsumer>>) {
        let mut routes: HashMap<String, Vec<Arc<LocalConsumer>>> = HashMap::new();
        for c in consumers {
            for subject in c.subjects() {
                routes.entry(subject).or_default().push(c.clone());
            }
        }
        let _ = self.routes.set(routes);
    }

    /// The consumers of `context` hosted here, as the chain its store runs in its
    /// transactions (see [`crate::store::Store::link_with`]).
    pub fn chain(self: &Arc<Self>, context: &'static str) -> Arc<dyn Chain> {
        Arc::new(ContextChain {
            routes: Arc::downgrade(self),
            context,
        })
    }

    /// Hands the durable `entries` that a hosted consumer subscribes to over to it. Runs on
    /// the flusher thread: it only clones the matching entries and spawns their handling.
    pub fn dispatch(&self, entries: &KeyedEntries) {
        let Some(routes) = self.routes.get() else {
            return;
        };
        if routes.is_empty() {
            return;
        }
        for (_, entry) in entries {
            let Some(consumers) = routes.get(&entry.subject) else {
                continue;
            };
            let env = Arc::new(entry.envelope.clone());
            for c in consumers {
                if entry.handled_by.contains(&c.durable) {
                    // Handled in the transaction that wrote it: its copy is acked unhandled.
                    c.handled.insert(inbox_key(&c.durable, &env.id));
                    metrics::LOCAL_DELIVERIES
                        .with_label_values(&[c.rt.context, &c.durable, "in_transaction"])
                        .inc();
                    continue;
                }
                let Some(permit) = c.admit() else { continue };
                // Marked before it is spawned: its copy may come back before it runs.
                let mark = c.handled.begin(inbox_key(&c.durable, &env.id));
                let (c, env, payload) = (c.clone(), env.clone(), entry.payload.clone());
                self.runtime.spawn(async move {
                    let outcome = c.handle(env.clone(), payload, mark).await;
                    drop(permit);
                    metrics::LOCAL_DELIVERIES
                        .with_label_values(&[c.rt.context, &c.durable, outcome])
                        .inc();
                    tracing::debug!(
                        context = c.rt.context,
                        consumer = %c.durable,
                        msg_type = %env.msg_type,
                        id = %env.id,
                        correlation = %env.correlation_id,
                        outcome,
                        "delivered in node"
                    );
                });
            }
        }
    }
}

/// One context's hosted consumers, run by its store inside the transaction that wrote an
/// entry they subscribe to. Holds the routes weakly (the store outlives nothing by it).
struct ContextChain {
    routes: Weak<LocalRoutes>,
    context: &'static str,
}

impl Chain for ContextChain {
    fn links(&self, entry: &OutboxEntry, now_ms: u64) -> Vec<Link> {
        let Some(routes) = self.routes.upgrade() else {
            return Vec::new();
        };
        let Some(consumers) = routes.routes.get().and_then(|r| r.get(&entry.subject)) else {
            return Vec::new();
        };
        consumers
            .iter()
            .filter(|c| c.rt.context == self.context)
            .filter_map(|c| c.link(entry, now_ms))
            .collect()
    }
}

/// Inbox keys of messages one consumer handled in memory whose transaction is durable: their
/// JetStream copy is acked without being handled. A message whose in-memory handling is
/// still running is marked too, so that its copy, if it arrives meanwhile (contexts hosted
/// together: the copy of an event from another context's store can come back before the
/// handling's own commit is durable), waits for that handling instead of running the same
/// transaction again only to find it a duplicate. Bounded: past [`MAX_HANDLED`] keys
/// (copies that never came, e.g. a consumer deleted on the server) it is emptied, and those
/// copies take the plain path, where the inbox absorbs them.
#[derive(Default)]
pub struct Handled(Mutex<HashMap<String, Mark>>);

enum Mark {
    /// Being handled in memory; the sender side says when it ended (or is dropped).
    InFlight(watch::Receiver<bool>),
    Done,
}

/// What a JetStream copy finds for its inbox key (see [`Handled::take`]).
pub enum Taken {
    /// Handled in memory and durable: ack the copy.
    Done,
    /// Not handled here: handle the copy.
    No,
    /// Its in-memory handling is running: wait with [`Handled::wait`], then take again.
    InFlight(watch::Receiver<bool>),
}

impl Handled {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mark>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `key`, emptying the set first when it is full (see [`Handled`]).
    fn put(&self, key: String, mark: Mark) {
        let mut keys = self.lock();
        if keys.len() >= MAX_HANDLED {
            keys.clear();
        }
        keys.insert(key, mark);
    }

    fn insert(&self, key: String) {
        self.put(key, Mark::Done);
    }

    /// Marks `key` as being handled in memory until the returned guard ends it.
    fn begin(self: &Arc<Self>, key: String) -> InFlight {
        let (tx, rx) = watch::channel(false);
        self.put(key.clone(), Mark::InFlight(rx));
        InFlight {
            handled: self.clone(),
            key,
            tx,
            done: false,
        }
    }

    /// What the copy of the message with this inbox key should do; a [`Taken::Done`] mark
    /// is used up.
    pub fn take(&self, key: &str) -> Taken {
        let mut keys = self.lock();
        if keys.is_empty() {
            return Taken::No;
        }
        match keys.get(key) {
            None => Taken::No,
            Some(Mark::InFlight(rx)) => Taken::InFlight(rx.clone()),
            Some(Mark::Done) => {
                keys.remove(key);
                Taken::Done
            }
        }
    }

    /// Waits (at most `limit`) for an in-memory handling to end, then says what the copy
    /// should do: ack if it committed, handle it otherwise (failed, skipped, timed out, or
    /// still running at the limit: the inbox absorbs a late double).
    pub async fn wait(&self, key: &str, mut rx: watch::Receiver<bool>, limit: Duration) -> bool {
        // An error means the handling's guard was dropped: it ended, one way or another.
        let _ = tokio::time::timeout(limit, rx.wait_for(|ended| *ended)).await;
        matches!(self.take(key), Taken::Done)
    }
}

/// An in-memory handling under way (see [`Handled::begin`]): ends the mark when dropped,
/// as done if [`InFlight::done`] was called, and wakes a copy waiting for it.
struct InFlight {
    handled: Arc<Handled>,
    key: String,
    tx: watch::Sender<bool>,
    done: bool,
}

impl InFlight {
    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let key = std::mem::take(&mut self.key);
        if self.done {
            self.handled.insert(key);
        } else {
            let mut keys = self.handled.lock();
            if matches!(keys.get(&key), Some(Mark::InFlight(_))) {
                keys.remove(&key);
            }
        }
        self.tx.send_replace(true);
    }
}

/// One hosted consumer, as the in-memory path sees it.
pub struct LocalConsumer {
    rt: Arc<ContextRuntime>,
    component: Arc<dyn DynComponent>,
    sub: Arc<Subscription>,
    durable: Arc<str>,
    /// Its own bulkhead (the consumer's size): when full, the message waits for JetStream.
    permits: Arc<Semaphore>,
    pub(crate) handled: Arc<Handled>,
}

impl LocalConsumer {
    pub fn new(
        rt: Arc<ContextRuntime>,
        component: Arc<dyn DynComponent>,
        sub: Arc<Subscription>,
        durable: Arc<str>,
        handled: Arc<Handled>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(rt.cfg.max_in_flight(component.name())));
        LocalConsumer {
            rt,
            component,
            sub,
            durable,
            permits,
            handled,
        }
    }

    /// The subjects of the subscribed types in the source's stream.
    fn subjects(&self) -> Vec<String> {
        let s = &self.sub;
        s.types
            .iter()
            .map(|t| match s.kind {
                Kind::Event => subjects::event(s.source, t),
                Kind::Command => subjects::command(s.source, t),
            })
            .collect()
    }

    /// A bulkhead permit, unless the path is off for now (an armed fault rule: the rules
    /// apply to deliveries, so every message takes the JetStream path while one is armed).
    fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.rt.faults.armed() {
            return None;
        }
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Its handling of `entry` inside the transaction that wrote it, unless a fault rule is
    /// armed or the entry does not decode. The plan runs inside too, on the transaction's
    /// view: a call to an external system leaves the entry to its JetStream copy.
    fn link(&self, entry: &OutboxEntry, now_ms: u64) -> Option<Link> {
        if self.rt.faults.armed() {
            return None;
        }
        let msg_type = self.sub.declared(&entry.envelope.msg_type)?;
        let input = self
            .component
            .decode(msg_type, entry.payload.as_bytes())
            .ok()?;
        let (component, plan_input) = (self.component.clone(), input.clone());
        let decide = handler_decide(
            self.rt.context,
            self.component.clone(),
            self.durable.clone(),
            Arc::new(entry.envelope.clone()),
            input,
            None,
            now_ms,
        );
        Some(Link {
            consumer: self.durable.clone(),
            inbox_key: inbox_key(&self.durable, &entry.envelope.id),
            decide: Box::new(move |tx| {
                match component.plan(&TxRead(tx), plan_input.as_ref()) {
                    Ok(None) => {}
                    Ok(Some(call)) => {
                        return Err(DecideError::Handler(format!("calls {}", call.system)))
                    }
                    Err(e) => return Err(DecideError::Handler(format!("plan: {e:?}"))),
                }
                decide(tx).map_err(|e| match e {
                    DecideError::Tx(e) => DecideError::Tx(e),
                    DecideError::Handler(e) => DecideError::Handler(format!("{e:?}")),
                })
            }),
        })
    }

    /// Decode, plan, transaction, group commit, under the message's in-flight `mark` (ended
    /// when this returns). Returns the outcome label.
    async fn handle(
        &self,
        env: Arc<Envelope>,
        payload: String,
        mut mark: InFlight,
    ) -> &'static str {
        let timeout =
            Duration::from_millis(self.rt.cfg.policy(self.component.name()).handler_timeout_ms);
        let guarded = AssertUnwindSafe(self.attempt(env, payload, &mut mark)).catch_unwind();
        match tokio::time::timeout(timeout, guarded).await {
            Ok(Ok(outcome)) => outcome,
            // The JetStream copy panics too, and restarts its consumer.
            Ok(Err(_)) => "panicked",
            Err(_) => "timed_out",
        }
    }

    async fn attempt(
        &self,
        env: Arc<Envelope>,
        payload: String,
        mark: &mut InFlight,
    ) -> &'static str {
        let Some(msg_type) = self.sub.declared(&env.msg_type) else {
            return "skipped";
        };
        let input: Arc<dyn Any + Send + Sync> =
            match self.component.decode(msg_type, payload.as_bytes()) {
                Ok(i) => i,
                Err(_) => return "skipped",
            };
        // A call to an external system stays on the JetStream path (breaker, retries).
        match self.component.plan(self.rt.store.reader(), input.as_ref()) {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return "skipped",
        }
        let inbox_key = inbox_key(&self.durable, &env.id);
        let now = envelope::now_ms();
        let decide = handler_decide(
            self.rt.context,
            self.component.clone(),
            self.durable.clone(),
            env,
            input,
            None,
            now,
        );
        match self.rt.commit.commit(inbox_key, now, decide, None).await {
            // Durable, its own entries with the relay (and routed here again if hosted).
            Ok(Committed::Written { .. }) => {
                mark.done();
                "handled"
            }
            Ok(Committed::Duplicate) => "duplicate",
            Err(_) => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    /// A handling of `key` begun, as its copy finds it: the mark and what the copy waits on.
    fn in_flight(handled: &Arc<Handled>, key: &str) -> (InFlight, watch::Receiver<bool>) {
        let mark = handled.begin(key.into());
        let Taken::InFlight(ended) = handled.take(key) else {
            panic!("{key} not in flight")
        };
        (mark, ended)
    }

    #[tokio::test]
    async fn a_copy_waits_for_the_handling_in_memory_and_is_acked_if_it_committed() {
        let handled = Arc::new(Handled::default());
        let (mut mark, ended) = in_flight(&handled, "c/1");
        let h = handled.clone();
        let copy = tokio::spawn(async move { h.wait("c/1", ended, LIMIT).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!copy.is_finished(), "the copy did not wait");
        mark.done();
        drop(mark);
        assert!(copy.await.unwrap(), "a committed handling acks its copy");
        // The mark is used up by the copy.
        assert!(matches!(handled.take("c/1"), Taken::No));
    }

    #[tokio::test]
    async fn a_copy_is_handled_if_the_handling_in_memory_did_not_commit() {
        let handled = Arc::new(Handled::default());
        let (mark, ended) = in_flight(&handled, "c/2");
        drop(mark); // failed, skipped, panicked or timed out
        assert!(!handled.wait("c/2", ended, LIMIT).await);
        assert!(matches!(handled.take("c/2"), Taken::No));
    }

    #[tokio::test]
    async fn a_copy_stops_waiting_at_the_limit() {
        let handled = Arc::new(Handled::default());
        let (_mark, ended) = in_flight(&handled, "c/3");
        let started = std::time::Instant::now();
        assert!(!handled.wait("c/3", ended, Duration::from_millis(50)).await);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // Done marks are taken once; unknown keys are not handled here.
        handled.insert("c/4".into());
        assert!(matches!(handled.take("c/4"), Taken::Done));
        assert!(matches!(handled.take("c/4"), Taken::No));
    }
}
