//! Node configuration: a TOML file, overridden by environment variables and CLI flags.
//!
//! Every limit that JetStream would otherwise default to "unlimited" or "2 minutes" is set
//! here explicitly, with the reasoning beside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::duration;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or not a [`NodeConfig`] (an unknown key, a bad value).
    #[error("config file {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the key and the line).
        message: String,
    },
    /// A value breaks a rule ([`NodeConfig::validate`]); the text names the key and the rule.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a node needs. Durations are written with their unit (`"30s"`, see
/// [`duration`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Contexts hosted by this node (`all` expands to every known context).
    pub contexts: Vec<String>,
    /// NATS server URL, or several comma-separated (the servers of a cluster).
    pub nats_url: String,
    /// The node's NATS identity (nkey seed or credentials file) and TLS; none: anonymous,
    /// plaintext (see docs/security.md).
    pub nats: crate::wire::identity::NatsAuth,
    /// The application's namespace: prefix of its subjects (`<ns>.<ctx>.evt.<Type>`) and
    /// streams (`<NS>_<CTX>`), so several applications share one NATS server.
    pub namespace: String,
    /// Directory holding one sled database per context.
    pub data_dir: PathBuf,
    /// Address of the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: String,
    /// Limits of each context's stream (`[stream]`).
    pub stream: StreamConfig,
    /// Settings of every durable consumer (`[consumer]`).
    pub consumer: ConsumerConfig,
    /// Settings of each context's sled store (`[store]`).
    pub store: StoreConfig,
    /// Who serves each context (one owner at a time, standbys) and its replicated
    /// changelog.
    pub ownership: OwnershipConfig,
    /// Timeout of one request to an external system.
    #[serde(with = "duration")]
    pub external_timeout: Duration,
    /// Largest message (payload plus headers) a handler accepts; larger ones are
    /// dead-lettered. Must stay below the server's `max_payload` (1 MiB by default).
    pub max_message_bytes: usize,
    /// Fault injection for chaos tests (off by default; needs the cargo feature `faults`).
    #[cfg(feature = "faults")]
    pub faults: crate::faults::FaultConfig,
    /// Without the cargo feature `faults`: a `[faults]` table is refused with a clear error.
    #[cfg(not(feature = "faults"))]
    #[serde(skip_serializing)]
    pub faults: Option<toml::Table>,
    /// Default retry policy of every handler.
    pub retry: crate::resilience::retry::RetryPolicy,
    /// Per-handler settings by component name (e.g. `[handlers.billing]`).
    pub handlers: std::collections::BTreeMap<String, HandlerConfig>,
    /// Circuit breakers around external systems (one per system).
    pub breaker: crate::resilience::breaker::BreakerConfig,
    /// Restart limits of consumer actors.
    pub supervision: SupervisionConfig,
    /// Per-saga settings (deadlines in ms, resend limits), by saga name; each saga
    /// validates its own keys.
    pub sagas: std::collections::BTreeMap<String, SagaSettings>,
    /// Switches that remove a safety mechanism, only so that the chaos suite can show what
    /// each one protects (cargo feature `danger`). Never set them in production.
    #[cfg(feature = "danger")]
    pub danger: DangerConfig,
    /// Without the cargo feature `danger`: a `[danger]` table is refused with a clear error.
    #[cfg(not(feature = "danger"))]
    #[serde(skip_serializing)]
    pub danger: Option<toml::Table>,
}

/// One saga's settings by key: durations (`awaiting = "2m"`) or counts (`max_attempts = 3`).
pub type SagaSettings = std::collections::BTreeMap<String, duration::Setting>;

/// Each switch removes one mechanism the invariants rest on (see `docs/chaos.md`).
#[cfg(feature = "danger")]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DangerConfig {
    /// No inbox check: a redelivered or replayed message is handled again.
    pub disable_inbox: bool,
    /// No outbox: a handler's messages are published from memory after its commit, and
    /// whatever a crash left unpublished is forgotten at start.
    pub disable_outbox: bool,
    /// No group commit before the ack: messages are acked (and their messages published)
    /// after the in-memory commit; sled flushes in the background every second.
    pub disable_group_commit: bool,
}

#[cfg(feature = "danger")]
impl DangerConfig {
    /// Whether any switch is set (the node then logs an error at start).
    pub(crate) fn any(&self) -> bool {
        self.disable_inbox || self.disable_outbox || self.disable_group_commit
    }
}

