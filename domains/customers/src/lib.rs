//! Customers: the authority on who a customer is. Publishes `CustomerRegistered`; other
//! contexts keep their own copy of the fields they need.

use std::sync::Arc;

use runtime::component::DynComponent;
use runtime::{
    decode_as, load, read, save, Component, DecodeError, HandleCtx, HandleError, Message, Outgoing,
    QueryError, StateRead, StateTx, Subscription,
};
use serde::{Deserialize, Serialize};

pub const CONTEXT: &str = "customers";

/// Command: register a customer (idempotent by `customer_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterCustomer {
    pub customer_id: String,
    pub name: String,
    pub address: String,
}
runtime::message!(RegisterCustomer, Command);

/// Event: a customer exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerRegistered {
    pub customer_id: String,
    pub name: String,
    pub address: String,
}
runtime::message!(CustomerRegistered, Event);

/// Decides a registration: the first registration of an id wins; repeating it is a no-op;
/// an empty id or name can never succeed.
pub fn decide(
    existing: Option<&CustomerRegistered>,
    cmd: &RegisterCustomer,
) -> Result<Option<CustomerRegistered>, String> {
    if cmd.customer_id.trim().is_empty() || cmd.name.trim().is_empty() {
        return Err("customer_id and name must not be empty".into());
    }
    if existing.is_some() {
        return Ok(None);
    }
    Ok(Some(CustomerRegistered {
        customer_id: cmd.customer_id.clone(),
        name: cmd.name.clone(),
        address: cmd.address.clone(),
    }))
}

fn key(id: &str) -> String {
    format!("customer/{id}")
}

/// Handles `RegisterCustomer` commands.
pub struct Registration;

impl Component for Registration {
    type Input = RegisterCustomer;
    fn name(&self) -> &'static str {
        "registration"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::commands(CONTEXT, &[RegisterCustomer::TYPE])]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Self::Input, DecodeError> {
        match msg_type {
            RegisterCustomer::TYPE => decode_as(payload),
            other => Err(DecodeError::UnknownType(other.into())),
        }
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        cmd: &RegisterCustomer,
        _: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let existing: Option<CustomerRegistered> = load(tx, &key(&cmd.customer_id))?;
        match decide(existing.as_ref(), cmd).map_err(HandleError::Permanent)? {
            None => Ok(vec![]),
            Some(ev) => {
                save(tx, &key(&ev.customer_id), &ev)?;
                Ok(vec![Outgoing::event(&ev)])
            }
        }
    }
}

pub fn components() -> Vec<Arc<dyn DynComponent>> {
    vec![Arc::new(Registration)]
}

pub const QUERIES: &[&str] = &["customer", "summary"];

/// `customer {"customer_id"}` -> the customer; `summary` -> `{"customers": n}`.
pub fn query(
    state: &dyn StateRead,
    name: &str,
    req: &[u8],
) -> Result<serde_json::Value, QueryError> {
    match name {
        "customer" => {
            let id = runtime::request_field(req, "customer_id")?;
            let c: CustomerRegistered = read(state, &key(&id))?.ok_or(QueryError::NotFound)?;
            Ok(serde_json::to_value(c).unwrap_or_default())
        }
        "summary" => {
            let n = state
                .scan_prefix("customer/")
                .map_err(|e| QueryError::Store(e.to_string()))?
                .len();
            Ok(serde_json::json!({ "customers": n }))
        }
        other => Err(QueryError::Unknown(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: &str) -> RegisterCustomer {
        RegisterCustomer {
            customer_id: id.into(),
            name: "Ada".into(),
            address: "1 Main St".into(),
        }
    }

    #[test]
    fn first_registration_publishes_repeat_does_not() {
        let ev = decide(None, &cmd("c1")).unwrap().unwrap();
        assert_eq!(ev.customer_id, "c1");
        assert_eq!(decide(Some(&ev), &cmd("c1")).unwrap(), None);
    }

    #[test]
    fn empty_id_is_rejected() {
        assert!(decide(None, &cmd(" ")).is_err());
    }
}
