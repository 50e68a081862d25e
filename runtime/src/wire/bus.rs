//! The bus: the NATS connection, JetStream streams and durable consumers, publishing and
//! dead letters. Takes its settings as plain values ([`StreamSpec`], [`ConsumerSpec`]), so it
//! depends on nothing above the wire.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

use super::envelope::{self, headers, Envelope};
use super::identity::{self, Identity};
use super::subjects;

/// Bus failures; all transient from a message's point of view.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No connection to NATS could be made.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// The URL connected to (or several, comma-separated: the servers of a cluster).
        url: String,
        /// Why the connection failed.
        message: String,
    },
    /// A JetStream request (a stream, a consumer, a bucket) failed or was refused.
    #[error("jetstream {what}: {message}")]
    JetStream {
        /// What was being done, e.g. `create consumer <durable>`.
        what: String,
        /// The error JetStream or the client reported.
        message: String,
    },
    /// A publish was not acknowledged by JetStream.
    #[error("publish to {subject}: {message}")]
    Publish {
        /// The subject published to.
        subject: String,
        /// Why it was not acknowledged.
        message: String,
    },
}

/// How long a node keeps trying to create its streams while JetStream does not answer.
const STREAM_SETUP_WAIT: Duration = Duration::from_secs(60);
/// The pause between two of those tries.
const STREAM_RETRY_EVERY: Duration = Duration::from_millis(500);

/// True when a stream request got no answer from JetStream (timed out, no responder, the
/// request failed), as opposed to an answer refusing it.
fn not_answered(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as K;
    matches!(
        e.kind(),
        K::TimedOut | K::JetStreamUnavailable | K::Response
    )
}

/// Whether `e`, or an error it wraps, is JetStream answering that the stream does not exist
/// (as opposed to not answering in time while a cluster elects a leader): only then is a
/// bucket to be created.
pub(super) fn stream_missing(e: &(dyn std::error::Error + 'static)) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind};
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(g) = err.downcast_ref::<GetStreamError>() {
            return matches!(g.kind(), GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
        }
        next = err.source();
    }
    false
}

pub(super) fn js_err(what: impl Into<String>, e: impl std::fmt::Display) -> BusError {
    BusError::JetStream {
        what: what.into(),
        message: e.to_string(),
    }
}

/// Connected client plus JetStream context; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    /// The core NATS client: plain publish, subscribe and request/reply.
    pub client: async_nats::Client,
    /// The JetStream context over `client`: streams, consumers and key-value buckets.
    pub js: jetstream::Context,
}

impl Bus {
    /// Connects to `url`, or to any of several comma-separated URLs (the servers of a
    /// cluster; the client moves to another when one goes). A failure that may pass
    /// (refused, no answer in time, a host name not resolved, another I/O error) is retried
    /// every 200 ms for up to `wait`, and logged as a warning with the URL and the reason (at
    /// the first failure, then every 5 s); one that cannot (not a NATS URL, TLS, credentials
    /// refused) fails at once. Anonymous; see [`Bus::connect_as`].
    pub async fn connect(url: &str, name: &str, wait: Duration) -> Result<Self, BusError> {
        Self::connect_as(url, name, wait, &Identity::default()).await
    }

