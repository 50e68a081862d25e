//! Where an order's time goes, stage by stage: the bench reads back every message a
//! fixed-rate phase stored and splits the time between two timestamps each message carries
//! (no extra instrumentation in the nodes):
//! - the envelope's `Choreo-Occurred-At` (ms), set when the handler decided to send it;
//! - JetStream's stored timestamp of the message.
//!
//! Per message type two stages: **to stream** (decided → stored: the rest of the batch
//! transaction, the group commit's flush and fsync, the relay's publish) and **from cause**
//! (the cause stored → this message decided: pull delivery, the consumer's queue, the
//! handler with its external calls). For the slowest orders it also names the one stage that
//! took longest on their causal chain (terminal event back to `PlaceOrder`), so a tail can
//! be told from a slow stage. `Occurred-At` has millisecond resolution; so do these figures.
//!
//! A message handled in the node before its cause reached its stream (a context's message
//! to itself, handled in the transaction that wrote it: `runtime::pipeline::chain`) is
//! decided before its cause is stored: such a message is counted as `in_node`, its "from
//! cause" is measured from the cause's decision instead, and on the causal chain the cause's
//! way to its stream is off the path (the stage shows as "from X in node").

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use async_nats::jetstream::consumer;
use choreo::client::stream_tip;
use choreo::load::quantile;
use runtime::wire::bus::Bus;
use runtime::wire::envelope::Envelope;
use runtime::wire::subjects;

/// One stored message, as the stages need it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub causation: String,
    pub correlation: String,
    pub msg_type: String,
    pub source: String,
    pub occurred_ms: u64,
    /// JetStream's stored timestamp, ns since the epoch.
    pub stored_ns: i128,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
}

/// The two stages of one message type sent by one context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub source: String,
    pub msg_type: String,
    pub messages: usize,
    /// Decided (Occurred-At) → stored in its stream, ms.
    pub to_stream_ms: Spread,
    /// Cause stored → this message decided, ms (messages whose cause is in the phase); for
    /// those decided before their cause was stored, cause decided → this one decided.
    pub from_cause_ms: Option<Spread>,
    /// Messages decided before their cause was stored: delivered in the node.
    #[serde(default)]
    pub in_node: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stages {
    pub stages: Vec<Stage>,
    /// Orders at or above the phase's p99 (stored `PlaceOrder` → stored terminal event).
    pub slowest_orders: usize,
    /// For each of those, the stage that took longest on its causal chain, counted.
    pub slowest_by_stage: BTreeMap<String, usize>,
}

/// Each context stream's last sequence: what a phase adds comes after it.
pub async fn mark(bus: &Bus) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut marks = BTreeMap::new();
    for ctx in choreo::contexts::KNOWN {
        let name = subjects::stream(ctx);
        let (_, last) = stream_tip(bus, &name).await?;
        marks.insert(name, last);
    }
    Ok(marks)
}

/// Every message stored after `marks` (up to each stream's last sequence now); messages
/// without a readable envelope are skipped.
pub async fn read_since(bus: &Bus, marks: &BTreeMap<String, u64>) -> anyhow::Result<Vec<Stored>> {
    let mut out = Vec::new();
    for (name, &from) in marks {
        let (stream, last) = stream_tip(bus, name).await?;
        if last <= from {
            continue;
        }
        let mut messages = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                ..Default::default()
            })
            .await
            .context(name.clone())?
            .messages()
            .await
            .context(name.clone())?;
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next());
            let m = match next.await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => anyhow::bail!("{name}: {e}"),
                Ok(None) | Err(_) => anyhow::bail!("{name}: stopped before sequence {last}"),
            };
            let info = m.info().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let (seq, stored_ns) = (info.stream_sequence, info.published.unix_timestamp_nanos());
            if let Ok(env) = Envelope::from_headers(m.headers.as_ref()) {
                out.push(Stored {
                    id: env.id,
                    causation: env.causation_id,
                    correlation: env.correlation_id,
                    msg_type: env.msg_type,
                    source: env.source,
                    occurred_ms: env.occurred_at_ms,
                    stored_ns,
                });
            }
            if seq >= last {
                break;
            }
        }
    }
    Ok(out)
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        p50: quantile(&v, 0.50),
        p99: quantile(&v, 0.99),
    }
}

