//! The order fulfilment of the seeds (Sales, Billing, Shipping), built only with Choreo's
//! public API: three contexts, each one aggregate, and the order-fulfilment saga hosted by
//! Sales, which bills the customer once an order is accepted, approves and ships it once
//! the customer is billed, and cancels it when billing is declined or does not answer in
//! time (then it asks Billing to refund or void the bill, whichever is due).
//!
//! `sales --context all` (or one node per context) with the flags of `choreo node`; the
//! billing deadline is `[sagas.order-fulfilment] billing` in the `--config` file.

use std::time::Duration;

use runtime::config::NodeConfig;
use runtime::context::Check;
use runtime::prelude::*;
use serde::{Deserialize, Serialize};

const SALES: &str = "sales";
const BILLING: &str = "billing";
const SHIPPING: &str = "shipping";
/// Billing declines any order above this amount.
const CREDIT_LIMIT_CENTS: u64 = 100_000;

runtime::messages! {
    enum SalesCommand: Command in SALES {
        PlaceOrder { order: String, customer: String, cents: u64 },
        ApproveOrder { order: String },
        CancelOrder { order: String, reason: String },
    }
}

runtime::messages! {
    enum SalesEvent: Event in SALES {
        OrderAccepted { order: String, customer: String, cents: u64 },
        OrderApproved { order: String },
        OrderCancelled { order: String, reason: String },
    }
}

runtime::messages! {
    enum BillingCommand: Command in BILLING {
        BillCustomer { order: String, customer: String, cents: u64 },
        RefundCustomer { order: String },
    }
}

runtime::messages! {
    enum BillingEvent: Event in BILLING {
        CustomerBilled { order: String, cents: u64 },
        BillingDeclined { order: String, reason: String },
        CustomerRefunded { order: String, cents: u64 },
        BillVoided { order: String },
    }
}

runtime::messages! {
    enum ShippingCommand: Command in SHIPPING {
        ShipOrder { order: String },
    }
}

runtime::messages! {
    enum ShippingEvent: Event in SHIPPING {
        OrderShipped { order: String },
    }
}

/// An order as Sales keeps it.
#[derive(Default, Serialize, Deserialize)]
struct Order {
    status: Option<String>,
    cents: u64,
}

impl Aggregate for Order {
    const NAME: &'static str = "order";
    const ID: &'static str = "order";
    type Command = SalesCommand;
    type Event = SalesEvent;

    fn decide(&self, command: &SalesCommand, _now: u64) -> Decided<SalesEvent> {
        let status = self.status.as_deref();
        Ok(match command {
            SalesCommand::PlaceOrder(c) if status.is_none() => {
                let (order, customer, cents) = (c.order.clone(), c.customer.clone(), c.cents);
                vec![OrderAccepted {
                    order,
                    customer,
                    cents,
                }
                .into()]
            }
            SalesCommand::PlaceOrder(_) => vec![],
            _ if status.is_none() => return Err(Rejection::new("no such order")),
            SalesCommand::ApproveOrder(c) if status == Some("accepted") => {
                vec![OrderApproved {
                    order: c.order.clone(),
                }
                .into()]
            }
            SalesCommand::CancelOrder(c) if status == Some("accepted") => {
                let (order, reason) = (c.order.clone(), c.reason.clone());
                vec![OrderCancelled { order, reason }.into()]
            }
            _ => vec![], // approved or cancelled already
        })
    }

    fn apply(&mut self, event: &SalesEvent) {
        self.status = Some(
            match event {
                SalesEvent::OrderAccepted(e) => {
                    self.cents = e.cents;
                    "accepted"
                }
                SalesEvent::OrderApproved(_) => "approved",
                SalesEvent::OrderCancelled(_) => "cancelled",
            }
            .into(),
        );
    }
}

/// An order's bill as Billing keeps it. Voided: refunded, or cancelled before it was billed
/// (a bill that comes after that is not charged).
#[derive(Default, Serialize, Deserialize)]
struct Bill {
    billed_cents: u64,
    declined: bool,
    voided: bool,
}

impl Aggregate for Bill {
    const NAME: &'static str = "bill";
    const ID: &'static str = "order";
    type Command = BillingCommand;
    type Event = BillingEvent;

