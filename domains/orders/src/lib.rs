//! Orders (sales): the authority on an order's lifecycle. Accepts `PlaceOrder`, then
//! `ConfirmOrder`, `CompleteOrder` or `CancelOrder` from the fulfilment process manager.
//! Read model: order status by id and by customer (with the customer's name, copied from
//! `CustomerRegistered`).

use std::sync::Arc;

use customers::CustomerRegistered;
use runtime::component::DynComponent;
use runtime::{
    decode_as, load, read, read_all, save, Component, DecodeError, HandleCtx, HandleError, Message,
    Outgoing, QueryError, StateRead, StateTx, Subscription,
};
use serde::{Deserialize, Serialize};

pub mod messages;
pub use messages::*;

pub const CONTEXT: &str = "orders";

/// Lifecycle: Placed -> Confirmed -> Completed, or Placed|Confirmed -> Cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    Placed,
    Confirmed,
    Completed,
    Cancelled,
}

impl OrderStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, OrderStatus::Completed | OrderStatus::Cancelled)
    }
}

/// The order aggregate's state (also its read model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    pub payment_method: String,
    pub status: OrderStatus,
    pub cancel_reason: Option<String>,
    pub placed_at_ms: u64,
    pub updated_at_ms: u64,
}

/// Commands the aggregate accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Place(PlaceOrder),
    Confirm(ConfirmOrder),
    Complete(CompleteOrder),
    Cancel(CancelOrder),
}

/// Why a command was not applied now.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Can never succeed (bad input): dead-letter.
    Invalid(String),
    /// Its prerequisite has not happened yet: retry later.
    NotYet(String),
}

/// Decides a command against the current order. `Ok(None)`: nothing to do (a repeat).
pub fn decide(order: Option<&Order>, cmd: &Command) -> Result<Option<Event>, Refusal> {
    match (order, cmd) {
        (None, Command::Place(p)) => {
            validate(p)?;
            Ok(Some(Event::Placed(OrderPlaced {
                order_id: p.order_id.clone(),
                customer_id: p.customer_id.clone(),
                items: p.items.clone(),
                total_cents: total(&p.items),
                payment_method: p.payment_method.clone(),
            })))
        }
        (Some(_), Command::Place(_)) => Ok(None),
        (None, other) => Err(Refusal::NotYet(format!(
            "order {} not placed yet",
            other.order_id()
        ))),
        (Some(o), Command::Confirm(_)) => match o.status {
            OrderStatus::Placed => Ok(Some(Event::Confirmed(OrderConfirmed {
                order_id: o.order_id.clone(),
            }))),
            _ => Ok(None),
        },
        (Some(o), Command::Complete(_)) => match o.status {
            OrderStatus::Confirmed => Ok(Some(Event::Completed(OrderCompleted {
                order_id: o.order_id.clone(),
            }))),
            OrderStatus::Placed => Err(Refusal::NotYet(format!(
                "order {} not confirmed yet",
                o.order_id
            ))),
            OrderStatus::Completed => Ok(None),
            OrderStatus::Cancelled => Err(Refusal::Invalid(format!(
                "order {} is cancelled",
                o.order_id
            ))),
        },
        (Some(o), Command::Cancel(c)) => match o.status {
            OrderStatus::Placed | OrderStatus::Confirmed => {
                Ok(Some(Event::Cancelled(OrderCancelled {
                    order_id: o.order_id.clone(),
                    reason: c.reason.clone(),
                })))
            }
            OrderStatus::Cancelled => Ok(None),
            OrderStatus::Completed => Err(Refusal::Invalid(format!(
                "order {} is completed",
                o.order_id
            ))),
        },
    }
}

/// Applies an event to the order (the only way its state changes).
pub fn apply(order: Option<Order>, ev: &Event, now_ms: u64) -> Option<Order> {
    match (order, ev) {
        (None, Event::Placed(p)) => Some(Order {
            order_id: p.order_id.clone(),
            customer_id: p.customer_id.clone(),
            items: p.items.clone(),
            total_cents: p.total_cents,
            payment_method: p.payment_method.clone(),
            status: OrderStatus::Placed,
            cancel_reason: None,
            placed_at_ms: now_ms,
            updated_at_ms: now_ms,
        }),
        (Some(mut o), ev) => {
            match ev {
                Event::Placed(_) => {}
                Event::Confirmed(_) => o.status = OrderStatus::Confirmed,
                Event::Completed(_) => o.status = OrderStatus::Completed,
                Event::Cancelled(c) => {
                    o.status = OrderStatus::Cancelled;
                    o.cancel_reason = Some(c.reason.clone());
                }
            }
            o.updated_at_ms = now_ms;
            Some(o)
        }
        (None, _) => None,
    }
}

