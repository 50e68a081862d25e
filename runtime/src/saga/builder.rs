//! Sagas declared once: [`Saga`] is a builder whose rules are the graph.
//!
//! Each rule names the state it applies in, what moves the instance (a message type, a
//! deadline or an operator retry) and the state it enters, plus a pure function from the
//! instance's data (and the message) to the [`Step`]. The declared graph, its checks (every
//! waiting state has a deadline or a reason, every state is reached and left), the
//! subscriptions, the decoding and `choreo saga graph` all come from those rules, so the
//! graph cannot drift from the code: a transition that is not a rule cannot be taken.
//!
//! A deadline belongs to the state whose `on_deadline` rule names it: the step entering
//! the state sets it (the builder cannot know when it is due), and leaving the state
//! cancels it, as entering a terminal state cancels them all.
//!
//! One trigger may move an instance from one state to one of several states: each rule but
//! the last carries a guard on the instance's data (`when`), and the first rule whose guard
//! holds is taken, as a state machine's guarded transitions (MassTransit's `If`/`IfElse`
//! inside a `When`). Every target is an edge of the graph.
//!
//! Messages name their instance by one field (`correlated_by`), as NServiceBus maps a saga
//! to a message property. A message of a known type that no rule takes in the instance's
//! state changes nothing (a repeat or a late message); one that would move an instance that
//! has not started yet is retried later (it overtook the message that starts it).

use std::any::Any;
use std::sync::OnceLock;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Definition, ProcessManager, StateDef, Step, TransitionDef, Trigger};
use crate::component::{instance_id, DecodeError, HandleError, Kind, Message, Subscription};

/// A saga instance's data with the name of the state it is in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tracked<D> {
    /// The name of the state in the declared graph.
    pub status: String,
    /// The data the saga's rules read and return.
    pub data: D,
}

/// A message a [`Saga`] received: its type, the instance it names and its decoded body.
pub struct SagaMessage {
    msg_type: &'static str,
    id: String,
    body: Box<dyn Any + Send + Sync>,
}

impl SagaMessage {
    /// The instance this message is for.
    pub fn id(&self) -> &str {
        &self.id
    }
}

type Run<D> = Box<dyn Fn(Option<&D>, &(dyn Any + Send + Sync), u64) -> Step<D> + Send + Sync>;
type Guard<D> = Box<dyn Fn(&D) -> bool + Send + Sync>;
type Decode = fn(serde_json::Value) -> Result<Box<dyn Any + Send + Sync>, serde_json::Error>;

