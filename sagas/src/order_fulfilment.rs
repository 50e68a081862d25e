//! Order fulfilment: waits for stock and payment in either order, confirms the order and
//! ships it, then commits stock and captures payment, and completes the order.
//!
//! Compensation: a stock rejection, a payment decline, a failed shipment or a passed
//! deadline releases the stock and cancels the payment (voiding an authorization, or making
//! sure a late one is voided), and only then cancels the order. A shipping deadline first
//! cancels the shipment: if the carrier had already dispatched it, the saga settles instead.
//! Compensation and settlement commands are resent at their deadline up to `max_attempts`
//! times; after that the instance parks in `CompensationFailed` or `SettlementFailed`, where
//! an operator sees it (`choreo saga stuck`) and retries it (`choreo saga retry`).
//!
//! `transition` is pure: (state, trigger, now) -> the next state, the commands to send and
//! the deadlines to set or cancel. The runtime persists instances and fires deadlines.

use runtime::config::duration::Setting;
use runtime::config::SagaSettings;

use inventory::{
    CommitStock, ReleaseStock, StockCommitted, StockRejected, StockReleased, StockReserved,
};
use orders::{CancelOrder, CompleteOrder, ConfirmOrder, LineItem, OrderPlaced};
use payments::{
    CancelPayment, CapturePayment, PaymentAuthorized, PaymentCancelled, PaymentCaptured,
    PaymentDeclined, PaymentVoided,
};
use runtime::saga::{Deadline, Definition, ProcessManager, StateDef, Step, TransitionDef, Trigger};
use runtime::{decode_as, DecodeError, HandleError, Message, Outgoing, Subscription};
use serde::{Deserialize, Serialize};
use shipping::{CancelShipment, ShipOrder, ShipmentCancelled, ShipmentDispatched, ShipmentFailed};

pub const NAME: &str = "order-fulfilment";

/// Deadlines and resend limits, in milliseconds (node config `[sagas.order-fulfilment]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// Waiting for both stock and payment answers.
    pub awaiting_ms: u64,
    /// Waiting for the carrier to dispatch.
    pub shipping_ms: u64,
    /// Waiting for stock commit and payment capture after dispatch (then resend).
    pub settling_ms: u64,
    /// Waiting for each round of compensation (then resend).
    pub compensation_ms: u64,
    /// Resends of settlement or compensation before the instance parks for an operator.
    pub max_attempts: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            awaiting_ms: 120_000,
            shipping_ms: 120_000,
            settling_ms: 60_000,
            compensation_ms: 30_000,
            max_attempts: 3,
        }
    }
}

impl Timeouts {
    /// Reads `[sagas.order-fulfilment]`: durations `awaiting`, `shipping`, `settling`,
    /// `compensation` (e.g. `"2m"`) and the count `max_attempts`; unknown keys, a count
    /// where a duration belongs (or the other way round) and zero are errors.
    pub fn from_map(m: &SagaSettings) -> Result<Self, String> {
        let mut t = Timeouts::default();
        for (k, v) in m {
            let (slot, value) = match (k.as_str(), v) {
                ("awaiting", Setting::Duration(d)) => (&mut t.awaiting_ms, d.as_millis() as u64),
                ("shipping", Setting::Duration(d)) => (&mut t.shipping_ms, d.as_millis() as u64),
                ("settling", Setting::Duration(d)) => (&mut t.settling_ms, d.as_millis() as u64),
                ("compensation", Setting::Duration(d)) => {
                    (&mut t.compensation_ms, d.as_millis() as u64)
                }
                ("max_attempts", Setting::Count(n)) => (&mut t.max_attempts, *n),
                ("awaiting" | "shipping" | "settling" | "compensation", _) => {
                    return Err(format!(
                        "sagas.{NAME}.{k} is a duration, e.g. {k} = \"2m\""
                    ))
                }
                ("max_attempts", _) => {
                    return Err(format!("sagas.{NAME}.max_attempts is a count, e.g. 3"))
                }
                (other, _) => {
                    return Err(format!(
                        "unknown key sagas.{NAME}.{other} (awaiting, shipping, settling, compensation, max_attempts)"
                    ))
                }
            };
            if value == 0 {
                return Err(format!("sagas.{NAME}.{k} must be positive"));
            }
            *slot = value;
        }
        Ok(t)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    AwaitingStockAndPayment,
    Shipping,
    CancellingShipment,
    Settling,
    SettlementFailed,
    Compensating,
    CompensationFailed,
    Completed,
    Cancelled,
}

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
    Cancelling,
    Cancelled,
    Capturing,
    Captured,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShipmentStep {
    NotRequested,
    Requested,
    Dispatched,
    Failed,
    Cancelling,
    Cancelled,
}

/// The state of one order's fulfilment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub phase: Phase,
    pub stock: StockStep,
    pub payment: PaymentStep,
    pub shipment: ShipmentStep,
    pub reason: Option<String>,
    /// Resends made in the current phase.
    pub attempts: u64,
    /// `OrderPlaced` has arrived (answers that overtook it are recorded meanwhile).
    #[serde(default = "yes")]
    pub placed: bool,
}

