//! Order fulfilment: waits for stock and payment in either order, confirms the order, ships
//! it, then commits stock and captures payment, and completes the order. On a stock or
//! payment rejection or a failed shipment it compensates (releases stock, voids the
//! authorization) and only then cancels the order.
//!
//! `transition` is pure: (state, input, now) -> new state and the commands to send.

use inventory::{
    CommitStock, ReleaseStock, StockCommitted, StockRejected, StockReleased, StockReserved,
};
use orders::{CancelOrder, CompleteOrder, ConfirmOrder, LineItem, OrderPlaced};
use payments::{
    CapturePayment, PaymentAuthorized, PaymentCaptured, PaymentDeclined, PaymentVoided, VoidPayment,
};
use runtime::component::request_field;
use runtime::{
    decode_as, load, read, read_all, save, Component, DecodeError, HandleCtx, HandleError, Message,
    Outgoing, QueryError, StateRead, StateTx, Subscription,
};
use serde::{Deserialize, Serialize};
use shipping::{ShipOrder, ShipmentDispatched, ShipmentFailed};

pub const NAME: &str = "order-fulfilment";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StockStep {
    Pending,
    Reserved,
    Rejected,
    Releasing,
    Released,
    Committing,
    Committed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentStep {
    Pending,
    Authorized,
    Declined,
    Voiding,
    Voided,
    Capturing,
    Captured,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShipmentStep {
    NotRequested,
    Requested,
    Dispatched,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Active,
    Compensating,
    Completed,
    Cancelled,
}

/// One step of the instance's history: what came in, what went out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at_ms: u64,
    pub message_id: String,
    pub message_type: String,
    pub status: Status,
    pub sent: Vec<String>,
}

/// The persisted state of one order's fulfilment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub stock: StockStep,
    pub payment: PaymentStep,
    pub shipment: ShipmentStep,
    pub status: Status,
    pub reason: Option<String>,
    pub started_at_ms: u64,
    pub history: Vec<HistoryEntry>,
}

/// Every message the saga reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Placed(OrderPlaced),
    StockReserved(StockReserved),
    StockRejected(StockRejected),
    StockReleased(StockReleased),
    StockCommitted(StockCommitted),
    PaymentAuthorized(PaymentAuthorized),
    PaymentDeclined(PaymentDeclined),
    PaymentVoided(PaymentVoided),
    PaymentCaptured(PaymentCaptured),
    ShipmentDispatched(ShipmentDispatched),
    ShipmentFailed(ShipmentFailed),
}

impl Input {
    pub fn order_id(&self) -> &str {
        match self {
            Input::Placed(m) => &m.order_id,
            Input::StockReserved(m) => &m.order_id,
            Input::StockRejected(m) => &m.order_id,
            Input::StockReleased(m) => &m.order_id,
            Input::StockCommitted(m) => &m.order_id,
            Input::PaymentAuthorized(m) => &m.order_id,
            Input::PaymentDeclined(m) => &m.order_id,
            Input::PaymentVoided(m) => &m.order_id,
            Input::PaymentCaptured(m) => &m.order_id,
            Input::ShipmentDispatched(m) => &m.order_id,
            Input::ShipmentFailed(m) => &m.order_id,
        }
    }
}

/// The saga's pure transition. `Ok(None)`: nothing changes (a repeat or a late message).
/// `Err(Retry)`: the instance is not started yet (its `OrderPlaced` is still on its way).
pub fn transition(
    state: Option<&Fulfilment>,
    input: &Input,
    now_ms: u64,
) -> Result<Option<(Fulfilment, Vec<Outgoing>)>, HandleError> {
    let mut s = match (state, input) {
        (None, Input::Placed(p)) => Fulfilment {
            order_id: p.order_id.clone(),
            customer_id: p.customer_id.clone(),
            items: p.items.clone(),
            stock: StockStep::Pending,
            payment: PaymentStep::Pending,
            shipment: ShipmentStep::NotRequested,
            status: Status::Active,
            reason: None,
            started_at_ms: now_ms,
            history: vec![],
        },
        (None, other) => {
            return Err(HandleError::Retry(format!(
                "fulfilment of {} not started yet",
                other.order_id()
            )));
        }
        (Some(_), Input::Placed(_)) => return Ok(None),
        (Some(s), _) if matches!(s.status, Status::Completed | Status::Cancelled) => {
            return Ok(None)
        }
        (Some(s), input) => {
            let mut s = s.clone();
            if !record(&mut s, input) {
                return Ok(None);
            }
            s
        }
    };
    let sent = advance(&mut s);
    Ok(Some((s, sent)))
}

