//! Every Prometheus metric of the runtime, in one place.
//!
//! Labels are bounded: context, consumer (durable name), message type (declared types only,
//! else `unknown`), outcome and reason categories. Never an order, saga or message id.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The registry of every metric the node serves on `/metrics`; an application registers
/// its own business metrics here too.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

pub(crate) fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    REGISTRY
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

/// Messages taken from a consumer, by what became of them.
/// outcome: acked | duplicate | retried | delayed | dead_lettered.
pub static MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_messages_total",
        "Messages delivered to a consumer, by outcome (acked, duplicate, retried, delayed by an open breaker, dead_lettered).",
        &["context", "consumer", "outcome"],
    )
});

/// Messages a consumer handled inside the transaction of the message that caused them
/// (the context's own messages; their JetStream copies are then duplicates).
pub static HANDLED_IN_TRANSACTION: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_handled_in_transaction_total",
        "Messages a consumer handled inside the transaction that wrote them (a context's own messages); their JetStream copies are acked as duplicates.",
        &["context", "consumer"],
    )
});

/// Time from delivery to ack/nak/term of one message.
pub static HANDLER_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_handler_duration_seconds",
        "Time to handle one message, from delivery to ack, nak or dead letter.",
        &["context", "msg_type", "outcome"],
        latency_buckets(),
    )
});

/// Dead letters by reason category.
pub static DEAD_LETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_dead_letters_total",
        "Messages dead-lettered, by reason (malformed, unknown_type, missing_header, oversized, \
         permanent, retries_exhausted).",
        &["context", "reason"],
    )
});

/// Panics caught around handler code.
pub static HANDLER_PANICS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_handler_panics_total",
        "Panics caught in handler code; the message is redelivered.",
        &["context", "consumer"],
    )
});

/// Restarts of consumer actors by their supervisor.
pub static ACTOR_RESTARTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_supervisor_restarts_total",
        "Consumer actors restarted by their supervisor.",
        &["context", "consumer"],
    )
});

/// Entries waiting in the outbox.
pub static OUTBOX_DEPTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_outbox_depth",
        "Outbox entries durable and not yet acknowledged by JetStream (held by the relay).",
        &["context"],
    )
});

/// Outbox entries published, by result.
pub static OUTBOX_PUBLISHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_outbox_published_total",
        "Outbox entries acknowledged by JetStream (result: stored, duplicate) or failed (error).",
        &["context", "result"],
    )
});

/// Time from publish to JetStream ack for outbox batches.
pub static OUTBOX_PUBLISH_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_outbox_publish_duration_seconds",
        "Time for one outbox batch to be published and acknowledged.",
        &["context"],
        latency_buckets(),
    )
});

/// Duration of one group-commit flush.
pub static STORE_COMMIT_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_store_flush_duration_seconds",
        "Duration of one group-commit flush and fsync.",
        &["context"],
        latency_buckets(),
    )
});

/// Messages run in one store transaction by the commit thread.
pub static STORE_TX_BATCH_SIZE: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_store_transaction_batch_size",
        "Messages committed in one store transaction.",
        &["context"],
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
    )
});

/// Messages and waiters served by one group-commit flush.
pub static STORE_GROUP_COMMIT_SIZE: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_store_group_commit_size",
        "Messages and waiters made durable by one flush.",
        &["context"],
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
    )
});

/// Requests to external systems by result.
pub static EXTERNAL_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_external_call_duration_seconds",
        "Requests to external systems (result: ok, rejected, error, timeout).",
        &["system", "result"],
        latency_buckets(),
    )
});

/// Faults injected (chaos testing), by point and action.
pub static FAULTS_INJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_faults_injected_total",
        "Faults injected by the fault-injection rules, by point and action.",
        &["point", "action"],
    )
});

/// Restarts in place of this node process (it executed itself again: a store it could not
/// recover in the process, or a lease it lost), by reason: `flush_failed` | `flush_stalled` |
/// `lease_lost`. The count is
/// carried across the restart in the environment, so it goes on where the process's other
/// counters start again from zero.
pub static RESTARTS_IN_PLACE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_node_restarts_in_place_total",
        "Restarts in place of this node process (same pid, executed again) since it was started, by reason (flush_failed, flush_stalled, lease_lost).",
        &["reason"],
    )
});