/// The stages of `messages`; an order starts at its stored `start` message and ends at its
/// stored message of one of the `ends` types.
pub fn analyze(messages: &[Stored], start: &str, ends: &[&str]) -> Stages {
    let by_id: HashMap<&str, &Stored> = messages.iter().map(|m| (m.id.as_str(), m)).collect();
    // Both timestamps in whole ms (Occurred-At has no finer grain), so a difference is
    // never below zero for events in that order.
    let occurred = |m: &Stored| m.occurred_ms as i128;
    let stored = |m: &Stored| m.stored_ns.div_euclid(1_000_000);
    let cause_of = |m: &Stored| {
        by_id
            .get(m.causation.as_str())
            .copied()
            .filter(|c| c.id != m.id)
    };
    // Cause → effect: (ms, delivered in the node).
    let step = |m: &Stored, c: &Stored| {
        if occurred(m) < stored(c) {
            (occurred(m) - occurred(c), true)
        } else {
            (occurred(m) - stored(c), false)
        }
    };
    let mut to_stream: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let mut from_cause: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let mut in_node: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for m in messages {
        let key = (m.source.as_str(), m.msg_type.as_str());
        to_stream
            .entry(key)
            .or_default()
            .push((stored(m) - occurred(m)) as f64);
        if let Some(c) = cause_of(m) {
            let (took, local) = step(m, c);
            from_cause.entry(key).or_default().push(took as f64);
            *in_node.entry(key).or_default() += usize::from(local);
        }
    }
    let stages = to_stream
        .into_iter()
        .map(|((source, msg_type), v)| Stage {
            source: source.into(),
            msg_type: msg_type.into(),
            messages: v.len(),
            to_stream_ms: spread(v),
            from_cause_ms: from_cause.remove(&(source, msg_type)).map(spread),
            in_node: in_node.get(&(source, msg_type)).copied().unwrap_or(0),
        })
        .collect();

    // Orders by their stored start and end; the slowest 1% walked back along causation.
    let mut began: HashMap<&str, i128> = HashMap::new();
    let mut ended: HashMap<&str, &Stored> = HashMap::new();
    for m in messages {
        if m.msg_type == start {
            began.insert(&m.correlation, stored(m));
        } else if ends.contains(&m.msg_type.as_str()) {
            ended.insert(&m.correlation, m);
        }
    }
    let mut orders: Vec<(i128, &Stored)> = ended
        .iter()
        .filter_map(|(corr, end)| Some((stored(end) - began.get(corr)?, *end)))
        .collect();
    orders.sort_by_key(|(took, _)| std::cmp::Reverse(*took));
    let slowest = orders.len().div_ceil(100);
    let mut slowest_by_stage = BTreeMap::new();
    for (_, end) in orders.iter().take(slowest) {
        let mut longest: Option<(i128, String)> = None;
        let mut m = *end;
        let mut steps = 0;
        // The chain's end is stored; a cause its effect got in the node is not on the path
        // to its stream.
        let mut on_path = true;
        while let Some(c) = cause_of(m) {
            let (took, local) = step(m, c);
            let within = if local { " in node" } else { "" };
            let candidates = [
                on_path.then(|| {
                    (
                        stored(m) - occurred(m),
                        format!("{} {} to stream", m.source, m.msg_type),
                    )
                }),
                Some((
                    took,
                    format!("{} {} from {}{within}", m.source, m.msg_type, c.msg_type),
                )),
            ];
            for (took, stage) in candidates.into_iter().flatten() {
                if longest.as_ref().is_none_or(|(l, _)| took > *l) {
                    longest = Some((took, stage));
                }
            }
            on_path = !local;
            m = c;
            steps += 1;
            if steps > 1_000 {
                break; // a causation cycle: ids are unique, so only in broken input
            }
        }
        if let Some((_, stage)) = longest {
            *slowest_by_stage.entry(stage).or_default() += 1;
        }
    }
    Stages {
        stages,
        slowest_orders: slowest,
        slowest_by_stage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(
        id: &str,
        cause: &str,
        corr: &str,
        t: &str,
        src: &str,
        occ: u64,
        stored_ms: f64,
    ) -> Stored {
        Stored {
            id: id.into(),
            causation: cause.into(),
            correlation: corr.into(),
            msg_type: t.into(),
            source: src.into(),
            occurred_ms: occ,
            stored_ns: (stored_ms * 1e6) as i128,
        }
    }

    /// Order `o{i}`: PlaceOrder (client) → OrderPlaced (orders) → OrderCompleted (orders);
    /// `extra` ms are added to OrderPlaced's way to its stream.
    fn order(i: u64, extra: u64) -> Vec<Stored> {
        let (p, e, c) = (format!("p{i}"), format!("e{i}"), format!("c{i}"));
        let base = 1_000 * i;
        vec![
            msg(&p, &p, &p, "PlaceOrder", "client", base, base as f64 + 1.0),
            msg(
                &e,
                &p,
                &p,
                "OrderPlaced",
                "orders",
                base + 3,
                (base + 5 + extra) as f64,
            ),
            msg(
                &c,
                &e,
                &p,
                "OrderCompleted",
                "orders",
                base + 6 + extra,
                (base + 7 + extra) as f64,
            ),
        ]
    }

    #[test]
    fn stages_split_each_message_and_name_the_slow_stage_of_the_slowest_orders() {
        // 200 orders; three of them spend 40 ms more between OrderPlaced's decision and its
        // storing (a stalled flush, say): more than 1%, so the p99 shows it.
        let messages: Vec<Stored> = (0..200)
            .flat_map(|i| order(i, if [7, 107, 150].contains(&i) { 40 } else { 0 }))
            .collect();
        let s = analyze(
            &messages,
            "PlaceOrder",
            &["OrderCompleted", "OrderCancelled"],
        );
        let placed = s
            .stages
            .iter()
            .find(|s| s.msg_type == "OrderPlaced")
            .unwrap();
        assert_eq!((placed.source.as_str(), placed.messages), ("orders", 200));
        assert_eq!(
            placed.to_stream_ms,
            Spread {
                p50: 2.0,
                p99: 42.0
            }
        );
        // From PlaceOrder stored (base + 1) to OrderPlaced decided (base + 3).
        assert_eq!(placed.from_cause_ms, Some(Spread { p50: 2.0, p99: 2.0 }));
        let completed = s
            .stages
            .iter()
            .find(|s| s.msg_type == "OrderCompleted")
            .unwrap();
        assert_eq!(completed.to_stream_ms, Spread { p50: 1.0, p99: 1.0 });
        // The first message is its own cause: no "from cause" stage.
        let first = s
            .stages
            .iter()
            .find(|s| s.msg_type == "PlaceOrder")
            .unwrap();
        assert_eq!(first.from_cause_ms, None);
        // The slowest 1% of 200 orders are two of the slow ones, both blamed on that stage.
        assert_eq!(s.slowest_orders, 2);
        assert_eq!(
            s.slowest_by_stage,
            BTreeMap::from([("orders OrderPlaced to stream".to_string(), 2)])
        );
        assert_eq!(placed.in_node, 0);
    }

    #[test]
    fn a_message_delivered_in_the_node_is_timed_from_its_cause_decision_off_the_stream_path() {
        // OrderCompleted decided 1 ms after OrderPlaced was decided, before OrderPlaced was
        // stored (same-node delivery); in three orders that handling took 30 ms, while
        // OrderPlaced's way to its stream is slow (40 ms) in every order.
        let messages: Vec<Stored> = (0..100)
            .flat_map(|i| {
                let mut o = order(i, 40);
                let handling = if [3, 50, 99].contains(&i) { 30 } else { 1 };
                o[2].occurred_ms = o[1].occurred_ms + handling;
                o[2].stored_ns = (o[2].occurred_ms as i128 + 1) * 1_000_000;
                o
            })
            .collect();
        let s = analyze(&messages, "PlaceOrder", &["OrderCompleted"]);
        let completed = s
            .stages
            .iter()
            .find(|s| s.msg_type == "OrderCompleted")
            .unwrap();
        assert_eq!(completed.in_node, 100);
        assert_eq!(
            completed.from_cause_ms,
            Some(Spread {
                p50: 1.0,
                p99: 30.0
            })
        );
        // The slowest order (by stored end) is one of the three: its chain runs through the
        // in-node handling, not through OrderPlaced's 42 ms to its stream.
        assert_eq!(s.slowest_orders, 1);
        assert_eq!(
            s.slowest_by_stage,
            BTreeMap::from([(
                "orders OrderCompleted from OrderPlaced in node".to_string(),
                1
            )])
        );
    }
}