/// Records a participant's answer. Returns false if it changes nothing (a repeat).
fn record(s: &mut Fulfilment, input: &Input) -> bool {
    use PaymentStep as P;
    use ShipmentStep as Sh;
    use StockStep as St;
    let (before_stock, before_payment, before_ship) = (s.stock, s.payment, s.shipment);
    match input {
        Input::Placed(_) => {}
        Input::StockReserved(_) if s.stock == St::Pending => s.stock = St::Reserved,
        Input::StockRejected(r) if s.stock == St::Pending => {
            s.stock = St::Rejected;
            fail(s, &format!("stock rejected: {}", r.reason));
        }
        Input::StockReleased(_) if matches!(s.stock, St::Releasing | St::Reserved) => {
            s.stock = St::Released
        }
        Input::StockCommitted(_) if matches!(s.stock, St::Committing | St::Reserved) => {
            s.stock = St::Committed
        }
        Input::PaymentAuthorized(_) if s.payment == P::Pending => s.payment = P::Authorized,
        Input::PaymentDeclined(d) if s.payment == P::Pending => {
            s.payment = P::Declined;
            fail(s, &format!("payment declined: {}", d.reason));
        }
        Input::PaymentVoided(_) if matches!(s.payment, P::Voiding | P::Authorized) => {
            s.payment = P::Voided
        }
        Input::PaymentCaptured(_) if matches!(s.payment, P::Capturing | P::Authorized) => {
            s.payment = P::Captured
        }
        Input::ShipmentDispatched(_) if s.shipment == Sh::Requested => s.shipment = Sh::Dispatched,
        Input::ShipmentFailed(f) if s.shipment == Sh::Requested => {
            s.shipment = Sh::Failed;
            fail(s, &format!("shipment failed: {}", f.reason));
        }
        _ => {}
    }
    (s.stock, s.payment, s.shipment) != (before_stock, before_payment, before_ship)
}

fn fail(s: &mut Fulfilment, reason: &str) {
    if s.status == Status::Active {
        s.status = Status::Compensating;
        s.reason = Some(reason.to_string());
    }
}

/// Sends whatever the new state calls for.
fn advance(s: &mut Fulfilment) -> Vec<Outgoing> {
    use PaymentStep as P;
    use ShipmentStep as Sh;
    use StockStep as St;
    let id = s.order_id.clone();
    let mut out = Vec::new();
    match s.status {
        Status::Active => {
            if s.stock == St::Reserved
                && s.payment == P::Authorized
                && s.shipment == Sh::NotRequested
            {
                out.push(Outgoing::command(
                    orders::CONTEXT,
                    &ConfirmOrder {
                        order_id: id.clone(),
                    },
                ));
                out.push(Outgoing::command(
                    shipping::CONTEXT,
                    &ShipOrder {
                        order_id: id.clone(),
                        customer_id: s.customer_id.clone(),
                        items: s.items.clone(),
                    },
                ));
                s.shipment = Sh::Requested;
            } else if s.shipment == Sh::Dispatched
                && s.stock == St::Reserved
                && s.payment == P::Authorized
            {
                out.push(Outgoing::command(
                    inventory::CONTEXT,
                    &CommitStock {
                        order_id: id.clone(),
                    },
                ));
                out.push(Outgoing::command(
                    payments::CONTEXT,
                    &CapturePayment {
                        order_id: id.clone(),
                    },
                ));
                s.stock = St::Committing;
                s.payment = P::Capturing;
            } else if s.stock == St::Committed && s.payment == P::Captured {
                out.push(Outgoing::command(
                    orders::CONTEXT,
                    &CompleteOrder {
                        order_id: id.clone(),
                    },
                ));
                s.status = Status::Completed;
            }
        }
        Status::Compensating => {
            if s.stock == St::Reserved {
                out.push(Outgoing::command(
                    inventory::CONTEXT,
                    &ReleaseStock {
                        order_id: id.clone(),
                    },
                ));
                s.stock = St::Releasing;
            }
            if s.payment == P::Authorized {
                out.push(Outgoing::command(
                    payments::CONTEXT,
                    &VoidPayment {
                        order_id: id.clone(),
                    },
                ));
                s.payment = P::Voiding;
            }
            if matches!(s.stock, St::Rejected | St::Released)
                && matches!(s.payment, P::Declined | P::Voided)
            {
                let reason = s.reason.clone().unwrap_or_default();
                out.push(Outgoing::command(
                    orders::CONTEXT,
                    &CancelOrder {
                        order_id: id,
                        reason,
                    },
                ));
                s.status = Status::Cancelled;
            }
        }
        Status::Completed | Status::Cancelled => {}
    }
    out
}

