//! Saga instances as stored: the instance (state, version, deadlines), its history, the
//! deadline index, and the step that runs one transition inside a message's transaction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ProcessManager, Trigger};
use crate::component::{Decision, HandleError};
use crate::store::{load, save, StateError, StateRead, StateTx};
use crate::telemetry::saga_counts::{self, Counted, SagaMove};

/// Instances are kept at most this many history entries (oldest dropped first).
pub const HISTORY_LIMIT: usize = 200;

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The instance's version after the transition.
    pub version: u64,
    /// When the transition ran, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `message`, `deadline` or `retry`.
    pub trigger: String,
    /// The id of the message that caused it; for a deadline or a retry, an id derived from
    /// the firing or the operator's request.
    pub message_id: String,
    /// The type of that message, the deadline's name, or `OperatorRetry`.
    pub message_type: String,
    /// The state before (`(start)` for a new instance).
    pub from: String,
    /// The state after.
    pub to: String,
    /// Types of the messages sent, in order.
    pub sent: Vec<String>,
    /// Names of the deadlines set or moved.
    #[serde(default)]
    pub deadlines_set: Vec<String>,
    /// Names of the deadlines cancelled (a fired deadline among them).
    #[serde(default)]
    pub deadlines_cancelled: Vec<String>,
}

/// A persisted instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance<S> {
    /// The saga's name ([`ProcessManager::name`]).
    pub saga: String,
    /// The instance's id, as the saga correlates its inputs.
    pub id: String,
    /// How many transitions the instance has taken; each one writes `version + 1`.
    pub version: u64,
    /// The name of its state in the declared graph.
    pub status: String,
    /// Whether that state is terminal.
    pub terminal: bool,
    /// The saga's own state.
    pub state: S,
    /// When its first transition ran, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When its last transition ran, in milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// Pending deadlines: name -> due time.
    pub deadlines: BTreeMap<String, u64>,
}

/// The state key of the instance `id` of `saga`.
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
) -> Result<Option<serde_json::Value>, StateError> {
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

/// The index key of the deadline `name` of an instance, due at `at_ms`.
pub(crate) fn deadline_key(at_ms: u64, saga: &str, id: &str, name: &str) -> String {
    format!("{DEADLINE_PREFIX}{at_ms:020}/{saga}/{id}/{name}")
}

/// Prefix of the index of ended instances; keys sort by when the instance ended.
pub const ENDED_PREFIX: &str = "saga-ended/";

/// The index key of an instance that ended (entered a terminal state) at `at_ms`.
pub fn ended_key(at_ms: u64, saga: &str, id: &str) -> String {
    format!("{ENDED_PREFIX}{at_ms:020}/{saga}/{id}")
}

/// A parsed ended-instance index key: (ended at, saga, id).
pub fn parse_ended_key(key: &str) -> Option<(u64, String, String)> {
    let rest = key.strip_prefix(ENDED_PREFIX)?;
    let (at, rest) = rest.split_once('/')?;
    let (saga, id) = rest.split_once('/')?;
    Some((at.parse().ok()?, saga.to_string(), id.to_string()))
}

/// Removes an ended instance, its history and its index key `key` inside a transaction;
/// returns the state it ended in, or `None` if it is gone or not ended (moved on by an
/// operator retry since: only the index key goes).
pub fn forget_ended(tx: &dyn StateTx, key: &str) -> Result<Option<String>, StateError> {
    tx.remove(key)?;
    let Some((_, saga, id)) = parse_ended_key(key) else {
        return Ok(None);
    };
    let instance = instance_key(&saga, &id);
    let Some(inst): Option<Instance<serde_json::Value>> = load(tx, &instance)? else {
        return Ok(None);
    };
    if !inst.terminal {
        return Ok(None);
    }
    tx.remove(&instance)?;
    let first = inst.version.saturating_sub(HISTORY_LIMIT as u64) + 1;
    for version in first..=inst.version {
        tx.remove(&history_key(&saga, &id, version))?;
    }
    Ok(Some(inst.status))
}

/// A parsed deadline index key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DueDeadline {
    pub(crate) key: String,
    pub(crate) at_ms: u64,
    pub(crate) saga: String,
    pub(crate) id: String,
    pub(crate) name: String,
}

/// The deadline a [`deadline_key`] names; `None` for any other key.
pub(crate) fn parse_deadline_key(key: &str) -> Option<DueDeadline> {
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
pub(crate) struct Cause<'a> {
    pub(crate) trigger: &'static str,
    pub(crate) message_id: &'a str,
    pub(crate) message_type: &'a str,
}

