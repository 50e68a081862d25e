//! `choreo sim`: the external systems of the shop, simulated over NATS request/reply.
//!
//! - payment gateway: `choreo.ext.payment-gateway.{authorize,capture,void,cancel-authorization}`
//!   (`cancel-authorization` voids by the authorize key and refuses that key from then on);
//! - carrier:         `choreo.ext.carrier.{dispatch,recall}`;
//! - both answer `...stats` with the effects they performed, per order, and take
//!   `...control {"failure_rate", "latency_ms"}` to change their behaviour at run time.
//!
//! Each request carries an `idempotency_key`: the first request with a key acts and its
//! reply is remembered; a repeat gets the same reply and acts no more (as real gateways
//! do). Effects are counted per order and operation, so a caller that sent two different
//! keys for one capture would show up as two captures. Latency and a failure rate (replies
//! `{"error": ...}` without acting) are settable; the payment method `card_declined` is
//! refused, and an address containing `nowhere` is undeliverable.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use runtime::wire::subjects;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub payment_latency: Duration,
    pub payment_failure_rate: f64,
    pub carrier_latency: Duration,
    pub carrier_failure_rate: f64,
    pub seed: u64,
}

/// Effects performed for one order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effects {
    pub authorized: u32,
    pub authorized_cents: u64,
    pub declined: u32,
    pub captured: u32,
    pub captured_cents: u64,
    pub voided: u32,
    pub dispatched: u32,
    pub recalled: u32,
    pub refused: u32,
}

#[derive(Default)]
struct Ledger {
    replies: HashMap<String, Value>,
    effects: BTreeMap<String, Effects>,
    auths: HashMap<String, (String, u64, &'static str)>,
    /// Authorize keys cancelled by reference: a later authorize with one is refused.
    cancelled_keys: std::collections::HashSet<String>,
    requests: u64,
    repeats: u64,
    failures: u64,
}

struct Sim {
    cfg: Mutex<SimConfig>,
    ledger: Mutex<Ledger>,
    rng: Mutex<fastrand::Rng>,
}

/// Serves both systems until the connection closes.
pub async fn run(client: async_nats::Client, cfg: SimConfig) -> anyhow::Result<()> {
    let sim = Arc::new(Sim {
        rng: Mutex::new(fastrand::Rng::with_seed(cfg.seed)),
        cfg: Mutex::new(cfg),
        ledger: Mutex::default(),
    });
    let mut subs = futures::stream::select(
        client
            .queue_subscribe(subjects::external("payment-gateway", "*"), "sim".into())
            .await?,
        client
            .queue_subscribe(subjects::external("carrier", "*"), "sim".into())
            .await?,
    );
    tracing::info!("simulators ready: payment-gateway, carrier");
    while let Some(req) = subs.next().await {
        let Some(reply_to) = req.reply.clone() else {
            continue;
        };
        let (sim, client) = (sim.clone(), client.clone());
        tokio::spawn(async move {
            let reply = sim.answer(&req.subject, &req.payload).await;
            let _ = client.publish(reply_to, reply.to_string().into()).await;
        });
    }
    Ok(())
}

impl Sim {
    async fn answer(&self, subject: &str, payload: &[u8]) -> Value {
        let mut parts = subject.rsplitn(2, '.');
        let op = parts.next().unwrap_or("");
        let system = parts.next().unwrap_or("").rsplit('.').next().unwrap_or("");
        if op == "stats" {
            return self.stats();
        }
        if op == "control" {
            return self.control(system, payload);
        }
        let (latency, failure_rate) = {
            let c = self.cfg.lock().expect("sim config");
            match system {
                "payment-gateway" => (c.payment_latency, c.payment_failure_rate),
                "carrier" => (c.carrier_latency, c.carrier_failure_rate),
                _ => return json!({"error": format!("unknown system {system}")}),
            }
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let req: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => return json!({"error": format!("bad request: {e}")}),
        };
        let s = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let key = s("idempotency_key");
        let order = s("order_id");
        if key.is_empty() || order.is_empty() {
            return json!({"error": "idempotency_key and order_id are required"});
        }
        let fail = failure_rate > 0.0 && self.rng.lock().expect("rng").f64() < failure_rate;
        let mut l = self.ledger.lock().expect("ledger");
        l.requests += 1;
        if fail {
            l.failures += 1;
            return json!({"error": format!("{system} unavailable (simulated)")});
        }
        if let Some(r) = l.replies.get(&key) {
            let r = r.clone();
            l.repeats += 1;
            return r;
        }
        let reply = match (system, op) {
            ("payment-gateway", "authorize") => {
                let amount = req.get("amount_cents").and_then(Value::as_u64).unwrap_or(0);
                let cancelled = l.cancelled_keys.contains(&key);
                let e = l.effects.entry(order.clone()).or_default();
                if cancelled {
                    e.declined += 1;
                    json!({"approved": false, "reason": "cancelled"})
                } else if s("payment_method") == "card_declined" {
                    e.declined += 1;
                    json!({"approved": false, "reason": "card_declined"})
                } else {
                    e.authorized += 1;
                    e.authorized_cents += amount;
                    let auth_id = format!("auth-{}", l.replies.len() + 1);
                    l.auths
                        .insert(auth_id.clone(), (order.clone(), amount, "authorized"));
                    json!({"approved": true, "auth_id": auth_id})
                }
            }
            ("payment-gateway", "cancel-authorization") => {
                let auth_key = s("authorize_key");
                l.cancelled_keys.insert(auth_key.clone());
                let auth_id = l
                    .replies
                    .get(&auth_key)
                    .and_then(|r| r["auth_id"].as_str())
                    .map(str::to_string);
                match auth_id.as_ref().and_then(|a| l.auths.get(a).cloned()) {
                    Some((o, amount, "authorized")) => {
                        let auth_id = auth_id.unwrap_or_default();
                        l.auths.insert(auth_id.clone(), (o, amount, "voided"));
                        l.effects.entry(order.clone()).or_default().voided += 1;
                        json!({"ok": true, "auth_id": auth_id, "voided_cents": amount})
                    }
                    _ => json!({"ok": true, "voided_cents": 0}),
                }
            }
            ("payment-gateway", "capture" | "void") => {
                let auth_id = s("auth_id");
                let done = if op == "capture" {
                    "captured"
                } else {
                    "voided"
                };
                match l.auths.get(&auth_id).cloned() {
                    // Already in the requested state: done, nothing more happens.
                    Some((o, _, state)) if o == order && state == done => json!({"ok": true}),
                    Some((o, amount, "authorized")) if o == order => {
                        let capture = op == "capture";
                        l.auths.insert(
                            auth_id,
                            (o, amount, if capture { "captured" } else { "voided" }),
                        );
                        let e = l.effects.entry(order.clone()).or_default();
                        if capture {
                            e.captured += 1;
                            e.captured_cents += amount;
                        } else {
                            e.voided += 1;
                        }
                        json!({"ok": true})
                    }
                    Some((_, _, state)) => {
                        json!({"ok": false, "reason": format!("authorization is {state}")})
                    }
                    None => json!({"ok": false, "reason": "unknown authorization"}),
                }
            }
            ("carrier", "recall") => {
                let e = l.effects.entry(order.clone()).or_default();
                if e.dispatched > e.recalled {
                    e.recalled += 1;
                    json!({"ok": true})
                } else {
                    json!({"ok": false, "reason": "nothing dispatched to recall"})
                }
            }
            ("carrier", "dispatch") => {
                let e = l.effects.entry(order.clone()).or_default();
                if s("address").contains("nowhere") {
                    e.refused += 1;
                    json!({"accepted": false, "reason": "undeliverable address"})
                } else {
                    e.dispatched += 1;
                    json!({"accepted": true, "tracking": format!("TRK-{}", l.replies.len() + 1)})
                }
            }
            _ => return json!({"error": format!("unknown operation {system}.{op}")}),
        };
        l.replies.insert(key, reply.clone());
        reply
    }

