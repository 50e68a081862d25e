//! Process managers (sagas) as a runtime capability.
//!
//! A saga is a pure state machine: `transition(state, trigger, now) -> Step` where the step
//! holds the new state, the messages to send, and the deadlines to set or cancel. The runtime:
//! - correlates each input to an instance (`correlate`) and persists the instance (state,
//!   version, deadlines, history) under `saga/<name>/<id>` in the same transaction as the
//!   outbox entries and the inbox mark;
//! - keeps deadlines in sled under a time-ordered index `deadline/<at_ms>/<saga>/<id>/<name>`
//!   and fires them from a timer through the same transactional path, after restarts too
//!   (late ones fire at once; lateness is measured);
//! - serves inspection and operator commands on `choreo.saga.<name>.<op>` (`list`, `show`,
//!   `stuck`, `retry`).
//!
//! Concurrency: each transition re-reads the instance inside the sled transaction and writes
//! `version + 1`; sled's conflict detection makes two racing deliveries on one instance
//! serialize (one re-runs and sees the other's version), so both cannot win.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::component::{Component, DecodeError, HandleCtx, HandleError, Outgoing, Subscription};
use crate::store::{load, save, StateRead, StateTx};

/// Instances are kept at most this many history entries (oldest dropped first).
pub const HISTORY_LIMIT: usize = 200;

/// A deadline to set (or move) on the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    pub name: String,
    pub at_ms: u64,
}

impl Deadline {
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
    pub state: S,
    pub send: Vec<Outgoing>,
    /// Deadlines to set; one with the name of an existing deadline replaces it.
    pub set: Vec<Deadline>,
    /// Deadlines to cancel by name. Entering a terminal state cancels all of them.
    pub cancel: Vec<String>,
}

impl<S> Step<S> {
    pub fn to(state: S) -> Self {
        Step {
            state,
            send: vec![],
            set: vec![],
            cancel: vec![],
        }
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

/// A state of the declared graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateDef {
    pub name: &'static str,
    pub terminal: bool,
    /// The deadline held while in this state.
    pub deadline: Option<&'static str>,
    /// Why this non-terminal state waits without a deadline, on purpose.
    pub waits_without_deadline: Option<&'static str>,
}

/// An edge of the declared graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransitionDef {
    pub from: &'static str,
    pub on: &'static str,
    pub to: &'static str,
}

/// The declared states and transitions of a saga, for graphs and checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Definition {
    pub name: &'static str,
    pub initial: &'static str,
    pub states: Vec<StateDef>,
    pub transitions: Vec<TransitionDef>,
}

impl Definition {
    pub fn state(&self, name: &str) -> Option<&StateDef> {
        self.states.iter().find(|s| s.name == name)
    }

    pub fn is_terminal(&self, name: &str) -> bool {
        self.state(name).is_some_and(|s| s.terminal)
    }

    /// True if `from --on--> to` is a declared edge.
    pub fn allows(&self, from: &str, on: &str, to: &str) -> bool {
        from == to
            || self
                .transitions
                .iter()
                .any(|t| t.from == from && t.to == to && t.on.split('|').any(|o| o == on))
    }

