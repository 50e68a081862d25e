//! The shop's client side: the runtime's client (`runtime::client`) with `anyhow` errors,
//! plus what only the shop has (readiness by its `summary` query, the simulators' ledgers).
//! Used by `load`, `demo`, `orders show` and the black-box tests.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use runtime::wire::bus::Bus;
use runtime::wire::envelope::{new_id, now_ms};
use runtime::{wire::subjects, Envelope, Message};

pub use runtime::client::CLIENT_SOURCE;

/// Connects to NATS. What may pass (refused, no answer, an unresolved host) is retried for
/// `wait` and said so on stderr (a warning, shown at the CLI's default log level) with the
/// URL and the reason; what cannot (not a NATS URL, TLS, credentials) fails at once.
pub async fn connect(url: &str, wait: Duration) -> anyhow::Result<Bus> {
    Ok(runtime::client::connect(url, wait).await?)
}

/// A stream and its last sequence now (what is stored later comes after it).
pub async fn stream_tip(
    bus: &Bus,
    name: &str,
) -> anyhow::Result<(async_nats::jetstream::stream::Stream, u64)> {
    let mut stream = bus.js.get_stream(name).await.context(name.to_string())?;
    let last = stream
        .info()
        .await
        .context(name.to_string())?
        .state
        .last_sequence;
    Ok((stream, last))
}

/// Publishes a command to `context` with a fresh envelope; waits for JetStream's ack.
pub async fn send_command<M: Message>(
    bus: &Bus,
    context: &str,
    msg: &M,
) -> anyhow::Result<Envelope> {
    let env = Envelope::first(new_id(), M::TYPE, CLIENT_SOURCE, now_ms());
    publish_command(bus, context, msg, env).await
}

/// Publishes a command given as JSON, of type `msg_type`, to `context` (any application's:
/// `choreo send`); waits for JetStream's ack.
pub async fn send_json(
    bus: &Bus,
    context: &str,
    msg_type: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Envelope> {
    runtime::client::send_json(bus, context, msg_type, body)
        .await
        .with_context(|| format!("send {msg_type} to {context}"))
}

/// Like [`send_command`], with a business correlation id (e.g. the order id): every message
/// the command causes carries it, so one order can be followed through every context's logs.
pub async fn send_correlated<M: Message>(
    bus: &Bus,
    context: &str,
    msg: &M,
    correlation: &str,
) -> anyhow::Result<Envelope> {
    let env = Envelope::first(new_id(), M::TYPE, CLIENT_SOURCE, now_ms()).correlated(correlation);
    publish_command(bus, context, msg, env).await
}

/// Like [`send_correlated`], but rides out a server restart: the same envelope is published
/// again until JetStream acks it (the server drops a repeat inside its duplicate window, and
/// the handler's inbox one outside it), for at most `give_up`.
pub async fn send_retrying<M: Message>(
    bus: &Bus,
    context: &str,
    msg: &M,
    correlation: &str,
    give_up: Duration,
) -> anyhow::Result<Envelope> {
    let env = Envelope::first(new_id(), M::TYPE, CLIENT_SOURCE, now_ms()).correlated(correlation);
    let deadline = std::time::Instant::now() + give_up;
    loop {
        match publish_command(bus, context, msg, env.clone()).await {
            Ok(env) => return Ok(env),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

async fn publish_command<M: Message>(
    bus: &Bus,
    context: &str,
    msg: &M,
    env: Envelope,
) -> anyhow::Result<Envelope> {
    let payload = Bytes::from(serde_json::to_vec(msg)?);
    runtime::client::publish(bus, context, env, payload)
        .await
        .with_context(|| format!("send {} to {context}", M::TYPE))
}

/// Asks a context's read model. Replies are `{"ok": value}` or `{"error": "..."}`.
pub async fn query(
    bus: &Bus,
    context: &str,
    name: &str,
    request: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    Ok(runtime::client::query(bus, context, name, request).await?)
}

/// Sends an inspection or operator request to a saga (`list`, `show`, `stuck`, `retry`).
pub async fn saga(
    bus: &Bus,
    saga: &str,
    op: &str,
    request: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    Ok(runtime::client::saga(bus, saga, op, request).await?)
}

/// Sends a fault-injection request (`inject`, `clear`, `list`) to the node hosting
/// `context`; its config must enable faults.
pub async fn faults(
    bus: &Bus,
    context: &str,
    request: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let hint = format!("is a node hosting {context} running?");
    let subject = subjects::admin(context, "faults");
    Ok(runtime::client::request(bus, &subject, &hint, request).await?)
}

/// Waits until every context answers its `summary` query (orders answers `sagas` too).
pub async fn wait_ready(bus: &Bus, contexts: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    for c in contexts {
        loop {
            let short = async_nats::Request::new()
                .payload(Bytes::from_static(b"{}"))
                .timeout(Some(Duration::from_millis(500)));
            if bus
                .client
                .send_request(subjects::query(c, "summary"), short)
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("context {c} did not answer within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Asks an external system's simulator for its ledger (`choreo.ext.<system>.stats`).
pub async fn query_external(bus: &Bus, system: &str) -> anyhow::Result<serde_json::Value> {
    sim_request(bus, system, "stats", serde_json::json!({})).await
}

/// Changes a simulator's failure rate and latency at run time (`choreo.ext.<system>.control`).
pub async fn control_external(
    bus: &Bus,
    system: &str,
    settings: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let v = sim_request(bus, system, "control", settings).await?;
    if let Some(e) = v.get("error") {
        bail!("{system}: {}", e.as_str().unwrap_or("error"));
    }
    Ok(v)
}

async fn sim_request(
    bus: &Bus,
    system: &str,
    op: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let req = async_nats::Request::new()
        .payload(Bytes::from(body.to_string()))
        .timeout(Some(Duration::from_secs(5)));
    let reply = bus
        .client
        .send_request(subjects::external(system, op), req)
        .await
        .map_err(|e| anyhow!("{system} {op}: {e} (is `choreo sim` running?)"))?;
    Ok(serde_json::from_slice(&reply.payload)?)
}