enum On {
    Message(&'static str),
    Deadline(&'static str),
    Retry,
}

struct Rule<D> {
    /// `None`: the rule starts an instance.
    from: Option<&'static str>,
    on: On,
    to: &'static str,
    run: Run<D>,
    /// `None`: taken whenever its trigger comes in its state (unless an earlier rule is).
    guard: Option<Guard<D>>,
}

struct Input {
    msg_type: &'static str,
    kind: Kind,
    source: &'static str,
    decode: Decode,
}

/// A saga declared by its rules. Register it with `ContextBuilder::saga`.
///
/// ```
/// use runtime::saga::{Deadline, Saga, Step};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Serialize, Deserialize)] struct BookLent { loan: String, due_at_ms: u64 }
/// # runtime::message!(BookLent, Event, "loans");
/// # #[derive(Serialize, Deserialize)] struct BookReturned { loan: String }
/// # runtime::message!(BookReturned, Event, "loans");
/// #[derive(Clone, Serialize, Deserialize)]
/// struct Loan { loan: String }
///
/// let saga = Saga::new("loan")
///     .correlated_by("loan")
///     .starts_with("Lent", |lent: &BookLent, _now| {
///         Step::to(Loan { loan: lent.loan.clone() }).set(Deadline::at("due", lent.due_at_ms))
///     })
///     .on("Lent", "Returned", |loan: &Loan, _: &BookReturned, _now| Step::to(loan.clone()))
///     .on_deadline("Lent", "due", "Overdue", |loan, _now| Step::to(loan.clone()))
///     .terminal("Returned")
///     .terminal("Overdue");
/// assert!(runtime::saga::ProcessManager::problems(&saga).is_empty());
/// assert_eq!(
///     runtime::saga::ProcessManager::definition(&saga).state("Lent").unwrap().deadline,
///     Some("due")
/// );
/// ```
pub struct Saga<D> {
    name: &'static str,
    field: &'static str,
    inputs: Vec<Input>,
    rules: Vec<Rule<D>>,
    terminal: Vec<&'static str>,
    waits: Vec<(&'static str, &'static str)>,
    /// `when` called before any rule: reported by `problems`.
    stray_guard: bool,
    definition: OnceLock<Definition>,
}

impl<D> Saga<D>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// A saga named `name` (stable: part of keys, subjects and durable names). Its
    /// messages name their instance in the field `id` unless `correlated_by` says otherwise.
    pub fn new(name: &'static str) -> Self {
        Saga {
            name,
            field: "id",
            inputs: Vec::new(),
            rules: Vec::new(),
            terminal: Vec::new(),
            waits: Vec::new(),
            stray_guard: false,
            definition: OnceLock::new(),
        }
    }

    /// The message field that names the instance (a string or a number).
    pub fn correlated_by(mut self, field: &'static str) -> Self {
        self.field = field;
        self
    }

    /// `M` starts an instance in state `to`.
    pub fn starts_with<M>(
        mut self,
        to: &'static str,
        step: impl Fn(&M, u64) -> Step<D> + Send + Sync + 'static,
    ) -> Self
    where
        M: Message + Send + Sync + 'static,
    {
        self.input::<M>();
        self.rules.push(Rule {
            from: None,
            on: On::Message(M::TYPE),
            to,
            guard: None,
            run: Box::new(move |_, body, now| step(body.downcast_ref().expect("decoded"), now)),
        });
        self
    }

    /// In state `from`, `M` moves the instance to `to`.
    pub fn on<M>(
        mut self,
        from: &'static str,
        to: &'static str,
        step: impl Fn(&D, &M, u64) -> Step<D> + Send + Sync + 'static,
    ) -> Self
    where
        M: Message + Send + Sync + 'static,
    {
        self.input::<M>();
        self.rules.push(Rule {
            from: Some(from),
            on: On::Message(M::TYPE),
            to,
            guard: None,
            run: Box::new(move |data, body, now| {
                step(
                    data.expect("running"),
                    body.downcast_ref().expect("decoded"),
                    now,
                )
            }),
        });
        self
    }

    /// In state `from`, the deadline `name` coming due moves the instance to `to`. It is
    /// the deadline `from` waits on; the step entering `from` sets it.
    pub fn on_deadline(
        mut self,
        from: &'static str,
        name: &'static str,
        to: &'static str,
        step: impl Fn(&D, u64) -> Step<D> + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Rule {
            from: Some(from),
            on: On::Deadline(name),
            to,
            guard: None,
            run: Box::new(move |data, _, now| step(data.expect("running"), now)),
        });
        self
    }

    /// In state `from`, an operator retry (`choreo saga retry`) moves the instance to `to`.
    pub fn on_retry(
        mut self,
        from: &'static str,
        to: &'static str,
        step: impl Fn(&D, u64) -> Step<D> + Send + Sync + 'static,
    ) -> Self {
        self.rules.push(Rule {
            from: Some(from),
            on: On::Retry,
            to,
            guard: None,
            run: Box::new(move |data, _, now| step(data.expect("running"), now)),
        });
        self
    }

    /// Guards the rule declared just before: it is taken only when `guard` holds for the
    /// instance's data (before the rule's step runs); otherwise the next rule for the same
    /// trigger in the same state is tried, in the order declared, and with none left the
    /// trigger changes nothing. A start rule has no data to guard (a problem).
    pub fn when(mut self, guard: impl Fn(&D) -> bool + Send + Sync + 'static) -> Self {
        match self.rules.last_mut() {
            Some(rule) => rule.guard = Some(Box::new(guard)),
            None => self.stray_guard = true,
        }
        self
    }

    /// `state` ends the instance (its deadlines are cancelled on entry).
    pub fn terminal(mut self, state: &'static str) -> Self {
        self.terminal.push(state);
        self
    }

    /// `state` waits without a deadline on purpose, for `reason`.
    pub fn waits(mut self, state: &'static str, reason: &'static str) -> Self {
        self.waits.push((state, reason));
        self
    }

