//! The orders context's public contract: the commands it accepts and the events it publishes.

use runtime::message;
use serde::{Deserialize, Serialize};

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub sku: String,
    pub qty: u32,
    pub unit_price_cents: u64,
}

/// Command: place an order (idempotent by `order_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    /// Opaque token handed to the payment gateway.
    pub payment_method: String,
}
message!(PlaceOrder, Command, super::CONTEXT);

/// Command from fulfilment: stock and payment are secured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfirmOrder {
    pub order_id: String,
}
message!(ConfirmOrder, Command, super::CONTEXT);

/// Command from fulfilment: shipped and paid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteOrder {
    pub order_id: String,
}
message!(CompleteOrder, Command, super::CONTEXT);

/// Command from fulfilment: the order cannot be fulfilled; compensation is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelOrder {
    pub order_id: String,
    pub reason: String,
}
message!(CancelOrder, Command, super::CONTEXT);

/// Event: an order was accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub total_cents: u64,
    pub payment_method: String,
}
message!(OrderPlaced, Event, super::CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub order_id: String,
}
message!(OrderConfirmed, Event, super::CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCompleted {
    pub order_id: String,
}
message!(OrderCompleted, Event, super::CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: String,
    pub reason: String,
}
message!(OrderCancelled, Event, super::CONTEXT);
