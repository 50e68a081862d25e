//! Fault injection at named points of the message path, for chaos tests.
//!
//! Compiled only with the cargo feature `faults` (as sled gates its failpoints), and off
//! unless `[faults] enabled = true` in the node config. Each point in the code is one
//! [`fault!`](crate::fault) macro: it fires the matching rule and carries out the action
//! table below once ([`Fired::carry_out`]: crash, panic and delay are done there; error and
//! drop are handed to the point, which says what they mean for it). Without the feature the
//! macro expands to nothing. Rules come from the config and,
//! at run time, from the admin subject `choreo.admin.<context>.faults` (`choreo chaos
//! inject|clear|list`); a node whose config leaves faults off refuses them. Every fault
//! fired is counted in `choreo_faults_injected_total{point,action}`.
//!
//! ```toml
//! [faults]
//! enabled = true
//! seed = 7                   # random choices (probability) are repeatable per seed
//! [[faults.rules]]
//! point = "handler"          # handler | after_commit | outbox_publish | external_call | deadline_fire | store_flush
//! action = "crash"           # crash | error | delay | drop | panic
//! context = "orders"         # optional: only this hosted context
//! msg_type = "PlaceOrder"    # optional: only this message type
//! times = 1                  # optional: at most this many times
//! probability = 1.0          # chance per matching message
//! delay = "0s"               # for `delay`
//! duration = "10s"           # optional: the rule expires this long after it is installed
//! ```
//!
//! What each action does at each point:
//!
//! | point | crash | error | delay | drop | panic |
//! |---|---|---|---|---|---|
//! | handler (before inbox check and handler) | abort | transient failure, retried | sleep | no ack, no nak: redelivered after `ack_wait` | panic in handler code |
//! | after_commit (durable, before ack and outbox hand-over) | abort | transient failure (redelivery is a duplicate) | sleep | outbox handed over, ack skipped | panic |
//! | outbox_publish (per entry) | abort | publish fails, retried with back-off | sleep | published, ack lost: published again (server drops the duplicate) | refused |
//! | external_call | abort | call fails | sleep | call made, reply lost (a timeout) | panic |
//! | deadline_fire | abort | firing fails, retried | sleep | firing skipped, retried | refused |
//! | store_flush (flusher thread, before a flush) | abort | the flush fails (as on a full disk) | sleep: a stalled disk | refused | refused |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::telemetry::metrics;

pub mod admin;

/// Where in the path of one message a fault can fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultPoint {
    /// After decoding, before the inbox check and the handler.
    Handler,
    /// After the transaction is durable, before the ack and the outbox hand-over.
    AfterCommit,
    /// Before the outbox relay publishes one entry.
    OutboxPublish,
    /// Before a handler's request to an external system (gateway, carrier).
    ExternalCall,
    /// Before a due saga deadline is fired.
    DeadlineFire,
    /// On the flusher thread, before a store flush (no message: rules with a message type
    /// or payload never match here).
    StoreFlush,
}

impl FaultPoint {
    /// Every point, in the order of the path of one message.
    pub const ALL: [FaultPoint; 6] = [
        FaultPoint::Handler,
        FaultPoint::AfterCommit,
        FaultPoint::OutboxPublish,
        FaultPoint::ExternalCall,
        FaultPoint::DeadlineFire,
        FaultPoint::StoreFlush,
    ];

    /// The point's name in rules and in the `point` label of metrics, e.g. `after_commit`.
    pub fn label(self) -> &'static str {
        match self {
            FaultPoint::Handler => "handler",
            FaultPoint::AfterCommit => "after_commit",
            FaultPoint::OutboxPublish => "outbox_publish",
            FaultPoint::ExternalCall => "external_call",
            FaultPoint::DeadlineFire => "deadline_fire",
            FaultPoint::StoreFlush => "store_flush",
        }
    }
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// Abort the process at once, like `kill -9`.
    Crash,
    /// A transient error.
    Error,
    /// Sleep `delay`, then go on.
    Delay,
    /// Lose something on the way (see the table in the module docs).
    Drop,
    /// Panic in handler code (caught by the runtime).
    Panic,
}

impl FaultAction {
    /// Every action.
    pub const ALL: [FaultAction; 5] = [
        FaultAction::Crash,
        FaultAction::Error,
        FaultAction::Delay,
        FaultAction::Drop,
        FaultAction::Panic,
    ];

