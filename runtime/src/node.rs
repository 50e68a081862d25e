//! The node: hosts one or more contexts in one process and shuts them down gracefully.
//!
//! Start-up: metrics endpoint, NATS connection, streams (own and sources), then per context
//! a store, its group-commit flusher, its outbox relay, its query service and one supervised
//! consumer actor per subscription. Shutdown (when the given future resolves): readiness
//! off, stop pulling, finish in-flight messages, publish what the outbox holds, flush, drain
//! the connection.
//!
//! Must run inside an actix `System` (the binary uses one backed by a multi-thread tokio
//! runtime, so message handling uses every core).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Supervisor};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bus::{Bus, BusError};
use crate::component::{Context, Kind};
use crate::config::NodeConfig;
use crate::consumer::{ConsumerActor, ContextRuntime, TakeRun};
use crate::envelope::now_ms;
use crate::faults::Faults;
use crate::flusher::GroupCommit;
use crate::metrics::{self, Health};
use crate::outbox::Relay;
use crate::resilience::breaker::Breakers;

use crate::saga_service;
use crate::store::{Store, StoreError};
use crate::subjects;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("store of {context}: {source}")]
    Store { context: String, source: StoreError },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Runs the node until `shutdown` resolves, then stops it gracefully.
pub async fn run(
    cfg: NodeConfig,
    contexts: Vec<Arc<dyn Context>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let cfg = Arc::new(cfg);
    metrics::init();
    let health = Health::default();
    let listener = TcpListener::bind(&cfg.metrics_addr)
        .await
        .map_err(|source| NodeError::Metrics {
            addr: cfg.metrics_addr.clone(),
            source,
        })?;
    let metrics_task = tokio::spawn(metrics::serve(listener, health.clone()));

    check_routing(&contexts)?;
    let names: Vec<&str> = contexts.iter().map(|c| c.name()).collect();
    let bus = Bus::connect(
        &cfg.nats_url,
        &format!("choreo-node[{}]", names.join(",")),
        Duration::from_secs(15),
    )
    .await?;
    bus.ensure_dlq_stream(&cfg).await?;
    let mut streams = BTreeSet::new();
    for c in &contexts {
        streams.insert(c.name());
        for comp in c.components() {
            for s in comp.subscriptions() {
                streams.insert(s.source);
            }
        }
    }
    for s in &streams {
        bus.ensure_context_stream(s, &cfg).await?;
    }

    let faults = Arc::new(Faults::new(&cfg.faults));
    let breakers = Arc::new(Breakers::new(cfg.breaker.clone()));
    if cfg.faults.enabled {
        tracing::warn!(rules = cfg.faults.rules.len(), "fault injection is ENABLED");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut actors: Vec<Addr<ConsumerActor>> = Vec::new();
    let mut relays = Vec::new();
    let mut services = Vec::new();
    let mut commits = Vec::new();
    let mut timers = Vec::new();
    for c in &contexts {
        let dir = cfg.data_dir.join(c.name());
        let store = Store::open(&dir, cfg.store.cache_capacity_bytes).map_err(|source| {
            NodeError::Store {
                context: c.name().into(),
                source,
            }
        })?;
        let commit = GroupCommit::start(&store, &dir, c.name())
            .map_err(|e| NodeError::Other(e.to_string()))?;
        let (relay, relay_task) = Relay::start(
            c.name().to_string(),
            store.clone(),
            bus.clone(),
            stop_rx.clone(),
        );
        relays.push(relay_task);
        commits.push(commit.clone());
        let rt = Arc::new(ContextRuntime {
            context: c.name(),
            faults: faults.clone(),
            breakers: breakers.clone(),
            health: health.clone(),
            store: store.clone(),
            commit,
            relay,
            bus: bus.clone(),
            cfg: cfg.clone(),
        });
        for comp in c.components() {
            for sub in comp.subscriptions() {
                let (rt, comp, stop) = (rt.clone(), comp.clone(), stop_rx.clone());
                actors.push(Supervisor::start(move |_| {
                    ConsumerActor::new(rt, comp, sub, stop)
                }));
            }
        }
        services.push(tokio::spawn(serve_queries(
            bus.client.clone(),
            c.clone(),
            store.clone(),
        )));
        services.push(tokio::spawn(prune_inbox(c.name(), store, cfg.clone())));
        let sagas = c.sagas();
        if !sagas.is_empty() {
            timers.push(tokio::spawn(saga_service::run_deadlines(
                rt.clone(),
                sagas.clone(),
                stop_rx.clone(),
            )));
            services.push(tokio::spawn(saga_service::serve(
                bus.client.clone(),
                rt.clone(),
                sagas,
            )));
        }
    }
    health.set_ready(true);
    tracing::info!(contexts = ?names, nats = %cfg.nats_url, metrics = %cfg.metrics_addr, "node ready");

    shutdown.await;
    tracing::info!("shutting down: stop pulling, finish in-flight work");
    health.set_ready(false);
    let _ = stop_tx.send(true);
    for a in &actors {
        if let Ok(Some(run)) = a.send(TakeRun).await {
            let _ = run.await;
        }
    }
    drop(actors);
    for t in timers {
        let _ = t.await;
    }
    for s in services {
        s.abort();
    }
    for r in relays {
        if tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .is_err()
        {
            tracing::warn!("outbox not drained in 10 s; the rest is published at next start");
        }
    }
    for c in commits {
        let _ = c.durable().await;
    }
    let _ = bus.client.drain().await;
    metrics_task.abort();
    tracing::info!("stopped");
    Ok(())
}

/// Commands are addressed to a context and consumed whole (`cmd.>`) by exactly one of its
/// components; a component may not consume another context's commands.
fn check_routing(contexts: &[Arc<dyn Context>]) -> Result<(), NodeError> {
    for c in contexts {
        let mut handlers = Vec::new();
        for comp in c.components() {
            for s in comp.subscriptions() {
                if s.kind == Kind::Command {
                    if s.source != c.name() {
                        return Err(NodeError::Other(format!(
                            "component {} of {} subscribes to commands of {}: commands are consumed only by their addressee",
                            comp.name(), c.name(), s.source
                        )));
                    }
                    handlers.push(comp.name());
                }
            }
        }
        if handlers.len() > 1 {
            return Err(NodeError::Other(format!(
                "context {} has more than one command handler ({}); merge them into one component",
                c.name(),
                handlers.join(", ")
            )));
        }
    }
    Ok(())
}

/// Answers `choreo.<ctx>.query.<name>` requests. Reply: `{"ok": value}` or `{"error": "..."}`.
async fn serve_queries(client: async_nats::Client, ctx: Arc<dyn Context>, store: Store) {
    let subject = subjects::query(ctx.name(), "*");
    let mut sub = match client
        .queue_subscribe(subject.clone(), format!("choreo-{}", ctx.name()))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(subject, error = %e, "cannot serve queries");
            return;
        }
    };
    while let Some(req) = sub.next().await {
        let Some(reply) = req.reply.clone() else {
            continue;
        };
        let name = subjects::last_token(&req.subject);
        let body = match ctx.query(store.reader(), name, &req.payload) {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = client.publish(reply, body.to_string().into()).await;
    }
}

async fn prune_inbox(context: &'static str, store: Store, cfg: Arc<NodeConfig>) {
    let every = Duration::from_millis(cfg.store.inbox_prune_interval_ms.max(1000));
    loop {
        tokio::time::sleep(every).await;
        let cutoff = now_ms().saturating_sub(cfg.store.inbox_retention_ms);
        match store.prune_inbox(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(context, removed = n, "inbox pruned"),
            Err(e) => tracing::warn!(context, error = %e, "inbox prune failed"),
        }
    }
}
