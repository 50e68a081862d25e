//! Customers: the authority on who a customer is. Publishes `CustomerRegistered`; other
//! contexts keep their own copy of the fields they need.

use runtime::context::ContextBuilder;
use runtime::{Aggregate, Decided, QueryError, Rejection, StateRead};
use serde::{Deserialize, Serialize};

pub const CONTEXT: &str = "customers";

/// Command: register a customer (idempotent by `customer_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterCustomer {
    pub customer_id: String,
    pub name: String,
    pub address: String,
}
runtime::message!(RegisterCustomer, Command, CONTEXT);

/// Event: a customer exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerRegistered {
    pub customer_id: String,
    pub name: String,
    pub address: String,
}
runtime::message!(CustomerRegistered, Event, CONTEXT);

runtime::messages! {
    /// The commands customers accepts.
    pub enum CustomerCommand { RegisterCustomer }
}

runtime::messages! {
    /// The events customers publishes.
    pub enum CustomerEvent { CustomerRegistered }
}

/// A customer as this context keeps it (also the `customer` query's answer, empty fields
/// for an id never registered): the first registration of an id wins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub customer_id: String,
    pub name: String,
    pub address: String,
}

impl Aggregate for Customer {
    const NAME: &'static str = "customer";
    const ID: &'static str = "customer_id";
    type Command = CustomerCommand;
    type Event = CustomerEvent;

    /// Repeating a registration is a no-op; an empty id or name can never succeed.
    fn decide(&self, command: &CustomerCommand, _now: u64) -> Decided<CustomerEvent> {
        let CustomerCommand::RegisterCustomer(c) = command;
        if c.customer_id.trim().is_empty() || c.name.trim().is_empty() {
            return Err(Rejection::new("customer_id and name must not be empty"));
        }
        if !self.customer_id.is_empty() {
            return Ok(vec![]);
        }
        let (customer_id, name, address) =
            (c.customer_id.clone(), c.name.clone(), c.address.clone());
        Ok(vec![CustomerRegistered {
            customer_id,
            name,
            address,
        }
        .into()])
    }

    fn apply(&mut self, event: &CustomerEvent) {
        let CustomerEvent::CustomerRegistered(e) = event;
        *self = Customer {
            customer_id: e.customer_id.clone(),
            name: e.name.clone(),
            address: e.address.clone(),
        };
    }
}

/// The context: the customer aggregate (and its `customer {"customer_id"}` query) and
/// `summary` -> `{"customers": n}`.
pub fn context() -> ContextBuilder {
    ContextBuilder::new(CONTEXT)
        .aggregate::<Customer>()
        .query("summary", summary)
}

fn summary(state: &dyn StateRead, _: &[u8]) -> Result<serde_json::Value, QueryError> {
    let prefix = format!("{}/", Customer::NAME);
    let n = state
        .scan_prefix(&prefix)
        .map_err(|e| QueryError::Store(e.to_string()))?
        .len();
    Ok(serde_json::json!({ "customers": n }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str) -> CustomerCommand {
        RegisterCustomer {
            customer_id: id.into(),
            name: "Ada".into(),
            address: "1 Main St".into(),
        }
        .into()
    }

    #[test]
    fn first_registration_publishes_repeat_does_not() {
        let mut c = Customer::default();
        let events = c.decide(&cmd("c1"), 0).unwrap();
        assert_eq!(events.len(), 1);
        c.apply(&events[0]);
        assert_eq!(c.customer_id, "c1");
        assert!(c.decide(&cmd("c1"), 0).unwrap().is_empty());
    }

    #[test]
    fn empty_id_is_rejected() {
        assert!(Customer::default().decide(&cmd(" "), 0).is_err());
    }
}
