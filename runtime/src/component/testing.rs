//! Given/when/then for a hand-written [`Component`], on a real store in a temporary
//! directory and without NATS: `plan` runs on the state before the transaction and `handle`
//! in one transaction, as the pipeline runs them, with the time and the external system's
//! reply as data.
//!
//! # Example
//!
//! A component of the loans context that mails a reminder when a loan is overdue: it
//! reacts to another component's event, asks an external system (the mailer) with an
//! idempotency key, so a redelivered event does not mail twice, and records what it sent.
//!
//! ```
//! use runtime::component::testing::Harness;
//! use runtime::prelude::*;
//! use runtime::{
//!     load, save, Component, DecodeError, ExternalCall, HandleCtx, HandleError, StateRead,
//!     StateTx, Subscription,
//! };
//!
//! runtime::messages! {
//!     enum LoanEvent: Event in "loans" { LoanOverdue { loan: String } }
//! }
//! runtime::messages! {
//!     enum ReminderEvent: Event in "loans" { ReminderMailed { loan: String, mail_id: String } }
//! }
//!
//! struct Reminders;
//!
//! impl Component for Reminders {
//!     type Input = LoanEvent;
//!     fn name(&self) -> &'static str {
//!         "reminders"
//!     }
//!     fn subscriptions(&self) -> Vec<Subscription> {
//!         Subscription::of::<LoanEvent>()
//!     }
//!     fn external_systems(&self) -> Vec<&'static str> {
//!         vec!["mailer"]
//!     }
//!     fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<LoanEvent, DecodeError> {
//!         LoanEvent::decode(msg_type, payload)
//!     }
//!     /// Mails once per loan: nothing to ask once a reminder is on record.
//!     fn plan(
//!         &self,
//!         state: &dyn StateRead,
//!         e: &LoanEvent,
//!     ) -> Result<Option<ExternalCall>, HandleError> {
//!         let LoanEvent::LoanOverdue(o) = e;
//!         if runtime::read::<String>(state, &format!("reminder/{}", o.loan))?.is_some() {
//!             return Ok(None);
//!         }
//!         let body = serde_json::json!({ "idempotency_key": format!("remind:{}", o.loan) });
//!         Ok(Some(ExternalCall {
//!             system: "mailer",
//!             subject: runtime::wire::subjects::external("mailer", "send"),
//!             body: body.to_string(),
//!         }))
//!     }
//!     fn handle(
//!         &self,
//!         tx: &dyn StateTx,
//!         e: &LoanEvent,
//!         ctx: &HandleCtx<'_>,
//!     ) -> Result<Vec<Outgoing>, HandleError> {
//!         let LoanEvent::LoanOverdue(o) = e;
//!         let key = format!("reminder/{}", o.loan);
//!         if load::<String>(tx, &key)?.is_some() {
//!             return Ok(vec![]);
//!         }
//!         // No reminder on record: `plan` asked the mailer, whose reply is here.
//!         let reply = ctx.external.ok_or(HandleError::Retry("the mailer was not asked".into()))?;
//!         let mail_id = reply["mail_id"].as_str().unwrap_or_default().to_string();
//!         save(tx, &key, &mail_id)?;
//!         Ok(vec![Outgoing::event(&ReminderMailed { loan: o.loan.clone(), mail_id })])
//!     }
//! }
//!
//! let mut reminders = Harness::new(Reminders);
//! let overdue = LoanOverdue { loan: "l-1".into() };
//! let call = reminders.plan(overdue.clone()).unwrap().expect("asks the mailer");
//! assert_eq!(call.system, "mailer");
//! assert!(call.body.contains("remind:l-1"));
//! let sent = reminders.answer(overdue.clone(), serde_json::json!({ "mail_id": "m-9" }));
//! assert_eq!(sent.unwrap()[0].msg_type, "ReminderMailed");
//! assert_eq!(reminders.state::<String>("reminder/l-1").as_deref(), Some("m-9"));
//! // The event again (redelivered, or replayed): no second mail, nothing sent.
//! assert!(reminders.receive(overdue).unwrap().is_empty());
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Component, ExternalCall, HandleCtx, HandleError, Outgoing};
use crate::store::{CommitError, DecideError, Effects, StateRead, Store};
use crate::wire::envelope::{new_id, Envelope};

/// A component with a store of its own, handling messages one at a time.
pub struct Harness<C: Component> {
    component: C,
    store: Option<Store>,
    dir: PathBuf,
    /// The time `handle` sees, in milliseconds since the Unix epoch: 0 until set.
    pub now_ms: u64,
}

