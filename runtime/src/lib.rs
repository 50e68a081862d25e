//! Choreo's runtime: the generic machinery that runs bounded contexts on NATS JetStream and
//! sled. It knows nothing about the shop.
//!
//! Path of one message: [`consumer`] pulls it from a durable consumer ([`bus`]), reads its
//! [`envelope`], checks the inbox and runs the component's decision in one [`store`]
//! transaction with the outbox entries and the inbox mark; the [`flusher`] makes that
//! durable; the message is acked and the [`outbox`] relay publishes what it caused.

pub mod bus;
pub mod component;
pub mod config;
pub mod consumer;
pub mod envelope;
pub mod external;
pub mod faults;
pub mod flusher;
pub mod local;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod resilience;

pub mod saga;
pub mod saga_service;
pub mod saga_stats;
pub mod store;
pub mod subjects;

pub use component::{
    decode_as, Component, Context, DecodeError, ExternalCall, HandleCtx, HandleError, Kind,
    Message, Outgoing, QueryError, Subscription,
};
pub use envelope::Envelope;
pub use store::{load, read, read_all, save, StateError, StateRead, StateTx};
