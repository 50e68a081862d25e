//! Who a process is on NATS and how it proves it: an nkey seed or a credentials file (JWT
//! and seed), TLS with the CA the server's certificate must chain to (and a client
//! certificate for servers that verify clients), and the inbox prefix its replies come to.
//! Also what the server says when it refuses one of the process's operations: every
//! permission violation is counted (`choreo_nats_permission_violations_total`), logged once
//! per operation and subject, and a refused subscription makes the node not ready (it can no
//! longer receive what it needs).
//!
//! The same settings come from a node's config file (`[nats]`), its flags and the
//! environment (`CHOREO_NATS_SEED`, `CHOREO_NATS_CREDS`, `CHOREO_NATS_CA`,
//! `CHOREO_NATS_CERT`, `CHOREO_NATS_KEY`: each a file's path); the CLI's commands read the
//! environment. See docs/security.md.

use std::path::PathBuf;
use std::sync::Arc;

use async_nats::{ConnectOptions, Event, ServerError};
use serde::{Deserialize, Serialize};

use crate::telemetry::access::{self, first_time};

/// How a process proves who it is to NATS. Nothing set: anonymous, plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    /// A file holding the identity's nkey seed (`SU...`, as `choreo auth gen` writes it).
    pub seed_file: Option<PathBuf>,
    /// A credentials file (user JWT and seed, as `nsc` writes it): the JWT flow.
    pub credentials_file: Option<PathBuf>,
    /// The CA certificate (PEM) the server's certificate must chain to; set, the connection
    /// must be TLS (plaintext is refused).
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), for a server that verifies its clients.
    pub tls_cert: Option<PathBuf>,
    /// The key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// The environment variable of [`NatsAuth::seed_file`]. Like every `ENV_*` variable of
/// [`NatsAuth`], it holds a file's path.
pub const ENV_SEED: &str = "CHOREO_NATS_SEED";
/// The environment variable of [`NatsAuth::credentials_file`].
pub const ENV_CREDS: &str = "CHOREO_NATS_CREDS";
/// The environment variable of [`NatsAuth::tls_ca`].
pub const ENV_CA: &str = "CHOREO_NATS_CA";
/// The environment variable of [`NatsAuth::tls_cert`].
pub const ENV_CERT: &str = "CHOREO_NATS_CERT";
/// The environment variable of [`NatsAuth::tls_key`].
pub const ENV_KEY: &str = "CHOREO_NATS_KEY";

impl NatsAuth {
    /// The settings from the environment alone.
    pub fn from_env() -> Self {
        NatsAuth::default().with_env()
    }

    /// These settings with every one the environment sets in its place.
    pub fn with_env(mut self) -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        for (name, slot) in [
            (ENV_SEED, &mut self.seed_file),
            (ENV_CREDS, &mut self.credentials_file),
            (ENV_CA, &mut self.tls_ca),
            (ENV_CERT, &mut self.tls_cert),
            (ENV_KEY, &mut self.tls_key),
        ] {
            if let Some(v) = var(name) {
                *slot = Some(v);
            }
        }
        self
    }

    /// Whether the process presents any identity or uses TLS.
    pub fn is_set(&self) -> bool {
        *self != NatsAuth::default()
    }

    /// Refuses settings that cannot work together, before any connection is tried.
    pub fn check(&self) -> Result<(), String> {
        if self.seed_file.is_some() && self.credentials_file.is_some() {
            return Err("nats: a seed file and a credentials file are both set; use one".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("nats: tls_cert and tls_key go together".into());
        }
        for path in [
            &self.seed_file,
            &self.credentials_file,
            &self.tls_ca,
            &self.tls_cert,
            &self.tls_key,
        ]
        .into_iter()
        .flatten()
        {
            if !path.is_file() {
                return Err(format!("nats: {} is not a readable file", path.display()));
            }
        }
        Ok(())
    }

    /// `opts` with this identity and TLS. A failure names the file and why.
    pub(crate) async fn apply(&self, mut opts: ConnectOptions) -> Result<ConnectOptions, String> {
        self.check()?;
        if let Some(path) = &self.seed_file {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| format!("nkey seed {}: {e}", path.display()))?;
            let seed = seed.trim().to_string();
            nkeys::KeyPair::from_seed(&seed)
                .map_err(|e| format!("nkey seed {}: not a seed ({e})", path.display()))?;
            opts = opts.nkey(seed);
        }
        if let Some(path) = &self.credentials_file {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| format!("credentials file {}: {e}", path.display()))?;
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(opts)
    }
}

/// What a connection is, beyond where it goes: its identity, its inbox prefix (a context's
/// replies come to `_INBOX_<ns>_<context>.`, the only inbox its rights let it read) and the
/// label its permission violations are counted under.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Its credentials and TLS settings.
    pub auth: NatsAuth,
    /// The prefix of its reply inboxes ([`inbox_prefix()`]); `None`: the client's default
    /// (`_INBOX`).
    pub inbox_prefix: Option<String>,
    /// `context` label of `choreo_nats_permission_violations_total` (`client` when empty).
    pub label: String,
}

/// The inbox prefix of `context`'s connections in namespace `ns`.
pub fn inbox_prefix(ns: &str, context: &str) -> String {
    format!("_INBOX_{ns}_{context}").replace(['.', '*', '>', ' '], "_")
}