    /// Problems with the declaration: undeclared states in edges, a non-terminal state with
    /// neither a deadline nor a reason to wait without one, a state nothing reaches.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for t in &self.transitions {
            for s in [t.from, t.to] {
                if self.state(s).is_none() {
                    p.push(format!(
                        "transition {} -{}-> {} names undeclared state {s}",
                        t.from, t.on, t.to
                    ));
                }
            }
        }
        for s in &self.states {
            if !s.terminal && s.deadline.is_none() && s.waits_without_deadline.is_none() {
                p.push(format!(
                    "state {} has no deadline and is not marked as waiting without one",
                    s.name
                ));
            }
            if s.name != self.initial && !self.transitions.iter().any(|t| t.to == s.name) {
                p.push(format!("state {} is never reached", s.name));
            }
            if !s.terminal && !self.transitions.iter().any(|t| t.from == s.name) {
                p.push(format!("non-terminal state {} has no way out", s.name));
            }
        }
        p
    }

    /// The graph as a Mermaid state diagram.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("stateDiagram-v2\n");
        out.push_str(&format!("    [*] --> {}\n", self.initial));
        for t in &self.transitions {
            out.push_str(&format!("    {} --> {}: {}\n", t.from, t.to, t.on));
        }
        for s in &self.states {
            if s.terminal {
                out.push_str(&format!("    {} --> [*]\n", s.name));
            } else if let Some(d) = s.deadline {
                out.push_str(&format!("    note right of {}: deadline {d}\n", s.name));
            } else if let Some(w) = s.waits_without_deadline {
                out.push_str(&format!(
                    "    note right of {}: no deadline ({w})\n",
                    s.name
                ));
            }
        }
        out
    }

    /// The graph in Graphviz DOT.
    pub fn dot(&self) -> String {
        let mut out = format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  start [shape=point];\n  start -> {};\n",
            self.name, self.initial
        );
        for s in &self.states {
            let shape = if s.terminal { "doublecircle" } else { "box" };
            let label = match s.deadline {
                Some(d) => format!("{}\\n(deadline {d})", s.name),
                None => s.name.to_string(),
            };
            out.push_str(&format!(
                "  {} [shape={shape}, label=\"{label}\"];\n",
                s.name
            ));
        }
        for t in &self.transitions {
            out.push_str(&format!("  {} -> {} [label=\"{}\"];\n", t.from, t.to, t.on));
        }
        out.push_str("}\n");
        out
    }
}

/// A process manager.
pub trait ProcessManager: Send + Sync + 'static {
    type State: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    type Input: Send + Sync + 'static;
    /// Stable name (e.g. `order-fulfilment`): part of keys, subjects and durable names.
    fn name(&self) -> &'static str;
    fn subscriptions(&self) -> Vec<Subscription>;
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
    fn definition(&self) -> Definition;
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub at_ms: u64,
    /// `message`, `deadline` or `retry`.
    pub trigger: String,
    pub message_id: String,
    pub message_type: String,
    pub from: String,
    pub to: String,
    pub sent: Vec<String>,
    #[serde(default)]
    pub deadlines_set: Vec<String>,
    #[serde(default)]
    pub deadlines_cancelled: Vec<String>,
}

/// A persisted instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance<S> {
    pub saga: String,
    pub id: String,
    pub version: u64,
    pub status: String,
    pub terminal: bool,
    pub state: S,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    /// Pending deadlines: name -> due time.
    pub deadlines: BTreeMap<String, u64>,
}

pub fn instance_key(saga: &str, id: &str) -> String {
    format!("saga/{saga}/{id}")
}

/// History entries live beside the instance, one key per version, so a transition writes a
/// small instance and one entry instead of rewriting a growing record.
pub fn history_prefix(saga: &str, id: &str) -> String {
    format!("saga-history/{saga}/{id}/")
}

fn history_key(saga: &str, id: &str, version: u64) -> String {
    format!("{}{version:010}", history_prefix(saga, id))
}

/// An instance with its history (oldest first), as `choreo saga show` prints it.
pub fn show(
    state: &dyn StateRead,
    saga: &str,
    id: &str,
) -> Result<Option<serde_json::Value>, crate::store::StateError> {
    let Some(mut v): Option<serde_json::Value> =
        crate::store::read(state, &instance_key(saga, id))?
    else {
        return Ok(None);
    };
    let history: Vec<HistoryEntry> = crate::store::read_all(state, &history_prefix(saga, id))?;
    v["history"] = serde_json::to_value(history).unwrap_or_default();
    Ok(Some(v))
}

/// Prefix of the deadline index; keys sort by due time.
pub const DEADLINE_PREFIX: &str = "deadline/";

pub fn deadline_key(at_ms: u64, saga: &str, id: &str, name: &str) -> String {
    format!("{DEADLINE_PREFIX}{at_ms:020}/{saga}/{id}/{name}")
}

/// A parsed deadline index key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDeadline {
    pub key: String,
    pub at_ms: u64,
    pub saga: String,
    pub id: String,
    pub name: String,
}

pub fn parse_deadline_key(key: &str) -> Option<DueDeadline> {
    let rest = key.strip_prefix(DEADLINE_PREFIX)?;
    let mut parts = rest.splitn(2, '/');
    let at_ms = parts.next()?.parse().ok()?;
    let rest = parts.next()?;
    let (saga, rest) = rest.split_once('/')?;
    let (id, name) = rest.rsplit_once('/')?;
    Some(DueDeadline {
        key: key.to_string(),
        at_ms,
        saga: saga.into(),
        id: id.into(),
        name: name.into(),
    })
}

