//! Shipping: dispatches an order through the external carrier on `ShipOrder`; on
//! `CancelShipment` makes sure no dispatch is kept. Keeps its own copy of each customer's
//! address from `CustomerRegistered` (autonomy over authority).

use std::sync::Arc;

use customers::CustomerRegistered;
use orders::LineItem;
use runtime::component::DynComponent;
use runtime::request_field;
use runtime::{
    load, message, read, read_all, save, Component, DecodeError, ExternalCall, HandleCtx,
    HandleError, Messages, Outgoing, QueryError, StateRead, StateTx, Subscription,
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
message!(ShipOrder, Command, CONTEXT);

/// Command from fulfilment (its shipping deadline passed): do not ship. If the order was
/// already dispatched this changes nothing (fulfilment hears `ShipmentDispatched`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelShipment {
    pub order_id: String,
}
message!(CancelShipment, Command, CONTEXT);

/// Command shipping sends itself: recall a dispatch the carrier accepted after the
/// shipment was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallShipment {
    pub order_id: String,
}
message!(RecallShipment, Command, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentDispatched {
    pub order_id: String,
    pub tracking: String,
}
message!(ShipmentDispatched, Event, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentFailed {
    pub order_id: String,
    pub reason: String,
}
message!(ShipmentFailed, Event, CONTEXT);

/// Cancelled before any dispatch; none will be kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentCancelled {
    pub order_id: String,
}
message!(ShipmentCancelled, Event, CONTEXT);

/// A dispatch made after cancellation was recalled at the carrier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentRecalled {
    pub order_id: String,
    pub tracking: String,
}
message!(ShipmentRecalled, Event, CONTEXT);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShipmentStatus {
    Dispatched,
    Failed,
    Cancelled,
    /// Dispatched after cancellation; the recall is on its way.
    Recalling,
    Recalled,
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

runtime::messages! {
    /// Inputs of the dispatch component.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Input { CustomerRegistered, ShipOrder, CancelShipment, RecallShipment }
}

/// Which carrier request the input needs. A `ShipOrder` waits (retries) until the address
/// is known.
pub fn plan(
    address: Option<&str>,
    shipment: Option<&Shipment>,
    input: &Input,
) -> Result<Option<ExternalCall>, HandleError> {
    match (input, shipment) {
        (Input::ShipOrder(cmd), None) => {
            let address = address.ok_or_else(|| {
                HandleError::Retry(format!(
                    "address of customer {} not known yet",
                    cmd.customer_id
                ))
            })?;
            Ok(Some(carrier_call(
                "dispatch",
                serde_json::json!({
                    "idempotency_key": format!("dispatch:{}", cmd.order_id),
                    "order_id": cmd.order_id,
                    "address": address,
                    "parcels": cmd.items.iter().map(|i| i.qty).sum::<u32>(),
                }),
            )))
        }
        (Input::RecallShipment(r), Some(s)) if s.status == ShipmentStatus::Recalling => {
            Ok(Some(carrier_call(
                "recall",
                serde_json::json!({
                    "idempotency_key": format!("recall:{}", r.order_id),
                    "order_id": r.order_id,
                    "tracking": s.tracking,
                }),
            )))
        }
        _ => Ok(None),
    }
}

fn carrier_call(op: &str, body: serde_json::Value) -> ExternalCall {
    ExternalCall {
        system: CARRIER,
        subject: runtime::wire::subjects::external(CARRIER, op),
        body: body.to_string(),
    }
}

/// Applies the input and the carrier's reply. `Ok(None)`: nothing changes (a repeat).
pub fn decide(
    shipment: Option<&Shipment>,
    input: &Input,
    reply: Option<&serde_json::Value>,
) -> Result<Option<(Shipment, Vec<Outgoing>)>, HandleError> {
    use ShipmentStatus as S;
    let need_reply = || HandleError::Retry("carrier was not asked; retry".into());
    match (input, shipment) {
        (Input::CustomerRegistered(_), _) => Ok(None),
        (Input::ShipOrder(cmd), None) => {
            let r = dispatch_reply(reply.ok_or_else(need_reply)?)?;
            let order_id = cmd.order_id.clone();
            Ok(Some(match r {
                Ok(tracking) => (
                    Shipment {
                        order_id: order_id.clone(),
                        status: S::Dispatched,
                        tracking: Some(tracking.clone()),
                        reason: None,
                    },
                    vec![Outgoing::event(&ShipmentDispatched { order_id, tracking })],
                ),
                Err(reason) => (
                    Shipment {
                        order_id: order_id.clone(),
                        status: S::Failed,
                        tracking: None,
                        reason: Some(reason.clone()),
                    },
                    vec![Outgoing::event(&ShipmentFailed { order_id, reason })],
                ),
            }))
        }
        // Cancelled while the carrier accepted it: keep it on record and recall it.
        (Input::ShipOrder(cmd), Some(s)) if s.status == S::Cancelled && reply.is_some() => {
            match dispatch_reply(reply.ok_or_else(need_reply)?)? {
                Ok(tracking) => Ok(Some((
                    Shipment {
                        status: S::Recalling,
                        tracking: Some(tracking),
                        ..s.clone()
                    },
                    vec![Outgoing::command(
                        CONTEXT,
                        &RecallShipment {
                            order_id: cmd.order_id.clone(),
                        },
                    )],
                ))),
                Err(_) => Ok(None),
            }
        }
        (Input::ShipOrder(_), Some(_)) => Ok(None),
        (Input::CancelShipment(c), None) => Ok(Some((
            Shipment {
                order_id: c.order_id.clone(),
                status: S::Cancelled,
                tracking: None,
                reason: Some("cancelled before dispatch".into()),
            },
            vec![Outgoing::event(&ShipmentCancelled {
                order_id: c.order_id.clone(),
            })],
        ))),
        (Input::CancelShipment(_), Some(_)) => Ok(None),
        (Input::RecallShipment(_), Some(s)) if s.status == S::Recalling => {
            let v = reply.ok_or_else(need_reply)?;
            if v.get("ok").and_then(|b| b.as_bool()) != Some(true) {
                return Err(HandleError::Permanent(format!(
                    "carrier refused to recall {}: {v}",
                    s.order_id
                )));
            }
            let tracking = s.tracking.clone().unwrap_or_default();
            Ok(Some((
                Shipment {
                    status: S::Recalled,
                    ..s.clone()
                },
                vec![Outgoing::event(&ShipmentRecalled {
                    order_id: s.order_id.clone(),
                    tracking,
                })],
            )))
        }
        (Input::RecallShipment(_), _) => Ok(None),
    }
}

/// `Ok(tracking)` if accepted, `Err(reason)` if refused.
fn dispatch_reply(v: &serde_json::Value) -> Result<Result<String, String>, HandleError> {
    let r: DispatchReply = serde_json::from_value(v.clone())
        .map_err(|e| HandleError::Retry(format!("carrier reply: {e}")))?;
    match (r.accepted, r.tracking) {
        (true, Some(t)) => Ok(Ok(t)),
        (true, None) => Err(HandleError::Retry(
            "carrier accepted without a tracking number".into(),
        )),
        (false, _) => Ok(Err(r.reason.unwrap_or_else(|| "refused by carrier".into()))),
    }
}

fn address_key(customer: &str) -> String {
    format!("address/{customer}")
}
fn shipment_key(order: &str) -> String {
    format!("shipment/{order}")
}

impl Input {
    fn order_id(&self) -> Option<&str> {
        match self {
            Input::CustomerRegistered(_) => None,
            Input::ShipOrder(c) => Some(&c.order_id),
            Input::CancelShipment(c) => Some(&c.order_id),
            Input::RecallShipment(c) => Some(&c.order_id),
        }
    }
}

/// The dispatch component.
pub struct Dispatch;

impl Component for Dispatch {
    type Input = Input;
    fn name(&self) -> &'static str {
        "dispatch"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        Subscription::of::<Input>()
    }
    fn external_systems(&self) -> Vec<&'static str> {
        vec![CARRIER]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Input, DecodeError> {
        Input::decode(msg_type, payload)
    }
    fn plan(
        &self,
        state: &dyn StateRead,
        input: &Input,
    ) -> Result<Option<ExternalCall>, HandleError> {
        let Some(order_id) = input.order_id() else {
            return Ok(None);
        };
        let shipment: Option<Shipment> = read(state, &shipment_key(order_id))?;
        let address: Option<String> = match input {
            Input::ShipOrder(cmd) => read(state, &address_key(&cmd.customer_id))?,
            _ => None,
        };
        plan(address.as_deref(), shipment.as_ref(), input)
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        if let Input::CustomerRegistered(c) = input {
            save(tx, &address_key(&c.customer_id), &c.address)?;
            return Ok(vec![]);
        }
        let Some(order_id) = input.order_id() else {
            return Ok(vec![]);
        };
        let k = shipment_key(order_id);
        let shipment: Option<Shipment> = load(tx, &k)?;
        match decide(shipment.as_ref(), input, ctx.external)? {
            None => Ok(vec![]),
            Some((s, out)) => {
                save(tx, &k, &s)?;
                Ok(out)
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
    use runtime::component::testing::Harness;

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
    fn accepted() -> serde_json::Value {
        serde_json::json!({"accepted": true, "tracking": "T1"})
    }
    fn cancel() -> CancelShipment {
        CancelShipment {
            order_id: "o1".into(),
        }
    }
    /// Dispatch, knowing customer c1's address.
    fn dispatch() -> Harness<Dispatch> {
        let mut d = Harness::new(Dispatch);
        let registered = CustomerRegistered {
            customer_id: "c1".into(),
            name: "Ada".into(),
            address: "1 Main St".into(),
        };
        assert!(d.receive(registered).unwrap().is_empty());
        d
    }
    fn status(d: &Harness<Dispatch>) -> ShipmentStatus {
        d.state::<Shipment>("shipment/o1").unwrap().status
    }

    #[test]
    fn waits_for_the_address() {
        let d = Harness::new(Dispatch);
        assert!(matches!(d.plan(ship()), Err(HandleError::Retry(_))));
        let call = dispatch().plan(ship()).unwrap().unwrap();
        assert!(call.body.contains("dispatch:o1"));
        assert!(call.body.contains("1 Main St"));
    }

    #[test]
    fn dispatched_once() {
        let mut d = dispatch();
        let out = d.answer(ship(), accepted()).unwrap();
        assert_eq!(out[0].msg_type, "ShipmentDispatched");
        assert_eq!(status(&d), ShipmentStatus::Dispatched);
        assert!(d.receive(ship()).unwrap().is_empty(), "no second dispatch");
        assert!(
            d.receive(cancel()).unwrap().is_empty(),
            "cancel after dispatch changes nothing"
        );
        assert_eq!(status(&d), ShipmentStatus::Dispatched);
    }

    #[test]
    fn refused_shipment_fails() {
        let mut d = dispatch();
        let reply = serde_json::json!({"accepted": false, "reason": "undeliverable address"});
        let out = d.answer(ship(), reply).unwrap();
        assert_eq!(out[0].msg_type, "ShipmentFailed");
        assert_eq!(status(&d), ShipmentStatus::Failed);
    }

    #[test]
    fn cancel_before_dispatch_recalls_a_late_dispatch() {
        let mut d = dispatch();
        // The carrier is asked; the cancellation commits before the reply does.
        assert!(d.plan(ship()).unwrap().is_some());
        let out = d.receive(cancel()).unwrap();
        assert_eq!(
            (status(&d), out[0].msg_type),
            (ShipmentStatus::Cancelled, "ShipmentCancelled")
        );
        assert!(d.plan(ship()).unwrap().is_none(), "no new dispatch");
        let out = d.handle(&ship().into(), Some(&accepted())).unwrap();
        assert_eq!(
            (status(&d), out[0].msg_type),
            (ShipmentStatus::Recalling, "RecallShipment")
        );
        let recall = RecallShipment {
            order_id: "o1".into(),
        };
        assert!(d
            .plan(recall.clone())
            .unwrap()
            .unwrap()
            .body
            .contains("recall:o1"));
        let out = d.answer(recall, serde_json::json!({"ok": true})).unwrap();
        assert_eq!(
            (status(&d), out[0].msg_type),
            (ShipmentStatus::Recalled, "ShipmentRecalled")
        );
    }

    #[test]
    fn a_refused_recall_is_dead_lettered_and_writes_nothing() {
        let mut d = dispatch();
        d.receive(cancel()).unwrap();
        d.handle(&ship().into(), Some(&accepted())).unwrap();
        let recall = RecallShipment {
            order_id: "o1".into(),
        };
        let refused = d.answer(recall, serde_json::json!({"ok": false}));
        assert!(matches!(refused, Err(HandleError::Permanent(_))));
        assert_eq!(status(&d), ShipmentStatus::Recalling);
    }
}