fn yes() -> bool {
    true
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
    PaymentCancelled(PaymentCancelled),
    PaymentCaptured(PaymentCaptured),
    ShipmentDispatched(ShipmentDispatched),
    ShipmentFailed(ShipmentFailed),
    ShipmentCancelled(ShipmentCancelled),
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
            Input::PaymentCancelled(m) => &m.order_id,
            Input::PaymentCaptured(m) => &m.order_id,
            Input::ShipmentDispatched(m) => &m.order_id,
            Input::ShipmentFailed(m) => &m.order_id,
            Input::ShipmentCancelled(m) => &m.order_id,
        }
    }

    /// The wire type name (used to label transitions in the graph).
    pub fn type_name(&self) -> &'static str {
        match self {
            Input::Placed(_) => OrderPlaced::TYPE,
            Input::StockReserved(_) => StockReserved::TYPE,
            Input::StockRejected(_) => StockRejected::TYPE,
            Input::StockReleased(_) => StockReleased::TYPE,
            Input::StockCommitted(_) => StockCommitted::TYPE,
            Input::PaymentAuthorized(_) => PaymentAuthorized::TYPE,
            Input::PaymentDeclined(_) => PaymentDeclined::TYPE,
            Input::PaymentVoided(_) => PaymentVoided::TYPE,
            Input::PaymentCancelled(_) => PaymentCancelled::TYPE,
            Input::PaymentCaptured(_) => PaymentCaptured::TYPE,
            Input::ShipmentDispatched(_) => ShipmentDispatched::TYPE,
            Input::ShipmentFailed(_) => ShipmentFailed::TYPE,
            Input::ShipmentCancelled(_) => ShipmentCancelled::TYPE,
        }
    }
}

/// The order fulfilment process manager.
#[derive(Debug, Clone, Default)]
pub struct OrderFulfilment {
    pub timeouts: Timeouts,
}

type Out = Option<Step<Fulfilment>>;

impl OrderFulfilment {
    fn start(&self, p: &OrderPlaced, now: u64) -> Step<Fulfilment> {
        let s = Fulfilment {
            order_id: p.order_id.clone(),
            customer_id: p.customer_id.clone(),
            items: p.items.clone(),
            phase: Phase::AwaitingStockAndPayment,
            stock: StockStep::Pending,
            payment: PaymentStep::Pending,
            shipment: ShipmentStep::NotRequested,
            reason: None,
            attempts: 0,
            placed: true,
        };
        Step {
            set: vec![Deadline::after("awaiting", now, self.timeouts.awaiting_ms)],
            ..Step::to(s)
        }
    }

    /// An answer overtook `OrderPlaced` (it comes from another stream): record it and wait
    /// for the order's details instead of refusing it (a refusal costs a redelivery delay).
    fn start_early(&self, input: &Input, now: u64) -> Step<Fulfilment> {
        let mut s = Fulfilment {
            order_id: input.order_id().to_string(),
            customer_id: String::new(),
            items: vec![],
            phase: Phase::AwaitingStockAndPayment,
            stock: StockStep::Pending,
            payment: PaymentStep::Pending,
            shipment: ShipmentStep::NotRequested,
            reason: None,
            attempts: 0,
            placed: false,
        };
        record(&mut s, input);
        Step {
            set: vec![Deadline::after("awaiting", now, self.timeouts.awaiting_ms)],
            ..Step::to(s)
        }
    }

