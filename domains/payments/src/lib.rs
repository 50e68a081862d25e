//! Payments (billing): authorizes an order's total through the external payment gateway on
//! `OrderPlaced`, captures on `CapturePayment`, voids on `VoidPayment`.
//!
//! Every gateway request carries an idempotency key derived from the order and the
//! operation: a message redelivered before its transaction committed repeats the request,
//! and the gateway answers it without acting twice.
//! Conservation: per order, captured + voided = authorized, and nothing is captured for a
//! cancelled order.

use std::sync::Arc;

use orders::OrderPlaced;
use runtime::component::{request_field, DynComponent};
use runtime::{
    decode_as, load, message, read, read_all, save, subjects, Component, DecodeError, ExternalCall,
    HandleCtx, HandleError, Message, Outgoing, QueryError, StateRead, StateTx, Subscription,
};
use serde::{Deserialize, Serialize};

pub const CONTEXT: &str = "payments";
/// External system name (metrics, breaker).
pub const GATEWAY: &str = "payment-gateway";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturePayment {
    pub order_id: String,
}
message!(CapturePayment, Command);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoidPayment {
    pub order_id: String,
}
message!(VoidPayment, Command);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub order_id: String,
    pub amount_cents: u64,
    pub auth_id: String,
}
message!(PaymentAuthorized, Event);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: String,
    pub reason: String,
}
message!(PaymentDeclined, Event);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub amount_cents: u64,
}
message!(PaymentCaptured, Event);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentVoided {
    pub order_id: String,
    pub amount_cents: u64,
}
message!(PaymentVoided, Event);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentStatus {
    Authorized,
    Declined,
    Captured,
    Voided,
}

/// What payments knows of one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub order_id: String,
    pub amount_cents: u64,
    pub auth_id: Option<String>,
    pub status: PaymentStatus,
    pub captured_cents: u64,
    pub voided_cents: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Placed(OrderPlaced),
    Capture(CapturePayment),
    Void(VoidPayment),
}

impl Input {
    fn order_id(&self) -> &str {
        match self {
            Input::Placed(p) => &p.order_id,
            Input::Capture(c) => &c.order_id,
            Input::Void(v) => &v.order_id,
        }
    }
}

