//! The store's changes as data, for the changelog that replicates a context's store through
//! JetStream (`node::ownership`): every write a committed transaction made ([`Change`]), in
//! the order it made them, encoded compactly; and their replay into an empty store on the
//! node that takes a partition over.
//!
//! A snapshot is the same encoding of everything replicated ([`Store::dump`]).
//!
//! A change carries the value written, never a delta, so replaying a record twice, or a
//! record the store already holds, leaves the store as replaying it once.

use super::{Store, StoreError};

/// One write to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A `state` key written (`None`: removed).
    State(Vec<u8>, Option<Vec<u8>>),
    /// An outbox entry written under its key.
    Outbox(u64, Vec<u8>),
    /// An outbox entry removed (published).
    Published(u64),
    /// An inbox mark: `<consumer>/<message id>` handled at this time (ms).
    Inbox(Vec<u8>, u64),
    /// New outbox keys are at least this (in snapshots).
    OutboxBase(u64),
}

const STATE_PUT: u8 = 1;
const STATE_REMOVE: u8 = 2;
const OUTBOX: u8 = 3;
const PUBLISHED: u8 = 4;
const INBOX: u8 = 5;
const OUTBOX_BASE: u8 = 6;

/// Appends `changes` to `out`: a tag byte, then length-prefixed keys and values.
pub fn encode(changes: &[Change], out: &mut Vec<u8>) {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    for c in changes {
        match c {
            Change::State(k, Some(v)) => {
                out.push(STATE_PUT);
                bytes(out, k);
                bytes(out, v);
            }
            Change::State(k, None) => {
                out.push(STATE_REMOVE);
                bytes(out, k);
            }
            Change::Outbox(k, v) => {
                out.push(OUTBOX);
                out.extend_from_slice(&k.to_be_bytes());
                bytes(out, v);
            }
            Change::Published(k) => {
                out.push(PUBLISHED);
                out.extend_from_slice(&k.to_be_bytes());
            }
            Change::Inbox(k, at) => {
                out.push(INBOX);
                bytes(out, k);
                out.extend_from_slice(&at.to_be_bytes());
            }
            Change::OutboxBase(base) => {
                out.push(OUTBOX_BASE);
                out.extend_from_slice(&base.to_be_bytes());
            }
        }
    }
}

/// The encoded size of one change (what [`encode`] appends for it).
pub fn encoded_len(c: &Change) -> usize {
    1 + match c {
        Change::State(k, Some(v)) => 8 + k.len() + v.len(),
        Change::State(k, None) => 4 + k.len(),
        Change::Outbox(_, v) => 12 + v.len(),
        Change::Published(_) | Change::OutboxBase(_) => 8,
        Change::Inbox(k, _) => 12 + k.len(),
    }
}

