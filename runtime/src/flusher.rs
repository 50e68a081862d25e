//! Group commit: one thread per store makes committed transactions durable for many waiters.
//!
//! sled 0.34.7 deadlocks when `flush_async` is called concurrently (sled issue 1308) and its
//! flush ends in `sync_file_range`, which does not persist file metadata. So exactly one
//! thread flushes, then `fsync`s the database file itself, and answers every waiter whose
//! request arrived before that flush began.
//!
//! Architecture invariant: a message is acked, and its outbox entries are published, only
//! after `GroupCommit::durable` returned `Ok` for a request made after its transaction.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::metrics;
use crate::store::Store;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Handle to a store's flusher thread; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
}

/// The flush could not be made durable; the message must not be acked.
#[derive(Debug, thiserror::Error)]
#[error("store flush failed: {0}")]
pub struct FlushError(pub String);

impl GroupCommit {
    /// Starts the flusher thread for `store`, whose files live in `dir`.
    /// `failed` is set while the last flush failed (readiness reads it).
    pub fn start(
        store: &Store,
        dir: &Path,
        context: &str,
        failed: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let db = store.db().clone();
        let db_file: PathBuf = dir.join("db");
        let context = context.to_string();
        std::thread::Builder::new()
            .name(format!("flusher-{context}"))
            .spawn(move || run(db, db_file, rx, context, failed))?;
        Ok(GroupCommit { tx })
    }

    /// Resolves once everything committed before this call is on disk.
    pub async fn durable(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .map_err(|_| FlushError("flusher stopped".into()))?;
        rx.await
            .map_err(|_| FlushError("flusher stopped".into()))?
            .map_err(FlushError)
    }
}

fn run(
    db: sled::Db,
    db_file: PathBuf,
    rx: mpsc::Receiver<Waiter>,
    context: String,
    failed: Arc<AtomicBool>,
) {
    // Blocks for the first waiter, then takes every waiter already queued: they all share
    // the one flush that starts after their requests.
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(w) = rx.try_recv() {
            batch.push(w);
        }
        let started = Instant::now();
        let result = flush_and_sync(&db, &db_file);
        metrics::STORE_COMMIT_SECONDS
            .with_label_values(&[&context])
            .observe(started.elapsed().as_secs_f64());
        metrics::STORE_GROUP_COMMIT_SIZE
            .with_label_values(&[&context])
            .observe(batch.len() as f64);
        failed.store(result.is_err(), Ordering::SeqCst);
        if let Err(e) = &result {
            tracing::error!(context = %context, error = %e, "store flush failed");
        }
        for w in batch {
            let _ = w.send(result.clone());
        }
    }
}

fn flush_and_sync(db: &sled::Db, db_file: &Path) -> Result<(), String> {
    db.flush().map_err(|e| e.to_string())?;
    File::open(db_file)
        .and_then(|f| f.sync_data())
        .map_err(|e| format!("fsync {}: {e}", db_file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_waiters_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let gc = GroupCommit::start(&store, dir.path(), "test", Default::default()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let store = store.clone();
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .commit::<String, _>(&format!("c/{i}"), 1, |_| Ok(vec![]))
                    .unwrap();
                gc.durable().await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(store.inbox_len(), 200);
    }
}
