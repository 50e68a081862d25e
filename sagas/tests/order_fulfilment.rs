//! Order fulfilment, given/when/then with time as data, and property tests over reordered
//! and duplicated inputs.

use inventory::{StockCommitted, StockRejected, StockReleased, StockReserved};
use orders::{LineItem, OrderPlaced};
use payments::{
    PaymentAuthorized, PaymentCancelled, PaymentCaptured, PaymentDeclined, PaymentVoided,
};
use proptest::prelude::*;
use runtime::saga::testing::Scenario;
use runtime::saga::{ProcessManager, Saga, SagaMessage};
use runtime::Message;
use sagas::order_fulfilment::{self as of, Fulfilment, Timeouts};
use shipping::{ShipmentCancelled, ShipmentDispatched, ShipmentFailed};

const ID: &str = "o1";

type OrderFulfilment = Saga<Fulfilment>;

fn saga() -> OrderFulfilment {
    of::saga(Timeouts {
        awaiting_ms: 1_000,
        shipping_ms: 2_000,
        settling_ms: 500,
        compensation_ms: 300,
        max_attempts: 2,
    })
}

fn definition() -> runtime::saga::Definition {
    saga().definition()
}

/// Every message the saga reacts to, typed (a `SagaMessage` is made from one per delivery).
#[derive(Debug, Clone)]
enum Input {
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
    /// As the saga receives it, and its wire type.
    fn to(&self, s: &OrderFulfilment) -> (SagaMessage, &'static str) {
        fn m<M: Message + Clone + Send + Sync + 'static>(
            s: &OrderFulfilment,
            m: &M,
        ) -> (SagaMessage, &'static str) {
            (s.message(m.clone()).expect("names its order"), M::TYPE)
        }
        match self {
            Input::Placed(x) => m(s, x),
            Input::StockReserved(x) => m(s, x),
            Input::StockRejected(x) => m(s, x),
            Input::StockReleased(x) => m(s, x),
            Input::StockCommitted(x) => m(s, x),
            Input::PaymentAuthorized(x) => m(s, x),
            Input::PaymentDeclined(x) => m(s, x),
            Input::PaymentVoided(x) => m(s, x),
            Input::PaymentCancelled(x) => m(s, x),
            Input::PaymentCaptured(x) => m(s, x),
            Input::ShipmentDispatched(x) => m(s, x),
            Input::ShipmentFailed(x) => m(s, x),
            Input::ShipmentCancelled(x) => m(s, x),
        }
    }
}

trait When {
    fn on(self, i: Input) -> Self;
}

impl When for Scenario<'_, OrderFulfilment> {
    fn on(self, i: Input) -> Self {
        // A message's form does not depend on the saga's timeouts.
        let (m, on) = i.to(&saga());
        self.when(m, on)
    }
}

fn placed() -> Input {
    Input::Placed(OrderPlaced {
        order_id: ID.into(),
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
        order_id: ID.into(),
        items: vec![],
    })
}
fn rejected() -> Input {
    Input::StockRejected(StockRejected {
        order_id: ID.into(),
        reason: "short".into(),
    })
}
fn released() -> Input {
    Input::StockReleased(StockReleased {
        order_id: ID.into(),
    })
}
fn committed() -> Input {
    Input::StockCommitted(StockCommitted {
        order_id: ID.into(),
    })
}
fn authorized() -> Input {
    Input::PaymentAuthorized(PaymentAuthorized {
        order_id: ID.into(),
        amount_cents: 100,
        auth_id: "a".into(),
    })
}
fn declined() -> Input {
    Input::PaymentDeclined(PaymentDeclined {
        order_id: ID.into(),
        reason: "card".into(),
    })
}
fn voided() -> Input {
    Input::PaymentVoided(PaymentVoided {
        order_id: ID.into(),
        amount_cents: 100,
    })
}
fn pay_cancelled() -> Input {
    Input::PaymentCancelled(PaymentCancelled {
        order_id: ID.into(),
    })
}
fn captured() -> Input {
    Input::PaymentCaptured(PaymentCaptured {
        order_id: ID.into(),
        amount_cents: 100,
    })
}
fn dispatched() -> Input {
    Input::ShipmentDispatched(ShipmentDispatched {
        order_id: ID.into(),
        tracking: "t".into(),
    })
}
fn ship_failed() -> Input {
    Input::ShipmentFailed(ShipmentFailed {
        order_id: ID.into(),
        reason: "nowhere".into(),
    })
}
fn ship_cancelled() -> Input {
    Input::ShipmentCancelled(ShipmentCancelled {
        order_id: ID.into(),
    })
}

