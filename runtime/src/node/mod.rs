//! The node: one process hosting one or more contexts, each a [`host::ContextHost`]
//! started and stopped as a unit, with the services they share (the metrics endpoint, the
//! NATS connection, the consumer lag poller, the fault-admin subject) and the store
//! watchdog.
//!
//! [`run`] blocks the calling thread: the node runs in an actix `System` on a multi-thread
//! tokio runtime of its own thread, and [`run`] returns how it ended ([`Exit`]). A store that
//! cannot recover in the process ends it with [`Exit::RestartInPlace`]: the binary then
//! starts the same command again in place (the library never replaces the process itself).
//!
//! Start-up: metrics endpoint, NATS connection, streams (own and sources), then each
//! context. Shutdown (when the given future resolves): readiness off, every context stopped
//! (stop pulling, finish in-flight messages, publish what the outbox holds, flush), the
//! connections drained.

use std::future::Future;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::component::Kind;
use crate::config::NodeConfig;
use crate::context::Context;
use crate::resilience::breaker::Breakers;
use crate::store::StoreError;
use crate::telemetry::{endpoint, metrics, Health};
use crate::wire::bus::{Bus, BusError};
use crate::wire::changelog::{Changelog, Snapshots};
use crate::wire::identity::{self, Identity};
use crate::wire::lease::Leases;
use crate::wire::subjects;

pub mod host;
mod ownership;
pub mod provision;
pub mod restart;
pub mod rights;
mod services;
mod watchdog;

pub use host::ContextHost;
pub use restart::Restart;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// NATS or JetStream: the connection, a stream, a consumer or a bucket.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A context's store could not be opened.
    #[error("store of {context}: {source}")]
    Store {
        /// The context whose store it is.
        context: String,
        /// Why it could not be opened.
        source: StoreError,
    },
    /// The metrics endpoint could not listen on its address.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        /// The address it was to listen on.
        addr: String,
        /// Why it could not.
        source: std::io::Error,
    },
    /// Any other reason the node could not start; the message says what.
    #[error("{0}")]
    Other(String),
}

/// How a node ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped gracefully after its shutdown signal.
    Stopped,
    /// A store cannot recover in this process: run the node again in place, with
    /// [`Restart::env_for_next_run`] in its environment.
    RestartInPlace(Restart),
    /// A store stalled while the node was stopping: exit without the clean stop.
    Stalled,
}

/// Runs a node hosting `contexts` until `shutdown` resolves or its store watchdog gives up
/// on a store; blocks the calling thread and returns how the node ended.
pub fn run(
    cfg: NodeConfig,
    contexts: Vec<Arc<dyn Context>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Exit, NodeError> {
    let (exit_tx, exit_rx) = mpsc::channel();
    let ended = exit_tx.clone();
    std::thread::Builder::new()
        .name("node".into())
        .spawn(move || {
            let system = actix_rt::System::with_tokio_rt(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
            });
            let result = system.block_on(serve(cfg, contexts, shutdown, exit_tx));
            let _ = ended.send(result.map(|()| Exit::Stopped));
        })
        .map_err(|e| NodeError::Other(format!("cannot start the node thread: {e}")))?;
    exit_rx
        .recv()
        .map_err(|_| NodeError::Other("the node thread ended without an answer".into()))?
}

