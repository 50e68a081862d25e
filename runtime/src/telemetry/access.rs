//! What the NATS server and the node's responders refused (see docs/security.md): the
//! metrics, the flag that makes a node whose subscription was refused not ready, and the
//! record that lets each refusal be logged once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};

use prometheus::IntCounterVec;

use super::metrics::counter;

/// Operations the NATS server refused this process (not in its identity's rights).
pub static PERMISSION_VIOLATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_nats_permission_violations_total",
        "Operations the NATS server refused this process because its identity has no right to them (op: publish, subscribe, connect, other); each subject is logged once.",
        &["context", "op"],
    )
});

/// Requests a responder refused because their reply subject was not an inbox.
pub static REFUSED_REPLIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "choreo_refused_replies_total",
        "Requests left unanswered because their reply subject was not an inbox (answering would have written there with this node's rights), by service (query, saga, admin).",
        &["context", "service"],
    )
});

/// Set once the server refused one of this process's subscriptions.
static SUBSCRIPTION_REFUSED: AtomicBool = AtomicBool::new(false);

/// The server refused one of this process's subscriptions: it cannot receive what it
/// subscribed to, and is not ready from now on.
pub fn refuse_subscription() {
    SUBSCRIPTION_REFUSED.store(true, Ordering::Relaxed);
}

/// Whether the server refused one of this process's subscriptions.
pub fn subscription_refused() -> bool {
    SUBSCRIPTION_REFUSED.load(Ordering::Relaxed)
}

/// What was logged already, one key per kind and subject (at most 10,000 kept).
static LOGGED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// Whether `key` is logged for the first time (and noted as logged): each refusal or
/// undeclared subject is logged once, not once per message.
pub fn first_time(key: String) -> bool {
    let mut seen = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
    seen.len() < 10_000 && seen.insert(key)
}
