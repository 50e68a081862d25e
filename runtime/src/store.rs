//! The context's local store: sled 0.34 behind a small trait.
//!
//! One sled database per context with these trees:
//! - `state`:  the context's own data (keys namespaced by the domain, e.g. `order/<id>`);
//! - `outbox`: messages to publish, keyed by a monotonic id (big-endian u64);
//! - `inbox-<start ms>`: `<consumer>/<message id>` of every message processed since that
//!   generation started; the newest one is written, the one before it is still read, older
//!   ones are dropped (see [`Store::rotate_inbox`]);
//! - `failures`, `dead_letters`: failed-delivery counts and local dead-letter records.
//!
//! Architecture invariant: one sled transaction writes the state change, the outbox entries
//! and the inbox mark together, so a message's effect and the events it causes are all or
//! nothing. Durability comes only from [`crate::flusher::GroupCommit`].

use std::cell::RefCell;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use crate::config::DangerConfig;
use crate::envelope::Envelope;

/// A store operation failed below the domain (IO, corruption). Transient from the message's
/// point of view: it is retried, never acked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored value under {key:?} is not valid: {message}")]
    Corrupt { key: String, message: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A batch transaction, a flush or the commit thread failed (shared by many messages).
    #[error("{0}")]
    Failed(String),
}

/// A read or write inside a transaction failed; propagate it with `?` so the runtime can
/// retry the transaction on conflict.
#[derive(Debug)]
pub struct TxError(UnabortableTransactionError);

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "transaction: {}", self.0)
    }
}

/// Reads and writes of the `state` tree inside one transaction. Closures using it may run
/// more than once (on conflict): they must have no side effects besides these calls.
pub trait StateTx {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TxError>;
    fn put(&self, key: &str, value: &[u8]) -> Result<(), TxError>;
    fn remove(&self, key: &str) -> Result<(), TxError>;
}

/// Reads of the `state` tree outside a transaction (plans and read-model queries).
pub trait StateRead {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// A message to publish once the transaction that produced it is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub subject: String,
    pub envelope: Envelope,
    /// JSON payload, as sent on the wire.
    pub payload: String,
    /// Business amount carried (metrics only).
    #[serde(default)]
    pub amount_cents: u64,
    /// This node's consumers (durable names) that handled the entry in the transaction that
    /// wrote it (see [`Chain`]); not stored: after a restart its copy takes the usual path,
    /// where their inbox marks absorb it.
    #[serde(skip)]
    pub handled_by: Vec<Arc<str>>,
}

/// Outbox entries with their keys: what a commit wrote, what the relay is handed, what the
/// start-up scan finds.
pub type KeyedEntries = Vec<(u64, OutboxEntry)>;

/// An outbox entry for tests: message `id<n>` of type `X`.
#[cfg(test)]
pub(crate) fn test_entry(n: u32) -> OutboxEntry {
    OutboxEntry {
        subject: "choreo.t.evt.X".into(),
        envelope: Envelope::first(format!("id{n}"), "X", "t", 1),
        payload: format!("{{\"n\":{n}}}"),
        amount_cents: 0,
        handled_by: Vec::new(),
    }
}

/// What a commit did.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// State, outbox and inbox mark written; these outbox entries (with their keys) await
    /// publication. The group commit hands them to the relay in memory, so the answer it
    /// gives the caller has them taken out.
    Written { outbox: KeyedEntries },
    /// The inbox already held the mark: nothing was written.
    Duplicate,
}

/// Error returned by a decide closure: a transaction error to retry, or the handler's own.
#[derive(Debug)]
pub enum DecideError<E> {
    Tx(TxError),
    Handler(E),
}

impl<E> From<TxError> for DecideError<E> {
    fn from(e: TxError) -> Self {
        DecideError::Tx(e)
    }
}

/// A message's decision: its handler run against the state, returning what to publish.
pub type DecideFn<'a, E> = dyn Fn(&dyn StateTx) -> Result<Vec<OutboxEntry>, DecideError<E>> + 'a;

/// One message's part of [`Store::commit_batch`].
pub struct BatchItem<'a, E> {
    pub inbox_key: &'a str,
    pub now_ms: u64,
    /// Runs the handler against the state; may run more than once (see [`StateTx`]).
    pub decide: &'a DecideFn<'a, E>,
}

/// The consumers of a store that handle an outbox entry in the transaction that wrote it
/// (same-node delivery in the sender's transaction, see `local`).
pub trait Chain: Send + Sync {
    /// The handlings of `entry`, decided at `now_ms`, to run in its transaction; none: the
    /// entry takes the usual path.
    fn links(&self, entry: &OutboxEntry, now_ms: u64) -> Vec<Link>;
}

/// One consumer's handling of an outbox entry inside the transaction that wrote it.
pub struct Link {
    /// The consumer's durable name (recorded in [`OutboxEntry::handled_by`]).
    pub consumer: Arc<str>,
    pub inbox_key: String,
    /// The consumer's decision; a `Handler` error (the reason) leaves the entry to the usual
    /// path, writing nothing.
    pub decide: Box<DecideFn<'static, String>>,
}

/// Chained handlings per batch item at most, counting handlings of their own entries (a
/// bound on a loop between two consumers).
pub const MAX_LINKS: usize = 16;