    fn decide(&self, command: &BillingCommand, _now: u64) -> Decided<BillingEvent> {
        let done = self.voided || self.declined || self.billed_cents > 0;
        Ok(match command {
            BillingCommand::BillCustomer(_) if done => vec![],
            BillingCommand::BillCustomer(c) if c.cents > CREDIT_LIMIT_CENTS => {
                let reason = format!("{} is over the credit limit", c.cents);
                vec![BillingDeclined {
                    order: c.order.clone(),
                    reason,
                }
                .into()]
            }
            BillingCommand::BillCustomer(c) => {
                vec![CustomerBilled {
                    order: c.order.clone(),
                    cents: c.cents,
                }
                .into()]
            }
            BillingCommand::RefundCustomer(_) if self.voided => vec![],
            BillingCommand::RefundCustomer(c) if self.billed_cents > 0 => {
                let (order, cents) = (c.order.clone(), self.billed_cents);
                vec![CustomerRefunded { order, cents }.into()]
            }
            BillingCommand::RefundCustomer(c) => vec![BillVoided {
                order: c.order.clone(),
            }
            .into()],
        })
    }

    fn apply(&mut self, event: &BillingEvent) {
        match event {
            BillingEvent::CustomerBilled(e) => self.billed_cents = e.cents,
            BillingEvent::BillingDeclined(_) => self.declined = true,
            BillingEvent::CustomerRefunded(_) | BillingEvent::BillVoided(_) => self.voided = true,
        }
    }
}

/// An order's shipment as Shipping keeps it.
#[derive(Default, Serialize, Deserialize)]
struct Shipment {
    shipped: bool,
}

impl Aggregate for Shipment {
    const NAME: &'static str = "shipment";
    const ID: &'static str = "order";
    type Command = ShippingCommand;
    type Event = ShippingEvent;

    fn decide(
        &self,
        ShippingCommand::ShipOrder(c): &ShippingCommand,
        _: u64,
    ) -> Decided<ShippingEvent> {
        Ok(match self.shipped {
            true => vec![],
            false => vec![OrderShipped {
                order: c.order.clone(),
            }
            .into()],
        })
    }

    fn apply(&mut self, _: &ShippingEvent) {
        self.shipped = true;
    }
}

/// What the saga keeps of an order.
#[derive(Clone, Serialize, Deserialize)]
struct Fulfilment {
    order: String,
}

/// The order fulfilment: OrderAccepted, then CustomerBilled (within `billing`), then
/// OrderApproved and shipped; declined or late billing cancels the order and voids the bill.
fn order_fulfilment(billing: Duration) -> Saga<Fulfilment> {
    Saga::new("order-fulfilment")
        .correlated_by("order")
        .starts_with("Billing", move |e: &OrderAccepted, now| {
            let (order, customer, cents) = (e.order.clone(), e.customer.clone(), e.cents);
            let bill = BillCustomer {
                order: order.clone(),
                customer,
                cents,
            };
            let due = Deadline::after("billing", now, billing.as_millis() as u64);
            Step::to(Fulfilment { order })
                .send(Outgoing::message(&bill))
                .set(due)
        })
        .on("Billing", "Shipping", |f, _: &CustomerBilled, _| {
            let order = f.order.clone();
            Step::to(f.clone())
                .send(Outgoing::message(&ApproveOrder {
                    order: order.clone(),
                }))
                .send(Outgoing::message(&ShipOrder { order }))
        })
        .on("Billing", "Cancelled", |f, e: &BillingDeclined, _| {
            Step::to(f.clone()).send(cancel(&f.order, &e.reason))
        })
        .on_deadline("Billing", "billing", "Cancelled", |f, _| {
            let refund = RefundCustomer {
                order: f.order.clone(),
            };
            Step::to(f.clone())
                .send(Outgoing::message(&refund))
                .send(cancel(&f.order, "billing did not answer in time"))
        })
        .on("Shipping", "Fulfilled", |f, _: &OrderShipped, _| {
            Step::to(f.clone())
        })
        .waits(
            "Shipping",
            "shipping ships every approved order; its lag is alerted on",
        )
        .terminal("Fulfilled")
        .terminal("Cancelled")
}