fn key(order: &str) -> String {
    format!("saga/{NAME}/{order}")
}

/// The saga as a runtime component.
pub struct OrderFulfilment;

impl Component for OrderFulfilment {
    type Input = Input;
    fn name(&self) -> &'static str {
        "fulfilment"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![
            Subscription::events(orders::CONTEXT, &[OrderPlaced::TYPE]),
            Subscription::events(
                inventory::CONTEXT,
                &[
                    StockReserved::TYPE,
                    StockRejected::TYPE,
                    StockReleased::TYPE,
                    StockCommitted::TYPE,
                ],
            ),
            Subscription::events(
                payments::CONTEXT,
                &[
                    PaymentAuthorized::TYPE,
                    PaymentDeclined::TYPE,
                    PaymentVoided::TYPE,
                    PaymentCaptured::TYPE,
                ],
            ),
            Subscription::events(
                shipping::CONTEXT,
                &[ShipmentDispatched::TYPE, ShipmentFailed::TYPE],
            ),
        ]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Input, DecodeError> {
        Ok(match msg_type {
            OrderPlaced::TYPE => Input::Placed(decode_as(payload)?),
            StockReserved::TYPE => Input::StockReserved(decode_as(payload)?),
            StockRejected::TYPE => Input::StockRejected(decode_as(payload)?),
            StockReleased::TYPE => Input::StockReleased(decode_as(payload)?),
            StockCommitted::TYPE => Input::StockCommitted(decode_as(payload)?),
            PaymentAuthorized::TYPE => Input::PaymentAuthorized(decode_as(payload)?),
            PaymentDeclined::TYPE => Input::PaymentDeclined(decode_as(payload)?),
            PaymentVoided::TYPE => Input::PaymentVoided(decode_as(payload)?),
            PaymentCaptured::TYPE => Input::PaymentCaptured(decode_as(payload)?),
            ShipmentDispatched::TYPE => Input::ShipmentDispatched(decode_as(payload)?),
            ShipmentFailed::TYPE => Input::ShipmentFailed(decode_as(payload)?),
            other => return Err(DecodeError::UnknownType(other.into())),
        })
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let k = key(input.order_id());
        let state: Option<Fulfilment> = load(tx, &k)?;
        match transition(state.as_ref(), input, ctx.now_ms)? {
            None => Ok(vec![]),
            Some((mut next, out)) => {
                next.history.push(HistoryEntry {
                    at_ms: ctx.now_ms,
                    message_id: ctx.envelope.id.clone(),
                    message_type: ctx.envelope.msg_type.clone(),
                    status: next.status,
                    sent: out.iter().map(|o| o.msg_type.to_string()).collect(),
                });
                save(tx, &k, &next)?;
                Ok(out)
            }
        }
    }
}

pub const QUERIES: &[&str] = &["saga", "sagas"];

