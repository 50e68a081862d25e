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
//! Declared with the runtime's [`Saga`] builder: the rules are the graph. Each answer
//! updates what is known of the three steps (stock, payment, shipment; [`Known`]), and
//! [`next`] says where that leads from the current state; a rule per possible target,
//! guarded by `next`, makes each move an edge of the graph. An answer that changes nothing
//! (a repeat, or one the saga no longer waits for) matches no rule and changes nothing.
//! Stock and payment answers may overtake `OrderPlaced` (they come from other streams):
//! they start the instance too, and nothing moves until the order's details are known.

use inventory::{
    CommitStock, ReleaseStock, StockCommitted, StockRejected, StockReleased, StockReserved,
};
use orders::{CancelOrder, CompleteOrder, ConfirmOrder, LineItem, OrderPlaced};
use payments::{
    CancelPayment, CapturePayment, PaymentAuthorized, PaymentCancelled, PaymentCaptured,
    PaymentDeclined, PaymentVoided,
};
use runtime::config::duration::Setting;
use runtime::config::SagaSettings;
use runtime::saga::{Deadline, Saga, Step};
use runtime::{Message, Outgoing};
use serde::{Deserialize, Serialize};
use shipping::{CancelShipment, ShipOrder, ShipmentCancelled, ShipmentDispatched, ShipmentFailed};

pub const NAME: &str = "order-fulfilment";

/// Waiting for both stock and payment answers (deadline `awaiting`).
pub const AWAITING: &str = "AwaitingStockAndPayment";
/// Waiting for the carrier to dispatch (deadline `shipping`).
pub const SHIPPING: &str = "Shipping";
/// The shipment was not dispatched in time: cancelling it (deadline `compensation`).
pub const CANCELLING_SHIPMENT: &str = "CancellingShipment";
/// Dispatched: committing stock and capturing payment (deadline `settling`).
pub const SETTLING: &str = "Settling";
/// Settlement resent `max_attempts` times without an answer: parked for an operator.
pub const SETTLEMENT_FAILED: &str = "SettlementFailed";
/// Releasing stock and cancelling payment (deadline `compensation`).
pub const COMPENSATING: &str = "Compensating";
/// Compensation resent `max_attempts` times without an answer: parked for an operator.
pub const COMPENSATION_FAILED: &str = "CompensationFailed";
/// Shipped and paid.
pub const COMPLETED: &str = "Completed";
/// Cancelled once everything done was undone.
pub const CANCELLED: &str = "Cancelled";

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

/// What the saga keeps of one order's fulfilment (the state's name is kept beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub order_id: String,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub stock: StockStep,
    pub payment: PaymentStep,
    pub shipment: ShipmentStep,
    pub reason: Option<String>,
    /// Resends made in the current state.
    pub attempts: u64,
    /// `OrderPlaced` has arrived (answers that overtook it are recorded meanwhile).
    pub placed: bool,
}

/// What is known of the three steps, and whether the order's details have arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub stock: StockStep,
    pub payment: PaymentStep,
    pub shipment: ShipmentStep,
    pub placed: bool,
}

impl Known {
    /// Stock reserved and payment authorized for a placed order: ship it.
    fn ready(self) -> bool {
        self.placed && self.stock == StockStep::Reserved && self.payment == PaymentStep::Authorized
    }

    /// Stock or payment refused.
    fn refused(self) -> bool {
        self.stock == StockStep::Rejected || self.payment == PaymentStep::Declined
    }

    /// Everything the saga started is undone or was refused.
    fn undone(self) -> bool {
        matches!(self.stock, StockStep::Rejected | StockStep::Released)
            && matches!(self.payment, PaymentStep::Declined | PaymentStep::Cancelled)
    }

    /// On entering compensation: what was or may still be done is being undone.
    fn compensating(mut self) -> Known {
        if matches!(self.stock, StockStep::Pending | StockStep::Reserved) {
            self.stock = StockStep::Releasing;
        }
        if matches!(self.payment, PaymentStep::Pending | PaymentStep::Authorized) {
            self.payment = PaymentStep::Cancelling;
        }
        self
    }
}

impl Fulfilment {
    fn new(order_id: &str) -> Self {
        Fulfilment {
            order_id: order_id.to_string(),
            customer_id: String::new(),
            items: vec![],
            stock: StockStep::Pending,
            payment: PaymentStep::Pending,
            shipment: ShipmentStep::NotRequested,
            reason: None,
            attempts: 0,
            placed: false,
        }
    }

    pub fn known(&self) -> Known {
        Known {
            stock: self.stock,
            payment: self.payment,
            shipment: self.shipment,
            placed: self.placed,
        }
    }

    fn set(&mut self, k: Known) {
        (self.stock, self.payment, self.shipment, self.placed) =
            (k.stock, k.payment, k.shipment, k.placed);
    }

