//! The outbox relay: publishes committed outbox entries to JetStream, then marks them
//! published for the commit thread to remove (`Store::outbox_published`).
//!
//! Entries reach the relay two ways: a scan at start-up (everything left by a previous run)
//! and a hand-over, in memory with their keys, once the transaction that wrote them is
//! durable (the group commit's flusher). The
//! relay reads entries back from the store only past `MAX_HELD`. Entries that are
//! committed but not yet durable are never published, so no event leaves the node without a
//! durable state change behind it. Each batch is published pipelined (all sends, then all
//! acks); an entry is marked published only after its publish ack. A failed publish is
//! retried with back-off; `Nats-Msg-Id` makes a repeated publish a duplicate the server
//! drops.

use std::borrow::Cow;
use std::collections::{btree_map, BTreeMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::{mpsc, watch};

use crate::component::{Published, PublishedHook};
use crate::store::{KeyedEntries, OutboxEntry, Store};
use crate::telemetry::metrics;
use crate::wire::bus::Bus;

/// Entries published per round trip.
const BATCH: usize = 256;

/// Entries the relay holds in memory at most. Past that (a long publish outage while
/// handlers still commit) it keeps only the keys and reads those entries back from the store
/// when their turn comes, so an outage does not grow the heap by whole entries.
const MAX_HELD: usize = 4096;

/// Handle used to hand over durable outbox entries; cheap to clone.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::UnboundedSender<KeyedEntries>,
}

/// What a relay may be started with besides its store and bus.
#[derive(Clone, Default)]
pub struct RelayOptions {
    /// Rules at the `outbox_publish` point.
    #[cfg(feature = "faults")]
    pub faults: Option<std::sync::Arc<crate::faults::Faults>>,
    /// The chaos suite's `[danger] disable_outbox`: entries left by a previous run are
    /// deleted at start, not published.
    #[cfg(feature = "danger")]
    pub forget_at_start: bool,
    /// The application's hooks on published messages (`ContextBuilder::on_published`).
    pub hooks: Vec<PublishedHook>,
    /// The subjects of the commands the context declares it sends to other contexts
    /// (`ContextBuilder::sends`): publishing another context's command not among them is
    /// warned about once per subject, since a secured deployment refuses it.
    pub sends: Vec<String>,
}

impl Relay {
    /// Starts the relay task for one context; it runs until `shutdown` turns true and every
    /// handed-over entry is published (or the bus is gone).
    pub fn start(
        context: &'static str,
        store: Store,
        bus: Bus,
        options: RelayOptions,
        shutdown: watch::Receiver<bool>,
    ) -> (Relay, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let declared = Declared::new(context, &options.sends);
        let out = Out {
            context,
            store,
            bus,
            options,
            declared,
        };
        let handle = tokio::spawn(run(out, rx, shutdown));
        (Relay { tx }, handle)
    }

    /// A handle whose entries go to the returned receiver instead of a relay task (tests).
    #[cfg(test)]
    pub(crate) fn detached() -> (Relay, mpsc::UnboundedReceiver<KeyedEntries>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Relay { tx }, rx)
    }

    /// Hands over entries whose transaction is durable.
    pub fn durable(&self, entries: KeyedEntries) {
        if !entries.is_empty() {
            // The receiver lives as long as the node; if it is gone the entries stay in the
            // store and are published by the next start-up scan.
            let _ = self.tx.send(entries);
        }
    }
}

/// Entries waiting to be published, by key: publishing follows commit order, and an entry
/// handed over twice (by the start-up scan and by the flusher) is one entry. `None`: only the
/// key is held (see [`MAX_HELD`]).
#[derive(Default)]
struct Pending {
    entries: BTreeMap<u64, Option<OutboxEntry>>,
    held: usize,
}

impl Pending {
    fn add(&mut self, entries: KeyedEntries) {
        for (key, entry) in entries {
            if let btree_map::Entry::Vacant(slot) = self.entries.entry(key) {
                let hold = self.held < MAX_HELD;
                self.held += usize::from(hold);
                slot.insert(hold.then_some(entry));
            }
        }
    }

