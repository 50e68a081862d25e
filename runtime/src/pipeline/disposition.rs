//! The fate of a message as a value: what an attempt came to ([`Outcome`]) and what is done
//! about it ([`Disposition`]), computed by a pure function of the outcome, the failures
//! counted so far and the retry policy. [`super::settle`] acts on it in one place, and
//! every message gets exactly one disposition.
//!
//! | outcome | counted | disposition |
//! |---|---|---|
//! | handled | no | ack |
//! | duplicate (the inbox had it, durable) | no | ack |
//! | transient (`Retry`, external failure or timeout, handler timeout, panic) | yes | nak with the policy's delay; dead letter once the budget is spent |
//! | permanent (`HandleError::Permanent`) | no | dead letter |
//! | poison (oversized, missing or bad header, unknown type, malformed) | no | dead letter |
//! | the external system's breaker is open | no | nak with the time left plus jitter |
//! | the store cannot be made durable | no | nak with the policy's first delay |
//! | dropped (an injected fault) | no | neither ack nor nak: redelivered after `ack_wait` |
//!
//! Immediate retries happen before an outcome is settled (the retry layer,
//! [`crate::resilience::retry`]); a transient outcome here is one they did not cure.

use std::time::Duration;

use crate::resilience::retry::RetryPolicy;

/// Why a message is dead-lettered (the `reason` label of `choreo_dead_letters_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqReason {
    /// The payload does not decode into the handler's input, or the envelope's type does
    /// not match the subject.
    Malformed,
    /// The consumer's component declares no message of this type.
    UnknownType,
    /// The envelope's headers are missing or unreadable.
    MissingHeader,
    /// Larger than `max_message_bytes`.
    Oversized,
    /// The handler said it can never succeed (`HandleError::Permanent`).
    Permanent,
    /// Transient failures spent the retry budget (`[retry] budget`).
    RetriesExhausted,
    /// The server stopped redelivering it (`max_deliver`): dead-lettered by the node's
    /// advisory watcher, not by a disposition.
    MaxDeliveries,
}

impl DlqReason {
    /// Every reason, for initialising the series.
    pub(crate) const ALL: [DlqReason; 7] = [
        DlqReason::Malformed,
        DlqReason::UnknownType,
        DlqReason::MissingHeader,
        DlqReason::Oversized,
        DlqReason::Permanent,
        DlqReason::RetriesExhausted,
        DlqReason::MaxDeliveries,
    ];

    /// The `reason` label of `choreo_dead_letters_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            DlqReason::Malformed => "malformed",
            DlqReason::UnknownType => "unknown_type",
            DlqReason::MissingHeader => "missing_header",
            DlqReason::Oversized => "oversized",
            DlqReason::Permanent => "permanent",
            DlqReason::RetriesExhausted => "retries_exhausted",
            DlqReason::MaxDeliveries => "max_deliveries",
        }
    }
}

/// What one attempt at a message came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Its transaction is durable.
    Handled,
    /// The inbox already held it, and that is durable.
    Duplicate,
    /// It may succeed later.
    Transient(String),
    /// It can never succeed (the handler said so).
    Permanent(String),
    /// It can never be handled: bad input.
    Poison(DlqReason, String),
    /// The external system's breaker is open for this long still.
    BreakerOpen(Duration),
    /// The store cannot be made durable now: not the message's fault.
    StoreUnavailable(String),
    /// An injected fault lost it on the way: leave it to the server's redelivery.
    Dropped,
}

impl Outcome {
    /// Whether this outcome spends the message's retry budget.
    pub fn counted(&self) -> bool {
        matches!(self, Outcome::Transient(_))
    }
}

/// What is done about a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Acknowledge: handled (`duplicate: false`) or already handled.
    Ack {
        /// The inbox already held it: a duplicate.
        duplicate: bool,
    },
    /// Negative acknowledgement: delivered again after `delay`. `counted`: a failure of the
    /// message (retried), not of something it waits for (delayed).
    Nak {
        /// How long the server waits before delivering it again.
        delay: Duration,
        /// Whether it spends the message's retry budget.
        counted: bool,
    },
    /// Publish to the dead-letter stream with the reason, then terminate.
    DeadLetter {
        /// Why (the `reason` label).
        reason: DlqReason,
        /// What went wrong, recorded with the dead letter.
        detail: String,
    },
    /// Neither ack nor nak: the server redelivers after `ack_wait`.
    Leave,
}

impl Disposition {
    /// The disposition of `outcome`, after `failures` counted failures of the message (this
    /// one included, for a counted outcome), under `policy`; `draw` in `[0, 1)` picks the
    /// jitter.
    pub fn of(outcome: Outcome, failures: u32, policy: &RetryPolicy, draw: f64) -> Disposition {
        match outcome {
            Outcome::Handled => Disposition::Ack { duplicate: false },
            Outcome::Duplicate => Disposition::Ack { duplicate: true },
            Outcome::Transient(why) if policy.exhausted(failures) => Disposition::DeadLetter {
                reason: DlqReason::RetriesExhausted,
                detail: format!("retries exhausted after {failures} failed deliveries: {why}"),
            },
            Outcome::Transient(_) => Disposition::Nak {
                delay: policy.jittered(policy.delay(failures), draw),
                counted: true,
            },
            Outcome::Permanent(why) => Disposition::DeadLetter {
                reason: DlqReason::Permanent,
                detail: why,
            },
            Outcome::Poison(reason, detail) => Disposition::DeadLetter { reason, detail },
            // Spread the wake-ups so the backlog drains gradually once it closes.
            Outcome::BreakerOpen(after) => {
                let spread = after / 2 + Duration::from_millis(100);
                Disposition::Nak {
                    delay: after + spread.mul_f64(draw.clamp(0.0, 1.0)),
                    counted: false,
                }
            }
            Outcome::StoreUnavailable(_) => Disposition::Nak {
                delay: policy.jittered(policy.delay(1), draw),
                counted: false,
            },
            Outcome::Dropped => Disposition::Leave,
        }
    }

