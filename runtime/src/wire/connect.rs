//! The first connection to NATS: which failures may pass and are retried (and said so), and
//! which cannot and are reported at once. Used by `Bus::connect`.

use std::time::{Duration, Instant};

use async_nats::{ConnectError, ConnectErrorKind};

/// How often a retried connection is logged while the reason stays the same.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(5);

/// The pause between two attempts.
pub(crate) const RETRY_EVERY: Duration = Duration::from_millis(200);

/// What a failed attempt means for the next one. The text completes "NATS at <url> ...".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The server may come: nothing listening yet, no answer in time, a host name not
    /// resolved yet (a container starting), another I/O error.
    Transient(String),
    /// Retrying cannot help: not a NATS URL, a TLS failure, credentials refused.
    Permanent(String),
}

/// Sorts a failed connection attempt (async-nats 0.51's `ConnectErrorKind`).
pub(crate) fn classify(e: &ConnectError, timeout: Duration) -> Failure {
    use std::error::Error as _;
    let source = || {
        e.source()
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.kind().to_string())
    };
    match e.kind() {
        ConnectErrorKind::Io => {
            let kind = e
                .source()
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map(std::io::Error::kind);
            if kind == Some(std::io::ErrorKind::ConnectionRefused) {
                Failure::Transient("refused the connection".into())
            } else if kind == Some(std::io::ErrorKind::InvalidData) {
                // The TLS handshake failed: a certificate that does not chain to the CA.
                Failure::Permanent(format!("TLS failed ({})", source()))
            } else {
                Failure::Transient(format!("cannot be reached ({})", source()))
            }
        }
        ConnectErrorKind::TimedOut => {
            Failure::Transient(format!("did not answer within {}", secs(timeout)))
        }
        ConnectErrorKind::Dns => Failure::Transient(format!(
            "has a host name that does not resolve ({})",
            source()
        )),
        ConnectErrorKind::ServerParse => Failure::Permanent(format!(
            "not a NATS URL ({}); expected nats://host:port",
            source()
        )),
        ConnectErrorKind::Tls => Failure::Permanent(format!("TLS failed ({})", source())),
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            Failure::Permanent(format!("refused the credentials ({e})"))
        }
        // Not returned by a first connection; nothing to wait for if it were.
        ConnectErrorKind::MaxReconnects => Failure::Permanent(e.to_string()),
    }
}

/// A duration as whole seconds, rounded up: "15 s".
pub(crate) fn secs(d: Duration) -> String {
    format!("{} s", d.as_millis().div_ceil(1000))
}

/// When to log a retried connection: at the first failure, when the reason changes, and
/// then every [`LOG_EVERY`].
#[derive(Debug, Default)]
pub(crate) struct RetryLog {
    last: Option<(Instant, String)>,
}

impl RetryLog {
    /// Whether a failure for `reason` at `now` is to be logged (and noted as logged).
    pub(crate) fn due(&mut self, now: Instant, reason: &str) -> bool {
        let due = match &self.last {
            None => true,
            Some((at, last)) => last != reason || now.duration_since(*at) >= LOG_EVERY,
        };
        if due {
            self.last = Some((now, reason.to_string()));
        }
        due
    }

    /// Whether any failure was logged.
    pub(crate) fn logged(&self) -> bool {
        self.last.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn io(kind: std::io::ErrorKind) -> ConnectError {
        ConnectError::with_source(ConnectErrorKind::Io, std::io::Error::from(kind))
    }

    #[test]
    fn what_may_pass_is_transient() {
        assert_eq!(
            classify(&io(std::io::ErrorKind::ConnectionRefused), T),
            Failure::Transient("refused the connection".into())
        );
        assert!(matches!(
            classify(&io(std::io::ErrorKind::ConnectionReset), T),
            Failure::Transient(m) if m.starts_with("cannot be reached")
        ));
        assert_eq!(
            classify(&ConnectError::new(ConnectErrorKind::TimedOut), T),
            Failure::Transient("did not answer within 2 s".into())
        );
        let dns = ConnectError::with_source(ConnectErrorKind::Dns, "no such host");
        assert_eq!(
            classify(&dns, T),
            Failure::Transient("has a host name that does not resolve (no such host)".into())
        );
    }

    #[test]
    fn a_certificate_the_ca_does_not_sign_is_permanent() {
        let bad = ConnectError::with_source(
            ConnectErrorKind::Io,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "invalid peer certificate: UnknownIssuer",
            ),
        );
        assert_eq!(
            classify(&bad, T),
            Failure::Permanent("TLS failed (invalid peer certificate: UnknownIssuer)".into())
        );
    }

    #[test]
    fn what_cannot_pass_is_permanent() {
        let parse = ConnectError::with_source(
            ConnectErrorKind::ServerParse,
            "invalid scheme for NATS server URL: foo",
        );
        assert_eq!(
            classify(&parse, T),
            Failure::Permanent(
                "not a NATS URL (invalid scheme for NATS server URL: foo); expected nats://host:port"
                    .into()
            )
        );
        for kind in [
            ConnectErrorKind::Tls,
            ConnectErrorKind::Authentication,
            ConnectErrorKind::AuthorizationViolation,
            ConnectErrorKind::MaxReconnects,
        ] {
            assert!(
                matches!(classify(&ConnectError::new(kind), T), Failure::Permanent(_)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn an_invalid_url_is_permanent_from_async_nats_itself() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(async_nats::ConnectOptions::new().connect("foo://bar"))
            .expect_err("not a NATS URL");
        assert!(
            matches!(classify(&e, T), Failure::Permanent(m) if m.starts_with("not a NATS URL")),
            "{e}"
        );
    }

    #[test]
    fn retries_are_logged_first_on_change_and_every_few_seconds() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut log = RetryLog::default();
        assert!(!log.logged());
        assert!(log.due(at(0), "refused the connection"));
        assert!(!log.due(at(200), "refused the connection"));
        assert!(!log.due(at(4_900), "refused the connection"));
        assert!(log.due(at(5_000), "refused the connection"));
        assert!(log.due(at(5_200), "did not answer within 2 s"));
        assert!(!log.due(at(5_400), "did not answer within 2 s"));
        assert!(log.logged());
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(secs(Duration::from_secs(15)), "15 s");
        assert_eq!(secs(Duration::from_millis(14_001)), "15 s");
        assert_eq!(secs(Duration::from_millis(300)), "1 s");
        assert_eq!(secs(Duration::ZERO), "0 s");
    }
}
