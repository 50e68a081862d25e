//! Retry policy: immediate retries, then exponential jittered back-off, within a budget.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};

/// How a handler's transient failures are retried. Defaults in the spirit of NServiceBus
/// recoverability: a few immediate retries, then delayed retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Retries inside the same delivery, without delay, before the message is naked.
    pub immediate: u32,
    /// First delayed retry.
    pub base_ms: u64,
    /// Longest delay between deliveries.
    pub max_ms: u64,
    /// Growth factor of the delay.
    pub factor: f32,
    /// Add a random part of up to one delay (spreads retries of many messages).
    pub jitter: bool,
    /// Failed deliveries before the message is dead-lettered.
    pub budget: u32,
    /// Longest handling of one message before it counts as a transient failure.
    pub handler_timeout_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            immediate: 2,
            base_ms: 200,
            max_ms: 10_000,
            factor: 2.0,
            jitter: true,
            budget: 10,
            handler_timeout_ms: 15_000,
        }
    }
}

impl RetryPolicy {
    /// Problems that would make the policy misbehave.
    pub fn problems(&self) -> Option<String> {
        if self.budget == 0 {
            return Some("budget must be at least 1".into());
        }
        if self.base_ms == 0 || self.max_ms < self.base_ms {
            return Some("need 0 < base_ms <= max_ms".into());
        }
        if !(1.0..=10.0).contains(&self.factor) {
            return Some("factor must be within 1.0..=10.0".into());
        }
        if self.handler_timeout_ms == 0 {
            return Some("handler_timeout_ms must be positive".into());
        }
        None
    }

    /// Delay before the next delivery after `failures` failed deliveries (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let mut b = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(self.base_ms))
            .with_max_delay(Duration::from_millis(self.max_ms))
            .with_factor(self.factor)
            .without_max_times();
        if self.jitter {
            b = b.with_jitter();
        }
        let n = failures.max(1) as usize - 1;
        b.build()
            .nth(n)
            .unwrap_or(Duration::from_millis(self.max_ms))
    }

    /// True when `failures` failed deliveries exhaust the budget.
    pub fn exhausted(&self, failures: u32) -> bool {
        failures >= self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap() {
        let p = RetryPolicy {
            jitter: false,
            base_ms: 100,
            max_ms: 1_000,
            ..RetryPolicy::default()
        };
        let d: Vec<u64> = (1..=6).map(|n| p.delay(n).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn jitter_stays_within_one_delay() {
        let p = RetryPolicy {
            base_ms: 100,
            max_ms: 1_000,
            ..RetryPolicy::default()
        };
        for n in 1..=5 {
            let plain = RetryPolicy {
                jitter: false,
                ..p.clone()
            }
            .delay(n);
            let j = p.delay(n);
            assert!(j >= plain && j <= plain * 2, "{n}: {j:?} vs {plain:?}");
        }
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
            max_ms: 1,
            ..RetryPolicy::default()
        }
        .problems()
        .is_some());
        assert!(RetryPolicy::default().problems().is_none());
    }
}
