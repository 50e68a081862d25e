//! Circuit breaker around an external system: closed / open / half-open from a failure-rate
//! window, with probes. Time comes in as data (`now_ms`), so it is tested without sleeping.
//!
//! - Closed: calls pass; outcomes fill a window of the last `window` calls. Once at least
//!   `min_calls` are in it and the failure rate reaches `failure_rate`, the breaker opens.
//! - Open: calls are refused with [`BreakerOpen`] and the time left, for `open`.
//! - Half-open: up to `half_open_probes` calls pass as probes; a successful probe closes the
//!   breaker, a failed one opens it again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::telemetry::metrics;

/// The settings of every circuit breaker of a node (`[breaker]` in its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Recent calls considered.
    pub window: usize,
    /// Calls needed in the window before the breaker may open.
    pub min_calls: usize,
    /// Failure rate (0.0 to 1.0) that opens the breaker.
    pub failure_rate: f64,
    /// How long the breaker stays open before letting probes through.
    #[serde(with = "crate::duration")]
    pub open: Duration,
    /// Calls let through at once while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            min_calls: 5,
            failure_rate: 0.5,
            open: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

impl BreakerConfig {
    /// What makes these settings unusable, if anything.
    pub fn problems(&self) -> Option<String> {
        if self.window == 0 || self.min_calls == 0 || self.min_calls > self.window {
            return Some("need 0 < min_calls <= window".into());
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Some("failure_rate must be within (0, 1]".into());
        }
        if self.open.is_zero() || self.half_open_probes == 0 {
            return Some("open and half_open_probes must be positive".into());
        }
        None
    }
}

/// The breaker refused the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker for {system} is open; retry in {retry_after:?}")]
pub struct BreakerOpen {
    /// The external system the breaker is for.
    pub system: String,
    /// How long until the breaker lets a probe through.
    pub retry_after: Duration,
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls pass; their outcomes are counted.
    Closed,
    /// Calls are refused.
    Open {
        /// When probes may start, in ms (the clock the breaker is given).
        until_ms: u64,
    },
    /// Probes pass, up to `half_open_probes` at once; the first outcome decides.
    HalfOpen,
}

/// Permission to make one call; hand it back with the outcome.
#[derive(Debug)]
#[must_use = "record the outcome of the call"]
pub struct Permit {
    probe: bool,
}

struct Inner {
    state: State,
    outcomes: VecDeque<bool>,
    probes: u32,
}

/// The circuit breaker of one external system (see the module docs).
pub struct Breaker {
    system: String,
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker for `system`, its state metrics set.
    pub(crate) fn new(system: &str, cfg: BreakerConfig) -> Self {
        for state in metrics::BREAKER_STATES {
            metrics::BREAKER_STATE
                .with_label_values(&[system, state])
                .set(i64::from(state == "closed"));
            metrics::BREAKER_TRANSITIONS
                .with_label_values(&[system, state])
                .inc_by(0);
        }
        Breaker {
            system: system.to_string(),
            cfg,
            inner: Mutex::new(Inner {
                state: State::Closed,
                outcomes: VecDeque::new(),
                probes: 0,
            }),
        }
    }

    /// Its current state.
    pub fn state(&self) -> State {
        self.inner.lock().expect("breaker").state
    }

    /// Asks to make a call at `now_ms`.
    pub fn acquire(&self, now_ms: u64) -> Result<Permit, BreakerOpen> {
        let mut g = self.inner.lock().expect("breaker");
        match g.state {
            State::Closed => Ok(Permit { probe: false }),
            State::Open { until_ms } if now_ms < until_ms => Err(self.refuse(until_ms - now_ms)),
            State::Open { .. } => {
                self.set(&mut g, State::HalfOpen);
                g.probes = 1;
                Ok(Permit { probe: true })
            }
            State::HalfOpen if g.probes < self.cfg.half_open_probes => {
                g.probes += 1;
                Ok(Permit { probe: true })
            }
            State::HalfOpen => Err(self.refuse((self.cfg.open.as_millis() as u64).min(1_000))),
        }
    }