    /// `choreo.ext.<system>.control {"failure_rate"?, "latency_ms"?}`: changes the system's
    /// behaviour at run time (outages and slowness for tests and demos); answers the settings.
    fn control(&self, system: &str, payload: &[u8]) -> Value {
        let req: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let mut c = self.cfg.lock().expect("sim config");
        let c = &mut *c;
        let (latency, rate) = match system {
            "payment-gateway" => (&mut c.payment_latency, &mut c.payment_failure_rate),
            "carrier" => (&mut c.carrier_latency, &mut c.carrier_failure_rate),
            _ => return json!({"error": format!("unknown system {system}")}),
        };
        if let Some(r) = req.get("failure_rate").and_then(Value::as_f64) {
            if !(0.0..=1.0).contains(&r) {
                return json!({"error": "failure_rate must be within 0.0..=1.0"});
            }
            *rate = r;
        }
        if let Some(ms) = req.get("latency_ms").and_then(Value::as_u64) {
            *latency = Duration::from_millis(ms);
        }
        tracing::info!(
            system,
            failure_rate = *rate,
            latency_ms = latency.as_millis() as u64,
            "simulator settings changed"
        );
        json!({"system": system, "failure_rate": *rate, "latency_ms": latency.as_millis() as u64})
    }

    fn stats(&self) -> Value {
        let l = self.ledger.lock().expect("ledger");
        json!({
            "requests": l.requests,
            "repeats_answered_from_memory": l.repeats,
            "simulated_failures": l.failures,
            "effects": l.effects,
        })
    }
}