/// The node on its actix system: start-up, `shutdown`, graceful stop. The watchdog sends
/// its give-up to `exit` directly.
async fn serve(
    cfg: NodeConfig,
    contexts: Vec<Arc<dyn Context>>,
    shutdown: impl Future<Output = ()>,
    exit: mpsc::Sender<Result<Exit, NodeError>>,
) -> Result<(), NodeError> {
    let cfg = Arc::new(cfg);
    subjects::set_namespace(&cfg.namespace).map_err(NodeError::Other)?;
    metrics::init();
    restart::count_restarts_in_place();
    let health = Health::default();
    let listener = TcpListener::bind(&cfg.metrics_addr)
        .await
        .map_err(|source| NodeError::Metrics {
            addr: cfg.metrics_addr.clone(),
            source,
        })?;
    let metrics_task = tokio::spawn(endpoint::serve(listener, health.clone()));

    check_routing(&contexts)?;
    let names: Vec<&'static str> = contexts.iter().map(|c| c.name()).collect();
    if !cfg.nats.is_set() {
        tracing::warn!("no NATS identity ([nats], --nats-seed, CHOREO_NATS_SEED): connecting anonymously, in plaintext; whoever reaches the server may publish as this node (docs/security.md)");
    }
    let bus = Bus::connect_as(
        &cfg.nats_url,
        &format!("choreo-node[{}]", names.join(",")),
        Duration::from_secs(15),
        &identity(&cfg, &names, names[0]),
    )
    .await?;
    let streams = provision::ensure_streams(&bus, &cfg, &contexts).await?;

    let shared = host::Shared {
        cfg: cfg.clone(),
        health: health.clone(),
        breakers: Arc::new(Breakers::new(cfg.breaker.clone())),
        #[cfg(feature = "faults")]
        faults: Arc::new(crate::faults::Faults::new(&cfg.faults)),
    };
    #[cfg(feature = "faults")]
    for point in crate::faults::FaultPoint::ALL {
        for action in crate::faults::FaultAction::ALL {
            metrics::FAULTS_INJECTED
                .with_label_values(&[point.label(), action.label()])
                .inc_by(0);
        }
    }
    #[cfg(feature = "faults")]
    if cfg.faults.enabled {
        tracing::warn!(rules = cfg.faults.rules.len(), "fault injection is ENABLED");
    }
    #[cfg(feature = "danger")]
    if cfg.danger.any() {
        tracing::error!(danger = ?cfg.danger, "SAFETY MECHANISMS DISABLED ([danger]): messages can be lost or doubled");
    }
    // Each context's store, then (with ownership) its partition's lease: the node stands by
    // until every one of its contexts is its own.
    let mut stores = Vec::new();
    for c in &contexts {
        stores.push(ContextHost::open_store(&cfg, c.name())?);
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let (owned, keepers) = if cfg.ownership.enabled {
        let taking = take_all(&bus, &cfg, &contexts, exit.clone());
        tokio::select! {
            owned = taking => owned?,
            () = &mut shutdown => {
                tracing::info!("stopped while standing by");
                let _ = bus.client.drain().await;
                metrics_task.abort();
                return Ok(());
            }
        }
    } else {
        (contexts.iter().map(|_| None).collect(), Vec::new())
    };
    let leases: Vec<Arc<ownership::Ownership>> = owned
        .iter()
        .flatten()
        .map(|o: &host::Owned| o.own.clone())
        .collect();
    // Contexts hosted together get a connection each for their consumers and relay, as
    // they would in processes of their own: one context's deliveries, acks and publishes
    // do not queue behind another's on one socket (and in one server-side reader).
    let mut buses = Vec::new();
    let mut hosts = Vec::new();
    for ((c, store), owned) in contexts.iter().zip(stores).zip(owned) {
        let context_bus = if contexts.len() > 1 {
            let own = Bus::connect_as(
                &cfg.nats_url,
                &format!("choreo-node[{}]/{}", names.join(","), c.name()),
                Duration::from_secs(15),
                &identity(&cfg, &names, c.name()),
            )
            .await?;
            health.watch_nats(own.client.clone());
            buses.push(own.clone());
            own
        } else {
            bus.clone()
        };
        hosts.push(ContextHost::start(c.clone(), &shared, context_bus, store, owned).await?);
    }
    let polled: Vec<host::Polled> = hosts.iter().flat_map(|h| h.polled().to_vec()).collect();
    let mut watched_streams: Vec<String> = streams.iter().map(|s| subjects::stream(s)).collect();
    watched_streams.push(subjects::dlq_stream());
    let services = [
        tokio::spawn(services::watch_streams(
            bus.clone(),
            watched_streams,
            names.iter().map(|c| subjects::stream(c)).collect(),
            polled.clone(),
            cfg.stream.history,
        )),
        tokio::spawn(services::watch_max_deliveries(bus.clone(), polled)),
        tokio::spawn(services::serve_fault_admin(
            bus.client.clone(),
            #[cfg(feature = "faults")]
            shared.faults.clone(),
            names.clone(),
        )),
    ];
    let watched = hosts.iter_mut().filter_map(|h| h.take_watched()).collect();
    let stall = cfg.store.flush_stall;
    let watchdog = watchdog::Watchdog::start(watched, stall, exit)
        .map_err(|e| NodeError::Other(e.to_string()))?;
    health.watch_nats(bus.client.clone());
    health.set_ready(true);
    tracing::info!(contexts = ?names, nats = %cfg.nats_url, metrics = %cfg.metrics_addr, "node ready");
    for (c, own) in contexts.iter().zip(&leases) {
        if let Some(since) = own.previous_renewal_ms {
            let took = crate::wire::envelope::now_ms().saturating_sub(since) as f64 / 1000.0;
            metrics::TAKEOVER_SECONDS
                .with_label_values(&[c.name()])
                .observe(took);
            tracing::warn!(context = c.name(), seconds = took, "took the partition over from another node (from its last lease renewal until serving)");
        }
    }

    shutdown.await;
    tracing::info!("shutting down: stop pulling, finish in-flight work");
    health.set_ready(false);
    watchdog.shutting_down();
    futures::future::join_all(hosts.into_iter().map(ContextHost::stop)).await;
    for k in keepers {
        k.abort();
    }
    for own in &leases {
        own.release().await;
    }
    for s in services {
        s.abort();
    }
    for b in buses {
        let _ = b.client.drain().await;
    }
    let _ = bus.client.drain().await;
    drop(watchdog);
    metrics_task.abort();
    tracing::info!("stopped");
    Ok(())
}

/// The node's NATS identity for a connection of context `context` (its inbox prefix); its
/// violations are counted under every hosted context's name.
fn identity(cfg: &NodeConfig, names: &[&str], context: &str) -> Identity {
    Identity {
        auth: cfg.nats.clone(),
        inbox_prefix: Some(identity::inbox_prefix(&cfg.namespace, context)),
        label: names.join(","),
    }
}

/// Takes the lease of every context's partition, in order, standing by while another node
/// holds one, and opens each partition's changelog. Each lease is kept (renewed) from the
/// moment it is taken, also while the node stands by for the next one; returns the leases
/// with their keepers.
async fn take_all(
    bus: &Bus,
    cfg: &NodeConfig,
    contexts: &[Arc<dyn Context>],
    exit: mpsc::Sender<Result<Exit, NodeError>>,
) -> Result<(Vec<Option<host::Owned>>, Vec<tokio::task::JoinHandle<()>>), NodeError> {
    let (ttl, replicas) = (cfg.ownership.lease_ttl, cfg.stream.replicas);
    let leases =
        ownership::patiently("open the lease bucket", || Leases::open(bus, ttl, replicas)).await?;
    let (mut owned, mut keepers) = (Vec::new(), Vec::new());
    for c in contexts {
        let snapshots = ownership::patiently("open the snapshot bucket", || {
            Snapshots::open(bus, c.name(), replicas)
        })
        .await?;
        let id = ownership::store_id(&cfg.data_dir.join(c.name()))?;
        let own = ownership::acquire(&leases, c.name(), &id, &cfg.metrics_addr, exit.clone()).await;
        keepers.push(tokio::spawn(own.clone().keep()));
        let changelog =
            Changelog::open(bus, c.name(), ownership::PARTITION, &cfg.stream_spec()).await?;
        owned.push(Some(host::Owned {
            own,
            changelog,
            snapshots,
        }));
    }
    Ok((owned, keepers))
}

/// Commands are addressed to a context and consumed whole (`cmd.>`) by exactly one of its
/// components; a component may not consume another context's commands. Every saga's
/// declared graph checks out (each waiting state has a deadline or says why not).
fn check_routing(contexts: &[Arc<dyn Context>]) -> Result<(), NodeError> {
    for c in contexts {
        let mut handlers = Vec::new();
        for comp in c.message_handlers() {
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
                "context {} has more than one command handler ({}); assemble it with ContextBuilder, which routes each command to its handler",
                c.name(),
                handlers.join(", ")
            )));
        }
        for saga in c.sagas() {
            let problems = saga.problems();
            if !problems.is_empty() {
                return Err(NodeError::Other(format!(
                    "context {}: saga {} is declared wrongly: {}",
                    c.name(),
                    saga.name(),
                    problems.join("; ")
                )));
            }
        }
    }
    Ok(())
}
