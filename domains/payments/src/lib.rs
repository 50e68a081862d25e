//! Payments (billing): authorizes an order's total through the external payment gateway on
//! `OrderPlaced`, captures on `CapturePayment`, and on `CancelPayment` voids the
//! authorization (or, if there is none yet, makes sure none will be kept).
//!
//! Every gateway request carries an idempotency key derived from the order and the
//! operation: a message redelivered before its transaction committed repeats the request,
//! and the gateway answers it without acting twice.
//! Conservation: per order, captured + voided = authorized, and nothing is captured for a
//! cancelled order.

use std::sync::Arc;

use orders::OrderPlaced;
use runtime::component::DynComponent;
use runtime::request_field;
use runtime::{
    load, message, read, read_all, save, Component, DecodeError, ExternalCall, HandleCtx,
    HandleError, Messages, Outgoing, QueryError, StateRead, StateTx, Subscription,
};
use serde::{Deserialize, Serialize};

pub const CONTEXT: &str = "payments";
/// External system name (metrics, breaker).
pub const GATEWAY: &str = "payment-gateway";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturePayment {
    pub order_id: String,
}
message!(CapturePayment, Command, CONTEXT);

/// Command from fulfilment (compensation): void the authorization; if the order has none
/// yet, none will be kept (an authorization that arrives later is voided at once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelPayment {
    pub order_id: String,
}
message!(CancelPayment, Command, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub order_id: String,
    pub amount_cents: u64,
    pub auth_id: String,
}
message!(PaymentAuthorized, Event, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: String,
    pub reason: String,
}
message!(PaymentDeclined, Event, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub order_id: String,
    pub amount_cents: u64,
}
message!(PaymentCaptured, Event, CONTEXT);

/// The authorization was voided at the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentVoided {
    pub order_id: String,
    pub amount_cents: u64,
}
message!(PaymentVoided, Event, CONTEXT);

