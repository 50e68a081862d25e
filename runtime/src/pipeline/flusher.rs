//! The flusher thread of a group commit: it takes every committed batch and waiter
//! already queued, flushes once and `fsync`s the database file, runs the batches' hooks,
//! hands their outbox entries to the relay (in memory, with their keys) and answers them all.
//!
//! sled 0.34.7 deadlocks when `flush_async` is called concurrently (sled issue 1308) and its
//! flush ends in `sync_file_range`, which does not persist file metadata; so exactly one
//! thread flushes, then `fsync`s the file itself.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::oneshot;

use super::commit::AfterDurable;
use super::relay::Relay;
use crate::component::HandleError;
use crate::store::{CommitError, Committed, ItemResult, KeyedEntries, StoreError};
use crate::telemetry::metrics;

type Answered = ItemResult<HandleError>;
type Waiter = oneshot::Sender<Result<(), String>>;

/// A committed message on its way to the flusher.
pub(super) struct Answer {
    pub(super) reply: oneshot::Sender<Answered>,
    pub(super) outcome: Answered,
    pub(super) after: Option<AfterDurable>,
}

impl Answer {
    /// Runs the message's [`AfterDurable`], if it was written.
    pub(super) fn run_after(&mut self) {
        if let (Some(after), Ok(Ok(Committed::Written { .. }))) = (self.after.take(), &self.outcome)
        {
            after();
        }
    }
}

/// What the flusher makes durable.
pub(super) enum Request {
    /// Someone waits for everything committed so far.
    Wait(Waiter),
    /// A committed batch: answer it, and hand its outbox entries over, once durable.
    Batch(Vec<Answer>),
}

/// Which flush the flusher thread is in, for a watchdog on another thread: the number of
/// flushes started so far, shifted left by one, with the low bit set while one runs.
#[derive(Default)]
pub struct FlushMark(AtomicU64);

impl FlushMark {
    pub(super) fn begin(&self) {
        // Next number, running bit set.
        let n = self.0.load(Ordering::Relaxed) >> 1;
        self.0.store(((n + 1) << 1) | 1, Ordering::SeqCst);
    }

    pub(super) fn end(&self) {
        self.0.fetch_and(!1, Ordering::SeqCst);
    }

    /// The number of the flush running now, if one is.
    pub fn running(&self) -> Option<u64> {
        let v = self.0.load(Ordering::SeqCst);
        (v & 1 == 1).then_some(v >> 1)
    }
}

/// Where a flush result comes to: everything committed before the request is durable, or
/// the flush failed.
pub type DurableReceiver = oneshot::Receiver<Result<(), String>>;

/// The flush could not be made durable; the message must not be acked.
#[derive(Debug, thiserror::Error)]
#[error("store flush failed: {0}")]
pub struct FlushError(pub String);

/// The store's database file, kept open for its `fsync`s.
pub(super) struct DbFile {
    pub(super) file: File,
    pub(super) path: PathBuf,
}

/// The flusher thread's state.
pub(super) struct Flusher {
    pub(super) db: sled::Db,
    pub(super) db_file: DbFile,
    pub(super) context: String,
    pub(super) failed: Arc<AtomicBool>,
    pub(super) relay: Relay,
    #[cfg(feature = "faults")]
    pub(super) faults: Option<Arc<crate::faults::Faults>>,
    pub(super) mark: Arc<FlushMark>,
    /// The changelog the batches go to before they are answered (an owned partition).
    pub(super) replication: Option<super::replicate::Replication>,
    /// `false` (only with a changelog): no local flush and fsync before the answers; the
    /// changelog append is the durable record.
    pub(super) local_sync: bool,
}

impl Flusher {
    /// One flush and `fsync`, marked for the watchdog, with the `store_flush` fault point
    /// before it (a crash aborts, a delay stalls the flush, an error fails it as a full disk
    /// would).
    fn flush(&self) -> Result<(), String> {
        if !self.local_sync {
            return Ok(());
        }
        self.mark.begin();
        let result = self.flush_unless_injected();
        self.mark.end();
        result
    }

