//! Failure isolation as layers, each a policy with its config and its typed outcome.
//!
//! Stacking order on the path of one message (outermost first):
//! 1. **Bulkhead** ([`bulkhead`]): each durable consumer has its own pull loop and at most
//!    `max_in_flight` messages in handling, so a slow handler only fills its own.
//! 2. **Handler guard** ([`guard`]): the whole handling of one message is bounded by
//!    `retry.handler_timeout_ms`, and a panic in it is caught; both are transient failures.
//! 3. **Retry** ([`retry`]): a transient failure is retried at once up to `immediate` times;
//!    what is left is naked with an exponential, jittered delay, and after `budget` failed
//!    deliveries dead-lettered. Failures are counted by the runtime, not by JetStream's
//!    delivery count, so delays imposed by an open breaker or a crashed node do not spend it.
//! 4. **Circuit breaker** ([`breaker`]), one per external system: while open, a message that
//!    needs the system is naked with the time left until the next probe; it is neither
//!    failed nor dead-lettered, and drains gradually once the breaker closes.
//! 5. **External call timeout** (`external_timeout_ms`, [`external`]).
//!
//! What each outcome becomes (ack, nak with delay, dead letter) is decided in one place:
//! `pipeline::disposition`.

pub mod breaker;
pub mod bulkhead;
pub mod external;
pub mod guard;
pub mod retry;
