//! Orders (sales): the authority on an order's lifecycle. Accepts `PlaceOrder`, then
//! `ConfirmOrder`, `CompleteOrder` or `CancelOrder` from the fulfilment process manager.
//! Read model: order status by id and by customer (with the customer's name, copied from
//! `CustomerRegistered`).

use customers::CustomerRegistered;
use runtime::context::ContextBuilder;
use runtime::{
    decode_as, read, read_all, save, Aggregate, Component, Decided, DecodeError, HandleCtx,
    HandleError, Message, Outgoing, QueryError, Rejection, StateRead, StateTx, Subscription,
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

runtime::messages! {
    /// The commands the order aggregate accepts.
    #[derive(Debug, Clone, PartialEq)]
    pub enum OrderCommand { PlaceOrder, ConfirmOrder, CompleteOrder, CancelOrder }
}

runtime::messages! {
    /// Every event of the order aggregate.
    #[derive(Debug, Clone, PartialEq)]
    pub enum OrderEvent { OrderPlaced, OrderConfirmed, OrderCompleted, OrderCancelled }
}

/// The order aggregate's state (also its read model); `status` is `None` until placed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    pub payment_method: String,
    pub status: Option<OrderStatus>,
    pub cancel_reason: Option<String>,
    pub placed_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Aggregate for Order {
    const NAME: &'static str = "order";
    const ID: &'static str = "order_id";
    type Command = OrderCommand;
    type Event = OrderEvent;

    /// A repeat changes nothing; a command for an order not placed (or not confirmed) yet is
    /// retried; one a terminal order can never take, and an invalid order, are rejected.
    fn decide(&self, command: &OrderCommand, _now: u64) -> Decided<OrderEvent> {
        use OrderCommand as C;
        use OrderStatus as S;
        let order_id = self.order_id.clone();
        Ok(match (self.status, command) {
            (None, C::PlaceOrder(p)) => {
                validate(p)?;
                vec![OrderPlaced {
                    order_id: p.order_id.clone(),
                    customer_id: p.customer_id.clone(),
                    items: p.items.clone(),
                    total_cents: total(&p.items),
                    payment_method: p.payment_method.clone(),
                }
                .into()]
            }
            (Some(_), C::PlaceOrder(_)) => vec![],
            (None, _) => return Err(Rejection::not_yet("order not placed yet")),
            (Some(S::Placed), C::ConfirmOrder(_)) => vec![OrderConfirmed { order_id }.into()],
            (Some(_), C::ConfirmOrder(_)) => vec![],
            (Some(S::Confirmed), C::CompleteOrder(_)) => vec![OrderCompleted { order_id }.into()],
            (Some(S::Placed), C::CompleteOrder(_)) => {
                return Err(Rejection::not_yet("order not confirmed yet"))
            }
            (Some(S::Completed), C::CompleteOrder(_)) => vec![],
            (Some(S::Cancelled), C::CompleteOrder(_)) => {
                return Err(Rejection::new("order is cancelled"))
            }
            (Some(S::Placed | S::Confirmed), C::CancelOrder(c)) => {
                let reason = c.reason.clone();
                vec![OrderCancelled { order_id, reason }.into()]
            }
            (Some(S::Cancelled), C::CancelOrder(_)) => vec![],
            (Some(S::Completed), C::CancelOrder(_)) => {
                return Err(Rejection::new("order is completed"))
            }
        })
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced(p) => {
                *self = Order {
                    order_id: p.order_id.clone(),
                    customer_id: p.customer_id.clone(),
                    items: p.items.clone(),
                    total_cents: p.total_cents,
                    payment_method: p.payment_method.clone(),
                    status: Some(OrderStatus::Placed),
                    ..Order::default()
                }
            }
            OrderEvent::OrderConfirmed(_) => self.status = Some(OrderStatus::Confirmed),
            OrderEvent::OrderCompleted(_) => self.status = Some(OrderStatus::Completed),
            OrderEvent::OrderCancelled(c) => {
                self.status = Some(OrderStatus::Cancelled);
                self.cancel_reason = Some(c.reason.clone());
            }
        }
    }

    fn stamp(&mut self, now_ms: u64) {
        if self.placed_at_ms == 0 {
            self.placed_at_ms = now_ms;
        }
        self.updated_at_ms = now_ms;
    }
}

