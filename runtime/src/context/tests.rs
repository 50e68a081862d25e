//! The context builder: queries, sagas, command routing and the checks at build time.

use super::*;
use crate::component::{DecodeError, HandleCtx, Kind, Subscription};
use crate::saga::testing::fixtures::Counter;

fn answer(_: &dyn StateRead, name: &str, _: &[u8]) -> Result<serde_json::Value, QueryError> {
    Ok(serde_json::json!(name))
}

#[test]
fn queries_answer_by_name_and_unknown_ones_are_refused() {
    let ctx = ContextBuilder::new("notes")
        .queries(&["one", "two"], answer)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(ctx.query(&store, "two", b"{}").unwrap(), "two");
    assert!(matches!(
        ctx.query(&store, "three", b"{}"),
        Err(QueryError::Unknown(q)) if q == "three"
    ));
}

#[test]
fn a_query_twice_is_refused() {
    let e = ContextBuilder::new("notes")
        .queries(&["one"], answer)
        .query("one", |_, _| Ok(serde_json::Value::Null))
        .build()
        .err();
    assert_eq!(
        e,
        Some(ContextError::DuplicateQuery {
            context: "notes",
            query: "one"
        })
    );
}

#[test]
fn a_saga_is_hosted_once_and_its_graph_is_checked() {
    let ends = Counter {
        name: "counter",
        ends: true,
        steps: false,
    };
    let ctx = ContextBuilder::new("c").saga(ends).build().unwrap();
    assert_eq!(ctx.sagas().len(), 1);
    assert_eq!(ctx.components().len(), 0);
    assert_eq!(ctx.message_handlers()[0].name(), "counter");
    let twice = ContextBuilder::new("c")
        .saga(Counter {
            name: "counter",
            ends: true,
            steps: false,
        })
        .saga(Counter {
            name: "counter",
            ends: true,
            steps: false,
        })
        .build();
    assert!(matches!(
        twice,
        Err(ContextError::DuplicateComponent { .. })
    ));
    // Its only state waits forever: no deadline, and no reason given.
    let waits = ContextBuilder::new("c").saga(Counter {
        name: "counter",
        ends: false,
        steps: false,
    });
    match waits.build() {
        Err(ContextError::Saga { saga, problems, .. }) => {
            assert_eq!(saga, "counter");
            assert!(problems.contains("Counting"), "{problems}");
        }
        other => panic!("expected a saga problem, got {:?}", other.map(|c| c.name())),
    }
}

mod two_aggregates {
    use serde::{Deserialize, Serialize};

    use crate::aggregate::{Aggregate, Decided};

    crate::messages! {
        pub(super) enum LendCmd: Command in "lib" { Lend { loan: String } }
    }
    crate::messages! {
        pub(super) enum JoinCmd: Command in "lib" { Join { member: String } }
    }
    crate::messages! {
        pub(super) enum LibEvt: Event in "lib" { Lent { loan: String }, Joined { member: String } }
    }

    #[derive(Default, Serialize, Deserialize)]
    pub(super) struct Loan(bool);
    impl Aggregate for Loan {
        const NAME: &'static str = "loan";
        const ID: &'static str = "loan";
        type Command = LendCmd;
        type Event = LibEvt;
        fn decide(&self, LendCmd::Lend(c): &LendCmd, _: u64) -> Decided<LibEvt> {
            Ok(vec![Lent {
                loan: c.loan.clone(),
            }
            .into()])
        }
        fn apply(&mut self, _: &LibEvt) {
            self.0 = true;
        }
    }

    #[derive(Default, Serialize, Deserialize)]
    pub(super) struct Member(bool);
    impl Aggregate for Member {
        const NAME: &'static str = "member";
        const ID: &'static str = "member";
        type Command = JoinCmd;
        type Event = LibEvt;
        fn decide(&self, JoinCmd::Join(c): &JoinCmd, _: u64) -> Decided<LibEvt> {
            Ok(vec![Joined {
                member: c.member.clone(),
            }
            .into()])
        }
        fn apply(&mut self, _: &LibEvt) {
            self.0 = true;
        }
    }

    /// A second handler of `Lend`.
    #[derive(Default, Serialize, Deserialize)]
    pub(super) struct Rival;
    impl Aggregate for Rival {
        const NAME: &'static str = "rival";
        const ID: &'static str = "loan";
        type Command = LendCmd;
        type Event = LibEvt;
        fn decide(&self, _: &LendCmd, _: u64) -> Decided<LibEvt> {
            Ok(vec![])
        }
        fn apply(&mut self, _: &LibEvt) {}
    }
}

