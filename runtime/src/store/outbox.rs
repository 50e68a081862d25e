//! The outbox table: messages a committed transaction is to publish, keyed by a monotonic
//! id, and their removal once JetStream has acknowledged them.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};
use crate::wire::envelope::Envelope;

/// A message to publish once the transaction that produced it is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The NATS subject to publish on.
    pub subject: String,
    /// The message's envelope: its headers on the wire.
    pub envelope: Envelope,
    /// JSON payload, as sent on the wire.
    pub payload: String,
}

/// Outbox entries with their keys: what a commit wrote, what the relay is handed, what the
/// start-up scan finds.
pub type KeyedEntries = Vec<(u64, OutboxEntry)>;

impl Store {
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
        self.log_outside(|| super::Change::Published(key));
        Ok(())
    }

    /// Marks an entry published; the commit thread removes it (right after it hands its
    /// next batch to the flusher, so the removals go into the log buffer that flush seals
    /// and writes, or on its own when no batch comes). The relay then writes nothing to the
    /// store: a write outside a transaction waits for sled's concurrency-control lock while
    /// the commit thread holds it, blocking an async worker, and leaves a log buffer that
    /// the next transaction seals and sled's I/O pool writes (sled 0.34 rolls the buffer at
    /// every transaction's start); Not flushed on its own: if a crash
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
            self.log_outside(|| super::Change::Published(*key));
        }
        Ok(())
    }

    fn published(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_published(&self) -> Vec<u64> {
        std::mem::take(&mut *self.published())
    }

    /// How many outbox entries the store holds (published or not, until removed).
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

pub(super) fn decode_key(k: &[u8]) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::super::testing::{bump, reopen, test_entry};
    use super::super::{Committed, Effects};
    use super::*;

    #[test]
    fn published_entries_stay_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let keys = |r| match r {
            Ok(Committed::Written { outbox, .. }) => outbox.into_iter().map(|(k, _)| k).collect(),
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
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            store
                .commit::<String, _>("c/m", 1, |_| Ok(Effects::outbox(vec![test_entry(7)])))
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
