//! `choreo streams`: every Choreo stream with how full it is and how far each durable
//! consumer has got, the messages removed before a consumer acked them, and which
//! consumer holds history back (a stream full of messages a consumer has not acked refuses
//! new ones until it catches up).

use futures::TryStreamExt;
use runtime::wire::bus::Bus;
use runtime::wire::streams::StreamState;
use serde::Serialize;

/// One stream as `choreo streams` shows it.
#[derive(Debug, Serialize)]
pub struct Shown {
    pub stream: String,
    pub messages: u64,
    pub bytes: u64,
    pub max_bytes: i64,
    pub fill: f64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub consumers: Vec<ShownConsumer>,
}

/// One durable consumer of a stream.
#[derive(Debug, Serialize)]
pub struct ShownConsumer {
    pub consumer: String,
    pub ack_floor: u64,
    pub pending: u64,
    pub ack_pending: u64,
    /// Stream sequences removed above its ack floor: messages it may have missed.
    pub removed_unacked: u64,
    /// It has the oldest unacked message: history cannot be removed past it.
    pub holds_history: bool,
}

impl From<StreamState> for Shown {
    fn from(s: StreamState) -> Self {
        let holder = s
            .consumers
            .iter()
            .filter(|c| c.outstanding() > 0)
            .min_by_key(|c| c.ack_floor)
            .map(|c| c.name.clone());
        Shown {
            stream: s.name.clone(),
            messages: s.messages,
            bytes: s.bytes,
            max_bytes: s.max_bytes,
            fill: s.fill(),
            first_seq: s.first_seq,
            last_seq: s.last_seq,
            consumers: s
                .consumers
                .iter()
                .map(|c| ShownConsumer {
                    consumer: c.name.clone(),
                    ack_floor: c.ack_floor,
                    pending: c.num_pending,
                    ack_pending: c.num_ack_pending,
                    removed_unacked: c.removed_unacked(s.first_seq),
                    holds_history: holder.as_deref() == Some(c.name.as_str()),
                })
                .collect(),
        }
    }
}

/// Every stream of this namespace (its name starts with `CHOREO_` by default), in name order.
pub async fn list(bus: &Bus) -> anyhow::Result<Vec<Shown>> {
    let mut names: Vec<String> = bus.js.stream_names().try_collect().await?;
    let prefix = runtime::wire::subjects::stream_prefix();
    names.retain(|n| n.starts_with(&prefix));
    names.sort();
    let mut out = Vec::new();
    for name in names {
        out.push(Shown::from(bus.stream_state(&name).await?));
    }
    Ok(out)
}

/// Prints the streams; returns whether any consumer may have missed messages.
pub fn print(streams: &[Shown]) -> bool {
    let mut missed = false;
    for s in streams {
        let limit = if s.max_bytes > 0 {
            format!("{:.0}% of {} bytes", s.fill * 100.0, s.max_bytes)
        } else {
            "no size limit".into()
        };
        println!(
            "{}  {} messages, {} bytes ({limit}), sequences {}..{}",
            s.stream, s.messages, s.bytes, s.first_seq, s.last_seq
        );
        for c in &s.consumers {
            let mut notes = Vec::new();
            if c.removed_unacked > 0 {
                missed = true;
                notes.push(format!(
                    "MISSED: up to {} messages removed before it acked them",
                    c.removed_unacked
                ));
            }
            if c.holds_history {
                notes.push("holds history back (oldest unacked message)".into());
            }
            println!(
                "  {:<40} ack floor {:>8}  pending {:>6}  ack pending {:>5}  {}",
                c.consumer,
                c.ack_floor,
                c.pending,
                c.ack_pending,
                notes.join("; ")
            );
        }
    }
    missed
}