/// Billing's invariant (`choreo verify`): no declined bill is charged, and none over the
/// credit limit.
fn charges(state: &dyn runtime::StateRead) -> Result<Check, runtime::QueryError> {
    let mut check = Check::default();
    for bill in runtime::read_all::<Bill>(state, "bill/")? {
        check.checked += 1;
        if bill.declined && bill.billed_cents > 0 || bill.billed_cents > CREDIT_LIMIT_CENTS {
            let (cents, declined) = (bill.billed_cents, bill.declined);
            let problem = format!("a bill charged {cents} cents (declined: {declined})");
            check.violations.push(problem);
        }
    }
    Ok(check)
}

fn cancel(order: &str, reason: &str) -> Outgoing {
    let (order, reason) = (order.to_string(), reason.to_string());
    Outgoing::message(&CancelOrder { order, reason })
}

fn main() -> std::process::ExitCode {
    App::new("sales")
        .context(SALES, |config: &NodeConfig| {
            let billing = config.saga_duration("order-fulfilment", "billing")?;
            let saga = order_fulfilment(billing.unwrap_or(Duration::from_secs(30)));
            Ok(ContextBuilder::new(SALES)
                .aggregate::<Order>()
                .saga(saga)
                .sends(BILLING, BillingCommand::TYPES)
                .sends(SHIPPING, ShippingCommand::TYPES)
                .build()?)
        })
        .with(
            ContextBuilder::new(BILLING)
                .aggregate::<Bill>()
                .invariant("charges", charges),
        )
        .with(ContextBuilder::new(SHIPPING).aggregate::<Shipment>())
        .run()
}

#[cfg(test)]
mod tests {
    use runtime::saga::testing::Scenario;

    use super::*;

    fn accepted(order: &str, cents: u64) -> OrderAccepted {
        let (order, customer) = (order.to_string(), "c-1".to_string());
        OrderAccepted {
            order,
            customer,
            cents,
        }
    }

    #[test]
    fn a_billed_order_is_approved_and_shipped() {
        let saga = order_fulfilment(Duration::from_secs(5));
        let s = Scenario::new(&saga).receive(accepted("o-1", 500));
        assert_eq!(
            (s.status(), &s.sent[..]),
            ("Billing", &["BillCustomer"][..])
        );
        let s = s.receive(CustomerBilled {
            order: "o-1".into(),
            cents: 500,
        });
        assert_eq!(s.sent, ["BillCustomer", "ApproveOrder", "ShipOrder"]);
        let s = s.advance(10_000).receive(OrderShipped {
            order: "o-1".into(),
        });
        assert_eq!(s.status(), "Fulfilled");
    }

    #[test]
    fn late_billing_cancels_the_order_and_voids_the_bill() {
        let saga = order_fulfilment(Duration::from_secs(5));
        let s = Scenario::new(&saga)
            .receive(accepted("o-1", 500))
            .advance(5_000);
        assert_eq!(s.status(), "Cancelled");
        assert_eq!(s.sent, ["BillCustomer", "RefundCustomer", "CancelOrder"]);
        // The bill that comes afterwards is refunded: nothing stays charged.
        let mut bill = Bill::default();
        let billed = bill.decide(
            &BillCustomer {
                order: "o-1".into(),
                customer: "c".into(),
                cents: 500,
            }
            .into(),
            0,
        );
        bill.apply(&billed.unwrap()[0]);
        let refund = bill
            .decide(
                &RefundCustomer {
                    order: "o-1".into(),
                }
                .into(),
                0,
            )
            .unwrap();
        assert!(matches!(&refund[..], [BillingEvent::CustomerRefunded(r)] if r.cents == 500));
    }

    #[test]
    fn billing_declines_above_the_credit_limit_and_a_void_bill_is_never_charged() {
        let over = BillCustomer {
            order: "o".into(),
            customer: "c".into(),
            cents: CREDIT_LIMIT_CENTS + 1,
        };
        let declined = Bill::default().decide(&over.into(), 0).unwrap();
        assert!(matches!(&declined[..], [BillingEvent::BillingDeclined(_)]));
        let mut bill = Bill::default();
        let void = bill
            .decide(&RefundCustomer { order: "o".into() }.into(), 0)
            .unwrap();
        assert!(matches!(&void[..], [BillingEvent::BillVoided(_)]));
        bill.apply(&void[0]);
        let late = BillCustomer {
            order: "o".into(),
            customer: "c".into(),
            cents: 1,
        };
        assert!(bill.decide(&late.into(), 0).unwrap().is_empty());
    }
}