    /// Records the outcome of a permitted call.
    pub fn record(&self, permit: Permit, success: bool, now_ms: u64) {
        let mut g = self.inner.lock().expect("breaker");
        if permit.probe {
            g.probes = g.probes.saturating_sub(1);
            if g.state == State::HalfOpen {
                if success {
                    g.outcomes.clear();
                    self.set(&mut g, State::Closed);
                } else {
                    self.set(
                        &mut g,
                        State::Open {
                            until_ms: now_ms + (self.cfg.open.as_millis() as u64),
                        },
                    );
                }
            }
            return;
        }
        if g.state != State::Closed {
            return; // a call that started before the breaker opened
        }
        g.outcomes.push_back(success);
        while g.outcomes.len() > self.cfg.window {
            g.outcomes.pop_front();
        }
        let failures = g.outcomes.iter().filter(|ok| !**ok).count();
        if g.outcomes.len() >= self.cfg.min_calls
            && failures as f64 / g.outcomes.len() as f64 >= self.cfg.failure_rate
        {
            g.outcomes.clear();
            self.set(
                &mut g,
                State::Open {
                    until_ms: now_ms + (self.cfg.open.as_millis() as u64),
                },
            );
        }
    }

    fn refuse(&self, ms: u64) -> BreakerOpen {
        BreakerOpen {
            system: self.system.clone(),
            retry_after: Duration::from_millis(ms),
        }
    }

    fn set(&self, g: &mut Inner, to: State) {
        let label = match to {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half_open",
        };
        if std::mem::discriminant(&g.state) != std::mem::discriminant(&to) {
            tracing::warn!(system = %self.system, from = ?g.state, to = label, "circuit breaker state change");
            metrics::BREAKER_TRANSITIONS
                .with_label_values(&[&self.system, label])
                .inc();
        }
        for state in metrics::BREAKER_STATES {
            metrics::BREAKER_STATE
                .with_label_values(&[&self.system, state])
                .set(i64::from(state == label));
        }
        g.state = to;
    }
}

/// One breaker per external system, shared by every context of a node.
#[derive(Default)]
pub struct Breakers {
    cfg: BreakerConfig,
    map: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    /// No breaker yet; each is made with `cfg` on first use.
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Breakers {
            cfg,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The breaker of `system`, made closed on first use.
    pub(crate) fn get(&self, system: &str) -> Arc<Breaker> {
        let mut m = self.map.lock().expect("breakers");
        m.entry(system.to_string())
            .or_insert_with(|| Arc::new(Breaker::new(system, self.cfg.clone())))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            "gw-test",
            BreakerConfig {
                window: 4,
                min_calls: 4,
                failure_rate: 0.5,
                open: Duration::from_secs(1),
                half_open_probes: 1,
            },
        )
    }

    fn call(b: &Breaker, now: u64, ok: bool) -> Result<(), BreakerOpen> {
        let p = b.acquire(now)?;
        b.record(p, ok, now);
        Ok(())
    }

    #[test]
    fn opens_on_the_failure_rate_and_refuses_with_the_time_left() {
        let b = breaker();
        call(&b, 0, true).unwrap();
        call(&b, 1, false).unwrap();
        call(&b, 2, true).unwrap();
        assert_eq!(b.state(), State::Closed, "under min_calls");
        call(&b, 3, false).unwrap();
        assert_eq!(b.state(), State::Open { until_ms: 1_003 });
        let e = call(&b, 503, true).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(500));
    }

    #[test]
    fn half_open_probe_closes_or_reopens() {
        let b = breaker();
        for t in 0..4 {
            call(&b, t, false).unwrap();
        }
        // After open_ms: one probe passes, a second caller waits.
        let probe = b.acquire(1_003).unwrap();
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.acquire(1_004).is_err());
        b.record(probe, false, 1_010);
        assert_eq!(b.state(), State::Open { until_ms: 2_010 });
        let probe = b.acquire(2_010).unwrap();
        b.record(probe, true, 2_020);
        assert_eq!(b.state(), State::Closed);
        call(&b, 2_030, true).unwrap();
    }

    #[test]
    fn a_healthy_system_stays_closed() {
        let b = breaker();
        for t in 0..100 {
            call(&b, t, t % 4 != 0).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
    }
}
