//! The context's local store: sled 0.34 behind a small API.
//!
//! One sled database per context with these trees:
//! - `state`: the context's own data (keys namespaced by the domain, e.g. `order/<id>`),
//!   read and written through [`StateTx`] and [`StateRead`];
//! - `outbox`: messages to publish, keyed by a monotonic id (big-endian u64) ([`outbox`]);
//! - `inbox-<start ms>`: `<consumer>/<message id>` of every message processed since that
//!   generation started ([`inbox`]);
//! - `failures`, `dead_letters`: failed-delivery counts and local dead-letter records
//!   ([`records`]);
//! - `meta`: `outbox_base`, added to sled's id generator for outbox keys, so that a store
//!   restored from a changelog takes new keys above every replayed one ([`changes`]).
//!
//! With a changelog, every write of a transaction is also returned as data
//! ([`changes::Change`], in [`Committed::Written`]), and writes outside transactions are
//! kept for the next record ([`Store::take_unlogged`]); local records (`failures`,
//! `dead_letters`) are not replicated.
//!
//! Architecture invariant: one sled transaction writes the state change, the outbox entries
//! and the inbox mark together ([`batch`]), so a message's effect and the messages it causes
//! are all or nothing. Durability comes only from the pipeline's group commit.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

pub mod batch;
pub mod chain;
pub mod changes;
pub mod inbox;
pub mod outbox;
pub mod records;
pub mod state;

pub use batch::{BatchItem, CommitError, Committed, DecideError, DecideFn, Effects, ItemResult};
pub use chain::{Chain, Link, TxRead, MAX_LINKS};
pub use changes::Change;
pub use outbox::{KeyedEntries, OutboxEntry};
pub use state::{load, read, read_all, save, StateError, StateRead, StateTx, TxError};

use inbox::Inbox;

const OUTBOX_BASE: &[u8] = b"outbox_base";

/// A store operation failed below the domain (IO, corruption). Transient from the message's
/// point of view: it is retried, never acked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (IO, or corruption it detected).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value under `key` cannot be decoded, or a value to store cannot be encoded;
    /// `message` says why.
    #[error("stored value under {key:?} is not valid: {message}")]
    Corrupt {
        /// Where the value is (`meta/outbox_base`, `outbox/<id>`; `outbox` for an entry
        /// being written).
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A file system operation around the database failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A batch transaction, a flush or the commit thread failed (shared by many messages).
    #[error("{0}")]
    Failed(String),
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// sled's page cache in bytes.
    pub cache_capacity_bytes: u64,
    /// Record every write as data for a changelog ([`changes`]).
    pub log_changes: bool,
    /// The chaos suite's `[danger] disable_inbox`: no inbox check.
    #[cfg(feature = "danger")]
    pub no_inbox: bool,
    /// The chaos suite's `[danger] disable_group_commit`: sled flushes in the background
    /// every second instead of the group commit.
    #[cfg(feature = "danger")]
    pub background_flush: bool,
}

impl Options {
    /// The defaults with a cache of `cache_capacity_bytes`.
    pub fn with_cache(cache_capacity_bytes: u64) -> Self {
        Options {
            cache_capacity_bytes,
            log_changes: false,
            #[cfg(feature = "danger")]
            no_inbox: false,
            #[cfg(feature = "danger")]
            background_flush: false,
        }
    }
}

/// One context's sled database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// `false` only with `[danger] disable_inbox`.
    #[cfg(feature = "danger")]
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
    /// Consumers that handle entries in the transaction that wrote them (see [`chain`]).
    chain: Arc<OnceLock<Arc<dyn Chain>>>,
    meta: sled::Tree,
    /// Added to sled's generated ids for outbox keys (see the module doc).
    outbox_base: Arc<AtomicU64>,
    log_changes: bool,
    /// Writes outside transactions not yet in a changelog record.
    unlogged: Arc<Mutex<Vec<Change>>>,
}