fn validate(p: &PlaceOrder) -> Result<(), Refusal> {
    let bad = |m: &str| {
        Err(Refusal::Invalid(format!(
            "invalid PlaceOrder {}: {m}",
            p.order_id
        )))
    };
    if p.order_id.trim().is_empty() || p.customer_id.trim().is_empty() {
        return bad("order_id and customer_id must not be empty");
    }
    if p.items.is_empty() || p.items.len() > 100 {
        return bad("an order has 1 to 100 items");
    }
    if p.items
        .iter()
        .any(|i| i.qty == 0 || i.sku.trim().is_empty())
    {
        return bad("every item needs a sku and a quantity of at least 1");
    }
    if p.items
        .iter()
        .any(|i| i.qty > 1_000_000 || i.unit_price_cents > 100_000_000)
    {
        return bad("quantity or price out of range");
    }
    Ok(())
}

/// Order total in cents.
pub fn total(items: &[LineItem]) -> u64 {
    items
        .iter()
        .map(|i| i.qty as u64 * i.unit_price_cents)
        .sum()
}

fn order_key(id: &str) -> String {
    format!("order/{id}")
}
fn customer_key(id: &str) -> String {
    format!("customer/{id}")
}

/// The order aggregate: handles the commands addressed to orders.
pub struct Orders;

impl Component for Orders {
    type Input = Command;
    fn name(&self) -> &'static str {
        "orders"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::commands(
            CONTEXT,
            &[
                PlaceOrder::TYPE,
                ConfirmOrder::TYPE,
                CompleteOrder::TYPE,
                CancelOrder::TYPE,
            ],
        )]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Command, DecodeError> {
        Ok(match msg_type {
            PlaceOrder::TYPE => Command::Place(decode_as(payload)?),
            ConfirmOrder::TYPE => Command::Confirm(decode_as(payload)?),
            CompleteOrder::TYPE => Command::Complete(decode_as(payload)?),
            CancelOrder::TYPE => Command::Cancel(decode_as(payload)?),
            other => return Err(DecodeError::UnknownType(other.into())),
        })
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        cmd: &Command,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let key = order_key(cmd.order_id());
        let order: Option<Order> = load(tx, &key)?;
        let ev = match decide(order.as_ref(), cmd) {
            Ok(Some(ev)) => ev,
            Ok(None) => return Ok(vec![]),
            Err(Refusal::Invalid(m)) => return Err(HandleError::Permanent(m)),
            Err(Refusal::NotYet(m)) => return Err(HandleError::Retry(m)),
        };
        if let Some(o) = apply(order, &ev, ctx.now_ms) {
            save(tx, &key, &o)?;
        }
        Ok(vec![ev.outgoing()])
    }
}

/// Keeps the customer names this context shows in its read model.
pub struct CustomerCopy;

impl Component for CustomerCopy {
    type Input = CustomerRegistered;
    fn name(&self) -> &'static str {
        "customer_copy"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::events(
            customers::CONTEXT,
            &[CustomerRegistered::TYPE],
        )]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Self::Input, DecodeError> {
        match msg_type {
            CustomerRegistered::TYPE => decode_as(payload),
            other => Err(DecodeError::UnknownType(other.into())),
        }
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        ev: &CustomerRegistered,
        _: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        save(tx, &customer_key(&ev.customer_id), &ev.name)?;
        Ok(vec![])
    }
}

pub fn components() -> Vec<Arc<dyn DynComponent>> {
    vec![Arc::new(Orders), Arc::new(CustomerCopy)]
}

pub const QUERIES: &[&str] = &["order", "by-customer", "summary"];

