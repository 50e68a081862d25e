//! Calls to external systems as the message path makes them: the system's circuit breaker
//! around the request, the `external_call` fault point, and the request's timeout.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::breaker::Breakers;
use crate::wire::envelope::now_ms;
use crate::wire::external::{self, ExternalCall, ExternalError};

/// Why an external call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The system's breaker is open: try again after this long (not the message's fault).
    #[error("circuit breaker open; retry in {0:?}")]
    Open(Duration),
    /// The call was made and failed (a transient failure of the message).
    #[error(transparent)]
    Failed(#[from] ExternalError),
}

/// Makes external calls for the message path (a trait, so that the path can be tested
/// without a NATS server).
pub trait Calls: Send + Sync {
    /// Makes `call` for a message of `msg_type` (`payload`: its body, for fault rules).
    fn call<'a>(
        &'a self,
        call: &'a ExternalCall,
        msg_type: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<serde_json::Value, CallError>>;
}

impl Calls for ExternalCalls {
    fn call<'a>(
        &'a self,
        call: &'a ExternalCall,
        msg_type: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<serde_json::Value, CallError>> {
        Box::pin(ExternalCalls::call(self, call, msg_type, payload))
    }
}

/// The external calls of one context over NATS; cheap to clone.
#[derive(Clone)]
pub struct ExternalCalls {
    client: async_nats::Client,
    breakers: Arc<Breakers>,
    timeout: Duration,
    #[cfg(feature = "faults")]
    faults: Arc<crate::faults::Faults>,
    #[cfg(feature = "faults")]
    context: &'static str,
}

impl ExternalCalls {
    /// Calls over `client`, each through its system's breaker from `breakers` and bounded
    /// by `timeout`.
    pub(crate) fn new(
        client: async_nats::Client,
        breakers: Arc<Breakers>,
        timeout: Duration,
    ) -> Self {
        ExternalCalls {
            client,
            breakers,
            timeout,
            #[cfg(feature = "faults")]
            faults: Arc::new(crate::faults::Faults::new(&Default::default())),
            #[cfg(feature = "faults")]
            context: "",
        }
    }

    /// The same calls with `context`'s fault rules at the `external_call` point.
    #[cfg(feature = "faults")]
    pub fn with_faults(
        mut self,
        faults: Arc<crate::faults::Faults>,
        context: &'static str,
    ) -> Self {
        self.faults = faults;
        self.context = context;
        self
    }

    /// Makes `call` for a message of `msg_type` (`payload`: its body, for fault rules), if
    /// the system's breaker lets it through, and records the result with the breaker.
    pub async fn call(
        &self,
        call: &ExternalCall,
        msg_type: &str,
        payload: &[u8],
    ) -> Result<serde_json::Value, CallError> {
        let breaker = self.breakers.get(call.system);
        let permit = breaker
            .acquire(now_ms())
            .map_err(|open| CallError::Open(open.retry_after))?;
        let result = self.request(call, msg_type, payload).await;
        breaker.record(permit, result.is_ok(), now_ms());
        Ok(result?)
    }

    #[cfg_attr(not(feature = "faults"), allow(unused_variables))]
    async fn request(
        &self,
        call: &ExternalCall,
        msg_type: &str,
        payload: &[u8],
    ) -> Result<serde_json::Value, ExternalError> {
        crate::fault!(async self.faults, ExternalCall, self.context, msg_type, payload, |injected| {
            return match injected {
                crate::faults::Injected::Error => Err(ExternalError::Failed {
                    system: call.system,
                    message: "injected error".into(),
                }),
                // The system acts on the request; its reply is lost on the way back.
                crate::faults::Injected::Drop => external::call(&self.client, call, self.timeout)
                    .await
                    .and(Err(ExternalError::Timeout {
                        system: call.system,
                        timeout: self.timeout,
                    })),
            };
        });
        external::call(&self.client, call, self.timeout).await
    }
}
