//! `choreo verify`: checks every invariant a running context declares
//! (`ContextBuilder::invariant`, reported as `<context>.<name>`), whatever the application,
//! and, when a node hosts the shop's orders context, asks every shop context (and the
//! external systems' ledgers) for its view and checks the shop's invariants across them.
//! Run it after the traffic has drained.
//!
//! The shop's cross-context invariants, each counted separately:
//! - terminal: every order is Completed or Cancelled;
//! - agreement: the fulfilment saga, inventory, payments and shipping agree with the order's
//!   state;
//! - money: a completed order's payment is captured in full; a cancelled order has nothing
//!   captured; per payment captured + voided = authorized;
//! - stock: per sku, added = the quantities of the distinct `AddStock` commands in the
//!   inventory stream that were not dead-lettered (a replayed command applied twice adds
//!   twice); conservation within inventory (added = available + reserved + committed, the
//!   reserved units are what the open reservations hold) is inventory's own declared
//!   invariant, `inventory.stock`, always checked with these;
//! - once: the gateway and carrier performed each effect at most once per order, and a
//!   completed order exactly one capture and one dispatch.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use runtime::wire::bus::Bus;
use serde::Serialize;
use serde_json::Value;

use crate::client;

pub use runtime::context::Check;

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Whether the shop's cross-context invariants were checked (and the order counts set).
    pub shop: bool,
    pub orders: usize,
    pub completed: usize,
    pub cancelled: usize,
    /// By name: the shop's (`terminal`, `money`, ...) and each context's declared
    /// invariants (`<context>.<name>`).
    pub checks: BTreeMap<String, Check>,
    /// Whether the external systems' ledgers were reachable (they are in-memory simulators).
    pub ledgers_checked: bool,
}

impl VerifyReport {
    pub fn violations(&self) -> usize {
        self.checks.values().map(|c| c.violations.len()).sum()
    }

    pub fn print(&self) {
        if self.shop {
            println!(
                "orders: {} (completed {}, cancelled {})",
                self.orders, self.completed, self.cancelled
            );
        } else {
            println!("the shop's invariants: not checked (no node hosts its orders context)");
        }
        let width = self
            .checks
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(10);
        for (name, c) in &self.checks {
            println!(
                "  {name:<width$} checked {:>6}  violations {}",
                c.checked,
                c.violations.len()
            );
            for v in c.violations.iter().take(10) {
                println!("      {v}");
            }
        }
        if self.shop && !self.ledgers_checked {
            println!("  (external ledgers not reachable: `once` checked from the contexts only)");
        }
        println!(
            "{}",
            if self.violations() == 0 {
                "verify: OK"
            } else {
                "verify: VIOLATIONS"
            }
        );
    }
}

fn check<'a>(r: &'a mut VerifyReport, name: &str) -> &'a mut Check {
    r.checks.entry(name.to_string()).or_default()
}

