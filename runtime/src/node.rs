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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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
use crate::faults::{self, Faults};
use crate::flusher::GroupCommit;
use crate::local::{Handled, LocalConsumer, LocalRoutes};
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
    count_restarts_in_place();
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
    if cfg.danger.any() {
        tracing::error!(danger = ?cfg.danger, "SAFETY MECHANISMS DISABLED ([danger]): messages can be lost or doubled");
    }
    let mut watched = Vec::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut actors: Vec<Addr<ConsumerActor>> = Vec::new();
    let mut relays = Vec::new();
    let mut services = Vec::new();
    let mut commits = Vec::new();
    let mut timers = Vec::new();
    let mut consumers = Vec::new();
    // Same-node delivery (see `local`): off with a `[danger]` switch, so that each switch
    // shows only what it removes.
    let local = (cfg.consumer.local_delivery && !cfg.danger.any()).then(LocalRoutes::new);
    let mut locals = Vec::new();
    // Contexts hosted together get a connection each for their consumers and relay, as
    // they would in processes of their own: one context's deliveries, acks and publishes
    // do not queue behind another's on one socket (and in one server-side reader).
    let mut buses = Vec::new();
    for c in &contexts {
        let bus = if contexts.len() > 1 {
            let own = Bus::connect(
                &cfg.nats_url,
                &format!("choreo-node[{}]/{}", names.join(","), c.name()),
                Duration::from_secs(15),
            )
            .await?;
            health.watch_nats(own.client.clone());
            buses.push(own.clone());
            own
        } else {
            bus.clone()
        };
        let dir = cfg.data_dir.join(c.name());
        let store = Store::open_with(&dir, cfg.store.cache_capacity_bytes, &cfg.danger).map_err(
            |source| NodeError::Store {
                context: c.name().into(),
                source,
            },
        )?;
        let (relay, relay_task) = Relay::start(
            c.name(),
            store.clone(),
            bus.clone(),
            faults.clone(),
            !cfg.danger.disable_outbox,
            local.clone(),
            stop_rx.clone(),
        );
        relays.push(relay_task);
        if let (Some(local), true) = (&local, cfg.consumer.local_in_transaction) {
            store.link_with(local.chain(c.name()));
        }
        let failed = health.store_flag();
        let commit = GroupCommit::start(
            &store,
            &dir,
            c.name(),
            failed.clone(),
            relay.clone(),
            faults.clone(),
            !cfg.danger.disable_group_commit,
        )
        .map_err(|e| NodeError::Other(e.to_string()))?;
        watched.push(Watched {
            context: c.name(),
            dir: dir.clone(),
            commit: commit.clone(),
            failed,
            stalled: health.store_flag(),
            flush_seen: None,
            looks: 0,
            recovering: None,
        });
        commits.push((commit.clone(), store.clone()));
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
        // Saga counts for the metrics: one scan of the stored instances before the consumers
        // run, then kept up to date by the transitions as they commit.
        for s in c.sagas() {
            match crate::saga_stats::load(store.reader(), s.name()) {
                Ok(n) => tracing::debug!(saga = s.name(), instances = n, "saga instances counted"),
                Err(e) => {
                    tracing::error!(saga = s.name(), error = ?e, "saga instances not counted")
                }
            }
        }
        for comp in c.components() {
            for sub in comp.subscriptions() {
                let durable = crate::consumer::durable_name(c.name(), comp.name(), &sub);
                let handled = Arc::new(Handled::default());
                if local.is_some() {
                    locals.push(Arc::new(LocalConsumer::new(
                        rt.clone(),
                        comp.clone(),
                        Arc::new(sub.clone()),
                        durable.as_str().into(),
                        handled.clone(),
                    )));
                }
                consumers.push((c.name(), subjects::stream(sub.source), durable));
                let (rt, comp, stop) = (rt.clone(), comp.clone(), stop_rx.clone());
                actors.push(Supervisor::start(move |_| {
                    ConsumerActor::new(rt, comp, sub, stop, handled)
                }));
            }
        }
        services.push(tokio::spawn(serve_queries(
            bus.client.clone(),
            c.clone(),
            store.clone(),
        )));
        services.push(tokio::spawn(rotate_inbox(c.name(), store, cfg.clone())));
        let sagas = c.sagas();
        if !sagas.is_empty() {
            timers.push(tokio::spawn(saga_service::run_deadlines(
                rt.clone(),
                sagas.clone(),
                stop_rx.clone(),
            )));
            services.push(tokio::spawn(saga_service::report_metrics(sagas.clone())));
            services.push(tokio::spawn(saga_service::serve(
                bus.client.clone(),
                rt.clone(),
                sagas,
            )));
        }
    }
    if let Some(local) = &local {
        local.install(locals);
    }
    services.push(tokio::spawn(poll_consumers(bus.clone(), consumers)));
    services.push(tokio::spawn(faults::serve(
        bus.client.clone(),
        faults.clone(),
        names.clone(),
    )));
    // On a thread of its own: a store stuck inside sled blocks whichever thread calls it,
    // async workers included, and the watchdog must still run then.
    let watchdog = WatchdogState(Arc::new(AtomicU8::new(WATCHDOG_RUNNING)));
    {
        let (state, stall) = (watchdog.0.clone(), cfg.store.flush_stall_ms);
        std::thread::Builder::new()
            .name("store-watchdog".into())
            .spawn(move || store_watchdog(watched, Duration::from_millis(stall), state))
            .map_err(|e| NodeError::Other(e.to_string()))?;
    }
    health.watch_nats(bus.client.clone());
    health.set_ready(true);
    tracing::info!(contexts = ?names, nats = %cfg.nats_url, metrics = %cfg.metrics_addr, "node ready");

    shutdown.await;
    tracing::info!("shutting down: stop pulling, finish in-flight work");
    health.set_ready(false);
    let _ = stop_tx.send(true);
    watchdog.0.store(WATCHDOG_SHUTTING_DOWN, Ordering::SeqCst);
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
    for (commit, store) in commits {
        // What the relay published last is removed now, not when the commit thread next
        // looks (it may not, before the process exits).
        if let Err(e) = store.remove_published() {
            tracing::warn!(error = %e, "outbox: removing published entries failed");
        }
        let _ = commit.durable().await;
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
async fn poll_consumers(bus: Bus, consumers: Vec<(&'static str, String, String)>) {
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

/// A store the watchdog looks after.
struct Watched {
    context: &'static str,
    dir: PathBuf,
    commit: GroupCommit,
    /// Set while the last flush failed.
    failed: Arc<AtomicBool>,
    /// Set by the watchdog while a flush has been running for two looks or more (readiness
    /// reads it, as it reads `failed`).
    stalled: Arc<AtomicBool>,
    /// The flush seen running on the last look, and on how many looks in a row.
    flush_seen: Option<u64>,
    looks: u32,
    /// The recovery flush asked for, while its answer has not come.
    recovering: Option<crate::flusher::DurableReceiver>,
}

const WATCHDOG_RUNNING: u8 = 0;
const WATCHDOG_SHUTTING_DOWN: u8 = 1;
const WATCHDOG_STOPPED: u8 = 2;

/// The watchdog thread's state as `run` sets it; dropped (however `run` ends), it stops the
/// thread at its next look.
struct WatchdogState(Arc<AtomicU8>);

impl Drop for WatchdogState {
    fn drop(&mut self) {
        self.0.store(WATCHDOG_STOPPED, Ordering::SeqCst);
    }
}

/// Looks at every store once a second, on its own thread:
/// - A store whose flush failed (disk full, I/O error) makes the node stop acking its
///   messages and report not ready. Once the store's directory takes a test write again,
///   the store is flushed; sled keeps an I/O error for good (its `global_error`), so if that
///   flush still fails the node restarts in place (executes itself again with the same
///   arguments) and recovers from what is on disk, as after a crash. Unacked messages are
///   redelivered.
/// - A flush seen running on two looks in a row makes the node not ready until it returns.
///   One that has not returned after `stall` (the same flush seen running on that many
///   one-second looks, so a process stopped and continued does not count its pause) will not
///   return: the node restarts in place (while shutting down: exits), since nothing else in
///   the process can get past a store stuck in sled.
fn store_watchdog(mut stores: Vec<Watched>, stall: Duration, state: Arc<AtomicU8>) {
    let tick = Duration::from_secs(1);
    let limit = (stall.as_millis() / tick.as_millis()).max(1) as u32;
    loop {
        std::thread::sleep(tick);
        let now = state.load(Ordering::SeqCst);
        if now == WATCHDOG_STOPPED {
            return;
        }
        for w in &mut stores {
            let context = w.context;
            let running = w.commit.flushing().running();
            w.looks = match (running, w.flush_seen) {
                (Some(n), Some(m)) if n == m => w.looks + 1,
                (running, _) => u32::from(running.is_some()),
            };
            w.flush_seen = running;
            let stalled = w.looks >= 2;
            if w.stalled.swap(stalled, Ordering::SeqCst) != stalled {
                if stalled {
                    tracing::warn!(context, "store flush running for over a second: not ready");
                } else {
                    tracing::info!(context, "store flush returned");
                }
            }
            if w.looks > limit {
                tracing::error!(
                    context,
                    stalled_s = w.looks - 1,
                    "store flush stalled: it will not return"
                );
                if now == WATCHDOG_SHUTTING_DOWN {
                    tracing::error!("exiting instead of stopping cleanly");
                    std::process::exit(70);
                }
                restart_in_place(Restart::FlushStalled);
            }
            if w.recovering.is_none() {
                if now != WATCHDOG_RUNNING || !w.failed.load(Ordering::SeqCst) {
                    continue;
                }
                if let Err(e) = space_probe(&w.dir) {
                    tracing::warn!(context, error = %e, "store still not writable");
                    continue;
                }
                w.recovering = w.commit.request_durable().ok();
            }
            if let Some(rx) = &mut w.recovering {
                use tokio::sync::oneshot::error::TryRecvError;
                match answer_within(rx, tick / 4) {
                    Err(TryRecvError::Empty) => continue,
                    Ok(Ok(())) => tracing::info!(context, "store writable again"),
                    Ok(Err(e)) => {
                        tracing::error!(context, error = %e, "store cannot recover in this process: restarting in place");
                        restart_in_place(Restart::FlushFailed);
                    }
                    Err(TryRecvError::Closed) => {}
                }
                w.recovering = None;
            }
        }
    }
}

/// The flush's answer if it comes within `wait` (looked for every 10 ms).
fn answer_within(
    rx: &mut crate::flusher::DurableReceiver,
    wait: Duration,
) -> Result<Result<(), String>, tokio::sync::oneshot::error::TryRecvError> {
    let until = std::time::Instant::now() + wait;
    loop {
        match rx.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                if std::time::Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Writes, syncs and removes 1 MiB in `dir`.
fn space_probe(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(".space-probe");
    let result = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; 1 << 20])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    result
}

/// Why a node restarted itself in place (the discriminant indexes [`Restart::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// A store's flush failed and still failed once its directory took writes again.
    FlushFailed,
    /// A store's flush did not return.
    FlushStalled,
}

impl Restart {
    const ALL: [Restart; 2] = [Restart::FlushFailed, Restart::FlushStalled];

    fn label(self) -> &'static str {
        match self {
            Restart::FlushFailed => "flush_failed",
            Restart::FlushStalled => "flush_stalled",
        }
    }
}

/// The environment variable that carries the restarts in place so far across the exec:
/// `flush_failed=N,flush_stalled=M`.
const RESTARTS_ENV: &str = "CHOREO_RESTARTS_IN_PLACE";

/// Restarts in place so far, by [`Restart::ALL`], read from `value` (unknown or malformed
/// parts count nothing).
fn restarts_from(value: Option<&str>) -> [u64; 2] {
    let mut counts = [0; 2];
    for part in value.unwrap_or_default().split(',') {
        let Some((label, n)) = part.split_once('=') else {
            continue;
        };
        if let (Some(i), Ok(n)) = (
            Restart::ALL.iter().position(|r| r.label() == label),
            n.parse::<u64>(),
        ) {
            counts[i] = n;
        }
    }
    counts
}

fn restarts_value(counts: [u64; 2]) -> String {
    Restart::ALL
        .iter()
        .zip(counts)
        .map(|(r, n)| format!("{}={n}", r.label()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Sets `choreo_node_restarts_in_place_total` from the environment (0 for every reason in a
/// process started afresh, so the series exist before the first restart).
fn count_restarts_in_place() {
    let counts = restarts_from(std::env::var(RESTARTS_ENV).ok().as_deref());
    for (r, n) in Restart::ALL.iter().zip(counts) {
        metrics::RESTARTS_IN_PLACE
            .with_label_values(&[r.label()])
            .inc_by(n);
    }
    if counts.iter().any(|n| *n > 0) {
        tracing::warn!(restarts = %restarts_value(counts), "this node has restarted itself in place");
    }
}

/// Replaces this process with a fresh run of the same command line (same pid; every file
/// and socket is closed on exec), its restarts in place counted in the environment.
fn restart_in_place(why: Restart) -> ! {
    use std::os::unix::process::CommandExt;
    let mut counts = restarts_from(std::env::var(RESTARTS_ENV).ok().as_deref());
    counts[why as usize] += 1;
    let err = std::env::current_exe()
        .map(|exe| {
            std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env(RESTARTS_ENV, restarts_value(counts))
                .exec()
        })
        .unwrap_or_else(|e| e);
    tracing::error!(error = %err, "cannot restart in place; exiting");
    std::process::exit(70);
}

async fn rotate_inbox(context: &'static str, store: Store, cfg: Arc<NodeConfig>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_in_place_are_counted_across_the_environment() {
        assert_eq!(restarts_from(None), [0, 0]);
        let mut counts = restarts_from(Some("flush_failed=2,flush_stalled=1"));
        assert_eq!(counts, [2, 1]);
        counts[Restart::FlushStalled as usize] += 1;
        assert_eq!(
            restarts_from(Some(&restarts_value(counts))),
            [2, 2],
            "{}",
            restarts_value(counts)
        );
        for (i, r) in Restart::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        // What cannot be read counts nothing.
        assert_eq!(
            restarts_from(Some("flush_failed=x,bogus=3,,flush_stalled")),
            [0, 0]
        );
    }
}
