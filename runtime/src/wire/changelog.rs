//! A partition's changelog on JetStream: one stream per context (`<NS>_<CTX>_CHANGELOG`), one
//! subject per partition, one message per record (opaque bytes to this module: the store
//! encodes them). Appends name the sequence they follow (`Nats-Expected-Last-Subject-
//! Sequence`), so the server refuses an append from a node that has been fenced off: once
//! the new owner has appended its first record, every append of the old one names a stale
//! sequence. Each append carries a `Nats-Msg-Id`, so a retry of an append whose answer was
//! lost is not stored twice.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;

use super::bus::{js_err, stream_missing, Bus, BusError, StreamSpec};
use super::subjects;

/// The header naming the fencing epoch of the owner that appended a record.
pub const EPOCH_HEADER: &str = "Choreo-Epoch";

/// How long an append waits for JetStream's answer.
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an append did not land.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The log has moved past the sequence this node expected: another node appended, this
    /// one no longer owns the partition.
    #[error("changelog append refused: another node has appended since sequence {expected}")]
    Fenced {
        /// The sequence of the last record this node expected the log to hold.
        expected: u64,
    },
    /// No answer, or another failure: the append may be retried (same id).
    #[error("changelog append failed: {0}")]
    Failed(String),
}

/// One partition's changelog.
#[derive(Clone)]
pub struct Changelog {
    js: jetstream::Context,
    stream: String,
    subject: String,
}

impl Changelog {
    /// Creates the context's changelog stream (or keeps it) and returns partition
    /// `partition`'s log. Nothing is removed by age or size: records go only when a snapshot
    /// covers them.
    pub async fn open(
        bus: &Bus,
        context: &str,
        partition: u32,
        spec: &StreamSpec,
    ) -> Result<Self, BusError> {
        let stream = subjects::changelog_stream(context);
        bus.ensure_stream(
            format!("create changelog stream for {context}"),
            stream::Config {
                name: stream.clone(),
                subjects: vec![format!("{}.changelog.{context}.>", subjects::namespace())],
                max_message_size: 1 << 20,
                duplicate_window: spec.duplicate_window,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::New,
                num_replicas: spec.replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Changelog {
            js: bus.js.clone(),
            stream,
            subject: subjects::changelog(context, partition),
        })
    }

    /// Partition `partition`'s log in a stream some node created (for operators' tools).
    pub fn bind(bus: &Bus, context: &str, partition: u32) -> Self {
        Changelog {
            js: bus.js.clone(),
            stream: subjects::changelog_stream(context),
            subject: subjects::changelog(context, partition),
        }
    }

    /// The sequence of the partition's last record (0: none yet).
    pub async fn last(&self) -> Result<u64, BusError> {
        let stream = self.stream_handle().await?;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(0)
            }
            Err(e) => Err(js_err("read the changelog's last record", e)),
        }
    }

    /// Appends `record` after the record `expected` (0: the first); returns its sequence.
    /// `id` names the record for deduplication (the same record retried keeps its id);
    /// `epoch` (the appending owner's, header [`EPOCH_HEADER`]) is for operators and tests.
    pub async fn append(
        &self,
        record: Bytes,
        expected: u64,
        id: &str,
        epoch: u64,
    ) -> Result<u64, AppendError> {
        let mut headers = HeaderMap::new();
        headers.insert(EPOCH_HEADER, epoch.to_string().as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        headers.insert("Nats-Msg-Id", id);
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, record)
            .await
            .map_err(|e| AppendError::Failed(e.to_string()))?;
        match tokio::time::timeout(APPEND_TIMEOUT, ack).await {
            Err(_) => Err(AppendError::Failed("no answer in time".into())),
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(AppendError::Fenced { expected })
            }
            Ok(Err(e)) => Err(AppendError::Failed(e.to_string())),
        }
    }

    /// Removes the partition's records before `seq` (a snapshot covers them; the record
    /// `seq` stays, so that the next append still names the last one).
    pub async fn remove_before(&self, seq: u64) -> Result<(), BusError> {
        let stream = self.stream_handle().await?;
        stream
            .purge()
            .filter(&self.subject)
            .sequence(seq)
            .await
            .map(|_| ())
            .map_err(|e| js_err("remove records a snapshot covers", e))
    }

    /// The sequence of the partition's first record still stored (0: none).
    pub async fn first(&self) -> Result<u64, BusError> {
        let mut stream = self.stream_handle().await?;
        let info = stream
            .info()
            .await
            .map_err(|e| js_err("read the changelog stream", e))?;
        Ok(if info.state.messages == 0 {
            0
        } else {
            info.state.first_sequence
        })
    }

    /// Every record after sequence `after`, in order, up to the last one at the time of the
    /// call: `(sequence, record)`.
    pub async fn read_after(&self, after: u64) -> Result<Vec<(u64, Bytes)>, BusError> {
        let last = self.last().await?;
        let mut out = Vec::new();
        if last <= after {
            return Ok(out);
        }
        let stream = self.stream_handle().await?;
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| js_err("read the changelog", e))?;
        let mut messages = reader
            .messages()
            .await
            .map_err(|e| js_err("read the changelog", e))?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| js_err("read the changelog", e))?;
            let seq = m
                .info()
                .map_err(|e| js_err("read the changelog", e))?
                .stream_sequence;
            out.push((seq, m.message.payload.clone()));
            if seq >= last {
                break;
            }
        }
        Ok(out)
    }

    async fn stream_handle(&self) -> Result<jetstream::stream::Stream, BusError> {
        self.js
            .get_stream(&self.stream)
            .await
            .map_err(|e| js_err("open the changelog stream", e))
    }
}

