//! The retry layer: immediate retries inside one delivery ([`at_once`]), then naks with an
//! exponential, jittered delay ([`RetryPolicy::delay`], [`RetryPolicy::jittered`]) until the
//! budget of failed deliveries is spent.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a handler's transient failures are retried. Defaults in the spirit of NServiceBus
/// recoverability: a few immediate retries, then delayed retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries inside the same delivery, without delay, before the message is naked.
    pub immediate: u32,
    /// First delayed retry.
    #[serde(with = "crate::duration")]
    pub base: Duration,
    /// Longest delay between deliveries.
    #[serde(with = "crate::duration")]
    pub max: Duration,
    /// Growth factor of the delay.
    pub factor: f32,
    /// Add a random part of up to one delay (spreads retries of many messages).
    pub jitter: bool,
    /// Failed deliveries before the message is dead-lettered.
    pub budget: u32,
    /// Longest handling of one message before it counts as a transient failure.
    #[serde(with = "crate::duration")]
    pub handler_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            immediate: 2,
            base: Duration::from_millis(200),
            max: Duration::from_secs(10),
            factor: 2.0,
            jitter: true,
            budget: 10,
            handler_timeout: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// Problems that would make the policy misbehave.
    pub fn problems(&self) -> Option<String> {
        if self.budget == 0 {
            return Some("budget must be at least 1".into());
        }
        if self.base.is_zero() || self.max < self.base {
            return Some("need 0 < base <= max".into());
        }
        if !(1.0..=10.0).contains(&self.factor) {
            return Some("factor must be within 1.0..=10.0".into());
        }
        if self.handler_timeout.is_zero() {
            return Some("handler_timeout must be positive".into());
        }
        None
    }

    /// Delay before the next delivery after `failures` failed deliveries (1 = the first),
    /// without jitter: `base * factor^(failures - 1)`, at most `max`.
    pub fn delay(&self, failures: u32) -> Duration {
        let n = failures.max(1) - 1;
        let ms = self.base.as_millis() as f64 * f64::from(self.factor).powi(n.min(64) as i32);
        Duration::from_millis(ms.min(self.max.as_millis() as f64) as u64)
    }

    /// `delay` with its jitter: up to one delay more, the share `draw` (in `[0, 1)`) of it.
    pub fn jittered(&self, delay: Duration, draw: f64) -> Duration {
        if self.jitter {
            delay + delay.mul_f64(draw.clamp(0.0, 1.0))
        } else {
            delay
        }
    }

    /// True when `failures` failed deliveries exhaust the budget.
    pub fn exhausted(&self, failures: u32) -> bool {
        failures >= self.budget
    }
}

/// Runs `attempt` and again, at once, up to `times` more times while `transient` says its
/// result may succeed on another try; returns the last result.
pub async fn at_once<T, F, Fut>(times: u32, transient: impl Fn(&T) -> bool, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let mut tries = 0;
    loop {
        let result = attempt().await;
        if tries == times || !transient(&result) {
            return result;
        }
        tries += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap() {
        let p = RetryPolicy {
            jitter: false,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let d: Vec<u64> = (1..=6).map(|n| p.delay(n).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn jitter_stays_within_one_delay() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        for n in 1..=5 {
            let plain = p.delay(n);
            for draw in [0.0, 0.3, 0.999] {
                let j = p.jittered(plain, draw);
                assert!(j >= plain && j < plain * 2, "{n}: {j:?} vs {plain:?}");
            }
        }
        let off = RetryPolicy { jitter: false, ..p };
        assert_eq!(off.jittered(off.delay(2), 0.9), off.delay(2));
    }

    #[tokio::test]
    async fn immediate_retries_stop_at_success_or_the_limit() {
        let mut calls = 0;
        let r = at_once(
            2,
            |r: &Result<(), ()>| r.is_err(),
            || {
                calls += 1;
                async { Err::<(), ()>(()) }
            },
        )
        .await;
        assert_eq!((r, calls), (Err(()), 3));
        let mut calls = 0;
        let r = at_once(
            5,
            |r: &Result<u32, ()>| r.is_err(),
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 2 {
                        Err(())
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!((r, calls), (Ok(2), 2));
    }

    #[test]
    fn budget_and_validation() {
        let p = RetryPolicy {
            budget: 3,
            ..RetryPolicy::default()
        };
        assert!(!p.exhausted(2) && p.exhausted(3));
        assert!(RetryPolicy {
            budget: 0,
            ..RetryPolicy::default()
        }
        .problems()
        .is_some());
        assert!(RetryPolicy {
            max: Duration::from_millis(1),
            ..RetryPolicy::default()
        }
        .problems()
        .is_some());
        assert!(RetryPolicy::default().problems().is_none());
    }
}
