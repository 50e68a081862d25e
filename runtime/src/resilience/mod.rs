//! Failure isolation: retry policies, circuit breakers, and how they stack.
//!
//! Stacking order on the path of one message (outermost first):
//! 1. **Bulkhead**: each durable consumer has its own pull loop, a bounded prefetch (its
//!    queue) and at most `max_in_flight` messages in handling, so a slow handler only fills
//!    its own bulkhead (`consumer.rs`).
//! 2. **Handler timeout**: the whole handling of one message is bounded by
//!    `retry.handler_timeout_ms`; a timeout is a transient failure.
//! 3. **Retry policy** ([`retry::RetryPolicy`]): a transient failure is retried at once up to
//!    `immediate` times, then the message is naked with an exponential, jittered delay; after
//!    `budget` failed deliveries it is dead-lettered. Failures are counted by the runtime, not
//!    by JetStream's delivery count, so delays imposed by an open breaker do not spend it.
//! 4. **Circuit breaker** ([`breaker::Breaker`]), one per external system: while open, a
//!    message that needs the system is naked with the time left until the next probe; it is
//!    neither failed nor dead-lettered, and drains gradually once the breaker closes.
//! 5. **External call timeout** (`external_timeout_ms`).
//!
//! Every outcome maps to one acknowledgement (see `consumer.rs`): success, business
//! rejection (an event) and duplicate -> ack; transient failure -> immediate retry, then nak
//! with delay; breaker open -> nak with the breaker's delay (not counted); permanent failure,
//! poison (undecodable, unknown, oversized) and an exhausted budget -> dead letter, then term.

pub mod breaker;
pub mod retry;