/// What one item of a batch came to; `Err` holds the payload of a panic in its handler.
pub type ItemResult<E> = std::thread::Result<Result<Committed, CommitError<E>>>;

/// Error of a commit: the handler's own error (returned unchanged) or the store's.
#[derive(Debug)]
pub enum CommitError<E> {
    Handler(E),
    Store(StoreError),
}

/// One context's sled database.
#[derive(Clone)]
pub struct Store {
    /// `false` only with `[danger] disable_inbox`.
    dedupe: bool,
    db: sled::Db,
    state: sled::Tree,
    outbox: sled::Tree,
    inbox: Arc<RwLock<Inbox>>,
    failures: sled::Tree,
    dead_letters: sled::Tree,
    /// Outbox keys published and acknowledged, not yet removed (see
    /// [`Store::outbox_published`]).
    published: Arc<Mutex<Vec<u64>>>,
    /// Consumers that handle entries in the transaction that wrote them (see [`Chain`]).
    chain: Arc<OnceLock<Arc<dyn Chain>>>,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(dir, cache_capacity_bytes, &DangerConfig::default())
    }

    /// Like [`Store::open`], with the chaos suite's switches: no inbox check, or sled's
    /// own background flush instead of the group commit.
    pub fn open_with(
        dir: &Path,
        cache_capacity_bytes: u64,
        danger: &DangerConfig,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .mode(sled::Mode::LowSpace)
            // Durability is ours (the group-commit flusher); no background flushes besides.
            .flush_every_ms(danger.disable_group_commit.then_some(1000))
            .open()?;
        Ok(Store {
            dedupe: !danger.disable_inbox,
            state: db.open_tree("state")?,
            outbox: db.open_tree("outbox")?,
            inbox: Arc::new(RwLock::new(Inbox::open(&db, crate::envelope::now_ms())?)),
            failures: db.open_tree("failures")?,
            dead_letters: db.open_tree("dead_letters")?,
            published: Arc::default(),
            chain: Arc::default(),
            db,
        })
    }

    /// Lets `chain`'s consumers handle entries in the transaction that wrote them (once;
    /// later calls are ignored). Without it every entry takes the usual path.
    pub fn link_with(&self, chain: Arc<dyn Chain>) {
        let _ = self.chain.set(chain);
    }

    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// True if the inbox already holds this mark (a cheap pre-check before external calls;
    /// the authoritative check is inside [`Store::commit`]).
    pub fn seen(&self, inbox_key: &str) -> Result<bool, StoreError> {
        if !self.dedupe {
            return Ok(false);
        }
        let inbox = self.inbox();
        Ok(inbox.current.contains_key(inbox_key)? || inbox.in_previous(inbox_key)?)
    }

    fn inbox(&self) -> RwLockReadGuard<'_, Inbox> {
        self.inbox.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `decide` in one transaction with the inbox check and mark, then appends the
    /// returned outbox entries. `decide` may run more than once; a panic in it propagates.
    pub fn commit<E, F>(
        &self,
        inbox_key: &str,
        now_ms: u64,
        decide: F,
    ) -> Result<Committed, CommitError<E>>
    where
        F: Fn(&dyn StateTx) -> Result<Vec<OutboxEntry>, DecideError<E>>,
    {
        let item = BatchItem {
            inbox_key,
            now_ms,
            decide: &decide,
        };
        match self.commit_batch(std::slice::from_ref(&item)).pop() {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => unreachable!("one result per item"),
        }
    }

    /// Runs many messages in one sled transaction, each as if alone: its inbox check, its
    /// `decide` against the state as the earlier items of the batch left it, and, if it
    /// succeeds, its state changes, outbox entries and inbox mark. An item whose handler
    /// fails, or panics (caught, returned as `Err`), writes nothing and does not affect the
    /// others. One result per item, in order.
    ///
    /// Why batch: sled 0.34 seals its I/O buffer at the start of every multi-tree
    /// transaction (`PageCache::pin_log`), so each transaction costs at least one buffer
    /// write and `sync_file_range` on sled's I/O threads, whatever the group commit does.
    pub fn commit_batch<E>(&self, items: &[BatchItem<'_, E>]) -> Vec<ItemResult<E>> {
        // Held for the whole batch: a rotation waits for it, so the marks it writes land in
        // a generation that is still read afterwards.
        let generations = self.inbox();
        // The previous generation is read only, so it is read before the transaction (a
        // plain read inside a transaction would wait for the transaction's own lock).
        let seen_before = items
            .iter()
            .map(|item| Ok(self.dedupe && generations.in_previous(item.inbox_key)?))
            .collect::<Result<Vec<bool>, sled::Error>>();
        let seen_before = match seen_before {
            Ok(seen) => seen,
            Err(e) => return failed(items, &e.to_string()),
        };
        let trees = (&self.state, &self.outbox, &generations.current);
        let result = trees.transaction(|(state, outbox, inbox)| {
            crate::saga_stats::begin();
            let mut results = Vec::with_capacity(items.len());
            for (item, seen_before) in items.iter().zip(&seen_before) {
                if *seen_before || (self.dedupe && inbox.get(item.inbox_key)?.is_some()) {
                    results.push(Ok(Ok(Committed::Duplicate)));
                    continue;
                }
                let (mut entries, mut values) = match decide_in(state, item.decide)? {
                    Decided::Applied(entries, values) => (entries, values),
                    Decided::Handler(e) => {
                        results.push(Ok(Err(CommitError::Handler(e))));
                        continue;
                    }
                    Decided::Panicked(panic) => {
                        results.push(Err(panic));
                        continue;
                    }
                    Decided::Unserializable(e) => {
                        results.push(Ok(Err(CommitError::Store(StoreError::Corrupt {
                            key: "outbox".into(),
                            message: e.to_string(),
                        }))));
                        continue;
                    }
                };
                if let Some(chain) = self.chain.get() {
                    self.run_links(
                        &**chain,
                        state,
                        inbox,
                        item.now_ms,
                        &mut entries,
                        &mut values,
                    )?;
                }
                let mut written = Vec::with_capacity(entries.len());
                for (entry, value) in entries.into_iter().zip(values) {
                    let key = outbox.generate_id()?;
                    outbox.insert_blind(&key.to_be_bytes(), value)?;
                    written.push((key, entry));
                }
                inbox.insert_blind(item.inbox_key.as_bytes(), &item.now_ms.to_be_bytes())?;
                results.push(Ok(Ok(Committed::Written { outbox: written })));
            }
            Ok::<_, ConflictableTransactionError<()>>(results)
        });
        match result {
            Ok(results) => {
                crate::saga_stats::committed();
                results
            }
            Err(e) => {
                crate::saga_stats::begin();
                let message = match e {
                    TransactionError::Storage(e) => e.to_string(),
                    TransactionError::Abort(()) => "transaction aborted".to_string(),
                };
                failed(items, &message)
            }
        }
    }

    /// Runs the chained handlings of `entries` (and of the entries those write, up to
    /// [`MAX_LINKS`]) in the current transaction, after the item's own writes: each as a
    /// batch item of its own (overlay, inbox mark) whose entries are appended. A handling
    /// that fails, panics or was already marked writes nothing, and its entry takes the
    /// usual path.
    fn run_links(
        &self,
        chain: &dyn Chain,
        state: &TransactionalTree,
        inbox: &TransactionalTree,
        now_ms: u64,
        entries: &mut Vec<OutboxEntry>,
        values: &mut Vec<Vec<u8>>,
    ) -> Result<(), UnabortableTransactionError> {
        let (mut next, mut ran) = (0, 0);
        while next < entries.len() && ran < MAX_LINKS {
            for link in chain.links(&entries[next], now_ms) {
                if ran == MAX_LINKS {
                    break;
                }
                // A chained message is new (its id derives from its cause, committed in this
                // transaction), so only the current generation is checked.
                if self.dedupe && inbox.get(link.inbox_key.as_bytes())?.is_some() {
                    continue;
                }
                ran += 1;
                let (out, out_values) = match decide_in(state, &*link.decide)? {
                    Decided::Applied(out, out_values) => (out, out_values),
                    Decided::Handler(reason) => {
                        tracing::debug!(consumer = %link.consumer, %reason, "left to its JetStream copy");
                        continue;
                    }
                    Decided::Panicked(_) | Decided::Unserializable(_) => continue,
                };
                inbox.insert_blind(link.inbox_key.as_bytes(), &now_ms.to_be_bytes())?;
                entries[next].handled_by.push(link.consumer);
                entries.extend(out);
                values.extend(out_values);
            }
            next += 1;
        }
        Ok(())
    }

    /// Outbox entries with their keys, oldest first (used at start-up to resume).
    pub fn outbox_pending(&self) -> Result<KeyedEntries, StoreError> {
        let mut out = Vec::new();
        for kv in self.outbox.iter() {
            let (k, v) = kv?;
            out.push((decode_key(&k), decode_entry(&k, &v)?));
        }
        Ok(out)
    }

    /// One outbox entry, if still pending (the relay reads back entries it did not hold).
    pub fn outbox_get(&self, key: u64) -> Result<Option<OutboxEntry>, StoreError> {
        let k = key.to_be_bytes();
        self.outbox
            .get(k)?
            .map(|v| decode_entry(&k, &v))
            .transpose()
    }

    /// Removes an entry now (start-up only: the chaos suite's "no outbox" switch).
    pub fn outbox_remove(&self, key: u64) -> Result<(), StoreError> {
        self.outbox.remove(key.to_be_bytes())?;
        Ok(())
    }

    /// Marks an entry published; the commit thread removes it (right after it hands its
    /// next batch to the flusher, so the removals go into the log buffer that flush seals
    /// and writes, or on its own when no batch comes). The relay then writes nothing to the
    /// store: a write outside a transaction waits for sled's concurrency-control lock while
    /// the commit thread holds it, blocking an async worker, and leaves a log buffer that
    /// the next transaction seals and sled's I/O pool writes (sled 0.34 rolls the buffer at
    /// every transaction's start); bench/PROFILE.md. Not flushed on its own: if a crash
    /// loses the removal, the entry is published again at start-up and deduplicated
    /// downstream.
    pub fn outbox_published(&self, key: u64) {
        self.published().push(key);
    }

    /// True while published entries wait for their removal.
    pub fn published_waiting(&self) -> bool {
        !self.published().is_empty()
    }

    /// Removes the published entries now (the commit thread, and the node at shutdown).
    pub fn remove_published(&self) -> Result<(), StoreError> {
        let keys = self.take_published();
        for (i, key) in keys.iter().enumerate() {
            if let Err(e) = self.outbox.remove(key.to_be_bytes()) {
                self.published().extend(&keys[i..]);
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_published(&self) -> Vec<u64> {
        std::mem::take(&mut *self.published())
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Inbox marks held, both generations (walks them: tests and tools only).
    pub fn inbox_len(&self) -> usize {
        let inbox = self.inbox();
        inbox.current.len() + inbox.previous.as_ref().map_or(0, sled::Tree::len)
    }

    /// Bounded retention of the inbox: once the current generation is `retention_ms` old, a
    /// new one starts and the one before the current is dropped whole. A mark is so kept
    /// between one and two retention periods, at the cost of one more lookup per message (in
    /// the previous generation) instead of a time-index key per mark and two removals per
    /// expired mark. Returns whether it rotated.
    pub fn rotate_inbox(&self, now_ms: u64, retention_ms: u64) -> Result<bool, StoreError> {
        let dropped = {
            let mut inbox = self.inbox.write().unwrap_or_else(|e| e.into_inner());
            if now_ms < inbox.started_ms.saturating_add(retention_ms.max(1)) {
                return Ok(false);
            }
            let next = self.db.open_tree(Inbox::tree_name(now_ms))?;
            let before = std::mem::replace(&mut inbox.current, next);
            inbox.started_ms = now_ms;
            inbox.previous.replace(before)
        };
        // Nobody else holds the dropped generation's handle: every reader goes through the
        // lock, and the commit thread holds it for a whole batch.
        if let Some(tree) = dropped {
            self.db.drop_tree(tree.name())?;
        }
        Ok(true)
    }

    /// State keys in `[from, to)`, at most `limit`, in key order.
    pub fn state_keys(
        &self,
        from: &str,
        to: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for kv in self.state.range(from.as_bytes()..to.as_bytes()).take(limit) {
            let (k, _) = kv?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    /// The first state key at or after `from`, if it starts with `prefix`.
    pub fn first_key_from(&self, from: &str, prefix: &str) -> Result<Option<String>, StoreError> {
        match self.state.range(from.as_bytes()..).next() {
            Some(kv) => {
                let k = String::from_utf8_lossy(&kv?.0).into_owned();
                Ok(k.starts_with(prefix).then_some(k))
            }
            None => Ok(None),
        }
    }

    /// Removes one state key outside a transaction (index clean-up only).
    pub fn state_remove(&self, key: &str) -> Result<(), StoreError> {
        self.state.remove(key)?;
        Ok(())
    }

    /// Counts one more failed delivery of a message; returns the count. Not flushed on its
    /// own: a count lost in a crash only grants a few more retries.
    pub fn add_failure(&self, key: &str) -> Result<u32, StoreError> {
        let v = self.failures.update_and_fetch(key, |old| {
            let n = old
                .map(|b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])))
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(
            v.map(|b| u32::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 4])))
                .unwrap_or(1),
        )
    }

    /// Forgets the failure count of a message (handled or dead-lettered).
    pub fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        self.failures.remove(key)?;
        Ok(())
    }

    /// Keeps a local record of a dead letter (the dead-letter stream has the message).
    pub fn record_dead_letter(
        &self,
        key: &str,
        record: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.dead_letters
            .insert(key, serde_json::to_vec(record).unwrap_or_default())?;
        Ok(())
    }

    /// Local dead-letter records, oldest key first.
    pub fn dead_letter_records(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut out = Vec::new();
        for kv in self.dead_letters.iter() {
            let (_, v) = kv?;
            out.push(serde_json::from_slice(&v).unwrap_or(serde_json::Value::Null));
        }
        Ok(out)
    }

    /// Read access to the state tree.
    pub fn reader(&self) -> &dyn StateRead {
        self
    }
}

impl StateRead for Store {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.state.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }
}

