//! Inventory: the authority on stock. Reserves every line of an order on `OrderPlaced` (all
//! or nothing), releases a reservation on `ReleaseStock`, commits it on `CommitStock`.
//!
//! Conservation: for every sku, `added = available + reserved + committed`.

use std::collections::BTreeMap;
use std::sync::Arc;

use orders::{LineItem, OrderPlaced};
use runtime::component::DynComponent;
use runtime::context::Check;
use runtime::{
    load, message, read, read_all, save, Component, DecodeError, HandleCtx, HandleError, Messages,
    Outgoing, QueryError, StateRead, StateTx, Subscription,
};
use serde::{Deserialize, Serialize};

pub const CONTEXT: &str = "inventory";

/// Command: add stock of a sku.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddStock {
    pub sku: String,
    pub qty: u64,
}
message!(AddStock, Command, CONTEXT);

/// Command from fulfilment: give a reservation back. If the order has no reservation yet,
/// none will be made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseStock {
    pub order_id: String,
}
message!(ReleaseStock, Command, CONTEXT);

/// Command from fulfilment: the reserved stock has left the warehouse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitStock {
    pub order_id: String,
}
message!(CommitStock, Command, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockAdded {
    pub sku: String,
    pub qty: u64,
    pub available: u64,
}
message!(StockAdded, Event, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReserved {
    pub order_id: String,
    pub items: Vec<LineItem>,
}
message!(StockReserved, Event, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockRejected {
    pub order_id: String,
    pub reason: String,
}
message!(StockRejected, Event, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReleased {
    pub order_id: String,
}
message!(StockReleased, Event, CONTEXT);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockCommitted {
    pub order_id: String,
}
message!(StockCommitted, Event, CONTEXT);

/// Stock of one sku.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sku {
    pub added: u64,
    pub available: u64,
    pub reserved: u64,
    pub committed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReservationStatus {
    Reserved,
    Rejected,
    Released,
    Committed,
    /// Released before any reservation was made (a saga deadline passed first): a later
    /// `OrderPlaced` for the order reserves nothing.
    Cancelled,
}

/// What inventory did for one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub order_id: String,
    pub items: Vec<LineItem>,
    pub status: ReservationStatus,
}

runtime::messages! {
    /// Inputs of the stock component.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Input { OrderPlaced, AddStock, ReleaseStock, CommitStock }
}

/// The outcome of a decision: the changes to write and the event to publish.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    pub skus: BTreeMap<String, Sku>,
    pub reservation: Option<Reservation>,
    pub event: Option<Outgoing>,
}

/// Decides an input given the skus it touches and the order's reservation.
/// `Err(Some(m))` retries later (prerequisite missing); `Err(None)` never happens for
/// valid input.
pub fn decide(
    skus: &BTreeMap<String, Sku>,
    reservation: Option<&Reservation>,
    input: &Input,
) -> Result<Decision, HandleError> {
    let mut d = Decision::default();
    match input {
        Input::AddStock(a) => {
            if a.qty == 0 || a.sku.trim().is_empty() {
                return Err(HandleError::Permanent(
                    "AddStock needs a sku and qty >= 1".into(),
                ));
            }
            let mut s = skus.get(&a.sku).cloned().unwrap_or_default();
            s.added += a.qty;
            s.available += a.qty;
            d.event = Some(Outgoing::event(&StockAdded {
                sku: a.sku.clone(),
                qty: a.qty,
                available: s.available,
            }));
            d.skus.insert(a.sku.clone(), s);
        }
        Input::OrderPlaced(p) => {
            if reservation.is_some() {
                return Ok(d);
            }
            let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
            for i in &p.items {
                *wanted.entry(i.sku.as_str()).or_default() += i.qty as u64;
            }
            let short: Vec<String> = wanted
                .iter()
                .filter(|(sku, qty)| skus.get(**sku).map_or(0, |s| s.available) < **qty)
                .map(|(sku, _)| sku.to_string())
                .collect();
            let status = if short.is_empty() {
                for (sku, qty) in wanted {
                    let mut s = skus.get(sku).cloned().unwrap_or_default();
                    s.available -= qty;
                    s.reserved += qty;
                    d.skus.insert(sku.to_string(), s);
                }
                d.event = Some(Outgoing::event(&StockReserved {
                    order_id: p.order_id.clone(),
                    items: p.items.clone(),
                }));
                ReservationStatus::Reserved
            } else {
                let reason = format!("insufficient stock: {}", short.join(", "));
                d.event = Some(Outgoing::event(&StockRejected {
                    order_id: p.order_id.clone(),
                    reason,
                }));
                ReservationStatus::Rejected
            };
            d.reservation = Some(Reservation {
                order_id: p.order_id.clone(),
                items: p.items.clone(),
                status,
            });
        }
        Input::ReleaseStock(ReleaseStock { order_id })
        | Input::CommitStock(CommitStock { order_id }) => {
            let Some(r) = reservation else {
                if matches!(input, Input::CommitStock(_)) {
                    return Err(HandleError::Retry(format!(
                        "no reservation for order {order_id} yet"
                    )));
                }
                d.reservation = Some(Reservation {
                    order_id: order_id.clone(),
                    items: vec![],
                    status: ReservationStatus::Cancelled,
                });
                d.event = Some(Outgoing::event(&StockReleased {
                    order_id: order_id.clone(),
                }));
                return Ok(d);
            };
            let commit = matches!(input, Input::CommitStock(_));
            match (r.status, commit) {
                (ReservationStatus::Reserved, _) => {
                    for (sku, qty) in sum_by_sku(&r.items) {
                        let mut s = skus.get(&sku).cloned().unwrap_or_default();
                        s.reserved -= qty;
                        if commit {
                            s.committed += qty;
                        } else {
                            s.available += qty;
                        }
                        d.skus.insert(sku, s);
                    }
                    let mut r = r.clone();
                    if commit {
                        r.status = ReservationStatus::Committed;
                        d.event = Some(Outgoing::event(&StockCommitted {
                            order_id: order_id.clone(),
                        }));
                    } else {
                        r.status = ReservationStatus::Released;
                        d.event = Some(Outgoing::event(&StockReleased {
                            order_id: order_id.clone(),
                        }));
                    }
                    d.reservation = Some(r);
                }
                (ReservationStatus::Committed, true)
                | (
                    ReservationStatus::Released
                    | ReservationStatus::Cancelled
                    | ReservationStatus::Rejected,
                    false,
                ) => {}
                (status, _) => {
                    return Err(HandleError::Permanent(format!(
                        "cannot {} the reservation of {order_id}: it is {status:?}",
                        if commit { "commit" } else { "release" }
                    )))
                }
            }
        }
    }
    Ok(d)
}

fn sum_by_sku(items: &[LineItem]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i.sku.clone()).or_default() += i.qty as u64;
    }
    m
}