    fn because(&mut self, reason: String) {
        self.reason.get_or_insert(reason);
    }
}

/// Where an answer leads from state `from`, given what was known before and after it.
pub fn next(from: &'static str, before: Known, after: Known) -> &'static str {
    use ShipmentStep as Sh;
    let shipment = (after.shipment != before.shipment).then_some(after.shipment);
    match from {
        // Nothing moves before the order's details are known.
        AWAITING if !after.placed => AWAITING,
        AWAITING if after.refused() && after.compensating().undone() => CANCELLED,
        AWAITING if after.refused() => COMPENSATING,
        AWAITING if after.ready() => SHIPPING,
        SHIPPING | CANCELLING_SHIPMENT | COMPENSATION_FAILED
            if shipment == Some(Sh::Dispatched) =>
        {
            SETTLING
        }
        SHIPPING | CANCELLING_SHIPMENT | COMPENSATION_FAILED
            if matches!(shipment, Some(Sh::Failed | Sh::Cancelled)) =>
        {
            COMPENSATING
        }
        SETTLING | SETTLEMENT_FAILED
            if after.stock == StockStep::Committed && after.payment == PaymentStep::Captured =>
        {
            COMPLETED
        }
        COMPENSATING | COMPENSATION_FAILED if after.undone() => CANCELLED,
        _ => from,
    }
}

/// A message the saga receives, as what it makes known.
pub trait Answer: Message + Send + Sync + 'static {
    /// What is known after this message (unchanged: a repeat, or one not waited for).
    fn after(k: Known) -> Known;
    /// The order it is about.
    fn order_id(&self) -> &str;
    /// Records it: what [`Answer::after`] says, and a refusal's reason.
    fn record(&self, f: &mut Fulfilment) {
        f.set(Self::after(f.known()));
    }
}

/// `$t` changes `$field` (of type `$step`) to `$to` from any of `$from`; `$why` (if given)
/// formats a refusal's reason.
macro_rules! answer {
    ($t:ty, $field:ident: $step:ident::{$($from:ident)|+} => $to:ident $(, $why:literal)?) => {
        impl Answer for $t {
            fn after(mut k: Known) -> Known {
                if matches!(k.$field, $($step::$from)|+) {
                    k.$field = $step::$to;
                }
                k
            }
            fn order_id(&self) -> &str {
                &self.order_id
            }
            $(fn record(&self, f: &mut Fulfilment) {
                let before = f.known();
                f.set(Self::after(before));
                if f.known() != before {
                    f.because(format!($why, self.reason));
                }
            })?
        }
    };
}

answer!(StockReserved, stock: StockStep::{Pending} => Reserved);
answer!(StockRejected, stock: StockStep::{Pending | Releasing} => Rejected, "stock rejected: {}");
answer!(StockReleased, stock: StockStep::{Pending | Reserved | Releasing} => Released);
answer!(StockCommitted, stock: StockStep::{Reserved | Committing} => Committed);
answer!(PaymentAuthorized, payment: PaymentStep::{Pending} => Authorized);
answer!(PaymentDeclined, payment: PaymentStep::{Pending | Cancelling} => Declined, "payment declined: {}");
answer!(PaymentVoided, payment: PaymentStep::{Pending | Authorized | Cancelling} => Cancelled);
answer!(PaymentCancelled, payment: PaymentStep::{Pending | Authorized | Cancelling} => Cancelled);
answer!(PaymentCaptured, payment: PaymentStep::{Authorized | Capturing} => Captured);
answer!(ShipmentDispatched, shipment: ShipmentStep::{Requested | Cancelling} => Dispatched);
answer!(ShipmentFailed, shipment: ShipmentStep::{Requested | Cancelling} => Failed, "shipment failed: {}");
answer!(ShipmentCancelled, shipment: ShipmentStep::{Cancelling} => Cancelled);

impl Answer for OrderPlaced {
    fn after(k: Known) -> Known {
        Known { placed: true, ..k }
    }
    fn order_id(&self) -> &str {
        &self.order_id
    }
    fn record(&self, f: &mut Fulfilment) {
        f.customer_id = self.customer_id.clone();
        f.items = self.items.clone();
        f.placed = true;
    }
}

