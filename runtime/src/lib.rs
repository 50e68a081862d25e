//! Choreo's runtime: the generic machinery that runs bounded contexts on NATS JetStream and
//! sled. It knows nothing about the shop.
//!
//! The rooms, lowest first (a room uses only the rooms above it in this list):
//! - [`duration`]: durations as written in config and on the command line (`"30s"`);
//! - [`telemetry`]: metrics, readiness, the HTTP endpoint, saga counts;
//! - [`wire`]: the envelope, subjects and streams, the NATS connection, external requests;
//! - [`store`]: sled behind the state API, the batch transaction, inbox, outbox table;
//! - [`component`]: what a context provides (components, messages, handler errors);
//! - [`aggregate`]: command handlers in the decider shape, hosted as components;
//! - `faults` (cargo feature `faults`): fault injection for chaos tests;
//! - [`resilience`]: bulkhead, handler guard, retry, circuit breaker, external calls;
//! - [`config`]: the node's settings;
//! - [`pipeline`]: the path of one message (pull, process, disposition, settle), the group
//!   commit and the outbox relay;
//! - [`saga`]: process managers, their deadlines and inspection;
//! - [`context`]: a bounded context as a node hosts it;
//! - [`node`]: one process hosting contexts, its services and its store watchdog;
//! - [`app`]: an application's `main`: its contexts, the command line, logging, signals;
//! - [`client`]: send a command, ask a query, wait for an event, from any process.
//!
//! Path of one message: the [`pipeline`] pulls it from a durable consumer, reads its
//! envelope, checks the inbox and runs the component's decision in one [`store`]
//! transaction with the outbox entries and the inbox mark; the group commit makes that
//! durable; the message is acked and the outbox relay publishes what it caused.
//!
//! # Example
//!
//! An application with one context holding one aggregate, run as a node with the flags of
//! `choreo node` (`--context counters --nats URL --data DIR`). The repository's
//! `docs/guide.md` walks through a whole one, with a saga and its tests.
//!
//! ```no_run
//! use runtime::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! runtime::messages! {
//!     enum CounterCommand: Command in "counters" { Add { counter: String, by: u64 } }
//! }
//! runtime::messages! {
//!     enum CounterEvent: Event in "counters" { Added { counter: String, total: u64 } }
//! }
//!
//! /// A counter: its total so far.
//! #[derive(Default, Serialize, Deserialize)]
//! struct Counter {
//!     total: u64,
//! }
//!
//! impl Aggregate for Counter {
//!     const NAME: &'static str = "counter";
//!     const ID: &'static str = "counter";
//!     type Command = CounterCommand;
//!     type Event = CounterEvent;
//!
//!     fn decide(&self, command: &CounterCommand, _now: u64) -> Decided<CounterEvent> {
//!         let CounterCommand::Add(add) = command;
//!         let total = self.total + add.by;
//!         Ok(vec![Added { counter: add.counter.clone(), total }.into()])
//!     }
//!
//!     fn apply(&mut self, event: &CounterEvent) {
//!         let CounterEvent::Added(added) = event;
//!         self.total = added.total;
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     let counters = ContextBuilder::new("counters").aggregate::<Counter>();
//!     App::new("counters").with(counters).run()
//! }
//! ```

// Every public item is documented (docs.rs standard); `make lint` holds the crate to it.
#![warn(missing_docs)]

/// A fault point (see `faults`): fires the matching rule, carries out its action (crash,
/// panic, delay) and runs the given closure body with what is left for the point
/// (`Injected::Error` or `Injected::Drop`). `async` points sleep on the runtime,
/// `blocking` ones on their thread. Without the cargo feature `faults` it expands to
/// nothing, so a release build holds no fault point.
///
/// `fault!(async faults, Handler, context, msg_type, payload, |injected| ...)`
#[cfg(feature = "faults")]
#[macro_export]
macro_rules! fault {
    (async $faults:expr, $point:ident, $ctx:expr, $ty:expr, $payload:expr, |$inj:ident| $then:expr) => {
        if let Some(fired) = $faults.fired($crate::faults::FaultPoint::$point, $ctx, $ty, $payload)
        {
            if let Some($inj) = $crate::faults::run_async(fired, $ty).await {
                $then
            }
        }
    };
    (blocking $faults:expr, $point:ident, $ctx:expr, $ty:expr, $payload:expr, |$inj:ident| $then:expr) => {
        if let Some(fired) = $faults.fired($crate::faults::FaultPoint::$point, $ctx, $ty, $payload)
        {
            if let Some($inj) = $crate::faults::run_blocking(fired, $ty) {
                $then
            }
        }
    };
}

/// Without the cargo feature `faults`: no fault point.
#[cfg(not(feature = "faults"))]
#[macro_export]
macro_rules! fault {
    ($($t:tt)*) => {};
}

pub mod aggregate;
pub mod app;
pub mod client;
pub mod component;
pub mod config;
pub mod context;
pub mod duration;
#[cfg(feature = "faults")]
pub mod faults;
pub mod node;
pub mod pipeline;
pub mod resilience;
pub mod saga;
pub mod store;
pub mod telemetry;
pub mod wire;

/// What an application's code usually needs, in one `use runtime::prelude::*;`.
pub mod prelude {
    pub use crate::aggregate::{Aggregate, Decided, Rejection};
    pub use crate::app::App;
    pub use crate::component::{Message, Messages, Outgoing};
    pub use crate::context::ContextBuilder;
    pub use crate::saga::{Deadline, Saga, Step};
}

pub use aggregate::{Aggregate, Decided, Rejection};
pub use component::{
    decode_as, Component, DecodeError, ExternalCall, HandleCtx, HandleError, Kind, Message,
    Messages, Outgoing, Subscription,
};
pub use context::{request_field, Context, QueryError};
pub use store::{load, read, read_all, save, StateError, StateRead, StateTx};
pub use wire::envelope::Envelope;
