//! The builder's rules, graph and checks.

use super::*;
use crate::saga::testing::Scenario;
use crate::saga::Deadline;
use crate::Outgoing;

#[derive(Serialize, Deserialize)]
struct Opened {
    ticket: String,
    due_at_ms: u64,
}
crate::message!(Opened, Event, "desk");
#[derive(Serialize, Deserialize)]
struct Closed {
    ticket: u64,
}
crate::message!(Closed, Event, "desk");
#[derive(Serialize, Deserialize)]
struct Escalate {
    ticket: String,
}
crate::message!(Escalate, Command, "desk");

fn ticket() -> Saga<String> {
    Saga::new("ticket")
        .correlated_by("ticket")
        .starts_with("Open", |o: &Opened, _| {
            Step::to(o.ticket.clone()).set(Deadline::at("answer", o.due_at_ms))
        })
        .on("Open", "Closed", |t: &String, _: &Closed, _| {
            Step::to(t.clone())
        })
        .on_deadline("Open", "answer", "Escalated", |t, _| {
            Step::to(t.clone()).send(Outgoing::command("desk", &Escalate { ticket: t.clone() }))
        })
        .on("Escalated", "Closed", |t: &String, _: &Closed, _| {
            Step::to(t.clone())
        })
        .waits("Escalated", "a person answers")
        .terminal("Closed")
}

#[test]
fn the_graph_is_derived_from_the_rules() {
    let saga = ticket();
    assert!(saga.problems().is_empty(), "{:?}", saga.problems());
    let def = saga.definition();
    assert_eq!(def.initial, "Open");
    assert_eq!(def.state("Open").unwrap().deadline, Some("answer"));
    assert!(def.is_terminal("Closed"));
    assert!(def.allows("Open", "deadline:answer", "Escalated"));
    assert!(!def.allows("Open", "Closed", "Escalated"));
    let subs = saga.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!((subs[0].source, subs[0].kind), ("desk", Kind::Event));
    assert_eq!(subs[0].types, ["Opened", "Closed"]);
}

#[test]
fn a_waiting_state_without_deadline_or_reason_is_a_problem() {
    let saga = |waits: bool| {
        let saga = Saga::<String>::new("ticket")
            .correlated_by("ticket")
            .starts_with("Open", |o: &Opened, _| Step::to(o.ticket.clone()))
            .on("Open", "Closed", |t: &String, _: &Closed, _| {
                Step::to(t.clone())
            })
            .terminal("Closed");
        if waits {
            saga.waits("Open", "a person answers")
        } else {
            saga
        }
    };
    let problems = saga(false).problems().join("; ");
    assert!(
        problems.contains("state Open has no deadline"),
        "{problems}"
    );
    assert!(saga(true).problems().is_empty());
}

#[test]
fn a_message_without_a_context_is_a_problem() {
    #[derive(Serialize, Deserialize)]
    struct Loose {
        id: String,
    }
    crate::message!(Loose, Event);
    let saga = Saga::<String>::new("loose")
        .starts_with("Done", |l: &Loose, _| Step::to(l.id.clone()))
        .terminal("Done");
    let problems = saga.problems().join("; ");
    assert!(
        problems.contains("message Loose names no context"),
        "{problems}"
    );
}