/// Applies each input labelled with its type, so the path can be checked against the graph.
fn run<'a>(s: &'a OrderFulfilment, inputs: Vec<Input>) -> Scenario<'a, OrderFulfilment> {
    inputs.into_iter().fold(Scenario::new(s), |sc, i| sc.on(i))
}

/// Every transition taken is an edge of the declared graph.
fn assert_declared(sc: &Scenario<'_, OrderFulfilment>) {
    let def = definition();
    for (from, on, to) in &sc.path {
        if from == "(none)" {
            assert_eq!(to, def.initial);
            continue;
        }
        assert!(
            def.allows(from, on, to),
            "undeclared transition {from} -{on}-> {to}"
        );
    }
}

#[test]
fn the_declared_graph_is_complete() {
    let def = definition();
    assert_eq!(def.problems(), Vec::<String>::new());
    // Every non-terminal state has a deadline or is marked as waiting without one on purpose.
    for s in &def.states {
        assert!(
            s.terminal || s.deadline.is_some() || s.waits_without_deadline.is_some(),
            "{}",
            s.name
        );
    }
    assert_eq!(saga().definition(), def);
    let m = def.mermaid();
    assert!(m.starts_with("stateDiagram-v2") && m.contains("Compensating --> Cancelled"));
}

#[test]
fn happy_path_in_either_order() {
    let s = saga();
    for first in [
        vec![reserved(), authorized()],
        vec![authorized(), reserved()],
    ] {
        let mut inputs = vec![placed()];
        inputs.extend(first);
        inputs.extend([dispatched(), captured(), committed()]);
        let sc = run(&s, inputs);
        assert_eq!(sc.status(), "Completed");
        assert_eq!(
            sc.sent,
            [
                "ConfirmOrder",
                "ShipOrder",
                "CommitStock",
                "CapturePayment",
                "CompleteOrder"
            ]
        );
        assert!(sc.deadlines.is_empty(), "no deadline outlives the instance");
        assert_declared(&sc);
    }
}

#[test]
fn stock_rejected_cancels_the_payment_then_the_order() {
    let s = saga();
    let sc = run(&s, vec![placed(), rejected(), authorized(), voided()]);
    assert_eq!(sc.status(), "Cancelled");
    assert_eq!(sc.sent, ["CancelPayment", "CancelOrder"]);
    assert_declared(&sc);
}

#[test]
fn payment_declined_releases_stock_then_cancels() {
    let s = saga();
    let sc = run(&s, vec![placed(), reserved(), declined(), released()]);
    assert_eq!(sc.status(), "Cancelled");
    assert_eq!(sc.sent, ["ReleaseStock", "CancelOrder"]);
    // Both refused: nothing to undo, cancelled at once.
    let sc = run(&s, vec![placed(), declined(), rejected()]);
    assert_eq!(sc.status(), "Cancelled");
    assert_declared(&sc);
}

#[test]
fn shipment_failed_compensates_both() {
    let s = saga();
    let sc = run(
        &s,
        vec![
            placed(),
            reserved(),
            authorized(),
            ship_failed(),
            released(),
            voided(),
        ],
    );
    assert_eq!(sc.status(), "Cancelled");
    assert_eq!(
        sc.sent,
        [
            "ConfirmOrder",
            "ShipOrder",
            "ReleaseStock",
            "CancelPayment",
            "CancelOrder"
        ]
    );
    assert_declared(&sc);
}