/// What caused a transition, for the history.
pub struct Cause<'a> {
    pub trigger: &'static str,
    pub message_id: &'a str,
    pub message_type: &'a str,
}

/// Runs one transition inside a transaction: loads the instance, applies the step, updates
/// the deadline index, appends history, saves with `version + 1`. Returns what to send.
pub fn apply<P: ProcessManager>(
    pm: &P,
    tx: &dyn StateTx,
    id: &str,
    trigger: Trigger<'_, P::Input>,
    cause: &Cause<'_>,
    now_ms: u64,
) -> Result<Vec<Outgoing>, HandleError> {
    let key = instance_key(pm.name(), id);
    let current: Option<Instance<P::State>> = load(tx, &key)?;
    if let (Trigger::Deadline(name), Some(inst)) = (&trigger, &current) {
        if !inst.deadlines.contains_key(*name) {
            return Ok(vec![]);
        }
    }
    if matches!(trigger, Trigger::Deadline(_)) && current.is_none() {
        return Ok(vec![]);
    }
    let Some(step) = pm.transition(current.as_ref().map(|i| &i.state), trigger, now_ms)? else {
        return Ok(vec![]);
    };
    let def = pm.definition();
    let to = pm.state_name(&step.state);
    let terminal = def.is_terminal(to);
    let prior_terminal = current.as_ref().map(|i| i.terminal);
    let mut inst = current.unwrap_or_else(|| Instance {
        saga: pm.name().to_string(),
        id: id.to_string(),
        version: 0,
        status: String::from("(start)"),
        terminal: false,
        state: step.state.clone(),
        started_at_ms: now_ms,
        updated_at_ms: now_ms,
        deadlines: BTreeMap::new(),
    });
    let from = std::mem::take(&mut inst.status);
    let was = prior_terminal.map(|t| (from.clone(), t));
    // A fired deadline is consumed.
    let mut cancel: Vec<String> = step.cancel.clone();
    if let Trigger::Deadline(name) = trigger {
        cancel.push(name.to_string());
    }
    if terminal {
        cancel.extend(inst.deadlines.keys().cloned());
    }
    let mut cancelled = Vec::new();
    for name in cancel {
        if let Some(at) = inst.deadlines.remove(&name) {
            tx.remove(&deadline_key(at, pm.name(), id, &name))?;
            cancelled.push(name);
        }
    }
    let mut set = Vec::new();
    if !terminal {
        for d in &step.set {
            if let Some(old) = inst.deadlines.insert(d.name.clone(), d.at_ms) {
                tx.remove(&deadline_key(old, pm.name(), id, &d.name))?;
            }
            tx.put(&deadline_key(d.at_ms, pm.name(), id, &d.name), b"")?;
            set.push(d.name.clone());
        }
    }
    cancelled.retain(|c| !set.contains(c));
    inst.version += 1;
    inst.status = to.to_string();
    inst.terminal = terminal;
    inst.state = step.state;
    inst.updated_at_ms = now_ms;
    let entry = HistoryEntry {
        version: inst.version,
        at_ms: now_ms,
        trigger: cause.trigger.to_string(),
        message_id: cause.message_id.to_string(),
        message_type: cause.message_type.to_string(),
        from,
        to: to.to_string(),
        sent: step.send.iter().map(|o| o.msg_type.to_string()).collect(),
        deadlines_set: set,
        deadlines_cancelled: cancelled,
    };
    save(tx, &history_key(pm.name(), id, inst.version), &entry)?;
    if inst.version > HISTORY_LIMIT as u64 {
        tx.remove(&history_key(
            pm.name(),
            id,
            inst.version - HISTORY_LIMIT as u64,
        ))?;
    }
    save(tx, &key, &inst)?;
    crate::saga_stats::note(crate::saga_stats::Transition {
        saga: pm.name(),
        id: id.to_string(),
        from: was,
        to,
        terminal,
        started_at_ms: inst.started_at_ms,
        at_ms: now_ms,
    });
    Ok(step.send)
}

/// A process manager as a runtime component (its message subscriptions).
pub struct SagaComponent<P>(pub Arc<P>);

