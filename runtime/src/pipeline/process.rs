//! The path of one message up to its [`Outcome`]: size and envelope checks, the declared
//! type, decoding, then attempts (immediate retries by the retry layer) of the handling
//! itself: the component's plan, the external call behind its breaker, the transaction in
//! the group commit. Nothing here acks, naks or dead-letters: [`super::settle`] does, once.

use std::any::Any;
use std::sync::Arc;

use async_nats::HeaderMap;
use tracing::Instrument;

use super::commit::GroupCommit;
use super::decide::{handler_decide, inbox_key};
use super::disposition::{DlqReason, Outcome};
use crate::component::{DynComponent, HandleError, Subscription};
use crate::resilience::external::{CallError, Calls};
use crate::resilience::retry::{self, RetryPolicy};
use crate::store::{CommitError, Committed, Store};
use crate::wire::envelope::{self, Envelope};
use crate::wire::subjects;

/// What processing a consumer's messages needs.
pub(crate) struct Handling {
    pub(crate) context: &'static str,
    pub(crate) component: Arc<dyn DynComponent>,
    pub(crate) sub: Arc<Subscription>,
    pub(crate) durable: Arc<str>,
    pub(crate) store: Store,
    pub(crate) commit: GroupCommit,
    pub(crate) calls: Arc<dyn Calls>,
    pub(crate) policy: RetryPolicy,
    pub(crate) max_message_bytes: usize,
    #[cfg(feature = "faults")]
    pub(crate) faults: Arc<crate::faults::Faults>,
    /// `[danger] disable_group_commit`: an injected crash after the commit acks first.
    #[cfg(feature = "danger")]
    pub(crate) ack_before_crash: bool,
}

/// A delivered message as processing sees it.
pub(crate) struct Delivery<'a> {
    pub(crate) subject: &'a str,
    pub(crate) headers: Option<&'a HeaderMap>,
    pub(crate) payload: &'a bytes::Bytes,
    /// Its size as counted against `max_message_bytes`.
    pub(crate) size: usize,
    /// The JetStream message itself, for the `[danger]` ack before an injected crash.
    #[cfg(feature = "danger")]
    pub(crate) message: Option<&'a async_nats::jetstream::Message>,
}

/// The outcome of a handler's error.
fn classify(e: HandleError) -> Outcome {
    match e {
        HandleError::Retry(why) => Outcome::Transient(why),
        HandleError::Permanent(why) => Outcome::Permanent(why),
        HandleError::State(s) => Outcome::Transient(format!("state: {s:?}")),
    }
}

/// Where the `after_commit` hook leaves a rule that fired for the attempt to carry out.
#[cfg(feature = "faults")]
type FiredCell = Arc<std::sync::Mutex<Option<crate::faults::Fired>>>;

impl Handling {
    /// The path of one message; returns its (bounded) type label and its outcome.
    pub(crate) async fn process(&self, d: &Delivery<'_>) -> (&'static str, Outcome) {
        if d.size > self.max_message_bytes {
            let limit = self.max_message_bytes;
            let reason = format!("oversized: {} bytes > limit {limit}", d.size);
            return ("unknown", Outcome::Poison(DlqReason::Oversized, reason));
        }
        let env = match Envelope::from_headers(d.headers) {
            Ok(env) => env,
            Err(e) => {
                return (
                    "unknown",
                    Outcome::Poison(DlqReason::MissingHeader, e.to_string()),
                )
            }
        };
        let span = tracing::info_span!(
            "message",
            context = self.context,
            consumer = %self.durable,
            msg_type = %env.msg_type,
            id = %env.id,
            correlation = %env.correlation_id,
            causation = %env.causation_id,
            trace_id = %env.trace_id(),
        );
        let (msg_type, outcome) = self
            .process_envelope(d, Arc::new(env))
            .instrument(span.clone())
            .await;
        span.in_scope(|| tracing::debug!(?outcome, "handled"));
        (msg_type, outcome)
    }

    /// The path of a message whose envelope was read, inside its tracing span.
    async fn process_envelope(
        &self,
        d: &Delivery<'_>,
        env: Arc<Envelope>,
    ) -> (&'static str, Outcome) {
        let Some(msg_type) = self.sub.declared(&env.msg_type) else {
            let reason = format!("unknown message type {:?} on {}", env.msg_type, d.subject);
            return ("unknown", Outcome::Poison(DlqReason::UnknownType, reason));
        };
        if subjects::last_token(d.subject) != env.msg_type {
            let reason = format!(
                "type header {:?} does not match subject {}",
                env.msg_type, d.subject
            );
            return ("unknown", Outcome::Poison(DlqReason::Malformed, reason));
        }
        let input = match self.component.decode(msg_type, d.payload) {
            Ok(i) => i,
            Err(e) => {
                return (
                    msg_type,
                    Outcome::Poison(DlqReason::Malformed, e.to_string()),
                )
            }
        };
        let inbox_key = inbox_key(&self.durable, &env.id);
        let outcome = retry::at_once(
            self.policy.immediate,
            |o| matches!(o, Outcome::Transient(_)),
            || self.attempt(d, &env, msg_type, &inbox_key, &input),
        )
        .await;
        (msg_type, outcome)
    }