    /// [`Bus::connect`] as `identity`: its credentials and TLS, its inbox prefix, and its
    /// permission violations counted under its label.
    pub async fn connect_as(
        url: &str,
        name: &str,
        wait: Duration,
        identity: &Identity,
    ) -> Result<Self, BusError> {
        use super::connect::{classify, secs, Failure, RetryLog, RETRY_EVERY};
        const TIMEOUT: Duration = Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        let deadline = started + wait;
        let mut log = RetryLog::default();
        let failed = |message: String| BusError::Connect {
            url: url.to_string(),
            message,
        };
        loop {
            let mut opts = async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(TIMEOUT)
                .request_timeout(Some(Duration::from_secs(10)))
                .event_callback(identity::on_event(identity.label.as_str().into()));
            if let Some(prefix) = &identity.inbox_prefix {
                opts = opts.custom_inbox_prefix(prefix);
            }
            let opts = identity.auth.apply(opts).await.map_err(failed)?;
            // Several servers of a cluster: `nats://a:4222,nats://b:4222`.
            let servers: Vec<&str> = url.split(',').map(str::trim).collect();
            let e = match opts.connect(servers).await {
                Ok(client) => {
                    if log.logged() {
                        let after = secs(started.elapsed());
                        tracing::info!("connected to NATS at {url} after {after}");
                    }
                    let js = jetstream::new(client.clone());
                    return Ok(Bus { client, js });
                }
                Err(e) => e,
            };
            let now = tokio::time::Instant::now();
            match classify(&e, TIMEOUT) {
                Failure::Permanent(why) => return Err(failed(why)),
                Failure::Transient(why) if now >= deadline => {
                    return Err(failed(format!("{why} (retried for {})", secs(wait))))
                }
                Failure::Transient(why) => {
                    let left = deadline - now;
                    if log.due(now.into_std(), &why) {
                        let left = secs(left);
                        tracing::warn!("NATS at {url} {why}; retrying for {left}");
                    }
                    tokio::time::sleep(RETRY_EVERY.min(left)).await;
                }
            }
        }
    }

    /// Creates the context's stream (or keeps the existing one) with explicit limits.
    pub async fn ensure_context_stream(
        &self,
        context: &str,
        spec: &StreamSpec,
    ) -> Result<(), BusError> {
        self.ensure_stream(
            format!("create stream for {context}"),
            stream::Config {
                name: subjects::stream(context),
                subjects: subjects::stream_subjects(context),
                max_age: spec.max_age,
                max_bytes: spec.max_bytes,
                max_message_size: spec.max_message_size,
                duplicate_window: spec.duplicate_window,
                storage: if spec.file_storage {
                    stream::StorageType::File
                } else {
                    stream::StorageType::Memory
                },
                discard: stream::DiscardPolicy::New,
                num_replicas: spec.replicas,
                ..Default::default()
            },
        )
        .await
    }

    /// Creates the dead-letter stream (or keeps the existing one).
    pub async fn ensure_dlq_stream(&self, spec: &StreamSpec) -> Result<(), BusError> {
        self.ensure_stream(
            "create dead-letter stream".to_string(),
            stream::Config {
                name: subjects::dlq_stream(),
                subjects: vec![subjects::dlq_subjects()],
                max_age: spec.max_age,
                max_bytes: spec.max_bytes,
                max_message_size: spec.max_message_size + 4096,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::New,
                num_replicas: spec.replicas,
                ..Default::default()
            },
        )
        .await
    }