fn sku_key(sku: &str) -> String {
    format!("sku/{sku}")
}
fn reservation_key(order: &str) -> String {
    format!("reservation/{order}")
}

/// The stock component.
pub struct Stock;

impl Component for Stock {
    type Input = Input;
    fn name(&self) -> &'static str {
        "stock"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        Subscription::of::<Input>()
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Input, DecodeError> {
        Input::decode(msg_type, payload)
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Input,
        _: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let order_id = match input {
            Input::OrderPlaced(p) => Some(&p.order_id),
            Input::ReleaseStock(r) => Some(&r.order_id),
            Input::CommitStock(c) => Some(&c.order_id),
            Input::AddStock(_) => None,
        };
        let reservation: Option<Reservation> = match order_id {
            Some(id) => load(tx, &reservation_key(id))?,
            None => None,
        };
        let touched: Vec<String> = match input {
            Input::AddStock(a) => vec![a.sku.clone()],
            Input::OrderPlaced(p) => p.items.iter().map(|i| i.sku.clone()).collect(),
            _ => reservation
                .iter()
                .flat_map(|r| r.items.iter().map(|i| i.sku.clone()))
                .collect(),
        };
        let mut skus = BTreeMap::new();
        for sku in touched {
            if let Some(s) = load::<Sku>(tx, &sku_key(&sku))? {
                skus.insert(sku, s);
            }
        }
        let d = decide(&skus, reservation.as_ref(), input)?;
        for (sku, s) in &d.skus {
            save(tx, &sku_key(sku), s)?;
        }
        if let Some(r) = &d.reservation {
            save(tx, &reservation_key(&r.order_id), r)?;
        }
        Ok(d.event.into_iter().collect())
    }
}