type Write = (Vec<u8>, Option<Vec<u8>>);

/// One batch item's view of the `state` tree: its own writes over the transaction's (which
/// hold the earlier items' writes). The writes reach the transaction only if the item
/// succeeds.
struct Overlay<'a> {
    tree: &'a TransactionalTree,
    /// One entry per key written (`None`: removed), in first-write order.
    writes: RefCell<Vec<Write>>,
}

impl StateTx for Overlay<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TxError> {
        let writes = self.writes.borrow();
        if let Some((_, v)) = writes.iter().rev().find(|(k, _)| k == key.as_bytes()) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key).map_err(TxError)?.map(|v| v.to_vec()))
    }
    fn put(&self, key: &str, value: &[u8]) -> Result<(), TxError> {
        self.write(key, Some(value.to_vec()));
        Ok(())
    }
    fn remove(&self, key: &str) -> Result<(), TxError> {
        self.write(key, None);
        Ok(())
    }
}

impl Overlay<'_> {
    fn write(&self, key: &str, value: Option<Vec<u8>>) {
        let mut writes = self.writes.borrow_mut();
        match writes.iter_mut().find(|(k, _)| k == key.as_bytes()) {
            Some((_, v)) => *v = value,
            None => writes.push((key.as_bytes().to_vec(), value)),
        }
    }
}