    fn remove(&mut self, key: u64) {
        if let Some(Some(_)) = self.entries.remove(&key) {
            self.held -= 1;
        }
    }
}

/// What the relay publishes with.
struct Out {
    context: &'static str,
    store: Store,
    bus: Bus,
    options: RelayOptions,
    declared: Declared,
}

/// What a context may publish by its declarations: its own events and commands, and the
/// commands it declares it sends to other contexts.
struct Declared {
    own: [String; 2],
    sends: std::collections::HashSet<String>,
}

/// The log-once key of `context` publishing the undeclared `subject`.
fn undeclared(context: &str, subject: &str) -> String {
    format!("undeclared {context} {subject}")
}

impl Declared {
    fn new(context: &str, sends: &[String]) -> Self {
        let ns = crate::wire::subjects::namespace();
        Declared {
            own: [
                format!("{ns}.{context}.evt."),
                format!("{ns}.{context}.cmd."),
            ],
            sends: sends.iter().cloned().collect(),
        }
    }

    /// Whether the context's declarations cover publishing on `subject`.
    fn covers(&self, subject: &str) -> bool {
        self.own.iter().any(|p| subject.starts_with(p.as_str())) || self.sends.contains(subject)
    }

    /// Warns, once per subject, about a publish its declarations do not cover.
    fn check(&self, context: &str, subject: &str) {
        if self.covers(subject) {
            return;
        }
        if crate::telemetry::access::first_time(undeclared(context, subject)) {
            tracing::warn!(context, subject, "publishing a command the context does not declare it sends (ContextBuilder::sends): a secured deployment refuses it and it waits in the outbox (docs/security.md)");
        }
    }
}

