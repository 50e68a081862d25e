//! Aggregates in the decider shape: `decide(&state, &command, now) -> events`, then
//! `apply` each event to the state.
//!
//! An [`Aggregate`] is its own state (a serializable type with a `Default`: the state
//! before the first event). It declares its commands and events as [`Messages`] enums (no
//! decode table) and the command field that names the instance. The runtime hosts it as a
//! component ([`Decider`]): it subscribes to the commands addressed to the context, loads
//! the instance (or its `Default`), decides, applies the events, stores the instance and
//! publishes the events, all in the command's transaction with its inbox mark, so a
//! redelivered command is not decided twice. `ContextBuilder::aggregate` also serves the
//! instance as a query named after the aggregate (`{"<ID field>": "..."}`).
//!
//! A command that can never succeed is a [`Rejection`]: dead-lettered with its reason.
//! A refusal the sender must hear about is an event, as in the shop's `PaymentDeclined`.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::component::{
    instance_id, Component, DecodeError, HandleCtx, HandleError, Messages, Outgoing, Subscription,
};
use crate::store::{load, save, StateTx};

/// A command refused, with the reason: for good (dead-lettered with it), or until its
/// prerequisite has happened (retried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    reason: String,
    later: bool,
}

impl Rejection {
    /// A command that can never succeed: dead-lettered with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Rejection {
            reason: reason.into(),
            later: false,
        }
    }

    /// A command whose prerequisite has not happened yet (a command for an instance whose
    /// first command is still on its way): redelivered with back-off, as after a failing
    /// handler, and dead-lettered with this reason once the retry budget is spent.
    pub fn not_yet(reason: impl Into<String>) -> Self {
        Rejection {
            reason: reason.into(),
            later: true,
        }
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Whether the command is tried again ([`Rejection::not_yet`]).
    pub fn is_later(&self) -> bool {
        self.later
    }
}

/// What a command comes to: the events it causes, or why it is refused.
pub type Decided<E> = Result<Vec<E>, Rejection>;

/// An aggregate: the consistency boundary one command is decided against, and its state.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Stable name: its component's and query's name and its instances' key prefix. Never
    /// rename.
    const NAME: &'static str;
    /// The command field (a string or a number) naming the instance a command is for.
    const ID: &'static str;
    /// The commands it decides, addressed to its context.
    type Command: Messages;
    /// The events it causes and its state follows.
    type Event: Messages;

    /// What happens: the events the command causes (none: nothing to do, e.g. a repeat).
    /// Pure and deterministic: it may run more than once on a conflict.
    fn decide(&self, command: &Self::Command, now_ms: u64) -> Decided<Self::Event>;

    /// The state after `event`.
    fn apply(&mut self, event: &Self::Event);

    /// Called once after a command's events are applied, with the command's `now`: where
    /// an aggregate records when it changed (the clock stays data, as in `decide`). Does
    /// nothing by default.
    fn stamp(&mut self, now_ms: u64) {
        let _ = now_ms;
    }
}

/// Where the state of the instance `id` is kept.
pub fn key<A: Aggregate>(id: &str) -> String {
    format!("{}/{id}", A::NAME)
}

/// A command for one instance of an aggregate.
pub struct Addressed<C> {
    /// The instance's id: the command's [`Aggregate::ID`] field.
    pub id: String,
    /// The decoded command.
    pub command: C,
}

/// An [`Aggregate`] hosted as a component of the context `context`.
pub struct Decider<A> {
    context: &'static str,
    aggregate: std::marker::PhantomData<fn() -> A>,
}

impl<A: Aggregate> Decider<A> {
    /// The aggregate `A` as a component of the context `context`.
    pub fn new(context: &'static str) -> Self {
        Decider {
            context,
            aggregate: std::marker::PhantomData,
        }
    }
}

impl<A: Aggregate> Component for Decider<A> {
    type Input = Addressed<A::Command>;