#[test]
fn awaiting_deadline_compensates_what_was_done() {
    let s = saga();
    let sc = run(&s, vec![placed(), reserved()]).advance(999);
    assert_eq!(sc.status(), "AwaitingStockAndPayment", "not yet due");
    let sc = sc.advance(1);
    assert_eq!(sc.status(), "Compensating");
    assert_eq!(sc.sent, ["ReleaseStock", "CancelPayment"]);
    // The payment was never authorized: payments answers the cancel with PaymentCancelled.
    let sc = sc.on(released()).on(pay_cancelled());
    assert_eq!(sc.status(), "Cancelled");
    assert!(sc
        .state
        .unwrap()
        .data
        .reason
        .unwrap()
        .contains("no stock and payment answer"));
}

#[test]
fn shipping_deadline_cancels_the_shipment_first() {
    let s = saga();
    let base = || run(&s, vec![placed(), reserved(), authorized()]).advance(2_000);
    let sc = base();
    assert_eq!(sc.status(), "CancellingShipment");
    assert_eq!(sc.sent.last(), Some(&"CancelShipment"));
    // Cancelled in time: compensate and cancel.
    let sc = sc.on(ship_cancelled()).on(released()).on(voided());
    assert_eq!(sc.status(), "Cancelled");
    assert_declared(&sc);
    // Already dispatched: settle instead.
    let sc = base().on(dispatched());
    assert_eq!(sc.status(), "Settling");
    assert_eq!(
        &sc.sent[sc.sent.len() - 2..],
        ["CommitStock", "CapturePayment"]
    );
    assert_declared(&sc);
}

#[test]
fn compensation_that_keeps_failing_parks_and_can_be_retried() {
    let s = saga();
    let sc = run(&s, vec![placed(), reserved(), declined()]);
    assert_eq!(sc.sent, ["ReleaseStock"]);
    // No answer: resent at each deadline, max_attempts (2) times, then parked.
    let sc = sc.advance(300);
    assert_eq!((sc.status(), sc.sent.len()), ("Compensating", 2));
    let sc = sc.advance(300).advance(300);
    assert_eq!(sc.status(), "CompensationFailed");
    assert_eq!(sc.sent, ["ReleaseStock", "ReleaseStock", "ReleaseStock"]);
    assert!(
        sc.deadlines.is_empty(),
        "parked without a deadline on purpose"
    );
    // An operator retries: resent, and this time inventory answers.
    let sc = sc.retry().expect("retry allowed");
    assert_eq!(sc.status(), "Compensating");
    assert_eq!(sc.sent.last(), Some(&"ReleaseStock"));
    let sc = sc.on(released());
    assert_eq!(sc.status(), "Cancelled");
    assert_eq!(sc.sent.last(), Some(&"CancelOrder"));
    assert_declared(&sc);
}

#[test]
fn settlement_that_keeps_failing_parks_and_can_be_retried() {
    let s = saga();
    let sc = run(
        &s,
        vec![
            placed(),
            reserved(),
            authorized(),
            dispatched(),
            committed(),
        ],
    )
    .advance(500 * 3);
    assert_eq!(sc.status(), "SettlementFailed");
    let capture_count = sc.sent.iter().filter(|t| **t == "CapturePayment").count();
    assert_eq!(capture_count, 3, "sent once, resent twice");
    assert!(
        sc.sent.iter().filter(|t| **t == "CommitStock").count() == 1,
        "committed stock is not resent"
    );
    let sc = sc.retry().unwrap().on(captured());
    assert_eq!(sc.status(), "Completed");
    assert_declared(&sc);
}

#[test]
fn retry_is_refused_outside_the_parked_states() {
    let s = saga();
    assert!(run(&s, vec![placed()]).retry().is_err());
}