async fn run(
    out: Out,
    mut rx: mpsc::UnboundedReceiver<KeyedEntries>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (context, store) = (out.context, &out.store);
    let mut pending = Pending::default();
    match store.outbox_pending() {
        #[cfg(feature = "danger")]
        Ok(entries) if out.options.forget_at_start => {
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
            pending.add(entries);
        }
        Err(e) => tracing::error!(context, error = %e, "outbox: start-up scan failed"),
    }
    let mut backoff = Duration::from_millis(50);
    let mut stopping = false;
    loop {
        if pending.entries.is_empty() {
            if stopping {
                return;
            }
            tokio::select! {
                entries = rx.recv() => match entries {
                    Some(entries) => pending.add(entries),
                    None => return,
                },
                _ = shutdown.changed() => { stopping = true; }
            }
        }
        while let Ok(entries) = rx.try_recv() {
            pending.add(entries);
        }
        let batch: Vec<(u64, Option<&OutboxEntry>)> = pending
            .entries
            .iter()
            .take(BATCH)
            .map(|(k, e)| (*k, e.as_ref()))
            .collect();
        match publish_batch(&out, &batch).await {
            Ok(done) => {
                for k in done {
                    pending.remove(k);
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
            .set(pending.entries.len() as i64);
    }
}

/// Publishes a batch pipelined; returns the keys that are done (acked, or already gone from
/// the store when read back).
async fn publish_batch(
    out: &Out,
    batch: &[(u64, Option<&OutboxEntry>)],
) -> Result<Vec<u64>, String> {
    let Out {
        context,
        store,
        bus,
        ..
    } = out;
    let context: &str = context;
    let started = Instant::now();
    let mut acks_lost = 0usize;
    let mut done = Vec::with_capacity(batch.len());
    let mut sends = Vec::with_capacity(batch.len());
    for &(k, held) in batch {
        let entry = match held {
            Some(e) => Cow::Borrowed(e),
            None => match store.outbox_get(k) {
                Ok(Some(e)) => Cow::Owned(e),
                Ok(None) => {
                    done.push(k);
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            },
        };
        out.declared.check(context, &entry.subject);
        let entry_type = entry.envelope.msg_type.clone();
        // The payload is kept past the publish only for a hook that wants it.
        let hooked = out.options.hooks.iter().any(|h| h.wants(&entry_type));
        let kept = hooked.then(|| entry.payload.clone());
        #[allow(unused_mut)]
        let mut ack_lost = false;
        #[cfg(feature = "faults")]
        if let Some(faults) = &out.options.faults {
            let payload = entry.payload.as_bytes();
            crate::fault!(async faults, OutboxPublish, context, &entry_type, payload, |injected| {
                match injected {
                    crate::faults::Injected::Error => {
                        return Err(format!("injected error publishing {entry_type}"))
                    }
                    crate::faults::Injected::Drop => ack_lost = true,
                }
            });
        }
        let fut = bus
            .js
            .publish_with_headers(
                entry.subject.clone(),
                entry.envelope.to_headers(),
                Bytes::copy_from_slice(entry.payload.as_bytes()),
            )
            .await
            .map_err(|e| e.to_string())?;
        if ack_lost {
            // Published, but the ack is lost: the entry stays and is published again.
            drop(fut);
            acks_lost += 1;
            continue;
        }
        sends.push((k, (entry_type, kept), fut));
    }
    let mut sent = Vec::with_capacity(sends.len());
    let mut futs = Vec::with_capacity(sends.len());
    for (k, meta, fut) in sends {
        sent.push((k, meta));
        futs.push(fut);
    }
    let results = join_all(futs.into_iter().map(std::future::IntoFuture::into_future)).await;
    let mut first_err = None;
    for ((k, (msg_type, kept)), r) in sent.into_iter().zip(results) {
        match r {
            Ok(ack) => {
                store.outbox_published(k);
                if !ack.duplicate {
                    metrics::PUBLISHED
                        .with_label_values(&[context, &msg_type])
                        .inc();
                    if let Some(payload) = &kept {
                        let published = Published {
                            context,
                            msg_type: &msg_type,
                            payload,
                        };
                        for h in out.options.hooks.iter().filter(|h| h.wants(&msg_type)) {
                            (h.hook)(&published);
                        }
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

#[cfg(test)]
mod declared_tests {
    use super::Declared;

    #[test]
    fn its_own_subjects_and_declared_commands_are_covered() {
        let d = Declared::new("orders", &["choreo.payments.cmd.CapturePayment".into()]);
        assert!(d.covers("choreo.orders.evt.OrderPlaced"));
        assert!(d.covers("choreo.orders.cmd.CancelOrder"));
        assert!(d.covers("choreo.payments.cmd.CapturePayment"));
        assert!(!d.covers("choreo.payments.cmd.CancelPayment"));
        assert!(!d.covers("choreo.payments.evt.PaymentCaptured"));
        assert!(!d.covers("choreo.ordersx.evt.OrderPlaced"));
        d.check("orders", "choreo.payments.cmd.CancelPayment");
        d.check("orders", "choreo.payments.cmd.CancelPayment");
        assert!(
            !crate::telemetry::access::first_time(super::undeclared(
                "orders",
                "choreo.payments.cmd.CancelPayment"
            )),
            "warned once"
        );
        assert!(crate::telemetry::access::first_time(super::undeclared(
            "orders",
            "choreo.payments.cmd.Other"
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_entry;

    #[test]
    fn pending_holds_entries_up_to_the_limit_then_keys_only() {
        let mut p = Pending::default();
        p.add(
            (0..MAX_HELD as u64 + 10)
                .map(|k| (k, test_entry(k as u32)))
                .collect(),
        );
        assert_eq!(p.entries.len(), MAX_HELD + 10);
        assert_eq!(p.held, MAX_HELD);
        assert!(p.entries[&(MAX_HELD as u64 - 1)].is_some());
        assert!(p.entries[&(MAX_HELD as u64)].is_none());
        // The same key handed over twice is one entry, counted once.
        p.add(vec![(0, test_entry(0))]);
        assert_eq!((p.entries.len(), p.held), (MAX_HELD + 10, MAX_HELD));
        // Publishing held entries frees room; a key-only entry leaves the count alone.
        p.remove(0);
        p.remove(MAX_HELD as u64 + 1);
        assert_eq!((p.entries.len(), p.held), (MAX_HELD + 8, MAX_HELD - 1));
        p.add(vec![(1_000_000, test_entry(1))]);
        assert!(p.entries[&1_000_000].is_some());
        assert_eq!(p.held, MAX_HELD);
    }
}
