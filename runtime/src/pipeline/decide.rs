//! The transaction step of a message, shared by every path that commits: a component's
//! decision turned into [`Effects`] (outbox entries with ids derived from the cause, and the
//! saga instance it moved), plus the naming of inbox marks and durable consumers.

use std::any::Any;
use std::sync::Arc;

use crate::component::Subscription;
use crate::component::{Decision, DynComponent, HandleCtx, HandleError, Kind, Outgoing};
use crate::store::{DecideError, Effects, OutboxEntry, StateError, StateTx};
use crate::wire::envelope::Envelope;
use crate::wire::subjects;

/// A message's decision, run on the commit thread (possibly more than once).
pub type Decide = Box<dyn Fn(&dyn StateTx) -> Result<Effects, DecideError<HandleError>> + Send>;

/// The inbox mark of message `id` handled by consumer `durable`.
pub fn inbox_key(durable: &str, id: &str) -> String {
    format!("{durable}/{id}")
}

/// Durable consumer name: `<context>_<component>_<source>_<kind>`.
pub fn durable_name(context: &str, component: &str, sub: &Subscription) -> String {
    format!("{context}_{component}_{}_{}", sub.source, sub.kind.token())
        .replace(['.', ' ', '-'], "_")
}

/// Separates a transaction conflict (sled retries it) from the handler's own error.
pub(crate) fn split_tx(e: HandleError) -> DecideError<HandleError> {
    match e {
        HandleError::State(StateError::Tx(t)) => DecideError::Tx(t),
        other => DecideError::Handler(other),
    }
}

/// Turns a decision into effects: what it sends becomes outbox entries with ids derived
/// from the cause (`scope` and position), so a re-run never produces a new id.
pub(crate) fn effects(
    context: &str,
    scope: &str,
    cause: &Envelope,
    decision: Decision,
    now: u64,
) -> Effects {
    Effects {
        outbox: to_outbox(context, scope, cause, decision.send, now),
        saga_moves: decision.saga_move.into_iter().collect(),
        chained: Vec::new(),
    }
}

fn to_outbox(
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

/// The transaction step of handling a decoded message: the component's decision (with the
/// external system's reply, if it asked for a call) as effects.
pub(crate) fn handler_decide(
    context: &'static str,
    component: Arc<dyn DynComponent>,
    scope: Arc<str>,
    env: Arc<Envelope>,
    input: Arc<dyn Any + Send + Sync>,
    reply: Option<serde_json::Value>,
    now: u64,
) -> Decide {
    Box::new(move |tx| {
        let hctx = HandleCtx {
            envelope: &env,
            now_ms: now,
            external: reply.as_ref(),
        };
        let decision = component
            .handle(tx, input.as_ref(), &hctx)
            .map_err(split_tx)?;
        Ok(effects(context, &scope, &env, decision, now))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_carry_derived_ids_subjects_and_the_saga_move() {
        let cause = Envelope::first("c1".into(), "OrderPlaced", "orders", 5);
        let decision = Decision {
            send: vec![
                Outgoing {
                    kind: Kind::Event,
                    context: None,
                    msg_type: "StockReserved",
                    payload: "{}".into(),
                },
                Outgoing {
                    kind: Kind::Command,
                    context: Some("shipping".into()),
                    msg_type: "ShipOrder",
                    payload: "{}".into(),
                },
            ],
            saga_move: None,
        };
        let e = effects("inventory", "scope", &cause, decision, 6);
        let subjects: Vec<&str> = e.outbox.iter().map(|o| o.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "choreo.inventory.evt.StockReserved",
                "choreo.shipping.cmd.ShipOrder"
            ]
        );
        assert_eq!(
            e.outbox[0].envelope,
            Envelope::caused_by(&cause, "scope", 0, "StockReserved", "inventory", 6)
        );
        assert_ne!(e.outbox[0].envelope.id, e.outbox[1].envelope.id);
        assert!(e.saga_moves.is_empty());
    }

    #[test]
    fn names_of_marks_and_consumers() {
        let sub = Subscription::events("orders", &["OrderPlaced"]);
        assert_eq!(
            durable_name("in-ventory", "stock", &sub),
            "in_ventory_stock_orders_evt"
        );
        assert_eq!(inbox_key("d", "m1"), "d/m1");
    }
}