impl<P: ProcessManager> Component for SagaComponent<P> {
    type Input = P::Input;
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        self.0.subscriptions()
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<P::Input, DecodeError> {
        self.0.decode(msg_type, payload)
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &P::Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
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
    fn name(&self) -> &'static str;
    fn definition(&self) -> Definition;
    fn fire(
        &self,
        tx: &dyn StateTx,
        id: &str,
        deadline: &str,
        cause_id: &str,
        now_ms: u64,
    ) -> Result<Vec<Outgoing>, HandleError>;
    fn retry(
        &self,
        tx: &dyn StateTx,
        id: &str,
        cause_id: &str,
        now_ms: u64,
    ) -> Result<Vec<Outgoing>, HandleError>;
}

impl<P: ProcessManager> DynSaga for SagaComponent<P> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn definition(&self) -> Definition {
        self.0.definition()
    }
    fn fire(
        &self,
        tx: &dyn StateTx,
        id: &str,
        deadline: &str,
        cause_id: &str,
        now_ms: u64,
    ) -> Result<Vec<Outgoing>, HandleError> {
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
    ) -> Result<Vec<Outgoing>, HandleError> {
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

/// Given/when/then for process managers, with time as data: no runtime, no clock.
pub mod testing {
    use std::collections::BTreeMap;

    use super::{ProcessManager, Trigger};
    use crate::component::HandleError;

    /// A saga instance driven by hand. Deadlines behave as in the runtime: setting one by
    /// name replaces it, entering a terminal state cancels all, firing consumes it.
    pub struct Scenario<'a, P: ProcessManager> {
        pm: &'a P,
        pub state: Option<P::State>,
        pub now_ms: u64,
        pub deadlines: BTreeMap<String, u64>,
        /// Types of every message sent, in order.
        pub sent: Vec<&'static str>,
        /// Every transition taken: (from, trigger, to).
        pub path: Vec<(String, String, String)>,
    }

    impl<'a, P: ProcessManager> Scenario<'a, P> {
        pub fn new(pm: &'a P) -> Self {
            Scenario {
                pm,
                state: None,
                now_ms: 0,
                deadlines: BTreeMap::new(),
                sent: vec![],
                path: vec![],
            }
        }

        /// Applies inputs in order (errors such as "not started yet" are ignored, as a
        /// redelivery would retry them).
        pub fn given(mut self, inputs: impl IntoIterator<Item = P::Input>) -> Self {
            for i in inputs {
                let _ = self.apply(Trigger::Message(&i), None);
            }
            self
        }

        /// Applies one input, labelled `on` in the path (its type name).
        pub fn when(mut self, input: P::Input, on: &str) -> Self {
            let _ = self.apply(Trigger::Message(&input), Some(on));
            self
        }

        /// Fallible form of [`Scenario::when`].
        pub fn try_when(&mut self, input: &P::Input, on: &str) -> Result<(), HandleError> {
            self.apply(Trigger::Message(input), Some(on))
        }

        /// Moves the clock forward by `ms`, firing every deadline that comes due, in order.
        pub fn advance(mut self, ms: u64) -> Self {
            let until = self.now_ms + ms;
            while let Some((name, at)) = self
                .deadlines
                .iter()
                .filter(|(_, at)| **at <= until)
                .min_by_key(|(_, at)| **at)
                .map(|(n, a)| (n.clone(), *a))
            {
                self.now_ms = self.now_ms.max(at);
                let _ = self.apply(Trigger::Deadline(&name), Some(&format!("deadline:{name}")));
            }
            self.now_ms = until;
            self
        }

        /// An operator retry.
        pub fn retry(mut self) -> Result<Self, HandleError> {
            self.apply(Trigger::Retry, Some("retry"))?;
            Ok(self)
        }

        /// The current state's name in the declared graph.
        pub fn status(&self) -> &'static str {
            self.state
                .as_ref()
                .map(|s| self.pm.state_name(s))
                .unwrap_or("(none)")
        }

        fn apply(
            &mut self,
            trigger: Trigger<'_, P::Input>,
            on: Option<&str>,
        ) -> Result<(), HandleError> {
            if let Trigger::Deadline(name) = trigger {
                if self.deadlines.remove(name).is_none() {
                    return Ok(());
                }
            }
            let from = self.status().to_string();
            let Some(step) = self
                .pm
                .transition(self.state.as_ref(), trigger, self.now_ms)?
            else {
                return Ok(());
            };
            for c in &step.cancel {
                self.deadlines.remove(c);
            }
            let to = self.pm.state_name(&step.state);
            if self.pm.definition().is_terminal(to) {
                self.deadlines.clear();
            } else {
                for d in &step.set {
                    self.deadlines.insert(d.name.clone(), d.at_ms);
                }
            }
            self.sent.extend(step.send.iter().map(|o| o.msg_type));
            self.path
                .push((from, on.unwrap_or("message").to_string(), to.to_string()));
            self.state = Some(step.state);
            Ok(())
        }
    }
}