fn validate(p: &PlaceOrder) -> Result<(), Rejection> {
    let bad = |m: &str| Err(Rejection::new(format!("invalid PlaceOrder: {m}")));
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
    runtime::aggregate::key::<Order>(id)
}
fn customer_key(id: &str) -> String {
    format!("customer/{id}")
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

/// The context without its saga: the order aggregate, the customer copy and the queries
/// (`order` answers with the customer's name, replacing the aggregate's own).
pub fn context() -> ContextBuilder {
    ContextBuilder::new(CONTEXT)
        .aggregate::<Order>()
        .component(CustomerCopy)
        .queries(QUERIES, query)
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
                let status = o.status.map(|s| format!("{s:?}").to_lowercase());
                *counts.entry(status.unwrap_or_default()).or_default() += 1;
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

    fn place(id: &str) -> OrderCommand {
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
        .into()
    }

    fn confirm() -> OrderCommand {
        ConfirmOrder {
            order_id: "o1".into(),
        }
        .into()
    }

    fn complete() -> OrderCommand {
        CompleteOrder {
            order_id: "o1".into(),
        }
        .into()
    }

    fn cancel() -> OrderCommand {
        CancelOrder {
            order_id: "o1".into(),
            reason: "x".into(),
        }
        .into()
    }

    /// given the commands (each decided and applied), when `command`, then the decision.
    fn given_when(given: &[OrderCommand], command: OrderCommand) -> Decided<OrderEvent> {
        let mut order = Order::default();
        for c in given {
            for e in order.decide(c, 1).expect("given") {
                order.apply(&e);
            }
        }
        order.decide(&command, 2)
    }

    #[test]
    fn placing_computes_the_total() {
        let events = given_when(&[], place("o1")).unwrap();
        let [OrderEvent::OrderPlaced(p)] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(p.total_cents, 300);
    }

    #[test]
    fn placing_twice_is_a_no_op() {
        assert_eq!(given_when(&[place("o1")], place("o1")), Ok(vec![]));
    }

    #[test]
    fn invalid_orders_are_refused_for_good() {
        let changes: [fn(&mut PlaceOrder); 2] = [|p| p.items[0].qty = 0, |p| p.items.clear()];
        for change in changes {
            let OrderCommand::PlaceOrder(mut p) = place("o1") else {
                unreachable!()
            };
            change(&mut p);
            let r = given_when(&[], p.into());
            assert!(matches!(&r, Err(r) if !r.is_later()), "{r:?}");
        }
    }

    #[test]
    fn complete_waits_for_confirm() {
        let r = given_when(&[place("o1")], complete());
        assert!(matches!(&r, Err(r) if r.is_later()), "{r:?}");
        let r = given_when(&[place("o1"), confirm()], complete());
        assert_eq!(
            r,
            Ok(vec![OrderCompleted {
                order_id: "o1".into()
            }
            .into()])
        );
    }

    #[test]
    fn a_terminal_order_stays_terminal() {
        assert_eq!(given_when(&[place("o1"), cancel()], cancel()), Ok(vec![]));
        let r = given_when(&[place("o1"), cancel()], complete());
        assert!(matches!(&r, Err(r) if !r.is_later()), "{r:?}");
        let r = given_when(&[place("o1"), confirm(), complete()], cancel());
        assert!(matches!(&r, Err(r) if !r.is_later()), "{r:?}");
    }

    #[test]
    fn commands_for_unknown_orders_wait() {
        let r = given_when(&[], confirm());
        assert!(matches!(&r, Err(r) if r.is_later()), "{r:?}");
    }

    #[test]
    fn the_order_records_when_it_was_placed_and_changed() {
        let mut order = Order::default();
        for (c, now) in [(place("o1"), 10), (confirm(), 20)] {
            for e in order.decide(&c, now).unwrap() {
                order.apply(&e);
            }
            order.stamp(now);
        }
        assert_eq!((order.placed_at_ms, order.updated_at_ms), (10, 20));
    }
}
