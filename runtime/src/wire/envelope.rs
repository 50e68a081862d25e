//! The envelope: the metadata every Choreo message carries, and its mapping to NATS headers.
//!
//! Wire format (see README "Wire format"): the body is the JSON payload, untouched; all
//! metadata travels in headers so that a router or a client in another language never has
//! to parse the body to route, deduplicate or trace a message.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

/// Header names of the wire format. `Nats-Msg-Id` is set to the same value as `Choreo-Id`
/// when publishing so that JetStream's duplicate window drops a re-publish.
pub mod headers {
    /// The message's unique id ([`Envelope::id`](super::Envelope::id)).
    pub const ID: &str = "Choreo-Id";
    /// The message type ([`Envelope::msg_type`](super::Envelope::msg_type)).
    pub const TYPE: &str = "Choreo-Type";
    /// The payload's schema version ([`Envelope::schema`](super::Envelope::schema)).
    pub const SCHEMA: &str = "Choreo-Schema";
    /// The business transaction's id
    /// ([`Envelope::correlation_id`](super::Envelope::correlation_id)).
    pub const CORRELATION: &str = "Choreo-Correlation";
    /// The causing message's id ([`Envelope::causation_id`](super::Envelope::causation_id)).
    pub const CAUSATION: &str = "Choreo-Causation";
    /// The publishing context ([`Envelope::source`](super::Envelope::source)).
    pub const SOURCE: &str = "Choreo-Source";
    /// When it occurred, in ms since the Unix epoch
    /// ([`Envelope::occurred_at_ms`](super::Envelope::occurred_at_ms)).
    pub const OCCURRED_AT: &str = "Choreo-Occurred-At";
    /// JetStream's deduplication key; the same value as `Choreo-Id`.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    /// W3C trace context; optional on input, always set on what Choreo publishes.
    pub const TRACEPARENT: &str = "traceparent";
    /// Set on dead letters: why the message was dead-lettered.
    pub const DLQ_REASON: &str = "Choreo-Dlq-Reason";
    /// Set on dead letters: the durable consumer that gave up on it.
    pub const DLQ_CONSUMER: &str = "Choreo-Dlq-Consumer";
    /// Set on dead letters: the subject the message was delivered on.
    pub const DLQ_SUBJECT: &str = "Choreo-Dlq-Subject";
    /// Set on dead letters: how many times it was delivered.
    pub const DLQ_DELIVERED: &str = "Choreo-Dlq-Delivered";
    /// Set on dead letters: the message's own `Nats-Msg-Id`, if it had one (the dead letter
    /// gets one of its own, so that a retried dead-lettering is stored once).
    pub const DLQ_MSG_ID: &str = "Choreo-Dlq-Msg-Id";
}

/// A message's size as the size limit counts it: the payload plus every header's name and
/// value (what a client sends; not the protocol's framing around them).
pub fn message_size(headers: Option<&HeaderMap>, payload: &[u8]) -> usize {
    let headers: usize = headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + v.as_str().len())
                .sum::<usize>()
        })
        .sum();
    payload.len() + headers
}

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Metadata of one message. The payload travels beside it as raw JSON bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id; the deduplication key (inbox and JetStream duplicate window).
    pub id: String,
    /// Message type, e.g. `OrderPlaced`; equals the last token of the subject.
    pub msg_type: String,
    /// Schema version of the payload.
    pub schema: u32,
    /// Id shared by every message of one business transaction (e.g. one order).
    pub correlation_id: String,
    /// Id of the message that caused this one (its own id for a first message).
    pub causation_id: String,
    /// Context that published it.
    pub source: String,
    /// Milliseconds since the Unix epoch, UTC.
    pub occurred_at_ms: u64,
    /// W3C `traceparent` (`00-<trace id>-<span id>-01`).
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// Why an incoming message's metadata could not be read. Each is a dead-letter reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The message carries no headers at all.
    #[error("message has no headers")]
    NoHeaders,
    /// A required header (named) is absent or blank.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header's value is not valid: not a number where one is expected, or a message type
    /// that is not a subject token (letters, digits, `-`, `_`).
    #[error("header {header} is not valid: {value:?}")]
    BadHeader {
        /// The header's name.
        header: &'static str,
        /// Its value as received.
        value: String,
    },
    /// The schema version is 0 or newer than [`SCHEMA_VERSION`] (`u32::MAX`: out of range).
    #[error("unsupported schema version {0} (this build reads up to {SCHEMA_VERSION})")]
    UnsupportedSchema(u32),
}

