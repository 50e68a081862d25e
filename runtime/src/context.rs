//! A bounded context as a node hosts it: its components, its read-model queries and its
//! sagas.

use std::sync::Arc;
use std::time::Duration;

use crate::component::DynComponent;
use crate::saga::DynSaga;
use crate::store::{StateError, StateRead};

/// A read-model query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("unknown query {0:?}")]
    Unknown(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("store: {0}")]
    Store(String),
}

impl From<StateError> for QueryError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Tx(t) => QueryError::Store(t.to_string()),
            StateError::Corrupt(m) => QueryError::Store(m),
        }
    }
}

/// Reads one string field of a JSON query request.
pub fn request_field(req: &[u8], field: &str) -> Result<String, QueryError> {
    let v: serde_json::Value =
        serde_json::from_slice(req).map_err(|e| QueryError::BadRequest(e.to_string()))?;
    v.get(field)
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .ok_or_else(|| QueryError::BadRequest(format!("missing string field {field:?}")))
}

/// One bounded context: its components and its read-model queries.
pub trait Context: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn components(&self) -> Vec<Arc<dyn DynComponent>>;
    /// Query names served on `choreo.<ctx>.query.<name>`.
    fn queries(&self) -> Vec<&'static str>;
    /// Process managers hosted by this context (deadlines, inspection). Each is also listed
    /// in `components` for its message subscriptions.
    fn sagas(&self) -> Vec<Arc<dyn DynSaga>> {
        vec![]
    }
    /// Answers a read-model query with a JSON value.
    fn query(
        &self,
        state: &dyn StateRead,
        name: &str,
        request: &[u8],
    ) -> Result<serde_json::Value, QueryError>;
}

/// Default timeout of a request to another context's query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