/// Gateway reply to `authorize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthorizeReply {
    pub approved: bool,
    #[serde(default)]
    pub auth_id: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Gateway reply to `capture` and `void`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleReply {
    pub ok: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Which gateway request, if any, the input needs given the current payment.
pub fn plan(payment: Option<&Payment>, input: &Input) -> Result<Option<ExternalCall>, HandleError> {
    let call = |op: &str, body: serde_json::Value| ExternalCall {
        system: GATEWAY,
        subject: subjects::external(GATEWAY, op),
        body: body.to_string(),
    };
    match (input, payment) {
        (Input::Placed(p), None) => Ok(Some(call(
            "authorize",
            serde_json::json!({
                "idempotency_key": format!("authorize:{}", p.order_id),
                "order_id": p.order_id,
                "amount_cents": p.total_cents,
                "payment_method": p.payment_method,
            }),
        ))),
        (Input::Capture(c), Some(pay)) if pay.status == PaymentStatus::Authorized => {
            Ok(Some(call(
                "capture",
                serde_json::json!({
                    "idempotency_key": format!("capture:{}", c.order_id),
                    "order_id": c.order_id,
                    "auth_id": pay.auth_id,
                    "amount_cents": pay.amount_cents,
                }),
            )))
        }
        (Input::Void(v), Some(pay)) if pay.status == PaymentStatus::Authorized => Ok(Some(call(
            "void",
            serde_json::json!({
                "idempotency_key": format!("void:{}", v.order_id),
                "order_id": v.order_id,
                "auth_id": pay.auth_id,
            }),
        ))),
        (Input::Capture(_) | Input::Void(_), None) => Err(HandleError::Retry(format!(
            "no payment for order {} yet",
            input.order_id()
        ))),
        _ => Ok(None),
    }
}

/// Applies the gateway's reply. `Ok(None)`: nothing changes (a repeat).
pub fn decide(
    payment: Option<&Payment>,
    input: &Input,
    reply: Option<&serde_json::Value>,
) -> Result<Option<(Payment, Outgoing)>, HandleError> {
    let need_reply = || {
        HandleError::Retry(format!(
            "payment of {} changed during the call; retry",
            input.order_id()
        ))
    };
    let parse = |v: &serde_json::Value| -> Result<SettleReply, HandleError> {
        serde_json::from_value(v.clone())
            .map_err(|e| HandleError::Retry(format!("gateway reply: {e}")))
    };
    match (input, payment) {
        (Input::Placed(p), None) => {
            let r: AuthorizeReply =
                serde_json::from_value(reply.ok_or_else(need_reply)?.clone())
                    .map_err(|e| HandleError::Retry(format!("gateway reply: {e}")))?;
            match (r.approved, r.auth_id) {
                (true, Some(auth_id)) => Ok(Some((
                    Payment {
                        order_id: p.order_id.clone(),
                        amount_cents: p.total_cents,
                        auth_id: Some(auth_id.clone()),
                        status: PaymentStatus::Authorized,
                        captured_cents: 0,
                        voided_cents: 0,
                    },
                    Outgoing::event(&PaymentAuthorized {
                        order_id: p.order_id.clone(),
                        amount_cents: p.total_cents,
                        auth_id,
                    }),
                ))),
                (true, None) => Err(HandleError::Retry(
                    "gateway approved without an auth_id".into(),
                )),
                (false, _) => {
                    let reason = r.reason.unwrap_or_else(|| "declined".into());
                    Ok(Some((
                        Payment {
                            order_id: p.order_id.clone(),
                            amount_cents: p.total_cents,
                            auth_id: None,
                            status: PaymentStatus::Declined,
                            captured_cents: 0,
                            voided_cents: 0,
                        },
                        Outgoing::event(&PaymentDeclined {
                            order_id: p.order_id.clone(),
                            reason,
                        }),
                    )))
                }
            }
        }
        (Input::Capture(_) | Input::Void(_), Some(pay))
            if pay.status == PaymentStatus::Authorized =>
        {
            let r = parse(reply.ok_or_else(need_reply)?)?;
            if !r.ok {
                return Err(HandleError::Permanent(format!(
                    "gateway refused to settle {}: {}",
                    pay.order_id,
                    r.reason.unwrap_or_default()
                )));
            }
            let mut next = pay.clone();
            let ev = if matches!(input, Input::Capture(_)) {
                next.status = PaymentStatus::Captured;
                next.captured_cents = pay.amount_cents;
                Outgoing::event(&PaymentCaptured {
                    order_id: pay.order_id.clone(),
                    amount_cents: pay.amount_cents,
                })
            } else {
                next.status = PaymentStatus::Voided;
                next.voided_cents = pay.amount_cents;
                Outgoing::event(&PaymentVoided {
                    order_id: pay.order_id.clone(),
                    amount_cents: pay.amount_cents,
                })
            };
            Ok(Some((next, ev)))
        }
        (Input::Capture(_), Some(pay)) if pay.status == PaymentStatus::Captured => Ok(None),
        (Input::Void(_), Some(pay))
            if matches!(pay.status, PaymentStatus::Voided | PaymentStatus::Declined) =>
        {
            Ok(None)
        }
        (Input::Placed(_), Some(_)) => Ok(None),
        (_, None) => Err(HandleError::Retry(format!(
            "no payment for order {} yet",
            input.order_id()
        ))),
        (_, Some(pay)) => Err(HandleError::Permanent(format!(
            "cannot {} payment of {}: it is {:?}",
            if matches!(input, Input::Capture(_)) {
                "capture"
            } else {
                "void"
            },
            pay.order_id,
            pay.status
        ))),
    }
}

fn key(order: &str) -> String {
    format!("payment/{order}")
}

/// The payment component.
pub struct Billing;

impl Component for Billing {
    type Input = Input;
    fn name(&self) -> &'static str {
        "billing"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![
            Subscription::events(orders::CONTEXT, &[OrderPlaced::TYPE]),
            Subscription::commands(CONTEXT, &[CapturePayment::TYPE, VoidPayment::TYPE]),
        ]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Input, DecodeError> {
        Ok(match msg_type {
            OrderPlaced::TYPE => Input::Placed(decode_as(payload)?),
            CapturePayment::TYPE => Input::Capture(decode_as(payload)?),
            VoidPayment::TYPE => Input::Void(decode_as(payload)?),
            other => return Err(DecodeError::UnknownType(other.into())),
        })
    }
    fn plan(
        &self,
        state: &dyn StateRead,
        input: &Input,
    ) -> Result<Option<ExternalCall>, HandleError> {
        let payment: Option<Payment> = read(state, &key(input.order_id()))?;
        plan(payment.as_ref(), input)
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let k = key(input.order_id());
        let payment: Option<Payment> = load(tx, &k)?;
        match decide(payment.as_ref(), input, ctx.external)? {
            None => Ok(vec![]),
            Some((p, ev)) => {
                save(tx, &k, &p)?;
                Ok(vec![ev])
            }
        }
    }
}

pub fn components() -> Vec<Arc<dyn DynComponent>> {
    vec![Arc::new(Billing)]
}

pub const QUERIES: &[&str] = &["payment", "summary"];

/// `payment {"order_id"}`; `summary` -> every payment and money totals.
pub fn query(
    state: &dyn StateRead,
    name: &str,
    req: &[u8],
) -> Result<serde_json::Value, QueryError> {
    match name {
        "payment" => {
            let id = request_field(req, "order_id")?;
            let p: Payment = read(state, &key(&id))?.ok_or(QueryError::NotFound)?;
            Ok(serde_json::to_value(p).unwrap_or_default())
        }
        "summary" => {
            let ps: Vec<Payment> = read_all(state, "payment/")?;
            let authorized: u64 = ps
                .iter()
                .filter(|p| p.auth_id.is_some())
                .map(|p| p.amount_cents)
                .sum();
            let captured: u64 = ps.iter().map(|p| p.captured_cents).sum();
            let voided: u64 = ps.iter().map(|p| p.voided_cents).sum();
            let payments: serde_json::Map<_, _> = ps
                .iter()
                .map(|p| {
                    (
                        p.order_id.clone(),
                        serde_json::to_value(p).unwrap_or_default(),
                    )
                })
                .collect();
            Ok(serde_json::json!({
                "authorized_cents": authorized, "captured_cents": captured, "voided_cents": voided,
                "payments": payments,
            }))
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
            customer_id: "c".into(),
            items: vec![],
            total_cents: 500,
            payment_method: "card".into(),
        })
    }

    fn authorized() -> Payment {
        let reply = serde_json::json!({"approved": true, "auth_id": "a1"});
        decide(None, &placed(), Some(&reply)).unwrap().unwrap().0
    }

    #[test]
    fn authorize_needs_a_call_with_an_idempotency_key() {
        let call = plan(None, &placed()).unwrap().unwrap();
        assert!(call.body.contains("authorize:o1"));
        assert_eq!(call.subject, "choreo.ext.payment-gateway.authorize");
    }

    #[test]
    fn approved_and_declined() {
        assert_eq!(authorized().status, PaymentStatus::Authorized);
        let reply = serde_json::json!({"approved": false, "reason": "card_declined"});
        let (p, ev) = decide(None, &placed(), Some(&reply)).unwrap().unwrap();
        assert_eq!(p.status, PaymentStatus::Declined);
        assert_eq!(ev.msg_type, "PaymentDeclined");
    }

    #[test]
    fn capture_once_and_money_is_conserved() {
        let pay = authorized();
        let cap = Input::Capture(CapturePayment {
            order_id: "o1".into(),
        });
        assert!(plan(Some(&pay), &cap).unwrap().is_some());
        let (p, _) = decide(Some(&pay), &cap, Some(&serde_json::json!({"ok": true})))
            .unwrap()
            .unwrap();
        assert_eq!(p.captured_cents + p.voided_cents, p.amount_cents);
        assert!(plan(Some(&p), &cap).unwrap().is_none());
        assert_eq!(decide(Some(&p), &cap, None).unwrap(), None);
        let void = Input::Void(VoidPayment {
            order_id: "o1".into(),
        });
        assert!(matches!(
            decide(Some(&p), &void, None),
            Err(HandleError::Permanent(_))
        ));
    }

    #[test]
    fn capture_before_authorization_waits() {
        let cap = Input::Capture(CapturePayment {
            order_id: "o1".into(),
        });
        assert!(matches!(plan(None, &cap), Err(HandleError::Retry(_))));
    }
}
