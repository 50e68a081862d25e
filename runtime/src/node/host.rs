//! One context as a node hosts it, started and stopped as a unit: its store and group
//! commit, its outbox relay, one supervised consumer actor per subscription, its query
//! service, its inbox rotation and, for its sagas, the deadline timer and the inspection
//! service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::{Addr, Supervisor};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ownership::{self, Ownership};
use super::services::{rotate_inbox, serve_queries};
use super::watchdog::Watched;
use super::NodeError;
use crate::config::NodeConfig;
use crate::context::Context;
use crate::pipeline::chain::SameContext;
use crate::pipeline::commit::{CommitOptions, GroupCommit};
use crate::pipeline::consumer::{ConsumerActor, TakeRun};
use crate::pipeline::decide::durable_name;
use crate::pipeline::disposition::{Disposition, DlqReason};
use crate::pipeline::relay::{Relay, RelayOptions};
use crate::pipeline::replicate::Replication;
use crate::pipeline::ContextRuntime;
use crate::resilience::breaker::Breakers;
use crate::resilience::external::ExternalCalls;
use crate::saga::{instance, service};
use crate::store::{self, Store};
use crate::telemetry::{metrics, Health};
use crate::wire::bus::Bus;
use crate::wire::changelog::{Changelog, Snapshots};
use crate::wire::subjects;

/// What every context of a node shares.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) health: Health,
    pub(crate) breakers: Arc<Breakers>,
    #[cfg(feature = "faults")]
    pub(crate) faults: Arc<crate::faults::Faults>,
}

/// A partition this node owns, with its changelog.
pub(crate) struct Owned {
    pub(crate) own: Arc<Ownership>,
    pub(crate) changelog: Changelog,
    pub(crate) snapshots: Snapshots,
}

