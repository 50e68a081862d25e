//! What every consumer of one context shares, and the path of a transition that does not
//! come from the bus (a saga deadline, an operator retry).

use std::sync::Arc;

use super::commit::GroupCommit;
use super::decide::{effects, split_tx, Decide};
use crate::component::{Decision, HandleError};
use crate::config::NodeConfig;
use crate::resilience::external::ExternalCalls;
use crate::store::{CommitError, Committed, StateTx, Store};
use crate::telemetry::Health;
use crate::wire::bus::Bus;
use crate::wire::envelope::{self, Envelope};

/// What every consumer of one context shares.
pub struct ContextRuntime {
    /// The context's name.
    pub(crate) context: &'static str,
    /// The node's readiness.
    pub(crate) health: Health,
    /// The context's store.
    pub(crate) store: Store,
    /// The context's group commit.
    pub(crate) commit: GroupCommit,
    /// The node's NATS connection.
    pub(crate) bus: Bus,
    /// Calls to external systems, behind their circuit breakers.
    pub(crate) external: ExternalCalls,
    /// The node's configuration.
    pub(crate) cfg: Arc<NodeConfig>,
    /// The node's fault rules.
    #[cfg(feature = "faults")]
    pub(crate) faults: Arc<crate::faults::Faults>,
}

impl ContextRuntime {
    /// Commits a transition that does not come from the bus (a deadline, an operator
    /// command) through the same path as a message: the inbox mark `inbox_key` and the
    /// outbox entries in the next batch transaction, group commit, then the outbox relay.
    pub async fn commit_local<F>(
        &self,
        inbox_key: &str,
        cause: &Envelope,
        scope: &str,
        f: F,
    ) -> Result<Committed, LocalError>
    where
        F: Fn(&dyn StateTx) -> Result<Decision, HandleError> + Send + 'static,
    {
        let now = envelope::now_ms();
        let (context, scope, cause) = (self.context, scope.to_string(), cause.clone());
        let decide: Decide = Box::new(move |tx| {
            let decision = f(tx).map_err(split_tx)?;
            Ok(effects(context, &scope, &cause, decision, now))
        });
        match self
            .commit
            .commit(inbox_key.to_string(), now, decide, None)
            .await
        {
            Ok(committed) => Ok(committed),
            Err(CommitError::Handler(e)) => Err(LocalError::Handler(e)),
            Err(CommitError::Store(e)) => Err(LocalError::Store(e.to_string())),
        }
    }
}

/// Failure of [`ContextRuntime::commit_local`].
#[derive(Debug)]
pub enum LocalError {
    /// The transition refused or failed (what its function returned).
    Handler(HandleError),
    /// The store could not commit or make the batch durable (its error, as text).
    Store(String),
}

impl std::fmt::Display for LocalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalError::Handler(HandleError::Retry(m)) => write!(f, "retry later: {m}"),
            LocalError::Handler(HandleError::Permanent(m)) => write!(f, "{m}"),
            LocalError::Handler(HandleError::State(s)) => write!(f, "state: {s:?}"),
            LocalError::Store(m) => write!(f, "store: {m}"),
        }
    }
}
