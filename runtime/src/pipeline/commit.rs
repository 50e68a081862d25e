//! Group commit: one thread per store runs the transactions of many handlers as one, and
//! one thread makes them durable for many waiters.
//!
//! Two stages, each one thread, so the next batch's transaction runs while the last one is
//! flushed:
//! - `commit-<context>` takes every message waiting to commit (up to [`MAX_BATCH`]) and runs
//!   them in one sled transaction ([`Store::commit_batch`]), then passes the results on and
//!   removes the outbox entries the relay has published meanwhile (they join the log buffer
//!   the next flush writes; see [`Store::outbox_published`]).
//!   The saga moves of what committed go to the saga counts there.
//!   sled 0.34 seals an I/O buffer for every multi-tree transaction, written and
//!   `sync_file_range`d by its I/O threads (the buffer a flush seals is written by the
//!   flusher itself: vendored sled patch 5), so the number of transactions, not of
//!   flushes, sets the node's I/O cost.
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
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::sync::oneshot;

use super::decide::Decide;
use super::flusher::{Answer, DbFile, DurableReceiver, FlushError, FlushMark, Flusher, Request};
use super::relay::Relay;
use crate::component::HandleError;
use crate::store::{BatchItem, CommitError, Committed, ItemResult};
use crate::store::{Store, StoreError};
use crate::telemetry::{metrics, saga_counts};

/// Messages run in one transaction at most (a transaction holds sled's global write lock).
pub const MAX_BATCH: usize = 128;

/// Runs on the flusher thread once a message's transaction is durable, before its outbox
/// entries go to the relay and before it is answered (the `after_commit` fault point: a crash
/// injected there lands exactly in that window). With `durable: false` it runs on the commit
/// thread right after the transaction, before the next one.
pub type AfterDurable = Box<dyn FnOnce() + Send>;

type Answered = ItemResult<HandleError>;

struct Job {
    inbox_key: String,
    now_ms: u64,
    decide: Decide,
    after: Option<AfterDurable>,
    reply: oneshot::Sender<Answered>,
}

/// What a group commit may be set up with besides its store.
#[derive(Default)]
pub struct CommitOptions {
    /// The partition's changelog, for a node that owns it with replication on.
    pub replication: Option<super::replicate::Replication>,
    /// With a changelog: skip the local flush and fsync before the answers
    /// (`[ownership] local_sync = false`).
    pub skip_local_sync: bool,
    /// Rules at the `store_flush` point (stall, fail or crash a flush).
    #[cfg(feature = "faults")]
    pub faults: Option<Arc<crate::faults::Faults>>,
    /// The chaos suite's `[danger] disable_group_commit`: a commit is answered right after
    /// its transaction, not flushed, and its entries go to the relay from memory.
    #[cfg(feature = "danger")]
    pub no_group_commit: bool,
}

/// Handle to a store's commit and flusher threads; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    jobs: mpsc::Sender<Job>,
    flush: mpsc::Sender<Request>,
    flushing: Arc<FlushMark>,
}