/// 1 while this node owns the context's partition, 0 while it stands by.
pub static PARTITION_OWNED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_partition_owned",
        "1 while this node owns the partition (serves it), 0 while it stands by for it.",
        &["context", "partition"],
    )
});

/// Leases taken (a start, or a takeover from another node).
pub static LEASE_ACQUIRED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_lease_acquisitions_total",
        "Partition leases this node took, by how (fresh: nobody held it; own: from an earlier run on the same data directory; takeover: from another node).",
        &["context", "how"],
    )
});

/// Leases lost: taken over by another node, or not renewed in time.
pub static LEASE_LOST: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_lease_losses_total",
        "Partition leases this node lost (taken: another node wrote it; expired: not renewed in time), after which it stops serving the partition.",
        &["context", "reason"],
    )
});

/// What a node that lost its lease did not do: changelog appends refused by the server
/// (`refused`) and appends it did not try because its lease had run out (`self_fenced`).
pub static FENCED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_fenced_total",
        "Changelog appends of a node without a valid lease: refused by JetStream (refused) or not attempted because its own clock said the lease had run out (self_fenced). Nothing they carried was acked or published.",
        &["context", "how"],
    )
});

/// Records appended to the changelog, and their size.
pub static CHANGELOG_APPENDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_changelog_appends_total",
        "Records appended to the context's changelog (one per group-commit flush, or more when large).",
        &["context"],
    )
});

/// The changelog's last sequence as this node knows it.
pub static CHANGELOG_SEQUENCE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_changelog_sequence",
        "The last changelog sequence this node appended or restored, by context.",
        &["context"],
    )
});

/// Time from the previous owner's last renewal until this node served the partition.
pub static TAKEOVER_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_takeover_seconds",
        "From the previous owner's last lease renewal until this node served the partition (restore included).",
        &["context"],
        vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0],
    )
});

/// Records replayed from the changelog when this node took a partition.
pub static CHANGELOG_RESTORED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_changelog_restored_records_total",
        "Changelog records replayed into the local store when this node took the partition.",
        &["context"],
    )
});

/// Records a takeover would replay after the newest snapshot.
pub static CHANGELOG_SINCE_SNAPSHOT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_changelog_records_since_snapshot",
        "Changelog records after the partition's newest snapshot (what the next takeover replays), as the owner counts them.",
        &["context"],
    )
});

/// Snapshots put when taking a partition.
pub static SNAPSHOTS_TAKEN: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_snapshots_total",
        "Snapshots of the partition put in the object store by this node when it took the partition (after replaying at least ownership.snapshot_after records); the records they cover are removed from the changelog.",
        &["context"],
    )
});

/// Saga deadlines fired.
pub static SAGA_DEADLINES_FIRED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_saga_deadlines_fired_total",
        "Saga deadlines fired, by saga and deadline name.",
        &["saga", "deadline"],
    )
});

/// Saga deadlines that could not fire and were dropped (the saga refused the transition:
/// an undeclared one, or an instance that is gone); the instance stays where it was.
pub static SAGA_DEADLINES_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_saga_deadlines_dropped_total",
        "Saga deadlines dropped because the saga refused to fire them (an undeclared transition), by saga and deadline name.",
        &["saga", "deadline"],
    )
});

/// How late deadlines fired (after a restart, by the downtime).
pub static SAGA_DEADLINE_LATENESS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_saga_deadline_lateness_seconds",
        "Time between a deadline's due time and its firing.",
        &["saga"],
        vec![
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ],
    )
});

/// Circuit breaker state per external system: one series per state, 1 for the current one.
pub static BREAKER_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_breaker_state",
        "Circuit breaker state per external system: 1 for the current state (closed, open, half_open), 0 for the others.",
        &["system", "state"],
    )
});

/// The states of `choreo_breaker_state` and `choreo_breaker_transitions_total`.
pub const BREAKER_STATES: [&str; 3] = ["closed", "open", "half_open"];

