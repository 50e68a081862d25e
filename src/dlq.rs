//! `choreo dlq list|show|replay|discard`: the dead-letter stream, from the client side.
//!
//! A replay publishes the original message again on its original subject with its original
//! headers (so its `Choreo-Id`, and every consumer's inbox, are unchanged) and a fresh
//! `Nats-Msg-Id` (so JetStream's duplicate window does not drop it), then removes the dead
//! letter. A consumer that had already handled the message acks and skips it; the one that
//! dead-lettered it handles it once.

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer;
use async_nats::HeaderMap;
use futures::StreamExt;
use runtime::wire::bus::Bus;
use runtime::wire::envelope::headers;
use runtime::wire::subjects;
use serde::Serialize;

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub context: Option<String>,
    pub reason: Option<String>,
    pub msg_type: Option<String>,
    pub consumer: Option<String>,
}

/// One dead letter as stored in `CHOREO_DLQ`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub seq: u64,
    pub context: String,
    pub consumer: String,
    pub reason: String,
    pub subject: String,
    pub msg_type: String,
    pub id: String,
    pub delivered: String,
    pub payload: String,
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

impl Filter {
    fn matches(&self, d: &DeadLetter) -> bool {
        self.context.as_ref().is_none_or(|c| *c == d.context)
            && self
                .reason
                .as_ref()
                .is_none_or(|r| d.reason.contains(r.as_str()))
            && self.msg_type.as_ref().is_none_or(|t| *t == d.msg_type)
            && self.consumer.as_ref().is_none_or(|c| *c == d.consumer)
    }
}

/// Every dead letter matching `filter`, oldest first.
pub async fn list(bus: &Bus, filter: &Filter) -> anyhow::Result<Vec<DeadLetter>> {
    let stream = bus
        .js
        .get_stream(subjects::dlq_stream())
        .await
        .context("dead-letter stream (has a node run yet?)")?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut msgs = c.messages().await?;
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        let h = m.headers.clone().unwrap_or_default();
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        let d = DeadLetter {
            seq,
            context: subjects::dead_letter_context(&m.subject).to_string(),
            consumer: header(&h, headers::DLQ_CONSUMER),
            reason: header(&h, headers::DLQ_REASON),
            subject: header(&h, headers::DLQ_SUBJECT),
            msg_type: header(&h, headers::TYPE),
            id: header(&h, headers::ID),
            delivered: header(&h, headers::DLQ_DELIVERED),
            payload: String::from_utf8_lossy(&m.payload)
                .chars()
                .take(2000)
                .collect(),
        };
        if filter.matches(&d) {
            out.push(d);
        }
    }
    Ok(out)
}

/// Publishes dead letter `seq` again on its original subject, then removes it. Returns the
/// subject and message id it was replayed with.
pub async fn replay(bus: &Bus, seq: u64) -> anyhow::Result<(String, String)> {
    let stream = bus.js.get_stream(subjects::dlq_stream()).await?;
    let m = stream
        .get_raw_message(seq)
        .await
        .with_context(|| format!("no dead letter {seq}"))?;
    let subject = header(&m.headers, headers::DLQ_SUBJECT);
    if subject.is_empty() {
        bail!("dead letter {seq} has no {} header", headers::DLQ_SUBJECT);
    }
    let mut h = HeaderMap::new();
    for (name, values) in m.headers.iter() {
        let name: &str = name.as_ref();
        if name.starts_with("Choreo-Dlq-") || name.eq_ignore_ascii_case(headers::NATS_MSG_ID) {
            continue;
        }
        for v in values {
            h.append(name, v.as_str());
        }
    }
    let id = header(&m.headers, headers::ID);
    h.insert(headers::NATS_MSG_ID, format!("replay-{seq}-{id}").as_str());
    bus.js
        .publish_with_headers(subject.clone(), h, m.payload.clone())
        .await?
        .await
        .with_context(|| format!("replay to {subject}"))?;
    stream
        .delete_message(seq)
        .await
        .with_context(|| format!("remove dead letter {seq}"))?;
    Ok((subject, id))
}

/// Removes dead letter `seq` for good.
pub async fn discard(bus: &Bus, seq: u64) -> anyhow::Result<()> {
    let stream = bus.js.get_stream(subjects::dlq_stream()).await?;
    if !stream
        .delete_message(seq)
        .await
        .with_context(|| format!("no dead letter {seq}"))?
    {
        bail!("dead letter {seq} was not removed");
    }
    Ok(())
}

pub fn print_list(list: &[DeadLetter]) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(
        o,
        "{:>6}  {:<10} {:<18} {:<20} reason",
        "seq", "context", "type", "id"
    );
    for d in list {
        let _ = writeln!(
            o,
            "{:>6}  {:<10} {:<18} {:<20} {}",
            d.seq,
            d.context,
            d.msg_type,
            d.id.chars().take(20).collect::<String>(),
            d.reason
        );
    }
    let _ = writeln!(o, "{} dead letter(s)", list.len());
}