/// The order fulfilment saga with `t`'s deadlines and resend limit.
pub fn saga(t: Timeouts) -> Saga<Fulfilment> {
    let saga = starts::<OrderPlaced>(Saga::new(NAME).correlated_by("order_id"), t);
    // Stock and payment answers that overtook OrderPlaced start the instance too.
    let saga = starts::<StockReserved>(saga, t);
    let saga = starts::<StockRejected>(saga, t);
    let saga = starts::<PaymentAuthorized>(saga, t);
    let saga = starts::<PaymentDeclined>(saga, t);

    let saga = answer::<OrderPlaced>(
        saga,
        AWAITING,
        &[SHIPPING, CANCELLED, COMPENSATING, AWAITING],
        t,
    );
    let saga = answer::<StockReserved>(saga, AWAITING, &[SHIPPING, AWAITING], t);
    let saga = answer::<PaymentAuthorized>(saga, AWAITING, &[SHIPPING, AWAITING], t);
    let saga = answer::<StockRejected>(saga, AWAITING, &[CANCELLED, COMPENSATING, AWAITING], t);
    let saga = answer::<PaymentDeclined>(saga, AWAITING, &[CANCELLED, COMPENSATING, AWAITING], t);
    let late = move || format!("no stock and payment answer within {} ms", t.awaiting_ms);
    let saga = saga
        .on_deadline(AWAITING, "awaiting", CANCELLED, move |f, _| {
            cancel(timed_out(f, late()))
        })
        .when(|f| f.known().compensating().undone())
        .on_deadline(AWAITING, "awaiting", COMPENSATING, move |f, now| {
            compensate(timed_out(f, late()), now, t)
        });

    let saga = answer::<ShipmentDispatched>(saga, SHIPPING, &[SETTLING], t);
    let saga = answer::<ShipmentFailed>(saga, SHIPPING, &[COMPENSATING], t);
    let saga = saga.on_deadline(SHIPPING, "shipping", CANCELLING_SHIPMENT, move |f, now| {
        let mut f = timed_out(f, format!("not dispatched within {} ms", t.shipping_ms));
        f.shipment = ShipmentStep::Cancelling;
        f.attempts = 0;
        resend(CANCELLING_SHIPMENT, f, now, t)
    });
    // Cancelling the shipment, or parked after trying (a late answer still counts).
    let mut saga = saga;
    for from in [CANCELLING_SHIPMENT, COMPENSATION_FAILED] {
        saga = answer::<ShipmentDispatched>(saga, from, &[SETTLING], t);
        saga = answer::<ShipmentFailed>(saga, from, &[COMPENSATING], t);
        saga = answer::<ShipmentCancelled>(saga, from, &[COMPENSATING], t);
    }
    let saga = resends(
        saga,
        CANCELLING_SHIPMENT,
        "compensation",
        COMPENSATION_FAILED,
        t,
    );

    let mut saga = resends(saga, SETTLING, "settling", SETTLEMENT_FAILED, t);
    for from in [SETTLING, SETTLEMENT_FAILED] {
        saga = answer::<StockCommitted>(saga, from, &[COMPLETED, from], t);
        saga = answer::<PaymentCaptured>(saga, from, &[COMPLETED, from], t);
    }
    let saga = saga.on_retry(SETTLEMENT_FAILED, SETTLING, move |f, now| {
        retried(f, SETTLING, now, t)
    });

    let mut saga = resends(saga, COMPENSATING, "compensation", COMPENSATION_FAILED, t);
    for from in [COMPENSATING, COMPENSATION_FAILED] {
        saga = answer::<StockRejected>(saga, from, &[CANCELLED, from], t);
        saga = answer::<StockReleased>(saga, from, &[CANCELLED, from], t);
        saga = answer::<PaymentDeclined>(saga, from, &[CANCELLED, from], t);
        saga = answer::<PaymentVoided>(saga, from, &[CANCELLED, from], t);
        saga = answer::<PaymentCancelled>(saga, from, &[CANCELLED, from], t);
    }
    saga.on_retry(COMPENSATION_FAILED, CANCELLING_SHIPMENT, move |f, now| {
        retried(f, CANCELLING_SHIPMENT, now, t)
    })
    .when(|f| f.shipment == ShipmentStep::Cancelling)
    .on_retry(COMPENSATION_FAILED, COMPENSATING, move |f, now| {
        retried(f, COMPENSATING, now, t)
    })
    .waits(
        SETTLEMENT_FAILED,
        "parked for an operator: choreo saga retry",
    )
    .waits(
        COMPENSATION_FAILED,
        "parked for an operator: choreo saga retry",
    )
    .terminal(COMPLETED)
    .terminal(CANCELLED)
}

/// `M` starts an instance in `AwaitingStockAndPayment`, recorded (an answer waits there for
/// the order's details).
fn starts<M: Answer>(saga: Saga<Fulfilment>, t: Timeouts) -> Saga<Fulfilment> {
    saga.starts_with(AWAITING, move |m: &M, now| {
        let mut f = Fulfilment::new(m.order_id());
        m.record(&mut f);
        Step::to(f).set(Deadline::after("awaiting", now, t.awaiting_ms))
    })
}

