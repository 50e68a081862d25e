//! Shipping: dispatches an order through the external carrier on `ShipOrder`. Keeps its own
//! copy of each customer's address from `CustomerRegistered` (autonomy over authority).

use std::sync::Arc;

use customers::CustomerRegistered;
use orders::LineItem;
use runtime::component::{request_field, DynComponent};
use runtime::{
    decode_as, load, message, read, read_all, save, subjects, Component, DecodeError, ExternalCall,
    HandleCtx, HandleError, Message, Outgoing, QueryError, StateRead, StateTx, Subscription,
};
use serde::{Deserialize, Serialize};

pub const CONTEXT: &str = "shipping";
/// External system name (metrics, breaker).
pub const CARRIER: &str = "carrier";

/// Command from fulfilment: send the order to the customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipOrder {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
}
message!(ShipOrder, Command);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    pub order_id: String,
    pub tracking: String,
}
message!(ShipmentDispatched, Event);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentFailed {
    pub order_id: String,
    pub reason: String,
}
message!(ShipmentFailed, Event);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShipmentStatus {
    Dispatched,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    pub order_id: String,
    pub status: ShipmentStatus,
    pub tracking: Option<String>,
    pub reason: Option<String>,
}

/// Carrier reply to `dispatch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchReply {
    pub accepted: bool,
    #[serde(default)]
    pub tracking: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Customer(CustomerRegistered),
    Ship(ShipOrder),
}

/// Which carrier request a `ShipOrder` needs. Waits (retries) until the address is known.
pub fn plan(
    address: Option<&str>,
    shipment: Option<&Shipment>,
    cmd: &ShipOrder,
) -> Result<Option<ExternalCall>, HandleError> {
    if shipment.is_some() {
        return Ok(None);
    }
    let address = address.ok_or_else(|| {
        HandleError::Retry(format!(
            "address of customer {} not known yet",
            cmd.customer_id
        ))
    })?;
    Ok(Some(ExternalCall {
        system: CARRIER,
        subject: subjects::external(CARRIER, "dispatch"),
        body: serde_json::json!({
            "idempotency_key": format!("dispatch:{}", cmd.order_id),
            "order_id": cmd.order_id,
            "address": address,
            "parcels": cmd.items.iter().map(|i| i.qty).sum::<u32>(),
        })
        .to_string(),
    }))
}

/// Applies the carrier's reply. `Ok(None)`: already shipped or failed (a repeat).
pub fn decide(
    shipment: Option<&Shipment>,
    cmd: &ShipOrder,
    reply: Option<&serde_json::Value>,
) -> Result<Option<(Shipment, Outgoing)>, HandleError> {
    if shipment.is_some() {
        return Ok(None);
    }
    let reply = reply.ok_or_else(|| HandleError::Retry("carrier was not asked; retry".into()))?;
    let r: DispatchReply = serde_json::from_value(reply.clone())
        .map_err(|e| HandleError::Retry(format!("carrier reply: {e}")))?;
    let order_id = cmd.order_id.clone();
    Ok(Some(match (r.accepted, r.tracking) {
        (true, Some(tracking)) => (
            Shipment {
                order_id: order_id.clone(),
                status: ShipmentStatus::Dispatched,
                tracking: Some(tracking.clone()),
                reason: None,
            },
            Outgoing::event(&ShipmentDispatched { order_id, tracking }),
        ),
        (true, None) => {
            return Err(HandleError::Retry(
                "carrier accepted without a tracking number".into(),
            ))
        }
        (false, _) => {
            let reason = r.reason.unwrap_or_else(|| "refused by carrier".into());
            (
                Shipment {
                    order_id: order_id.clone(),
                    status: ShipmentStatus::Failed,
                    tracking: None,
                    reason: Some(reason.clone()),
                },
                Outgoing::event(&ShipmentFailed { order_id, reason }),
            )
        }
    }))
}

fn address_key(customer: &str) -> String {
    format!("address/{customer}")
}
fn shipment_key(order: &str) -> String {
    format!("shipment/{order}")
}

/// The dispatch component.
pub struct Dispatch;