    /// A typed message as this saga receives it (for tests: the runtime decodes them).
    pub fn message<M: Message + Send + Sync + 'static>(
        &self,
        m: M,
    ) -> Result<SagaMessage, DecodeError> {
        let value = serde_json::to_value(&m).map_err(|e| malformed(M::TYPE, e))?;
        Ok(SagaMessage {
            msg_type: M::TYPE,
            id: instance_id(M::TYPE, &value, self.field, "saga instance")?,
            body: Box::new(m),
        })
    }

    fn input<M: Message + Send + Sync + 'static>(&mut self) {
        if self.inputs.iter().any(|i| i.msg_type == M::TYPE) {
            return;
        }
        self.inputs.push(Input {
            msg_type: M::TYPE,
            kind: M::KIND,
            source: M::CONTEXT,
            decode: |v| Ok(Box::new(serde_json::from_value::<M>(v)?)),
        });
    }

    /// The first rule for this trigger in state `from` whose guard (if any) holds for `data`.
    fn rule(
        &self,
        from: Option<&str>,
        data: Option<&D>,
        matches: impl Fn(&On) -> bool,
    ) -> Option<&Rule<D>> {
        self.rules.iter().find(|r| {
            let open = match (&r.guard, data) {
                (None, _) => true,
                (Some(guard), Some(data)) => guard(data),
                (Some(_), None) => false,
            };
            r.from == from && matches(&r.on) && open
        })
    }

    /// Why an operator retry in state `from` is refused: no retry rule takes it.
    fn no_retry(&self, from: Option<&str>) -> String {
        let mut states: Vec<&str> = Vec::new();
        for r in &self.rules {
            if let (On::Retry, Some(f)) = (&r.on, r.from) {
                if !states.contains(&f) {
                    states.push(f);
                }
            }
        }
        let from = from.unwrap_or("(none)");
        match states.as_slice() {
            [] => format!("saga {} has no retry (instance in {from})", self.name),
            _ => format!(
                "no retry from {from}: saga {} retries only in {}",
                self.name,
                states.join(", ")
            ),
        }
    }

    fn derive(&self) -> Definition {
        let mut names: Vec<&'static str> = Vec::new();
        let mut add = |s: &'static str| {
            if !names.contains(&s) {
                names.push(s);
            }
        };
        for r in &self.rules {
            r.from.into_iter().for_each(&mut add);
            add(r.to);
        }
        self.terminal.iter().copied().for_each(&mut add);
        self.waits.iter().map(|w| w.0).for_each(&mut add);
        let states = names
            .iter()
            .map(|&name| StateDef {
                name,
                terminal: self.terminal.contains(&name),
                deadline: self.rules.iter().find_map(|r| match r.on {
                    On::Deadline(d) if r.from == Some(name) => Some(d),
                    _ => None,
                }),
                waits_without_deadline: self.waits.iter().find(|w| w.0 == name).map(|w| w.1),
            })
            .collect();
        let initial = self
            .rules
            .iter()
            .find(|r| r.from.is_none())
            .map_or("(none)", |r| r.to);
        let transitions = self
            .rules
            .iter()
            .filter_map(|r| {
                let from = r.from?;
                let on = match r.on {
                    On::Message(t) => t,
                    // Leaked once per rule: the definition is built once and kept.
                    On::Deadline(d) => Box::leak(format!("deadline:{d}").into_boxed_str()),
                    On::Retry => "retry",
                };
                Some(TransitionDef { from, on, to: r.to })
            })
            .collect();
        Definition {
            name: self.name,
            initial,
            states,
            transitions,
        }
    }
}