/// The snapshots of a namespace's partitions, in the JetStream object store
/// `<NS>_<CTX>_SNAPSHOTS`: one object per snapshot, `<ctx>.p<n>.<sequence>`, holding the
/// partition's state as of that changelog sequence (the store encodes it). A new one is put
/// before older ones and the records it covers are removed, so a reader always finds a
/// snapshot and every record after it; the highest sequence wins, so an older snapshot put
/// late (by a fenced node) never hides a newer one.
#[derive(Clone)]
pub struct Snapshots {
    store: jetstream::object_store::ObjectStore,
}

impl Snapshots {
    /// Binds to `context`'s bucket, or creates it if JetStream says it does not exist.
    pub async fn open(bus: &Bus, context: &str, replicas: usize) -> Result<Self, BusError> {
        let bucket = subjects::snapshot_bucket(context);
        let store = match bus.js.get_object_store(&bucket).await {
            Ok(store) => store,
            Err(e) if !stream_missing(&e) => return Err(js_err("open the snapshot bucket", e)),
            Err(_) => bus
                .js
                .create_object_store(jetstream::object_store::Config {
                    bucket,
                    description: Some("choreo partition snapshots".into()),
                    num_replicas: replicas,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| js_err("create the snapshot bucket", e))?,
        };
        Ok(Snapshots { store })
    }

    fn prefix(context: &str, partition: u32) -> String {
        format!("{context}.p{partition}.")
    }

    /// The sequences of the partition's snapshots, highest first.
    async fn sequences(&self, context: &str, partition: u32) -> Result<Vec<u64>, BusError> {
        let prefix = Self::prefix(context, partition);
        let mut list = self
            .store
            .list()
            .await
            .map_err(|e| js_err("list snapshots", e))?;
        let mut out = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| js_err("list snapshots", e))?;
            if info.deleted {
                continue;
            }
            if let Some(seq) = info
                .name
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push(seq);
            }
        }
        out.sort_unstable_by(|a, b| b.cmp(a));
        Ok(out)
    }

    /// The partition's newest snapshot: its sequence and content.
    pub async fn latest(
        &self,
        context: &str,
        partition: u32,
    ) -> Result<Option<(u64, Vec<u8>)>, BusError> {
        use tokio::io::AsyncReadExt;
        let Some(seq) = self.sequences(context, partition).await?.first().copied() else {
            return Ok(None);
        };
        let name = format!("{}{seq}", Self::prefix(context, partition));
        let mut object = self
            .store
            .get(&name)
            .await
            .map_err(|e| js_err("read a snapshot", e))?;
        let mut data = Vec::new();
        object
            .read_to_end(&mut data)
            .await
            .map_err(|e| js_err("read a snapshot", e))?;
        Ok(Some((seq, data)))
    }

    /// Puts the partition's snapshot as of `seq`, then removes its older ones.
    pub async fn put(
        &self,
        context: &str,
        partition: u32,
        seq: u64,
        data: &[u8],
    ) -> Result<(), BusError> {
        let name = format!("{}{seq}", Self::prefix(context, partition));
        let mut reader = data;
        self.store
            .put(name.as_str(), &mut reader)
            .await
            .map_err(|e| js_err("put a snapshot", e))?;
        for older in self.sequences(context, partition).await? {
            if older < seq {
                let name = format!("{}{older}", Self::prefix(context, partition));
                let _ = self.store.delete(&name).await;
            }
        }
        Ok(())
    }
}