/// What one decision run in a batch transaction came to.
enum Decided<E> {
    /// Its state changes are in the transaction; its outbox entries, with their stored form,
    /// are to be written.
    Applied(Vec<OutboxEntry>, Vec<Vec<u8>>),
    /// The handler's own error: nothing written.
    Handler(E),
    /// The handler panicked (the payload): nothing written.
    Panicked(Box<dyn std::any::Any + Send>),
    /// An outbox entry does not serialize: nothing written.
    Unserializable(serde_json::Error),
}

/// Runs `decide` on its own overlay of `state` and, if it succeeds and its entries
/// serialize, writes its state changes into the transaction; otherwise it writes nothing and
/// its saga counts are taken back. A transaction error is returned for sled to retry.
fn decide_in<E>(
    state: &TransactionalTree,
    decide: &DecideFn<'_, E>,
) -> Result<Decided<E>, UnabortableTransactionError> {
    let mark = crate::saga_stats::mark();
    let tx = Overlay {
        tree: state,
        writes: Default::default(),
    };
    let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decide(&tx)));
    let failed = match decided {
        Ok(Ok(entries)) => match to_values(&entries) {
            Ok(values) => {
                apply(state, tx.writes.into_inner())?;
                return Ok(Decided::Applied(entries, values));
            }
            Err(e) => Decided::Unserializable(e),
        },
        Ok(Err(DecideError::Tx(e))) => return Err(e.0),
        Ok(Err(DecideError::Handler(e))) => Decided::Handler(e),
        Err(panic) => Decided::Panicked(panic),
    };
    crate::saga_stats::discard_since(mark);
    Ok(failed)
}

