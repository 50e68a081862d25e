//! Process managers of the example shop. `order_fulfilment` coordinates orders, inventory,
//! payments and shipping for one order, and compensates what was done when a step fails.

use std::collections::BTreeMap;
use std::sync::Arc;

use runtime::component::DynComponent;
use runtime::config::SagaSettings;
use runtime::saga::{DynSaga, SagaComponent};

pub mod order_fulfilment;

pub use order_fulfilment::{Fulfilment, OrderFulfilment, Timeouts};

/// Every saga's name, for `choreo saga graph`.
pub const NAMES: &[&str] = &[order_fulfilment::NAME];

/// A saga as the node hosts it: a component (its subscriptions) and a saga (deadlines,
/// inspection).
pub type Hosted = (Arc<dyn DynComponent>, Arc<dyn DynSaga>);

/// The order fulfilment saga with its timeouts (`[sagas.order-fulfilment]` in the node
/// config), as a component (its subscriptions) and as a saga (deadlines, inspection).
pub fn order_fulfilment(config: &BTreeMap<String, SagaSettings>) -> Result<Hosted, String> {
    let timeouts = match config.get(order_fulfilment::NAME) {
        Some(m) => Timeouts::from_map(m)?,
        None => Timeouts::default(),
    };
    let saga = Arc::new(SagaComponent(Arc::new(OrderFulfilment { timeouts })));
    Ok((saga.clone(), saga))
}

/// The declared graph of a saga by name.
pub fn definition(name: &str) -> Option<runtime::saga::Definition> {
    (name == order_fulfilment::NAME).then(order_fulfilment::definition)
}
