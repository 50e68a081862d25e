//! What a node tells its operators: every Prometheus metric, readiness, the HTTP endpoint
//! that serves both, and the in-memory saga counts behind the saga gauges.
//!
//! The lowest room of the runtime: it depends on nothing else in the crate.

pub mod access;
pub mod endpoint;
pub mod health;
pub mod metrics;
pub mod saga_counts;

pub use health::Health;