    /// Moves on from the current phase given what is known now.
    fn advance(&self, s: Fulfilment, now: u64) -> Step<Fulfilment> {
        use Phase as P;
        let failed =
            matches!(s.stock, StockStep::Rejected) || matches!(s.payment, PaymentStep::Declined);
        match s.phase {
            // Nothing moves before the order's details are known.
            P::AwaitingStockAndPayment if !s.placed => Step::to(s),
            P::AwaitingStockAndPayment if failed => self.compensate(s, now, &["awaiting"]),
            P::AwaitingStockAndPayment
                if s.stock == StockStep::Reserved && s.payment == PaymentStep::Authorized =>
            {
                let mut s = s;
                let id = s.order_id.clone();
                s.phase = P::Shipping;
                s.shipment = ShipmentStep::Requested;
                let send = vec![
                    Outgoing::command(
                        orders::CONTEXT,
                        &ConfirmOrder {
                            order_id: id.clone(),
                        },
                    ),
                    Outgoing::command(
                        shipping::CONTEXT,
                        &ShipOrder {
                            order_id: id,
                            customer_id: s.customer_id.clone(),
                            items: s.items.clone(),
                        },
                    ),
                ];
                Step {
                    send,
                    set: vec![Deadline::after("shipping", now, self.timeouts.shipping_ms)],
                    cancel: vec!["awaiting".into()],
                    state: s,
                }
            }
            P::Shipping | P::CancellingShipment if s.shipment == ShipmentStep::Dispatched => {
                self.settle(s, now)
            }
            P::Shipping if s.shipment == ShipmentStep::Failed => {
                self.compensate(s, now, &["shipping"])
            }
            P::CancellingShipment
                if matches!(s.shipment, ShipmentStep::Failed | ShipmentStep::Cancelled) =>
            {
                self.compensate(s, now, &["compensation"])
            }
            P::Settling | P::SettlementFailed
                if s.stock == StockStep::Committed && s.payment == PaymentStep::Captured =>
            {
                let id = s.order_id.clone();
                let mut s = s;
                s.phase = P::Completed;
                Step {
                    send: vec![Outgoing::command(
                        orders::CONTEXT,
                        &CompleteOrder { order_id: id },
                    )],
                    ..Step::to(s)
                }
            }
            P::Compensating | P::CompensationFailed if compensated(&s) => {
                let mut s = s;
                s.phase = P::Cancelled;
                let reason = s.reason.clone().unwrap_or_else(|| "cancelled".into());
                let id = s.order_id.clone();
                Step {
                    send: vec![Outgoing::command(
                        orders::CONTEXT,
                        &CancelOrder {
                            order_id: id,
                            reason,
                        },
                    )],
                    ..Step::to(s)
                }
            }
            _ => Step::to(s),
        }
    }

    /// Enters settlement: commit the stock, capture the payment.
    fn settle(&self, mut s: Fulfilment, now: u64) -> Step<Fulfilment> {
        s.phase = Phase::Settling;
        s.attempts = 0;
        s.stock = StockStep::Committing;
        s.payment = PaymentStep::Capturing;
        let send = settlement_commands(&s);
        Step {
            state: s,
            send,
            set: vec![Deadline::after("settling", now, self.timeouts.settling_ms)],
            cancel: vec!["shipping".into(), "compensation".into()],
        }
    }

    /// Enters compensation: undo (or prevent) what the other steps did.
    fn compensate(&self, mut s: Fulfilment, now: u64, cancel: &[&str]) -> Step<Fulfilment> {
        s.phase = Phase::Compensating;
        s.attempts = 0;
        if matches!(s.stock, StockStep::Pending | StockStep::Reserved) {
            s.stock = StockStep::Releasing;
        }
        if matches!(s.payment, PaymentStep::Pending | PaymentStep::Authorized) {
            s.payment = PaymentStep::Cancelling;
        }
        let send = compensation_commands(&s);
        let step = Step {
            state: s,
            send,
            set: vec![Deadline::after(
                "compensation",
                now,
                self.timeouts.compensation_ms,
            )],
            cancel: cancel.iter().map(|c| c.to_string()).collect(),
        };
        if compensated(&step.state) {
            // Nothing to undo: cancel at once.
            let mut next = self.advance(step.state, now);
            next.send.splice(0..0, step.send);
            next.cancel.extend(step.cancel);
            return next;
        }
        step
    }