/// Runs one transition inside a transaction: loads the instance, applies the step, updates
/// the deadline index, appends history, saves with `version + 1`. Returns what to send.
pub(crate) fn apply<P: ProcessManager>(
    pm: &P,
    tx: &dyn StateTx,
    id: &str,
    trigger: Trigger<'_, P::Input>,
    cause: &Cause<'_>,
    now_ms: u64,
) -> Result<Decision, HandleError> {
    let key = instance_key(pm.name(), id);
    let current: Option<Instance<P::State>> = load(tx, &key)?;
    if let (Trigger::Deadline(name), Some(inst)) = (&trigger, &current) {
        if !inst.deadlines.contains_key(*name) {
            return Ok(Decision::default());
        }
    }
    if matches!(trigger, Trigger::Deadline(_)) && current.is_none() {
        return Ok(Decision::default());
    }
    let Some(step) = pm.transition(current.as_ref().map(|i| &i.state), trigger, now_ms)? else {
        return Ok(Decision::default());
    };
    let def = pm.definition();
    let to = pm.state_name(&step.state);
    let on = edge_label(trigger, cause.message_type);
    check_declared(&def, current.as_ref().map(|i| i.status.as_str()), &on, to)
        .map_err(|e| HandleError::Permanent(format!("saga {} instance {id}: {e}", pm.name())))?;
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
        if prior_terminal != Some(true) {
            // Ended now: kept for inspection, removed after the retention period.
            tx.put(&ended_key(now_ms, pm.name(), id), b"")?;
        }
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
    let moved = SagaMove {
        saga: pm.name(),
        id: id.to_string(),
        from: was,
        to,
        terminal,
        started_at_ms: inst.started_at_ms,
        at_ms: now_ms,
    };
    Ok(Decision {
        send: step.send,
        saga_move: Some(moved),
    })
}

/// The label of the edge a trigger takes in the declared graph: the message type,
/// `deadline:<name>` or `retry`.
fn edge_label<'a, I>(trigger: Trigger<'_, I>, message_type: &'a str) -> std::borrow::Cow<'a, str> {
    match trigger {
        Trigger::Message(_) => std::borrow::Cow::Borrowed(message_type),
        Trigger::Deadline(name) => std::borrow::Cow::Owned(format!("deadline:{name}")),
        Trigger::Retry => std::borrow::Cow::Borrowed("retry"),
    }
}

/// Refuses a transition the declared graph does not have: a new instance enters the
/// initial state (or goes on from it in the same step), an instance moves only along a
/// declared edge (staying put is always allowed). A message refused here is dead-lettered
/// with the reason; a deadline is dropped, counted and logged; either way the instance
/// stays as it was. [`super::testing::Scenario`] refuses the same transitions.
pub(crate) fn check_declared(
    def: &super::Definition,
    from: Option<&str>,
    on: &str,
    to: &str,
) -> Result<(), String> {
    let declared = match from {
        Some(from) => def.allows(from, on, to),
        None => to == def.initial || def.allows(def.initial, on, to),
    };
    if declared {
        return Ok(());
    }
    let from = from.unwrap_or("(start)");
    Err(format!(
        "undeclared transition {from} -{on}-> {to}; declare it in the saga's definition"
    ))
}

/// A summary line of an instance, for `list` and `stuck`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSummary {
    /// The instance's id.
    pub id: String,
    /// The name of its state in the declared graph.
    pub status: String,
    /// Whether that state is terminal.
    pub terminal: bool,
    /// How many transitions it has taken.
    pub version: u64,
    /// When its first transition ran, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When its last transition ran, in milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// Pending deadlines: name -> due time.
    pub deadlines: BTreeMap<String, u64>,
}

