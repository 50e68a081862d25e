//! The batch transaction: many messages' decisions in one sled transaction, each as if
//! alone, with its inbox check, its state changes, its outbox entries and its inbox mark.
//!
//! A decision returns its [`Effects`] as a value (the messages to publish and the saga
//! instances it moved); the commit returns them with its result, so whatever follows a
//! commit (the relay, the saga counts) acts only on what committed.

use std::cell::RefCell;
use std::sync::Arc;

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use super::chain::run_links;
use super::changes::Change;
use super::outbox::{KeyedEntries, OutboxEntry};
use super::state::{StateTx, TxError};
use super::{Store, StoreError};
use crate::telemetry::saga_counts::SagaMove;

/// What a decision causes besides its state changes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// Messages to publish once the transaction is durable.
    pub outbox: Vec<OutboxEntry>,
    /// Saga instances moved (for the saga counts, once committed).
    pub saga_moves: Vec<SagaMove>,
    /// Consumers that handled some of these messages in the same transaction (see
    /// [`super::chain`]).
    pub chained: Vec<Arc<str>>,
}

impl Effects {
    /// Effects with these outbox entries and nothing else.
    pub fn outbox(outbox: Vec<OutboxEntry>) -> Self {
        Effects {
            outbox,
            ..Default::default()
        }
    }

    pub(super) fn absorb(&mut self, other: Effects) {
        self.outbox.extend(other.outbox);
        self.saga_moves.extend(other.saga_moves);
        self.chained.extend(other.chained);
    }
}

/// What a commit did.
#[derive(Debug, PartialEq)]
pub enum Committed {
    /// State, outbox and inbox mark written. The outbox entries (with their keys) await
    /// publication; the saga moves are what the transaction did to saga instances. The
    /// group commit takes both out (to the relay, to the counts) before it answers.
    Written {
        /// The outbox entries written, with their keys.
        outbox: KeyedEntries,
        /// The saga instances the transaction moved.
        saga_moves: Vec<SagaMove>,
        /// Consumers that handled some of the entries in the same transaction.
        chained: Vec<Arc<str>>,
        /// Every write of the message, in order, when the store logs its changes.
        changes: Vec<Change>,
    },
    /// The inbox already held the mark: nothing was written.
    Duplicate,
}

impl Committed {
    /// Written, with nothing left to hand over.
    pub fn written() -> Self {
        Committed::Written {
            outbox: Vec::new(),
            saga_moves: Vec::new(),
            chained: Vec::new(),
            changes: Vec::new(),
        }
    }
}

/// Error returned by a decide closure: a transaction error to retry, or the handler's own.
#[derive(Debug)]
pub enum DecideError<E> {
    /// A read or write of the transaction failed: the whole transaction runs again (a
    /// conflict) or fails (a storage error).
    Tx(TxError),
    /// The handler's own error: this message's item writes nothing.
    Handler(E),
}

impl<E> From<TxError> for DecideError<E> {
    fn from(e: TxError) -> Self {
        DecideError::Tx(e)
    }
}

/// A message's decision: its handler run against the state, returning its effects.
pub type DecideFn<'a, E> = dyn Fn(&dyn StateTx) -> Result<Effects, DecideError<E>> + 'a;

/// One message's part of [`Store::commit_batch`].
pub struct BatchItem<'a, E> {
    /// The message's inbox mark (`<consumer>/<message id>`): an item whose mark is there
    /// already is a duplicate and writes nothing.
    pub inbox_key: &'a str,
    /// When the message is handled, in milliseconds since the Unix epoch; stored with the
    /// inbox mark.
    pub now_ms: u64,
    /// Runs the handler against the state; may run more than once (see [`StateTx`]).
    pub decide: &'a DecideFn<'a, E>,
}

/// What one item of a batch came to; `Err` holds the payload of a panic in its handler.
pub type ItemResult<E> = std::thread::Result<Result<Committed, CommitError<E>>>;

