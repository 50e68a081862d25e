//! Subject and stream naming: the only place that knows the layout on the bus.
//!
//! Every context owns the prefix `choreo.<context>.`:
//! - `choreo.<ctx>.evt.<Type>`   events the context publishes (only it may publish there);
//! - `choreo.<ctx>.cmd.<Type>`   commands addressed to the context (anyone may publish);
//! - `choreo.<ctx>.query.<name>` request/reply read models (core NATS, not stored);
//! - `choreo.dlq.<ctx>`          dead letters given up by that context's consumers.
//!
//! The stream `CHOREO_<CTX>` stores `evt.>` and `cmd.>` of one context; `CHOREO_DLQ` stores
//! dead letters. Rights can therefore be granted per prefix.

/// Subject of an event type published by `context`.
pub fn event(context: &str, msg_type: &str) -> String {
    format!("choreo.{context}.evt.{msg_type}")
}

/// Subject of a command type addressed to `context`.
pub fn command(context: &str, msg_type: &str) -> String {
    format!("choreo.{context}.cmd.{msg_type}")
}

/// Subject of a named read-model query served by `context`.
pub fn query(context: &str, name: &str) -> String {
    format!("choreo.{context}.query.{name}")
}

/// Subject of an inspection or operator request to a saga (`list`, `show`, `stuck`,
/// `retry`), served by the node hosting it.
pub fn saga(name: &str, op: &str) -> String {
    format!("choreo.saga.{name}.{op}")
}

/// Subject of an operator request to the node hosting `context` (`faults`: fault
/// injection).
pub fn admin(context: &str, op: &str) -> String {
    format!("choreo.admin.{context}.{op}")
}

/// Subject where `context` dead-letters messages.
pub fn dead_letter(context: &str) -> String {
    format!("choreo.dlq.{context}")
}

/// Name of the JetStream stream that stores the context's events and commands.
pub fn stream(context: &str) -> String {
    format!("CHOREO_{}", context.to_ascii_uppercase().replace('-', "_"))
}

/// Subjects stored by the context's stream.
pub fn stream_subjects(context: &str) -> Vec<String> {
    vec![
        format!("choreo.{context}.evt.>"),
        format!("choreo.{context}.cmd.>"),
    ]
}

/// Name of the dead-letter stream.
pub const DLQ_STREAM: &str = "CHOREO_DLQ";
/// Subjects stored by the dead-letter stream.
pub const DLQ_SUBJECTS: &str = "choreo.dlq.>";

/// Subject of a request to an external system (simulated by `choreo sim`).
pub fn external(system: &str, operation: &str) -> String {
    format!("choreo.ext.{system}.{operation}")
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
    }
}