fn statuses(v: &Value, field: &str) -> HashMap<String, String> {
    v[field]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, s)| (k.clone(), s.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Inventory's declared stock invariant, as the report names it.
const INVENTORY_STOCK: &str = "inventory.stock";

/// How long discovery waits for running nodes to answer.
pub const DISCOVERY_WAIT: Duration = Duration::from_secs(1);

/// The shop's invariants and the declared invariants of every running context. `only`
/// restricts the per-order checks to order ids starting with that prefix (one load run);
/// stock is always global.
pub async fn run(bus: &Bus, only: Option<&str>) -> anyhow::Result<VerifyReport> {
    let running = runtime::client::discover(bus, DISCOVERY_WAIT).await?;
    let mut r = declared(bus, &running).await;
    shop(bus, only, &mut r).await?;
    Ok(r)
}

/// `choreo verify`: the declared invariants of every running context, and the shop's when
/// a running node hosts its orders context (so any application's nodes can be verified).
pub async fn run_any(bus: &Bus, only: Option<&str>) -> anyhow::Result<VerifyReport> {
    let running = runtime::client::discover(bus, DISCOVERY_WAIT).await?;
    anyhow::ensure!(
        !running.is_empty(),
        "no running node answered (`choreo contexts`)"
    );
    let mut r = declared(bus, &running).await;
    if running.iter().any(|c| c.context == "orders") {
        shop(bus, only, &mut r).await?;
    }
    Ok(r)
}

/// Each declared invariant of the `running` contexts; one that cannot be checked is a
/// violation (verify must not pass for want of an answer).
async fn declared(bus: &Bus, running: &[runtime::client::RunningContext]) -> VerifyReport {
    let mut r = VerifyReport::default();
    for i in runtime::client::invariants(bus, running).await {
        r.checks
            .insert(format!("{}.{}", i.context, i.name), counted(i.outcome));
    }
    r
}

/// An invariant's outcome as a check: one that could not be checked is a violation.
fn counted(outcome: Result<Check, String>) -> Check {
    outcome.unwrap_or_else(|e| Check {
        checked: 0,
        violations: vec![format!("could not be checked: {e}")],
    })
}

/// Collects every shop context's view and checks the shop's invariants into `r`.
async fn shop(bus: &Bus, only: Option<&str>, r: &mut VerifyReport) -> anyhow::Result<()> {
    let orders = client::query(bus, "orders", "summary", Value::Null).await?;
    let sagas = client::saga(
        bus,
        sagas::order_fulfilment::NAME,
        "list",
        serde_json::json!({}),
    )
    .await?;
    let inv = client::query(bus, "inventory", "summary", Value::Null).await?;
    let pay = client::query(bus, "payments", "summary", Value::Null).await?;
    let ship = client::query(bus, "shipping", "summary", Value::Null).await?;
    let gateway = client::query_external(bus, "payment-gateway").await.ok();
    let carrier = client::query_external(bus, "carrier").await.ok();

    let order_status = statuses(&orders, "statuses");
    let saga_status: HashMap<String, String> = sagas["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["id"].as_str().unwrap_or("").to_string(),
                        i["status"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let reservations = statuses(&inv, "reservations");
    let shipments = statuses(&ship, "shipments");
    let payments = pay["payments"].as_object().cloned().unwrap_or_default();
    r.shop = true;
    r.ledgers_checked = gateway.is_some() && carrier.is_some();
    for name in ["terminal", "agreement", "money", "stock", "once"] {
        check(r, name);
    }

    let mut ids: Vec<&String> = order_status
        .keys()
        .filter(|id| only.is_none_or(|p| id.starts_with(p)))
        .collect();
    ids.sort();
    r.orders = ids.len();
    for id in ids {
        let st = order_status[id].as_str();
        let c = check(r, "terminal");
        c.checked += 1;
        let completed = match st {
            "Completed" => true,
            "Cancelled" => false,
            other => {
                c.violations.push(format!("order {id} is {other}"));
                continue;
            }
        };
        if completed {
            r.completed += 1
        } else {
            r.cancelled += 1
        }

        let c = check(r, "agreement");
        c.checked += 1;
        // An ended order's saga instance may be gone already: removed after its retention
        // (`store.saga_retention`). An order ends only by its saga's command, so a missing
        // instance of an ended order is not a disagreement.
        let saga = saga_status.get(id).map(String::as_str).unwrap_or(st);
        if saga != st {
            c.violations
                .push(format!("order {id} is {st} but its saga is {saga}"));
        }
        let res = reservations
            .get(id)
            .map(String::as_str)
            .unwrap_or("missing");
        let res_ok = if completed {
            res == "Committed"
        } else {
            matches!(res, "Rejected" | "Released" | "Cancelled")
        };
        if !res_ok {
            c.violations.push(format!(
                "order {id} is {st} but its stock reservation is {res}"
            ));
        }
        let sh = shipments.get(id).map(String::as_str).unwrap_or("none");
        let sh_ok = if completed {
            sh == "Dispatched"
        } else {
            matches!(sh, "none" | "Failed" | "Cancelled" | "Recalled")
        };
        if !sh_ok {
            c.violations
                .push(format!("order {id} is {st} but its shipment is {sh}"));
        }

        let c = check(r, "money");
        c.checked += 1;
        let p = payments.get(id).cloned().unwrap_or(Value::Null);
        let pst = p["status"].as_str().unwrap_or("missing");
        let amount = p["amount_cents"].as_u64().unwrap_or(0);
        let captured = p["captured_cents"].as_u64().unwrap_or(0);
        let voided = p["voided_cents"].as_u64().unwrap_or(0);
        if completed && (pst != "Captured" || captured != amount) {
            c.violations.push(format!(
                "completed order {id}: payment {pst}, captured {captured} of {amount}"
            ));
        }
        if !completed && (captured != 0 || !matches!(pst, "Declined" | "Voided" | "Cancelled")) {
            c.violations.push(format!(
                "cancelled order {id}: payment {pst}, captured {captured}"
            ));
        }
        if !p["auth_id"].is_null()
            && captured + voided != amount
            && matches!(pst, "Captured" | "Voided")
        {
            c.violations.push(format!(
                "order {id}: captured {captured} + voided {voided} != authorized {amount}"
            ));
        }

        if let (Some(g), Some(cr)) = (&gateway, &carrier) {
            let c = check(r, "once");
            c.checked += 1;
            let ge = &g["effects"][id];
            let ce = &cr["effects"][id];
            let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
            for (what, count) in [
                ("authorized", n(ge, "authorized")),
                ("captured", n(ge, "captured")),
                ("voided", n(ge, "voided")),
                ("dispatched", n(ce, "dispatched")),
            ] {
                if count > 1 {
                    c.violations
                        .push(format!("order {id}: {what} {count} times"));
                }
            }
            if completed && (n(ge, "captured") != 1 || n(ce, "dispatched") != 1) {
                c.violations.push(format!(
                    "completed order {id}: {} captures, {} dispatches",
                    n(ge, "captured"),
                    n(ce, "dispatched")
                ));
            }
            if !completed && n(ge, "captured") != 0 {
                c.violations
                    .push(format!("cancelled order {id}: captured at the gateway"));
            }
            if !completed && n(ce, "dispatched") != n(ce, "recalled") {
                c.violations
                    .push(format!("cancelled order {id}: dispatched and not recalled"));
            }
            if n(ge, "authorized") != n(ge, "captured") + n(ge, "voided") {
                c.violations.push(format!(
                    "order {id}: gateway authorization neither captured nor voided"
                ));
            }
        }
    }

    // Stock conservation is global, per sku and against the open reservations: inventory's
    // own invariant, asked of its node here if discovery did not list it.
    if !r.checks.contains_key(INVENTORY_STOCK) {
        let declared = runtime::client::invariant(bus, "inventory", "stock").await;
        r.checks
            .insert(INVENTORY_STOCK.to_string(), counted(declared));
    }
    // Across the bus: the stock added is what the distinct AddStock commands sent add.
    let stock = inv["stock"].as_object().cloned().unwrap_or_default();
    let c = check(r, "stock");
    if let Some(sent) = stock_sent(bus).await? {
        for (sku, qty) in &sent {
            c.checked += 1;
            let added = stock
                .get(sku)
                .and_then(|s| s["added"].as_u64())
                .unwrap_or(0);
            if added != *qty {
                c.violations.push(format!(
                    "sku {sku}: added {added}, but the distinct AddStock commands sent add {qty}"
                ));
            }
        }
    }
    Ok(())
}

/// One message as stored in a stream: its `Choreo-Id` and `Choreo-Type` headers (empty if
/// absent), whether its whole envelope reads, and its payload.
#[derive(Debug, Clone)]
struct Stored {
    id: String,
    msg_type: String,
    envelope_ok: bool,
    payload: Bytes,
}

impl Stored {
    fn from_message(m: &async_nats::jetstream::Message) -> Stored {
        use runtime::wire::envelope::{headers, Envelope};
        let h = m.headers.as_ref();
        let get = |name: &str| {
            h.and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        Stored {
            id: get(headers::ID),
            msg_type: get(headers::TYPE),
            envelope_ok: Envelope::from_headers(h).is_ok(),
            payload: m.payload.clone(),
        }
    }
}

/// Per sku, the quantity the distinct (by `Choreo-Id`) well-formed `AddStock` commands in
/// the inventory stream add; `None` if the stream no longer holds all of them.
///
/// A command the inventory node dead-lettered (oversized, its type not matching the
/// subject, a handler's permanent rejection, a failure past the retry budget) had no effect
/// and does not count: each `AddStock` dead letter in `CHOREO_DLQ` (which keeps the original
/// `Choreo-Id`, `Choreo-Type` and payload) takes out one stored copy that matches it. A
/// replayed dead letter is removed from the dead-letter stream and stored again, so its new
/// copy counts. A dead letter discarded with `choreo dlq discard` leaves no trace here: a
/// discarded well-formed `AddStock` counts as sent.
async fn stock_sent(bus: &Bus) -> anyhow::Result<Option<BTreeMap<String, u64>>> {
    use runtime::wire::envelope::headers;
    use runtime::wire::subjects;
    let subject = subjects::command(inventory::CONTEXT, "AddStock");
    let mut stream = bus
        .js
        .get_stream(subjects::stream(inventory::CONTEXT))
        .await?;
    if stream.info().await?.state.first_sequence > 1 {
        return Ok(None);
    }
    let sent = read_all(&mut stream, &subject).await?;
    let mut dead = Vec::new();
    if let Ok(mut dlq) = bus.js.get_stream(subjects::dlq_stream()).await {
        let context_dlq = subjects::dead_letter(inventory::CONTEXT);
        for m in read_all_messages(&mut dlq, &context_dlq).await? {
            let original = m
                .headers
                .as_ref()
                .and_then(|h| h.get(headers::DLQ_SUBJECT))
                .is_some_and(|s| s.as_str() == subject);
            if original {
                dead.push(Stored::from_message(&m));
            }
        }
    }
    Ok(Some(distinct_stock(&sent, &dead)))
}

/// The stored copies in `sent` that count, after each dead letter in `dead` took out the
/// first copy with its id, type and payload; per sku, the quantities of the distinct
/// (first by id) well-formed `AddStock` commands among them.
fn distinct_stock(sent: &[Stored], dead: &[Stored]) -> BTreeMap<String, u64> {
    let key = |s: &Stored| (s.id.clone(), s.msg_type.clone(), s.payload.clone());
    let mut dead_left: HashMap<(String, String, Bytes), usize> = HashMap::new();
    for d in dead {
        *dead_left.entry(key(d)).or_default() += 1;
    }
    let mut seen = std::collections::HashSet::new();
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for s in sent {
        if let Some(n) = dead_left.get_mut(&key(s)).filter(|n| **n > 0) {
            *n -= 1;
            continue;
        }
        if !s.envelope_ok || s.msg_type != "AddStock" {
            continue;
        }
        let Ok(cmd) = serde_json::from_slice::<inventory::AddStock>(&s.payload) else {
            continue;
        };
        if cmd.qty > 0 && !cmd.sku.trim().is_empty() && seen.insert(s.id.clone()) {
            *out.entry(cmd.sku).or_default() += cmd.qty;
        }
    }
    out
}

/// Every message of `stream` on `subject`, oldest first, as [`Stored`].
async fn read_all(
    stream: &mut async_nats::jetstream::stream::Stream,
    subject: &str,
) -> anyhow::Result<Vec<Stored>> {
    Ok(read_all_messages(stream, subject)
        .await?
        .iter()
        .map(Stored::from_message)
        .collect())
}

/// Every message of `stream` on `subject`, oldest first.
async fn read_all_messages(
    stream: &mut async_nats::jetstream::stream::Stream,
    subject: &str,
) -> anyhow::Result<Vec<async_nats::jetstream::Message>> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    if stream.info().await?.state.messages == 0 {
        return Ok(Vec::new());
    }
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.to_string(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut msgs = c.messages().await?;
    let mut out = Vec::new();
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_millis(500), msgs.next()).await;
        let Ok(Some(Ok(m))) = next else { break };
        let last = m.info().is_ok_and(|i| i.pending == 0);
        out.push(m);
        if last {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: &str, msg_type: &str, sku: &str, qty: u64) -> Stored {
        Stored {
            id: id.into(),
            msg_type: msg_type.into(),
            envelope_ok: true,
            payload: Bytes::from(serde_json::json!({ "sku": sku, "qty": qty }).to_string()),
        }
    }

    #[test]
    fn distinct_commands_count_once_each() {
        let sent = [add("a", "AddStock", "s", 2), add("a", "AddStock", "s", 2)];
        let got = distinct_stock(&sent, &[]);
        assert_eq!(got.get("s"), Some(&2));
    }

    #[test]
    fn a_dead_lettered_copy_does_not_count() {
        let valid = add("a", "AddStock", "s", 1);
        let oversized = add("b", "AddStock", "s", 7);
        let sent = [valid.clone(), oversized.clone()];
        assert_eq!(distinct_stock(&sent, &[oversized]).get("s"), Some(&1));
    }

    #[test]
    fn a_type_not_matching_the_subject_does_not_count() {
        let sent = [
            add("a", "AddStock", "s", 1),
            add("b", "CommitStock", "s", 5),
        ];
        assert_eq!(distinct_stock(&sent, &[]).get("s"), Some(&1));
    }

    #[test]
    fn a_replayed_dead_letter_counts_once() {
        // Stored, dead-lettered, replayed: the dead letter is gone and a second copy is
        // stored; the command counts once.
        let once = add("a", "AddStock", "s", 3);
        let sent = [once.clone(), once.clone()];
        assert_eq!(distinct_stock(&sent, &[]).get("s"), Some(&3));
        // Not replayed yet: one stored copy, its dead letter; nothing counts.
        assert_eq!(distinct_stock(&sent[..1], &[once]).get("s"), None);
    }

    #[test]
    fn a_dead_letter_takes_out_one_copy_only() {
        // The same command stored twice (outside the duplicate window), one copy
        // dead-lettered after its retry budget, the other handled: it counts.
        let twice = add("a", "AddStock", "s", 4);
        let sent = [twice.clone(), twice.clone()];
        assert_eq!(distinct_stock(&sent, &[twice]).get("s"), Some(&4));
    }
}
