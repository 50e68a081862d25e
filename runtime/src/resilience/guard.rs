//! The handler guard: one message's handling bounded in time, with a panic in it caught.
//! Both are transient failures of the message; a panic also restarts its consumer actor.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

/// Why a guarded handling did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    /// It panicked; the panic's message.
    #[error("handler panicked: {0}")]
    Panicked(String),
    /// It did not finish within this time.
    #[error("handler timed out after {} ms", .0.as_millis())]
    TimedOut(Duration),
}

/// Runs `fut` for at most `timeout`, catching a panic in it.
pub async fn guarded<T>(timeout: Duration, fut: impl Future<Output = T>) -> Result<T, Interrupted> {
    match tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(panic)) => Err(Interrupted::Panicked(panic_message(&panic))),
        Err(_) => Err(Interrupted::TimedOut(timeout)),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_results_and_catches_panics_and_timeouts() {
        let limit = Duration::from_millis(50);
        assert_eq!(guarded(limit, async { 7 }).await, Ok(7));
        let panicked = guarded(limit, async { panic!("boom") }).await;
        assert_eq!(panicked, Err::<(), _>(Interrupted::Panicked("boom".into())));
        let slow = guarded(limit, tokio::time::sleep(Duration::from_secs(5))).await;
        assert_eq!(slow, Err(Interrupted::TimedOut(limit)));
        assert_eq!(
            slow.unwrap_err().to_string(),
            "handler timed out after 50 ms"
        );
    }
}