#[test]
fn messages_name_their_instance_by_the_declared_field() {
    let saga = ticket();
    let m = saga.decode("Closed", br#"{"ticket": 42}"#).unwrap();
    assert_eq!(saga.correlate(&m), "42");
    let e = saga.decode("Opened", br#"{"due_at_ms": 1}"#).err().unwrap();
    assert!(e.to_string().contains("\"ticket\""), "{e}");
    let e = saga.decode("Nope", b"{}").err().unwrap();
    assert!(matches!(e, DecodeError::UnknownType(_)));
}

#[test]
fn rules_drive_the_instance_and_deadlines_fire() {
    let saga = ticket();
    let opened = Opened {
        ticket: "t-1".into(),
        due_at_ms: 100,
    };
    let s = Scenario::new(&saga).receive(opened).advance(100);
    assert_eq!(s.status(), "Escalated");
    assert_eq!(s.sent, ["Escalate"]);
    let s = s.receive(Closed { ticket: 1 });
    assert_eq!(s.status(), "Closed");
    assert!(s.deadlines.is_empty());
}

#[test]
fn a_message_before_the_start_is_retried_and_a_late_one_changes_nothing() {
    let saga = ticket();
    let closed = saga.message(Closed { ticket: 1 }).unwrap();
    assert!(matches!(
        saga.transition(None, Trigger::Message(&closed), 0),
        Err(HandleError::Retry(_))
    ));
    let done = Tracked {
        status: "Closed".to_string(),
        data: "t".to_string(),
    };
    assert!(saga
        .transition(Some(&done), Trigger::Message(&closed), 0)
        .unwrap()
        .is_none());
}

#[test]
fn leaving_a_state_cancels_the_deadline_it_waits_on() {
    let saga = Saga::<String>::new("ticket")
        .correlated_by("ticket")
        .starts_with("Open", |o: &Opened, _| {
            Step::to(o.ticket.clone()).set(Deadline::at("answer", o.due_at_ms))
        })
        .on_deadline("Open", "answer", "Closed", |t, _| Step::to(t.clone()))
        .on("Open", "Waiting", |t: &String, _: &Closed, _| {
            Step::to(t.clone())
        })
        .on("Waiting", "Closed", |t: &String, _: &Opened, _| {
            Step::to(t.clone())
        })
        .waits("Waiting", "someone reopens it")
        .terminal("Closed");
    assert!(saga.problems().is_empty(), "{:?}", saga.problems());
    let opened = Opened {
        ticket: "t".into(),
        due_at_ms: 100,
    };
    let s = Scenario::new(&saga).receive(opened);
    assert_eq!(s.deadlines.len(), 1);
    let s = s.receive(Closed { ticket: 0 });
    assert_eq!(s.status(), "Waiting");
    assert!(s.deadlines.is_empty(), "{:?}", s.deadlines);
    assert_eq!(s.advance(1_000).status(), "Waiting");
}

/// The deadline resends twice (back to Open), then escalates: one trigger, two targets,
/// the first guarded.
fn resending() -> Saga<u64> {
    Saga::new("resending")
        .correlated_by("ticket")
        .starts_with("Open", |o: &Opened, _| {
            Step::to(0).set(Deadline::at("answer", o.due_at_ms))
        })
        .on_deadline("Open", "answer", "Open", |n, now| {
            Step::to(n + 1).set(Deadline::at("answer", now + 100))
        })
        .when(|n| *n < 2)
        .on_deadline("Open", "answer", "Escalated", |n, _| Step::to(*n))
        .on("Open", "Closed", |n: &u64, _: &Closed, _| Step::to(*n))
        .on("Escalated", "Closed", |n: &u64, _: &Closed, _| Step::to(*n))
        .waits("Escalated", "a person answers")
        .terminal("Closed")
}

#[test]
fn a_guard_chooses_among_the_rules_of_one_trigger() {
    let saga = resending();
    assert!(saga.problems().is_empty(), "{:?}", saga.problems());
    let def = saga.definition();
    assert!(def.allows("Open", "deadline:answer", "Open"));
    assert!(def.allows("Open", "deadline:answer", "Escalated"));
    let opened = Opened {
        ticket: "t".into(),
        due_at_ms: 100,
    };
    let s = Scenario::new(&saga).receive(opened).advance(100);
    assert_eq!((s.status(), s.state.as_ref().unwrap().data), ("Open", 1));
    let s = s.advance(100);
    assert_eq!((s.status(), s.state.as_ref().unwrap().data), ("Open", 2));
    let s = s.advance(100);
    assert_eq!(
        (s.status(), s.state.as_ref().unwrap().data),
        ("Escalated", 2)
    );
    assert!(s.deadlines.is_empty(), "{:?}", s.deadlines);
}

#[test]
fn a_trigger_whose_guards_all_fail_changes_nothing() {
    let saga = Saga::<u64>::new("guarded")
        .correlated_by("ticket")
        .starts_with("Open", |_: &Opened, _| Step::to(0))
        .on("Open", "Closed", |n: &u64, _: &Closed, _| Step::to(*n))
        .when(|n| *n > 0)
        .waits("Open", "closed only once reopened")
        .terminal("Closed");
    assert!(saga.problems().is_empty(), "{:?}", saga.problems());
    let opened = Opened {
        ticket: "t".into(),
        due_at_ms: 0,
    };
    let s = Scenario::new(&saga)
        .receive(opened)
        .receive(Closed { ticket: 0 });
    assert_eq!(s.status(), "Open");
}

#[test]
fn an_unguarded_rule_before_another_for_its_trigger_is_a_problem() {
    let shadowing = Saga::<u64>::new("shadowing")
        .correlated_by("ticket")
        .starts_with("Open", |_: &Opened, _| Step::to(0))
        .on("Open", "Closed", |n: &u64, _: &Closed, _| Step::to(*n))
        .on("Open", "Open", |n: &u64, _: &Closed, _| Step::to(*n))
        .when(|n| *n > 0)
        .terminal("Closed");
    let problems = shadowing.problems().join("; ");
    assert!(
        problems.contains("two rules for the same trigger in state Open"),
        "{problems}"
    );
    let guarded_start = Saga::<u64>::new("start")
        .when(|_| true)
        .starts_with("Open", |_: &Opened, _| Step::to(0))
        .when(|_| true)
        .on("Open", "Closed", |n: &u64, _: &Closed, _| Step::to(*n))
        .terminal("Closed");
    let problems = guarded_start.problems().join("; ");
    assert!(problems.contains("a start rule has a guard"), "{problems}");
    assert!(problems.contains("when before any rule"), "{problems}");
}

#[test]
fn a_retry_no_rule_takes_is_refused_with_the_states_that_retry() {
    let opened = Opened {
        ticket: "t1".into(),
        due_at_ms: 10,
    };
    // No retry rule at all.
    let err = Scenario::new(&ticket())
        .receive(opened)
        .retry()
        .err()
        .expect("refused");
    assert!(
        format!("{err:?}").contains("saga ticket has no retry"),
        "{err:?}"
    );
    // A retry rule elsewhere: named.
    let saga = ticket().on_retry("Escalated", "Open", |t, now| {
        Step::to(t.clone()).set(Deadline::after("answer", now, 10))
    });
    let sc = Scenario::new(&saga).receive(Opened {
        ticket: "t1".into(),
        due_at_ms: 10,
    });
    let err = sc.retry().err().expect("refused in Open");
    assert!(
        format!("{err:?}").contains("no retry from Open")
            && format!("{err:?}").contains("Escalated"),
        "{err:?}"
    );
    let sc = Scenario::new(&saga)
        .receive(Opened {
            ticket: "t1".into(),
            due_at_ms: 10,
        })
        .advance(10);
    assert_eq!(sc.status(), "Escalated");
    assert_eq!(sc.retry().expect("taken").status(), "Open");
}

#[test]
fn the_drawn_graph_has_one_edge_per_pair_of_states_and_no_loops() {
    let saga = resending().on("Open", "Closed", |n: &u64, _: &Opened, _| Step::to(*n));
    assert!(saga.problems().is_empty(), "{:?}", saga.problems());
    let m = saga.definition().mermaid();
    assert!(m.contains("    Open --> Closed: Closed|Opened\n"), "{m}");
    assert!(
        m.contains("    Open --> Escalated: deadline:answer\n"),
        "{m}"
    );
    assert!(!m.contains("Open --> Open"), "{m}");
    let dot = saga.definition().dot();
    assert!(
        dot.contains("Open -> Closed [label=\"Closed|Opened\"]"),
        "{dot}"
    );
    assert!(!dot.contains("Open -> Open"), "{dot}");
}
