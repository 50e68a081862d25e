//! Failed-delivery counts (the retry budget, counted by the runtime rather than by
//! JetStream's delivery count) and local dead-letter records.

use super::{Store, StoreError};

impl Store {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