impl<D> ProcessManager for Saga<D>
where
    D: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    type State = Tracked<D>;
    type Input = SagaMessage;

    fn name(&self) -> &'static str {
        self.name
    }

    fn subscriptions(&self) -> Vec<Subscription> {
        Subscription::grouped(self.inputs.iter().map(|i| (i.source, i.kind, i.msg_type)))
    }

    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<SagaMessage, DecodeError> {
        let input = self
            .inputs
            .iter()
            .find(|i| i.msg_type == msg_type)
            .ok_or_else(|| DecodeError::UnknownType(msg_type.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| malformed(input.msg_type, e))?;
        let id = instance_id(input.msg_type, &value, self.field, "saga instance")?;
        Ok(SagaMessage {
            msg_type: input.msg_type,
            id,
            body: (input.decode)(value).map_err(|e| malformed(input.msg_type, e))?,
        })
    }

    fn correlate(&self, input: &SagaMessage) -> String {
        input.id.clone()
    }

    fn transition(
        &self,
        state: Option<&Tracked<D>>,
        trigger: Trigger<'_, SagaMessage>,
        now_ms: u64,
    ) -> Result<Option<Step<Tracked<D>>>, HandleError> {
        let from = state.map(|s| s.status.as_str());
        let data = state.map(|s| &s.data);
        let (rule, body): (_, &(dyn Any + Send + Sync)) = match trigger {
            Trigger::Message(m) => {
                let message = |on: &On| matches!(on, On::Message(t) if *t == m.msg_type);
                let rule = self.rule(from, data, message);
                if rule.is_none() && state.is_none() {
                    return Err(HandleError::Retry(format!(
                        "saga {} instance {}: {} before the instance started",
                        self.name, m.id, m.msg_type
                    )));
                }
                (rule, m.body.as_ref())
            }
            Trigger::Deadline(name) => (
                self.rule(from, data, |on| matches!(on, On::Deadline(d) if *d == name)),
                &(),
            ),
            Trigger::Retry => {
                let rule = self.rule(from, data, |on| matches!(on, On::Retry));
                if rule.is_none() {
                    return Err(HandleError::Permanent(self.no_retry(from)));
                }
                (rule, &())
            }
        };
        let Some(rule) = rule else {
            return Ok(None);
        };
        let step = (rule.run)(data, body, now_ms);
        let mut cancel = step.cancel;
        // Leaving a state cancels the deadlines it waits on.
        if let Some(from) = rule.from.filter(|f| *f != rule.to) {
            for r in &self.rules {
                if let (Some(f), On::Deadline(d)) = (r.from, &r.on) {
                    if f == from && !cancel.iter().any(|c| c == d) {
                        cancel.push(d.to_string());
                    }
                }
            }
        }
        Ok(Some(Step {
            state: Tracked {
                status: rule.to.to_string(),
                data: step.state,
            },
            send: step.send,
            set: step.set,
            cancel,
        }))
    }

    fn state_name(&self, state: &Tracked<D>) -> &'static str {
        self.definition
            .get_or_init(|| self.derive())
            .states
            .iter()
            .find(|s| s.name == state.status)
            .map_or("(unknown)", |s| s.name)
    }

    fn definition(&self) -> Definition {
        self.definition.get_or_init(|| self.derive()).clone()
    }

    fn problems(&self) -> Vec<String> {
        let mut p = self.definition().problems();
        for i in &self.inputs {
            if i.source.is_empty() {
                p.push(format!(
                    "message {0} names no context: declare it with \
                     runtime::message!({0}, {1:?}, \"<context>\")",
                    i.msg_type, i.kind
                ));
            }
        }
        let starts: Vec<_> = self.rules.iter().filter(|r| r.from.is_none()).collect();
        if starts.is_empty() {
            p.push("no message starts an instance (add starts_with)".into());
        }
        if starts.iter().any(|r| r.to != starts[0].to) {
            p.push("the messages that start an instance enter different states".into());
        }
        for (i, r) in self.rules.iter().enumerate() {
            let same = |o: &Rule<D>| {
                o.from == r.from
                    && match (&o.on, &r.on) {
                        (On::Message(a), On::Message(b)) | (On::Deadline(a), On::Deadline(b)) => {
                            a == b
                        }
                        (On::Retry, On::Retry) => true,
                        _ => false,
                    }
            };
            // An earlier rule without a guard for the same trigger is always taken first.
            if self.rules[..i].iter().any(|o| same(o) && o.guard.is_none()) {
                p.push(format!(
                    "two rules for the same trigger in state {} (guard the earlier with when)",
                    r.from.unwrap_or("(start)")
                ));
            }
            if r.from.is_none() && r.guard.is_some() {
                p.push("a start rule has a guard (there is no data to guard yet)".into());
            }
        }
        if self.stray_guard {
            p.push("when before any rule (it guards the rule declared just before it)".into());
        }
        p
    }
}

fn malformed(msg_type: &str, e: serde_json::Error) -> DecodeError {
    DecodeError::Malformed {
        msg_type: msg_type.to_string(),
        error: e.to_string(),
    }
}

#[cfg(test)]
mod tests;