/// Writes an item's state changes into the transaction. Blind writes (vendored sled patch):
/// `insert`/`remove` read the old value only to return it, a tree lookup per key (5% of the
/// orders node).
fn apply(state: &TransactionalTree, writes: Vec<Write>) -> Result<(), UnabortableTransactionError> {
    for (key, value) in writes {
        match value {
            Some(v) => state.insert_blind(key, v)?,
            None => state.remove_blind(key)?,
        };
    }
    Ok(())
}

/// The entries as stored.
fn to_values(entries: &[OutboxEntry]) -> Result<Vec<Vec<u8>>, serde_json::Error> {
    entries.iter().map(serde_json::to_vec).collect()
}

/// Reads through a transaction, for a chained handling's `plan` (see [`Chain`]).
pub struct TxRead<'a>(pub &'a dyn StateTx);

impl StateRead for TxRead<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0
            .get(key)
            .map_err(|e| StoreError::Failed(e.to_string()))
    }
    fn scan_prefix(&self, _prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Err(StoreError::Failed(
            "no prefix scans inside a transaction".into(),
        ))
    }
}

/// Every item of a batch failed with the store's error.
fn failed<E>(items: &[BatchItem<'_, E>], message: &str) -> Vec<ItemResult<E>> {
    items
        .iter()
        .map(|_| {
            Ok(Err(CommitError::Store(StoreError::Failed(
                message.to_string(),
            ))))
        })
        .collect()
}

/// The inbox's generations (see [`Store::rotate_inbox`]).
struct Inbox {
    /// Where marks are written.
    current: sled::Tree,
    /// When `current` started, ms since the epoch (also in its tree name).
    started_ms: u64,
    /// The generation before `current`: read, never written.
    previous: Option<sled::Tree>,
}

impl Inbox {
    const PREFIX: &'static str = "inbox-";

    fn tree_name(started_ms: u64) -> String {
        // Zero-padded, so that names sort by start.
        format!("{}{started_ms:020}", Self::PREFIX)
    }

    /// The newest two generations, or a first one starting at `now_ms`. Older generations
    /// (a rotation cut short by a crash) are dropped. A store written before generations
    /// existed has one `inbox` tree and a time index `inbox_ts`: the marks become the
    /// previous generation, the index is dropped.
    fn open(db: &sled::Db, now_ms: u64) -> Result<Self, StoreError> {
        let names = db.tree_names();
        let mut generations: Vec<(u64, sled::IVec)> = names
            .iter()
            .filter_map(|n| {
                let started = std::str::from_utf8(n).ok()?.strip_prefix(Self::PREFIX)?;
                Some((started.parse().ok()?, n.clone()))
            })
            .collect();
        generations.sort();
        let has = |name: &str| names.iter().any(|n| n == name.as_bytes());
        if has("inbox_ts") {
            db.drop_tree("inbox_ts")?;
        }
        let (started_ms, current) = match generations.pop() {
            Some((started, name)) => (started, db.open_tree(name)?),
            None => (now_ms, db.open_tree(Self::tree_name(now_ms))?),
        };
        let previous = match generations.pop() {
            Some((_, name)) => Some(db.open_tree(name)?),
            None if has("inbox") => Some(db.open_tree("inbox")?),
            None => None,
        };
        for (_, name) in generations {
            db.drop_tree(name)?;
        }
        if has("inbox") && previous.as_ref().is_some_and(|p| &*p.name() != b"inbox") {
            db.drop_tree("inbox")?;
        }
        Ok(Inbox {
            current,
            started_ms,
            previous,
        })
    }

    fn in_previous(&self, mark: &str) -> Result<bool, sled::Error> {
        match &self.previous {
            Some(tree) => tree.contains_key(mark),
            None => Ok(false),
        }
    }
}

fn decode_key(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[..8]);
    u64::from_be_bytes(b)
}

