//! Node configuration: a TOML file, overridden by environment variables and CLI flags.
//!
//! Every limit that JetStream would otherwise default to "unlimited" or "2 minutes" is set
//! here explicitly, with the reasoning beside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a node needs. Durations are in milliseconds in the file (`*_ms`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Contexts hosted by this node (`all` expands to every known context).
    pub contexts: Vec<String>,
    /// NATS server URL.
    pub nats_url: String,
    /// Directory holding one sled database per context.
    pub data_dir: PathBuf,
    /// Address of the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: String,
    pub stream: StreamConfig,
    pub consumer: ConsumerConfig,
    pub store: StoreConfig,
    /// Timeout of one request to an external system.
    pub external_timeout_ms: u64,
    /// Largest message (payload plus headers) a handler accepts; larger ones are
    /// dead-lettered. Must stay below the server's `max_payload` (1 MiB by default).
    pub max_message_bytes: usize,
    /// Fault injection for chaos tests (off by default).
    pub faults: crate::faults::FaultConfig,
    /// Per-saga settings (deadlines in ms, resend limits), by saga name; each saga
    /// validates its own keys.
    pub sagas: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// Limits of each context's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Messages older than this are removed.
    pub max_age_ms: u64,
    /// Stream size limit in bytes (oldest removed first).
    pub max_bytes: i64,
    /// JetStream deduplication window for `Nats-Msg-Id`. Longer than the outbox relay's
    /// longest retry so that a re-publish after a crash is dropped by the server.
    pub duplicate_window_ms: u64,
    /// Largest message the stream stores (bigger than `max_message_bytes`, so oversized
    /// input reaches a handler and is dead-lettered with a reason instead of vanishing).
    pub max_message_size: i32,
    /// `true`: file storage; `false`: memory (tests of throughput only).
    pub file_storage: bool,
}

/// Settings of every durable consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Redelivery if not acked within this time. At least 3x the slowest handler
    /// (external timeout plus store commit).
    pub ack_wait_ms: u64,
    /// Deliveries before the handler dead-letters the message itself.
    pub max_deliver: i64,
    /// Delays between redeliveries after a transient failure (the last one repeats).
    pub retry_backoff_ms: Vec<u64>,
    /// Messages handled at once per consumer (bounded in-flight work).
    pub max_in_flight: usize,
}

/// Settings of each context's sled store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// How long an inbox mark is kept; a duplicate older than this is processed again.
    pub inbox_retention_ms: u64,
    /// How often expired inbox marks are removed.
    pub inbox_prune_interval_ms: u64,
    /// sled page cache size in bytes.
    pub cache_capacity_bytes: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            contexts: vec![],
            nats_url: "nats://127.0.0.1:4222".into(),
            data_dir: PathBuf::from(".choreo/data"),
            metrics_addr: "127.0.0.1:9464".into(),
            stream: StreamConfig::default(),
            consumer: ConsumerConfig::default(),
            store: StoreConfig::default(),
            external_timeout_ms: 5_000,
            max_message_bytes: 64 * 1024,
            faults: crate::faults::FaultConfig::default(),
            sagas: Default::default(),
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_age_ms: 7 * 24 * 3600 * 1000,
            max_bytes: 256 << 20,
            duplicate_window_ms: 10 * 60 * 1000,
            max_message_size: 1024 * 1024 - 4096,
            file_storage: true,
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            ack_wait_ms: 30_000,
            max_deliver: 20,
            retry_backoff_ms: vec![100, 500, 2_000, 5_000, 10_000],
            max_in_flight: 64,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            inbox_retention_ms: 7 * 24 * 3600 * 1000,
            inbox_prune_interval_ms: 60_000,
            cache_capacity_bytes: 16 * 1024 * 1024,
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

    /// Checks the values that would make the node misbehave rather than fail.
    pub fn validate(&self, known_contexts: &[&str]) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
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
        if c.retry_backoff_ms.is_empty() {
            return bad("consumer.retry_backoff_ms must not be empty".into());
        }
        if c.ack_wait_ms < 3 * self.external_timeout_ms {
            return bad(format!(
                "consumer.ack_wait_ms ({}) must be at least 3x external_timeout_ms ({})",
                c.ack_wait_ms, self.external_timeout_ms
            ));
        }
        if self.stream.duplicate_window_ms == 0
            || self.stream.duplicate_window_ms > self.stream.max_age_ms
        {
            return bad("stream.duplicate_window_ms must be > 0 and <= stream.max_age_ms".into());
        }
        if self.max_message_bytes as i64 >= self.stream.max_message_size as i64 {
            return bad(format!(
                "max_message_bytes ({}) must be below stream.max_message_size ({}) so oversized \
                 input is dead-lettered, not refused at publish",
                self.max_message_bytes, self.stream.max_message_size
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

    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.consumer.ack_wait_ms)
    }

    /// The delay before the next delivery after `delivered` failed attempts.
    pub fn retry_delay(&self, delivered: i64) -> Duration {
        let b = &self.consumer.retry_backoff_ms;
        let i = (delivered.max(1) as usize - 1).min(b.len() - 1);
        Duration::from_millis(b[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["orders", "payments"];

    fn valid() -> NodeConfig {
        NodeConfig {
            contexts: vec!["orders".into()],
            ..NodeConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        valid().validate(KNOWN).unwrap();
    }

    #[test]
    fn rejects_what_would_misbehave() {
        let mut c = valid();
        c.contexts = vec!["shop".into()];
        assert!(c
            .validate(KNOWN)
            .unwrap_err()
            .to_string()
            .contains("unknown context"));
        let mut c = valid();
        c.consumer.ack_wait_ms = 1_000;
        assert!(c.validate(KNOWN).unwrap_err().to_string().contains("3x"));
        let mut c = valid();
        c.max_message_bytes = 2 << 20;
        assert!(c.validate(KNOWN).is_err());
        let mut c = valid();
        c.metrics_addr = "nowhere".into();
        assert!(c.validate(KNOWN).is_err());
    }

    #[test]
    fn toml_overrides_and_unknown_keys() {
        let c: NodeConfig =
            toml::from_str("contexts=['orders']\n[consumer]\nmax_deliver=5\n").unwrap();
        assert_eq!(c.consumer.max_deliver, 5);
        assert_eq!(c.consumer.ack_wait_ms, 30_000);
        assert!(toml::from_str::<NodeConfig>("bogus = 1").is_err());
    }

    #[test]
    fn retry_delay_walks_the_backoff_list() {
        let c = valid();
        assert_eq!(c.retry_delay(1), Duration::from_millis(100));
        assert_eq!(c.retry_delay(2), Duration::from_millis(500));
        assert_eq!(c.retry_delay(99), Duration::from_millis(10_000));
    }
}
