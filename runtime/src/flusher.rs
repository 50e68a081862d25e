//! Group commit: one thread per store runs the transactions of many handlers as one, and
//! one thread makes them durable for many waiters.
//!
//! Two stages, each one thread, so the next batch's transaction runs while the last one is
//! flushed:
//! - `commit-<context>` takes every message waiting to commit (up to [`MAX_BATCH`]) and runs
//!   them in one sled transaction ([`Store::commit_batch`]), then passes the results on and
//!   removes the outbox entries the relay has published meanwhile (they join the log buffer
//!   the next flush writes; see [`Store::outbox_published`]).
//!   sled 0.34 seals an I/O buffer for every multi-tree transaction, written and
//!   `sync_file_range`d by its I/O threads (the buffer a flush seals is written by the
//!   flusher itself: vendored sled patch 5), so the number of transactions, not of
//!   flushes, set the node's I/O cost (bench/PROFILE.md).
//! - `flusher-<context>` takes every batch and waiter already queued, flushes once, `fsync`s
//!   the database file, hands the batches' outbox entries to the relay (in memory, with
//!   their keys) and answers them all.
//!   sled 0.34.7 deadlocks when `flush_async` is called concurrently (sled issue 1308) and
//!   its flush ends in `sync_file_range`, which does not persist file metadata; so exactly
//!   one thread flushes, then `fsync`s the file itself.
//!
//! Architecture invariant: a message is acked, and its outbox entries are published, only
//! after the flush that followed its transaction succeeded. Outbox entries whose flush failed
//! are handed over after the next successful one (the caller, answered with the error,
//! may be gone: a handler timeout, a nak).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::component::HandleError;
use crate::faults::{FaultAction, FaultPoint, Faults};
use crate::metrics;
use crate::outbox::Relay;
use crate::store::OutboxEntry;
use crate::store::{BatchItem, CommitError, Committed, DecideError, ItemResult, KeyedEntries};
use crate::store::{StateTx, Store, StoreError};

/// Messages run in one transaction at most (a transaction holds sled's global write lock).
pub const MAX_BATCH: usize = 128;

/// A handler's decision, run on the commit thread (possibly more than once).
pub type Decide =
    Box<dyn Fn(&dyn StateTx) -> Result<Vec<OutboxEntry>, DecideError<HandleError>> + Send>;

/// Runs on the flusher thread once a message's transaction is durable, before its outbox
/// entries go to the relay and before it is answered (the `after_commit` fault point: a crash
/// injected there lands exactly in that window). With `durable: false` it runs on the commit
/// thread right after the transaction, before the next one.
pub type AfterDurable = Box<dyn FnOnce() + Send>;

type Outcome = ItemResult<HandleError>;
type Waiter = oneshot::Sender<Result<(), String>>;

struct Job {
    inbox_key: String,
    now_ms: u64,
    decide: Decide,
    after: Option<AfterDurable>,
    reply: oneshot::Sender<Outcome>,
}

/// A committed message on its way to the flusher.
struct Answer {
    reply: oneshot::Sender<Outcome>,
    outcome: Outcome,
    after: Option<AfterDurable>,
}

impl Answer {
    /// Runs the message's [`AfterDurable`], if it was written.
    fn run_after(&mut self) {
        if let (Some(after), Ok(Ok(Committed::Written { .. }))) = (self.after.take(), &self.outcome)
        {
            after();
        }
    }
}

/// What the flusher makes durable.
enum Request {
    /// Someone waits for everything committed so far.
    Wait(Waiter),
    /// A committed batch: answer it, and hand its outbox entries over, once durable.
    Batch(Vec<Answer>),
}

/// Handle to a store's commit and flusher threads; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    jobs: mpsc::Sender<Job>,
    flush: mpsc::Sender<Request>,
    flushing: Arc<FlushMark>,
}

/// Which flush the flusher thread is in, for a watchdog on another thread: the number of
/// flushes started so far, shifted left by one, with the low bit set while one runs.
#[derive(Default)]
pub struct FlushMark(AtomicU64);