/// Every instance of a saga (state as raw JSON), for inspection.
pub fn instances(
    state: &dyn StateRead,
    saga: &str,
) -> Result<Vec<Instance<serde_json::Value>>, StateError> {
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

/// Counts the stored instances of `saga` for the saga gauges (a context's start-up, before
/// its consumers run); returns how many. Only the summary fields are decoded; an
/// undecodable instance is logged and skipped (`choreo saga show` reports it).
pub fn count(state: &dyn StateRead, saga: &'static str) -> Result<usize, StateError> {
    let mut counted = Vec::new();
    for (k, v) in state
        .scan_prefix(&format!("saga/{saga}/"))
        .map_err(|e| StateError::Corrupt(e.to_string()))?
    {
        match serde_json::from_slice::<InstanceSummary>(&v) {
            Ok(s) => counted.push(Counted {
                id: s.id,
                status: s.status,
                terminal: s.terminal,
                started_at_ms: s.started_at_ms,
            }),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, "saga instance not counted: undecodable")
            }
        }
    }
    let n = counted.len();
    saga_counts::reset(saga, counted);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::component::HandleError;
    use crate::saga::testing::fixtures::{Counter, COUNTER, STEPPER};
    use crate::store::{DecideError, Effects, Store};

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
                                apply(&COUNTER, tx, "one", Trigger::Message(&()), &cause, 1)
                                    .map_err(|e| match e {
                                        HandleError::State(StateError::Tx(t)) => DecideError::Tx(t),
                                        other => DecideError::Handler(other),
                                    })?;
                                Ok(Effects::default())
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

    /// A transition the graph does not declare is refused and changes nothing; the same
    /// step along a declared edge goes through.
    #[test]
    fn an_undeclared_transition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let step = |n: u32, msg_type: &str| {
            let cause = Cause {
                trigger: "message",
                message_id: "m",
                message_type: msg_type,
            };
            store.commit::<HandleError, _>(&format!("in/{n}"), 1, |tx| {
                apply(&STEPPER, tx, "one", Trigger::Message(&()), &cause, 1)
                    .map_err(DecideError::Handler)?;
                Ok(Effects::default())
            })
        };
        let status = || {
            let inst: Instance<u64> =
                crate::store::read(store.reader(), &instance_key("stepper", "one"))
                    .unwrap()
                    .unwrap();
            (inst.status, inst.version)
        };
        step(1, "Begin").unwrap();
        assert_eq!(status(), ("Start".to_string(), 1));
        let refused = format!("{:?}", step(2, "Other").err().unwrap());
        assert!(
            refused.contains("undeclared transition Start -Other-> Done"),
            "{refused}"
        );
        assert_eq!(status(), ("Start".to_string(), 1));
        step(3, "Finish").unwrap();
        assert_eq!(status(), ("Done".to_string(), 2));
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

    #[test]
    fn count_reads_what_the_store_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let put = |id: &str, value: String| {
            store
                .commit::<String, _>(&format!("in/{id}"), 1, |tx| {
                    tx.put(&format!("saga/count-test/{id}"), value.as_bytes())
                        .map_err(DecideError::Tx)?;
                    Ok(Effects::default())
                })
                .unwrap();
        };
        let instance = |id: &str, status: &str, terminal: bool, started: u64| {
            serde_json::json!({
                "saga": "count-test", "id": id, "version": 1, "status": status,
                "terminal": terminal, "state": {"big": [1, 2, 3]},
                "started_at_ms": started, "updated_at_ms": started, "deadlines": {}
            })
            .to_string()
        };
        put("1", instance("1", "Completed", true, 5));
        put("2", instance("2", "Waiting", false, 7));
        put("3", instance("3", "Waiting", false, 6));
        put("4", "not json".into());
        assert_eq!(count(store.reader(), "count-test").unwrap(), 3);
        let (by, oldest) = saga_counts::snapshot("count-test", &["Waiting", "Completed"]);
        assert_eq!((by["Waiting"], by["Completed"]), (2, 1));
        assert_eq!(oldest, Some(6));
    }

    #[test]
    fn an_ended_instance_is_indexed_and_forgotten_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let cause = Cause {
            trigger: "message",
            message_id: "m",
            message_type: "Go",
        };
        let moved = store
            .commit::<HandleError, _>("c/1", 7, |tx| {
                let once = Counter {
                    name: "once",
                    ends: true,
                    steps: false,
                };
                let d = apply(&once, tx, "one", Trigger::Message(&()), &cause, 7)
                    .map_err(DecideError::Handler)?;
                Ok(Effects {
                    saga_moves: d.saga_move.into_iter().collect(),
                    ..Default::default()
                })
            })
            .unwrap();
        assert!(matches!(moved, crate::store::Committed::Written { .. }));
        let keys = store.state_keys(ENDED_PREFIX, "saga-ended0", 10).unwrap();
        assert_eq!(keys, [ended_key(7, "once", "one")]);
        assert_eq!(
            parse_ended_key(&keys[0]),
            Some((7, "once".to_string(), "one".to_string()))
        );
        let forgotten = std::cell::RefCell::new(None);
        store
            .commit::<HandleError, _>("retention/1", 8, |tx| {
                *forgotten.borrow_mut() =
                    forget_ended(tx, &keys[0]).map_err(|e| DecideError::Handler(e.into()))?;
                Ok(Effects::default())
            })
            .unwrap();
        assert_eq!(forgotten.into_inner().as_deref(), Some("Done"));
        assert!(store.scan_prefix("saga/once/").unwrap().is_empty());
        assert!(store
            .scan_prefix(&history_prefix("once", "one"))
            .unwrap()
            .is_empty());
        assert!(store.scan_prefix(ENDED_PREFIX).unwrap().is_empty());
    }
}