/// The changes encoded in `data`, or why it is not a changelog record.
pub fn decode(mut data: &[u8]) -> Result<Vec<Change>, String> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if data.len() < n {
            return Err(format!(
                "record cut short: {} bytes left, {n} needed",
                data.len()
            ));
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    fn u64_of(data: &mut &[u8]) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            take(data, 8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(data: &mut &[u8]) -> Result<Vec<u8>, String> {
        let n = u32::from_be_bytes(take(data, 4)?.try_into().expect("4 bytes")) as usize;
        Ok(take(data, n)?.to_vec())
    }
    let mut out = Vec::new();
    while let Some((&tag, rest)) = data.split_first() {
        data = rest;
        out.push(match tag {
            STATE_PUT => Change::State(bytes(&mut data)?, Some(bytes(&mut data)?)),
            STATE_REMOVE => Change::State(bytes(&mut data)?, None),
            OUTBOX => Change::Outbox(u64_of(&mut data)?, bytes(&mut data)?),
            PUBLISHED => Change::Published(u64_of(&mut data)?),
            INBOX => Change::Inbox(bytes(&mut data)?, u64_of(&mut data)?),
            OUTBOX_BASE => Change::OutboxBase(u64_of(&mut data)?),
            other => return Err(format!("unknown change tag {other}")),
        });
    }
    Ok(out)
}

impl Store {
    /// Whether this store records its changes for a changelog.
    pub fn logs_changes(&self) -> bool {
        self.log_changes
    }

    /// Writes made outside a transaction (published outbox entries removed, index
    /// clean-up) since the last call, for the next changelog record.
    pub fn take_unlogged(&self) -> Vec<Change> {
        std::mem::take(&mut *self.unlogged.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn log_outside(&self, change: impl FnOnce() -> Change) {
        if self.log_changes {
            self.unlogged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(change());
        }
    }

    /// Everything a changelog replicates, as changes that rebuild it in an empty store (for
    /// a snapshot): state, pending outbox entries, the outbox key base, inbox marks.
    pub fn dump(&self) -> Result<Vec<Change>, StoreError> {
        let mut out = Vec::new();
        for kv in self.state.iter() {
            let (k, v) = kv?;
            out.push(Change::State(k.to_vec(), Some(v.to_vec())));
        }
        for kv in self.outbox.iter() {
            let (k, v) = kv?;
            out.push(Change::Outbox(super::outbox::decode_key(&k), v.to_vec()));
        }
        // Above every key this store has handed out, pending or not.
        out.push(Change::OutboxBase(
            self.outbox_base() + self.db.generate_id()? + 1,
        ));
        let inbox = self.inbox();
        for tree in inbox.previous.iter().chain(std::iter::once(&inbox.current)) {
            for kv in tree.iter() {
                let (k, v) = kv?;
                let at = v
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .unwrap_or_default();
                out.push(Change::Inbox(k.to_vec(), at));
            }
        }
        Ok(out)
    }

    /// Empties what a changelog replicates (state, outbox, inbox, `meta`), before a replay
    /// of the whole log. Local records (failure counts, dead letters) stay.
    pub fn clear_replicated(&self) -> Result<(), StoreError> {
        self.state.clear()?;
        self.outbox.clear()?;
        self.meta.clear()?;
        self.outbox_base
            .store(0, std::sync::atomic::Ordering::SeqCst);
        let inbox = self.inbox();
        inbox.current.clear()?;
        if let Some(p) = &inbox.previous {
            p.clear()?;
        }
        self.take_unlogged();
        Ok(())
    }

    /// Replays `changes` into this store (a node restoring a partition it takes over, before
    /// anything else uses the store), outside transactions; flushed by the caller. New
    /// outbox keys are taken above every key replayed.
    pub fn replay(&self, changes: &[Change]) -> Result<(), StoreError> {
        let inbox = self.inbox();
        let mut top = self.outbox_base.load(std::sync::atomic::Ordering::SeqCst);
        for c in changes {
            match c {
                Change::State(k, Some(v)) => {
                    self.state.insert(k.as_slice(), v.as_slice())?;
                }
                Change::State(k, None) => {
                    self.state.remove(k.as_slice())?;
                }
                Change::Outbox(k, v) => {
                    top = top.max(k + 1);
                    self.outbox.insert(k.to_be_bytes(), v.as_slice())?;
                }
                Change::Published(k) => {
                    self.outbox.remove(k.to_be_bytes())?;
                }
                Change::Inbox(k, at) => {
                    inbox.current.insert(k.as_slice(), &at.to_be_bytes())?;
                }
                Change::OutboxBase(base) => top = top.max(*base),
            }
        }
        self.raise_outbox_base(top)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::bump;
    use super::super::{Options, StateRead};
    use super::*;

    #[test]
    fn a_dump_rebuilds_the_store_in_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            log_changes: true,
            ..Options::with_cache(1 << 20)
        };
        let a = Store::open_with(&dir.path().join("a"), &options).unwrap();
        for i in 0..3u64 {
            a.commit(&format!("c/m{i}"), 10 + i, bump).unwrap();
        }
        let pending = a.outbox_pending().unwrap();
        assert_eq!(pending.len(), 3);
        a.outbox_published(pending[0].0);
        a.remove_published().unwrap();
        assert_eq!(a.take_unlogged(), vec![Change::Published(pending[0].0)]);

        let b = Store::open(&dir.path().join("b"), 1 << 20).unwrap();
        let mut data = Vec::new();
        encode(&a.dump().unwrap(), &mut data);
        b.replay(&decode(&data).unwrap()).unwrap();
        assert_eq!(b.scan_prefix("").unwrap(), a.scan_prefix("").unwrap());
        assert_eq!(b.outbox_pending().unwrap(), a.outbox_pending().unwrap());
        assert!(b.seen("c/m1").unwrap() && !b.seen("c/m9").unwrap());
        let handed_out = pending.iter().map(|(k, _)| *k).max().unwrap();
        assert!(
            b.outbox_base() > handed_out,
            "new keys above every key handed out"
        );
    }

    #[test]
    fn changes_round_trip_and_garbage_is_refused() {
        let changes = vec![
            Change::State(b"order/1".to_vec(), Some(b"{}".to_vec())),
            Change::State(b"order/2".to_vec(), None),
            Change::Outbox(7, b"{\"x\":1}".to_vec()),
            Change::Published(3),
            Change::Inbox(b"c/m1".to_vec(), 42),
            Change::OutboxBase(9),
        ];
        let mut data = Vec::new();
        encode(&changes, &mut data);
        assert_eq!(data.len(), changes.iter().map(encoded_len).sum::<usize>());
        assert_eq!(decode(&data).unwrap(), changes);
        assert!(decode(&data[..data.len() - 1])
            .unwrap_err()
            .contains("cut short"));
        assert!(decode(&[9]).unwrap_err().contains("unknown change tag"));
        assert_eq!(decode(&[]).unwrap(), vec![]);
    }
}
