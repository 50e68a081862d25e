//! The bulkhead of one durable consumer: at most `max_in_flight` messages in handling at
//! once, shown in `choreo_bulkhead_in_use`.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics;

/// A consumer's bulkhead; cheap to clone.
#[derive(Clone)]
pub struct Bulkhead {
    permits: Arc<Semaphore>,
    size: usize,
    in_use: IntGauge,
}

/// A place in the bulkhead, given back when dropped.
pub struct Place {
    _permit: OwnedSemaphorePermit,
    in_use: IntGauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.in_use.dec();
    }
}

impl Bulkhead {
    /// A bulkhead of `size` places for `consumer` of `context` (the labels of its gauge).
    pub(crate) fn new(size: usize, context: &str, consumer: &str) -> Self {
        let in_use = metrics::BULKHEAD_IN_USE.with_label_values(&[context, consumer]);
        in_use.set(0);
        Bulkhead {
            permits: Arc::new(Semaphore::new(size)),
            size,
            in_use,
        }
    }

    /// Waits for a place.
    pub async fn enter(&self) -> Place {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the bulkhead is never closed");
        self.in_use.inc();
        Place {
            _permit: permit,
            in_use: self.in_use.clone(),
        }
    }

    /// Waits until every place is free again (at most `limit`): the in-flight work ended.
    pub async fn drained(&self, limit: std::time::Duration) -> bool {
        tokio::time::timeout(limit, self.permits.acquire_many(self.size as u32))
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn at_most_size_places_and_the_gauge_follows() {
        let b = Bulkhead::new(2, "bulkhead-test", "c");
        let one = b.enter().await;
        let _two = b.enter().await;
        let gauge = || {
            metrics::BULKHEAD_IN_USE
                .with_label_values(&["bulkhead-test", "c"])
                .get()
        };
        assert_eq!(gauge(), 2);
        let third = tokio::time::timeout(Duration::from_millis(50), b.enter()).await;
        assert!(third.is_err(), "a third place while two are taken");
        assert!(!b.drained(Duration::from_millis(10)).await);
        drop(one);
        assert_eq!(gauge(), 1);
        let _three = tokio::time::timeout(Duration::from_millis(50), b.enter())
            .await
            .expect("a place after one was given back");
    }
}
