//! The node's services beside the message path: read-model queries (registered with the
//! NATS service API), consumer lag polling, inbox rotation, and the fault-admin subject.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::config::NodeConfig;
use crate::context::Context;
use crate::store::Store;
use crate::telemetry::metrics;
use crate::wire::bus::Bus;
use crate::wire::envelope::now_ms;
use crate::wire::subjects;

/// Answers `choreo.<ctx>.query.<name>` requests. Reply: `{"ok": value}` or `{"error": "..."}`.
pub(crate) async fn serve_queries(client: async_nats::Client, ctx: Arc<dyn Context>, store: Store) {
    use async_nats::service::ServiceExt;
    let context = ctx.name();
    let service = client
        .service_builder()
        .description(format!("Choreo context {context}: read-model queries"))
        .metadata(std::collections::HashMap::from([(
            "context".to_string(),
            context.to_string(),
        )]))
        .stats_handler(
            move |_, _| serde_json::json!({ "messages_handled": metrics::handled(context) }),
        )
        .queue_group(format!("choreo-{context}"))
        .start(format!("choreo-{context}"), env!("CARGO_PKG_VERSION"))
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
        let name = subjects::last_token(&req.message.subject);
        let body = match ctx.query(store.reader(), name, &req.message.payload) {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = req.respond(Ok(body.to_string().into())).await;
    }
}

/// Consumer lag and ack-pending, read from JetStream every few seconds.
pub(crate) async fn poll_consumers(bus: Bus, consumers: Vec<(&'static str, String, String)>) {
    loop {
        for (context, stream, durable) in &consumers {
            let info = async {
                let s = bus.js.get_stream(stream).await.ok()?;
                let mut c: async_nats::jetstream::consumer::PullConsumer =
                    s.get_consumer(durable).await.ok()?;
                c.info()
                    .await
                    .ok()
                    .map(|i| (i.num_pending, i.num_ack_pending))
            };
            if let Some((pending, ack_pending)) = info.await {
                metrics::CONSUMER_PENDING
                    .with_label_values(&[*context, durable.as_str()])
                    .set(pending as i64);
                metrics::CONSUMER_ACK_PENDING
                    .with_label_values(&[*context, durable.as_str()])
                    .set(ack_pending as i64);
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Rotates the inbox generations of a store when they are due (see `Store::rotate_inbox`).
pub(crate) async fn rotate_inbox(context: &'static str, store: Store, cfg: Arc<NodeConfig>) {
    let every = Duration::from_millis(cfg.store.inbox_prune_interval_ms.max(1000));
    loop {
        tokio::time::sleep(every).await;
        let (store, retention) = (store.clone(), cfg.store.inbox_retention_ms);
        // Dropping a generation walks its pages: off the async workers.
        let rotated =
            tokio::task::spawn_blocking(move || store.rotate_inbox(now_ms(), retention)).await;
        match rotated {
            Ok(Ok(false)) => {}
            Ok(Ok(true)) => tracing::info!(
                context,
                retention_ms = retention,
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