/// `saga {"order_id"}` -> the instance with its history; `sagas` -> counts by status and
/// every instance's status.
pub fn query(
    state: &dyn StateRead,
    name: &str,
    req: &[u8],
) -> Result<serde_json::Value, QueryError> {
    match name {
        "saga" => {
            let id = request_field(req, "order_id")?;
            let s: Fulfilment = read(state, &key(&id))?.ok_or(QueryError::NotFound)?;
            Ok(serde_json::to_value(s).unwrap_or_default())
        }
        "sagas" => {
            let all: Vec<Fulfilment> = read_all(state, &format!("saga/{NAME}/"))?;
            let mut counts = std::collections::BTreeMap::<String, u64>::new();
            let mut statuses = serde_json::Map::new();
            for s in &all {
                *counts
                    .entry(format!("{:?}", s.status).to_lowercase())
                    .or_default() += 1;
                statuses.insert(s.order_id.clone(), serde_json::json!(s.status));
            }
            Ok(
                serde_json::json!({ "instances": all.len(), "by_status": counts, "statuses": statuses }),
            )
        }
        other => Err(QueryError::Unknown(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> Input {
        Input::Placed(OrderPlaced {
            order_id: "o1".into(),
            customer_id: "c1".into(),
            items: vec![LineItem {
                sku: "a".into(),
                qty: 1,
                unit_price_cents: 100,
            }],
            total_cents: 100,
            payment_method: "card".into(),
        })
    }
    fn reserved() -> Input {
        Input::StockReserved(StockReserved {
            order_id: "o1".into(),
            items: vec![],
        })
    }
    fn authorized() -> Input {
        Input::PaymentAuthorized(PaymentAuthorized {
            order_id: "o1".into(),
            amount_cents: 100,
            auth_id: "a".into(),
        })
    }

    /// Given inputs (applied in order), returns the final state and every command type sent.
    fn run(inputs: &[Input]) -> (Option<Fulfilment>, Vec<&'static str>) {
        let mut state = None;
        let mut sent = vec![];
        for i in inputs {
            if let Ok(Some((s, out))) = transition(state.as_ref(), i, 0) {
                sent.extend(out.iter().map(|o| o.msg_type));
                state = Some(s);
            }
        }
        (state, sent)
    }

    #[test]
    fn happy_path_in_either_order() {
        for inputs in [
            vec![placed(), reserved(), authorized()],
            vec![placed(), authorized(), reserved()],
        ] {
            let mut all = inputs.clone();
            all.push(Input::ShipmentDispatched(ShipmentDispatched {
                order_id: "o1".into(),
                tracking: "t".into(),
            }));
            all.push(Input::PaymentCaptured(PaymentCaptured {
                order_id: "o1".into(),
                amount_cents: 100,
            }));
            all.push(Input::StockCommitted(StockCommitted {
                order_id: "o1".into(),
            }));
            let (s, sent) = run(&all);
            assert_eq!(s.unwrap().status, Status::Completed);
            assert_eq!(
                sent,
                [
                    "ConfirmOrder",
                    "ShipOrder",
                    "CommitStock",
                    "CapturePayment",
                    "CompleteOrder"
                ]
            );
        }
    }

    #[test]
    fn stock_rejected_voids_the_authorization_then_cancels() {
        let rejected = Input::StockRejected(StockRejected {
            order_id: "o1".into(),
            reason: "short".into(),
        });
        let voided = Input::PaymentVoided(PaymentVoided {
            order_id: "o1".into(),
            amount_cents: 100,
        });
        let (s, sent) = run(&[placed(), rejected, authorized(), voided]);
        let s = s.unwrap();
        assert_eq!(s.status, Status::Cancelled);
        assert_eq!(sent, ["VoidPayment", "CancelOrder"]);
    }

    #[test]
    fn payment_declined_releases_stock_then_cancels() {
        let declined = Input::PaymentDeclined(PaymentDeclined {
            order_id: "o1".into(),
            reason: "card".into(),
        });
        let released = Input::StockReleased(StockReleased {
            order_id: "o1".into(),
        });
        let (s, sent) = run(&[placed(), declined.clone(), reserved(), released]);
        assert_eq!(s.unwrap().status, Status::Cancelled);
        assert_eq!(sent, ["ReleaseStock", "CancelOrder"]);
        // Both refused: nothing to compensate.
        let rejected = Input::StockRejected(StockRejected {
            order_id: "o1".into(),
            reason: "short".into(),
        });
        let (_, sent) = run(&[placed(), declined, rejected]);
        assert_eq!(sent, ["CancelOrder"]);
    }

    #[test]
    fn shipment_failed_compensates_both() {
        let failed = Input::ShipmentFailed(ShipmentFailed {
            order_id: "o1".into(),
            reason: "nowhere".into(),
        });
        let (s, sent) = run(&[
            placed(),
            reserved(),
            authorized(),
            failed,
            Input::StockReleased(StockReleased {
                order_id: "o1".into(),
            }),
            Input::PaymentVoided(PaymentVoided {
                order_id: "o1".into(),
                amount_cents: 100,
            }),
        ]);
        assert_eq!(s.unwrap().status, Status::Cancelled);
        assert_eq!(
            sent,
            [
                "ConfirmOrder",
                "ShipOrder",
                "ReleaseStock",
                "VoidPayment",
                "CancelOrder"
            ]
        );
    }

    #[test]
    fn duplicates_change_nothing_and_early_events_wait() {
        assert!(matches!(
            transition(None, &reserved(), 0),
            Err(HandleError::Retry(_))
        ));
        let (once, sent_once) = run(&[placed(), reserved(), authorized()]);
        let (twice, sent_twice) = run(&[
            placed(),
            placed(),
            reserved(),
            reserved(),
            authorized(),
            authorized(),
        ]);
        assert_eq!(once, twice);
        assert_eq!(sent_once, sent_twice);
    }
}