#[test]
fn answers_before_order_placed_are_kept_until_it_arrives() {
    let s = saga();
    let sc = run(&s, vec![authorized(), reserved()]);
    assert_eq!(sc.status(), "AwaitingStockAndPayment");
    assert!(
        sc.sent.is_empty(),
        "nothing sent before the order's details are known"
    );
    let sc = sc.on(placed());
    assert_eq!(sc.status(), "Shipping");
    assert_eq!(sc.sent, ["ConfirmOrder", "ShipOrder"]);
    assert_declared(&sc);
    // A refusal that overtook the order compensates once the order arrives.
    let sc = run(&s, vec![rejected(), placed(), authorized(), voided()]);
    assert_eq!(sc.status(), "Cancelled");
    assert_declared(&sc);
}

#[test]
fn early_messages_wait_and_late_ones_change_nothing() {
    let s = saga();
    let mut sc = Scenario::new(&s);
    assert!(
        sc.try_when(&reserved().to(&s).0, "StockReserved").is_ok(),
        "kept, not refused"
    );
    let sc = run(
        &s,
        vec![
            placed(),
            reserved(),
            authorized(),
            dispatched(),
            captured(),
            committed(),
        ],
    );
    let sent = sc.sent.len();
    let sc = sc.on(voided()).on(rejected());
    assert_eq!((sc.status(), sc.sent.len()), ("Completed", sent));
}

// ---- properties: reordering and duplicates ----

/// What the simulated participants end with: the business effects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct World {
    stock: &'static str,
    payment: &'static str,
    shipped: u32,
    order: &'static str,
    /// Orders ended while a step was still outstanding.
    premature: Vec<String>,
}