    fn on_deadline(&self, s: &Fulfilment, name: &str, now: u64) -> Out {
        use Phase as P;
        let t = self.timeouts;
        let mut s = s.clone();
        let step = match (s.phase, name) {
            (P::AwaitingStockAndPayment, "awaiting") => {
                s.reason = Some(format!(
                    "no stock and payment answer within {} ms",
                    t.awaiting_ms
                ));
                self.compensate(s, now, &[])
            }
            (P::Shipping, "shipping") => {
                s.reason = Some(format!("not dispatched within {} ms", t.shipping_ms));
                s.phase = P::CancellingShipment;
                s.shipment = ShipmentStep::Cancelling;
                s.attempts = 0;
                let send = vec![Outgoing::command(
                    shipping::CONTEXT,
                    &CancelShipment {
                        order_id: s.order_id.clone(),
                    },
                )];
                Step {
                    send,
                    set: vec![Deadline::after("compensation", now, t.compensation_ms)],
                    ..Step::to(s)
                }
            }
            (P::Settling, "settling")
            | (P::Compensating | P::CancellingShipment, "compensation") => {
                if s.attempts >= t.max_attempts {
                    s.phase = if s.phase == P::Settling {
                        P::SettlementFailed
                    } else {
                        P::CompensationFailed
                    };
                    Step::to(s)
                } else {
                    s.attempts += 1;
                    let (send, deadline) = self.resend(&s, now);
                    Step {
                        send,
                        set: vec![deadline],
                        ..Step::to(s)
                    }
                }
            }
            _ => return None,
        };
        Some(step)
    }

    fn on_retry(&self, s: &Fulfilment, now: u64) -> Result<Out, HandleError> {
        let mut s = s.clone();
        s.attempts = 0;
        s.phase = match s.phase {
            Phase::SettlementFailed => Phase::Settling,
            Phase::CompensationFailed if s.shipment == ShipmentStep::Cancelling => Phase::CancellingShipment,
            Phase::CompensationFailed => Phase::Compensating,
            other => {
                return Err(HandleError::Permanent(format!(
                    "instance {} is {other:?}: only SettlementFailed and CompensationFailed can be retried",
                    s.order_id
                )))
            }
        };
        let (send, deadline) = self.resend(&s, now);
        Ok(Some(Step {
            send,
            set: vec![deadline],
            ..Step::to(s)
        }))
    }

    /// The commands of the current phase again (they are idempotent), and its deadline.
    fn resend(&self, s: &Fulfilment, now: u64) -> (Vec<Outgoing>, Deadline) {
        let t = self.timeouts;
        match s.phase {
            Phase::Settling => (
                settlement_commands(s),
                Deadline::after("settling", now, t.settling_ms),
            ),
            Phase::CancellingShipment => (
                vec![Outgoing::command(
                    shipping::CONTEXT,
                    &CancelShipment {
                        order_id: s.order_id.clone(),
                    },
                )],
                Deadline::after("compensation", now, t.compensation_ms),
            ),
            _ => (
                compensation_commands(s),
                Deadline::after("compensation", now, t.compensation_ms),
            ),
        }
    }
}

fn settlement_commands(s: &Fulfilment) -> Vec<Outgoing> {
    let id = &s.order_id;
    let mut out = Vec::new();
    if s.stock == StockStep::Committing {
        out.push(Outgoing::command(
            inventory::CONTEXT,
            &CommitStock {
                order_id: id.clone(),
            },
        ));
    }
    if s.payment == PaymentStep::Capturing {
        out.push(Outgoing::command(
            payments::CONTEXT,
            &CapturePayment {
                order_id: id.clone(),
            },
        ));
    }
    out
}

fn compensation_commands(s: &Fulfilment) -> Vec<Outgoing> {
    let id = &s.order_id;
    let mut out = Vec::new();
    if s.stock == StockStep::Releasing {
        out.push(Outgoing::command(
            inventory::CONTEXT,
            &ReleaseStock {
                order_id: id.clone(),
            },
        ));
    }
    if s.payment == PaymentStep::Cancelling {
        out.push(Outgoing::command(
            payments::CONTEXT,
            &CancelPayment {
                order_id: id.clone(),
            },
        ));
    }
    out
}

