//! Saga instance counts for the saga gauges, kept in memory.
//!
//! The counts come from one scan of the stored instances when a context starts
//! (`reset`), then from each committed transition: a transition returns a [`SagaMove`]
//! with the messages it sends, the store returns the moves of a batch with its result once
//! the transaction committed, and the commit thread hands them to [`record`]. The gauges so
//! never scan the store, whose saga history grows with every instance a node ran. A count
//! may include a transition whose flush is still in progress (a failed flush stops the
//! node's acks and restarts it, which counts again from the store).

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use super::metrics;

/// One saga instance moving from one state to another in a committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaMove {
    /// The saga's name.
    pub saga: &'static str,
    /// The instance's id.
    pub id: String,
    /// The state before and whether it was terminal; `None` for a new instance.
    pub from: Option<(String, bool)>,
    /// The state after.
    pub to: &'static str,
    /// Whether the state after is terminal.
    pub terminal: bool,
    /// When the instance started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When the transition ran, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A stored instance as counted at start-up.
#[derive(Debug, Clone)]
pub(crate) struct Counted {
    pub(crate) id: String,
    pub(crate) status: String,
    pub(crate) terminal: bool,
    pub(crate) started_at_ms: u64,
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

fn counts() -> std::sync::MutexGuard<'static, HashMap<&'static str, Counts>> {
    COUNTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts the moves of a committed transaction.
pub fn record(moves: impl IntoIterator<Item = SagaMove>) {
    let mut all = None;
    for m in moves {
        let all = all.get_or_insert_with(counts);
        let c = all.entry(m.saga).or_default();
        if let Some((from, _)) = &m.from {
            *c.by_state.entry(from.clone()).or_default() -= 1;
        }
        *c.by_state.entry(m.to.to_string()).or_default() += 1;
        if m.terminal {
            c.active.remove(&m.id);
            let was_terminal = m.from.as_ref().is_some_and(|(_, t)| *t);
            if !was_terminal {
                metrics::SAGA_DURATION
                    .with_label_values(&[m.saga, m.to])
                    .observe(m.at_ms.saturating_sub(m.started_at_ms) as f64 / 1000.0);
            }
        } else {
            c.active.insert(m.id, m.started_at_ms);
        }
    }
}

/// Replaces the counts of `saga` with those of the stored instances (start-up, before its
/// consumers run).
pub(crate) fn reset(saga: &'static str, instances: impl IntoIterator<Item = Counted>) {
    let mut c = Counts::default();
    for i in instances {
        *c.by_state.entry(i.status).or_default() += 1;
        if !i.terminal {
            c.active.insert(i.id, i.started_at_ms);
        }
    }
    counts().insert(saga, c);
}

/// Forgets terminal instances removed from the store (retention), `n` of them in `state`.
pub fn forget(saga: &str, state: &str, n: i64) {
    if let Some(c) = counts().get_mut(saga) {
        *c.by_state.entry(state.to_string()).or_default() -= n;
    }
}

/// Instances by state (every state of `states` present, 0 if none) and the start of the
/// oldest non-terminal instance.
pub fn snapshot(saga: &str, states: &[&str]) -> (BTreeMap<String, i64>, Option<u64>) {
    let all = counts();
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

    fn mv(id: &str, from: Option<(&str, bool)>, to: &'static str, terminal: bool) -> SagaMove {
        SagaMove {
            saga: "counts-test",
            id: id.into(),
            from: from.map(|(s, t)| (s.to_string(), t)),
            to,
            terminal,
            started_at_ms: 100,
            at_ms: 200,
        }
    }

    #[test]
    fn counts_follow_recorded_moves() {
        record([
            mv("a", None, "Waiting", false),
            mv("b", None, "Waiting", false),
        ]);
        record([mv("b", Some(("Waiting", false)), "Done", true)]);
        let states = ["Waiting", "Done", "Failed"];
        let (by, oldest) = snapshot("counts-test", &states);
        assert_eq!((by["Waiting"], by["Done"], by["Failed"]), (1, 1, 0));
        assert_eq!(oldest, Some(100));
        record([mv("a", Some(("Waiting", false)), "Failed", true)]);
        let (by, oldest) = snapshot("counts-test", &states);
        assert_eq!((by["Waiting"], by["Done"], by["Failed"]), (0, 1, 1));
        assert_eq!(oldest, None);
        forget("counts-test", "Done", 1);
        assert_eq!(snapshot("counts-test", &states).0["Done"], 0);
    }

    #[test]
    fn reset_replaces_the_counts() {
        record([mv("x", None, "Waiting", false)]);
        let counted = |id: &str, status: &str, terminal, started| Counted {
            id: id.into(),
            status: status.into(),
            terminal,
            started_at_ms: started,
        };
        reset(
            "counts-test-reset",
            [
                counted("1", "Completed", true, 5),
                counted("2", "Waiting", false, 7),
                counted("3", "Waiting", false, 6),
            ],
        );
        let (by, oldest) = snapshot("counts-test-reset", &["Waiting", "Completed"]);
        assert_eq!((by["Waiting"], by["Completed"]), (2, 1));
        assert_eq!(oldest, Some(6));
    }
}
