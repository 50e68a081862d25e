//! Replication of a context's committed batches to its partition's changelog, by the
//! flusher thread: after the flush and before any of the batch's messages is acked or any of
//! its outbox entries is handed to the relay, the writes of every message of the flush (and
//! the writes made outside transactions since the last one) are appended as one record (or
//! several, split between messages, when large). An append that does not land fails the
//! whole flush as a failed flush would: nothing of it is acked or published.
//!
//! Only the owner of the partition appends, and only while its lease is valid by its own
//! clock ([`Lease::valid`]); the server refuses an append that names a stale last sequence,
//! which is what a node fenced off by a new owner's first record does. Either way the node
//! gives the partition up ([`Lease::lose`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::store::changes::{encode, encoded_len};
use crate::store::{Change, Store};
use crate::telemetry::metrics;
use crate::wire::changelog::{AppendError, Changelog};

/// Records stay below this size (the server's default `max_payload` is 1 MiB); a single
/// message's writes larger than this go alone in a record of their own.
const MAX_RECORD_BYTES: usize = 512 * 1024;

/// How long the flusher waits between two tries of an append that got no answer.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// The partition's lease as the flusher sees it.
pub trait Lease: Send + Sync {
    /// True while the lease is valid by this node's monotonic clock.
    fn valid(&self) -> bool;
    /// The lease's fencing epoch (the bucket revision at which it was taken).
    fn epoch(&self) -> u64;
    /// Gives the partition up now: stop serving it (`reason`: `taken`, `expired`).
    fn lose(&self, reason: &'static str);
}

/// What the flusher needs to append to the changelog.
pub struct Replication {
    /// The context's name (the `context` label of the changelog metrics).
    pub(crate) context: &'static str,
    /// The partition's changelog.
    pub(crate) changelog: Changelog,
    /// The partition's lease.
    pub(crate) lease: Arc<dyn Lease>,
    /// The sequence of the partition's last record (restored, or appended by this node).
    pub(crate) last: u64,
    /// The tokio runtime the flusher thread blocks on for each append.
    pub(crate) runtime: tokio::runtime::Handle,
    /// The context's store (its writes outside transactions).
    pub(crate) store: Store,
}

impl Replication {
    /// Appends the writes of one flush: `messages` (one list per message, in commit order)
    /// after the store's writes outside transactions. Blocks until they landed, or fails.
    pub fn append(&mut self, messages: Vec<Vec<Change>>) -> Result<(), String> {
        let mut parts = vec![self.store.take_unlogged()];
        parts.extend(messages);
        let mut records: Vec<Vec<u8>> = Vec::new();
        let mut record = Vec::new();
        for part in parts.iter().filter(|p| !p.is_empty()) {
            let size: usize = part.iter().map(encoded_len).sum();
            if !record.is_empty() && record.len() + size > MAX_RECORD_BYTES {
                records.push(std::mem::take(&mut record));
            }
            encode(part, &mut record);
        }
        if !record.is_empty() {
            records.push(record);
        }
        for record in records {
            self.append_one(Bytes::from(record))?;
        }
        Ok(())
    }

    /// Appends one record after the partition's last one, retrying while no answer comes and
    /// the lease is valid.
    pub fn append_one(&mut self, record: Bytes) -> Result<(), String> {
        let id = format!("{}-{}-{}", self.context, self.lease.epoch(), self.last);
        loop {
            if !self.lease.valid() {
                metrics::FENCED
                    .with_label_values(&[self.context, "self_fenced"])
                    .inc();
                self.lease.lose("expired");
                return Err("the partition's lease ran out: not appended".into());
            }
            let appended = self.runtime.block_on(self.changelog.append(
                record.clone(),
                self.last,
                &id,
                self.lease.epoch(),
            ));
            match appended {
                Ok(seq) => {
                    self.last = seq;
                    metrics::CHANGELOG_APPENDS
                        .with_label_values(&[self.context])
                        .inc();
                    metrics::CHANGELOG_SEQUENCE
                        .with_label_values(&[self.context])
                        .set(seq as i64);
                    metrics::CHANGELOG_SINCE_SNAPSHOT
                        .with_label_values(&[self.context])
                        .inc();
                    return Ok(());
                }
                Err(e @ AppendError::Fenced { .. }) => {
                    metrics::FENCED
                        .with_label_values(&[self.context, "refused"])
                        .inc();
                    self.lease.lose("taken");
                    return Err(e.to_string());
                }
                Err(e) => {
                    tracing::warn!(context = self.context, error = %e, "changelog append failed; retrying");
                    std::thread::sleep(RETRY_EVERY);
                }
            }
        }
    }
}