    /// The action's name in rules and in the `action` label of metrics, e.g. `crash`.
    pub fn label(self) -> &'static str {
        match self {
            FaultAction::Crash => "crash",
            FaultAction::Error => "error",
            FaultAction::Delay => "delay",
            FaultAction::Drop => "drop",
            FaultAction::Panic => "panic",
        }
    }
}

/// One fault rule: at which point, doing what, to which messages, how often. A
/// `[[faults.rules]]` entry of the config, or a rule injected at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// Where it fires.
    pub point: FaultPoint,
    /// What it does there.
    pub action: FaultAction,
    /// Only messages of this hosted context (runtime injections set it to their target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Only messages of this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_type: Option<String>,
    /// At most this many firings; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    /// Optional: only messages whose payload contains this text (one specific message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_contains: Option<String>,
    /// The chance, 0.0 to 1.0, that it fires for a matching message (1.0 by default); the
    /// draws repeat for the same seed.
    #[serde(default = "one")]
    pub probability: f64,
    /// How long a `delay` action sleeps (needed by it, ignored by the others).
    #[serde(default, with = "crate::duration")]
    pub delay: Duration,
    /// The rule expires this long after it is installed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::option"
    )]
    pub duration: Option<Duration>,
}

fn one() -> f64 {
    1.0
}

impl FaultRule {
    /// Rejects rules that cannot do what they say.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.probability) {
            return Err(format!(
                "probability must be within 0.0..=1.0, not {}",
                self.probability
            ));
        }
        if self.action == FaultAction::Delay && self.delay.is_zero() {
            return Err("a delay needs a delay (e.g. delay = \"500ms\")".into());
        }
        if self.action == FaultAction::Panic
            && matches!(
                self.point,
                FaultPoint::OutboxPublish | FaultPoint::DeadlineFire | FaultPoint::StoreFlush
            )
        {
            return Err(format!(
                "panic is a handler fault; at {} use crash or error",
                self.point.label()
            ));
        }
        if self.point == FaultPoint::StoreFlush {
            if self.action == FaultAction::Drop {
                return Err(
                    "drop at store_flush would ack what is not durable; use crash, error or delay"
                        .into(),
                );
            }
            if self.msg_type.is_some() || self.payload_contains.is_some() {
                return Err(
                    "store_flush concerns no one message: leave out the type and payload".into(),
                );
            }
        }
        Ok(())
    }
}

/// The `[faults]` section of a node's config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Whether the node injects faults at all; off, it refuses rules sent at run time too.
    pub enabled: bool,
    /// The seed of the random choices of `probability`, so that a run can be repeated.
    pub seed: u64,
    /// Rules installed at start.
    pub rules: Vec<FaultRule>,
}

/// Why a runtime request to the injector was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultsError {
    /// The node's config leaves fault injection off.
    #[error("fault injection is off in this node's config (set [faults] enabled = true)")]
    Disabled,
    /// The rule is refused: it cannot do what it says ([`FaultRule::validate`]), or it
    /// names another context than the one it was sent to.
    #[error("invalid fault rule: {0}")]
    Invalid(String),
}

struct Installed {
    id: u64,
    rule: FaultRule,
    fired: u64,
    until: Option<Instant>,
}

struct Inner {
    rules: Vec<Installed>,
    rng: fastrand::Rng,
    next_id: u64,
}

/// The node's fault injector. The hot path costs one atomic load while no rule is installed.
pub struct Faults {
    enabled: bool,
    any: AtomicBool,
    inner: Mutex<Inner>,
}

