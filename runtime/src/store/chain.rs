//! Handlings chained into a transaction: a message a context sends to one of its own
//! consumers is handled inside the transaction that wrote it, as a batch item of its own
//! (its inbox mark, its state changes, its effects), written with its cause's or not at all.
//! The store only runs what a [`Chain`] gives it; which consumers those are is the
//! pipeline's business.

use std::sync::Arc;

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::batch::{decide_in, DecideFn, Decided, Effects};
use super::changes::Change;
use super::outbox::OutboxEntry;
use super::state::{StateRead, StateTx};
use super::StoreError;

/// The consumers of a store that handle an outbox entry in the transaction that wrote it.
pub trait Chain: Send + Sync {
    /// The handlings of `entry`, decided at `now_ms`, to run in its transaction; none: the
    /// entry takes the usual path.
    fn links(&self, entry: &OutboxEntry, now_ms: u64) -> Vec<Link>;
}

/// One consumer's handling of an outbox entry inside the transaction that wrote it.
pub struct Link {
    /// The consumer's durable name.
    pub consumer: Arc<str>,
    /// The handling's inbox mark (`<consumer>/<message id>`), written with it.
    pub inbox_key: String,
    /// The consumer's decision; a `Handler` error (the reason) leaves the entry to the usual
    /// path, writing nothing.
    pub decide: Box<DecideFn<'static, String>>,
}

/// Chained handlings per batch item at most, counting handlings of their own entries (a
/// bound on a loop between two consumers).
pub const MAX_LINKS: usize = 16;

/// Reads through a transaction, for a chained handling's `plan`.
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

/// Runs the chained handlings of `effects`' entries (and of the entries those write, up to
/// [`MAX_LINKS`]) in the current transaction, after the item's own writes: each as a batch
/// item of its own (overlay, inbox mark) whose effects are added to the item's. A handling
/// that fails, panics or was already marked writes nothing, and its entry takes the usual
/// path.
pub(super) fn run_links(
    chain: &dyn Chain,
    dedupe: bool,
    (state, inbox): (&TransactionalTree, &TransactionalTree),
    now_ms: u64,
    effects: &mut Effects,
    values: &mut Vec<Vec<u8>>,
    mut log: Option<&mut Vec<Change>>,
) -> Result<(), UnabortableTransactionError> {
    let (mut next, mut ran) = (0, 0);
    while next < effects.outbox.len() && ran < MAX_LINKS {
        for link in chain.links(&effects.outbox[next], now_ms) {
            if ran == MAX_LINKS {
                break;
            }
            // A chained message is new (its id derives from its cause, committed in this
            // transaction), so only the current generation is checked.
            if dedupe && inbox.get(link.inbox_key.as_bytes())?.is_some() {
                continue;
            }
            ran += 1;
            let (out, out_values) = match decide_in(state, &*link.decide, log.as_deref_mut())? {
                Decided::Applied(out, out_values) => (out, out_values),
                Decided::Handler(reason) => {
                    tracing::debug!(consumer = %link.consumer, %reason, "left to its JetStream copy");
                    continue;
                }
                Decided::Panicked(_) | Decided::Unserializable(_) => continue,
            };
            inbox.insert_blind(link.inbox_key.as_bytes(), &now_ms.to_be_bytes())?;
            if let Some(log) = log.as_deref_mut() {
                log.push(Change::Inbox(link.inbox_key.as_bytes().to_vec(), now_ms));
            }
            effects.chained.push(link.consumer);
            effects.absorb(out);
            values.extend(out_values);
        }
        next += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::state::{load, read, save};
    use super::super::testing::{bump, state_err};
    use super::super::{BatchItem, Committed, DecideError, Store};
    use super::*;

    /// Links `X` entries to consumer `c` (fails on n = 1, panics on n = 2, otherwise counts
    /// under "c" and sends a `Y`) and, with `looping`, `Y` entries to consumer `l` (sends
    /// another `Y`).
    struct TestChain {
        looping: bool,
    }

    fn entry(id: String, msg_type: &str, n: u32) -> OutboxEntry {
        OutboxEntry {
            subject: format!("choreo.t.evt.{msg_type}"),
            envelope: crate::wire::envelope::Envelope::first(id, msg_type, "t", 1),
            payload: format!("{{\"n\":{n}}}"),
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
                                    Ok(Effects::outbox(vec![entry(format!("{id}-y"), "Y", n)]))
                                }
                            }
                        }),
                    ),
                    "Y" if self.looping => (
                        "l",
                        Box::new(move |_| {
                            Ok(Effects::outbox(vec![entry(format!("{id}-y"), "Y", n)]))
                        }),
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
            move |_: &dyn StateTx| -> Result<Effects, DecideError<String>> {
                Ok(Effects::outbox(vec![entry(format!("x{n}"), "X", n)]))
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
        let written: Vec<(Vec<String>, Vec<Arc<str>>)> = results
            .into_iter()
            .map(|r| match r {
                Ok(Ok(Committed::Written {
                    outbox, chained, ..
                })) => (
                    outbox.into_iter().map(|(_, e)| e.envelope.id).collect(),
                    chained,
                ),
                other => panic!("not written: {:?}", other.map(|r| r.is_ok())),
            })
            .collect();
        // x0 was handled by "c" in its transaction, and what that sent follows it; x1 (the
        // handler failed) and x2 (it panicked) take the usual path.
        assert_eq!(
            written,
            [
                (vec!["x0".into(), "x0-y".into()], vec!["c".into()]),
                (vec!["x1".into()], vec![]),
                (vec!["x2".into()], vec![]),
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
        assert_eq!(store.outbox_pending().unwrap().len(), 4);
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
        let r = store.commit::<String, _>("m/0", 1, |_| {
            Ok(Effects::outbox(vec![entry("y".into(), "Y", 0)]))
        });
        let Ok(Committed::Written {
            outbox, chained, ..
        }) = r
        else {
            panic!("not written")
        };
        // The first entry and one more per handling; the last one is left unhandled.
        assert_eq!(outbox.len(), 1 + MAX_LINKS);
        assert_eq!(chained.len(), MAX_LINKS);
    }
}
