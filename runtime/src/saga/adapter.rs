//! A process manager as the runtime hosts it: a component for its message subscriptions
//! and, object-safe, the deadlines, operator retries and inspection the node drives.

use std::any::Any;
use std::sync::Arc;

use super::instance::{apply, instance_key, Cause};
use super::{Definition, ProcessManager, Trigger};
use crate::component::{
    downcast, Decision, DecodeError, DynComponent, ExternalCall, HandleCtx, HandleError,
    Subscription,
};
use crate::store::{StateRead, StateTx};

/// A process manager as the runtime hosts it: a component (its message subscriptions) and
/// a [`DynSaga`]. Made only by [`hosted`], so a saga's messages are never handled without
/// its deadlines and inspection.
pub(crate) struct SagaComponent<P>(pub(crate) Arc<P>);

/// A process manager ready to be hosted by a context ([`crate::Context::sagas`]): its
/// messages, its deadlines, its operator retries and its inspection, from one registration.
pub fn hosted<P: ProcessManager>(saga: P) -> Arc<dyn DynSaga> {
    Arc::new(SagaComponent(Arc::new(saga)))
}

impl<P: ProcessManager> DynComponent for SagaComponent<P> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        self.0.subscriptions()
    }
    fn decode(
        &self,
        msg_type: &str,
        payload: &[u8],
    ) -> Result<Arc<dyn Any + Send + Sync>, DecodeError> {
        Ok(Arc::new(self.0.decode(msg_type, payload)?))
    }
    fn plan(
        &self,
        _state: &dyn StateRead,
        _input: &(dyn Any + Send + Sync),
    ) -> Result<Option<ExternalCall>, HandleError> {
        Ok(None)
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &(dyn Any + Send + Sync),
        ctx: &HandleCtx<'_>,
    ) -> Result<Decision, HandleError> {
        let input = downcast::<P::Input>(input)?;
        let id = self.0.correlate(input);
        let cause = Cause {
            trigger: "message",
            message_id: &ctx.envelope.id,
            message_type: &ctx.envelope.msg_type,
        };
        apply(
            self.0.as_ref(),
            tx,
            &id,
            Trigger::Message(input),
            &cause,
            ctx.now_ms,
        )
    }
}

/// The object-safe side of a saga used by the node: deadlines, operator retries, inspection.
pub trait DynSaga: Send + Sync + 'static {
    /// The saga's stable name ([`ProcessManager::name`]).
    fn name(&self) -> &'static str;
    /// The declared graph ([`ProcessManager::definition`]).
    fn definition(&self) -> Definition;
    /// What is wrong with the declaration ([`ProcessManager::problems`]).
    fn problems(&self) -> Vec<String>;
    /// The component that handles the saga's messages.
    fn component(&self) -> Arc<dyn DynComponent>;
    /// Fires the deadline `deadline` of the instance `id` inside the transaction `tx`;
    /// `cause_id` goes to the history as the message id. Nothing happens if the instance no
    /// longer holds that deadline.
    fn fire(
        &self,
        tx: &dyn StateTx,
        id: &str,
        deadline: &str,
        cause_id: &str,
        now_ms: u64,
    ) -> Result<Decision, HandleError>;
    /// Applies an operator retry to the instance `id` inside the transaction `tx`;
    /// `cause_id` goes to the history as the message id. A `Permanent` error if there is no
    /// such instance.
    fn retry(
        &self,
        tx: &dyn StateTx,
        id: &str,
        cause_id: &str,
        now_ms: u64,
    ) -> Result<Decision, HandleError>;
}

impl<P: ProcessManager> DynSaga for SagaComponent<P> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn definition(&self) -> Definition {
        self.0.definition()
    }
    fn problems(&self) -> Vec<String> {
        self.0.problems()
    }
    fn component(&self) -> Arc<dyn DynComponent> {
        Arc::new(SagaComponent(self.0.clone()))
    }
    fn fire(
        &self,
        tx: &dyn StateTx,
        id: &str,
        deadline: &str,
        cause_id: &str,
        now_ms: u64,
    ) -> Result<Decision, HandleError> {
        let cause = Cause {
            trigger: "deadline",
            message_id: cause_id,
            message_type: deadline,
        };
        apply(
            self.0.as_ref(),
            tx,
            id,
            Trigger::Deadline(deadline),
            &cause,
            now_ms,
        )
    }
    fn retry(
        &self,
        tx: &dyn StateTx,
        id: &str,
        cause_id: &str,
        now_ms: u64,
    ) -> Result<Decision, HandleError> {
        let key = instance_key(self.0.name(), id);
        if tx.get(&key)?.is_none() {
            return Err(HandleError::Permanent(format!(
                "no {} instance {id}",
                self.0.name()
            )));
        }
        let cause = Cause {
            trigger: "retry",
            message_id: cause_id,
            message_type: "OperatorRetry",
        };
        apply(self.0.as_ref(), tx, id, Trigger::Retry, &cause, now_ms)
    }
}