pub fn components() -> Vec<Arc<dyn DynComponent>> {
    vec![Arc::new(Stock)]
}

pub const QUERIES: &[&str] = &["reservation", "stock", "summary"];

/// `reservation {"order_id"}`; `stock` -> every sku; `summary` -> every reservation's status
/// and the stock totals.
pub fn query(
    state: &dyn StateRead,
    name: &str,
    req: &[u8],
) -> Result<serde_json::Value, QueryError> {
    match name {
        "reservation" => {
            let id = runtime::request_field(req, "order_id")?;
            let r: Reservation = read(state, &reservation_key(&id))?.ok_or(QueryError::NotFound)?;
            Ok(serde_json::to_value(r).unwrap_or_default())
        }
        "stock" => Ok(serde_json::to_value(skus(state)?).unwrap_or_default()),
        "summary" => {
            let rs: Vec<Reservation> = read_all(state, "reservation/")?;
            let statuses: serde_json::Map<_, _> = rs
                .iter()
                .map(|r| (r.order_id.clone(), serde_json::json!(r.status)))
                .collect();
            Ok(serde_json::json!({ "reservations": statuses, "stock": skus(state)? }))
        }
        other => Err(QueryError::Unknown(other.into())),
    }
}

/// Invariant `stock` (`ContextBuilder::invariant`): per SKU, added = available + reserved +
/// committed, and what is reserved is what the open reservations hold.
pub fn stock_conserved(state: &dyn StateRead) -> Result<Check, QueryError> {
    let mut c = Check::default();
    let mut held: BTreeMap<String, u64> = BTreeMap::new();
    let reservations: Vec<Reservation> = read_all(state, "reservation/")?;
    for r in reservations
        .iter()
        .filter(|r| r.status == ReservationStatus::Reserved)
    {
        for item in &r.items {
            *held.entry(item.sku.clone()).or_default() += u64::from(item.qty);
        }
    }
    for (sku, s) in skus(state)? {
        c.checked += 1;
        if s.added != s.available + s.reserved + s.committed {
            c.violations.push(format!(
                "sku {sku}: added {} != available {} + reserved {} + committed {}",
                s.added, s.available, s.reserved, s.committed
            ));
        }
        let open = held.remove(&sku).unwrap_or(0);
        if s.reserved != open {
            c.violations.push(format!(
                "sku {sku}: {} reserved, but the open reservations hold {open}",
                s.reserved
            ));
        }
    }
    for (sku, open) in held {
        c.violations.push(format!(
            "sku {sku}: open reservations hold {open} of an unknown sku"
        ));
    }
    Ok(c)
}