impl FlushMark {
    fn begin(&self) {
        // Next number, running bit set.
        let n = self.0.load(Ordering::Relaxed) >> 1;
        self.0.store(((n + 1) << 1) | 1, Ordering::SeqCst);
    }

    fn end(&self) {
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

impl GroupCommit {
    /// Starts the commit and flusher threads for `store`, whose files live in `dir`.
    /// `failed` is set while the last flush failed (readiness reads it). Durable outbox
    /// entries go to `relay`. `faults` may stall, fail or crash a flush (the `store_flush`
    /// point). With `durable: false` (the chaos suite's `[danger] disable_group_commit`) a
    /// commit is answered right after its transaction, not flushed, and its entries are left
    /// to the caller (in the answer).
    pub fn start(
        store: &Store,
        dir: &Path,
        context: &str,
        failed: Arc<AtomicBool>,
        relay: Relay,
        faults: Arc<Faults>,
        durable: bool,
    ) -> std::io::Result<Self> {
        let (flush, flush_rx) = mpsc::channel::<Request>();
        let (jobs, jobs_rx) = mpsc::channel::<Job>();
        let db = store.db().clone();
        // Opened once: a kept descriptor also reports every write-back error since it was
        // opened, where one opened per fsync would not see an error from before its open.
        let path: PathBuf = dir.join("db");
        let db_file = DbFile {
            file: File::open(&path)?,
            path,
        };
        let flushing = Arc::new(FlushMark::default());
        let flusher = Flusher {
            db,
            db_file,
            context: context.to_string(),
            failed,
            relay,
            faults,
            mark: flushing.clone(),
        };
        std::thread::Builder::new()
            .name(format!("flusher-{context}"))
            .spawn(move || flusher.run(flush_rx))?;
        let (store, name, to_flusher) = (store.clone(), context.to_string(), flush.clone());
        let to_flusher = durable.then_some(to_flusher);
        std::thread::Builder::new()
            .name(format!("commit-{context}"))
            .spawn(move || run_commits(store, jobs_rx, name, to_flusher))?;
        Ok(GroupCommit {
            jobs,
            flush,
            flushing,
        })
    }

    /// The flusher thread's progress (see [`FlushMark`]).
    pub fn flushing(&self) -> &FlushMark {
        &self.flushing
    }

    /// Runs `decide` for the message `inbox_key` in the next batch transaction (see
    /// [`Store::commit_batch`]) and returns once that is durable and its outbox entries are
    /// with the relay; `after` runs in between if it was written (see [`AfterDurable`]).
    /// With `durable: false`: returns once committed and the caller hands the entries over.
    /// A panic in `decide` is resumed here, in the caller.
    pub async fn commit(
        &self,
        inbox_key: String,
        now_ms: u64,
        decide: Decide,
        after: Option<AfterDurable>,
    ) -> Result<Committed, CommitError<HandleError>> {
        let (reply, rx) = oneshot::channel();
        let stopped = || CommitError::Store(StoreError::Failed("commit thread stopped".into()));
        let job = Job {
            inbox_key,
            now_ms,
            decide,
            after,
            reply,
        };
        self.jobs.send(job).map_err(|_| stopped())?;
        match rx.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(stopped()),
        }
    }

    /// Resolves once everything committed before this call is on disk.
    pub async fn durable(&self) -> Result<(), FlushError> {
        self.request_durable()?
            .await
            .map_err(|_| FlushError("flusher stopped".into()))?
            .map_err(FlushError)
    }

    /// Asks for a flush of everything committed before this call; its result comes to the
    /// receiver (which a thread outside the async runtime can poll).
    pub fn request_durable(&self) -> Result<DurableReceiver, FlushError> {
        let (tx, rx) = oneshot::channel();
        self.flush
            .send(Request::Wait(tx))
            .map_err(|_| FlushError("flusher stopped".into()))?;
        Ok(rx)
    }
}

fn run_commits(
    store: Store,
    rx: mpsc::Receiver<Job>,
    context: String,
    flusher: Option<mpsc::Sender<Request>>,
) {
    // Blocks for the first job, then takes every job already queued: one transaction. Once
    // a batch is with the flusher, the outbox entries the relay has published meanwhile are
    // removed (see `Store::outbox_published`); with no job for a while, they are removed
    // then.
    let mut removals = Removals::default();
    loop {
        let first = match rx.recv_timeout(REMOVALS_AFTER) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                removals.run(&store, &context);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let items: Vec<BatchItem<'_, HandleError>> = jobs
            .iter()
            .map(|j| BatchItem {
                inbox_key: &j.inbox_key,
                now_ms: j.now_ms,
                decide: &*j.decide,
            })
            .collect();
        let results = store.commit_batch(&items);
        drop(items);
        metrics::STORE_TX_BATCH_SIZE
            .with_label_values(&[&context])
            .observe(jobs.len() as f64);
        let answers: Vec<Answer> = jobs
            .into_iter()
            .zip(results)
            .map(|(j, outcome)| Answer {
                reply: j.reply,
                outcome,
                after: j.after,
            })
            .collect();
        let answers: Vec<(oneshot::Sender<Outcome>, Outcome)> = match &flusher {
            Some(flusher) => match flusher.send(Request::Batch(answers)) {
                Ok(()) => {
                    removals.run(&store, &context);
                    continue;
                }
                Err(mpsc::SendError(Request::Batch(answers))) => answers
                    .into_iter()
                    .map(|a| {
                        let stopped = StoreError::Failed("flusher stopped".into());
                        (a.reply, Ok(Err(CommitError::Store(stopped))))
                    })
                    .collect(),
                Err(_) => unreachable!("sent a batch"),
            },
            None => answers
                .into_iter()
                .map(|mut a| {
                    a.run_after();
                    (a.reply, a.outcome)
                })
                .collect(),
        };
        for (reply, outcome) in answers {
            let _ = reply.send(outcome);
        }
        removals.run(&store, &context);
    }
    removals.run(&store, &context);
}

/// How long published outbox entries wait for a batch before they are removed without one.
const REMOVALS_AFTER: Duration = Duration::from_millis(50);

/// The commit thread's removals of published outbox entries; a failure is logged once, not
/// at every try (every batch, or every [`REMOVALS_AFTER`], while the store is broken).
#[derive(Default)]
struct Removals {
    failing: bool,
}

impl Removals {
    fn run(&mut self, store: &Store, context: &str) {
        if !store.published_waiting() {
            return;
        }
        // Keys that fail stay for the next try; at worst their entries are published again
        // after a restart (deduplicated downstream).
        match store.remove_published() {
            Err(e) if !self.failing => {
                tracing::warn!(context, error = %e, "outbox: removing published entries failed");
                self.failing = true;
            }
            Err(_) => {}
            Ok(()) if self.failing => {
                tracing::info!(context, "outbox: removing published entries again");
                self.failing = false;
            }
            Ok(()) => {}
        }
    }
}

/// The store's database file, kept open for its `fsync`s.
struct DbFile {
    file: File,
    path: PathBuf,
}

/// The flusher thread's state.
struct Flusher {
    db: sled::Db,
    db_file: DbFile,
    context: String,
    failed: Arc<AtomicBool>,
    relay: Relay,
    faults: Arc<Faults>,
    mark: Arc<FlushMark>,
}

impl Flusher {
    /// One flush and `fsync`, marked for the watchdog, with the `store_flush` fault point
    /// before it.
    fn flush(&self) -> Result<(), String> {
        self.mark.begin();
        let result = match self.fault() {
            Some(FaultAction::Error) => Err("injected fault at store_flush".to_string()),
            _ => flush_and_sync(&self.db, &self.db_file),
        };
        self.mark.end();
        result
    }

