//! Fault injection at named points of the message path, for chaos tests. Off unless
//! `[faults] enabled = true` in the node config; every fault fired is counted in
//! `choreo_faults_injected_total`.
//!
//! ```toml
//! [faults]
//! enabled = true
//! seed = 7
//! [[faults.rules]]
//! point = "handler"          # handler | after_commit
//! action = "panic"           # panic | error | delay | crash
//! msg_type = "AddStock"      # optional: only this message type
//! times = 2                  # optional: at most this many times
//! probability = 1.0          # chance per matching message
//! delay_ms = 0               # for `delay`
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::metrics;

/// Where in the path of one message a fault can fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultPoint {
    /// After decoding, before the inbox check and the handler.
    Handler,
    /// After the transaction is durable, before the ack and the outbox hand-over.
    AfterCommit,
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// Panic in handler code (caught by the runtime).
    Panic,
    /// A transient error (the message is naked and retried).
    Error,
    /// Sleep `delay_ms`.
    Delay,
    /// Abort the process at once, like `kill -9`.
    Crash,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub point: FaultPoint,
    pub action: FaultAction,
    #[serde(default)]
    pub msg_type: Option<String>,
    #[serde(default)]
    pub times: Option<u64>,
    /// Optional: only messages whose payload contains this text (one specific message).
    #[serde(default)]
    pub payload_contains: Option<String>,
    #[serde(default = "one")]
    pub probability: f64,
    #[serde(default)]
    pub delay_ms: u64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    pub enabled: bool,
    pub seed: u64,
    pub rules: Vec<FaultRule>,
}

/// The node's fault injector.
pub struct Faults {
    rules: Vec<(FaultRule, AtomicU64)>,
    rng: Mutex<fastrand::Rng>,
}

impl Faults {
    pub fn new(cfg: &FaultConfig) -> Self {
        let rules = if cfg.enabled {
            cfg.rules
                .iter()
                .map(|r| (r.clone(), AtomicU64::new(0)))
                .collect()
        } else {
            vec![]
        };
        Faults {
            rules,
            rng: Mutex::new(fastrand::Rng::with_seed(cfg.seed)),
        }
    }

    /// The fault to apply at `point` for a message of `msg_type`, if any rule fires.
    pub fn fire(&self, point: FaultPoint, msg_type: &str, payload: &[u8]) -> Option<&FaultRule> {
        for (rule, fired) in &self.rules {
            if rule.point != point || rule.msg_type.as_deref().is_some_and(|t| t != msg_type) {
                continue;
            }
            if let Some(needle) = &rule.payload_contains {
                if !String::from_utf8_lossy(payload).contains(needle.as_str()) {
                    continue;
                }
            }
            if rule.probability < 1.0
                && self.rng.lock().expect("fault rng").f64() >= rule.probability
            {
                continue;
            }
            let n = fired.fetch_add(1, Ordering::SeqCst);
            if rule.times.is_some_and(|t| n >= t) {
                continue;
            }
            metrics::FAULTS_INJECTED
                .with_label_values(&[point_label(point), action_label(rule.action)])
                .inc();
            tracing::warn!(?point, action = ?rule.action, msg_type, "injecting fault");
            return Some(rule);
        }
        None
    }
}

fn point_label(p: FaultPoint) -> &'static str {
    match p {
        FaultPoint::Handler => "handler",
        FaultPoint::AfterCommit => "after_commit",
    }
}

fn action_label(a: FaultAction) -> &'static str {
    match a {
        FaultAction::Panic => "panic",
        FaultAction::Error => "error",
        FaultAction::Delay => "delay",
        FaultAction::Crash => "crash",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(enabled: bool) -> FaultConfig {
        toml::from_str::<FaultConfig>(&format!(
            "enabled = {enabled}\n[[rules]]\npoint = \"handler\"\naction = \"error\"\nmsg_type = \"A\"\ntimes = 2\n"
        ))
        .unwrap()
    }

    #[test]
    fn fires_only_when_enabled_matching_and_within_times() {
        assert!(Faults::new(&cfg(false))
            .fire(FaultPoint::Handler, "A", b"")
            .is_none());
        let f = Faults::new(&cfg(true));
        assert!(f.fire(FaultPoint::Handler, "B", b"").is_none());
        assert!(f.fire(FaultPoint::AfterCommit, "A", b"").is_none());
        assert!(f.fire(FaultPoint::Handler, "A", b"").is_some());
        assert!(f.fire(FaultPoint::Handler, "A", b"").is_some());
        assert!(f.fire(FaultPoint::Handler, "A", b"").is_none());
    }
}
