//! Partition leases in a JetStream key-value bucket (`<NS>_LEASES`, one key per partition:
//! `orders.p0`). Taking a lease creates the key (refused while it exists); renewing it
//! updates the key at the revision last written (refused if anyone wrote since); the
//! bucket's `max_age` is the lease's time to live, so a key not renewed in time is removed
//! by the server and the next create succeeds. The revision at which a lease was taken is
//! its fencing epoch. Standby nodes put `orders.p0.standby.<node>` keys that expire the same
//! way, so who waits is visible.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::bus::{js_err, stream_missing, Bus, BusError};
use super::subjects;

/// What a lease key holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    /// The node holding it (`<store id>/<pid>`).
    pub node: String,
    /// The id of the data directory it serves the partition from (a file in it): a node
    /// started again on the same directory recognises its own earlier lease.
    pub store: String,
    /// The revision at which it took the lease: its fencing epoch.
    pub epoch: u64,
    /// Wall-clock ms of the last renewal (for takeover times and status).
    pub renewed_at_ms: u64,
    /// The node's metrics address, for operators.
    #[serde(default)]
    pub metrics: String,
}

/// A lease this node holds: the key's revision after its last write.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The lease's key, e.g. `orders.p0`.
    pub(crate) key: String,
    /// The key's revision after this node's last write: the next renewal's compare-and-swap.
    pub(crate) revision: u64,
    /// What this node wrote, its epoch included.
    pub(crate) holder: Holder,
}

/// The lease bucket.
#[derive(Clone)]
pub struct Leases {
    kv: kv::Store,
    /// How long a lease lasts without a renewal: the bucket's `max_age` (zero if the bucket's
    /// status could not be read).
    pub ttl: Duration,
}

/// The result of trying to take a lease.
#[derive(Debug)]
pub enum Acquired {
    /// Taken: this node holds it now.
    Held(Held),
    /// Someone else holds it: their value and the key's revision, if readable.
    Taken(Option<(Holder, u64)>),
}

impl Leases {
    /// Binds to the bucket, or creates it with leases lasting `ttl` if JetStream says it
    /// does not exist (not when JetStream does not answer: a secured node may not create it,
    /// and the bucket is there).
    pub async fn open(bus: &Bus, ttl: Duration, replicas: usize) -> Result<Self, BusError> {
        let bucket = subjects::lease_bucket();
        let kv = match bus.js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(e) if !stream_missing(&e) => return Err(js_err("open the lease bucket", e)),
            Err(_) => bus
                .js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "choreo partition leases".into(),
                    history: 1,
                    max_age: ttl,
                    num_replicas: replicas,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| js_err("create the lease bucket", e))?,
        };
        Ok(Leases { kv, ttl })
    }

    /// The bucket if some node created it (for operators' tools, which never create it).
    pub async fn existing(bus: &Bus) -> Result<Option<Self>, BusError> {
        match bus.js.get_key_value(subjects::lease_bucket()).await {
            Ok(kv) => {
                let ttl = kv.status().await.map(|s| s.max_age()).unwrap_or_default();
                Ok(Some(Leases { kv, ttl }))
            }
            Err(e) if e.kind() == async_nats::jetstream::context::KeyValueErrorKind::GetBucket => {
                Ok(None)
            }
            Err(e) => Err(js_err("open the lease bucket", e)),
        }
    }

    /// Tries to take the lease `key` for `holder` (its `epoch` is set to the revision).
    pub async fn acquire(&self, key: &str, holder: Holder) -> Result<Acquired, BusError> {
        match self.kv.create(key, encode(&holder)).await {
            Ok(revision) => Ok(Acquired::Held(
                self.stamp_epoch(key, holder, revision).await?,
            )),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Ok(Acquired::Taken(self.entry(key).await.ok().flatten()))
            }
            Err(e) => Err(js_err("take a lease", e)),
        }
    }

    /// Takes over the lease `key` at `revision` (compare-and-swap): for a node that knows
    /// the holder is gone (an earlier run on its own data directory). `None`: the key moved.
    pub async fn take_over(
        &self,
        key: &str,
        holder: Holder,
        revision: u64,
    ) -> Result<Option<Held>, BusError> {
        match self.kv.update(key, encode(&holder), revision).await {
            Ok(revision) => Ok(Some(self.stamp_epoch(key, holder, revision).await?)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(js_err("take over a lease", e)),
        }
    }

    /// Writes the revision at which the lease was just taken into its value as the epoch (a
    /// compare-and-swap on that revision).
    async fn stamp_epoch(
        &self,
        key: &str,
        mut holder: Holder,
        taken_at: u64,
    ) -> Result<Held, BusError> {
        holder.epoch = taken_at;
        let revision = self
            .kv
            .update(key, encode(&holder), taken_at)
            .await
            .map_err(|e| js_err("write the lease's epoch", e))?;
        Ok(Held {
            key: key.to_string(),
            revision,
            holder,
        })
    }

    /// Renews `held` (compare-and-swap on its revision). An error means the lease may be
    /// lost: the caller decides by its own clock.
    pub async fn renew(&self, held: &mut Held, now_ms: u64) -> Result<(), RenewError> {
        held.holder.renewed_at_ms = now_ms;
        match self
            .kv
            .update(&held.key, encode(&held.holder), held.revision)
            .await
        {
            Ok(revision) => {
                held.revision = revision;
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(RenewError::Lost),
            Err(e) => Err(RenewError::Failed(e.to_string())),
        }
    }

    /// Gives the lease up (graceful stop): a standby may take it at once.
    pub async fn release(&self, held: &Held) -> Result<(), BusError> {
        self.kv
            .delete_expect_revision(&held.key, Some(held.revision))
            .await
            .map_err(|e| js_err("release a lease", e))
    }

    /// Says that `node` waits for the lease `key` (expires like a lease).
    pub async fn stand_by(&self, key: &str, holder: &Holder) -> Result<(), BusError> {
        let standby = format!("{key}.standby.{}", key_safe(&holder.node));
        self.kv
            .put(&standby, encode(holder))
            .await
            .map(|_| ())
            .map_err(|e| js_err("register as standby", e))
    }

    /// Removes a standby registration (the node took the lease or stops).
    pub async fn stop_standing_by(&self, key: &str, node: &str) {
        let _ = self
            .kv
            .purge(format!("{key}.standby.{}", key_safe(node)))
            .await;
    }

    /// Who holds `key`, if anyone, and the key's revision.
    pub async fn entry(&self, key: &str) -> Result<Option<(Holder, u64)>, BusError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| js_err("read a lease", e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| Some((serde_json::from_slice(&e.value).ok()?, e.revision))))
    }

    /// Every live key of the bucket with its holder: leases and standby registrations.
    pub async fn all(&self) -> Result<Vec<(String, Holder)>, BusError> {
        let mut keys = self.kv.keys().await.map_err(|e| js_err("list leases", e))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| js_err("list leases", e))?);
        }
        let mut out = Vec::new();
        for k in names {
            if let Some((h, _)) = self.entry(&k).await? {
                out.push((k, h));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// Someone else wrote the key: the lease is gone.
    #[error("the lease was taken over")]
    Lost,
    /// No answer, or another failure: the lease may still be held.
    #[error("lease renewal failed: {0}")]
    Failed(String),
}

/// A node name as a key token (`.` separates tokens; `*`, `>` and spaces are not allowed).
pub fn key_safe(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '=' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn encode(holder: &Holder) -> Bytes {
    Bytes::from(serde_json::to_vec(holder).expect("a holder serializes"))
}