fn skus(state: &dyn StateRead) -> Result<BTreeMap<String, Sku>, QueryError> {
    let mut m = BTreeMap::new();
    for (k, v) in state
        .scan_prefix("sku/")
        .map_err(|e| QueryError::Store(e.to_string()))?
    {
        let s: Sku = serde_json::from_slice(&v).map_err(|e| QueryError::Store(e.to_string()))?;
        m.insert(k.trim_start_matches("sku/").to_string(), s);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::component::testing::Harness;

    fn placed(order: &str, sku: &str, qty: u32) -> OrderPlaced {
        OrderPlaced {
            order_id: order.into(),
            customer_id: "c".into(),
            items: vec![LineItem {
                sku: sku.into(),
                qty,
                unit_price_cents: 1,
            }],
            total_cents: qty as u64,
            payment_method: "card".into(),
        }
    }
    fn release(order: &str) -> ReleaseStock {
        ReleaseStock {
            order_id: order.into(),
        }
    }
    fn commit(order: &str) -> CommitStock {
        CommitStock {
            order_id: order.into(),
        }
    }

    /// Stock with `n` units of `sku` added.
    fn stock(sku: &str, n: u64) -> Harness<Stock> {
        let mut h = Harness::new(Stock);
        let added = AddStock {
            sku: sku.into(),
            qty: n,
        };
        assert_eq!(h.receive(added).unwrap()[0].msg_type, "StockAdded");
        h
    }
    fn sku(h: &Harness<Stock>, sku: &str) -> Sku {
        h.state::<Sku>(&sku_key(sku)).unwrap_or_default()
    }
    fn reservation(h: &Harness<Stock>, order: &str) -> Option<Reservation> {
        h.state(&reservation_key(order))
    }
    fn conserved(s: &Sku) -> bool {
        s.added == s.available + s.reserved + s.committed
    }

    #[test]
    fn the_stock_invariant_reports_units_no_open_reservation_holds() {
        let mut h = stock("a", 5);
        h.receive(placed("o1", "a", 2)).unwrap();
        let c = stock_conserved(h.reader()).unwrap();
        assert_eq!(
            (c.checked, c.violations.len()),
            (1, 0),
            "{:?}",
            c.violations
        );
        // The reservation is gone (say, a bug released it without giving the units back).
        h.put::<Reservation>(&reservation_key("o1"), None);
        let c = stock_conserved(h.reader()).unwrap();
        assert_eq!(
            c.violations,
            ["sku a: 2 reserved, but the open reservations hold 0"]
        );
    }

    #[test]
    fn reserves_when_enough_and_conserves() {
        let mut h = stock("a", 5);
        let out = h.receive(placed("o1", "a", 3)).unwrap();
        assert_eq!(out[0].msg_type, "StockReserved");
        let s = sku(&h, "a");
        assert_eq!((s.available, s.reserved), (2, 3));
        assert!(conserved(&s));
    }

    #[test]
    fn rejects_when_short_and_changes_nothing() {
        let mut h = stock("a", 2);
        let out = h.receive(placed("o1", "a", 3)).unwrap();
        assert_eq!(out[0].msg_type, "StockRejected");
        assert_eq!(sku(&h, "a").available, 2);
        let r = reservation(&h, "o1").unwrap();
        assert_eq!(r.status, ReservationStatus::Rejected);
    }

    #[test]
    fn release_and_commit_move_reserved_stock() {
        let mut h = stock("a", 5);
        h.receive(placed("o1", "a", 3)).unwrap();
        h.receive(placed("o2", "a", 2)).unwrap();
        h.receive(release("o1")).unwrap();
        let s = sku(&h, "a");
        assert_eq!((s.available, s.reserved), (3, 2));
        assert!(conserved(&s));
        h.receive(commit("o2")).unwrap();
        let s = sku(&h, "a");
        assert_eq!((s.committed, s.reserved), (2, 0));
        assert!(conserved(&s));
        // Repeats are no-ops.
        assert!(h.receive(commit("o2")).unwrap().is_empty());
        assert!(h.receive(release("o1")).unwrap().is_empty());
        assert_eq!(sku(&h, "a"), s);
        // A committed reservation cannot be released.
        let refused = h.receive(release("o2"));
        assert!(matches!(refused, Err(HandleError::Permanent(_))));
    }

    #[test]
    fn release_before_reservation_cancels_it_for_good() {
        let mut h = stock("a", 5);
        let out = h.receive(release("o1")).unwrap();
        assert_eq!(out[0].msg_type, "StockReleased");
        let r = reservation(&h, "o1").unwrap();
        assert_eq!(r.status, ReservationStatus::Cancelled);
        // The late OrderPlaced reserves nothing.
        assert!(h.receive(placed("o1", "a", 3)).unwrap().is_empty());
        assert_eq!(sku(&h, "a").available, 5);
        // Commit before a reservation waits.
        let c = h.receive(commit("o9"));
        assert!(matches!(c, Err(HandleError::Retry(_))));
    }

    #[test]
    fn order_placed_twice_reserves_once() {
        let mut h = stock("a", 5);
        h.receive(placed("o1", "a", 3)).unwrap();
        assert!(h.receive(placed("o1", "a", 3)).unwrap().is_empty());
        assert_eq!(sku(&h, "a").reserved, 3);
    }

    #[test]
    fn stock_without_a_sku_or_quantity_is_refused() {
        let mut h = Harness::new(Stock);
        let none = AddStock {
            sku: "a".into(),
            qty: 0,
        };
        assert!(matches!(h.receive(none), Err(HandleError::Permanent(_))));
        assert_eq!(sku(&h, "a"), Sku::default());
    }
}