/// Error of a commit: the handler's own error (returned unchanged) or the store's.
#[derive(Debug)]
pub enum CommitError<E> {
    /// The decision's own error; nothing of the message was written.
    Handler(E),
    /// The store failed (the transaction, or an outbox entry that cannot be encoded; see
    /// [`StoreError`]); nothing of the message was written.
    Store(StoreError),
}

impl Store {
    /// Runs `decide` in one transaction with the inbox check and mark, then appends the
    /// returned outbox entries. `decide` may run more than once; a panic in it propagates.
    pub fn commit<E, F>(
        &self,
        inbox_key: &str,
        now_ms: u64,
        decide: F,
    ) -> Result<Committed, CommitError<E>>
    where
        F: Fn(&dyn StateTx) -> Result<Effects, DecideError<E>>,
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
        let dedupe = self.dedupe();
        // The previous generation is read only, so it is read before the transaction (a
        // plain read inside a transaction would wait for the transaction's own lock).
        let seen_before = items
            .iter()
            .map(|item| Ok(dedupe && generations.in_previous(item.inbox_key)?))
            .collect::<Result<Vec<bool>, sled::Error>>();
        let seen_before = match seen_before {
            Ok(seen) => seen,
            Err(e) => return failed(items, &e.to_string()),
        };
        let trees = (&self.state, &self.outbox, &generations.current);
        let (log, base) = (self.log_changes, self.outbox_base());
        let result = trees.transaction(|(state, outbox, inbox)| {
            let mut results = Vec::with_capacity(items.len());
            for (item, seen_before) in items.iter().zip(&seen_before) {
                if *seen_before || (dedupe && inbox.get(item.inbox_key)?.is_some()) {
                    results.push(Ok(Ok(Committed::Duplicate)));
                    continue;
                }
                let mut changes = Vec::new();
                let decided = decide_in(state, item.decide, log.then_some(&mut changes))?;
                let (mut effects, mut values) = match decided {
                    Decided::Applied(effects, values) => (effects, values),
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
                    run_links(
                        &**chain,
                        dedupe,
                        (state, inbox),
                        item.now_ms,
                        &mut effects,
                        &mut values,
                        log.then_some(&mut changes),
                    )?;
                }
                let mut written = Vec::with_capacity(effects.outbox.len());
                for (entry, value) in effects.outbox.into_iter().zip(values) {
                    let key = base + outbox.generate_id()?;
                    if log {
                        changes.push(Change::Outbox(key, value.clone()));
                    }
                    outbox.insert_blind(&key.to_be_bytes(), value)?;
                    written.push((key, entry));
                }
                inbox.insert_blind(item.inbox_key.as_bytes(), &item.now_ms.to_be_bytes())?;
                if log {
                    changes.push(Change::Inbox(
                        item.inbox_key.as_bytes().to_vec(),
                        item.now_ms,
                    ));
                }
                results.push(Ok(Ok(Committed::Written {
                    outbox: written,
                    saga_moves: effects.saga_moves,
                    chained: effects.chained,
                    changes,
                })));
            }
            Ok::<_, ConflictableTransactionError<()>>(results)
        });
        match result {
            Ok(results) => results,
            Err(e) => {
                let message = match e {
                    TransactionError::Storage(e) => e.to_string(),
                    TransactionError::Abort(()) => "transaction aborted".to_string(),
                };
                failed(items, &message)
            }
        }
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
pub(super) enum Decided<E> {
    /// Its state changes are in the transaction; its effects, with the outbox entries'
    /// stored form, are to be written.
    Applied(Effects, Vec<Vec<u8>>),
    /// The handler's own error: nothing written.
    Handler(E),
    /// The handler panicked (the payload): nothing written.
    Panicked(Box<dyn std::any::Any + Send>),
    /// An outbox entry does not serialize: nothing written.
    Unserializable(serde_json::Error),
}

/// Runs `decide` on its own overlay of `state` and, if it succeeds and its entries
/// serialize, writes its state changes into the transaction; otherwise it writes nothing.
/// A transaction error is returned for sled to retry.
/// With `log`, the state changes are also appended to it.
pub(super) fn decide_in<E>(
    state: &TransactionalTree,
    decide: &DecideFn<'_, E>,
    log: Option<&mut Vec<Change>>,
) -> Result<Decided<E>, UnabortableTransactionError> {
    let tx = Overlay {
        tree: state,
        writes: Default::default(),
    };
    let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decide(&tx)));
    Ok(match decided {
        Ok(Ok(effects)) => match to_values(&effects.outbox) {
            Ok(values) => {
                let writes = tx.writes.into_inner();
                if let Some(log) = log {
                    log.extend(
                        writes
                            .iter()
                            .map(|(k, v)| Change::State(k.clone(), v.clone())),
                    );
                }
                apply(state, writes)?;
                Decided::Applied(effects, values)
            }
            Err(e) => Decided::Unserializable(e),
        },
        Ok(Err(DecideError::Tx(e))) => return Err(e.0),
        Ok(Err(DecideError::Handler(e))) => Decided::Handler(e),
        Err(panic) => Decided::Panicked(panic),
    })
}