/// A durable consumer the node polls for lag: (context, stream, durable name).
pub(crate) type Polled = (&'static str, String, String);

/// A started context.
pub struct ContextHost {
    name: &'static str,
    stop: watch::Sender<bool>,
    actors: Vec<Addr<ConsumerActor>>,
    relay: JoinHandle<()>,
    timers: Vec<JoinHandle<()>>,
    services: Vec<JoinHandle<()>>,
    commit: GroupCommit,
    store: Store,
    watched: Option<Watched>,
    polled: Vec<Polled>,
}

impl ContextHost {
    /// Opens the context's store in `<data_dir>/<context>`.
    pub(crate) fn open_store(cfg: &NodeConfig, name: &str) -> Result<Store, NodeError> {
        let mut options = store_options(cfg);
        options.log_changes = cfg.ownership.enabled;
        Store::open_with(&cfg.data_dir.join(name), &options).map_err(|source| NodeError::Store {
            context: name.into(),
            source,
        })
    }

    /// Starts everything that serves the context, on `bus`, with its `store` (see
    /// [`ContextHost::open_store`]). With `owned`, the store is first restored from the
    /// partition's changelog, and every flush is appended to it.
    pub(crate) async fn start(
        ctx: Arc<dyn Context>,
        shared: &Shared,
        bus: Bus,
        store: Store,
        owned: Option<Owned>,
    ) -> Result<ContextHost, NodeError> {
        let cfg = &shared.cfg;
        let name = ctx.name();
        let (stop, stopping) = watch::channel(false);
        let dir: PathBuf = cfg.data_dir.join(name);
        let replication = match owned {
            Some(Owned {
                own,
                changelog,
                snapshots,
            }) => {
                let snapshot_after = cfg.ownership.snapshot_after;
                let last = ownership::patiently("restore from the changelog", || {
                    ownership::restore(name, &store, &changelog, &snapshots, &own, snapshot_after)
                })
                .await?;
                Some(Replication {
                    context: name,
                    changelog,
                    lease: own,
                    last,
                    runtime: tokio::runtime::Handle::current(),
                    store: store.clone(),
                })
            }
            None => None,
        };
        if let Some(chain) = same_context_chain(&ctx, shared) {
            store.link_with(Arc::new(chain));
        }
        let (relay, relay_task) = Relay::start(
            name,
            store.clone(),
            bus.clone(),
            relay_options(shared, &ctx),
            stopping.clone(),
        );
        let failed = shared.health.store_flag();
        let stalled = shared.health.store_flag();
        let commit = GroupCommit::start(
            &store,
            &dir,
            name,
            failed.clone(),
            relay,
            commit_options(shared, replication),
        )
        .map_err(|e| NodeError::Other(e.to_string()))?;
        let watched = Watched::new(name, dir, commit.clone(), failed, stalled);
        let external = ExternalCalls::new(
            bus.client.clone(),
            shared.breakers.clone(),
            cfg.external_timeout,
        );
        #[cfg(feature = "faults")]
        let external = external.with_faults(shared.faults.clone(), name);
        let rt = Arc::new(ContextRuntime {
            context: name,
            health: shared.health.clone(),
            store: store.clone(),
            commit: commit.clone(),
            bus: bus.clone(),
            external,
            cfg: cfg.clone(),
            #[cfg(feature = "faults")]
            faults: shared.faults.clone(),
        });
        // Saga counts for the gauges: one scan of the stored instances before the consumers
        // run, then kept up to date by the transitions as they commit.
        let sagas = ctx.sagas();
        for s in &sagas {
            match instance::count(store.reader(), s.name()) {
                Ok(n) => tracing::debug!(saga = s.name(), instances = n, "saga instances counted"),
                Err(e) => {
                    tracing::error!(saga = s.name(), error = ?e, "saga instances not counted")
                }
            }
        }
        init_series(&ctx, shared);
        let mut actors = Vec::new();
        let mut polled = Vec::new();
        for comp in ctx.message_handlers() {
            for sub in comp.subscriptions() {
                let durable = durable_name(name, comp.name(), &sub);
                polled.push((name, subjects::stream(sub.source), durable));
                let (rt, comp, stop) = (rt.clone(), comp.clone(), stopping.clone());
                actors.push(Supervisor::start(move |_| {
                    ConsumerActor::new(rt, comp, sub, stop)
                }));
            }
        }
        let mut services = vec![
            tokio::spawn(serve_queries(
                bus.client.clone(),
                ctx.clone(),
                store.clone(),
            )),
            tokio::spawn(rotate_inbox(name, store.clone(), cfg.clone())),
        ];
        let mut timers = Vec::new();
        if !sagas.is_empty() {
            timers.push(tokio::spawn(service::run_deadlines(
                rt.clone(),
                sagas.clone(),
                stopping.clone(),
            )));
            services.push(tokio::spawn(service::report_metrics(sagas.clone())));
            let retention = cfg.store.saga_retention;
            if !retention.is_zero() {
                timers.push(tokio::spawn(service::run_retention(
                    rt.clone(),
                    retention,
                    stopping.clone(),
                )));
            }
            services.push(tokio::spawn(service::serve(
                bus.client.clone(),
                rt.clone(),
                sagas,
            )));
        }
        Ok(ContextHost {
            name,
            stop,
            actors,
            relay: relay_task,
            timers,
            services,
            commit,
            store,
            watched: Some(watched),
            polled,
        })
    }

    /// The context's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its store, for the node's watchdog (once).
    pub(crate) fn take_watched(&mut self) -> Option<Watched> {
        self.watched.take()
    }

    /// Its durable consumers, for the node's lag poller.
    pub(crate) fn polled(&self) -> &[Polled] {
        &self.polled
    }

    /// Stops the context gracefully: stop pulling and firing deadlines, give back what was
    /// buffered, finish in-flight messages (up to `ack_wait`), publish what the outbox holds
    /// (up to 10 s; the rest is published at the next start), remove what was published and
    /// flush.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for a in &self.actors {
            if let Ok(Some(run)) = a.send(TakeRun).await {
                let _ = run.await;
            }
        }
        for t in self.timers {
            let _ = t.await;
        }
        for s in self.services {
            s.abort();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.relay)
            .await
            .is_err()
        {
            tracing::warn!(
                context = self.name,
                "outbox not drained in 10 s; the rest is published at next start"
            );
        }
        // What the relay published last is removed now, not when the commit thread next
        // looks (it may not, before the process exits).
        if let Err(e) = self.store.remove_published() {
            tracing::warn!(context = self.name, error = %e, "outbox: removing published entries failed");
        }
        let _ = self.commit.durable().await;
    }
}

