//! Readiness: what `/readyz` answers, shared between the node and the HTTP endpoint.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Readiness shared between the node and the HTTP endpoint.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    /// The node's NATS connections (one, or one per hosted context and one for the node).
    nats: Arc<Mutex<Vec<async_nats::Client>>>,
    /// One flag per store, set while its last flush failed.
    stores: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    /// Consumers stopped after exceeding their restart limit.
    degraded: Arc<AtomicUsize>,
}

impl Health {
    /// Marks the node started (`true`) or shutting down (`false`); the other conditions of
    /// [`Health::is_ready`] still apply.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    /// Ready: started, not shutting down, connected to NATS, the stores writable, no
    /// consumer stopped by its restart limit, and no subscription refused by the server.
    pub fn is_ready(&self) -> bool {
        let nats_ok = self
            .nats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .all(|c| c.connection_state() == async_nats::connection::State::Connected);
        self.ready.load(Ordering::SeqCst)
            && nats_ok
            && !self.store_failed()
            && self.degraded.load(Ordering::SeqCst) == 0
            && !super::access::subscription_refused()
    }
    /// A new store's flag: its flusher sets it while flushes fail.
    pub fn store_flag(&self) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(flag.clone());
        flag
    }
    /// Some store's last flush failed.
    pub fn store_failed(&self) -> bool {
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|f| f.load(Ordering::SeqCst))
    }
    /// Readiness follows this client's connection (too) from now on.
    pub fn watch_nats(&self, client: async_nats::Client) {
        self.nats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client);
    }
    /// A consumer exceeded its restart limit and stopped.
    pub fn degrade(&self) {
        self.degraded.fetch_add(1, Ordering::SeqCst);
    }
    /// A stopped consumer resumed.
    pub fn recover(&self) {
        let _ = self
            .degraded
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}