    /// One attempt: the `handler` fault point, then plan, external call, transaction and
    /// group commit, then the `after_commit` fault point.
    async fn attempt(
        &self,
        d: &Delivery<'_>,
        env: &Arc<Envelope>,
        msg_type: &'static str,
        inbox_key: &str,
        input: &Arc<dyn Any + Send + Sync>,
    ) -> Outcome {
        crate::fault!(async self.faults, Handler, self.context, msg_type, d.payload, |injected| {
            return match injected {
                crate::faults::Injected::Error => {
                    Outcome::Transient("injected error at handler".into())
                }
                // Neither ack nor nak: the server redelivers after ack_wait.
                crate::faults::Injected::Drop => Outcome::Dropped,
            };
        });
        let reply = match self.component.plan(self.store.reader(), input.as_ref()) {
            Ok(None) => None,
            Ok(Some(call)) => {
                // A duplicate must not call the external system again (the transaction's
                // inbox check is the authoritative one; this saves the call). Acked once
                // what committed it is durable.
                match self.store.seen(inbox_key) {
                    Ok(true) => {
                        return match self.commit.durable().await {
                            Ok(()) => Outcome::Duplicate,
                            Err(e) => Outcome::StoreUnavailable(e.to_string()),
                        }
                    }
                    Ok(false) => {}
                    Err(e) => return Outcome::StoreUnavailable(format!("store: {e}")),
                }
                match self.calls.call(&call, msg_type, d.payload).await {
                    Ok(v) => Some(v),
                    Err(CallError::Open(after)) => return Outcome::BreakerOpen(after),
                    Err(CallError::Failed(e)) => return Outcome::Transient(e.to_string()),
                }
            }
            Err(e) => return classify(e),
        };
        let now = envelope::now_ms();
        let decide = handler_decide(
            self.context,
            self.component.clone(),
            self.durable.clone(),
            env.clone(),
            input.clone(),
            reply,
            now,
        );
        #[cfg(feature = "faults")]
        let (after, fired) = self.after_commit(d, msg_type);
        #[cfg(not(feature = "faults"))]
        let after = None;
        // Durable, and its outbox entries with the relay, when it returns.
        let result = self
            .commit
            .commit(inbox_key.to_string(), now, decide, after)
            .await;
        match result {
            Ok(Committed::Written { .. }) => {
                #[cfg(feature = "faults")]
                if let Some(fired) = fired.and_then(|f| f.lock().ok()?.take()) {
                    match crate::faults::run_async(fired, msg_type).await {
                        Some(crate::faults::Injected::Error) => {
                            return Outcome::Transient("injected error at after_commit".into())
                        }
                        // The outbox was handed over; the ack is skipped.
                        Some(crate::faults::Injected::Drop) => return Outcome::Dropped,
                        None => {}
                    }
                }
                Outcome::Handled
            }
            // The answer came after a flush that followed this transaction, so the first
            // delivery's commit is durable too.
            Ok(Committed::Duplicate) => Outcome::Duplicate,
            Err(CommitError::Handler(e)) => classify(e),
            Err(CommitError::Store(e)) => Outcome::StoreUnavailable(format!("store: {e}")),
        }
    }

    /// The `after_commit` fault point, run by the group commit once the message's
    /// transaction is durable (before its entries reach the relay): a crash aborts there; any
    /// other rule that fires is left in the returned cell for the attempt to carry out. With
    /// `[danger] disable_group_commit` it runs right after the transaction, and a crash
    /// first acks the message (the server confirms it): acked, never redelivered, never on
    /// disk, its outbox entries gone with it, which is the window the group commit closes.
    #[cfg(feature = "faults")]
    #[cfg_attr(not(feature = "danger"), allow(unused_variables))]
    fn after_commit(
        &self,
        d: &Delivery<'_>,
        msg_type: &'static str,
    ) -> (Option<super::commit::AfterDurable>, Option<FiredCell>) {
        if !self.faults.armed() {
            return (None, None);
        }
        let cell: FiredCell = Arc::default();
        let (faults, context) = (self.faults.clone(), self.context);
        let payload = d.payload.clone();
        #[cfg(feature = "danger")]
        let ack_first = d
            .message
            .filter(|_| self.ack_before_crash)
            .map(|m| (m.clone(), tokio::runtime::Handle::current()));
        let left = cell.clone();
        let hook: super::commit::AfterDurable = Box::new(move || {
            use crate::faults::{FaultAction, FaultPoint};
            let Some(fired) = faults.fired(FaultPoint::AfterCommit, context, msg_type, &payload)
            else {
                return;
            };
            if fired.rule.action == FaultAction::Crash {
                #[cfg(feature = "danger")]
                if let Some((msg, runtime)) = ack_first {
                    let _ = runtime.block_on(msg.double_ack());
                }
                fired.carry_out(msg_type);
                return;
            }
            if let Ok(mut left) = left.lock() {
                *left = Some(fired);
            }
        });
        (Some(hook), Some(cell))
    }
}

#[cfg(test)]
mod tests;
