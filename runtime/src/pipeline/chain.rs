//! Messages a context sends to itself, handled in the transaction that wrote them (the
//! order saga's `ConfirmOrder` and `CompleteOrder` to the orders aggregate, the aggregate's
//! `OrderPlaced` to the saga): the store runs each consumer's handling as a batch item of
//! its own inside the sender's transaction ([`crate::store::chain`]), so the cause and its
//! local effect are durable together, with one transaction and one flush instead of two.
//!
//! The message is still stored and published: the streams record every message, and its
//! JetStream copy reaches the consumer, finds the inbox mark and is acked as a duplicate.
//! Whatever a plain handling cannot do here (an external call, a handler error or panic) is
//! left to that copy, which has the retries, dead letters and fault points; so is every
//! message while a fault rule is armed.

use std::collections::HashMap;
use std::sync::Arc;

use super::decide::{durable_name, handler_decide, inbox_key};
use crate::component::{DynComponent, Kind, Subscription};
use crate::store::{Chain, DecideError, Link, OutboxEntry, TxRead};
use crate::wire::subjects;

/// One consumer of the context that can take a message in its sender's transaction.
struct Chained {
    context: &'static str,
    component: Arc<dyn DynComponent>,
    sub: Subscription,
    durable: Arc<str>,
}

/// The context's consumers of its own messages, by subject.
pub struct SameContext {
    routes: HashMap<String, Vec<Arc<Chained>>>,
    /// While a fault rule is armed every message takes the JetStream path (the rules apply
    /// to deliveries).
    #[cfg(feature = "faults")]
    faults: Option<Arc<crate::faults::Faults>>,
}

impl SameContext {
    /// The routes of `context`'s own messages (events it publishes, commands addressed to
    /// it) to the components of `context` that subscribe to them.
    pub fn new(context: &'static str, components: &[Arc<dyn DynComponent>]) -> Self {
        let mut routes: HashMap<String, Vec<Arc<Chained>>> = HashMap::new();
        for component in components {
            for sub in component.subscriptions() {
                if sub.source != context {
                    continue;
                }
                let c = Arc::new(Chained {
                    context,
                    component: component.clone(),
                    durable: durable_name(context, component.name(), &sub).into(),
                    sub: sub.clone(),
                });
                for t in &sub.types {
                    let subject = match sub.kind {
                        Kind::Event => subjects::event(context, t),
                        Kind::Command => subjects::command(context, t),
                    };
                    routes.entry(subject).or_default().push(c.clone());
                }
            }
        }
        SameContext {
            routes,
            #[cfg(feature = "faults")]
            faults: None,
        }
    }

    /// Leaves every message to the JetStream path while one of `faults`' rules is armed.
    #[cfg(feature = "faults")]
    pub fn with_faults(mut self, faults: Arc<crate::faults::Faults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Whether any message of the context can be chained.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Chain for SameContext {
    fn links(&self, entry: &OutboxEntry, now_ms: u64) -> Vec<Link> {
        #[cfg(feature = "faults")]
        if self.faults.as_ref().is_some_and(|f| f.armed()) {
            return Vec::new();
        }
        let Some(consumers) = self.routes.get(&entry.subject) else {
            return Vec::new();
        };
        consumers
            .iter()
            .filter_map(|c| c.link(entry, now_ms))
            .collect()
    }
}

impl Chained {
    /// Its handling of `entry` inside the transaction that wrote it, unless the entry does
    /// not decode. The plan runs inside too, on the transaction's view: a call to an
    /// external system leaves the entry to its JetStream copy.
    fn link(&self, entry: &OutboxEntry, now_ms: u64) -> Option<Link> {
        let msg_type = self.sub.declared(&entry.envelope.msg_type)?;
        let input = self
            .component
            .decode(msg_type, entry.payload.as_bytes())
            .ok()?;
        let (component, plan_input) = (self.component.clone(), input.clone());
        let decide = handler_decide(
            self.context,
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
}