/// Every series of the context's metrics that a label value can name in advance, at 0: a
/// counter whose series first appears at 1 is invisible to `increase()` and `rate()`, so
/// the first dead letter, panic or breaker transition would go unseen by alerts.
fn init_series(ctx: &Arc<dyn Context>, shared: &Shared) {
    let name = ctx.name();
    for reason in DlqReason::ALL {
        metrics::DEAD_LETTERS
            .with_label_values(&[name, reason.label()])
            .inc_by(0);
    }
    for result in ["stored", "duplicate", "error"] {
        metrics::OUTBOX_PUBLISHED
            .with_label_values(&[name, result])
            .inc_by(0);
    }
    for comp in ctx.message_handlers() {
        for system in comp.external_systems() {
            // Created now, with its series.
            shared.breakers.get(system);
        }
        for sub in comp.subscriptions() {
            let durable = durable_name(name, comp.name(), &sub);
            for outcome in Disposition::LABELS {
                metrics::MESSAGES
                    .with_label_values(&[name, &durable, outcome])
                    .inc_by(0);
            }
            metrics::HANDLER_PANICS
                .with_label_values(&[name, &durable])
                .inc_by(0);
            metrics::ACTOR_RESTARTS
                .with_label_values(&[name, &durable])
                .inc_by(0);
            metrics::SUPERVISOR_GIVEN_UP
                .with_label_values(&[name, &durable])
                .set(0);
            if sub.source == name {
                metrics::HANDLED_IN_TRANSACTION
                    .with_label_values(&[name, &durable])
                    .inc_by(0);
            }
        }
    }
    for saga in ctx.sagas() {
        let definition = saga.definition();
        for deadline in definition.states.iter().filter_map(|s| s.deadline) {
            metrics::SAGA_DEADLINES_FIRED
                .with_label_values(&[saga.name(), deadline])
                .inc_by(0);
            metrics::SAGA_DEADLINES_DROPPED
                .with_label_values(&[saga.name(), deadline])
                .inc_by(0);
        }
    }
}

/// The context's consumers of its own messages, to run in the sender's transaction, unless
/// `[consumer] own_messages_in_transaction` is off or a `[danger]` switch is on (so that
/// each switch shows only what it removes).
fn same_context_chain(ctx: &Arc<dyn Context>, shared: &Shared) -> Option<SameContext> {
    if !shared.cfg.consumer.own_messages_in_transaction {
        return None;
    }
    #[cfg(feature = "danger")]
    if shared.cfg.danger.any() {
        return None;
    }
    let chain = SameContext::new(ctx.name(), &ctx.message_handlers());
    #[cfg(feature = "faults")]
    let chain = chain.with_faults(shared.faults.clone());
    (!chain.is_empty()).then_some(chain)
}

fn store_options(cfg: &NodeConfig) -> store::Options {
    #[allow(unused_mut)]
    let mut options = store::Options::with_cache(cfg.store.cache_capacity_bytes);
    #[cfg(feature = "danger")]
    {
        options.no_inbox = cfg.danger.disable_inbox;
        options.background_flush = cfg.danger.disable_group_commit;
    }
    options
}

#[cfg_attr(
    not(any(feature = "faults", feature = "danger")),
    allow(unused_variables)
)]
fn relay_options(shared: &Shared, ctx: &Arc<dyn Context>) -> RelayOptions {
    let sends = ctx
        .sends()
        .iter()
        .flat_map(|s| s.types.iter().map(|t| subjects::command(s.source, t)))
        .collect();
    RelayOptions {
        hooks: ctx.published_hooks(),
        sends,
        #[cfg(feature = "faults")]
        faults: Some(shared.faults.clone()),
        #[cfg(feature = "danger")]
        forget_at_start: shared.cfg.danger.disable_outbox,
    }
}

#[cfg_attr(
    not(any(feature = "faults", feature = "danger")),
    allow(unused_variables)
)]
fn commit_options(shared: &Shared, replication: Option<Replication>) -> CommitOptions {
    CommitOptions {
        skip_local_sync: !shared.cfg.ownership.local_sync,
        replication,
        #[cfg(feature = "faults")]
        faults: Some(shared.faults.clone()),
        #[cfg(feature = "danger")]
        no_group_commit: shared.cfg.danger.disable_group_commit,
    }
}