/// Limits of each context's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Messages older than this are removed by the server whether consumers have acked them
    /// or not (a consumer behind by more loses them: counted as missed); 0: no age limit,
    /// history is bounded by `max_bytes` and `history` instead.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// Stream size limit in bytes. A full stream refuses new messages: publishers retry
    /// (the outbox holds its entries) until consumers catch up and acked history is removed.
    pub max_bytes: i64,
    /// JetStream deduplication window for `Nats-Msg-Id`. Longer than a publish retry takes
    /// to come (a publish ack waits at most 5 s, then the outbox relay backs off 50 ms to
    /// 2 s; a client retries every 250 ms), so a repeated publish is dropped by the server; a
    /// re-publish after a longer outage or restart is absorbed by the consumers' inbox. The
    /// server holds every id of the window in memory (about 150 bytes each: at 7,000
    /// messages a second, 10 s is 70,000 ids, 10 min 4.2 million), and its garbage
    /// collector marks them all on every cycle (bench/PROFILE.md).
    #[serde(with = "duration")]
    pub duplicate_window: Duration,
    /// Largest message the stream stores (bigger than `max_message_bytes`, so oversized
    /// input reaches a handler and is dead-lettered with a reason instead of vanishing).
    pub max_message_size: i32,
    /// `true`: file storage; `false`: memory (tests of throughput only).
    pub file_storage: bool,
    /// Share of `max_bytes` kept as history: above it, nodes remove the oldest messages that
    /// every durable consumer has acked. Unacked messages are never removed; a stream full
    /// of them refuses new messages and publishers wait (backpressure).
    pub history: f64,
    /// Copies JetStream keeps of every stream, consumer, changelog and the lease bucket:
    /// 1 on one server, 3 (or 5) on a cluster of at least that many servers.
    pub replicas: usize,
}

/// Settings of every durable consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Redelivery if not acked within this time. At least 3x the slowest handler
    /// (external timeout plus store commit).
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Server-side backstop on deliveries. The runtime's retry budget (`[retry] budget`)
    /// decides when a failing message is dead-lettered; this only has to stay above it plus
    /// the redeliveries an open breaker causes (a message past it is dropped by the server).
    pub max_deliver: i64,
    /// Messages handled at once per consumer (bounded in-flight work).
    pub max_in_flight: usize,
    /// A message the context sends to one of its own consumers (that needs no external
    /// call) is handled inside the transaction that wrote it; its JetStream copy is then a
    /// duplicate. Off: it takes the round trip through JetStream like any other.
    pub own_messages_in_transaction: bool,
}

/// Settings of one handler (component); missing ones take the node's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// Replaces the default retry policy whole for this handler.
    #[serde(default)]
    pub retry: Option<crate::resilience::retry::RetryPolicy>,
    /// Bulkhead size of each of this handler's consumers.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

/// Restart intensity: at most `max_restarts` in `window`, with back-off between them;
/// beyond it the consumer stops for `window` and the node reports not ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Restarts allowed within one `window` (default 10); one more stops the consumer.
    pub max_restarts: usize,
    /// The span restarts are counted over, and how long a consumer past the limit stays
    /// stopped (default 60 s).
    #[serde(with = "duration")]
    pub window: Duration,
    /// Delay before the 1st, 2nd, ... restart in a window (the last repeats).
    #[serde(with = "duration::list")]
    pub backoff: Vec<Duration>,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_restarts: 10,
            window: Duration::from_secs(60),
            backoff: [0, 100, 1_000, 5_000].map(Duration::from_millis).to_vec(),
        }
    }
}

/// Ownership of a context's partition (one partition per context for now): a lease in the
/// JetStream key-value bucket `<NS>_LEASES`, and the changelog that lets another node take
/// the partition over (see `node::ownership` and docs/runtime-semantics.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OwnershipConfig {
    /// `false`: no lease and no changelog; the node serves its contexts at once and their
    /// state lives only on its disk (a second node of a context must not be started).
    pub enabled: bool,
    /// How long a lease lasts without renewal: a standby takes over at most this long
    /// (plus its polling interval, a fifth of it) after the owner stops renewing. The owner
    /// renews every fifth of it and stops serving by itself when four fifths have passed
    /// since its last renewal was sent.
    #[serde(with = "duration")]
    pub lease_ttl: Duration,
    /// A node that replayed at least this many changelog records when it took the partition
    /// puts a snapshot of the state in `<NS>_<CTX>_SNAPSHOTS` and removes the records it covers,
    /// so the next takeover replays the snapshot and what came after it.
    pub snapshot_after: u64,
    /// `true`: a flush is made durable on the local disk (sled flush and fsync) before it
    /// is appended to the changelog and acked. `false`: the changelog append alone is the
    /// durable record (meant for R3 on a cluster; on one server with its default sync
    /// interval an acked message then waits in two page caches). See bench/PROFILE.md.
    pub local_sync: bool,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig {
            enabled: true,
            lease_ttl: Duration::from_secs(5),
            snapshot_after: 10_000,
            local_sync: true,
        }
    }
}