/// Everything the saga started is undone or was refused.
fn compensated(s: &Fulfilment) -> bool {
    matches!(s.stock, StockStep::Rejected | StockStep::Released)
        && matches!(s.payment, PaymentStep::Declined | PaymentStep::Cancelled)
}

/// Records a participant's answer. Returns false if it changes nothing (a repeat, or an
/// answer the saga no longer waits for).
fn record(s: &mut Fulfilment, input: &Input) -> bool {
    use PaymentStep as Pay;
    use ShipmentStep as Sh;
    use StockStep as St;
    let before = (s.stock, s.payment, s.shipment);
    match input {
        Input::Placed(_) => {}
        Input::StockReserved(_) if s.stock == St::Pending => s.stock = St::Reserved,
        Input::StockRejected(r) if matches!(s.stock, St::Pending | St::Releasing) => {
            s.stock = St::Rejected;
            s.reason
                .get_or_insert_with(|| format!("stock rejected: {}", r.reason));
        }
        Input::StockReleased(_)
            if matches!(s.stock, St::Pending | St::Reserved | St::Releasing) =>
        {
            s.stock = St::Released
        }
        Input::StockCommitted(_) if matches!(s.stock, St::Reserved | St::Committing) => {
            s.stock = St::Committed
        }
        Input::PaymentAuthorized(_) if s.payment == Pay::Pending => s.payment = Pay::Authorized,
        Input::PaymentDeclined(d) if matches!(s.payment, Pay::Pending | Pay::Cancelling) => {
            s.payment = Pay::Declined;
            s.reason
                .get_or_insert_with(|| format!("payment declined: {}", d.reason));
        }
        Input::PaymentVoided(_) | Input::PaymentCancelled(_)
            if matches!(s.payment, Pay::Pending | Pay::Authorized | Pay::Cancelling) =>
        {
            s.payment = Pay::Cancelled
        }
        Input::PaymentCaptured(_) if matches!(s.payment, Pay::Authorized | Pay::Capturing) => {
            s.payment = Pay::Captured
        }
        Input::ShipmentDispatched(_) if matches!(s.shipment, Sh::Requested | Sh::Cancelling) => {
            s.shipment = Sh::Dispatched
        }
        Input::ShipmentFailed(f) if matches!(s.shipment, Sh::Requested | Sh::Cancelling) => {
            s.shipment = Sh::Failed;
            s.reason
                .get_or_insert_with(|| format!("shipment failed: {}", f.reason));
        }
        Input::ShipmentCancelled(_) if s.shipment == Sh::Cancelling => s.shipment = Sh::Cancelled,
        _ => {}
    }
    (s.stock, s.payment, s.shipment) != before
}

impl ProcessManager for OrderFulfilment {
    type State = Fulfilment;
    type Input = Input;

    fn name(&self) -> &'static str {
        NAME
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
                    PaymentCancelled::TYPE,
                    PaymentCaptured::TYPE,
                ],
            ),
            Subscription::events(
                shipping::CONTEXT,
                &[
                    ShipmentDispatched::TYPE,
                    ShipmentFailed::TYPE,
                    ShipmentCancelled::TYPE,
                ],
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
            PaymentCancelled::TYPE => Input::PaymentCancelled(decode_as(payload)?),
            PaymentCaptured::TYPE => Input::PaymentCaptured(decode_as(payload)?),
            ShipmentDispatched::TYPE => Input::ShipmentDispatched(decode_as(payload)?),
            ShipmentFailed::TYPE => Input::ShipmentFailed(decode_as(payload)?),
            ShipmentCancelled::TYPE => Input::ShipmentCancelled(decode_as(payload)?),
            other => return Err(DecodeError::UnknownType(other.into())),
        })
    }

    fn correlate(&self, input: &Input) -> String {
        input.order_id().to_string()
    }

    fn transition(
        &self,
        state: Option<&Fulfilment>,
        trigger: Trigger<'_, Input>,
        now: u64,
    ) -> Result<Out, HandleError> {
        match (state, trigger) {
            (None, Trigger::Message(Input::Placed(p))) => Ok(Some(self.start(p, now))),
            (None, Trigger::Message(other)) => Ok(Some(self.start_early(other, now))),
            (None, _) => Ok(None),
            (Some(s), _) if matches!(s.phase, Phase::Completed | Phase::Cancelled) => Ok(None),
            (Some(s), Trigger::Message(Input::Placed(p))) if !s.placed => {
                let mut next = s.clone();
                next.customer_id = p.customer_id.clone();
                next.items = p.items.clone();
                next.placed = true;
                Ok(Some(self.advance(next, now)))
            }
            (Some(_), Trigger::Message(Input::Placed(_))) => Ok(None),
            (Some(s), Trigger::Message(m)) => {
                let mut next = s.clone();
                if !record(&mut next, m) {
                    return Ok(None);
                }
                Ok(Some(self.advance(next, now)))
            }
            (Some(s), Trigger::Deadline(name)) => Ok(self.on_deadline(s, name, now)),
            (Some(s), Trigger::Retry) => self.on_retry(s, now),
        }
    }

    fn state_name(&self, s: &Fulfilment) -> &'static str {
        match s.phase {
            Phase::AwaitingStockAndPayment => "AwaitingStockAndPayment",
            Phase::Shipping => "Shipping",
            Phase::CancellingShipment => "CancellingShipment",
            Phase::Settling => "Settling",
            Phase::SettlementFailed => "SettlementFailed",
            Phase::Compensating => "Compensating",
            Phase::CompensationFailed => "CompensationFailed",
            Phase::Completed => "Completed",
            Phase::Cancelled => "Cancelled",
        }
    }

    fn definition(&self) -> Definition {
        definition()
    }
}

