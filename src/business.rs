//! The shop's business metric: the money its published messages carry, counted once each is
//! stored by JetStream. The runtime knows nothing of money: it calls the hook the shop
//! registers on its contexts (`ContextBuilder::on_published`) after the outbox published a
//! message, and the shop reads the amount from the payload.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, Opts};
use runtime::component::Published;

/// The message types that carry an amount, their context and the field it is in.
pub const AMOUNTS: &[(&str, &str, &str)] = &[
    ("orders", "OrderPlaced", "total_cents"),
    ("payments", "PaymentAuthorized", "amount_cents"),
    ("payments", "PaymentCaptured", "amount_cents"),
    ("payments", "PaymentVoided", "amount_cents"),
];

/// `choreo_business_amount_cents_total{context,msg_type}`, in the runtime's registry (served
/// on `/metrics`), every series present from the start.
pub static AMOUNT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let opts = Opts::new(
        "choreo_business_amount_cents_total",
        "Sum of the business amount (in cents) carried by published messages, by context and \
         type (OrderPlaced, PaymentAuthorized, PaymentCaptured, PaymentVoided).",
    );
    let counter = IntCounterVec::new(opts, &["context", "msg_type"]).expect("valid metric");
    runtime::telemetry::metrics::REGISTRY
        .register(Box::new(counter.clone()))
        .expect("registered once");
    for (context, msg_type, _) in AMOUNTS {
        counter.with_label_values(&[context, msg_type]);
    }
    counter
});

/// The types of `context` that carry an amount.
pub fn types(context: &str) -> Vec<&'static str> {
    AMOUNTS
        .iter()
        .filter(|(c, _, _)| *c == context)
        .map(|(_, t, _)| *t)
        .collect()
}

/// Counts the amount a published message carries (the hook).
pub fn count(published: &Published<'_>) {
    let Some((_, _, field)) = AMOUNTS
        .iter()
        .find(|(c, t, _)| *c == published.context && *t == published.msg_type)
    else {
        return;
    };
    let amount = serde_json::from_str::<serde_json::Value>(published.payload)
        .ok()
        .and_then(|v| v.get(field).and_then(serde_json::Value::as_u64));
    if let Some(cents) = amount {
        AMOUNT
            .with_label_values(&[published.context, published.msg_type])
            .inc_by(cents);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_amount_is_read_from_the_payload_of_the_types_that_carry_one() {
        let value = |c: &str, t: &str| AMOUNT.with_label_values(&[c, t]).get();
        let before = value("payments", "PaymentCaptured");
        count(&Published {
            context: "payments",
            msg_type: "PaymentCaptured",
            payload: r#"{"order_id": "o", "amount_cents": 1250}"#,
        });
        assert_eq!(value("payments", "PaymentCaptured") - before, 1250);
        let placed = value("orders", "OrderPlaced");
        count(&Published {
            context: "orders",
            msg_type: "OrderPlaced",
            payload: r#"{"order_id": "o", "total_cents": 700}"#,
        });
        count(&Published {
            context: "orders",
            msg_type: "OrderCompleted",
            payload: r#"{"total_cents": 5}"#,
        });
        assert_eq!(value("orders", "OrderPlaced") - placed, 700);
        assert_eq!(types("payments").len(), 3);
    }
}