impl Store {
    /// Opens (or creates) the database in `dir` with default options and this cache size.
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(dir, &Options::with_cache(cache_capacity_bytes))
    }

    /// Opens (or creates) the database in `dir`.
    pub fn open_with(dir: &Path, options: &Options) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        // Durability is ours (the group commit); no background flushes besides.
        #[allow(unused_mut)]
        let mut flush_every_ms = None;
        #[cfg(feature = "danger")]
        if options.background_flush {
            flush_every_ms = Some(1000);
        }
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity_bytes)
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(flush_every_ms)
            .open()?;
        let meta = db.open_tree("meta")?;
        let outbox_base = match meta.get(OUTBOX_BASE)? {
            Some(v) => {
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "meta/outbox_base".into(),
                    message: format!("{} bytes, not 8", v.len()),
                })?)
            }
            None => 0,
        };
        Ok(Store {
            #[cfg(feature = "danger")]
            dedupe: !options.no_inbox,
            state: db.open_tree("state")?,
            outbox: db.open_tree("outbox")?,
            inbox: Arc::new(RwLock::new(Inbox::open(
                &db,
                crate::wire::envelope::now_ms(),
            )?)),
            failures: db.open_tree("failures")?,
            dead_letters: db.open_tree("dead_letters")?,
            published: Arc::default(),
            chain: Arc::default(),
            meta,
            outbox_base: Arc::new(AtomicU64::new(outbox_base)),
            log_changes: options.log_changes,
            unlogged: Arc::default(),
            db,
        })
    }

    /// The next outbox keys are at least `base` (kept in `meta`).
    fn raise_outbox_base(&self, base: u64) -> Result<(), StoreError> {
        if base > self.outbox_base.load(Ordering::SeqCst) {
            self.meta.insert(OUTBOX_BASE, &base.to_be_bytes())?;
            self.outbox_base.store(base, Ordering::SeqCst);
        }
        Ok(())
    }

    /// What outbox keys are generated above.
    pub(crate) fn outbox_base(&self) -> u64 {
        self.outbox_base.load(Ordering::SeqCst)
    }

    /// Lets `chain`'s consumers handle entries in the transaction that wrote them (once;
    /// later calls are ignored). Without it every entry takes the usual path.
    pub fn link_with(&self, chain: Arc<dyn Chain>) {
        let _ = self.chain.set(chain);
    }

    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Whether the inbox is checked (always, unless `[danger] disable_inbox`).
    fn dedupe(&self) -> bool {
        #[cfg(feature = "danger")]
        return self.dedupe;
        #[cfg(not(feature = "danger"))]
        true
    }

    fn inbox(&self) -> RwLockReadGuard<'_, Inbox> {
        self.inbox.read().unwrap_or_else(|e| e.into_inner())
    }

    /// True if the inbox already holds this mark (a cheap pre-check before external calls;
    /// the authoritative check is inside the transaction, [`Store::commit_batch`]).
    pub fn seen(&self, inbox_key: &str) -> Result<bool, StoreError> {
        if !self.dedupe() {
            return Ok(false);
        }
        let inbox = self.inbox();
        Ok(inbox.current.contains_key(inbox_key)? || inbox.in_previous(inbox_key)?)
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
        self.log_outside(|| Change::State(key.as_bytes().to_vec(), None));
        Ok(())
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

/// Helpers for the store's tests and its neighbours'.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::wire::envelope::Envelope;

    /// An outbox entry for tests: message `id<n>` of type `X`.
    pub(crate) fn test_entry(n: u32) -> OutboxEntry {
        OutboxEntry {
            subject: "choreo.t.evt.X".into(),
            envelope: Envelope::first(format!("id{n}"), "X", "t", 1),
            payload: format!("{{\"n\":{n}}}"),
        }
    }

    /// Opens the store in `dir` again after this process dropped it. sled's background
    /// threads (a log buffer's write, a segment's truncation) each hold the file, and with
    /// it the lock, until they finish, which can be just after the `Db` is gone: a reopen
    /// waits for them (a node only ever reopens across an exec, which closes the file).
    pub(crate) fn reopen(dir: &Path) -> Store {
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

    pub(crate) fn state_err(e: StateError) -> DecideError<String> {
        match e {
            StateError::Tx(t) => DecideError::Tx(t),
            StateError::Corrupt(m) => DecideError::Handler(m),
        }
    }

    /// Counts one more under "n" and publishes `test_entry(n)`.
    pub(crate) fn bump(tx: &dyn StateTx) -> Result<Effects, DecideError<String>> {
        let n: u32 = load(tx, "n").map_err(state_err)?.unwrap_or(0);
        save(tx, "n", &(n + 1)).map_err(state_err)?;
        Ok(Effects::outbox(vec![test_entry(n)]))
    }
}