impl Faults {
    /// The injector of `cfg`, with its rules installed if it is enabled.
    pub(crate) fn new(cfg: &FaultConfig) -> Self {
        let faults = Faults {
            enabled: cfg.enabled,
            any: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                rules: Vec::new(),
                rng: fastrand::Rng::with_seed(cfg.seed),
                next_id: 1,
            }),
        };
        if cfg.enabled {
            for r in &cfg.rules {
                // Config rules were validated with the config.
                let _ = faults.install(r.clone(), None);
            }
        }
        faults
    }

    /// Whether the node's config enables fault injection.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs a rule (reseeding the random choices if `seed` is given); returns its id.
    pub fn install(&self, rule: FaultRule, seed: Option<u64>) -> Result<u64, FaultsError> {
        if !self.enabled {
            return Err(FaultsError::Disabled);
        }
        rule.validate().map_err(FaultsError::Invalid)?;
        let mut inner = self.lock();
        if let Some(s) = seed {
            inner.rng = fastrand::Rng::with_seed(s);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let until = rule.duration.map(|d| Instant::now() + d);
        tracing::warn!(id, ?rule, "fault rule installed");
        inner.rules.push(Installed {
            id,
            rule,
            fired: 0,
            until,
        });
        self.any.store(true, Ordering::SeqCst);
        Ok(id)
    }

    /// Removes the rules of `context` (every rule if `None`); returns how many.
    pub fn clear(&self, context: Option<&str>) -> usize {
        let mut inner = self.lock();
        let before = inner.rules.len();
        inner.rules.retain(|r| {
            context.is_some_and(|c| r.rule.context.as_deref().is_some_and(|rc| rc != c))
        });
        self.any.store(!inner.rules.is_empty(), Ordering::SeqCst);
        before - inner.rules.len()
    }

    /// Installed rules with how often each fired and how long each has left.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        self.lock()
            .rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id,
                    "rule": r.rule,
                    "fired": r.fired,
                    "remaining_ms": r.until.map(|u| u.saturating_duration_since(now).as_millis() as u64),
                })
            })
            .collect()
    }

    /// True while any rule is installed (a cheap check before preparing a [`Faults::fire`]).
    pub fn armed(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// The fault to apply at `point` for a message of `msg_type` in `context`, if a rule
    /// fires.
    pub fn fire(
        &self,
        point: FaultPoint,
        context: &str,
        msg_type: &str,
        payload: &[u8],
    ) -> Option<FaultRule> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        inner.rules.retain(|r| r.until.is_none_or(|u| u > now));
        self.any.store(!inner.rules.is_empty(), Ordering::SeqCst);
        let Inner { rules, rng, .. } = &mut *inner;
        for r in rules.iter_mut() {
            let rule = &r.rule;
            if rule.point != point
                || rule.context.as_deref().is_some_and(|c| c != context)
                || rule.msg_type.as_deref().is_some_and(|t| t != msg_type)
                || rule.times.is_some_and(|t| r.fired >= t)
            {
                continue;
            }
            if let Some(needle) = &rule.payload_contains {
                if !String::from_utf8_lossy(payload).contains(needle.as_str()) {
                    continue;
                }
            }
            if rule.probability < 1.0 && rng.f64() >= rule.probability {
                continue;
            }
            r.fired += 1;
            metrics::FAULTS_INJECTED
                .with_label_values(&[point.label(), rule.action.label()])
                .inc();
            tracing::warn!(
                point = point.label(),
                action = rule.action.label(),
                context,
                msg_type,
                "injecting fault"
            );
            return Some(rule.clone());
        }
        None
    }
}

/// What an injected fault leaves for its point to act on; crash, panic and delay are carried
/// out by [`Fired::carry_out`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// A transient error at this point.
    Error,
    /// Lose what this point was doing (see the table in the module docs).
    Drop,
}

/// A rule that fired at a point.
pub struct Fired {
    /// Where it fired.
    pub(crate) point: FaultPoint,
    /// The rule that fired.
    pub(crate) rule: FaultRule,
}

/// What is left to do after [`Fired::carry_out`].
pub enum Then {
    /// Sleep this long (async or blocking, as the point runs), then go on.
    Sleep(Duration),
    /// Hand this to the point.
    Inject(Injected),
}

impl Fired {
    /// The action table, once: a crash aborts the process, a panic panics (caught around
    /// handler code), a delay is returned to sleep, error and drop are returned to the point.
    pub fn carry_out(self, what: &str) -> Then {
        match self.rule.action {
            FaultAction::Crash => crash(self.point, what),
            FaultAction::Panic => panic!("injected fault at {} for {what}", self.point.label()),
            FaultAction::Delay => Then::Sleep(self.rule.delay),
            FaultAction::Error => Then::Inject(Injected::Error),
            FaultAction::Drop => Then::Inject(Injected::Drop),
        }
    }
}

impl Faults {
    /// Fires `point` for a message of `msg_type` in `context`, if a rule matches (see
    /// [`Faults::fire`]).
    pub fn fired(
        &self,
        point: FaultPoint,
        context: &str,
        msg_type: &str,
        payload: &[u8],
    ) -> Option<Fired> {
        let rule = self.fire(point, context, msg_type, payload)?;
        Some(Fired { point, rule })
    }
}

