//! Subject and stream naming: the only place that knows the layout on the bus.
//!
//! Every context owns the prefix `<ns>.<context>.`, where `<ns>` is the application's
//! namespace (`choreo` unless configured: `namespace` in the node config, `--namespace`,
//! `CHOREO_NAMESPACE`), so several applications share one NATS server or account:
//! - `<ns>.<ctx>.evt.<Type>`   events the context publishes (only it may publish there);
//! - `<ns>.<ctx>.cmd.<Type>`   commands addressed to the context (anyone may publish);
//! - `<ns>.<ctx>.query.<name>` request/reply read models (core NATS, not stored);
//! - `<ns>.dlq.<ctx>`          dead letters given up by that context's consumers;
//! - `<ns>.changelog.<ctx>.p<n>` the committed batches of a context's partition;
//! - `<ns>.saga.<name>.<op>`, `<ns>.admin.<ctx>.<op>`, `<ns>.ext.<system>.<op>`.
//!
//! The stream `<NS>_<CTX>` (`CHOREO_ORDERS`) stores `evt.>` and `cmd.>` of one context;
//! `<NS>_<CTX>_CHANGELOG` its changelog; `<NS>_DLQ` stores dead letters; the key-value bucket
//! `<NS>_LEASES` holds who owns each partition and the object store `<NS>_<CTX>_SNAPSHOTS` the
//! context's snapshots. Rights can therefore be granted per prefix.
//!
//! The namespace is one per process (a process belongs to one application), set once
//! before the first subject is made ([`set_namespace`]).

use std::sync::OnceLock;

/// The namespace when none is configured.
pub const DEFAULT_NAMESPACE: &str = "choreo";

/// The namespace's subject prefix and stream prefix.
static NAMESPACE: OnceLock<(String, String)> = OnceLock::new();

/// Checks that `ns` can prefix subjects and stream names: 1 to 32 lowercase letters,
/// digits, `-` or `_`, starting with a letter.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 32
        && ns.starts_with(|c: char| c.is_ascii_lowercase())
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "namespace {ns:?}: 1 to 32 lowercase letters, digits, '-' or '_', starting with a letter"
        ))
    }
}

/// Sets this process's namespace. Setting the one already set is fine; another is an error
/// (subjects made before would not match).
pub fn set_namespace(ns: &str) -> Result<(), String> {
    check_namespace(ns)?;
    let set = NAMESPACE.get_or_init(|| (ns.to_string(), ns.to_ascii_uppercase().replace('-', "_")));
    if set.0 == ns {
        Ok(())
    } else {
        Err(format!(
            "namespace {ns:?} asked for, but this process already uses {:?}",
            set.0
        ))
    }
}

/// This process's namespace: the subject prefix.
pub fn namespace() -> &'static str {
    NAMESPACE.get().map_or(DEFAULT_NAMESPACE, |n| n.0.as_str())
}

/// The prefix of this namespace's stream names, with its `_`: `CHOREO_`.
pub fn stream_prefix() -> String {
    let ns = NAMESPACE.get().map_or("CHOREO", |n| n.1.as_str());
    format!("{ns}_")
}

/// Subject of an event type published by `context`.
pub fn event(context: &str, msg_type: &str) -> String {
    format!("{}.{context}.evt.{msg_type}", namespace())
}

/// Subject of a command type addressed to `context`.
pub fn command(context: &str, msg_type: &str) -> String {
    format!("{}.{context}.cmd.{msg_type}", namespace())
}

/// Subject of a named read-model query served by `context`.
pub fn query(context: &str, name: &str) -> String {
    format!("{}.{context}.query.{name}", namespace())
}

/// Subject of an inspection or operator request to a saga (`list`, `show`, `stuck`,
/// `retry`), served by the node hosting it.
pub fn saga(name: &str, op: &str) -> String {
    format!("{}.saga.{name}.{op}", namespace())
}

/// Subject of an operator request to the node hosting `context` (`faults`: fault
/// injection).
pub fn admin(context: &str, op: &str) -> String {
    format!("{}.admin.{context}.{op}", namespace())
}