    /// Creates a stream, or keeps the existing one. While JetStream does not answer (a
    /// server still starting, or recovering a large store after a restart, or too busy to
    /// answer in time) it tries again every [`STREAM_RETRY_EVERY`] for up to
    /// [`STREAM_SETUP_WAIT`]; a refusal by the server (a conflicting stream, no storage
    /// left) fails at once with the server's reason. An existing stream that discards old
    /// messages when full is switched to refusing new ones (see [`StreamSpec`]).
    pub(crate) async fn ensure_stream(
        &self,
        what: String,
        config: stream::Config,
    ) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + STREAM_SETUP_WAIT;
        loop {
            match self.js.get_or_create_stream(config.clone()).await {
                Ok(mut existing) => {
                    let current = existing.cached_info().config.clone();
                    if current.discard != config.discard {
                        let updated = stream::Config {
                            discard: config.discard,
                            ..current
                        };
                        self.js
                            .update_stream(updated)
                            .await
                            .map_err(|e| js_err(format!("{what}: set its discard policy"), e))?;
                        tracing::warn!(stream = %config.name, "stream switched to refuse new messages when full instead of discarding old ones");
                    }
                    let _ = existing.info().await;
                    return Ok(());
                }
                Err(e) if not_answered(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(stream = %config.name, error = %e, "JetStream did not answer; retrying");
                    tokio::time::sleep(STREAM_RETRY_EVERY).await;
                }
                Err(e) => return Err(js_err(what, e)),
            }
        }
    }

    /// Creates (or binds to) a durable pull consumer on the stream of `source`, receiving
    /// the subjects `filters`.
    pub async fn durable_consumer(
        &self,
        durable: &str,
        source: &str,
        filters: Vec<String>,
        spec: &ConsumerSpec,
    ) -> Result<consumer::PullConsumer, BusError> {
        let stream = self.context_stream(source).await?;
        // No back-off list: with one, the server adds its steps to every nak's own delay (a
        // message naked for 5 s on its second delivery came back after 35 s). Redelivery
        // after a crash comes from `redeliver_unacked` at start, after a stall from ack_wait.
        stream
            .get_or_create_consumer(
                durable,
                consumer::pull::Config {
                    durable_name: Some(durable.to_string()),
                    filter_subjects: filters,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: spec.ack_wait,
                    max_deliver: spec.max_deliver,
                    max_ack_pending: spec.max_ack_pending,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| js_err(format!("create consumer {durable}"), e))
    }

    /// The stream of context `source`.
    async fn context_stream(&self, source: &str) -> Result<jetstream::stream::Stream, BusError> {
        self.js
            .get_stream(subjects::stream(source))
            .await
            .map_err(|e| js_err(format!("get stream of {source}"), e))
    }

    /// Makes the durable consumer `durable` on the stream of `source` deliver again, now,
    /// every message it has not acked (delivery starts over from its ack floor). A node that
    /// starts does this once per consumer: what a previous run of it had in flight (killed,
    /// say) comes back at once instead of after `ack_wait`. Needs nats-server 2.14.
    pub async fn redeliver_unacked(&self, source: &str, durable: &str) -> Result<(), BusError> {
        let stream = self.context_stream(source).await?;
        stream
            .reset_consumer(durable, None)
            .await
            .map_err(|e| js_err(format!("reset consumer {durable}"), e))?;
        Ok(())
    }

    /// Publishes an envelope and its payload, with `Nats-Msg-Id`, and waits for the ack.
    /// Returns true if JetStream reported a duplicate.
    pub async fn publish(
        &self,
        subject: &str,
        env: &Envelope,
        payload: Bytes,
    ) -> Result<bool, BusError> {
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), env.to_headers(), payload)
            .await
            .map_err(|e| pub_err(subject, e))?
            .await
            .map_err(|e| pub_err(subject, e))?;
        Ok(ack.duplicate)
    }

    /// Sends a message to the dead-letter stream with its reason, keeping its original
    /// headers (its `Nats-Msg-Id` moves to `Choreo-Dlq-Msg-Id`) and payload, and waits for
    /// the ack.
    pub(crate) async fn dead_letter(&self, dl: &DeadLetter<'_>) -> Result<(), BusError> {
        let mut h = envelope::headers_without_msg_id(dl.headers);
        if let Some(id) = dl.headers.and_then(|h| h.get(headers::NATS_MSG_ID)) {
            h.insert(headers::DLQ_MSG_ID, id.as_str());
        }
        h.insert(headers::DLQ_REASON, one_line(dl.reason).as_str());
        h.insert(headers::DLQ_CONSUMER, dl.consumer);
        h.insert(headers::DLQ_SUBJECT, dl.subject);
        h.insert(headers::DLQ_DELIVERED, dl.delivered.to_string().as_str());
        // One dead letter per (consumer, stream sequence): a retried dead-lettering is dropped.
        h.insert(
            headers::NATS_MSG_ID,
            envelope::derived_id(&format!("dlq/{}/{}", dl.consumer, dl.stream_sequence)).as_str(),
        );
        let subject = subjects::dead_letter(dl.context);
        self.js
            .publish_with_headers(subject.clone(), h, dl.payload.clone())
            .await
            .map_err(|e| pub_err(&subject, e))?
            .await
            .map_err(|e| pub_err(&subject, e))?;
        Ok(())
    }
}