impl Envelope {
    /// A first message of a business transaction: it is its own correlation and causation.
    pub fn first(id: String, msg_type: &str, source: &str, occurred_at_ms: u64) -> Self {
        let traceparent = Some(traceparent(&trace_id_of(&id), &id));
        Envelope {
            correlation_id: id.clone(),
            causation_id: id.clone(),
            id,
            msg_type: msg_type.to_string(),
            schema: SCHEMA_VERSION,
            source: source.to_string(),
            occurred_at_ms,
            traceparent,
        }
    }

    /// The same first message, correlated by a business id (e.g. the order id) so that every
    /// message of the transaction carries it.
    pub fn correlated(mut self, correlation_id: &str) -> Self {
        self.correlation_id = correlation_id.to_string();
        self.traceparent = Some(traceparent(&trace_id_of(correlation_id), &self.id));
        self
    }

    /// The W3C trace id (32 hex digits) of this message's trace.
    pub fn trace_id(&self) -> String {
        self.traceparent
            .as_deref()
            .and_then(|t| t.split('-').nth(1))
            .filter(|t| t.len() == 32)
            .map(str::to_string)
            .unwrap_or_else(|| trace_id_of(&self.correlation_id))
    }

    /// A message caused by `cause`, with a deterministic id: re-running the same handler on
    /// the same input yields the same ids, so downstream deduplication still holds.
    pub fn caused_by(
        cause: &Envelope,
        scope: &str,
        index: usize,
        msg_type: &str,
        source: &str,
        occurred_at_ms: u64,
    ) -> Self {
        let id = derived_id_after(&cause.id, &format!("{scope}/{}/{index}", cause.id));
        Envelope {
            traceparent: Some(traceparent(&cause.trace_id(), &id)),
            id,
            msg_type: msg_type.to_string(),
            schema: SCHEMA_VERSION,
            correlation_id: cause.correlation_id.clone(),
            causation_id: cause.id.clone(),
            source: source.to_string(),
            occurred_at_ms,
        }
    }

    /// The headers this envelope is sent with.
    pub fn to_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name(headers::ID), self.id.as_str());
        h.insert(name(headers::NATS_MSG_ID), self.id.as_str());
        h.insert(name(headers::TYPE), self.msg_type.as_str());
        h.insert(name(headers::SCHEMA), self.schema.to_string());
        h.insert(name(headers::CORRELATION), self.correlation_id.as_str());
        h.insert(name(headers::CAUSATION), self.causation_id.as_str());
        h.insert(name(headers::SOURCE), self.source.as_str());
        h.insert(name(headers::OCCURRED_AT), self.occurred_at_ms.to_string());
        if let Some(t) = &self.traceparent {
            h.insert(name(headers::TRACEPARENT), t.as_str());
        }
        h
    }

    /// Reads an envelope from received headers. `Choreo-Id` is required; `Nats-Msg-Id` is not
    /// consulted (a message re-published after the duplicate window may carry another).
    pub fn from_headers(h: Option<&HeaderMap>) -> Result<Self, EnvelopeError> {
        let h = h.ok_or(EnvelopeError::NoHeaders)?;
        let get = |name: &'static str| -> Result<String, EnvelopeError> {
            let v = h
                .get(self::name(name))
                .map(|v| v.as_str().trim())
                .filter(|v| !v.is_empty())
                .ok_or(EnvelopeError::MissingHeader(name))?;
            Ok(v.to_string())
        };
        let number = |name: &'static str| -> Result<u64, EnvelopeError> {
            let v = get(name)?;
            v.parse::<u64>().map_err(|_| EnvelopeError::BadHeader {
                header: name,
                value: v,
            })
        };
        let schema = number(headers::SCHEMA)?;
        let schema =
            u32::try_from(schema).map_err(|_| EnvelopeError::UnsupportedSchema(u32::MAX))?;
        if schema == 0 || schema > SCHEMA_VERSION {
            return Err(EnvelopeError::UnsupportedSchema(schema));
        }
        let msg_type = get(headers::TYPE)?;
        if !is_token(&msg_type) {
            return Err(EnvelopeError::BadHeader {
                header: headers::TYPE,
                value: msg_type,
            });
        }
        Ok(Envelope {
            id: get(headers::ID)?,
            msg_type,
            schema,
            correlation_id: get(headers::CORRELATION)?,
            causation_id: get(headers::CAUSATION)?,
            source: get(headers::SOURCE)?,
            occurred_at_ms: number(headers::OCCURRED_AT)?,
            traceparent: h
                .get(name(headers::TRACEPARENT))
                .map(|v| v.as_str().to_string())
                .filter(|t| valid_traceparent(t)),
        })
    }
}

