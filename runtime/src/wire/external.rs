//! Requests to external systems (payment gateway, carrier) over NATS request/reply.
//!
//! Reply convention: a JSON object. `{"error": "..."}` is an infrastructure failure of the
//! external system (transient: the message is retried); anything else is its answer,
//! including business refusals such as `{"approved": false, "reason": "card_declined"}`.

use std::time::{Duration, Instant};

use async_nats::Request;
use bytes::Bytes;

use crate::telemetry::metrics;

/// A request to an external system, made by the runtime between a component's `plan` and
/// its `handle`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalCall {
    /// System name (bounded; used in metrics and to pick the system's circuit breaker).
    pub system: &'static str,
    /// The request subject, `choreo.ext.<system>.<operation>` ([`subjects::external`]).
    ///
    /// [`subjects::external`]: crate::wire::subjects::external
    pub subject: String,
    /// JSON request body. It must carry an idempotency key: the call is repeated if the
    /// message is redelivered before its transaction commits.
    pub body: String,
}

/// Why an external call gave no usable answer. Always transient.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// No reply came in time.
    #[error("{system}: no reply within {timeout:?}")]
    Timeout {
        /// The system called.
        system: &'static str,
        /// How long the call waited.
        timeout: Duration,
    },
    /// The request could not be made (no responders, no connection).
    #[error("{system}: request failed: {message}")]
    Request {
        /// The system called.
        system: &'static str,
        /// Why the request failed.
        message: String,
    },
    /// The system answered `{"error": ...}`: a failure on its side.
    #[error("{system}: reported error: {message}")]
    Failed {
        /// The system called.
        system: &'static str,
        /// The error it reported.
        message: String,
    },
    /// The reply is not JSON.
    #[error("{system}: reply is not JSON: {message}")]
    BadReply {
        /// The system called.
        system: &'static str,
        /// Why the reply did not parse.
        message: String,
    },
}

/// Sends the call and waits at most `timeout` for the reply.
pub async fn call(
    client: &async_nats::Client,
    call: &ExternalCall,
    timeout: Duration,
) -> Result<serde_json::Value, ExternalError> {
    let started = Instant::now();
    let system = call.system;
    let req = Request::new()
        .payload(Bytes::from(call.body.clone()))
        .timeout(Some(timeout));
    let result = match client.send_request(call.subject.clone(), req).await {
        Ok(msg) => match serde_json::from_slice::<serde_json::Value>(&msg.payload) {
            Ok(v) => match v.get("error").and_then(|e| e.as_str()) {
                Some(e) => Err(ExternalError::Failed {
                    system,
                    message: e.to_string(),
                }),
                None => Ok(v),
            },
            Err(e) => Err(ExternalError::BadReply {
                system,
                message: e.to_string(),
            }),
        },
        Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
            Err(ExternalError::Timeout { system, timeout })
        }
        Err(e) => Err(ExternalError::Request {
            system,
            message: e.to_string(),
        }),
    };
    let label = match &result {
        Ok(_) => "ok",
        Err(ExternalError::Timeout { .. }) => "timeout",
        Err(_) => "error",
    };
    metrics::EXTERNAL_SECONDS
        .with_label_values(&[system, label])
        .observe(started.elapsed().as_secs_f64());
    result
}