    /// Fires the `store_flush` fault point: a crash aborts here, a delay sleeps here (a
    /// stalled disk); an error is returned for the caller to report instead of flushing.
    fn fault(&self) -> Option<FaultAction> {
        let point = FaultPoint::StoreFlush;
        let rule = self.faults.fire(point, &self.context, "", &[])?;
        match rule.action {
            FaultAction::Crash => crate::consumer::crash(point, &self.context),
            FaultAction::Delay => std::thread::sleep(Duration::from_millis(rule.delay_ms)),
            _ => {}
        }
        Some(rule.action)
    }

    fn run(self, rx: mpsc::Receiver<Request>) {
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
            let result = self.flush();
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
                        if let Ok(Ok(Committed::Written { outbox })) = &mut a.outcome {
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

/// A committed message whose flush failed must not be acked: its result becomes the error.
/// (A handler's error or panic stands: it wrote nothing.)
fn after_flush(outcome: Outcome, flush: &Result<(), String>) -> Outcome {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_entry;

    type Started = (
        tempfile::TempDir,
        Store,
        tokio::sync::mpsc::UnboundedReceiver<KeyedEntries>,
        GroupCommit,
    );

    /// A store in a fresh directory (kept alive by the caller) with its group commit, whose
    /// relay hands the entries to the returned receiver.
    fn start() -> Started {
        start_with(
            Arc::new(Faults::new(&Default::default())),
            Default::default(),
        )
    }

    fn start_with(faults: Arc<Faults>, failed: Arc<AtomicBool>) -> Started {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (relay, handed) = Relay::detached();
        let gc =
            GroupCommit::start(&store, dir.path(), "test", failed, relay, faults, true).unwrap();
        (dir, store, handed, gc)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_injected_flush_fault_fails_or_stalls_the_flush_it_hits() {
        let faults = Arc::new(Faults::new(&crate::faults::FaultConfig {
            enabled: true,
            ..Default::default()
        }));
        let failed = Arc::new(AtomicBool::new(false));
        let (_dir, _store, mut handed, gc) = start_with(faults.clone(), failed.clone());
        let rule = |action, delay_ms| crate::faults::FaultRule {
            point: FaultPoint::StoreFlush,
            action,
            context: None,
            msg_type: None,
            times: Some(1),
            payload_contains: None,
            probability: 1.0,
            delay_ms,
            duration_ms: None,
        };

        // A failed flush: the commit is not acked, its entry not handed over, the store
        // reported failed; the next flush succeeds and hands the entry over.
        faults.install(rule(FaultAction::Error, 0), None).unwrap();
        let decide: Decide = Box::new(|_| Ok(vec![test_entry(1)]));
        let r = gc.commit("c/1".into(), 1, decide, None).await;
        assert!(
            matches!(r, Err(CommitError::Store(_))),
            "a commit whose flush failed is an error: {r:?}"
        );
        assert!(failed.load(Ordering::SeqCst));
        assert!(
            handed.try_recv().is_err(),
            "nothing handed over before durable"
        );
        gc.durable().await.unwrap();
        assert!(!failed.load(Ordering::SeqCst));
        assert_eq!(handed.try_recv().unwrap().len(), 1);

        // A stalled flush is seen running, as the same flush, until it returns.
        assert_eq!(gc.flushing().running(), None);
        faults.install(rule(FaultAction::Delay, 600), None).unwrap();
        let waiting = tokio::spawn({
            let gc = gc.clone();
            async move { gc.durable().await }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        let first = gc
            .flushing()
            .running()
            .expect("the stalled flush is running");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(gc.flushing().running(), Some(first));
        waiting.await.unwrap().unwrap();
        assert_eq!(gc.flushing().running(), None);
        gc.durable().await.unwrap();
        assert_eq!(gc.flushing().running(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_and_waiters_complete_and_keys_reach_the_relay() {
        let (_dir, store, mut handed, gc) = start();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                let decide: Decide = Box::new(move |_| Ok(vec![test_entry(i)]));
                let r = gc.commit(format!("c/{i}"), 1, decide, None).await.unwrap();
                gc.durable().await.unwrap();
                r
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                // The entries went to the relay, not back to the caller.
                Committed::Written { outbox } => assert!(outbox.is_empty()),
                Committed::Duplicate => panic!("not a duplicate"),
            }
        }
        assert_eq!(store.inbox_len(), 200);
        // Every entry was handed to the relay, with its key, before its commit was answered.
        let mut relayed = Vec::new();
        while let Ok(entries) = handed.try_recv() {
            relayed.extend(entries);
        }
        relayed.sort_by_key(|(k, _)| *k);
        assert_eq!(relayed.len(), 200);
        assert_eq!(relayed, store.outbox_pending().unwrap());
    }

    #[tokio::test]
    async fn a_panicking_handler_panics_in_its_caller_only() {
        let (_dir, store, _handed, gc) = start();
        let boom: Decide = Box::new(|_| panic!("boom"));
        let caught = tokio::spawn({
            let gc = gc.clone();
            async move { gc.commit("c/boom".into(), 1, boom, None).await }
        })
        .await;
        assert!(caught.unwrap_err().is_panic());
        // The commit thread survived it.
        let ok: Decide = Box::new(|_| Ok(vec![]));
        let r = gc.commit("c/ok".into(), 1, ok, None).await.unwrap();
        assert_eq!(r, Committed::Written { outbox: vec![] });
        assert!(!store.seen("c/boom").unwrap());
    }

    #[tokio::test]
    async fn published_entries_are_removed_when_no_batch_comes() {
        let (_dir, store, mut handed, gc) = start();
        let decide: Decide = Box::new(|_| Ok(vec![test_entry(1)]));
        gc.commit("c/1".into(), 1, decide, None).await.unwrap();
        let (key, _) = handed.try_recv().unwrap().remove(0);
        store.outbox_published(key);
        // No batch follows: the commit thread removes it after REMOVALS_AFTER.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.outbox_len() > 0 {
            assert!(Instant::now() < deadline, "published entry not removed");
            tokio::time::sleep(REMOVALS_AFTER / 5).await;
        }
        assert!(!store.published_waiting());
    }

    /// Copies the files of the store in `from` (sled's directory) to a fresh directory: what
    /// a crash at this moment would leave, short of the page cache.
    fn copy_files(from: &Path) -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                let target = to.join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    copy(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), target).unwrap();
                }
            }
        }
        let to = tempfile::tempdir().unwrap();
        copy(from, to.path());
        to
    }

    /// A commit is answered only once its transaction is in the files, also while the commit
    /// thread runs later transactions and the flusher flushes for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answered_commit_is_in_the_files_while_others_commit() {
        let (dir, _store, _handed, gc) = start();
        let stop = Arc::new(AtomicBool::new(false));
        let background = tokio::spawn({
            let (gc, stop) = (gc.clone(), stop.clone());
            async move {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let decide: Decide = Box::new(move |_| Ok(vec![test_entry(i)]));
                    gc.commit(format!("bg/{i}"), 1, decide, None).await.unwrap();
                    i += 1;
                }
                i
            }
        });
        for i in 0..30u32 {
            let decide: Decide = Box::new(move |_| Ok(vec![test_entry(1_000_000 + i)]));
            gc.commit(format!("c/{i}"), 1, decide, None).await.unwrap();
            let copy = copy_files(dir.path());
            let reopened = Store::open(copy.path(), 1 << 20).unwrap();
            assert!(
                reopened.seen(&format!("c/{i}")).unwrap(),
                "c/{i} not in the files"
            );
            let entry = test_entry(1_000_000 + i);
            assert!(
                reopened
                    .outbox_pending()
                    .unwrap()
                    .iter()
                    .any(|(_, e)| *e == entry),
                "c/{i}'s outbox entry not in the files"
            );
        }
        stop.store(true, Ordering::Relaxed);
        assert!(background.await.unwrap() > 0, "commits ran alongside");
    }
}