impl Component for Dispatch {
    type Input = Input;
    fn name(&self) -> &'static str {
        "dispatch"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![
            Subscription::events(customers::CONTEXT, &[CustomerRegistered::TYPE]),
            Subscription::commands(CONTEXT, &[ShipOrder::TYPE]),
        ]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Input, DecodeError> {
        Ok(match msg_type {
            CustomerRegistered::TYPE => Input::Customer(decode_as(payload)?),
            ShipOrder::TYPE => Input::Ship(decode_as(payload)?),
            other => return Err(DecodeError::UnknownType(other.into())),
        })
    }
    fn plan(
        &self,
        state: &dyn StateRead,
        input: &Input,
    ) -> Result<Option<ExternalCall>, HandleError> {
        match input {
            Input::Customer(_) => Ok(None),
            Input::Ship(cmd) => {
                let address: Option<String> = read(state, &address_key(&cmd.customer_id))?;
                let shipment: Option<Shipment> = read(state, &shipment_key(&cmd.order_id))?;
                plan(address.as_deref(), shipment.as_ref(), cmd)
            }
        }
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        match input {
            Input::Customer(c) => {
                save(tx, &address_key(&c.customer_id), &c.address)?;
                Ok(vec![])
            }
            Input::Ship(cmd) => {
                let k = shipment_key(&cmd.order_id);
                let shipment: Option<Shipment> = load(tx, &k)?;
                match decide(shipment.as_ref(), cmd, ctx.external)? {
                    None => Ok(vec![]),
                    Some((s, ev)) => {
                        save(tx, &k, &s)?;
                        Ok(vec![ev])
                    }
                }
            }
        }
    }
}

pub fn components() -> Vec<Arc<dyn DynComponent>> {
    vec![Arc::new(Dispatch)]
}

pub const QUERIES: &[&str] = &["shipment", "summary"];

/// `shipment {"order_id"}`; `summary` -> every shipment's status.
pub fn query(
    state: &dyn StateRead,
    name: &str,
    req: &[u8],
) -> Result<serde_json::Value, QueryError> {
    match name {
        "shipment" => {
            let id = request_field(req, "order_id")?;
            let s: Shipment = read(state, &shipment_key(&id))?.ok_or(QueryError::NotFound)?;
            Ok(serde_json::to_value(s).unwrap_or_default())
        }
        "summary" => {
            let ss: Vec<Shipment> = read_all(state, "shipment/")?;
            let statuses: serde_json::Map<_, _> = ss
                .iter()
                .map(|s| (s.order_id.clone(), serde_json::json!(s.status)))
                .collect();
            Ok(serde_json::json!({ "shipments": statuses }))
        }
        other => Err(QueryError::Unknown(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ship() -> ShipOrder {
        ShipOrder {
            order_id: "o1".into(),
            customer_id: "c1".into(),
            items: vec![LineItem {
                sku: "a".into(),
                qty: 2,
                unit_price_cents: 1,
            }],
        }
    }

    #[test]
    fn waits_for_the_address() {
        assert!(matches!(
            plan(None, None, &ship()),
            Err(HandleError::Retry(_))
        ));
        let call = plan(Some("1 Main St"), None, &ship()).unwrap().unwrap();
        assert!(call.body.contains("dispatch:o1"));
    }

    #[test]
    fn dispatched_once() {
        let reply = serde_json::json!({"accepted": true, "tracking": "T1"});
        let (s, ev) = decide(None, &ship(), Some(&reply)).unwrap().unwrap();
        assert_eq!(s.status, ShipmentStatus::Dispatched);
        assert_eq!(ev.msg_type, "ShipmentDispatched");
        assert!(plan(Some("x"), Some(&s), &ship()).unwrap().is_none());
        assert_eq!(decide(Some(&s), &ship(), Some(&reply)).unwrap(), None);
    }

    #[test]
    fn refused_shipment_fails() {
        let reply = serde_json::json!({"accepted": false, "reason": "undeliverable address"});
        let (s, ev) = decide(None, &ship(), Some(&reply)).unwrap().unwrap();
        assert_eq!(s.status, ShipmentStatus::Failed);
        assert_eq!(ev.msg_type, "ShipmentFailed");
    }
}