/// A message in flight: to the saga, or a command to a participant.
#[derive(Debug, Clone)]
enum Msg {
    ToSaga(Input),
    Cmd(&'static str),
}

/// Runs the saga against participants that answer as set (stock ok, payment ok, carrier
/// ok), delivering in-flight messages in the order `picks` chooses and delivering a message
/// again when `dups` says so. Returns the saga's final state name and the world.
fn simulate(
    stock_ok: bool,
    pay_ok: bool,
    ship_ok: bool,
    picks: &[usize],
    dups: &[bool],
) -> (String, World) {
    let s = of::saga(Timeouts::default());
    let mut sc = Scenario::new(&s);
    let mut w = World {
        stock: if stock_ok { "Reserved" } else { "Rejected" },
        payment: if pay_ok { "Authorized" } else { "Declined" },
        shipped: 0,
        order: "Placed",
        premature: vec![],
    };
    let mut bag: Vec<Msg> = vec![
        Msg::ToSaga(placed()),
        Msg::ToSaga(if stock_ok { reserved() } else { rejected() }),
        Msg::ToSaga(if pay_ok { authorized() } else { declined() }),
    ];
    let mut step = 0;
    while !bag.is_empty() && step < 500 {
        // When the chosen picks run out, keep choosing pseudo-randomly.
        let i = picks.get(step).copied().unwrap_or(step * 7919 + 13) % bag.len();
        let dup = dups.get(step).copied().unwrap_or(false);
        step += 1;
        let msg = bag.remove(i);
        if dup {
            // Delivered now and again later: a redelivery after other messages.
            bag.push(msg.clone());
        }
        match msg {
            Msg::ToSaga(input) => {
                let before = sc.sent.len();
                let (m, on) = input.to(&s);
                if sc.try_when(&m, on).is_err() {
                    bag.push(Msg::ToSaga(input)); // redelivered later
                }
                bag.extend(sc.sent[before..].iter().map(|t| Msg::Cmd(t)));
            }
            Msg::Cmd(cmd) => {
                let answer = match (cmd, w.stock, w.payment) {
                    ("ReleaseStock", "Reserved", _) => {
                        w.stock = "Released";
                        Some(released())
                    }
                    ("CommitStock", "Reserved", _) => {
                        w.stock = "Committed";
                        Some(committed())
                    }
                    ("CancelPayment", _, "Authorized") => {
                        w.payment = "Voided";
                        Some(voided())
                    }
                    ("CapturePayment", _, "Authorized") => {
                        w.payment = "Captured";
                        Some(captured())
                    }
                    ("ShipOrder", _, _) if w.shipped == 0 && ship_ok => {
                        w.shipped = 1;
                        Some(dispatched())
                    }
                    ("ShipOrder", _, _) if w.shipped == 0 => {
                        w.shipped = 2;
                        Some(ship_failed())
                    }
                    ("ConfirmOrder", _, _) if w.order == "Placed" => {
                        w.order = "Confirmed";
                        None
                    }
                    ("CompleteOrder", _, _) => {
                        if (w.stock, w.payment) != ("Committed", "Captured") {
                            w.premature.push(format!(
                                "completed with stock {} payment {}",
                                w.stock, w.payment
                            ));
                        }
                        w.order = "Completed";
                        None
                    }
                    ("CancelOrder", _, _) => {
                        if w.stock == "Reserved" || w.payment == "Authorized" {
                            w.premature.push(format!(
                                "cancelled with stock {} payment {}",
                                w.stock, w.payment
                            ));
                        }
                        w.order = "Cancelled";
                        None
                    }
                    _ => None,
                };
                bag.extend(answer.map(Msg::ToSaga));
            }
        }
    }
    if w.shipped == 2 {
        w.shipped = 0;
    }
    (sc.status().to_string(), w)
}

proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn same_outcome_whatever_the_order_and_duplicates(
        stock_ok in any::<bool>(),
        pay_ok in any::<bool>(),
        ship_ok in any::<bool>(),
        picks in proptest::collection::vec(0usize..64, 0..80),
                dups in proptest::collection::vec(proptest::bool::weighted(0.3), 0..80),
    ) {
        let (reference_state, reference) = simulate(stock_ok, pay_ok, ship_ok, &[], &[]);
        let (state, world) = simulate(stock_ok, pay_ok, ship_ok, &picks, &dups);
                prop_assert_eq!(&world.premature, &Vec::<String>::new());
        prop_assert_eq!(&state, &reference_state);
        prop_assert_eq!(&world, &reference);
        let completes = stock_ok && pay_ok && ship_ok;
        prop_assert_eq!(state.as_str(), if completes { "Completed" } else { "Cancelled" });
        if completes {
            prop_assert_eq!((world.stock, world.payment, world.shipped, world.order), ("Committed", "Captured", 1, "Completed"));
        } else {
            prop_assert!(matches!(world.stock, "Released" | "Rejected"), "stock left {}", world.stock);
            prop_assert!(matches!(world.payment, "Voided" | "Declined"), "payment left {}", world.payment);
            prop_assert_eq!((world.shipped, world.order), (0, "Cancelled"));
        }
    }
}

#[test]
fn a_late_shipment_answer_while_parked_moves_the_instance_on() {
    let s = saga();
    // Not dispatched in time; the cancel is sent, resent twice, then the instance parks.
    let parked = || {
        run(&s, vec![placed(), reserved(), authorized()])
            .advance(2_000)
            .advance(300 * 3)
    };
    let sc = parked();
    assert_eq!(sc.status(), "CompensationFailed");
    let cancels = sc.sent.iter().filter(|t| **t == "CancelShipment").count();
    assert_eq!(cancels, 3);
    // The carrier's cancellation comes late: compensate as if it had come in time.
    let sc = sc.on(ship_cancelled());
    assert_eq!(sc.status(), "Compensating");
    assert_eq!(
        &sc.sent[sc.sent.len() - 2..],
        ["ReleaseStock", "CancelPayment"]
    );
    let sc = sc.on(released()).on(voided());
    assert_eq!(sc.status(), "Cancelled");
    assert_eq!(sc.sent.last(), Some(&"CancelOrder"));
    assert_declared(&sc);
    // Dispatched after all: settle.
    let sc = parked().on(dispatched());
    assert_eq!(sc.status(), "Settling");
    assert_declared(&sc);
}
