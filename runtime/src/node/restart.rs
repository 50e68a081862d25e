//! Restarts in place: why a node asks its binary to run it again in the same process (a
//! store sled cannot recover in this process), and the count of them carried across the
//! restart in the environment, so `choreo_node_restarts_in_place_total` goes on where the
//! process's other counters start again from zero.

use crate::telemetry::metrics;

/// Why a node asks to be restarted in place (the discriminant indexes [`Restart::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// A store's flush failed and still failed once its directory took writes again.
    FlushFailed,
    /// A store's flush did not return.
    FlushStalled,
    /// The node lost (or could not renew in time) the lease of a partition it served: it
    /// stops serving at once and comes back as a standby (see `node::ownership`).
    LeaseLost,
}

impl Restart {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [Restart; 3] = [
        Restart::FlushFailed,
        Restart::FlushStalled,
        Restart::LeaseLost,
    ];

    /// The reason's name in the `reason` label of `choreo_node_restarts_in_place_total` and
    /// in [`RESTARTS_ENV`], e.g. `flush_failed`.
    pub fn label(self) -> &'static str {
        match self {
            Restart::FlushFailed => "flush_failed",
            Restart::FlushStalled => "flush_stalled",
            Restart::LeaseLost => "lease_lost",
        }
    }

    /// The environment variable (name, value) to start the node again with: the restarts
    /// so far, this one included.
    pub fn env_for_next_run(self) -> (&'static str, String) {
        let mut counts = restarts_from(std::env::var(RESTARTS_ENV).ok().as_deref());
        counts[self as usize] += 1;
        (RESTARTS_ENV, restarts_value(counts))
    }
}

/// The environment variable that carries the restarts in place so far across the exec:
/// `flush_failed=N,flush_stalled=M,lease_lost=L`.
pub const RESTARTS_ENV: &str = "CHOREO_RESTARTS_IN_PLACE";

/// Restarts in place so far, by [`Restart::ALL`], read from `value` (unknown or malformed
/// parts count nothing).
fn restarts_from(value: Option<&str>) -> [u64; Restart::ALL.len()] {
    let mut counts = [0; Restart::ALL.len()];
    for part in value.unwrap_or_default().split(',') {
        let Some((label, n)) = part.split_once('=') else {
            continue;
        };
        if let (Some(i), Ok(n)) = (
            Restart::ALL.iter().position(|r| r.label() == label),
            n.parse::<u64>(),
        ) {
            counts[i] = n;
        }
    }
    counts
}

fn restarts_value(counts: [u64; Restart::ALL.len()]) -> String {
    Restart::ALL
        .iter()
        .zip(counts)
        .map(|(r, n)| format!("{}={n}", r.label()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Sets `choreo_node_restarts_in_place_total` from the environment (0 for every reason in a
/// process started afresh, so the series exist before the first restart).
pub(crate) fn count_restarts_in_place() {
    let counts = restarts_from(std::env::var(RESTARTS_ENV).ok().as_deref());
    for (r, n) in Restart::ALL.iter().zip(counts) {
        metrics::RESTARTS_IN_PLACE
            .with_label_values(&[r.label()])
            .inc_by(n);
    }
    if counts.iter().any(|n| *n > 0) {
        tracing::warn!(restarts = %restarts_value(counts), "this node has restarted itself in place");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_in_place_are_counted_across_the_environment() {
        assert_eq!(restarts_from(None), [0, 0, 0]);
        let mut counts = restarts_from(Some("flush_failed=2,flush_stalled=1"));
        assert_eq!(counts, [2, 1, 0]);
        counts[Restart::FlushStalled as usize] += 1;
        assert_eq!(
            restarts_from(Some(&restarts_value(counts))),
            [2, 2, 0],
            "{}",
            restarts_value(counts)
        );
        for (i, r) in Restart::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        // What cannot be read counts nothing.
        assert_eq!(
            restarts_from(Some("flush_failed=x,bogus=3,,flush_stalled")),
            [0, 0, 0]
        );
    }
}
