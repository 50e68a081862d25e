//! The node's services beside the message path: read-model queries (registered with the
//! NATS service API), consumer lag polling, inbox rotation, and the fault-admin subject.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::host::Polled;
use crate::config::NodeConfig;
use crate::context::Context;
use crate::store::Store;
use crate::telemetry::metrics;
use crate::wire::bus::{Bus, DeadLetter};
use crate::wire::envelope::now_ms;
use crate::wire::identity;
use crate::wire::streams::trim_point;
use crate::wire::subjects;

/// Answers `choreo.<ctx>.query.<name>` requests. Reply: `{"ok": value}` or `{"error": "..."}`.
pub(crate) async fn serve_queries(client: async_nats::Client, ctx: Arc<dyn Context>, store: Store) {
    use async_nats::service::ServiceExt;
    let context = ctx.name();
    let service = client
        .service_builder()
        .description(format!("Choreo context {context}: read-model queries"))
        .metadata(std::collections::HashMap::from([
            ("context".to_string(), context.to_string()),
            ("namespace".to_string(), subjects::namespace().to_string()),
            (
                "sagas".to_string(),
                ctx.sagas()
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]))
        .stats_handler(
            move |_, _| serde_json::json!({ "messages_handled": metrics::handled(context) }),
        )
        .queue_group(format!("{}-{context}", subjects::namespace()))
        .start(
            format!("{}-{context}", subjects::namespace()),
            env!("CARGO_PKG_VERSION"),
        )
        .await;
    let service = match service {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(context, error = %e, "cannot register the query service");
            return;
        }
    };
    let mut endpoints = Vec::new();
    for q in ctx.queries() {
        match service
            .endpoint_builder()
            .name(q)
            .add(subjects::query(context, q))
            .await
        {
            Ok(e) => endpoints.push(e),
            Err(e) => tracing::error!(context, query = q, error = %e, "cannot serve query"),
        }
    }
    let mut requests = futures::stream::select_all(endpoints);
    while let Some(req) = requests.next().await {
        if let Some(reply) = req
            .message
            .reply
            .as_deref()
            .filter(|r| !identity::is_inbox(r))
        {
            identity::refuse_reply(context, "query", reply);
            continue;
        }
        let name = subjects::last_token(&req.message.subject);
        let body = match ctx.query(store.reader(), name, &req.message.payload) {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = req.respond(Ok(body.to_string().into())).await;
    }
}

/// Watches the streams the node uses, every few seconds: the consumers' lag, each
/// stream's fill, messages removed before one of this node's consumers acked them (counted
/// and logged once per gap), and the removal of history every durable consumer has acked
/// once one of `trimmed` (the streams of the node's own contexts: only their identity may
/// purge them) holds more than `history` of its limit (see `wire::streams`).
pub(crate) async fn watch_streams(
    bus: Bus,
    streams: Vec<String>,
    trimmed: Vec<String>,
    own: Vec<Polled>,
    history: f64,
) {
    for (context, _, durable) in &own {
        for reason in ["removed", "max_deliveries"] {
            metrics::CONSUMER_MISSED
                .with_label_values(&[context, durable.as_str(), reason])
                .inc_by(0);
        }
    }
    // Per consumer, the stream sequence up to which removed messages are counted already.
    let mut counted: HashMap<String, u64> = HashMap::new();
    let mut failing = HashSet::new();
    loop {
        for name in &streams {
            let state = match bus.stream_state(name).await {
                Ok(s) => {
                    failing.remove(name);
                    s
                }
                Err(e) => {
                    if failing.insert(name.clone()) {
                        tracing::warn!(stream = %name, error = %e, "cannot read the stream's state");
                    }
                    continue;
                }
            };
            metrics::STREAM_FILL
                .with_label_values(&[name])
                .set(state.fill());
            for c in &state.consumers {
                let Some((context, _, durable)) =
                    own.iter().find(|(_, s, d)| s == name && *d == c.name)
                else {
                    continue;
                };
                metrics::CONSUMER_PENDING
                    .with_label_values(&[*context, durable.as_str()])
                    .set(c.num_pending as i64);
                metrics::CONSUMER_ACK_PENDING
                    .with_label_values(&[*context, durable.as_str()])
                    .set(c.num_ack_pending as i64);
                let from = counted.get(durable).copied().unwrap_or(0).max(c.ack_floor);
                let missed = state.first_seq.saturating_sub(from + 1);
                if missed > 0 {
                    counted.insert(durable.clone(), state.first_seq - 1);
                    metrics::CONSUMER_MISSED
                        .with_label_values(&[*context, durable.as_str(), "removed"])
                        .inc_by(missed);
                    tracing::error!(
                        context = *context,
                        consumer = %durable,
                        stream = %name,
                        ack_floor = c.ack_floor,
                        first_seq = state.first_seq,
                        missed,
                        "messages were removed from the stream before this consumer acked them (at most this many; see `choreo streams`)"
                    );
                }
            }
            if state.max_bytes > 0 && trimmed.contains(name) {
                let keep = (state.max_bytes as f64 * history) as u64;
                if let Some(point) = trim_point(&state, keep) {
                    match bus.trim(&state, point).await {
                        Ok(n) => {
                            metrics::STREAM_TRIMMED.with_label_values(&[name]).inc_by(n);
                            tracing::debug!(stream = %name, below = point, removed = n, "history acked by every consumer removed");
                        }
                        Err(e) => tracing::warn!(stream = %name, error = %e, "cannot trim"),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Listens for the server giving up on a message of one of this node's consumers
/// (`max_deliver` reached, e.g. after a very long breaker outage): the message is counted
/// as missed, logged, and dead-lettered with its reason (it is still in the stream).
pub(crate) async fn watch_max_deliveries(bus: Bus, own: Vec<Polled>) {
    let mut subs = Vec::new();
    for (context, stream, durable) in &own {
        let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}");
        match bus.client.subscribe(subject).await {
            Ok(s) => subs.push(s.map(move |m| (*context, stream.clone(), durable.clone(), m))),
            Err(e) => {
                tracing::error!(consumer = %durable, error = %e, "cannot watch max deliveries")
            }
        }
    }
    let mut all = futures::stream::select_all(subs);
    while let Some((context, stream, durable, advisory)) = all.next().await {
        let v: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap_or_default();
        let seq = v["stream_seq"].as_u64().unwrap_or(0);
        let deliveries = v["deliveries"].as_i64().unwrap_or(0);
        metrics::CONSUMER_MISSED
            .with_label_values(&[context, &durable, "max_deliveries"])
            .inc();
        tracing::error!(context, consumer = %durable, stream = %stream, seq, deliveries, "the server stopped redelivering a message (max_deliver); dead-lettering it");
        let stored = match bus.js.get_stream(&stream).await {
            Ok(s) => s.get_raw_message(seq).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let message = match stored {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(consumer = %durable, seq, error = %e, "the message is gone; not dead-lettered");
                continue;
            }
        };
        let reason = format!(
            "max_deliveries: the server stopped redelivering after {deliveries} deliveries"
        );
        let dl = DeadLetter {
            context,
            consumer: &durable,
            subject: &message.subject,
            reason: &reason,
            delivered: deliveries,
            stream_sequence: seq,
            headers: Some(&message.headers),
            payload: message.payload.clone(),
        };
        match bus.dead_letter(&dl).await {
            Ok(()) => metrics::DEAD_LETTERS
                .with_label_values(&[context, "max_deliveries"])
                .inc(),
            Err(e) => {
                tracing::error!(consumer = %durable, seq, error = %e, "dead-letter publish failed")
            }
        }
    }
}

/// Rotates the inbox generations of a store when they are due (see `Store::rotate_inbox`).
pub(crate) async fn rotate_inbox(context: &'static str, store: Store, cfg: Arc<NodeConfig>) {
    let every = cfg.store.inbox_prune_interval.max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        let (store, retention) = (store.clone(), cfg.store.inbox_retention);
        // Dropping a generation walks its pages: off the async workers.
        let rotated = tokio::task::spawn_blocking(move || {
            store.rotate_inbox(now_ms(), retention.as_millis() as u64)
        })
        .await;
        match rotated {
            Ok(Ok(false)) => {}
            Ok(Ok(true)) => tracing::info!(
                context,
                retention = %crate::duration::format(retention),
                "inbox rotated: a new generation started, marks older than one retention period dropped"
            ),
            Ok(Err(e)) => tracing::warn!(context, error = %e, "inbox rotation failed"),
            Err(e) => tracing::warn!(context, error = %e, "inbox rotation panicked"),
        }
    }
}

/// Serves `choreo.admin.<context>.faults` for every hosted context: the node's fault rules
/// (cargo feature `faults`), or an answer saying the build has none.
pub(crate) async fn serve_fault_admin(
    client: async_nats::Client,
    #[cfg(feature = "faults")] faults: Arc<crate::faults::Faults>,
    contexts: Vec<&'static str>,
) {
    let mut subs = Vec::new();
    for c in &contexts {
        match client.subscribe(subjects::admin(c, "faults")).await {
            Ok(s) => subs.push(s.map(move |m| (*c, m))),
            Err(e) => tracing::error!(context = c, error = %e, "cannot serve fault admin"),
        }
    }
    let mut all = futures::stream::select_all(subs);
    while let Some((context, req)) = all.next().await {
        let Some(reply) = req.reply.clone() else {
            continue;
        };
        if !identity::is_inbox(&reply) {
            identity::refuse_reply(context, "admin", &reply);
            continue;
        }
        #[cfg(feature = "faults")]
        let body = crate::faults::admin::answer(&faults, context, &req.payload);
        #[cfg(not(feature = "faults"))]
        let body = {
            let _ = context;
            serde_json::json!({
                "error": "this node was built without fault injection (cargo feature `faults`)"
            })
        };
        let _ = client.publish(reply, body.to_string().into()).await;
    }
}
