//! The path of one message through a context, and what makes its effects durable and
//! published.
//!
//! - [`consumer`]: one supervised actor per durable consumer, owning its pull loop;
//! - [`pull`]: binds to the consumer, takes messages while the bulkhead has room, runs each
//!   under the handler guard;
//! - [`process`]: checks, decodes and attempts a message (plan, external call, transaction)
//!   up to its [`disposition::Outcome`];
//! - [`disposition`]: the pure mapping from outcome to ack, nak with delay, dead letter or
//!   leave, with its table;
//! - [`settle`]: the one place that acts on a disposition;
//! - [`chain`]: messages a context sends to itself, handled in the transaction that wrote
//!   them;
//! - [`decide`]: a decision as effects (outbox entries with derived ids, saga moves);
//! - [`commit`] and [`flusher`]: the group commit (one commit thread, one flusher thread
//!   per store);
//! - [`relay`]: publishes durable outbox entries;
//! - [`context`]: what a context's consumers share, and commits that do not come from the
//!   bus (deadlines, operator retries).
//!
//! Architecture invariant: a message is acked only after the flush that followed its
//! transaction succeeded, and every message gets exactly one disposition ([`settle`] takes
//! it by value).

pub mod chain;
pub mod commit;
pub mod consumer;
pub mod context;
pub mod decide;
pub mod disposition;
pub mod flusher;
pub mod process;
pub mod pull;
pub mod relay;
pub mod replicate;
pub mod settle;

pub use context::{ContextRuntime, LocalError};
