//! Process managers (sagas) as a runtime capability.
//!
//! A saga is a pure state machine: `transition(state, trigger, now) -> Step` where the step
//! holds the new state, the messages to send, and the deadlines to set or cancel. The runtime:
//! - correlates each input to an instance and persists the instance (state, version,
//!   deadlines, history) in the same transaction as the outbox entries and the inbox mark
//!   ([`instance`]);
//! - keeps deadlines in a time-ordered index and fires them from a timer through the same
//!   transactional path, after restarts too ([`service`]);
//! - serves inspection and operator commands on `choreo.saga.<name>.<op>` ([`service`]);
//! - checks the declared graph ([`definition`]) and drives a saga by hand in tests
//!   ([`testing`]).
//!
//! A saga is written either as a [`Saga`] builder, whose rules are the graph ([`builder`]),
//! or as an implementation of [`ProcessManager`] with its graph declared beside it.
//!
//! Concurrency: a context's transactions run one after the other on its commit thread, and
//! each transition re-reads the instance inside its transaction and writes `version + 1`, so
//! two deliveries racing on one instance serialize.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::component::{DecodeError, HandleError, Outgoing, Subscription};

pub mod adapter;
pub mod builder;
pub mod definition;
pub mod instance;
pub mod service;
pub mod testing;

pub use adapter::{hosted, DynSaga};
pub use builder::{Saga, SagaMessage, Tracked};
pub use definition::{Definition, StateDef, TransitionDef};
pub use instance::{
    ended_key, history_prefix, instance_key, instances, show, HistoryEntry, Instance,
    InstanceSummary, DEADLINE_PREFIX, ENDED_PREFIX, HISTORY_LIMIT,
};

/// A deadline to set (or move) on the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    /// The deadline's name, unique within the instance; a fired deadline is the trigger
    /// [`Trigger::Deadline`] with this name.
    pub name: String,
    /// When it is due, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl Deadline {
    /// The deadline `name`, due at `at_ms` (milliseconds since the Unix epoch).
    pub fn at(name: &str, at_ms: u64) -> Self {
        Deadline {
            name: name.to_string(),
            at_ms,
        }
    }

    /// The deadline `name`, due `ms` after `now_ms`.
    pub fn after(name: &str, now_ms: u64, ms: u64) -> Self {
        Deadline {
            name: name.to_string(),
            at_ms: now_ms.saturating_add(ms),
        }
    }
}

/// The outcome of one transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Step<S> {
    /// The instance's state after the transition.
    pub state: S,
    /// Messages to send, through the outbox in the transition's transaction.
    pub send: Vec<Outgoing>,
    /// Deadlines to set; one with the name of an existing deadline replaces it.
    pub set: Vec<Deadline>,
    /// Deadlines to cancel by name. Entering a terminal state cancels all of them.
    pub cancel: Vec<String>,
}

impl<S> Step<S> {
    /// Moves to `state`, sending nothing and leaving the deadlines as they are.
    pub fn to(state: S) -> Self {
        Step {
            state,
            send: vec![],
            set: vec![],
            cancel: vec![],
        }
    }

    /// Also sends `message` (through the outbox, in the transition's transaction).
    pub fn send(mut self, message: Outgoing) -> Self {
        self.send.push(message);
        self
    }

    /// Also sets (or moves) a deadline.
    pub fn set(mut self, deadline: Deadline) -> Self {
        self.set.push(deadline);
        self
    }

    /// Also cancels the deadline `name`.
    pub fn cancel(mut self, name: &str) -> Self {
        self.cancel.push(name.to_string());
        self
    }
}

/// What drives a transition.
#[derive(Debug)]
pub enum Trigger<'a, I> {
    /// A subscribed message.
    Message(&'a I),
    /// A deadline of the instance passed.
    Deadline(&'a str),
    /// An operator asked to retry (`choreo saga retry`).
    Retry,
}

impl<I> Clone for Trigger<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<I> Copy for Trigger<'_, I> {}

/// A process manager.
pub trait ProcessManager: Send + Sync + 'static {
    /// An instance's state, stored as JSON with the instance.
    type State: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// A decoded subscribed message.
    type Input: Send + Sync + 'static;
    /// Stable name (e.g. `order-fulfilment`): part of keys, subjects and durable names.
    fn name(&self) -> &'static str;
    /// The messages the saga consumes.
    fn subscriptions(&self) -> Vec<Subscription>;
    /// Decodes the JSON payload of a subscribed message of type `msg_type`.
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Self::Input, DecodeError>;
    /// The instance an input belongs to.
    fn correlate(&self, input: &Self::Input) -> String;
    /// The pure transition. `Ok(None)`: nothing changes (a repeat, a late message).
    fn transition(
        &self,
        state: Option<&Self::State>,
        trigger: Trigger<'_, Self::Input>,
        now_ms: u64,
    ) -> Result<Option<Step<Self::State>>, HandleError>;
    /// The name of the state in the declared graph.
    fn state_name(&self, state: &Self::State) -> &'static str;
    /// The declared graph: the states and the transitions the saga may take. The runtime
    /// refuses a transition it does not declare.
    fn definition(&self) -> Definition;
    /// What is wrong with the declaration; a context with a saga that has problems does not
    /// start.
    fn problems(&self) -> Vec<String> {
        self.definition().problems()
    }
}