/// Cancelled before any authorization was recorded; none will be kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentCancelled {
    pub order_id: String,
}
message!(PaymentCancelled, Event, CONTEXT);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentStatus {
    Authorized,
    Declined,
    Captured,
    Voided,
    /// Cancelled before an authorization was recorded.
    Cancelled,
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

runtime::messages! {
    /// Inputs of the billing component.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Input { OrderPlaced, CapturePayment, CancelPayment }
}

impl Input {
    fn order_id(&self) -> &str {
        match self {
            Input::OrderPlaced(p) => &p.order_id,
            Input::CapturePayment(c) => &c.order_id,
            Input::CancelPayment(v) => &v.order_id,
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

/// Gateway reply to `cancel-authorization`: what it voided, if anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelReply {
    pub ok: bool,
    #[serde(default)]
    pub auth_id: Option<String>,
    #[serde(default)]
    pub voided_cents: u64,
}

/// Gateway reply to `capture` and `void`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleReply {
    pub ok: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

fn call(op: &str, body: serde_json::Value) -> ExternalCall {
    ExternalCall {
        system: GATEWAY,
        subject: runtime::wire::subjects::external(GATEWAY, op),
        body: body.to_string(),
    }
}

/// Which gateway request, if any, the input needs given the current payment.
pub fn plan(payment: Option<&Payment>, input: &Input) -> Result<Option<ExternalCall>, HandleError> {
    let authorized = payment.filter(|p| p.status == PaymentStatus::Authorized);
    match (input, payment, authorized) {
        (Input::OrderPlaced(p), None, _) => Ok(Some(call(
            "authorize",
            serde_json::json!({
                "idempotency_key": format!("authorize:{}", p.order_id),
                "order_id": p.order_id,
                "amount_cents": p.total_cents,
                "payment_method": p.payment_method,
            }),
        ))),
        (Input::CapturePayment(c), _, Some(pay)) => Ok(Some(call(
            "capture",
            serde_json::json!({
                "idempotency_key": format!("capture:{}", c.order_id),
                "order_id": c.order_id,
                "auth_id": pay.auth_id,
                "amount_cents": pay.amount_cents,
            }),
        ))),
        (Input::CancelPayment(v), _, Some(pay)) => Ok(Some(call(
            "void",
            serde_json::json!({
                "idempotency_key": format!("void:{}", v.order_id),
                "order_id": v.order_id,
                "auth_id": pay.auth_id,
            }),
        ))),
        // No authorization on record (it may be in flight, or its reply lost): cancel it at
        // the gateway by reference, so one made earlier is voided and a later one refused.
        (Input::CancelPayment(v), None, _) => Ok(Some(call(
            "cancel-authorization",
            serde_json::json!({
                "idempotency_key": format!("cancel:{}", v.order_id),
                "order_id": v.order_id,
                "authorize_key": format!("authorize:{}", v.order_id),
            }),
        ))),
        (Input::CapturePayment(_), None, _) => Err(HandleError::Retry(format!(
            "no payment for order {} yet",
            input.order_id()
        ))),
        _ => Ok(None),
    }
}

fn retry_reply(input: &Input) -> HandleError {
    HandleError::Retry(format!(
        "payment of {} changed during the gateway call; retry",
        input.order_id()
    ))
}

fn settle(
    reply: Option<&serde_json::Value>,
    input: &Input,
    order: &str,
) -> Result<(), HandleError> {
    let v = reply.ok_or_else(|| retry_reply(input))?;
    let r: SettleReply = serde_json::from_value(v.clone())
        .map_err(|e| HandleError::Retry(format!("gateway reply: {e}")))?;
    if r.ok {
        Ok(())
    } else {
        Err(HandleError::Permanent(format!(
            "gateway refused to settle {order}: {}",
            r.reason.unwrap_or_default()
        )))
    }
}

/// Applies the input and the gateway's reply. `Ok(None)`: nothing changes (a repeat).
pub fn decide(
    payment: Option<&Payment>,
    input: &Input,
    reply: Option<&serde_json::Value>,
) -> Result<Option<(Payment, Vec<Outgoing>)>, HandleError> {
    use PaymentStatus as S;
    match (input, payment) {
        (Input::OrderPlaced(p), None) => {
            let r = authorize_reply(reply, input)?;
            let base = Payment {
                order_id: p.order_id.clone(),
                amount_cents: p.total_cents,
                auth_id: None,
                status: S::Declined,
                captured_cents: 0,
                voided_cents: 0,
            };
            Ok(Some(match r {
                Ok(auth_id) => (
                    Payment {
                        auth_id: Some(auth_id.clone()),
                        status: S::Authorized,
                        ..base
                    },
                    vec![Outgoing::event(&PaymentAuthorized {
                        order_id: p.order_id.clone(),
                        amount_cents: p.total_cents,
                        auth_id,
                    })],
                ),
                Err(reason) => (
                    base,
                    vec![Outgoing::event(&PaymentDeclined {
                        order_id: p.order_id.clone(),
                        reason,
                    })],
                ),
            }))
        }
        // The order was cancelled while the gateway authorized it: keep the authorization
        // on record and void it at once, without announcing it.
        (Input::OrderPlaced(p), Some(pay)) if pay.status == S::Cancelled && reply.is_some() => {
            match authorize_reply(reply, input)? {
                // The cancellation already voided exactly this authorization.
                Ok(auth_id) if pay.auth_id.as_deref() == Some(auth_id.as_str()) => Ok(None),
                Ok(auth_id) => Ok(Some((
                    Payment {
                        amount_cents: p.total_cents,
                        auth_id: Some(auth_id),
                        status: S::Authorized,
                        ..pay.clone()
                    },
                    vec![Outgoing::command(
                        CONTEXT,
                        &CancelPayment {
                            order_id: p.order_id.clone(),
                        },
                    )],
                ))),
                Err(_) => Ok(None),
            }
        }
        (Input::OrderPlaced(_), Some(_)) => Ok(None),
        (Input::CapturePayment(_), Some(pay)) if pay.status == S::Authorized => {
            settle(reply, input, &pay.order_id)?;
            let next = Payment {
                status: S::Captured,
                captured_cents: pay.amount_cents,
                ..pay.clone()
            };
            let ev = PaymentCaptured {
                order_id: pay.order_id.clone(),
                amount_cents: pay.amount_cents,
            };
            Ok(Some((next, vec![Outgoing::event(&ev)])))
        }
        (Input::CapturePayment(_), Some(pay)) if pay.status == S::Captured => Ok(None),
        (Input::CapturePayment(_), None) => Err(HandleError::Retry(format!(
            "no payment for order {} yet",
            input.order_id()
        ))),
        (Input::CapturePayment(_), Some(pay)) => Err(HandleError::Permanent(format!(
            "cannot capture payment of {}: it is {:?}",
            pay.order_id, pay.status
        ))),
        (Input::CancelPayment(_), Some(pay)) if pay.status == S::Authorized => {
            settle(reply, input, &pay.order_id)?;
            let next = Payment {
                status: S::Voided,
                voided_cents: pay.amount_cents,
                ..pay.clone()
            };
            let ev = PaymentVoided {
                order_id: pay.order_id.clone(),
                amount_cents: pay.amount_cents,
            };
            Ok(Some((next, vec![Outgoing::event(&ev)])))
        }
        (Input::CancelPayment(c), None) => {
            let r: CancelReply =
                serde_json::from_value(reply.ok_or_else(|| retry_reply(input))?.clone())
                    .map_err(|e| HandleError::Retry(format!("gateway reply: {e}")))?;
            Ok(Some((
                Payment {
                    order_id: c.order_id.clone(),
                    amount_cents: r.voided_cents,
                    auth_id: r.auth_id,
                    status: S::Cancelled,
                    captured_cents: 0,
                    voided_cents: r.voided_cents,
                },
                vec![Outgoing::event(&PaymentCancelled {
                    order_id: c.order_id.clone(),
                })],
            )))
        }
        (Input::CancelPayment(_), Some(pay)) if pay.status == S::Captured => {
            Err(HandleError::Permanent(format!(
                "cannot cancel payment of {}: already captured",
                pay.order_id
            )))
        }
        (Input::CancelPayment(_), Some(_)) => Ok(None),
    }
}

/// `Ok(auth_id)` if approved, `Err(reason)` if declined.
fn authorize_reply(
    reply: Option<&serde_json::Value>,
    input: &Input,
) -> Result<Result<String, String>, HandleError> {
    let v = reply.ok_or_else(|| retry_reply(input))?;
    let r: AuthorizeReply = serde_json::from_value(v.clone())
        .map_err(|e| HandleError::Retry(format!("gateway reply: {e}")))?;
    match (r.approved, r.auth_id) {
        (true, Some(id)) => Ok(Ok(id)),
        (true, None) => Err(HandleError::Retry(
            "gateway approved without an auth_id".into(),
        )),
        (false, _) => Ok(Err(r.reason.unwrap_or_else(|| "declined".into()))),
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
        Subscription::of::<Input>()
    }
    fn external_systems(&self) -> Vec<&'static str> {
        vec![GATEWAY]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Input, DecodeError> {
        Input::decode(msg_type, payload)
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
            Some((p, out)) => {
                save(tx, &k, &p)?;
                Ok(out)
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
    use runtime::component::testing::Harness;

    fn placed() -> OrderPlaced {
        OrderPlaced {
            order_id: "o1".into(),
            customer_id: "c".into(),
            items: vec![],
            total_cents: 500,
            payment_method: "card".into(),
        }
    }
    fn approved() -> serde_json::Value {
        serde_json::json!({"approved": true, "auth_id": "a1"})
    }
    fn cancel() -> CancelPayment {
        CancelPayment {
            order_id: "o1".into(),
        }
    }
    fn capture() -> CapturePayment {
        CapturePayment {
            order_id: "o1".into(),
        }
    }
    fn ok() -> serde_json::Value {
        serde_json::json!({"ok": true})
    }
    /// Billing, with order o1's 500 cents authorized.
    fn authorized() -> Harness<Billing> {
        let mut b = Harness::new(Billing);
        let out = b.answer(placed(), approved()).unwrap();
        assert_eq!(out[0].msg_type, "PaymentAuthorized");
        b
    }
    fn payment(b: &Harness<Billing>) -> Payment {
        b.state::<Payment>("payment/o1").unwrap()
    }

    #[test]
    fn authorize_needs_a_call_with_an_idempotency_key() {
        let call = Harness::new(Billing).plan(placed()).unwrap().unwrap();
        assert!(call.body.contains("authorize:o1"));
        assert_eq!(call.subject, "choreo.ext.payment-gateway.authorize");
    }

    #[test]
    fn approved_and_declined() {
        assert_eq!(payment(&authorized()).status, PaymentStatus::Authorized);
        let mut b = Harness::new(Billing);
        let reply = serde_json::json!({"approved": false, "reason": "card_declined"});
        let out = b.answer(placed(), reply).unwrap();
        assert_eq!(payment(&b).status, PaymentStatus::Declined);
        assert_eq!(out[0].msg_type, "PaymentDeclined");
    }

    #[test]
    fn capture_once_and_money_is_conserved() {
        let mut b = authorized();
        b.answer(capture(), ok()).unwrap();
        let p = payment(&b);
        assert_eq!(p.captured_cents + p.voided_cents, p.amount_cents);
        assert!(
            b.receive(capture()).unwrap().is_empty(),
            "no second capture"
        );
        assert!(matches!(
            b.receive(cancel()),
            Err(HandleError::Permanent(_))
        ));
    }

    #[test]
    fn cancel_voids_an_authorization() {
        let mut b = authorized();
        let call = b.plan(cancel()).unwrap().unwrap();
        assert!(call.body.contains("void:o1"));
        let out = b.answer(cancel(), ok()).unwrap();
        let p = payment(&b);
        assert_eq!((p.status, p.voided_cents), (PaymentStatus::Voided, 500));
        assert_eq!(out[0].msg_type, "PaymentVoided");
        assert!(
            b.receive(cancel()).unwrap().is_empty(),
            "a repeat changes nothing"
        );
    }

    #[test]
    fn cancel_before_authorization_voids_the_late_one() {
        let mut b = Harness::new(Billing);
        // The gateway is asked to authorize; the cancellation commits before its reply.
        assert!(b.plan(placed()).unwrap().is_some());
        let call = b.plan(cancel()).unwrap().unwrap();
        assert!(
            call.subject.ends_with("cancel-authorization") && call.body.contains("authorize:o1")
        );
        let nothing = serde_json::json!({"ok": true, "voided_cents": 0});
        let out = b.answer(cancel(), nothing).unwrap();
        assert_eq!(payment(&b).status, PaymentStatus::Cancelled);
        assert_eq!(out[0].msg_type, "PaymentCancelled");
        // No new authorization is started for a cancelled order...
        assert!(b.plan(placed()).unwrap().is_none());
        // ...and the one in flight is kept on record and voided, not announced.
        let out = b.handle(&placed().into(), Some(&approved())).unwrap();
        assert_eq!(payment(&b).status, PaymentStatus::Authorized);
        assert_eq!((out.len(), out[0].msg_type), (1, "CancelPayment"));
        b.answer(cancel(), ok()).unwrap();
        let p = payment(&b);
        assert_eq!(p.voided_cents, p.amount_cents);
    }

    #[test]
    fn cancel_by_reference_records_what_the_gateway_voided() {
        let mut b = Harness::new(Billing);
        let voided = serde_json::json!({"ok": true, "auth_id": "a1", "voided_cents": 500});
        b.answer(cancel(), voided).unwrap();
        let tomb = payment(&b);
        assert_eq!(
            (tomb.voided_cents, tomb.auth_id.as_deref()),
            (500, Some("a1"))
        );
        // The authorization's own reply arrives late: it is the one already voided.
        let late = b.handle(&placed().into(), Some(&approved())).unwrap();
        assert!(late.is_empty());
        assert_eq!(payment(&b), tomb);
    }

    #[test]
    fn capture_before_authorization_waits() {
        let b = Harness::new(Billing);
        assert!(matches!(b.plan(capture()), Err(HandleError::Retry(_))));
    }
}