fn decode_entry(k: &[u8], v: &[u8]) -> Result<OutboxEntry, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: format!("outbox/{}", decode_key(k)),
        message: e.to_string(),
    })
}

/// Reads a JSON value from the state tree inside a transaction.
pub fn load<T: DeserializeOwned>(tx: &dyn StateTx, key: &str) -> Result<Option<T>, StateError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt(format!("{key}: {e}"))),
    }
}

/// Writes a JSON value to the state tree inside a transaction.
pub fn save<T: Serialize>(tx: &dyn StateTx, key: &str, value: &T) -> Result<(), StateError> {
    let bytes =
        serde_json::to_vec(value).map_err(|e| StateError::Corrupt(format!("{key}: {e}")))?;
    tx.put(key, &bytes)?;
    Ok(())
}

/// Reads a JSON value from the state tree outside a transaction.
pub fn read<T: DeserializeOwned>(r: &dyn StateRead, key: &str) -> Result<Option<T>, StateError> {
    match r.get(key).map_err(|e| StateError::Corrupt(e.to_string()))? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt(format!("{key}: {e}"))),
    }
}

/// Reads every JSON value under a key prefix outside a transaction.
pub fn read_all<T: DeserializeOwned>(
    r: &dyn StateRead,
    prefix: &str,
) -> Result<Vec<T>, StateError> {
    r.scan_prefix(prefix)
        .map_err(|e| StateError::Corrupt(e.to_string()))?
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_slice(&v).map_err(|e| StateError::Corrupt(format!("{k}: {e}")))
        })
        .collect()
}

/// Failure of a typed state access.
#[derive(Debug)]
pub enum StateError {
    /// The transaction must be retried; propagate with `?`.
    Tx(TxError),
    /// A stored value could not be decoded or encoded.
    Corrupt(String),
}

