//! The store watchdog: a thread of its own that looks at every store of the node once a
//! second, makes the node not ready while a flush fails or stalls, and gives up on a store
//! that cannot recover in this process by asking the binary to restart the node in place.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::restart::Restart;
use super::{Exit, NodeError};
use crate::pipeline::commit::GroupCommit;
use crate::pipeline::flusher::DurableReceiver;

/// A store the watchdog looks after.
pub(crate) struct Watched {
    context: &'static str,
    dir: PathBuf,
    commit: GroupCommit,
    /// Set while the last flush failed.
    failed: Arc<AtomicBool>,
    /// Set by the watchdog while a flush has been running for two looks or more (readiness
    /// reads it, as it reads `failed`).
    stalled: Arc<AtomicBool>,
    /// The flush seen running on the last look, and on how many looks in a row.
    flush_seen: Option<u64>,
    looks: u32,
    /// The recovery flush asked for, while its answer has not come.
    recovering: Option<DurableReceiver>,
}

impl Watched {
    pub(crate) fn new(
        context: &'static str,
        dir: PathBuf,
        commit: GroupCommit,
        failed: Arc<AtomicBool>,
        stalled: Arc<AtomicBool>,
    ) -> Self {
        Watched {
            context,
            dir,
            commit,
            failed,
            stalled,
            flush_seen: None,
            looks: 0,
            recovering: None,
        }
    }
}

const WATCHDOG_RUNNING: u8 = 0;
const WATCHDOG_SHUTTING_DOWN: u8 = 1;
const WATCHDOG_STOPPED: u8 = 2;

/// The watchdog thread, as the node sees it; dropped (however the node ends), it stops the
/// thread at its next look.
pub(crate) struct Watchdog(Arc<AtomicU8>);

impl Watchdog {
    /// Starts the watchdog on a thread of its own: a store stuck inside sled blocks whichever
    /// thread calls it, async workers included, and the watchdog must still run then. When
    /// it gives up on a store it sends the node's [`Exit`] to `exit` and stops.
    pub(crate) fn start(
        stores: Vec<Watched>,
        stall: Duration,
        exit: mpsc::Sender<Result<Exit, NodeError>>,
    ) -> std::io::Result<Watchdog> {
        let state = Arc::new(AtomicU8::new(WATCHDOG_RUNNING));
        let looking = state.clone();
        std::thread::Builder::new()
            .name("store-watchdog".into())
            .spawn(move || {
                if let Some(give_up) = store_watchdog(stores, stall, looking) {
                    let _ = exit.send(Ok(give_up));
                }
            })?;
        Ok(Watchdog(state))
    }

    /// The node is stopping: a stalled flush now ends the process instead of restarting it.
    pub(crate) fn shutting_down(&self) {
        self.0.store(WATCHDOG_SHUTTING_DOWN, Ordering::SeqCst);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(WATCHDOG_STOPPED, Ordering::SeqCst);
    }
}

/// Looks at every store once a second, on its own thread, until the node stops or it gives
/// up on a store (returned):
/// - A store whose flush failed (disk full, I/O error) makes the node stop acking its
///   messages and report not ready. Once the store's directory takes a test write again,
///   the store is flushed; sled keeps an I/O error for good (its `global_error`), so if that
///   flush still fails the node asks to be restarted in place and recovers from what is on
///   disk, as after a crash. Unacked messages are redelivered.
/// - A flush seen running on two looks in a row makes the node not ready until it returns.
///   One that has not returned after `stall` (the same flush seen running on that many
///   one-second looks, so a process stopped and continued does not count its pause) will not
///   return: the node asks to be restarted in place (while shutting down: to exit), since
///   nothing else in the process can get past a store stuck in sled.
fn store_watchdog(mut stores: Vec<Watched>, stall: Duration, state: Arc<AtomicU8>) -> Option<Exit> {
    let tick = Duration::from_secs(1);
    let limit = (stall.as_millis() / tick.as_millis()).max(1) as u32;
    loop {
        std::thread::sleep(tick);
        let now = state.load(Ordering::SeqCst);
        if now == WATCHDOG_STOPPED {
            return None;
        }
        for w in &mut stores {
            let context = w.context;
            let running = w.commit.flushing().running();
            w.looks = match (running, w.flush_seen) {
                (Some(n), Some(m)) if n == m => w.looks + 1,
                (running, _) => u32::from(running.is_some()),
            };
            w.flush_seen = running;
            let stalled = w.looks >= 2;
            if w.stalled.swap(stalled, Ordering::SeqCst) != stalled {
                if stalled {
                    tracing::warn!(context, "store flush running for over a second: not ready");
                } else {
                    tracing::info!(context, "store flush returned");
                }
            }
            if w.looks > limit {
                tracing::error!(
                    context,
                    stalled_s = w.looks - 1,
                    "store flush stalled: it will not return"
                );
                if now == WATCHDOG_SHUTTING_DOWN {
                    tracing::error!("exiting instead of stopping cleanly");
                    return Some(Exit::Stalled);
                }
                return Some(Exit::RestartInPlace(Restart::FlushStalled));
            }
            if w.recovering.is_none() {
                if now != WATCHDOG_RUNNING || !w.failed.load(Ordering::SeqCst) {
                    continue;
                }
                if let Err(e) = space_probe(&w.dir) {
                    tracing::warn!(context, error = %e, "store still not writable");
                    continue;
                }
                w.recovering = w.commit.request_durable().ok();
            }
            if let Some(rx) = &mut w.recovering {
                use tokio::sync::oneshot::error::TryRecvError;
                match answer_within(rx, tick / 4) {
                    Err(TryRecvError::Empty) => continue,
                    Ok(Ok(())) => tracing::info!(context, "store writable again"),
                    Ok(Err(e)) => {
                        tracing::error!(context, error = %e, "store cannot recover in this process: restarting in place");
                        return Some(Exit::RestartInPlace(Restart::FlushFailed));
                    }
                    Err(TryRecvError::Closed) => {}
                }
                w.recovering = None;
            }
        }
    }
}

/// The flush's answer if it comes within `wait` (looked for every 10 ms).
fn answer_within(
    rx: &mut DurableReceiver,
    wait: Duration,
) -> Result<Result<(), String>, tokio::sync::oneshot::error::TryRecvError> {
    let until = std::time::Instant::now() + wait;
    loop {
        match rx.try_recv() {
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                if std::time::Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Writes, syncs and removes 1 MiB in `dir`.
fn space_probe(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(".space-probe");
    let result = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; 1 << 20])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    result
}
