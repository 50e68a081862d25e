//! Saga instance counts for the metrics, kept in memory from the transitions that commit.
//!
//! Counting by scanning every stored instance made the cost of the metrics grow with the
//! saga history: every 5 s the orders node decoded every instance it ever ran (12k after
//! 40 s of full load, a few percent of its CPU and tens of MiB of transient memory, and
//! without bound on a long-lived node). Instead the store is scanned once at start-up
//! ([`load`], before the context's consumers run), and each committed transition moves one
//! instance from one state's count to another's.
//!
//! A transition is noted ([`note`]) inside its transaction, on the thread that runs it; the
//! store discards the notes when a run of the closure starts over or fails ([`begin`]), or
//! those of one message of a batch whose handler failed ([`mark`], [`discard_since`]), and
//! applies them once the transaction committed ([`committed`]). A count may therefore
//! include a transition whose flush is still in progress; a failed flush stops the node.
//!
//! Architecture invariant: every saga transition goes through `saga::apply` inside
//! `Store::commit`, the only places that call [`note`] and [`committed`].

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use crate::metrics;
use crate::saga::InstanceSummary;
use crate::store::{StateError, StateRead};

/// One instance moving from `from` to `to`.
#[derive(Debug, Clone)]
pub(crate) struct Transition {
    pub saga: &'static str,
    pub id: String,
    /// `None` for a new instance.
    pub from: Option<(String, bool)>,
    pub to: &'static str,
    pub terminal: bool,
    pub started_at_ms: u64,
    pub at_ms: u64,
}

/// The counts of one saga.
#[derive(Debug, Default)]
struct Counts {
    by_state: BTreeMap<String, i64>,
    /// Non-terminal instances and when they started.
    active: HashMap<String, u64>,
}

static COUNTS: LazyLock<Mutex<HashMap<&'static str, Counts>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

thread_local! {
    static NOTED: RefCell<Vec<Transition>> = const { RefCell::new(Vec::new()) };
}

/// A transaction run starts (or ended without committing): forget what it noted.
pub(crate) fn begin() {
    NOTED.with(|n| n.borrow_mut().clear());
}

/// How many transitions this thread has noted so far in the current run (see [`discard_since`]).
pub(crate) fn mark() -> usize {
    NOTED.with(|n| n.borrow().len())
}

/// One message of a batch transaction failed: forget what it noted since `mark`.
pub(crate) fn discard_since(mark: usize) {
    NOTED.with(|n| n.borrow_mut().truncate(mark));
}

/// Notes a transition made by the transaction running on this thread.
pub(crate) fn note(t: Transition) {
    NOTED.with(|n| n.borrow_mut().push(t));
}

/// The transaction running on this thread committed: count what it noted.
pub(crate) fn committed() {
    let noted = NOTED.with(|n| std::mem::take(&mut *n.borrow_mut()));
    if noted.is_empty() {
        return;
    }
    let mut all = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    for t in noted {
        let c = all.entry(t.saga).or_default();
        if let Some((from, _)) = &t.from {
            *c.by_state.entry(from.clone()).or_default() -= 1;
        }
        *c.by_state.entry(t.to.to_string()).or_default() += 1;
        if t.terminal {
            c.active.remove(&t.id);
            if !t
                .from
                .as_ref()
                .is_some_and(|(_, was_terminal)| *was_terminal)
            {
                metrics::SAGA_DURATION
                    .with_label_values(&[t.saga, t.to])
                    .observe(t.at_ms.saturating_sub(t.started_at_ms) as f64 / 1000.0);
            }
        } else {
            c.active.insert(t.id, t.started_at_ms);
        }
    }
}