impl From<TxError> for StateError {
    fn from(e: TxError) -> Self {
        StateError::Tx(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_err(e: StateError) -> DecideError<String> {
        match e {
            StateError::Tx(t) => DecideError::Tx(t),
            StateError::Corrupt(m) => DecideError::Handler(m),
        }
    }

    /// Counts one more under "n" and publishes `test_entry(n)`.
    fn bump(tx: &dyn StateTx) -> Result<Vec<OutboxEntry>, DecideError<String>> {
        let n: u32 = load(tx, "n").map_err(state_err)?.unwrap_or(0);
        save(tx, "n", &(n + 1)).map_err(state_err)?;
        Ok(vec![test_entry(n)])
    }

    /// Opens the store in `dir` again after this process dropped it. sled's background
    /// threads (a log buffer's write, a segment's truncation) each hold the file, and with
    /// it the lock, until they finish, which can be just after the `Db` is gone: a reopen
    /// waits for them (a node only ever reopens across an exec, which closes the file).
    fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir, 1 << 20) {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                r => return r.unwrap(),
            }
        }
    }

    #[test]
    fn commit_writes_state_outbox_and_inbox_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let r = store
            .commit::<String, _>("c/m1", 10, |tx| {
                tx.put("k", b"v")?;
                Ok(vec![test_entry(1), test_entry(2)])
            })
            .unwrap();
        let Committed::Written { outbox } = r else {
            panic!("not written")
        };
        assert_eq!(outbox.len(), 2);
        assert!(outbox[0].0 < outbox[1].0);
        assert_eq!(store.get("k").unwrap().unwrap(), b"v");
        assert!(store.seen("c/m1").unwrap());
        // What the commit returned is what it stored.
        assert_eq!(store.outbox_pending().unwrap(), outbox);
        assert_eq!(outbox[1].1, test_entry(2));
    }

    #[test]
    fn duplicate_is_not_applied_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(
            store.commit("c/m", 1, bump),
            Ok(Committed::Written { .. })
        ));
        assert!(matches!(
            store.commit("c/m", 2, bump),
            Ok(Committed::Duplicate)
        ));
        assert_eq!(read::<u32>(store.reader(), "n").unwrap(), Some(1));
        assert_eq!(store.outbox_len(), 1);
    }

    #[test]
    fn published_entries_stay_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let keys = |r| match r {
            Ok(Committed::Written { outbox }) => outbox.into_iter().map(|(k, _)| k).collect(),
            _ => panic!("not written"),
        };
        let first: Vec<u64> = keys(store.commit("c/1", 1, bump));
        let second: Vec<u64> = keys(store.commit("c/2", 1, bump));
        store.outbox_published(first[0]);
        assert!(store.published_waiting());
        // Marked, not removed: the relay writes nothing itself.
        assert_eq!(store.outbox_len(), 2);
        store.remove_published().unwrap();
        assert!(!store.published_waiting());
        let left: Vec<u64> = store
            .outbox_pending()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, second);
        store.remove_published().unwrap();
        assert_eq!(store.outbox_len(), 1);
    }

    #[test]
    fn batch_items_see_earlier_items_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let fail = |tx: &dyn StateTx| -> Result<Vec<OutboxEntry>, DecideError<String>> {
            tx.put("n", b"99")?;
            Err(DecideError::Handler("no".into()))
        };
        let boom = |tx: &dyn StateTx| -> Result<Vec<OutboxEntry>, DecideError<String>> {
            tx.put("n", b"99")?;
            panic!("boom")
        };
        let item = |inbox_key, decide| BatchItem {
            inbox_key,
            now_ms: 1,
            decide,
        };
        let results = store.commit_batch(&[
            item("c/a", &bump),
            item("c/b", &fail),
            item("c/c", &boom),
            item("c/d", &bump),
            item("c/a", &bump),
        ]);
        let shown: Vec<String> = results
            .into_iter()
            .map(|r| match r {
                Ok(Ok(Committed::Written { outbox })) => {
                    format!("written {}", outbox.len())
                }
                Ok(Ok(Committed::Duplicate)) => "duplicate".into(),
                Ok(Err(CommitError::Handler(e))) => format!("handler {e}"),
                Ok(Err(CommitError::Store(e))) => format!("store {e}"),
                Err(_) => "panicked".into(),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "written 1",
                "handler no",
                "panicked",
                "written 1",
                "duplicate"
            ]
        );
        // The second bump saw the first; the failed items wrote nothing.
        assert_eq!(read::<u32>(store.reader(), "n").unwrap(), Some(2));
        let pending: Vec<OutboxEntry> = store
            .outbox_pending()
            .unwrap()
            .into_iter()
            .map(|(_, e)| e)
            .collect();
        assert_eq!(pending, vec![test_entry(0), test_entry(1)]);
        assert!(store.seen("c/a").unwrap() && store.seen("c/d").unwrap());
        assert!(!store.seen("c/b").unwrap() && !store.seen("c/c").unwrap());
    }

    /// Links `X` entries to consumer `c` (fails on n = 1, panics on n = 2, otherwise counts
    /// under "c" and sends a `Y`) and, with `looping`, `Y` entries to consumer `l` (sends
    /// another `Y`).
    struct TestChain {
        looping: bool,
    }

    fn entry(id: String, msg_type: &str, n: u32) -> OutboxEntry {
        OutboxEntry {
            subject: format!("choreo.t.evt.{msg_type}"),
            envelope: Envelope::first(id, msg_type, "t", 1),
            payload: format!("{{\"n\":{n}}}"),
            amount_cents: 0,
            handled_by: Vec::new(),
        }
    }

    impl Chain for TestChain {
        fn links(&self, e: &OutboxEntry, _now_ms: u64) -> Vec<Link> {
            let n: u32 = serde_json::from_str::<serde_json::Value>(&e.payload).unwrap()["n"]
                .as_u64()
                .unwrap() as u32;
            let id = e.envelope.id.clone();
            let (consumer, decide): (&str, Box<DecideFn<'static, String>>) =
                match e.envelope.msg_type.as_str() {
                    "X" => (
                        "c",
                        Box::new(move |tx| {
                            tx.put("junk", b"1")?;
                            match n {
                                1 => Err(DecideError::Handler("no".into())),
                                2 => panic!("boom"),
                                _ => {
                                    tx.remove("junk")?;
                                    let c: u32 = load(tx, "c").map_err(state_err)?.unwrap_or(0);
                                    save(tx, "c", &(c + 1)).map_err(state_err)?;
                                    Ok(vec![entry(format!("{id}-y"), "Y", n)])
                                }
                            }
                        }),
                    ),
                    "Y" if self.looping => (
                        "l",
                        Box::new(move |_| Ok(vec![entry(format!("{id}-y"), "Y", n)])),
                    ),
                    _ => return Vec::new(),
                };
            vec![Link {
                consumer: consumer.into(),
                inbox_key: format!("{consumer}/{}", e.envelope.id),
                decide,
            }]
        }
    }

    #[test]
    fn chained_handlings_commit_with_their_cause_or_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store.link_with(Arc::new(TestChain { looping: false }));
        let sends = |n: u32| {
            move |_: &dyn StateTx| -> Result<Vec<OutboxEntry>, DecideError<String>> {
                Ok(vec![entry(format!("x{n}"), "X", n)])
            }
        };
        let (zero, one, two) = (sends(0), sends(1), sends(2));
        let item = |inbox_key, decide| BatchItem {
            inbox_key,
            now_ms: 1,
            decide,
        };
        let results =
            store.commit_batch(&[item("m/0", &zero), item("m/1", &one), item("m/2", &two)]);
        let written: Vec<Vec<(String, Vec<Arc<str>>)>> = results
            .into_iter()
            .map(|r| match r {
                Ok(Ok(Committed::Written { outbox })) => outbox
                    .into_iter()
                    .map(|(_, e)| (e.envelope.id, e.handled_by))
                    .collect(),
                other => panic!("not written: {:?}", other.map(|r| r.is_ok())),
            })
            .collect();
        // x0 was handled by "c" in its transaction, and what that sent follows it; x1 (the
        // handler failed) and x2 (it panicked) take the usual path.
        assert_eq!(
            written,
            [
                vec![("x0".into(), vec!["c".into()]), ("x0-y".into(), vec![])],
                vec![("x1".into(), vec![])],
                vec![("x2".into(), vec![])],
            ]
        );
        assert_eq!(read::<u32>(store.reader(), "c").unwrap(), Some(1));
        assert_eq!(
            store.get("junk").unwrap(),
            None,
            "failed handlings wrote nothing"
        );
        assert!(store.seen("c/x0").unwrap());
        assert!(!store.seen("c/x1").unwrap() && !store.seen("c/x2").unwrap());
        // Stored as sent: the handled-by list is not part of the entry.
        let stored = store.outbox_pending().unwrap();
        assert_eq!(stored.len(), 4);
        assert!(stored.iter().all(|(_, e)| e.handled_by.is_empty()));
        // A handling of x0 (its copy) later is a duplicate.
        assert!(matches!(
            store.commit("c/x0", 2, bump),
            Ok(Committed::Duplicate)
        ));
    }

    #[test]
    fn a_loop_of_chained_handlings_stops_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store.link_with(Arc::new(TestChain { looping: true }));
        let r = store.commit::<String, _>("m/0", 1, |_| Ok(vec![entry("y".into(), "Y", 0)]));
        let Ok(Committed::Written { outbox }) = r else {
            panic!("not written")
        };
        // The first entry and one more per handling; the last one is left unhandled.
        assert_eq!(outbox.len(), 1 + MAX_LINKS);
        let handled = outbox
            .iter()
            .filter(|(_, e)| !e.handled_by.is_empty())
            .count();
        assert_eq!(handled, MAX_LINKS);
        assert!(outbox.last().unwrap().1.handled_by.is_empty());
    }

    #[test]
    fn handler_error_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let r = store.commit("c/m", 1, |tx| {
            tx.put("k", b"v")?;
            Err::<Vec<OutboxEntry>, _>(DecideError::Handler("no".to_string()))
        });
        assert!(matches!(r, Err(CommitError::Handler(ref e)) if e == "no"));
        assert!(store.get("k").unwrap().is_none());
        assert!(!store.seen("c/m").unwrap());
        assert_eq!(store.outbox_len(), 0);
    }

    #[test]
    fn inbox_marks_last_one_to_two_retention_periods() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let now = crate::envelope::now_ms();
        let day = 86_400_000;
        store.commit::<String, _>("c/old", 1, bump).unwrap();
        assert!(
            !store.rotate_inbox(now + day / 2, day).unwrap(),
            "too early"
        );
        assert!(store.rotate_inbox(now + day, day).unwrap());
        // The previous generation is still read, by the pre-check and by the transaction.
        assert!(store.seen("c/old").unwrap());
        assert_eq!(
            store.commit("c/old", 2, bump).unwrap(),
            Committed::Duplicate
        );
        store.commit::<String, _>("c/new", 3, bump).unwrap();
        assert_eq!(store.inbox_len(), 2);
        assert!(store.rotate_inbox(now + 2 * day, day).unwrap());
        assert!(!store.seen("c/old").unwrap());
        assert!(store.seen("c/new").unwrap());
        assert_eq!(store.inbox_len(), 1);
        // Only the two newest generations are left, and they survive a restart.
        store.db().flush().unwrap();
        drop(store);
        let store = reopen(dir.path());
        let generations = store
            .db()
            .tree_names()
            .iter()
            .filter(|n| n.starts_with(Inbox::PREFIX.as_bytes()))
            .count();
        assert_eq!(generations, 2);
        assert!(store.seen("c/new").unwrap() && !store.seen("c/old").unwrap());
        assert_eq!(read::<u32>(store.reader(), "n").unwrap(), Some(2));
    }

    #[test]
    fn marks_from_before_generations_are_kept_one_period() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout before generations: one `inbox` tree and its time index.
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("inbox")
                .unwrap()
                .insert("c/m", &[0u8; 8])
                .unwrap();
            db.open_tree("inbox_ts").unwrap().insert("x", &[]).unwrap();
            db.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert!(store.seen("c/m").unwrap());
        let has = |name: &str| store.db().tree_names().iter().any(|n| n == name.as_bytes());
        assert!(!has("inbox_ts"));
        // They are the previous generation: gone with the first rotation, one retention
        // period after the upgrade.
        let now = crate::envelope::now_ms();
        assert!(!store.rotate_inbox(now + 500, 1000).unwrap());
        assert!(store.seen("c/m").unwrap());
        assert!(store.rotate_inbox(now + 1000, 1000).unwrap());
        assert!(!store.seen("c/m").unwrap());
        assert!(!has("inbox"));
    }

    #[test]
    fn failures_count_up_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.add_failure("c/1").unwrap(), 1);
        assert_eq!(store.add_failure("c/1").unwrap(), 2);
        assert_eq!(store.add_failure("c/2").unwrap(), 1);
        store.clear_failures("c/1").unwrap();
        assert_eq!(store.add_failure("c/1").unwrap(), 1);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            store
                .commit::<String, _>("c/m", 1, |_| Ok(vec![test_entry(7)]))
                .unwrap();
            store.db().flush().unwrap();
        }
        let store = reopen(dir.path());
        let pending = store.outbox_pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].1, test_entry(7));
        assert!(store.seen("c/m").unwrap());
    }
}