/// The declared graph of the saga. `on` lists the triggers of an edge, separated by `|`:
/// message types, `deadline:<name>` or `retry`.
pub fn definition() -> Definition {
    let st = |name, deadline| StateDef {
        name,
        terminal: false,
        deadline: Some(deadline),
        waits_without_deadline: None,
    };
    let parked = |name| StateDef {
        name,
        terminal: false,
        deadline: None,
        waits_without_deadline: Some("parked for an operator: choreo saga retry"),
    };
    let end = |name| StateDef {
        name,
        terminal: true,
        deadline: None,
        waits_without_deadline: None,
    };
    let t = |from, on, to| TransitionDef { from, on, to };
    const ANSWERS: &str = "StockRejected|PaymentDeclined|OrderPlaced";
    const UNDONE: &str =
        "StockReleased|StockRejected|PaymentVoided|PaymentCancelled|PaymentDeclined";
    Definition {
        name: NAME,
        initial: "AwaitingStockAndPayment",
        states: vec![
            st("AwaitingStockAndPayment", "awaiting"),
            st("Shipping", "shipping"),
            st("CancellingShipment", "compensation"),
            st("Settling", "settling"),
            parked("SettlementFailed"),
            st("Compensating", "compensation"),
            parked("CompensationFailed"),
            end("Completed"),
            end("Cancelled"),
        ],
        transitions: vec![
            t(
                "AwaitingStockAndPayment",
                "StockReserved|PaymentAuthorized|OrderPlaced",
                "Shipping",
            ),
            t("AwaitingStockAndPayment", ANSWERS, "Compensating"),
            t("AwaitingStockAndPayment", ANSWERS, "Cancelled"),
            t(
                "AwaitingStockAndPayment",
                "deadline:awaiting",
                "Compensating",
            ),
            t("Shipping", "ShipmentDispatched", "Settling"),
            t("Shipping", "ShipmentFailed", "Compensating"),
            t("Shipping", "deadline:shipping", "CancellingShipment"),
            t("CancellingShipment", "ShipmentDispatched", "Settling"),
            t(
                "CancellingShipment",
                "ShipmentFailed|ShipmentCancelled",
                "Compensating",
            ),
            t(
                "CancellingShipment",
                "deadline:compensation",
                "CompensationFailed",
            ),
            t("Settling", "StockCommitted|PaymentCaptured", "Completed"),
            t("Settling", "deadline:settling", "SettlementFailed"),
            t("SettlementFailed", "retry", "Settling"),
            t(
                "SettlementFailed",
                "StockCommitted|PaymentCaptured",
                "Completed",
            ),
            t("Compensating", UNDONE, "Cancelled"),
            t(
                "Compensating",
                "deadline:compensation",
                "CompensationFailed",
            ),
            t("CompensationFailed", "retry", "Compensating"),
            t("CompensationFailed", "retry", "CancellingShipment"),
            t("CompensationFailed", UNDONE, "Cancelled"),
        ],
    }
}
