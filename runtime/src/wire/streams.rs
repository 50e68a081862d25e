//! A stream and its durable consumers as a node watches them: how full the stream is, how
//! far each consumer has got, messages removed before a consumer acked them, and the
//! removal of history every durable consumer has acked.
//!
//! Streams refuse new messages when full (see [`super::bus::StreamSpec`]), so the server
//! never discards a message a consumer has not read; the nodes remove old messages
//! themselves, and only those that every durable consumer has acked ([`trim_point`]).

use futures::TryStreamExt;

use super::bus::{Bus, BusError};

/// A stream's state and its durable consumers'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// The stream's name, e.g. `CHOREO_ORDERS`.
    pub name: String,
    /// The sequence of its oldest stored message.
    pub first_seq: u64,
    /// The sequence of its newest message (0: none yet).
    pub last_seq: u64,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// The stream's size limit (-1: none).
    pub max_bytes: i64,
    /// Durable consumers with explicit acks (ephemeral readers do not hold history back).
    pub consumers: Vec<ConsumerState>,
}

/// How far a durable consumer has got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerState {
    /// The durable consumer's name.
    pub name: String,
    /// Every message up to this stream sequence that it receives is acked.
    pub ack_floor: u64,
    /// The last stream sequence delivered to it.
    pub delivered: u64,
    /// Messages it receives not yet delivered.
    pub num_pending: u64,
    /// Messages delivered and not yet acked.
    pub num_ack_pending: u64,
}

impl ConsumerState {
    /// Messages it still has to handle.
    pub fn outstanding(&self) -> u64 {
        self.num_pending + self.num_ack_pending
    }

    /// Stream sequences removed before it acked them: its ack floor is below the stream's
    /// first sequence. An upper bound of the messages it missed (the range may hold messages
    /// of subjects it does not receive).
    pub fn removed_unacked(&self, first_seq: u64) -> u64 {
        first_seq.saturating_sub(self.ack_floor + 1)
    }
}

impl StreamState {
    /// How full the stream is, 0 to 1 (0 without a size limit).
    pub fn fill(&self) -> f64 {
        if self.max_bytes > 0 {
            self.bytes as f64 / self.max_bytes as f64
        } else {
            0.0
        }
    }
}

/// The sequence below which the oldest messages may be removed so that about `keep_bytes`
/// stay: never past a message some durable consumer has not acked (a consumer with nothing
/// outstanding has acked everything up to the last sequence, which was read before it).
/// `None`: nothing to remove (under `keep_bytes`, nothing acked by all, or no durable
/// consumer at all: a stream nobody consumes keeps its messages).
pub fn trim_point(state: &StreamState, keep_bytes: u64) -> Option<u64> {
    if state.bytes <= keep_bytes || state.messages == 0 || state.consumers.is_empty() {
        return None;
    }
    let average = (state.bytes / state.messages).max(1);
    let excess = (state.bytes - keep_bytes).div_ceil(average);
    let wanted = state.first_seq.saturating_add(excess);
    let acked_by_all = state
        .consumers
        .iter()
        .map(|c| {
            if c.outstanding() == 0 {
                state.last_seq + 1
            } else {
                c.ack_floor + 1
            }
        })
        .min()?;
    let point = wanted.min(acked_by_all);
    (point > state.first_seq).then_some(point)
}

impl Bus {
    /// The state of stream `name` and of its durable consumers. The stream is read first,
    /// so a consumer read after it has seen at least every message the state counts.
    pub async fn stream_state(&self, name: &str) -> Result<StreamState, BusError> {
        let err = |what: &str, e: &dyn std::fmt::Display| BusError::JetStream {
            what: format!("{what} {name}"),
            message: e.to_string(),
        };
        let stream = self
            .js
            .get_stream(name)
            .await
            .map_err(|e| err("get stream", &e))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| err("stream info", &e))?;
        let consumers: Vec<_> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| err("list consumers of", &e))?;
        Ok(StreamState {
            name: name.to_string(),
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            messages: info.state.messages,
            bytes: info.state.bytes,
            max_bytes: info.config.max_bytes,
            consumers: consumers
                .into_iter()
                .filter(|c| {
                    c.config.durable_name.is_some()
                        && c.config.ack_policy
                            == async_nats::jetstream::consumer::AckPolicy::Explicit
                })
                .map(|c| ConsumerState {
                    name: c.name,
                    ack_floor: c.ack_floor.stream_sequence,
                    delivered: c.delivered.stream_sequence,
                    num_pending: c.num_pending,
                    num_ack_pending: c.num_ack_pending as u64,
                })
                .collect(),
        })
    }

    /// Removes the messages of stream `state.name` below `point` (see [`trim_point`]);
    /// returns how many.
    pub async fn trim(&self, state: &StreamState, point: u64) -> Result<u64, BusError> {
        let err = |e: &dyn std::fmt::Display| BusError::JetStream {
            what: format!("trim {}", state.name),
            message: e.to_string(),
        };
        let stream = self.js.get_stream(&state.name).await.map_err(|e| err(&e))?;
        let purged = stream.purge().sequence(point).await.map_err(|e| err(&e))?;
        Ok(purged.purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consumer(name: &str, ack_floor: u64, outstanding: u64) -> ConsumerState {
        ConsumerState {
            name: name.into(),
            ack_floor,
            delivered: ack_floor + outstanding,
            num_pending: 0,
            num_ack_pending: outstanding,
        }
    }

    /// 100 messages (seq 1..=100) of 10 bytes each.
    fn stream(consumers: Vec<ConsumerState>) -> StreamState {
        StreamState {
            name: "S".into(),
            first_seq: 1,
            last_seq: 100,
            messages: 100,
            bytes: 1_000,
            max_bytes: 2_000,
            consumers,
        }
    }

    #[test]
    fn removes_the_oldest_down_to_what_is_kept() {
        let s = stream(vec![consumer("a", 100, 0)]);
        assert_eq!(s.fill(), 0.5);
        // 300 bytes to go: 30 messages, seq 1..=30.
        assert_eq!(trim_point(&s, 700), Some(31));
        assert_eq!(trim_point(&s, 1_000), None, "nothing over");
    }

    #[test]
    fn never_past_a_message_a_consumer_has_not_acked() {
        let s = stream(vec![consumer("a", 100, 0), consumer("slow", 12, 5)]);
        assert_eq!(trim_point(&s, 0), Some(13));
        let stuck = stream(vec![consumer("a", 100, 0), consumer("stuck", 0, 1)]);
        assert_eq!(trim_point(&stuck, 0), None);
        // A consumer with nothing outstanding has acked everything, whatever its floor (a
        // filtered consumer's floor is its last message).
        let idle = stream(vec![consumer("filtered", 40, 0)]);
        assert_eq!(trim_point(&idle, 0), Some(101));
    }

    #[test]
    fn a_stream_nobody_consumes_keeps_its_messages() {
        assert_eq!(trim_point(&stream(vec![]), 0), None);
    }

    #[test]
    fn a_gap_is_the_range_removed_above_the_ack_floor() {
        let c = consumer("payments", 3_104, 0);
        assert_eq!(c.removed_unacked(7_175), 4_070);
        assert_eq!(c.removed_unacked(3_105), 0);
        assert_eq!(c.removed_unacked(1), 0);
    }
}
