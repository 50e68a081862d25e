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
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Semaphore;

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
                let (c, env, payload) = (c.clone(), env.clone(), entry.payload.clone());
                self.runtime.spawn(async move {
                    let outcome = c.handle(env.clone(), payload).await;
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
/// JetStream copy is acked without being handled. Bounded: past [`MAX_HANDLED`] keys (copies
/// that never came, e.g. a consumer deleted on the server) it is emptied, and those copies
/// take the plain path, where the inbox absorbs them.
#[derive(Default)]
pub struct Handled(Mutex<HashSet<String>>);

impl Handled {
    fn insert(&self, key: String) {
        let mut keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= MAX_HANDLED {
            keys.clear();
        }
        keys.insert(key);
    }

    /// True (once) if the message with this inbox key was handled in memory and is durable.
    pub fn take(&self, key: &str) -> bool {
        let mut keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        !keys.is_empty() && keys.remove(key)
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

    /// Decode, plan, transaction, group commit. Returns the outcome label.
    async fn handle(&self, env: Arc<Envelope>, payload: String) -> &'static str {
        let timeout =
            Duration::from_millis(self.rt.cfg.policy(self.component.name()).handler_timeout_ms);
        let guarded = AssertUnwindSafe(self.attempt(env, payload)).catch_unwind();
        match tokio::time::timeout(timeout, guarded).await {
            Ok(Ok(outcome)) => outcome,
            // The JetStream copy panics too, and restarts its consumer.
            Ok(Err(_)) => "panicked",
            Err(_) => "timed_out",
        }
    }

    async fn attempt(&self, env: Arc<Envelope>, payload: String) -> &'static str {
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
        match self
            .rt
            .commit
            .commit(inbox_key.clone(), now, decide, None)
            .await
        {
            // Durable, its own entries with the relay (and routed here again if hosted).
            Ok(Committed::Written { .. }) => {
                self.handled.insert(inbox_key);
                "handled"
            }
            Ok(Committed::Duplicate) => "duplicate",
            Err(_) => "failed",
        }
    }
}
