//! Process managers of the example shop. `order_fulfilment` coordinates orders, inventory,
//! payments and shipping for one order, and compensates what was done when a step fails.

use std::sync::Arc;

use runtime::component::DynComponent;

pub mod order_fulfilment;

pub use order_fulfilment::Fulfilment;

/// Components of every process manager; hosted by the orders context.
pub fn components() -> Vec<Arc<dyn DynComponent>> {
    vec![Arc::new(order_fulfilment::OrderFulfilment)]
}

pub const QUERIES: &[&str] = order_fulfilment::QUERIES;
pub use order_fulfilment::query;