/// Circuit breaker transitions.
pub static BREAKER_TRANSITIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_breaker_transitions_total",
        "Circuit breaker state changes, by system and new state (open, half_open, closed).",
        &["system", "to"],
    )
});

/// Messages in handling per consumer (bulkhead in use).
pub static BULKHEAD_IN_USE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_bulkhead_in_use",
        "Messages being handled now, per durable consumer (at most max_in_flight).",
        &["context", "consumer"],
    )
});

/// Supervisor restart limit exceeded: the consumer is stopped and the node not ready.
pub static SUPERVISOR_GIVEN_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_supervisor_stopped",
        "1 while a consumer is stopped after exceeding its restart limit (node not ready).",
        &["context", "consumer"],
    )
});

/// Messages not yet delivered to a durable consumer (its lag).
pub static CONSUMER_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_consumer_pending_messages",
        "Messages in the stream not yet delivered to the durable consumer (consumer lag).",
        &["context", "consumer"],
    )
});

/// Messages delivered and not yet acked (in handling plus prefetched: the bulkhead's queue).
pub static CONSUMER_ACK_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_consumer_ack_pending_messages",
        "Messages delivered to the durable consumer and not yet acked (in handling or queued).",
        &["context", "consumer"],
    )
});

/// Messages a durable consumer of this node never handled, by why: `removed` (gone from the
/// stream before it acked them: an upper bound, see `wire::streams`), `max_deliveries` (the
/// server stopped redelivering; the message is dead-lettered).
pub static CONSUMER_MISSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_consumer_missed_messages_total",
        "Messages a durable consumer never handled, by reason (removed: gone from the stream before it acked them, counted as the sequences removed above its ack floor; max_deliveries: the server gave up redelivering, the message is dead-lettered).",
        &["context", "consumer", "reason"],
    )
});

/// How full each stream the node uses is (bytes over its limit).
pub static STREAM_FILL: LazyLock<prometheus::GaugeVec> = LazyLock::new(|| {
    let g = prometheus::GaugeVec::new(
        Opts::new(
            "choreo_stream_fill_ratio",
            "Bytes stored in a stream over its max_bytes (0 to 1); at 1 the stream refuses new messages and publishers wait.",
        ),
        &["stream"],
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
});

/// Old messages removed from a stream once every durable consumer had acked them.
pub static STREAM_TRIMMED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_stream_trimmed_messages_total",
        "Messages removed from a stream by this node once every durable consumer had acked them (history over the stream's history share).",
        &["stream"],
    )
});

/// Events and commands published from the outbox, by type.
pub static PUBLISHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_messages_published_total",
        "Messages published from the outbox and acknowledged by JetStream, by context and type \
         (business counters: e.g. type OrderPlaced, OrderCompleted, OrderCancelled).",
        &["context", "msg_type"],
    )
});

/// Saga instances by saga and state.
pub static SAGA_INSTANCES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "choreo_saga_instances",
        "Saga instances stored, by saga and state.",
        &["saga", "state"],
    )
});

/// Age of the oldest active (non-terminal) saga instance.
pub static SAGA_OLDEST_ACTIVE_SECONDS: LazyLock<prometheus::GaugeVec> = LazyLock::new(|| {
    let g = prometheus::GaugeVec::new(
        Opts::new(
            "choreo_saga_oldest_active_seconds",
            "Age of the oldest active (non-terminal) saga instance; 0 when none.",
        ),
        &["saga"],
    )
    .expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
});

/// Time from a saga instance's start to its terminal state.
pub static SAGA_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "choreo_saga_duration_seconds",
        "Time from a saga instance's start to its terminal state, by saga and terminal state.",
        &["saga", "state"],
        vec![
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
        ],
    )
});

/// This build: 1, with its version as a label.
pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = gauge(
        "choreo_build_info",
        "Always 1; the version of the running build in the version label.",
        &["version"],
    );
    g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    g
});