    fn flush_unless_injected(&self) -> Result<(), String> {
        #[cfg(feature = "faults")]
        if let Some(faults) = &self.faults {
            crate::fault!(blocking faults, StoreFlush, &self.context, "", &[], |injected| {
                if injected == crate::faults::Injected::Error {
                    return Err("injected fault at store_flush".to_string());
                }
            });
        }
        flush_and_sync(&self.db, &self.db_file)
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut replication = self.replication.take();
        let Flusher {
            context,
            failed,
            relay,
            ..
        } = &self;
        // Outbox entries committed but not yet handed over: their flush failed.
        let mut unrelayed: KeyedEntries = Vec::new();
        // Blocks for the first request, then takes every request already queued: they all
        // share the one flush that starts after them.
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(r) = rx.try_recv() {
                batch.push(r);
            }
            let started = Instant::now();
            let mut result = self.flush();
            if let (Ok(()), Some(replication)) = (&result, replication.as_mut()) {
                result = replication.append(take_changes(&mut batch));
            }
            metrics::STORE_COMMIT_SECONDS
                .with_label_values(&[&context])
                .observe(started.elapsed().as_secs_f64());
            let served: usize = batch
                .iter()
                .map(|r| match r {
                    Request::Wait(_) => 1,
                    Request::Batch(b) => b.len(),
                })
                .sum();
            metrics::STORE_GROUP_COMMIT_SIZE
                .with_label_values(&[&context])
                .observe(served as f64);
            failed.store(result.is_err(), Ordering::SeqCst);
            if let Err(e) = &result {
                tracing::error!(context = %context, error = %e, "store flush failed");
            }
            for r in &mut batch {
                if let Request::Batch(answers) = r {
                    for a in answers {
                        // The relay gets the entries themselves (no read back from the
                        // store); the caller's answer keeps `Written` without them.
                        if let Ok(Ok(Committed::Written { outbox, .. })) = &mut a.outcome {
                            unrelayed.append(outbox);
                        }
                        if result.is_ok() {
                            a.run_after();
                        }
                    }
                }
            }
            if result.is_ok() {
                relay.durable(std::mem::take(&mut unrelayed));
            }
            for r in batch {
                match r {
                    Request::Wait(w) => {
                        let _ = w.send(result.clone());
                    }
                    Request::Batch(answers) => {
                        for a in answers {
                            let _ = a.reply.send(after_flush(a.outcome, &result));
                        }
                    }
                }
            }
        }
    }
}

/// The writes of every message of `batch` that wrote, in order (taken out of the answers).
fn take_changes(batch: &mut [Request]) -> Vec<Vec<crate::store::Change>> {
    let mut out = Vec::new();
    for r in batch {
        if let Request::Batch(answers) = r {
            for a in answers {
                if let Ok(Ok(Committed::Written { changes, .. })) = &mut a.outcome {
                    out.push(std::mem::take(changes));
                }
            }
        }
    }
    out
}

/// A committed message whose flush failed must not be acked: its result becomes the error.
/// (A handler's error or panic stands: it wrote nothing.)
fn after_flush(outcome: Answered, flush: &Result<(), String>) -> Answered {
    match (outcome, flush) {
        (Ok(Ok(_)), Err(e)) => Ok(Err(CommitError::Store(StoreError::Failed(format!(
            "store flush failed: {e}"
        ))))),
        (outcome, _) => outcome,
    }
}

fn flush_and_sync(db: &sled::Db, db_file: &DbFile) -> Result<(), String> {
    db.flush().map_err(|e| e.to_string())?;
    db_file
        .file
        .sync_data()
        .map_err(|e| format!("fsync {}: {e}", db_file.path.display()))
}
