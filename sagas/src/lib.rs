//! Process managers of the example shop. `order_fulfilment` coordinates orders, inventory,
//! payments and shipping for one order, and compensates what was done when a step fails.

use std::collections::BTreeMap;

use runtime::config::SagaSettings;
use runtime::saga::{ProcessManager, Saga};

pub mod order_fulfilment;

pub use order_fulfilment::{Fulfilment, Timeouts};

/// Every saga's name, for `choreo saga graph`.
pub const NAMES: &[&str] = &[order_fulfilment::NAME];

/// The order fulfilment saga with its timeouts (`[sagas.order-fulfilment]` in the node
/// config).
pub fn order_fulfilment(
    config: &BTreeMap<String, SagaSettings>,
) -> Result<Saga<Fulfilment>, String> {
    let timeouts = match config.get(order_fulfilment::NAME) {
        Some(m) => Timeouts::from_map(m)?,
        None => Timeouts::default(),
    };
    Ok(order_fulfilment::saga(timeouts))
}

/// The declared graph of a saga by name.
pub fn definition(name: &str) -> Option<runtime::saga::Definition> {
    (name == order_fulfilment::NAME)
        .then(|| order_fulfilment::saga(Timeouts::default()).definition())
}