#[test]
fn several_command_handlers_share_the_context_s_command_consumer() {
    use two_aggregates::{Loan, Member, Rival};
    let ctx = ContextBuilder::new("lib")
        .aggregate::<Loan>()
        .aggregate::<Member>()
        .build()
        .unwrap();
    let handlers = ctx.message_handlers();
    assert_eq!(handlers.len(), 1);
    let router = &handlers[0];
    assert_eq!(router.name(), COMMANDS);
    let subs = router.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].types, ["Join", "Lend"]);
    assert_eq!(subs[0].filter_subjects(), ["choreo.lib.cmd.>"]);
    assert_eq!(ctx.queries(), ["loan", "member"]);

    // Each command reaches the handler that declares it, in a real store.
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path(), 1 << 20).unwrap();
    for (ty, payload, sent) in [
        ("Lend", r#"{"loan": "l-1"}"#, "Lent"),
        ("Join", r#"{"member": "m-1"}"#, "Joined"),
    ] {
        let input = router.decode(ty, payload.as_bytes()).unwrap();
        let env = crate::Envelope::first(ty.to_lowercase(), ty, "test", 0);
        let ctx = HandleCtx {
            envelope: &env,
            now_ms: 0,
            external: None,
        };
        let decision = std::cell::RefCell::new(None);
        store
            .commit(&env.id, 0, |tx| {
                let d = router.handle(tx, &*input, &ctx).unwrap();
                *decision.borrow_mut() = Some(d.send[0].msg_type);
                Ok::<_, crate::store::DecideError<String>>(Default::default())
            })
            .unwrap();
        assert_eq!(decision.into_inner(), Some(sent));
    }
    let state = |q, req: &str| ctx.query(&store, q, req.as_bytes()).unwrap();
    assert_eq!(state("loan", r#"{"loan": "l-1"}"#), serde_json::json!(true));
    assert_eq!(
        state("member", r#"{"member": "m-1"}"#),
        serde_json::json!(true)
    );
    assert_eq!(
        state("member", r#"{"member": "m-2"}"#),
        serde_json::json!(false)
    );
    assert!(matches!(
        router.decode("Leave", b"{}"),
        Err(DecodeError::UnknownType(t)) if t == "Leave"
    ));

    let both = ContextBuilder::new("lib")
        .aggregate::<Loan>()
        .aggregate::<Rival>()
        .build();
    match both {
        Err(ContextError::Commands { problem, .. }) => {
            assert!(
                problem.contains("Lend is handled by both loan and rival"),
                "{problem}"
            )
        }
        other => panic!("expected a refusal, got {:?}", other.map(|c| c.name())),
    }
}

/// A component whose input is a `messages!` enum: subscriptions from the types' contexts.
mod policy {
    use std::marker::PhantomData;

    use serde::{Deserialize, Serialize};

    use crate::component::{Component, DecodeError, HandleCtx, HandleError, Messages};
    use crate::{Outgoing, StateTx, Subscription};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub(super) struct Lent {
        loan: String,
    }
    crate::message!(Lent, Event, "loans");
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub(super) struct Remind {
        loan: String,
    }
    crate::message!(Remind, Command, "desk");
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub(super) struct Returned {
        loan: String,
    }
    crate::message!(Returned, Event, "loans");
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub(super) struct Orphan {
        loan: String,
    }
    crate::message!(Orphan, Event);

    crate::messages! { pub(super) enum Good { Lent, Remind, Returned } }
    crate::messages! { pub(super) enum Bad { Lent, Orphan } }

    pub(super) struct Policy<E>(pub(super) PhantomData<E>);

    impl<E: Messages> Component for Policy<E> {
        type Input = E;
        fn name(&self) -> &'static str {
            "policy"
        }
        fn subscriptions(&self) -> Vec<Subscription> {
            Subscription::of::<E>()
        }
        fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<E, DecodeError> {
            E::decode(msg_type, payload)
        }
        fn handle(
            &self,
            _: &dyn StateTx,
            _: &E,
            _: &HandleCtx<'_>,
        ) -> Result<Vec<Outgoing>, HandleError> {
            Ok(vec![])
        }
    }
}

#[test]
fn a_messages_enum_gives_one_subscription_per_context_and_kind() {
    let subs = Subscription::of::<policy::Good>();
    let got: Vec<_> = subs
        .iter()
        .map(|s| (s.source, s.kind, s.types.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("loans", Kind::Event, vec!["Lent", "Returned"]),
            ("desk", Kind::Command, vec!["Remind"]),
        ]
    );
    let good = policy::Policy::<policy::Good>(std::marker::PhantomData);
    assert!(ContextBuilder::new("desk").component(good).build().is_ok());
    // A type declared without a context: no stream is known to read it from.
    let bad = policy::Policy::<policy::Bad>(std::marker::PhantomData);
    match ContextBuilder::new("desk").component(bad).build().err() {
        Some(e @ ContextError::NoSource { .. }) => {
            assert!(
                e.to_string().contains("component policy receives Orphan"),
                "{e}"
            )
        }
        other => panic!("expected NoSource, got {other:?}"),
    }
}

#[test]
fn an_invariant_is_a_query_that_reports_each_violation() {
    let ctx = ContextBuilder::new("counts")
        .invariant("even", |state| {
            let mut c = Check::default();
            for (key, value) in state.scan_prefix("n/")? {
                c.checked += 1;
                let n: u64 = serde_json::from_slice(&value).unwrap_or(1);
                if n % 2 == 1 {
                    c.violations.push(format!("{key} is {n}, odd"));
                }
            }
            Ok(c)
        })
        .build()
        .unwrap();
    assert_eq!(ctx.queries(), ["invariant-even"]);
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path(), 1 << 20).unwrap();
    let write = |key: &str, n: u64| {
        store
            .commit::<String, _>(key, 1, |tx| {
                crate::store::save(tx, key, &n).map_err(crate::store::testing::state_err)?;
                Ok(crate::store::Effects::default())
            })
            .unwrap();
    };
    write("n/a", 2);
    write("n/b", 4);
    let answer = |store: &crate::store::Store| -> Check {
        serde_json::from_value(ctx.query(store.reader(), "invariant-even", b"{}").unwrap()).unwrap()
    };
    assert_eq!(
        answer(&store),
        Check {
            checked: 2,
            violations: vec![]
        }
    );
    write("n/c", 3);
    assert_eq!(answer(&store).violations, ["n/c is 3, odd"]);
}