/// Writes an item's state changes into the transaction. Blind writes (vendored sled patch):
/// `insert`/`remove` read the old value only to return it, a tree lookup per key.
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

#[cfg(test)]
mod tests {
    use super::super::state::{load, read, save, StateRead};
    use super::super::testing::{bump, state_err, test_entry};
    use super::*;

    #[test]
    fn commit_writes_state_outbox_and_inbox_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let r = store
            .commit::<String, _>("c/m1", 10, |tx| {
                tx.put("k", b"v")?;
                Ok(Effects::outbox(vec![test_entry(1), test_entry(2)]))
            })
            .unwrap();
        let Committed::Written { outbox, .. } = r else {
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
    fn batch_items_see_earlier_items_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let fail = |tx: &dyn StateTx| -> Result<Effects, DecideError<String>> {
            tx.put("n", b"99")?;
            Err(DecideError::Handler("no".into()))
        };
        let boom = |tx: &dyn StateTx| -> Result<Effects, DecideError<String>> {
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
                Ok(Ok(Committed::Written { outbox, .. })) => {
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

    #[test]
    fn saga_moves_come_back_only_from_items_that_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let moved = |id: &str| SagaMove {
            saga: "s",
            id: id.into(),
            from: None,
            to: "Waiting",
            terminal: false,
            started_at_ms: 1,
            at_ms: 1,
        };
        let ok = |tx: &dyn StateTx| -> Result<Effects, DecideError<String>> {
            let n: u32 = load(tx, "n").map_err(state_err)?.unwrap_or(0);
            save(tx, "n", &(n + 1)).map_err(state_err)?;
            Ok(Effects {
                saga_moves: vec![moved("ok")],
                ..Default::default()
            })
        };
        let fails = |_: &dyn StateTx| -> Result<Effects, DecideError<String>> {
            Err(DecideError::Handler("no".into()))
        };
        let item = |inbox_key, decide| BatchItem {
            inbox_key,
            now_ms: 1,
            decide,
        };
        let results = store.commit_batch(&[item("c/1", &ok), item("c/2", &fails)]);
        let moves: Vec<Vec<SagaMove>> = results
            .into_iter()
            .map(|r| match r {
                Ok(Ok(Committed::Written { saga_moves, .. })) => saga_moves,
                _ => vec![],
            })
            .collect();
        assert_eq!(moves, vec![vec![moved("ok")], vec![]]);
    }

    #[test]
    fn handler_error_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let r = store.commit("c/m", 1, |tx| {
            tx.put("k", b"v")?;
            Err::<Effects, _>(DecideError::Handler("no".to_string()))
        });
        assert!(matches!(r, Err(CommitError::Handler(ref e)) if e == "no"));
        assert!(store.get("k").unwrap().is_none());
        assert!(!store.seen("c/m").unwrap());
        assert_eq!(store.outbox_len(), 0);
    }
}