impl GroupCommit {
    /// Starts the commit and flusher threads for `store`, whose files live in `dir`.
    /// `failed` is set while the last flush failed (readiness reads it). Durable outbox
    /// entries go to `relay`.
    pub fn start(
        store: &Store,
        dir: &Path,
        context: &str,
        failed: Arc<AtomicBool>,
        relay: Relay,
        options: CommitOptions,
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
            relay: relay.clone(),
            #[cfg(feature = "faults")]
            faults: options.faults.clone(),
            mark: flushing.clone(),
            local_sync: !(options.skip_local_sync && options.replication.is_some()),
            replication: options.replication,
        };
        std::thread::Builder::new()
            .name(format!("flusher-{context}"))
            .spawn(move || flusher.run(flush_rx))?;
        #[allow(unused_mut)]
        let mut to_flusher = Some(flush.clone());
        #[cfg(feature = "danger")]
        if options.no_group_commit {
            to_flusher = None;
        }
        let (store, name) = (store.clone(), context.to_string());
        std::thread::Builder::new()
            .name(format!("commit-{context}"))
            .spawn(move || run_commits(store, jobs_rx, name, to_flusher, relay))?;
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
    #[cfg_attr(not(feature = "danger"), allow(unused_variables))] relay: Relay,
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
        let mut results = store.commit_batch(&items);
        drop(items);
        metrics::STORE_TX_BATCH_SIZE
            .with_label_values(&[&context])
            .observe(jobs.len() as f64);
        // What committed moved saga instances and handled chained messages: count it now.
        for r in &mut results {
            if let Ok(Ok(Committed::Written {
                saga_moves,
                chained,
                ..
            })) = r
            {
                saga_counts::record(std::mem::take(saga_moves));
                for consumer in std::mem::take(chained) {
                    metrics::HANDLED_IN_TRANSACTION
                        .with_label_values(&[context.as_str(), &consumer])
                        .inc();
                }
            }
        }
        let answers: Vec<Answer> = jobs
            .into_iter()
            .zip(results)
            .map(|(j, outcome)| Answer {
                reply: j.reply,
                outcome,
                after: j.after,
            })
            .collect();
        let answers: Vec<(oneshot::Sender<Answered>, Answered)> = match &flusher {
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
            // `[danger] disable_group_commit`: answered from memory, the entries published
            // from memory.
            #[cfg(feature = "danger")]
            None => answers
                .into_iter()
                .map(|mut a| {
                    a.run_after();
                    if let Ok(Ok(Committed::Written { outbox, .. })) = &mut a.outcome {
                        relay.durable(std::mem::take(outbox));
                    }
                    (a.reply, a.outcome)
                })
                .collect(),
            #[cfg(not(feature = "danger"))]
            None => unreachable!("the flusher is always there without [danger]"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::test_entry;
    use crate::store::Effects;
    use crate::store::KeyedEntries;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    type Started = (
        tempfile::TempDir,
        Store,
        tokio::sync::mpsc::UnboundedReceiver<KeyedEntries>,
        GroupCommit,
    );

    /// A store in a fresh directory (kept alive by the caller) with its group commit, whose
    /// relay hands the entries to the returned receiver.
    fn start() -> Started {
        start_with(CommitOptions::default(), Default::default())
    }

    fn start_with(options: CommitOptions, failed: Arc<AtomicBool>) -> Started {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let (relay, handed) = Relay::detached();
        let gc = GroupCommit::start(&store, dir.path(), "test", failed, relay, options).unwrap();
        (dir, store, handed, gc)
    }

    fn sends(n: u32) -> Decide {
        Box::new(move |_| Ok(Effects::outbox(vec![test_entry(n)])))
    }

    #[cfg(feature = "faults")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_injected_flush_fault_fails_or_stalls_the_flush_it_hits() {
        use crate::faults::{FaultAction, FaultPoint, Faults};
        let faults = Arc::new(Faults::new(&crate::faults::FaultConfig {
            enabled: true,
            ..Default::default()
        }));
        let failed = Arc::new(AtomicBool::new(false));
        let options = CommitOptions {
            faults: Some(faults.clone()),
            ..Default::default()
        };
        let (_dir, _store, mut handed, gc) = start_with(options, failed.clone());
        let rule = |action, delay_ms: u64| crate::faults::FaultRule {
            point: FaultPoint::StoreFlush,
            action,
            context: None,
            msg_type: None,
            times: Some(1),
            payload_contains: None,
            probability: 1.0,
            delay: Duration::from_millis(delay_ms),
            duration: None,
        };

        // A failed flush: the commit is not acked, its entry not handed over, the store
        // reported failed; the next flush succeeds and hands the entry over.
        faults.install(rule(FaultAction::Error, 0), None).unwrap();
        let r = gc.commit("c/1".into(), 1, sends(1), None).await;
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
                let r = gc
                    .commit(format!("c/{i}"), 1, sends(i), None)
                    .await
                    .unwrap();
                gc.durable().await.unwrap();
                r
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                // The entries went to the relay, not back to the caller.
                Committed::Written { outbox, .. } => assert!(outbox.is_empty()),
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
        let ok: Decide = Box::new(|_| Ok(Effects::default()));
        let r = gc.commit("c/ok".into(), 1, ok, None).await.unwrap();
        assert_eq!(r, Committed::written());
        assert!(!store.seen("c/boom").unwrap());
    }

    #[tokio::test]
    async fn published_entries_are_removed_when_no_batch_comes() {
        let (_dir, store, mut handed, gc) = start();
        gc.commit("c/1".into(), 1, sends(1), None).await.unwrap();
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
                    gc.commit(format!("bg/{i}"), 1, sends(i), None)
                        .await
                        .unwrap();
                    i += 1;
                }
                i
            }
        });
        for i in 0..30u32 {
            gc.commit(format!("c/{i}"), 1, sends(1_000_000 + i), None)
                .await
                .unwrap();
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