/// In state `from`, `M` leads to each of `targets` where [`next`] says so.
fn answer<M: Answer>(
    saga: Saga<Fulfilment>,
    from: &'static str,
    targets: &[&'static str],
    t: Timeouts,
) -> Saga<Fulfilment> {
    targets.iter().fold(saga, |saga, &to| {
        saga.on(from, to, move |f, m: &M, now| {
            let mut f = f.clone();
            m.record(&mut f);
            enter(from, to, f, now, t)
        })
        .when(move |f| {
            let (before, after) = (f.known(), M::after(f.known()));
            after != before && next(from, before, after) == to
        })
    })
}

/// The step entering `to` from `from` with what is now known.
fn enter(from: &str, to: &str, mut f: Fulfilment, now: u64, t: Timeouts) -> Step<Fulfilment> {
    match to {
        _ if to == from => Step::to(f),
        SHIPPING => {
            f.shipment = ShipmentStep::Requested;
            let confirm = ConfirmOrder {
                order_id: f.order_id.clone(),
            };
            let ship = ShipOrder {
                order_id: f.order_id.clone(),
                customer_id: f.customer_id.clone(),
                items: f.items.clone(),
            };
            Step::to(f)
                .send(Outgoing::message(&confirm))
                .send(Outgoing::message(&ship))
                .set(Deadline::after("shipping", now, t.shipping_ms))
        }
        SETTLING => {
            f.stock = StockStep::Committing;
            f.payment = PaymentStep::Capturing;
            f.attempts = 0;
            resend(SETTLING, f, now, t)
        }
        COMPENSATING => compensate(f, now, t),
        CANCELLED => cancel(f),
        COMPLETED => {
            let complete = CompleteOrder {
                order_id: f.order_id.clone(),
            };
            Step::to(f).send(Outgoing::message(&complete))
        }
        other => unreachable!("no step enters {other}"),
    }
}

/// Enters compensation: undo (or prevent) what the other steps did.
fn compensate(mut f: Fulfilment, now: u64, t: Timeouts) -> Step<Fulfilment> {
    f.set(f.known().compensating());
    f.attempts = 0;
    resend(COMPENSATING, f, now, t)
}

/// Cancels the order, everything being undone.
fn cancel(mut f: Fulfilment) -> Step<Fulfilment> {
    f.set(f.known().compensating());
    let cancel = CancelOrder {
        order_id: f.order_id.clone(),
        reason: f.reason.clone().unwrap_or_else(|| "cancelled".into()),
    };
    Step::to(f).send(Outgoing::message(&cancel))
}

fn timed_out(f: &Fulfilment, reason: String) -> Fulfilment {
    let mut f = f.clone();
    f.reason = Some(reason);
    f
}

/// At `deadline` in `state`: the state's commands again until `max_attempts` resends,
/// then `parked`.
fn resends(
    saga: Saga<Fulfilment>,
    state: &'static str,
    deadline: &'static str,
    parked: &'static str,
    t: Timeouts,
) -> Saga<Fulfilment> {
    saga.on_deadline(state, deadline, state, move |f, now| {
        let mut f = f.clone();
        f.attempts += 1;
        resend(state, f, now, t)
    })
    .when(move |f| f.attempts < t.max_attempts)
    .on_deadline(state, deadline, parked, |f, _| Step::to(f.clone()))
}

/// An operator retry: back to `state`, its commands sent again.
fn retried(f: &Fulfilment, state: &str, now: u64, t: Timeouts) -> Step<Fulfilment> {
    let mut f = f.clone();
    f.attempts = 0;
    resend(state, f, now, t)
}

/// The step that (re)sends the commands of `state` (idempotent: each names what is still
/// outstanding) and sets its deadline.
fn resend(state: &str, f: Fulfilment, now: u64, t: Timeouts) -> Step<Fulfilment> {
    let id = || f.order_id.clone();
    let mut out = Vec::new();
    match state {
        SETTLING => {
            if f.stock == StockStep::Committing {
                out.push(Outgoing::message(&CommitStock { order_id: id() }));
            }
            if f.payment == PaymentStep::Capturing {
                out.push(Outgoing::message(&CapturePayment { order_id: id() }));
            }
            let deadline = Deadline::after("settling", now, t.settling_ms);
            return Step {
                send: out,
                ..Step::to(f)
            }
            .set(deadline);
        }
        CANCELLING_SHIPMENT => out.push(Outgoing::message(&CancelShipment { order_id: id() })),
        _ => {
            if f.stock == StockStep::Releasing {
                out.push(Outgoing::message(&ReleaseStock { order_id: id() }));
            }
            if f.payment == PaymentStep::Cancelling {
                out.push(Outgoing::message(&CancelPayment { order_id: id() }));
            }
        }
    }
    let deadline = Deadline::after("compensation", now, t.compensation_ms);
    Step {
        send: out,
        ..Step::to(f)
    }
    .set(deadline)
}