/// Counts the stored instances of `saga` (start-up, before its consumers run); returns how
/// many. Replaces what was counted for it before; an undecodable instance is logged and
/// skipped.
pub fn load(state: &dyn StateRead, saga: &'static str) -> Result<usize, StateError> {
    let mut c = Counts::default();
    let mut n = 0;
    for (k, v) in state
        .scan_prefix(&format!("saga/{saga}/"))
        .map_err(|e| StateError::Corrupt(e.to_string()))?
    {
        // The summary fields only: the state itself is skipped unparsed.
        let s: InstanceSummary = match serde_json::from_slice(&v) {
            Ok(s) => s,
            Err(e) => {
                // `choreo saga show` reports it; the counts go on without it.
                tracing::warn!(key = %k, error = %e, "saga instance not counted: undecodable");
                continue;
            }
        };
        *c.by_state.entry(s.status).or_default() += 1;
        if !s.terminal {
            c.active.insert(s.id, s.started_at_ms);
        }
        n += 1;
    }
    COUNTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(saga, c);
    Ok(n)
}

/// Instances by state (every state of `states` present, 0 if none) and the start of the
/// oldest non-terminal instance.
pub fn snapshot(saga: &str, states: &[&str]) -> (BTreeMap<String, i64>, Option<u64>) {
    let all = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    let mut by_state: BTreeMap<String, i64> = states.iter().map(|s| (s.to_string(), 0)).collect();
    let Some(c) = all.get(saga) else {
        return (by_state, None);
    };
    for (s, n) in &c.by_state {
        by_state.insert(s.clone(), *n);
    }
    (by_state, c.active.values().min().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, from: Option<(&str, bool)>, to: &'static str, terminal: bool) -> Transition {
        Transition {
            saga: "stats-test",
            id: id.into(),
            from: from.map(|(s, t)| (s.to_string(), t)),
            to,
            terminal,
            started_at_ms: 100,
            at_ms: 200,
        }
    }

    #[test]
    fn counts_follow_committed_transitions_only() {
        begin();
        note(t("a", None, "Waiting", false));
        note(t("b", None, "Waiting", false));
        committed();
        // A run that started over: its notes are dropped.
        note(t("a", Some(("Waiting", false)), "Done", true));
        begin();
        note(t("b", Some(("Waiting", false)), "Done", true));
        committed();
        let (by, oldest) = snapshot("stats-test", &["Waiting", "Done", "Failed"]);
        assert_eq!(by["Waiting"], 1);
        assert_eq!(by["Done"], 1);
        assert_eq!(by["Failed"], 0);
        assert_eq!(oldest, Some(100));
        begin();
        note(t("a", Some(("Waiting", false)), "Failed", true));
        committed();
        let (by, oldest) = snapshot("stats-test", &["Waiting", "Done", "Failed"]);
        assert_eq!((by["Waiting"], by["Done"], by["Failed"]), (0, 1, 1));
        assert_eq!(oldest, None);
    }

    #[test]
    fn load_counts_what_the_store_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), 1 << 20).unwrap();
        let put = |id: &str, status: &str, terminal: bool, started: u64| {
            let v = serde_json::json!({
                "saga": "stats-load", "id": id, "version": 1, "status": status,
                "terminal": terminal, "state": {"big": [1, 2, 3]},
                "started_at_ms": started, "updated_at_ms": started, "deadlines": {}
            });
            store
                .commit::<String, _>(&format!("in/{id}"), 1, |tx| {
                    tx.put(&format!("saga/stats-load/{id}"), v.to_string().as_bytes())
                        .map_err(crate::store::DecideError::Tx)?;
                    Ok(vec![])
                })
                .unwrap();
        };
        put("1", "Completed", true, 5);
        put("2", "Waiting", false, 7);
        put("3", "Waiting", false, 6);
        store
            .commit::<String, _>("in/bad", 1, |tx| {
                tx.put("saga/stats-load/4", b"not json")
                    .map_err(crate::store::DecideError::Tx)?;
                Ok(vec![])
            })
            .unwrap();
        assert_eq!(load(store.reader(), "stats-load").unwrap(), 3);
        let (by, oldest) = snapshot("stats-load", &["Waiting", "Completed", "Cancelled"]);
        assert_eq!((by["Waiting"], by["Completed"], by["Cancelled"]), (2, 1, 0));
        assert_eq!(oldest, Some(6));
    }
}