impl<C: Component> Harness<C> {
    /// `component` with an empty store in a new temporary directory (removed on drop).
    /// Panics if the store cannot be opened.
    pub fn new(component: C) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "choreo-harness-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            crate::wire::envelope::now_ms(),
        ));
        let store = Store::open(&dir, 1 << 20)
            .unwrap_or_else(|e| panic!("open a store in {}: {e}", dir.display()));
        Harness {
            component,
            store: Some(store),
            dir,
            now_ms: 0,
        }
    }

    /// What `plan` asks for `input` on the current state.
    pub fn plan(&self, input: impl Into<C::Input>) -> Result<Option<ExternalCall>, HandleError> {
        self.component.plan(self.store().reader(), &input.into())
    }

    /// `input` delivered: its plan, then `handle` in one transaction; the messages it sends.
    /// Panics if the plan asks for an external call ([`Harness::answer`] gives the reply).
    pub fn receive(&mut self, input: impl Into<C::Input>) -> Result<Vec<Outgoing>, HandleError> {
        let input = input.into();
        if let Some(call) = self.component.plan(self.store().reader(), &input)? {
            panic!(
                "{} asks {} ({}): give its reply with `answer`",
                self.component.name(),
                call.system,
                call.subject
            );
        }
        self.handle(&input, None)
    }

    /// `input` delivered, and the external system's `reply` to the call its plan asks for:
    /// `handle` in one transaction with the reply; the messages it sends. Panics if the
    /// plan asks for no call ([`Harness::receive`]).
    pub fn answer(
        &mut self,
        input: impl Into<C::Input>,
        reply: serde_json::Value,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let input = input.into();
        if self
            .component
            .plan(self.store().reader(), &input)?
            .is_none()
        {
            panic!("{} asks no external call here", self.component.name());
        }
        self.handle(&input, Some(&reply))
    }

    /// `handle` alone, in one transaction, with `reply` whatever the plan asks now: the
    /// state changed between the plan and the transaction (another message came first).
    /// Nothing is written when it fails.
    pub fn handle(
        &mut self,
        input: &C::Input,
        reply: Option<&serde_json::Value>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let envelope = Envelope::first(new_id(), self.component.name(), "test", self.now_ms);
        let ctx = HandleCtx {
            envelope: &envelope,
            now_ms: self.now_ms,
            external: reply,
        };
        let sent = std::cell::RefCell::new(Vec::new());
        let error = std::cell::RefCell::new(None);
        let committed = self.store().commit(&envelope.id, self.now_ms, |tx| {
            match self.component.handle(tx, input, &ctx) {
                Ok(out) => *sent.borrow_mut() = out,
                // A transaction error runs the transaction again, as in the pipeline.
                Err(HandleError::State(crate::store::StateError::Tx(e))) => {
                    return Err(DecideError::Tx(e))
                }
                Err(e) => {
                    *error.borrow_mut() = Some(e);
                    return Err(DecideError::Handler(()));
                }
            }
            Ok(Effects::default())
        });
        match committed {
            Ok(_) => Ok(sent.into_inner()),
            Err(CommitError::Handler(())) => Err(error.into_inner().expect("the handler's error")),
            Err(CommitError::Store(e)) => panic!("store: {e}"),
        }
    }

    /// The value stored at `key`, if any. Panics if it does not decode as `T`.
    pub fn state<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        crate::store::read(self.store().reader(), key)
            .unwrap_or_else(|e| panic!("read {key}: {e:?}"))
    }

    /// Writes `value` at `key` (`None`: removes it), in a transaction of its own: a state
    /// given before the messages, or a change no message makes (a bug's, for a check).
    pub fn put<T: Serialize>(&mut self, key: &str, value: Option<&T>) {
        let committed = self.store().commit::<(), _>(&new_id(), self.now_ms, |tx| {
            match value {
                Some(v) => crate::store::save(tx, key, v).map_err(|e| match e {
                    crate::store::StateError::Tx(e) => DecideError::Tx(e),
                    crate::store::StateError::Corrupt(_) => DecideError::Handler(()),
                })?,
                None => tx.remove(key)?,
            }
            Ok(Effects::default())
        });
        if committed.is_err() {
            panic!("write {key}");
        }
    }

    /// The store, for reads of several keys.
    pub fn reader(&self) -> &dyn StateRead {
        self.store().reader()
    }
}

impl<C: Component> Harness<C> {
    fn store(&self) -> &Store {
        self.store.as_ref().expect("open until dropped")
    }
}

impl<C: Component> Drop for Harness<C> {
    fn drop(&mut self) {
        // Closed first: sled's threads write into the directory until the store is gone.
        drop(self.store.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::{DecodeError, Subscription};
    use crate::store::{save, StateTx};

    /// Writes its input's number, then fails on odd ones.
    struct Evens;

    impl Component for Evens {
        type Input = u64;
        fn name(&self) -> &'static str {
            "evens"
        }
        fn subscriptions(&self) -> Vec<Subscription> {
            Vec::new()
        }
        fn decode(&self, _: &str, _: &[u8]) -> Result<u64, DecodeError> {
            Ok(0)
        }
        fn handle(
            &self,
            tx: &dyn StateTx,
            n: &u64,
            ctx: &HandleCtx<'_>,
        ) -> Result<Vec<Outgoing>, HandleError> {
            save(tx, "last", &(*n, ctx.now_ms))?;
            match n % 2 {
                0 => Ok(Vec::new()),
                _ => Err(HandleError::Retry(format!("{n} is odd"))),
            }
        }
    }

    #[test]
    fn a_failed_handling_writes_nothing_and_time_is_data() {
        let mut h = Harness::new(Evens);
        h.now_ms = 7;
        h.receive(2u64).unwrap();
        let failed = h.receive(3u64);
        assert!(matches!(failed, Err(HandleError::Retry(e)) if e == "3 is odd"));
        assert_eq!(h.state::<(u64, u64)>("last"), Some((2, 7)));
        h.put("last", Some(&(4u64, 0u64)));
        assert_eq!(h.state::<(u64, u64)>("last"), Some((4, 0)));
        h.put::<(u64, u64)>("last", None);
        assert_eq!(h.state::<(u64, u64)>("last"), None);
    }
}