/// Registers the `process_*` metrics of this process, once.
fn register_process_metrics() {
    #[cfg(target_os = "linux")]
    {
        static REGISTERED: std::sync::Once = std::sync::Once::new();
        REGISTERED.call_once(|| {
            REGISTRY
                .register(Box::new(
                    prometheus::process_collector::ProcessCollector::for_self(),
                ))
                .expect("unique metric");
        });
    }
}

/// Messages handled by a context's consumers so far (for `$SRV.STATS`).
pub fn handled(context: &str) -> u64 {
    REGISTRY
        .gather()
        .iter()
        .filter(|f| f.name() == "choreo_messages_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "context" && l.value() == context)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Renders all metrics in the Prometheus text format.
pub fn render() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Touches every metric so it is registered before the first scrape.
pub fn init() {
    LazyLock::force(&BUILD_INFO);
    register_process_metrics();
    LazyLock::force(&MESSAGES);
    LazyLock::force(&HANDLER_SECONDS);
    LazyLock::force(&HANDLED_IN_TRANSACTION);
    LazyLock::force(&DEAD_LETTERS);
    LazyLock::force(&HANDLER_PANICS);
    LazyLock::force(&ACTOR_RESTARTS);
    LazyLock::force(&OUTBOX_DEPTH);
    LazyLock::force(&OUTBOX_PUBLISHED);
    LazyLock::force(&OUTBOX_PUBLISH_SECONDS);
    LazyLock::force(&STORE_COMMIT_SECONDS);
    LazyLock::force(&STORE_GROUP_COMMIT_SIZE);
    LazyLock::force(&STORE_TX_BATCH_SIZE);
    LazyLock::force(&EXTERNAL_SECONDS);
    LazyLock::force(&FAULTS_INJECTED);
    LazyLock::force(&RESTARTS_IN_PLACE);
    LazyLock::force(&PARTITION_OWNED);
    LazyLock::force(&LEASE_ACQUIRED);
    LazyLock::force(&super::access::PERMISSION_VIOLATIONS);
    LazyLock::force(&super::access::REFUSED_REPLIES);
    LazyLock::force(&LEASE_LOST);
    LazyLock::force(&FENCED);
    LazyLock::force(&CHANGELOG_APPENDS);
    LazyLock::force(&CHANGELOG_SEQUENCE);
    LazyLock::force(&TAKEOVER_SECONDS);
    LazyLock::force(&CHANGELOG_RESTORED);
    LazyLock::force(&SNAPSHOTS_TAKEN);
    LazyLock::force(&CHANGELOG_SINCE_SNAPSHOT);
    LazyLock::force(&BREAKER_STATE);
    LazyLock::force(&BREAKER_TRANSITIONS);
    LazyLock::force(&BULKHEAD_IN_USE);
    LazyLock::force(&SUPERVISOR_GIVEN_UP);
    LazyLock::force(&CONSUMER_PENDING);
    LazyLock::force(&CONSUMER_ACK_PENDING);
    LazyLock::force(&CONSUMER_MISSED);
    LazyLock::force(&STREAM_FILL);
    LazyLock::force(&STREAM_TRIMMED);
    LazyLock::force(&PUBLISHED);
    LazyLock::force(&SAGA_INSTANCES);
    LazyLock::force(&SAGA_OLDEST_ACTIVE_SECONDS);
    LazyLock::force(&SAGA_DURATION);
    LazyLock::force(&SAGA_DEADLINES_FIRED);
    LazyLock::force(&SAGA_DEADLINES_DROPPED);
    LazyLock::force(&SAGA_DEADLINE_LATENESS);
}

#[cfg(test)]
mod tests {
    use super::{init, render};

    #[test]
    fn the_build_and_the_process_are_described() {
        init();
        init(); // a second call registers nothing twice
        let text = render();
        // The name as a literal of its own: tests/integration/observability.rs takes every
        // literal of this file that starts with the prefix for a metric name.
        let build = format!(
            "{}{{version=\"{}\"}} 1\n",
            "choreo_build_info",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
            "process_threads",
        ] {
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} missing from {text}"));
            let value: f64 = value.parse().unwrap();
            if name != "process_cpu_seconds_total" {
                assert!(value > 0.0, "{name} = {value}");
            }
        }
    }
}