/// Settings of each context's sled store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// How long an inbox mark is kept at least (at most twice this: marks expire a
    /// generation at a time, see `Store::rotate_inbox`); a duplicate older than this is
    /// processed again.
    #[serde(with = "duration")]
    pub inbox_retention: Duration,
    /// How often the node checks whether the inbox generation is due to rotate.
    #[serde(with = "duration")]
    pub inbox_prune_interval: Duration,
    /// sled page cache size in bytes (sled keeps about twice this resident).
    pub cache_capacity_bytes: u64,
    /// A store flush that has not returned after this long will not: the node restarts in
    /// place (see `node::watchdog`). Whole seconds; at least 1 s.
    #[serde(with = "duration")]
    pub flush_stall: Duration,
    /// How long a saga instance that ended (completed, cancelled) is kept, with its
    /// history, for inspection; then it is removed. 0: kept for ever.
    #[serde(with = "duration")]
    pub saga_retention: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            contexts: vec![],
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: Default::default(),
            namespace: crate::wire::subjects::DEFAULT_NAMESPACE.into(),
            data_dir: PathBuf::from(".choreo/data"),
            metrics_addr: "127.0.0.1:9464".into(),
            stream: StreamConfig::default(),
            consumer: ConsumerConfig::default(),
            store: StoreConfig::default(),
            ownership: OwnershipConfig::default(),
            external_timeout: Duration::from_secs(5),
            max_message_bytes: 64 * 1024,
            faults: Default::default(),
            retry: Default::default(),
            handlers: Default::default(),
            breaker: Default::default(),
            supervision: Default::default(),
            sagas: Default::default(),
            danger: Default::default(),
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_age: Duration::ZERO,
            max_bytes: 256 << 20,
            duplicate_window: Duration::from_secs(10),
            max_message_size: 1024 * 1024 - 4096,
            file_storage: true,
            history: 0.5,
            replicas: 1,
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            ack_wait: Duration::from_secs(30),
            max_deliver: 10_000,
            max_in_flight: 64,
            own_messages_in_transaction: true,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            inbox_prune_interval: Duration::from_secs(60),
            cache_capacity_bytes: 8 * 1024 * 1024,
            flush_stall: Duration::from_secs(30),
            saga_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file; missing keys take their defaults, unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The duration `[sagas.<saga>] <name>` sets, if it is set; a count there is an error.
    pub fn saga_duration(&self, saga: &str, name: &str) -> Result<Option<Duration>, ConfigError> {
        match self.sagas.get(saga).and_then(|s| s.get(name)) {
            None => Ok(None),
            Some(duration::Setting::Duration(d)) => Ok(Some(*d)),
            Some(duration::Setting::Count(n)) => Err(ConfigError::Invalid(format!(
                "[sagas.{saga}] {name} = {n}: a duration such as \"30s\" is expected"
            ))),
        }
    }

    /// Checks the values that would make the node misbehave rather than fail.
    pub fn validate(&self, known_contexts: &[&str]) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        crate::wire::subjects::check_namespace(&self.namespace).map_err(ConfigError::Invalid)?;
        self.nats.check().map_err(ConfigError::Invalid)?;
        if self.contexts.is_empty() {
            return bad("no context to host (use --context, CHOREO_CONTEXT or `contexts`)".into());
        }
        for c in &self.contexts {
            if !known_contexts.contains(&c.as_str()) {
                return bad(format!(
                    "unknown context {c:?}; known: {} (or `all`)",
                    known_contexts.join(", ")
                ));
            }
        }
        let c = &self.consumer;
        if c.max_deliver < 2 {
            return bad(format!(
                "consumer.max_deliver must be at least 2, got {}",
                c.max_deliver
            ));
        }
        if c.max_in_flight == 0 || c.max_in_flight > 10_000 {
            return bad(format!(
                "consumer.max_in_flight must be 1..=10000, got {}",
                c.max_in_flight
            ));
        }
        if c.ack_wait < 3 * self.external_timeout {
            return bad(format!(
                "consumer.ack_wait ({}) must be at least 3x external_timeout ({})",
                duration::format(c.ack_wait),
                duration::format(self.external_timeout)
            ));
        }
        let policies = std::iter::once(("retry".to_string(), &self.retry)).chain(
            self.handlers
                .iter()
                .filter_map(|(h, c)| c.retry.as_ref().map(|r| (format!("handlers.{h}.retry"), r))),
        );
        for (name, p) in policies {
            if let Some(problem) = p.problems() {
                return bad(format!("{name}: {problem}"));
            }
            if p.handler_timeout >= c.ack_wait {
                return bad(format!(
                    "{name}.handler_timeout ({}) must be below consumer.ack_wait ({})",
                    duration::format(p.handler_timeout),
                    duration::format(c.ack_wait)
                ));
            }
            if i64::from(p.budget) >= c.max_deliver {
                return bad(format!(
                    "{name}.budget must be below consumer.max_deliver ({})",
                    c.max_deliver
                ));
            }
        }
        if let Some(problem) = self.breaker.problems() {
            return bad(format!("breaker: {problem}"));
        }
        if self.supervision.max_restarts == 0 || self.supervision.backoff.is_empty() {
            return bad("supervision: max_restarts must be positive and backoff not empty".into());
        }
        if !(self.stream.history > 0.0 && self.stream.history < 1.0) {
            return bad(format!(
                "stream.history must be a share of max_bytes between 0 and 1 (exclusive), got {}",
                self.stream.history
            ));
        }
        let s = &self.stream;
        if s.duplicate_window.is_zero() || (!s.max_age.is_zero() && s.duplicate_window > s.max_age)
        {
            return bad("stream.duplicate_window must be > 0 and <= stream.max_age".into());
        }
        if self.max_message_bytes as i64 >= self.stream.max_message_size as i64 {
            return bad(format!(
                "max_message_bytes ({}) must be below stream.max_message_size ({}) so oversized \
                 input is dead-lettered, not refused at publish",
                self.max_message_bytes, self.stream.max_message_size
            ));
        }
        if self.store.flush_stall < Duration::from_secs(1) {
            return bad(format!(
                "store.flush_stall must be at least 1s (the watchdog looks once a second), got {}",
                duration::format(self.store.flush_stall)
            ));
        }
        #[cfg(feature = "faults")]
        for (i, r) in self.faults.rules.iter().enumerate() {
            if let Err(problem) = r.validate() {
                return bad(format!("faults.rules[{i}]: {problem}"));
            }
        }
        #[cfg(not(feature = "faults"))]
        if self.faults.is_some() {
            return bad(
                "[faults]: this build has no fault injection (built without the cargo feature \
                 `faults`)"
                    .into(),
            );
        }
        #[cfg(not(feature = "danger"))]
        if self.danger.is_some() {
            return bad(
                "[danger]: this build has no [danger] switches (built without the cargo feature \
                 `danger`, which only the chaos suite enables)"
                    .into(),
            );
        }
        if !matches!(self.stream.replicas, 1 | 3 | 5) {
            return bad(format!(
                "stream.replicas must be 1, 3 or 5, got {}",
                self.stream.replicas
            ));
        }
        if !self.ownership.local_sync && !self.ownership.enabled {
            return bad(
                "ownership.local_sync = false needs ownership.enabled: without the changelog \
                 the local fsync is the only durable record"
                    .into(),
            );
        }
        if self.ownership.lease_ttl < Duration::from_secs(1) {
            return bad(format!(
                "ownership.lease_ttl must be at least 1s, got {}",
                duration::format(self.ownership.lease_ttl)
            ));
        }
        if self.metrics_addr.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!(
                "metrics address {:?} is not host:port",
                self.metrics_addr
            ));
        }
        Ok(())
    }

    /// The limits the node creates context streams with.
    pub fn stream_spec(&self) -> crate::wire::bus::StreamSpec {
        let s = &self.stream;
        crate::wire::bus::StreamSpec {
            max_age: s.max_age,
            max_bytes: s.max_bytes,
            max_message_size: s.max_message_size,
            duplicate_window: s.duplicate_window,
            file_storage: s.file_storage,
            replicas: s.replicas,
        }
    }

    /// The settings of the durable consumers of a handler (component).
    pub fn consumer_spec(&self, component: &str) -> crate::wire::bus::ConsumerSpec {
        crate::wire::bus::ConsumerSpec {
            ack_wait: self.ack_wait(),
            max_deliver: self.consumer.max_deliver,
            max_ack_pending: (self.max_in_flight(component) * 4) as i64,
        }
    }

    /// How long the server waits for an ack before it redelivers (`consumer.ack_wait`).
    pub(crate) fn ack_wait(&self) -> Duration {
        self.consumer.ack_wait
    }

    /// The retry policy of a handler (component).
    pub fn policy(&self, component: &str) -> &crate::resilience::retry::RetryPolicy {
        self.handlers
            .get(component)
            .and_then(|h| h.retry.as_ref())
            .unwrap_or(&self.retry)
    }

    /// The bulkhead size of a handler's consumers.
    pub fn max_in_flight(&self, component: &str) -> usize {
        self.handlers
            .get(component)
            .and_then(|h| h.max_in_flight)
            .unwrap_or(self.consumer.max_in_flight)
    }
}

#[cfg(test)]
mod tests;