/// The limits a stream is created with. A full stream refuses new messages (a publisher
/// retries: backpressure) rather than discarding the oldest, which a consumer may not have
/// read yet; history that every durable consumer has acked is removed by
/// [`Bus::trim`]. `max_age` (zero: none) removes old messages whatever their state.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    /// Messages older than this are removed by the server, acked or not (zero: no age
    /// limit).
    pub max_age: Duration,
    /// The stream's size limit in bytes (-1: none).
    pub max_bytes: i64,
    /// The largest message the stream stores, in bytes (the dead-letter stream's is 4096
    /// bytes more, for the headers a dead letter adds).
    pub max_message_size: i32,
    /// How long JetStream remembers a `Nats-Msg-Id`, dropping a message published again
    /// with it.
    pub duplicate_window: Duration,
    /// `true`: file storage; `false`: memory. The dead-letter stream is always on file.
    pub file_storage: bool,
    /// Copies of every stream, consumer and key-value bucket: 1 on one server, 3 on a
    /// cluster of three or more.
    pub replicas: usize,
}

/// The settings a durable consumer is created with.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSpec {
    /// A delivered message not acked within this time is delivered again.
    pub ack_wait: Duration,
    /// Deliveries after which the server gives up on a message: a backstop, the runtime's
    /// retry budget dead-letters a failing message before.
    pub max_deliver: i64,
    /// Messages delivered and not yet acked at most; the server delivers no more until
    /// some are acked.
    pub max_ack_pending: i64,
}

/// A message given up on, and why.
pub(crate) struct DeadLetter<'a> {
    /// The context whose consumer gave up on it: the dead letter goes to its DLQ subject.
    pub(crate) context: &'a str,
    /// The durable consumer that gave up on it.
    pub(crate) consumer: &'a str,
    /// The subject it was delivered on.
    pub(crate) subject: &'a str,
    /// Why it was given up on (sent as one line of at most 512 characters).
    pub(crate) reason: &'a str,
    /// How many times it was delivered.
    pub(crate) delivered: i64,
    /// Its sequence in its stream; with `consumer`, the dead letter's `Nats-Msg-Id`.
    pub(crate) stream_sequence: u64,
    /// Its original headers, if it had any.
    pub(crate) headers: Option<&'a HeaderMap>,
    /// Its original body.
    pub(crate) payload: Bytes,
}

fn pub_err(subject: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Publish {
        subject: subject.to_string(),
        message: e.to_string(),
    }
}

/// Header values cannot hold line breaks; reasons are cut to a readable length.
fn one_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    s.chars().take(512).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{
        GetStreamError, GetStreamErrorKind, KeyValueError, KeyValueErrorKind,
    };

    fn jetstream_error(code: usize, err_code: u64) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": code, "err_code": err_code, "description": "stream not found"
        }))
        .unwrap()
    }

    #[test]
    fn only_a_stream_not_found_answer_means_missing() {
        let missing =
            GetStreamError::new(GetStreamErrorKind::JetStream(jetstream_error(404, 10059)));
        let wrapped = KeyValueError::with_source(KeyValueErrorKind::GetBucket, missing);
        assert!(stream_missing(&wrapped));
        // No answer in time (a cluster electing a leader): the bucket may well be there.
        let timed_out = GetStreamError::new(GetStreamErrorKind::Request);
        let wrapped = KeyValueError::with_source(KeyValueErrorKind::GetBucket, timed_out);
        assert!(!stream_missing(&wrapped));
        let other = GetStreamError::new(GetStreamErrorKind::JetStream(jetstream_error(503, 10008)));
        assert!(!stream_missing(&other));
    }
}