/// A header name without an allocation (async-nats turns a `&str` into an owned name on
/// every insert and lookup: 18 allocations per message on the hot path).
fn name(header: &'static str) -> HeaderName {
    HeaderName::from_static(header)
}

/// A 32-hex-digit trace id derived from a correlation id.
pub fn trace_id_of(correlation_id: &str) -> String {
    uuid::Uuid::parse_str(&derived_id(&format!("trace/{correlation_id}")))
        .map(|u| u.simple().to_string())
        .unwrap_or_default()
}

fn traceparent(trace_id: &str, span_source: &str) -> String {
    let span = &trace_id_of(span_source)[..16];
    format!("00-{trace_id}-{span}-01")
}

fn valid_traceparent(t: &str) -> bool {
    let p: Vec<&str> = t.split('-').collect();
    p.len() == 4
        && p[1].len() == 32
        && p[2].len() == 16
        && p.iter().all(|x| x.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// True for a string usable as one NATS subject token (no dots, spaces or wildcards).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh message id: a UUID v7, which starts with the time in milliseconds, so ids sort by
/// time. Every receiver keeps an inbox mark per message id; ids of the same moment sit
/// together in its store (see [`derived_id_after`]), where random ids would touch a page of
/// the store's inbox per message (bench/PROFILE.md).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The namespace of derived ids.
const NS: uuid::Uuid = uuid::Uuid::from_u128(0x6368_6f72_656f_4000_8000_0000_0000_0001);

/// A deterministic id derived from a name (UUID v5 in a Choreo namespace).
pub fn derived_id(name: &str) -> String {
    named(name).to_string()
}

fn named(name: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&NS, name.as_bytes())
}

/// A deterministic id for a message caused by `cause_id`: the v5 hash of `name`, with its
/// first 48 bits taken from `cause_id` (a UUID v8, Choreo's own layout). For a cause that is
/// itself a [`new_id`] or one of these, those bits are the time of the message that started
/// the chain, so a whole workflow's ids sort by when it began. A cause id that is not a UUID
/// (any producer may choose its own) gives the plain v5 id.
pub fn derived_id_after(cause_id: &str, name: &str) -> String {
    let hashed = named(name);
    let Ok(cause) = uuid::Uuid::parse_str(cause_id) else {
        return hashed.to_string();
    };
    let mut bytes = hashed.into_bytes();
    bytes[..6].copy_from_slice(&cause.as_bytes()[..6]);
    uuid::Uuid::new_v8(bytes).to_string()
}

/// A copy of `h` without `Nats-Msg-Id`: for publishing a stored message again as a new NATS
/// message (a dead letter, a replay) that keeps its envelope.
pub fn headers_without_msg_id(h: Option<&HeaderMap>) -> HeaderMap {
    let mut copy = HeaderMap::new();
    for (name, values) in h.into_iter().flat_map(|h| h.iter()) {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(headers::NATS_MSG_ID) {
            continue;
        }
        for v in values {
            copy.append(name, v.as_str());
        }
    }
    copy
}

/// Wall-clock milliseconds since the Unix epoch. Only the runtime's edge reads the clock;
/// deciders receive time as data.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_limit_counts_payload_and_header_names_and_values() {
        let mut h = HeaderMap::new();
        h.insert("Choreo-Id", "abc");
        h.append("X-Two", "1");
        h.append("X-Two", "22");
        // 9 + 3, then 5 + 1 and 5 + 2, plus a 4-byte payload.
        assert_eq!(message_size(Some(&h), b"{}{}"), 12 + 6 + 7 + 4);
        assert_eq!(message_size(None, b"{}"), 2);
    }

    #[test]
    fn headers_round_trip() {
        let e = Envelope::first(new_id(), "PlaceOrder", "client", 1_700_000_000_000);
        let h = e.to_headers();
        assert_eq!(h.get(headers::NATS_MSG_ID).unwrap().as_str(), e.id);
        assert_eq!(Envelope::from_headers(Some(&h)).unwrap(), e);
    }

    #[test]
    fn missing_and_bad_headers_are_named() {
        assert_eq!(Envelope::from_headers(None), Err(EnvelopeError::NoHeaders));
        let e = Envelope::first("a".into(), "PlaceOrder", "client", 1);
        let mut h = e.to_headers();
        h.insert(headers::CORRELATION, "");
        assert_eq!(
            Envelope::from_headers(Some(&h)),
            Err(EnvelopeError::MissingHeader(headers::CORRELATION))
        );
        let mut h = e.to_headers();
        h.insert(headers::OCCURRED_AT, "yesterday");
        assert!(matches!(
            Envelope::from_headers(Some(&h)),
            Err(EnvelopeError::BadHeader {
                header: headers::OCCURRED_AT,
                ..
            })
        ));
        let mut h = e.to_headers();
        h.insert(headers::SCHEMA, "9");
        assert_eq!(
            Envelope::from_headers(Some(&h)),
            Err(EnvelopeError::UnsupportedSchema(9))
        );
        let mut h = e.to_headers();
        h.insert(headers::TYPE, "a.b");
        assert!(Envelope::from_headers(Some(&h)).is_err());
    }

    #[test]
    fn caused_ids_are_deterministic_and_distinct() {
        let cause = Envelope::first("c1".into(), "OrderPlaced", "orders", 5);
        let a = Envelope::caused_by(&cause, "inventory", 0, "StockReserved", "inventory", 6);
        let b = Envelope::caused_by(&cause, "inventory", 0, "StockReserved", "inventory", 7);
        let c = Envelope::caused_by(&cause, "inventory", 1, "StockReserved", "inventory", 6);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(a.correlation_id, "c1");
        assert_eq!(a.causation_id, "c1");
    }

    #[test]
    fn ids_sort_by_the_time_their_chain_began() {
        let earlier = Envelope::first(new_id(), "PlaceOrder", "client", 1);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = Envelope::first(new_id(), "PlaceOrder", "client", 2);
        assert!(earlier.id < later.id, "{} < {}", earlier.id, later.id);
        // Caused ids keep the root's time prefix (and are still deterministic and distinct).
        let a = Envelope::caused_by(&earlier, "s", 0, "OrderPlaced", "orders", 3);
        let b = Envelope::caused_by(&a, "inventory", 0, "StockReserved", "inventory", 4);
        let again = Envelope::caused_by(&a, "inventory", 0, "StockReserved", "inventory", 9);
        assert_eq!(b.id, again.id);
        assert_ne!(a.id, b.id);
        for id in [&a.id, &b.id] {
            assert_eq!(id[..13], earlier.id[..13], "{id} after {}", earlier.id);
            assert!(id < &later.id, "{id} sorts before the later chain");
            assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 8);
        }
        // A cause id that is not a UUID gives the plain v5 id of the same name.
        assert_eq!(derived_id_after("m1", "s/m1/0"), derived_id("s/m1/0"));
    }

    #[test]
    fn traceparent_travels_with_the_correlation() {
        let first = Envelope::first("m1".into(), "PlaceOrder", "client", 1).correlated("order-7");
        let caused = Envelope::caused_by(&first, "s", 0, "OrderPlaced", "orders", 2);
        let t = caused.traceparent.clone().unwrap();
        assert!(valid_traceparent(&t), "{t}");
        assert_eq!(caused.trace_id(), first.trace_id());
        assert_ne!(caused.traceparent, first.traceparent, "a new span id");
        let back = Envelope::from_headers(Some(&caused.to_headers())).unwrap();
        assert_eq!(back.traceparent.as_deref(), Some(t.as_str()));
        // A client's own traceparent is kept; a malformed one is ignored.
        let mut h = first.to_headers();
        h.insert(
            headers::TRACEPARENT,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        assert_eq!(
            Envelope::from_headers(Some(&h)).unwrap().trace_id(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        h.insert(headers::TRACEPARENT, "garbage");
        assert_eq!(Envelope::from_headers(Some(&h)).unwrap().traceparent, None);
    }
}