/// Whether `reply` is a subject a responder may answer on: an inbox (`_INBOX.` or a
/// custom `_INBOX_...` prefix), never a subject a stream stores. A request whose reply
/// subject is anything else is refused without an answer (it would make the node write
/// there with its own rights).
pub fn is_inbox(reply: &str) -> bool {
    reply.starts_with("_INBOX.") || reply.starts_with("_INBOX_")
}

/// Replies refused: requests whose reply subject was not an inbox.
pub fn refuse_reply(context: &str, service: &str, reply: &str) {
    access::REFUSED_REPLIES
        .with_label_values(&[context, service])
        .inc();
    if first_time(format!("reply {context} {service} {reply}")) {
        tracing::error!(
            context,
            service,
            reply,
            "refused a request whose reply subject is not an inbox (it could make this node write into a stream)"
        );
    }
}

/// The operation and subject of a permission violation the server reported:
/// `Permissions Violation for Publish to "x"` gives `("publish", "x")`.
pub fn permission_violation(message: &str) -> Option<(&'static str, &str)> {
    let rest = message.trim().strip_prefix("Permissions Violation for ")?;
    let (op, rest) = if let Some(r) = rest.strip_prefix("Publish to ") {
        ("publish", r)
    } else if let Some(r) = rest.strip_prefix("Subscription to ") {
        ("subscribe", r)
    } else {
        ("other", rest)
    };
    let subject = rest.trim().trim_matches('"');
    let subject = subject.split('"').next().unwrap_or(subject);
    Some((op, subject))
}

/// The connection-event callback of a connection labelled `label`: counts and logs what
/// the server refused.
pub(crate) fn on_event(label: Arc<str>) -> impl Fn(Event) -> futures::future::Ready<()> {
    move |event| {
        if let Event::ServerError(e) = event {
            server_error(&label, &e);
        }
        futures::future::ready(())
    }
}

fn server_error(label: &str, e: &ServerError) {
    let label = if label.is_empty() { "client" } else { label };
    match e {
        ServerError::Other(message) => {
            let Some((op, subject)) = permission_violation(message) else {
                tracing::warn!(context = label, error = %message, "NATS server error");
                return;
            };
            access::PERMISSION_VIOLATIONS
                .with_label_values(&[label, op])
                .inc();
            if op == "subscribe" {
                access::refuse_subscription();
            }
            if first_time(format!("{label} {op} {subject}")) {
                tracing::error!(
                    context = label,
                    op,
                    subject,
                    "NATS refused the operation: not in this identity's rights (see docs/security.md; counted in choreo_nats_permission_violations_total)"
                );
            }
        }
        ServerError::AuthorizationViolation => {
            access::PERMISSION_VIOLATIONS
                .with_label_values(&[label, "connect"])
                .inc();
            tracing::error!(
                context = label,
                "NATS refused this identity (authorization violation)"
            );
        }
        ServerError::SlowConsumer(sid) => {
            tracing::warn!(context = label, sid, "NATS: slow consumer")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_violation_names_its_operation_and_subject() {
        assert_eq!(
            permission_violation(
                r#"Permissions Violation for Publish to "choreo.payments.evt.PaymentCaptured""#
            ),
            Some(("publish", "choreo.payments.evt.PaymentCaptured"))
        );
        assert_eq!(
            permission_violation(r#"Permissions Violation for Subscription to "choreo.>""#),
            Some(("subscribe", "choreo.>"))
        );
        assert_eq!(
            permission_violation(
                r#"Permissions Violation for Subscription to "x" using queue "q""#
            ),
            Some(("subscribe", "x"))
        );
        assert_eq!(permission_violation("Stale Connection"), None);
    }

    #[test]
    fn each_refusal_is_logged_once() {
        assert!(first_time("payments publish choreo.orders.evt.X".into()));
        assert!(!first_time("payments publish choreo.orders.evt.X".into()));
        assert!(first_time("payments publish choreo.orders.evt.Y".into()));
    }

    #[test]
    fn replies_go_to_inboxes_only() {
        assert!(is_inbox("_INBOX.abc.1"));
        assert!(is_inbox("_INBOX_choreo_orders.abc"));
        assert!(!is_inbox("choreo.orders.evt.OrderPlaced"));
        assert!(!is_inbox("$JS.API.STREAM.DELETE.CHOREO_ORDERS"));
        assert!(!is_inbox("_INBOXES"));
        assert_eq!(inbox_prefix("choreo", "orders"), "_INBOX_choreo_orders");
    }

    #[test]
    fn settings_that_cannot_work_are_refused_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("seed");
        std::fs::write(&f, "x").unwrap();
        let both = NatsAuth {
            seed_file: Some(f.clone()),
            credentials_file: Some(f.clone()),
            ..Default::default()
        };
        assert!(both.check().unwrap_err().contains("use one"));
        let half = NatsAuth {
            tls_cert: Some(f.clone()),
            ..Default::default()
        };
        assert!(half.check().unwrap_err().contains("go together"));
        let missing = NatsAuth {
            seed_file: Some(dir.path().join("nope")),
            ..Default::default()
        };
        assert!(missing.check().unwrap_err().contains("not a readable file"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bad_seed = NatsAuth {
            seed_file: Some(f),
            ..Default::default()
        };
        let e = rt
            .block_on(bad_seed.apply(ConnectOptions::new()))
            .err()
            .unwrap();
        assert!(e.contains("not a seed"), "{e}");
    }
}
