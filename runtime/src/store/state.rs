//! The state API components see: reads and writes of the `state` tree inside a transaction
//! ([`StateTx`]), reads outside one ([`StateRead`]), and typed JSON helpers over both.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::UnabortableTransactionError;

use super::StoreError;

/// A read or write inside a transaction failed; propagate it with `?` so the runtime can
/// retry the transaction on conflict.
#[derive(Debug)]
pub struct TxError(pub(crate) UnabortableTransactionError);

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "transaction: {}", self.0)
    }
}

/// Reads and writes of the `state` tree inside one transaction. Closures using it may run
/// more than once (on conflict): they must have no side effects besides these calls.
pub trait StateTx {
    /// The value under `key`, as this transaction sees it (its own writes included).
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TxError>;
    /// Writes `value` under `key`; it is stored only if the transaction commits.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), TxError>;
    /// Removes `key` (nothing if absent); it is removed only if the transaction commits.
    fn remove(&self, key: &str) -> Result<(), TxError>;
}

/// Reads of the `state` tree outside a transaction (plans and read-model queries).
pub trait StateRead {
    /// The value under `key`, as last committed.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// Failure of a typed state access.
#[derive(Debug)]
pub enum StateError {
    /// The transaction must be retried; propagate with `?`.
    Tx(TxError),
    /// A stored value could not be decoded or encoded.
    Corrupt(String),
}

impl From<TxError> for StateError {
    fn from(e: TxError) -> Self {
        StateError::Tx(e)
    }
}

/// Reads a JSON value from the state tree inside a transaction.
pub fn load<T: DeserializeOwned>(tx: &dyn StateTx, key: &str) -> Result<Option<T>, StateError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt(format!("{key}: {e}"))),
    }
}

/// Writes a JSON value to the state tree inside a transaction.
pub fn save<T: Serialize>(tx: &dyn StateTx, key: &str, value: &T) -> Result<(), StateError> {
    let bytes =
        serde_json::to_vec(value).map_err(|e| StateError::Corrupt(format!("{key}: {e}")))?;
    tx.put(key, &bytes)?;
    Ok(())
}

/// Reads a JSON value from the state tree outside a transaction.
pub fn read<T: DeserializeOwned>(r: &dyn StateRead, key: &str) -> Result<Option<T>, StateError> {
    match r.get(key).map_err(|e| StateError::Corrupt(e.to_string()))? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt(format!("{key}: {e}"))),
    }
}

/// Reads every JSON value under a key prefix outside a transaction.
pub fn read_all<T: DeserializeOwned>(
    r: &dyn StateRead,
    prefix: &str,
) -> Result<Vec<T>, StateError> {
    r.scan_prefix(prefix)
        .map_err(|e| StateError::Corrupt(e.to_string()))?
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_slice(&v).map_err(|e| StateError::Corrupt(format!("{k}: {e}")))
        })
        .collect()
}