/// Carries out a fired rule on the async runtime (a delay sleeps there); what is left for
/// the point, if anything.
pub async fn run_async(fired: Fired, what: &str) -> Option<Injected> {
    match fired.carry_out(what) {
        Then::Sleep(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Then::Inject(i) => Some(i),
    }
}

/// Carries out a fired rule on a thread of its own (a delay blocks it: a stalled disk).
pub fn run_blocking(fired: Fired, what: &str) -> Option<Injected> {
    match fired.carry_out(what) {
        Then::Sleep(d) => {
            std::thread::sleep(d);
            None
        }
        Then::Inject(i) => Some(i),
    }
}

/// An injected crash: abort at once, like `kill -9` (no destructors, no flush).
pub fn crash(point: FaultPoint, what: &str) -> ! {
    tracing::error!(
        point = point.label(),
        what,
        "injected crash: aborting the process"
    );
    std::process::abort();
}

#[cfg(test)]
mod tests {
    use super::admin::answer;
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
            .fire(FaultPoint::Handler, "c", "A", b"")
            .is_none());
        let f = Faults::new(&cfg(true));
        assert!(f.fire(FaultPoint::Handler, "c", "B", b"").is_none());
        assert!(f.fire(FaultPoint::AfterCommit, "c", "A", b"").is_none());
        assert!(f.fire(FaultPoint::Handler, "c", "A", b"").is_some());
        assert!(f.fire(FaultPoint::Handler, "c", "A", b"").is_some());
        assert!(f.fire(FaultPoint::Handler, "c", "A", b"").is_none());
    }

    #[test]
    fn admin_requests_install_scope_expire_and_clear() {
        let off = Faults::new(&FaultConfig::default());
        let req = br#"{"op":"inject","rule":{"point":"outbox_publish","action":"error"}}"#;
        assert!(answer(&off, "orders", req)["error"]
            .as_str()
            .unwrap()
            .contains("off in this node's config"));

        let f = Faults::new(&FaultConfig {
            enabled: true,
            ..Default::default()
        });
        assert!(answer(&f, "orders", req)["ok"]["installed"].is_u64());
        // Scoped to the context it was sent to.
        assert!(f
            .fire(FaultPoint::OutboxPublish, "payments", "X", b"")
            .is_none());
        assert!(f
            .fire(FaultPoint::OutboxPublish, "orders", "X", b"")
            .is_some());
        assert_eq!(
            answer(&f, "orders", br#"{"op":"list"}"#)["ok"]["rules"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            answer(&f, "payments", br#"{"op":"clear"}"#)["ok"]["cleared"],
            0
        );
        assert_eq!(
            answer(&f, "orders", br#"{"op":"clear"}"#)["ok"]["cleared"],
            1
        );
        assert!(f
            .fire(FaultPoint::OutboxPublish, "orders", "X", b"")
            .is_none());

        let short =
            br#"{"op":"inject","rule":{"point":"handler","action":"drop","duration":"1ms"}}"#;
        assert!(answer(&f, "orders", short)["ok"].is_object());
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            f.fire(FaultPoint::Handler, "orders", "X", b"").is_none(),
            "expired"
        );

        for bad in [
            &br#"{"op":"inject","rule":{"point":"handler","action":"error","probability":2}}"#[..],
            br#"{"op":"inject","rule":{"point":"handler","action":"delay"}}"#,
            br#"{"op":"inject","rule":{"point":"deadline_fire","action":"panic"}}"#,
            br#"{"op":"inject","rule":{"point":"store_flush","action":"drop"}}"#,
            br#"{"op":"inject","rule":{"point":"store_flush","action":"error","msg_type":"A"}}"#,
            br#"{"op":"inject","rule":{"point":"nowhere","action":"crash"}}"#,
            b"not json",
        ] {
            assert!(
                answer(&f, "orders", bad)["error"].is_string(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_same_seed_makes_the_same_choices() {
        let run = |seed| {
            let f = Faults::new(&FaultConfig {
                enabled: true,
                seed,
                rules: vec![FaultRule {
                    point: FaultPoint::Handler,
                    action: FaultAction::Error,
                    context: None,
                    msg_type: None,
                    times: None,
                    payload_contains: None,
                    probability: 0.3,
                    delay: Duration::ZERO,
                    duration: None,
                }],
            });
            (0..64)
                .map(|_| f.fire(FaultPoint::Handler, "c", "A", b"").is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
