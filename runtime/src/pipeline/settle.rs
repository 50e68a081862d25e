//! Settling a message: the one place that acks, naks, dead-letters or leaves it. It counts
//! a failure where the outcome spends the retry budget, asks [`Disposition::of`] what to
//! do, and does it. The message is taken by value: it is settled once.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};

use super::disposition::{Disposition, DlqReason, Outcome};
use super::pull::PullLoop;
use crate::telemetry::metrics;
use crate::wire::bus::DeadLetter;
use crate::wire::envelope;

impl PullLoop {
    /// Settles `msg` after `outcome`; returns what was done (a dead letter whose publish
    /// failed becomes a nak: nothing is terminated without its dead letter stored).
    pub(super) async fn settle(
        &self,
        msg: jetstream::Message,
        msg_type: &str,
        outcome: Outcome,
    ) -> Disposition {
        let key = self.failure_key(&msg);
        let failures = if outcome.counted() {
            let delivered = msg.info().map(|i| i.delivered as u32).unwrap_or(1);
            // A count that cannot be stored falls back to JetStream's delivery count.
            self.rt.store.add_failure(&key).unwrap_or(delivered)
        } else {
            0
        };
        if let Outcome::Transient(why) | Outcome::StoreUnavailable(why) = &outcome {
            if outcome.counted() {
                tracing::warn!(consumer = %self.handling.durable, msg_type, failures, error = %why, "handler failed; will retry");
            } else {
                tracing::error!(consumer = %self.handling.durable, error = %why, "cannot handle messages now; will retry");
            }
        }
        let disposition = Disposition::of(outcome, failures, self.policy(), fastrand::f64());
        match &disposition {
            Disposition::Ack { .. } => {
                if let Err(e) = msg.ack().await {
                    // Not fatal: the message is redelivered and absorbed by the inbox.
                    tracing::warn!(consumer = %self.handling.durable, error = %e, "ack failed");
                }
                if msg.info().map(|i| i.delivered > 1).unwrap_or(false) {
                    let _ = self.rt.store.clear_failures(&key);
                }
            }
            Disposition::Nak { delay, .. } => {
                let _ = msg.ack_with(AckKind::Nak(Some(*delay))).await;
            }
            Disposition::DeadLetter { reason, detail } => {
                if let Err(e) = self.dead_letter(&msg, *reason, detail).await {
                    tracing::error!(consumer = %self.handling.durable, error = %e, "dead-letter publish failed; will retry");
                    let delay = Duration::from_secs(1);
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                    return Disposition::Nak {
                        delay,
                        counted: false,
                    };
                }
                let _ = msg.ack_with(AckKind::Term).await;
            }
            Disposition::Leave => {}
        }
        disposition
    }

    /// The key of a message's failure count and dead-letter record: consumer and stream
    /// sequence (a replayed dead letter is a new message and starts afresh).
    fn failure_key(&self, msg: &jetstream::Message) -> String {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        format!("{}/{seq}", self.handling.durable)
    }

    /// Publishes the dead letter (awaiting its ack) and records it locally.
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        reason: DlqReason,
        detail: &str,
    ) -> Result<(), crate::wire::bus::BusError> {
        let (delivered, seq) = msg
            .info()
            .map(|i| (i.delivered, i.stream_sequence))
            .unwrap_or((1, 0));
        let dl = DeadLetter {
            context: self.rt.context,
            consumer: &self.handling.durable,
            subject: &msg.subject,
            reason: detail,
            delivered,
            stream_sequence: seq,
            headers: msg.headers.as_ref(),
            payload: msg.payload.clone(),
        };
        self.rt.bus.dead_letter(&dl).await?;
        let headers: serde_json::Map<String, serde_json::Value> = msg
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::json!(v.first().map(|x| x.as_str()).unwrap_or("")),
                )
            })
            .collect();
        let record = serde_json::json!({
            "consumer": &*self.handling.durable, "subject": msg.subject.as_str(),
            "category": reason.label(), "reason": detail, "delivered": delivered,
            "stream_sequence": seq, "at_ms": envelope::now_ms(), "headers": headers,
        });
        let key = self.failure_key(msg);
        let _ = self.rt.store.record_dead_letter(&key, &record);
        let _ = self.rt.store.clear_failures(&key);
        tracing::warn!(consumer = %self.handling.durable, subject = %msg.subject, category = reason.label(), reason = detail, "dead-lettered");
        metrics::DEAD_LETTERS
            .with_label_values(&[self.rt.context, reason.label()])
            .inc();
        Ok(())
    }
}