    fn name(&self) -> &'static str {
        A::NAME
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::commands(self.context, A::Command::TYPES)]
    }

    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Self::Input, DecodeError> {
        let command = A::Command::decode(msg_type, payload)?;
        let malformed = |error: String| DecodeError::Malformed {
            msg_type: msg_type.to_string(),
            error,
        };
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
        let id = instance_id(msg_type, &value, A::ID, A::NAME)?;
        Ok(Addressed { id, command })
    }

    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Self::Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        let key = key::<A>(&input.id);
        let mut state: A = load(tx, &key)?.unwrap_or_default();
        let events = state.decide(&input.command, ctx.now_ms).map_err(|r| {
            let reason = format!("{} {}: {r}", A::NAME, input.id);
            match r.is_later() {
                true => HandleError::Retry(reason),
                false => HandleError::Permanent(reason),
            }
        })?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        for e in &events {
            state.apply(e);
        }
        state.stamp(ctx.now_ms);
        save(tx, &key, &state)?;
        Ok(events.iter().map(Messages::outgoing).collect())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::store::{CommitError, DecideError, Effects, Store};
    use crate::wire::envelope::Envelope;

    #[derive(Serialize, Deserialize)]
    struct Deposit {
        account: u64,
        cents: u64,
    }
    crate::message!(Deposit, Command, "bank");
    #[derive(Serialize, Deserialize)]
    struct Close {
        account: u64,
    }
    crate::message!(Close, Command, "bank");
    #[derive(Serialize, Deserialize)]
    struct Deposited {
        account: u64,
        cents: u64,
    }
    crate::message!(Deposited, Event);
    #[derive(Serialize, Deserialize)]
    struct Closed {
        account: u64,
    }
    crate::message!(Closed, Event);
    crate::messages!(
        enum Cmd {
            Deposit,
            Close,
        }
    );
    crate::messages!(
        enum Evt {
            Deposited,
            Closed,
        }
    );

    #[derive(Default, Serialize, Deserialize)]
    struct Account {
        cents: u64,
        closed: bool,
        changed_at: u64,
    }

    impl Aggregate for Account {
        const NAME: &'static str = "account";
        const ID: &'static str = "account";
        type Command = Cmd;
        type Event = Evt;
        fn decide(&self, c: &Cmd, _: u64) -> Decided<Evt> {
            let b = self;
            match c {
                Cmd::Deposit(_) if b.closed => Err(Rejection::new("account closed")),
                Cmd::Deposit(d) => Ok(vec![Deposited {
                    account: d.account,
                    cents: d.cents,
                }
                .into()]),
                Cmd::Close(_) if b.closed => Ok(vec![]),
                Cmd::Close(_) if b.cents == 0 => Err(Rejection::not_yet("nothing deposited yet")),
                Cmd::Close(c) => Ok(vec![Closed { account: c.account }.into()]),
            }
        }
        fn apply(&mut self, e: &Evt) {
            match e {
                Evt::Deposited(d) => self.cents += d.cents,
                Evt::Closed(_) => self.closed = true,
            }
        }
        fn stamp(&mut self, now_ms: u64) {
            self.changed_at = now_ms;
        }
    }

    /// Handles one command in a transaction of its own; the messages it sends, or why not.
    fn run(
        store: &Store,
        d: &Decider<Account>,
        ty: &str,
        payload: &str,
    ) -> Result<Vec<Outgoing>, String> {
        let input = d.decode(ty, payload.as_bytes()).unwrap();
        let env = Envelope::first(crate::wire::envelope::new_id(), ty, "test", 0);
        let ctx = HandleCtx {
            envelope: &env,
            now_ms: 1_000 + payload.len() as u64,
            external: None,
        };
        let sent = std::cell::RefCell::new(Vec::new());
        store
            .commit(&env.id, 0, |tx| {
                *sent.borrow_mut() = d
                    .handle(tx, &input, &ctx)
                    .map_err(|e| DecideError::Handler(format!("{e:?}")))?;
                Ok(Effects::default())
            })
            .map_err(|e| match e {
                CommitError::Handler(e) => e,
                CommitError::Store(e) => e.to_string(),
            })?;
        Ok(sent.into_inner())
    }

    #[test]
    fn a_command_is_decided_applied_stored_and_its_events_sent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let d = Decider::<Account>::new("bank");
        let subs = d.subscriptions();
        assert_eq!(subs[0].source, "bank");
        assert_eq!(subs[0].types, ["Deposit", "Close"]);
        let sent = run(&store, &d, "Deposit", r#"{"account": 7, "cents": 250}"#).unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].msg_type, "Deposited");
        run(&store, &d, "Deposit", r#"{"account": 7, "cents": 50}"#).unwrap();
        let balance = || crate::store::read::<Account>(store.reader(), &key::<Account>("7"));
        assert_eq!(balance().unwrap().unwrap().cents, 300);
        assert_eq!(
            run(&store, &d, "Close", r#"{"account": 7}"#).unwrap().len(),
            1
        );
        assert!(run(&store, &d, "Close", r#"{"account": 7}"#)
            .unwrap()
            .is_empty());
        let refused = run(&store, &d, "Deposit", r#"{"account": 7, "cents": 1}"#);
        let refused = refused.unwrap_err();
        assert!(
            refused.contains("Permanent(\"account 7: account closed\")"),
            "{refused}"
        );
        let account = balance().unwrap().unwrap();
        // Stamped with the time of the last command that changed it (the Close).
        let closed_at = 1_000 + r#"{"account": 7}"#.len() as u64;
        assert_eq!((account.cents, account.changed_at), (300, closed_at));
    }

    #[test]
    fn a_command_refused_for_now_is_retried_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let d = Decider::<Account>::new("bank");
        let refused = run(&store, &d, "Close", r#"{"account": 8}"#).unwrap_err();
        assert!(
            refused.contains("Retry(\"account 8: nothing deposited yet\")"),
            "{refused}"
        );
        let stored = crate::store::read::<Account>(store.reader(), &key::<Account>("8"));
        assert!(stored.unwrap().is_none());
    }

    #[test]
    fn a_query_of_the_aggregates_name_answers_instead_of_it() {
        use crate::context::ContextBuilder;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mine = |_: &dyn crate::store::StateRead, _: &[u8]| Ok(serde_json::json!("mine"));
        let request = br#"{"account": "7"}"#;
        let plain = ContextBuilder::new("bank").aggregate::<Account>();
        let plain = plain.build().unwrap();
        assert_eq!(plain.query(&store, "account", request).unwrap()["cents"], 0);
        let after = ContextBuilder::new("bank")
            .aggregate::<Account>()
            .query("account", mine);
        let before = ContextBuilder::new("bank")
            .query("account", mine)
            .aggregate::<Account>();
        for built in [after, before] {
            let ctx = built.build().unwrap();
            assert_eq!(ctx.query(&store, "account", request).unwrap(), "mine");
        }
    }

    #[test]
    fn a_command_without_its_id_or_of_an_unknown_type_is_refused() {
        let d = Decider::<Account>::new("bank");
        let e = d.decode("Deposit", br#"{"cents": 1}"#).err().unwrap();
        assert!(e.to_string().contains("account"), "{e}");
        let e = d.decode("Withdraw", br#"{"account": 1}"#).err().unwrap();
        assert!(matches!(e, DecodeError::UnknownType(_)));
    }
}