/// A summary line of an instance, for `list` and `stuck`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSummary {
    pub id: String,
    pub status: String,
    pub terminal: bool,
    pub version: u64,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    pub deadlines: BTreeMap<String, u64>,
}

/// Every instance of a saga (state as raw JSON), for inspection.
pub fn instances(
    state: &dyn StateRead,
    saga: &str,
) -> Result<Vec<Instance<serde_json::Value>>, crate::store::StateError> {
    crate::store::read_all(state, &format!("saga/{saga}/"))
}

impl<S> From<&Instance<S>> for InstanceSummary {
    fn from(i: &Instance<S>) -> Self {
        InstanceSummary {
            id: i.id.clone(),
            status: i.status.clone(),
            terminal: i.terminal,
            version: i.version,
            started_at_ms: i.started_at_ms,
            updated_at_ms: i.updated_at_ms,
            deadlines: i.deadlines.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::component::{DecodeError, HandleError, Subscription};
    use crate::store::{DecideError, Store};

    /// A counter saga: every message adds one.
    struct Counter;

    impl ProcessManager for Counter {
        type State = u64;
        type Input = ();
        fn name(&self) -> &'static str {
            "counter"
        }
        fn subscriptions(&self) -> Vec<Subscription> {
            vec![]
        }
        fn decode(&self, _: &str, _: &[u8]) -> Result<(), DecodeError> {
            Ok(())
        }
        fn correlate(&self, _: &()) -> String {
            "one".into()
        }
        fn transition(
            &self,
            s: Option<&u64>,
            _: Trigger<'_, ()>,
            _: u64,
        ) -> Result<Option<Step<u64>>, HandleError> {
            Ok(Some(Step::to(s.copied().unwrap_or(0) + 1)))
        }
        fn state_name(&self, _: &u64) -> &'static str {
            "Counting"
        }
        fn definition(&self) -> Definition {
            Definition {
                name: "counter",
                initial: "Counting",
                states: vec![],
                transitions: vec![],
            }
        }
    }

    /// Racing deliveries on one instance serialize: none is lost, none applied twice.
    #[test]
    fn concurrent_transitions_on_one_instance_all_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let cause = Cause {
                            trigger: "message",
                            message_id: "m",
                            message_type: "Tick",
                        };
                        store
                            .commit::<HandleError, _>(&format!("c/{t}/{i}"), 1, |tx| {
                                apply(&Counter, tx, "one", Trigger::Message(&()), &cause, 1)
                                    .map_err(|e| match e {
                                        HandleError::State(crate::store::StateError::Tx(t)) => {
                                            DecideError::Tx(t)
                                        }
                                        other => DecideError::Handler(other),
                                    })?;
                                Ok(vec![])
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let inst: Instance<u64> =
            crate::store::read(store.reader(), &instance_key("counter", "one"))
                .unwrap()
                .unwrap();
        let history = store
            .scan_prefix(&history_prefix("counter", "one"))
            .unwrap();
        assert_eq!((inst.state, inst.version, history.len()), (200, 200, 200));
    }

    #[test]
    fn deadline_keys_sort_by_time_and_parse_back() {
        let a = deadline_key(999, "s", "order-1", "d");
        let b = deadline_key(1_000, "s", "order/with/slash", "d");
        assert!(a < b);
        let p = parse_deadline_key(&b).unwrap();
        assert_eq!(
            (p.at_ms, p.saga.as_str(), p.id.as_str(), p.name.as_str()),
            (1_000, "s", "order/with/slash", "d")
        );
    }
}