    /// The `outcome` label of `choreo_messages_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Disposition::Ack { duplicate: false } => "acked",
            Disposition::Ack { duplicate: true } => "duplicate",
            Disposition::Nak { counted: true, .. } => "retried",
            Disposition::Nak { counted: false, .. } => "delayed",
            Disposition::DeadLetter { .. } => "dead_lettered",
            Disposition::Leave => "dropped",
        }
    }

    /// Every `outcome` label, for initialising the series.
    pub const LABELS: [&'static str; 6] = [
        "acked",
        "duplicate",
        "retried",
        "delayed",
        "dead_lettered",
        "dropped",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            immediate: 2,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            factor: 2.0,
            jitter: false,
            budget: 3,
            handler_timeout: Duration::from_secs(5),
        }
    }

    fn of(outcome: Outcome, failures: u32) -> Disposition {
        Disposition::of(outcome, failures, &policy(), 0.5)
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn handled_and_duplicates_are_acked() {
        assert_eq!(
            of(Outcome::Handled, 0),
            Disposition::Ack { duplicate: false }
        );
        assert_eq!(
            of(Outcome::Duplicate, 0),
            Disposition::Ack { duplicate: true }
        );
    }

    #[test]
    fn transient_failures_back_off_then_dead_letter_at_the_budget() {
        assert!(Outcome::Transient("x".into()).counted());
        let nak = |failures| of(Outcome::Transient("gateway down".into()), failures);
        assert_eq!(
            nak(1),
            Disposition::Nak {
                delay: MS(100),
                counted: true
            }
        );
        assert_eq!(
            nak(2),
            Disposition::Nak {
                delay: MS(200),
                counted: true
            }
        );
        assert_eq!(
            nak(3),
            Disposition::DeadLetter {
                reason: DlqReason::RetriesExhausted,
                detail: "retries exhausted after 3 failed deliveries: gateway down".into(),
            }
        );
        // With jitter, the delay grows by the draw's share of itself.
        let jittered = RetryPolicy {
            jitter: true,
            ..policy()
        };
        let d = Disposition::of(Outcome::Transient("x".into()), 2, &jittered, 0.5);
        assert_eq!(
            d,
            Disposition::Nak {
                delay: MS(300),
                counted: true
            }
        );
    }

    #[test]
    fn permanent_failures_and_poison_are_dead_lettered_uncounted() {
        assert!(!Outcome::Permanent("no".into()).counted());
        assert_eq!(
            of(Outcome::Permanent("no such sku".into()), 0),
            Disposition::DeadLetter {
                reason: DlqReason::Permanent,
                detail: "no such sku".into()
            }
        );
        for reason in [
            DlqReason::Malformed,
            DlqReason::UnknownType,
            DlqReason::MissingHeader,
            DlqReason::Oversized,
        ] {
            let poison = Outcome::Poison(reason, "bad".into());
            assert!(!poison.counted());
            assert_eq!(
                of(poison, 0),
                Disposition::DeadLetter {
                    reason,
                    detail: "bad".into()
                }
            );
        }
    }

    #[test]
    fn an_open_breaker_delays_by_the_time_left_plus_spread_uncounted() {
        let open = Outcome::BreakerOpen(MS(4_000));
        assert!(!open.counted());
        let at = |draw| Disposition::of(open.clone(), 0, &policy(), draw);
        assert_eq!(
            at(0.0),
            Disposition::Nak {
                delay: MS(4_000),
                counted: false
            }
        );
        // At most half the time left plus 100 ms more.
        assert_eq!(
            at(1.0),
            Disposition::Nak {
                delay: MS(6_100),
                counted: false
            }
        );
        assert_eq!(at(1.0).label(), "delayed");
    }

    #[test]
    fn a_store_that_cannot_flush_naks_uncounted() {
        let d = of(Outcome::StoreUnavailable("disk full".into()), 0);
        assert_eq!(
            d,
            Disposition::Nak {
                delay: MS(100),
                counted: false
            }
        );
    }

    #[test]
    fn a_dropped_message_is_left_for_redelivery() {
        assert_eq!(of(Outcome::Dropped, 0), Disposition::Leave);
    }

    #[test]
    fn every_disposition_has_a_listed_label() {
        let all = [
            of(Outcome::Handled, 0),
            of(Outcome::Duplicate, 0),
            of(Outcome::Transient("x".into()), 1),
            of(Outcome::BreakerOpen(MS(1)), 0),
            of(Outcome::Permanent("x".into()), 0),
            of(Outcome::Dropped, 0),
        ];
        let labels: Vec<&str> = all.iter().map(Disposition::label).collect();
        assert_eq!(labels, Disposition::LABELS);
    }
}
