//! Who serves a context: at most one node owns a partition (one per context for now) at a
//! time, by a lease in the JetStream key-value bucket `<NS>_LEASES` (see
//! [`crate::wire::lease`]). A node that finds the lease held stands by (registered in the
//! bucket, `choreo_partition_owned` 0, not ready) and tries again every fifth of the lease's
//! time to live; it takes the partition when the lease expires or is released.
//!
//! The owner renews every fifth of the time to live and considers the lease valid until
//! four fifths of it have passed since it *sent* its last successful renewal (its monotonic
//! clock; the server's expiry counts from when it stored the renewal, later). When that
//! time passes without a renewal, or a renewal is refused, or the changelog refuses an
//! append, the node stops serving the partition by itself: it restarts in place
//! ([`Restart::LeaseLost`]), which ends every pull, ack and publish of the old process at
//! once, and comes back as a standby (or takes the lease again if nobody did).
//!
//! A node started again on the data directory of an earlier run (same store id, a file in
//! the directory, whose sled lock it holds, so that run is gone) takes its own lease over
//! at once instead of waiting for it to expire.
//!
//! Taking a partition: the local store is emptied and the partition's changelog replayed
//! into it; then the node appends a first record of its own after the last one it read. If
//! the old owner appended in between, that append is refused, the node reads the rest and
//! tries again; once it lands, every later append of the old owner names a stale sequence
//! and is refused (the fence).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use super::{Exit, NodeError, Restart};
use crate::pipeline::replicate::Lease;
use crate::store::{changes, Store};
use crate::telemetry::metrics;
use crate::wire::changelog::{AppendError, Changelog, Snapshots};
use crate::wire::envelope::now_ms;
use crate::wire::lease::{Acquired, Held, Holder, Leases, RenewError};
use crate::wire::subjects;

/// The one partition of a context, for now.
pub(crate) const PARTITION: u32 = 0;

/// A lease this node holds.
pub(crate) struct Ownership {
    context: &'static str,
    leases: Leases,
    held: tokio::sync::Mutex<Held>,
    epoch: u64,
    /// The previous owner's last renewal (wall-clock ms), when this node took over.
    pub(crate) previous_renewal_ms: Option<u64>,
    anchor: Instant,
    /// Nanoseconds after `anchor` until which the lease is valid.
    valid_until: AtomicU64,
    lost: AtomicBool,
    exit: Mutex<mpsc::Sender<Result<Exit, NodeError>>>,
}

