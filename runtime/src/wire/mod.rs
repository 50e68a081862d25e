//! The wire: what travels on NATS and how. The envelope and its headers, the subject and
//! stream layout, the connection with its streams, consumers and publishing, the state of
//! streams and their consumers, and requests to external systems.
//!
//! Architecture invariant: only this room knows the wire format; components see typed
//! inputs and return `Outgoing` values.

pub mod bus;
pub mod changelog;
mod connect;
pub mod envelope;
pub mod external;
pub mod identity;
pub mod lease;
pub mod streams;
pub mod subjects;