/// `order {"order_id"}` -> the order with its customer's name; `by-customer
/// {"customer_id"}` -> that customer's orders; `summary` -> counts by status and every
/// order's status.
pub fn query(
    state: &dyn StateRead,
    name: &str,
    req: &[u8],
) -> Result<serde_json::Value, QueryError> {
    match name {
        "order" => {
            let id = runtime::request_field(req, "order_id")?;
            let o: Order = read(state, &order_key(&id))?.ok_or(QueryError::NotFound)?;
            let customer_name: Option<String> = read(state, &customer_key(&o.customer_id))?;
            let mut v = serde_json::to_value(&o).unwrap_or_default();
            v["customer_name"] = serde_json::json!(customer_name);
            Ok(v)
        }
        "by-customer" => {
            let id = runtime::request_field(req, "customer_id")?;
            let orders: Vec<Order> = read_all(state, "order/")?;
            let mine: Vec<_> = orders
                .into_iter()
                .filter(|o| o.customer_id == id)
                .map(|o| serde_json::json!({"order_id": o.order_id, "status": o.status, "total_cents": o.total_cents}))
                .collect();
            Ok(serde_json::json!({ "customer_id": id, "orders": mine }))
        }
        "summary" => {
            let orders: Vec<Order> = read_all(state, "order/")?;
            let mut counts = std::collections::BTreeMap::<String, u64>::new();
            let mut statuses = serde_json::Map::new();
            for o in &orders {
                *counts
                    .entry(format!("{:?}", o.status).to_lowercase())
                    .or_default() += 1;
                statuses.insert(o.order_id.clone(), serde_json::json!(o.status));
            }
            Ok(
                serde_json::json!({ "orders": orders.len(), "by_status": counts, "statuses": statuses }),
            )
        }
        other => Err(QueryError::Unknown(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(id: &str) -> PlaceOrder {
        PlaceOrder {
            order_id: id.into(),
            customer_id: "c1".into(),
            items: vec![LineItem {
                sku: "sku-1".into(),
                qty: 2,
                unit_price_cents: 150,
            }],
            payment_method: "card".into(),
        }
    }

    /// given `events`, when `cmd`, then the decision.
    fn given_when(events: &[Event], cmd: Command) -> Result<Option<Event>, Refusal> {
        let order = events.iter().fold(None, |o, e| apply(o, e, 1));
        decide(order.as_ref(), &cmd)
    }

    fn placed(id: &str) -> Event {
        decide(None, &Command::Place(place(id))).unwrap().unwrap()
    }

    #[test]
    fn placing_computes_the_total() {
        let Event::Placed(p) = placed("o1") else {
            panic!()
        };
        assert_eq!(p.total_cents, 300);
    }

    #[test]
    fn placing_twice_is_a_no_op() {
        assert_eq!(
            given_when(&[placed("o1")], Command::Place(place("o1"))),
            Ok(None)
        );
    }

    #[test]
    fn invalid_orders_are_refused_for_good() {
        let mut p = place("o1");
        p.items[0].qty = 0;
        assert!(matches!(
            decide(None, &Command::Place(p)),
            Err(Refusal::Invalid(_))
        ));
        let mut p = place("o1");
        p.items.clear();
        assert!(matches!(
            decide(None, &Command::Place(p)),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn complete_waits_for_confirm() {
        let r = given_when(
            &[placed("o1")],
            Command::Complete(CompleteOrder {
                order_id: "o1".into(),
            }),
        );
        assert!(matches!(r, Err(Refusal::NotYet(_))));
        let confirmed = Event::Confirmed(OrderConfirmed {
            order_id: "o1".into(),
        });
        let r = given_when(
            &[placed("o1"), confirmed],
            Command::Complete(CompleteOrder {
                order_id: "o1".into(),
            }),
        );
        assert_eq!(
            r,
            Ok(Some(Event::Completed(OrderCompleted {
                order_id: "o1".into()
            })))
        );
    }

    #[test]
    fn a_terminal_order_stays_terminal() {
        let cancel = Command::Cancel(CancelOrder {
            order_id: "o1".into(),
            reason: "x".into(),
        });
        let cancelled = Event::Cancelled(OrderCancelled {
            order_id: "o1".into(),
            reason: "x".into(),
        });
        assert_eq!(
            given_when(&[placed("o1"), cancelled.clone()], cancel.clone()),
            Ok(None)
        );
        let r = given_when(
            &[placed("o1"), cancelled],
            Command::Complete(CompleteOrder {
                order_id: "o1".into(),
            }),
        );
        assert!(matches!(r, Err(Refusal::Invalid(_))));
        let completed = [
            placed("o1"),
            Event::Confirmed(OrderConfirmed {
                order_id: "o1".into(),
            }),
            Event::Completed(OrderCompleted {
                order_id: "o1".into(),
            }),
        ];
        assert!(matches!(
            given_when(&completed, cancel),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn commands_for_unknown_orders_wait() {
        let r = decide(
            None,
            &Command::Confirm(ConfirmOrder {
                order_id: "o9".into(),
            }),
        );
        assert!(matches!(r, Err(Refusal::NotYet(_))));
    }
}