impl Lease for Ownership {
    fn valid(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
            && (self.anchor.elapsed().as_nanos() as u64) < self.valid_until.load(Ordering::SeqCst)
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn lose(&self, reason: &'static str) {
        if self.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        metrics::LEASE_LOST
            .with_label_values(&[self.context, reason])
            .inc();
        metrics::PARTITION_OWNED
            .with_label_values(&[self.context, &PARTITION.to_string()])
            .set(0);
        tracing::error!(
            context = self.context,
            reason,
            epoch = self.epoch,
            "lost the partition's lease: this node stops serving it and restarts as a standby"
        );
        let exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        let _ = exit.send(Ok(Exit::RestartInPlace(Restart::LeaseLost)));
    }
}

impl Ownership {
    fn extend(&self, sent: Instant) {
        let ttl = self.leases.ttl;
        let until = sent.duration_since(self.anchor) + ttl * 4 / 5;
        self.valid_until
            .store(until.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Renews the lease every fifth of its time to live until it is lost or released.
    pub(crate) async fn keep(self: Arc<Self>) {
        let every = self.leases.ttl / 5;
        loop {
            tokio::time::sleep(every).await;
            if self.lost.load(Ordering::SeqCst) {
                return;
            }
            // Asleep past the deadline (a stopped process, a starved runtime): fenced,
            // whatever a renewal would say now.
            if !self.valid() {
                self.lose("expired");
                return;
            }
            let sent = Instant::now();
            // A slow answer is waited for (up to the TTL, when the lease is gone anyway): a
            // renewal abandoned early may still land, and the next one, at the revision
            // before it, would be refused as if another node had taken the lease. The
            // deadline is kept by `valid`, which the flusher checks on its own.
            let renewed = {
                let mut held = self.held.lock().await;
                let ttl = self.leases.ttl;
                tokio::time::timeout(ttl, self.leases.renew(&mut held, now_ms())).await
            };
            match renewed {
                Ok(Ok(())) => self.extend(sent),
                Ok(Err(RenewError::Lost)) => {
                    self.lose("taken");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(context = self.context, error = %e, "lease renewal failed")
                }
                Err(_) => tracing::warn!(
                    context = self.context,
                    "lease renewal got no answer in time"
                ),
            }
        }
    }

    /// Gives the lease up (graceful stop, after the context stopped).
    pub(crate) async fn release(&self) {
        if self.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        let held = self.held.lock().await;
        match self.leases.release(&held).await {
            Ok(()) => tracing::info!(context = self.context, "released the partition's lease"),
            Err(e) => {
                tracing::warn!(context = self.context, error = %e, "could not release the lease; it expires by itself")
            }
        }
        metrics::PARTITION_OWNED
            .with_label_values(&[self.context, &PARTITION.to_string()])
            .set(0);
    }
}

/// How long a node keeps trying while JetStream does not answer lease requests (a cluster
/// still electing its leaders, a bucket just created whose replicas are not all up).
const SETUP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `attempt` until it succeeds, trying again every 0.5 s (with a warning) for up to
/// [`SETUP_WAIT`].
pub(crate) async fn patiently<T, E, F, Fut>(what: &str, mut attempt: F) -> Result<T, NodeError>
where
    E: Into<NodeError> + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "{what}: JetStream did not answer as it should; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The id of the data directory `dir` (created on first use).
pub(crate) fn store_id(dir: &std::path::Path) -> Result<String, NodeError> {
    let path = dir.join("choreo-store-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        _ => {}
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let id = crate::wire::lease::key_safe(&format!(
        "{host}-{:x}",
        nanos ^ ((std::process::id() as u128) << 64)
    ));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, &id))
        .map_err(|e| NodeError::Other(format!("write {}: {e}", path.display())))?;
    Ok(id)
}

/// Takes the lease of `context`'s partition, standing by (registered, polled every fifth of
/// the time to live) while another node holds it or JetStream does not answer. Returns once
/// this node owns it; the caller races it against its shutdown.
pub(crate) async fn acquire(
    leases: &Leases,
    context: &'static str,
    store_id: &str,
    metrics_addr: &str,
    exit: mpsc::Sender<Result<Exit, NodeError>>,
) -> Arc<Ownership> {
    let key = subjects::lease_key(context, PARTITION);
    let partition = PARTITION.to_string();
    let me = Holder {
        node: format!("{store_id}/{}", std::process::id()),
        store: store_id.to_string(),
        epoch: 0,
        renewed_at_ms: now_ms(),
        metrics: metrics_addr.to_string(),
    };
    let mut last_seen: Option<Holder> = None;
    let mut standing_by = false;
    loop {
        let sent = Instant::now();
        let holder = Holder {
            renewed_at_ms: now_ms(),
            ..me.clone()
        };
        let acquired = match leases.acquire(&key, holder.clone()).await {
            Ok(acquired) => acquired,
            Err(e) => {
                tracing::warn!(context, error = %e, "could not ask for the lease; trying again");
                tokio::time::sleep(leases.ttl / 5).await;
                continue;
            }
        };
        let (held, how) = match acquired {
            Acquired::Held(held) => {
                let how = if last_seen.is_some() {
                    "takeover"
                } else {
                    "fresh"
                };
                (Some(held), how)
            }
            Acquired::Taken(Some((other, revision))) if other.store == store_id => {
                // An earlier run on this directory: gone, since this process holds the
                // directory's store.
                let taken = leases.take_over(&key, holder.clone(), revision).await;
                let taken = taken.unwrap_or_else(|e| {
                    tracing::warn!(context, error = %e, "could not take the lease back; trying again");
                    None
                });
                (taken, "own")
            }
            Acquired::Taken(other) => {
                if let Some((other, _)) = other {
                    if !standing_by || last_seen.as_ref().map(|h| &h.node) != Some(&other.node) {
                        tracing::warn!(context, owner = %other.node, epoch = other.epoch, "the partition is owned by another node: standing by");
                    }
                    last_seen = Some(other);
                }
                standing_by = true;
                // Registered first, so whoever sees the gauge at 0 finds the registration.
                match leases.stand_by(&key, &holder).await {
                    Ok(()) => metrics::PARTITION_OWNED
                        .with_label_values(&[context, &partition])
                        .set(0),
                    Err(e) => tracing::warn!(context, error = %e, "could not register as standby"),
                }
                (None, "")
            }
        };
        if let Some(held) = held {
            if standing_by {
                leases.stop_standing_by(&key, &me.node).await;
            }
            metrics::LEASE_ACQUIRED
                .with_label_values(&[context, how])
                .inc();
            metrics::PARTITION_OWNED
                .with_label_values(&[context, &partition])
                .set(1);
            tracing::info!(
                context,
                epoch = held.holder.epoch,
                how,
                "took the partition's lease"
            );
            let own = Ownership {
                context,
                leases: leases.clone(),
                epoch: held.holder.epoch,
                held: tokio::sync::Mutex::new(held),
                previous_renewal_ms: last_seen.map(|h| h.renewed_at_ms),
                anchor: sent,
                valid_until: AtomicU64::new(0),
                lost: AtomicBool::new(false),
                exit: Mutex::new(exit),
            };
            own.extend(sent);
            return Arc::new(own);
        }
        tokio::time::sleep(leases.ttl / 5).await;
    }
}

/// Makes `store` the partition's state as its newest snapshot and its changelog hold it,
/// then fences the log against the previous owner (see the module doc). When it replayed at
/// least `snapshot_after` records it puts a snapshot of the state as of the fence record and
/// removes the records before it. Returns the log's last sequence.
pub(crate) async fn restore(
    context: &'static str,
    store: &Store,
    changelog: &Changelog,
    snapshots: &Snapshots,
    own: &Ownership,
    snapshot_after: u64,
) -> Result<u64, NodeError> {
    let failed = |e: String| NodeError::Other(format!("restore {context} from its changelog: {e}"));
    let started = Instant::now();
    store
        .clear_replicated()
        .map_err(|e| failed(e.to_string()))?;
    let mut last = 0;
    if let Some((seq, data)) = snapshots
        .latest(context, PARTITION)
        .await
        .map_err(|e| failed(e.to_string()))?
    {
        let changes = changes::decode(&data).map_err(|e| failed(format!("snapshot {seq}: {e}")))?;
        store.replay(&changes).map_err(|e| failed(e.to_string()))?;
        last = seq;
        tracing::info!(
            context,
            seq,
            bytes = data.len(),
            "restored the partition's snapshot"
        );
    }
    let first = changelog.first().await.map_err(|e| failed(e.to_string()))?;
    if first > last + 1 {
        return Err(failed(format!(
            "records {} to {} are gone and no snapshot covers them",
            last + 1,
            first - 1
        )));
    }
    let mut records = 0u64;
    loop {
        for (seq, record) in changelog
            .read_after(last)
            .await
            .map_err(|e| failed(e.to_string()))?
        {
            let changes =
                changes::decode(&record).map_err(|e| failed(format!("record {seq}: {e}")))?;
            store.replay(&changes).map_err(|e| failed(e.to_string()))?;
            last = seq;
            records += 1;
        }
        let fence = format!("{context}-{}-fence", own.epoch);
        match changelog
            .append(Bytes::new(), last, &fence, own.epoch)
            .await
        {
            Ok(seq) => {
                last = seq;
                break;
            }
            Err(AppendError::Fenced { .. }) => continue,
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    store
        .db()
        .flush_async()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut since_snapshot = records;
    if records >= snapshot_after {
        since_snapshot = 0;
        let mut data = Vec::new();
        changes::encode(&store.dump().map_err(|e| failed(e.to_string()))?, &mut data);
        snapshots
            .put(context, PARTITION, last, &data)
            .await
            .map_err(|e| failed(e.to_string()))?;
        changelog
            .remove_before(last)
            .await
            .map_err(|e| failed(e.to_string()))?;
        metrics::SNAPSHOTS_TAKEN.with_label_values(&[context]).inc();
        tracing::info!(
            context,
            seq = last,
            bytes = data.len(),
            "put a snapshot and removed the records it covers"
        );
    }
    metrics::CHANGELOG_RESTORED
        .with_label_values(&[context])
        .inc_by(records);
    metrics::CHANGELOG_SINCE_SNAPSHOT
        .with_label_values(&[context])
        .set(since_snapshot as i64);
    metrics::CHANGELOG_SEQUENCE
        .with_label_values(&[context])
        .set(last as i64);
    tracing::info!(
        context,
        records,
        last,
        took_ms = started.elapsed().as_millis() as u64,
        "restored the partition from its changelog"
    );
    Ok(last)
}