/// Subject where `context` dead-letters messages.
pub fn dead_letter(context: &str) -> String {
    format!("{}.dlq.{context}", namespace())
}

/// Name of the JetStream stream that stores the context's events and commands.
pub fn stream(context: &str) -> String {
    format!(
        "{}{}",
        stream_prefix(),
        context.to_ascii_uppercase().replace('-', "_")
    )
}

/// Subjects stored by the context's stream.
pub fn stream_subjects(context: &str) -> Vec<String> {
    vec![
        format!("{}.{context}.evt.>", namespace()),
        format!("{}.{context}.cmd.>", namespace()),
    ]
}

/// Name of the dead-letter stream.
pub fn dlq_stream() -> String {
    format!("{}DLQ", stream_prefix())
}

/// Subjects stored by the dead-letter stream.
pub fn dlq_subjects() -> String {
    format!("{}.dlq.>", namespace())
}

/// The context whose dead letter was published on `subject`.
pub fn dead_letter_context(subject: &str) -> &str {
    subject
        .strip_prefix(namespace())
        .and_then(|s| s.strip_prefix(".dlq."))
        .unwrap_or(subject)
}

/// Name of the JetStream key-value bucket holding the partition leases (and the standby
/// registrations) of this namespace.
pub fn lease_bucket() -> String {
    format!("{}LEASES", stream_prefix())
}

/// Name of the JetStream object store holding the snapshots of `context`'s partitions
/// (one bucket per context, so that each context's rights cover its own only).
pub fn snapshot_bucket(context: &str) -> String {
    format!("{}_SNAPSHOTS", stream(context))
}

/// The lease key of one partition of `context` in [`lease_bucket`]: `orders.p0`.
pub fn lease_key(context: &str, partition: u32) -> String {
    format!("{context}.p{partition}")
}

/// Name of the stream holding the changelog of `context`'s partitions.
pub fn changelog_stream(context: &str) -> String {
    format!("{}_CHANGELOG", stream(context))
}

/// Subject of one partition's changelog: `choreo.changelog.orders.p0`.
pub fn changelog(context: &str, partition: u32) -> String {
    format!("{}.changelog.{context}.p{partition}", namespace())
}

/// Subject of a request to an external system (simulated by `choreo sim`).
pub fn external(system: &str, operation: &str) -> String {
    format!("{}.ext.{system}.{operation}", namespace())
}

/// The last token of a subject: the message type for `evt`/`cmd` subjects.
pub fn last_token(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(
            event("orders", "OrderPlaced"),
            "choreo.orders.evt.OrderPlaced"
        );
        assert_eq!(
            command("payments", "CapturePayment"),
            "choreo.payments.cmd.CapturePayment"
        );
        assert_eq!(stream("orders"), "CHOREO_ORDERS");
        assert_eq!(last_token("choreo.orders.evt.OrderPlaced"), "OrderPlaced");
        assert_eq!(dead_letter("orders"), "choreo.dlq.orders");
        assert_eq!(dead_letter_context("choreo.dlq.orders"), "orders");
        assert_eq!(dlq_stream(), "CHOREO_DLQ");
        assert_eq!(lease_bucket(), "CHOREO_LEASES");
        assert_eq!(lease_key("orders", 0), "orders.p0");
        assert_eq!(changelog_stream("orders"), "CHOREO_ORDERS_CHANGELOG");
        assert_eq!(changelog("orders", 0), "choreo.changelog.orders.p0");
        assert_eq!(snapshot_bucket("orders"), "CHOREO_ORDERS_SNAPSHOTS");
    }

    #[test]
    fn a_namespace_is_a_lowercase_token() {
        for good in ["choreo", "east", "shop-2", "a_b"] {
            assert!(check_namespace(good).is_ok(), "{good}");
        }
        for bad in ["", "East", "a.b", "2shop", "a b", "a>", &"x".repeat(33)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
        // The unit tests run with the default; another is refused once it is in use.
        set_namespace(DEFAULT_NAMESPACE).unwrap();
        assert!(set_namespace("east").unwrap_err().contains("already uses"));
    }
}
