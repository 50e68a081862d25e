//! The inbox: the id of every message a consumer handled, kept in generations.
//!
//! Marks (`<consumer>/<message id>`) go to the newest generation, a sled tree named
//! `inbox-<start ms>`; the one before it is still read, older ones are dropped whole
//! ([`Store::rotate_inbox`]). A mark is so kept between one and two retention periods, at
//! the cost of one more lookup per message instead of a time index and two removals per
//! expired mark.

use super::{Store, StoreError};

/// The inbox's generations (see [`Store::rotate_inbox`]).
pub(crate) struct Inbox {
    /// Where marks are written.
    pub(crate) current: sled::Tree,
    /// When `current` started, ms since the epoch (also in its tree name).
    pub(crate) started_ms: u64,
    /// The generation before `current`: read, never written.
    pub(crate) previous: Option<sled::Tree>,
}

impl Inbox {
    pub(crate) const PREFIX: &'static str = "inbox-";

    pub(crate) fn tree_name(started_ms: u64) -> String {
        // Zero-padded, so that names sort by start.
        format!("{}{started_ms:020}", Self::PREFIX)
    }

    /// The newest two generations, or a first one starting at `now_ms`. Older generations
    /// (a rotation cut short by a crash) are dropped. A store written before generations
    /// existed has one `inbox` tree and a time index `inbox_ts`: the marks become the
    /// previous generation, the index is dropped.
    pub(crate) fn open(db: &sled::Db, now_ms: u64) -> Result<Self, StoreError> {
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

    pub(crate) fn in_previous(&self, mark: &str) -> Result<bool, sled::Error> {
        match &self.previous {
            Some(tree) => tree.contains_key(mark),
            None => Ok(false),
        }
    }
}

impl Store {
    /// Inbox marks held, both generations (walks them: tests and tools only).
    pub fn inbox_len(&self) -> usize {
        let inbox = self.inbox();
        inbox.current.len() + inbox.previous.as_ref().map_or(0, sled::Tree::len)
    }

    /// Once the current generation is `retention_ms` old, starts a new one and drops the one
    /// before the current whole. Returns whether it rotated.
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
}

#[cfg(test)]
mod tests {
    use super::super::state::read;
    use super::super::testing::{bump, reopen};
    use super::super::Committed;
    use super::*;
    use std::path::Path;

    #[test]
    fn inbox_marks_last_one_to_two_retention_periods() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path() as &Path, 1 << 20).unwrap();
        let now = crate::wire::envelope::now_ms();
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
        let now = crate::wire::envelope::now_ms();
        assert!(!store.rotate_inbox(now + 500, 1000).unwrap());
        assert!(store.seen("c/m").unwrap());
        assert!(store.rotate_inbox(now + 1000, 1000).unwrap());
        assert!(!store.seen("c/m").unwrap());
        assert!(!has("inbox"));
    }
}
