//! The outbox relay: publishes committed outbox entries to JetStream, then deletes them.
//!
//! Entries reach the relay two ways: a scan at start-up (everything left by a previous run)
//! and a notification from a handler after its transaction was made durable. Entries that
//! are committed but not yet durable are never published, so no event leaves the node
//! without a durable state change behind it. Each batch is published pipelined (all sends,
//! then all acks); an entry is deleted only after its publish ack. A failed publish is
//! retried with back-off; `Nats-Msg-Id` makes a repeated publish a duplicate the server drops.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::{mpsc, watch};

use crate::bus::Bus;
use crate::faults::{FaultAction, FaultPoint, Faults};
use crate::metrics;
use crate::store::Store;

/// Entries published per round trip.
const BATCH: usize = 256;

/// Handle used by handlers to hand over durable outbox keys.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::UnboundedSender<Vec<u64>>,
}

impl Relay {
    /// Starts the relay task for one context; it runs until `shutdown` turns true and every
    /// handed-over entry is published (or the bus is gone). `resume: false` is the chaos
    /// suite's "no outbox" switch: entries left by a previous run are deleted, not published.
    pub fn start(
        context: &'static str,
        store: Store,
        bus: Bus,
        faults: Arc<Faults>,
        resume: bool,
        shutdown: watch::Receiver<bool>,
    ) -> (Relay, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let out = Out {
            context,
            store,
            bus,
            faults,
        };
        let handle = tokio::spawn(run(out, resume, rx, shutdown));
        (Relay { tx }, handle)
    }

    /// A handle whose keys go to the returned receiver instead of a relay task (tests).
    #[cfg(test)]
    pub(crate) fn detached() -> (Relay, mpsc::UnboundedReceiver<Vec<u64>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Relay { tx }, rx)
    }

    /// Hands over keys whose transaction is durable.
    pub fn durable(&self, keys: Vec<u64>) {
        if !keys.is_empty() {
            // The receiver lives as long as the node; if it is gone the entries stay in the
            // store and are published by the next start-up scan.
            let _ = self.tx.send(keys);
        }
    }
}

/// What the relay publishes with.
struct Out {
    context: &'static str,
    store: Store,
    bus: Bus,
    faults: Arc<Faults>,
}

async fn run(
    out: Out,
    resume: bool,
    mut rx: mpsc::UnboundedReceiver<Vec<u64>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (context, store) = (out.context, &out.store);
    let mut pending: BTreeSet<u64> = BTreeSet::new();
    match store.outbox_pending() {
        Ok(entries) if !resume => {
            tracing::error!(
                context,
                entries = entries.len(),
                "outbox DISABLED ([danger]): forgetting entries left by the previous run"
            );
            for (k, _) in entries {
                let _ = store.outbox_remove(k);
            }
        }
        Ok(entries) => {
            if !entries.is_empty() {
                tracing::info!(context, entries = entries.len(), "outbox: resuming");
            }
            pending.extend(entries.into_iter().map(|(k, _)| k));
        }
        Err(e) => tracing::error!(context, error = %e, "outbox: start-up scan failed"),
    }
    let mut backoff = Duration::from_millis(50);
    let mut stopping = false;
    loop {
        if pending.is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                keys = rx.recv() => match keys {
                    Some(keys) => pending.extend(keys),
                    None => return,
                },
                _ = shutdown.changed() => { stopping = true; }
            }
        }
        while let Ok(keys) = rx.try_recv() {
            pending.extend(keys);
        }
        let batch: Vec<u64> = pending.iter().take(BATCH).copied().collect();
        match publish_batch(&out, &batch).await {
            Ok(done) => {
                for k in done {
                    pending.remove(&k);
                }
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::warn!(context, error = %e, retry_in = ?backoff, "outbox: publish failed");
                if stopping && *shutdown.borrow() {
                    // Leave the rest for the next start; never spin at shutdown.
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => { stopping = true; }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        metrics::OUTBOX_DEPTH
            .with_label_values(&[context])
            .set(store.outbox_len() as i64);
    }
}

/// Publishes a batch pipelined; returns the keys that are done (acked, or already gone).
async fn publish_batch(out: &Out, keys: &[u64]) -> Result<Vec<u64>, String> {
    let Out {
        context,
        store,
        bus,
        faults,
    } = out;
    let context: &str = context;
    let started = Instant::now();
    let mut acks_lost = 0usize;
    let mut done = Vec::with_capacity(keys.len());
    let mut sends = Vec::with_capacity(keys.len());
    for &k in keys {
        let entry = match store.outbox_get(k) {
            Ok(Some(e)) => e,
            Ok(None) => {
                done.push(k);
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        let (entry_type, entry_amount) = (entry.envelope.msg_type.clone(), entry.amount_cents);
        let fault = faults.fire(
            FaultPoint::OutboxPublish,
            context,
            &entry_type,
            entry.payload.as_bytes(),
        );
        match fault.as_ref().map(|f| f.action) {
            Some(FaultAction::Crash) => {
                crate::consumer::crash(FaultPoint::OutboxPublish, &entry_type)
            }
            Some(FaultAction::Error) => {
                return Err(format!("injected error publishing {entry_type}"))
            }
            Some(FaultAction::Delay) => {
                let ms = fault.as_ref().map_or(0, |f| f.delay_ms);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            _ => {}
        }
        let fut = bus
            .js
            .publish_with_headers(
                entry.subject.clone(),
                entry.envelope.to_headers(),
                Bytes::from(entry.payload.into_bytes()),
            )
            .await
            .map_err(|e| e.to_string())?;
        if fault.is_some_and(|f| f.action == FaultAction::Drop) {
            // Published, but the ack is lost: the entry stays and is published again.
            drop(fut);
            acks_lost += 1;
            continue;
        }
        sends.push((k, (entry_type, entry_amount), fut));
    }
    let mut sent = Vec::with_capacity(sends.len());
    let mut futs = Vec::with_capacity(sends.len());
    for (k, meta, fut) in sends {
        sent.push((k, meta));
        futs.push(fut);
    }
    let results = join_all(futs.into_iter().map(std::future::IntoFuture::into_future)).await;
    let mut first_err = None;
    for ((k, (msg_type, amount)), r) in sent.into_iter().zip(results) {
        match r {
            Ok(ack) => {
                store.outbox_remove(k).map_err(|e| e.to_string())?;
                if !ack.duplicate {
                    metrics::PUBLISHED
                        .with_label_values(&[context, &msg_type])
                        .inc();
                    if amount > 0 {
                        metrics::PUBLISHED_AMOUNT
                            .with_label_values(&[context, &msg_type])
                            .inc_by(amount);
                    }
                }
                let result = if ack.duplicate { "duplicate" } else { "stored" };
                metrics::OUTBOX_PUBLISHED
                    .with_label_values(&[context, result])
                    .inc();
                done.push(k);
            }
            Err(e) => {
                metrics::OUTBOX_PUBLISHED
                    .with_label_values(&[context, "error"])
                    .inc();
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    metrics::OUTBOX_PUBLISH_SECONDS
        .with_label_values(&[context])
        .observe(started.elapsed().as_secs_f64());
    match first_err {
        // Keys that did publish are removed; the caller retries the rest.
        Some(e) if done.is_empty() => Err(e),
        None if done.is_empty() && acks_lost > 0 => Err(format!("{acks_lost} publish acks lost")),
        _ => Ok(done),
    }
}
