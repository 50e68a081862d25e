//! The client side of an application: send a command, ask a query, wait for an event, from
//! any process (a web handler, a script, a test), in the application's namespace.
//!
//! ```no_run
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] struct LendBook { loan: String, book: String }
//! # runtime::message!(LendBook, Command, "loans");
//! # #[derive(Serialize, Deserialize)] struct BookLent { loan: String }
//! # runtime::message!(BookLent, Event, "loans");
//! # async fn run() -> Result<(), runtime::client::ClientError> {
//! use std::time::Duration;
//! use runtime::client;
//!
//! let bus = client::connect("nats://127.0.0.1:4222", Duration::from_secs(5)).await?;
//! let lent = client::watch::<BookLent>(&bus).await?; // before sending: nothing is missed
//! client::send(&bus, &LendBook { loan: "l-1".into(), book: "Dune".into() }).await?;
//! let event = lent.until(|e| e.loan == "l-1", Duration::from_secs(10)).await?;
//! let loan = client::query(&bus, "loans", "loan", serde_json::json!({ "loan": "l-1" })).await?;
//! # Ok(()) }
//! ```
//!
//! Commands go to the addressee's stream with a fresh envelope (a message id the
//! addressee's inbox deduplicates on); queries and saga requests are NATS request/reply,
//! answered `{"ok": value}` or `{"error": "..."}`.

use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::component::{Kind, Message};
use crate::wire::bus::{Bus, BusError};
use crate::wire::envelope::{new_id, now_ms, Envelope};
use crate::wire::identity::{Identity, NatsAuth};
use crate::wire::subjects;

/// The `source` stamped on messages sent from outside any context.
pub const CLIENT_SOURCE: &str = "client";

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to NATS or publishing to JetStream failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The message (its type name) is an event: only its own context publishes it.
    #[error("{0}: not a command (an event is published by its own context)")]
    NotACommand(&'static str),
    /// The message type (its name) declares no context, so it has no addressee or stream.
    #[error("{0} names no context: declare it with message!({0}, Command, \"<context>\")")]
    NoContext(&'static str),
    /// A request got no reply in time (10 s), or nothing serves its subject.
    #[error("{subject}: {reason} ({hint})")]
    NoAnswer {
        /// The subject of the request.
        subject: String,
        /// What NATS reported.
        reason: String,
        /// What to check (whether a node hosting the context or saga runs).
        hint: String,
    },
    /// A request was answered with an error (`{"error": "..."}`) or with a reply that is
    /// not JSON.
    #[error("{subject}: {reason}")]
    Refused {
        /// The subject of the request.
        subject: String,
        /// The error the reply gave.
        reason: String,
    },
    /// Another failure (encoding the command, subscribing, publishing a request), as text.
    #[error("{0}")]
    Other(String),
    /// [`Watch::until`] saw no matching event in time.
    #[error("no matching {msg_type} within {waited:?}")]
    Timeout {
        /// The wire type name of the events watched.
        msg_type: &'static str,
        /// How long it waited.
        waited: Duration,
    },
}

/// Connects to NATS, retrying what may pass (refused, no answer) for `wait`, with the
/// identity and TLS the environment gives (`CHOREO_NATS_SEED`, ...; see
/// [`NatsAuth::with_env`]).
pub async fn connect(url: &str, wait: Duration) -> Result<Bus, ClientError> {
    connect_as(url, wait, NatsAuth::from_env()).await
}

/// Connects to NATS as `auth`, retrying what may pass for `wait`.
pub async fn connect_as(url: &str, wait: Duration, auth: NatsAuth) -> Result<Bus, ClientError> {
    let identity = Identity {
        auth,
        inbox_prefix: None,
        label: "client".into(),
    };
    Ok(Bus::connect_as(url, "choreo-client", wait, &identity).await?)
}

/// Sends a command to the context its [`Message`] declares; waits for JetStream's ack.
pub async fn send<M: Message>(bus: &Bus, command: &M) -> Result<Envelope, ClientError> {
    if M::KIND != Kind::Command {
        return Err(ClientError::NotACommand(M::TYPE));
    }
    if M::CONTEXT.is_empty() {
        return Err(ClientError::NoContext(M::TYPE));
    }
    send_to(bus, M::CONTEXT, command).await
}

/// Sends a command to `context`; waits for JetStream's ack.
pub async fn send_to<M: Message>(
    bus: &Bus,
    context: &str,
    command: &M,
) -> Result<Envelope, ClientError> {
    let env = Envelope::first(new_id(), M::TYPE, CLIENT_SOURCE, now_ms());
    let payload = serde_json::to_vec(command).map_err(|e| ClientError::Other(e.to_string()))?;
    publish(bus, context, env, Bytes::from(payload)).await
}

/// Sends a command given as JSON, of type `msg_type`, to `context`.
pub async fn send_json(
    bus: &Bus,
    context: &str,
    msg_type: &str,
    body: &serde_json::Value,
) -> Result<Envelope, ClientError> {
    let env = Envelope::first(new_id(), msg_type, CLIENT_SOURCE, now_ms());
    publish(bus, context, env, Bytes::from(body.to_string())).await
}

/// Publishes a command with the envelope given (a resend keeps its message id, so the
/// addressee handles it once).
pub async fn publish(
    bus: &Bus,
    context: &str,
    env: Envelope,
    payload: Bytes,
) -> Result<Envelope, ClientError> {
    let subject = subjects::command(context, &env.msg_type);
    bus.publish(&subject, &env, payload).await?;
    Ok(env)
}

/// Asks a context's query `name` (an aggregate's query is named after it).
pub async fn query(
    bus: &Bus,
    context: &str,
    name: &str,
    request: serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let hint = format!("is a node hosting {context} running?");
    self::request(bus, &subjects::query(context, name), &hint, request).await
}

/// Sends an inspection or operator request to a saga (`list`, `show`, `stuck`, `retry`,
/// `graph`).
pub async fn saga(
    bus: &Bus,
    saga: &str,
    op: &str,
    request: serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let hint = format!("is the node hosting saga {saga} running?");
    self::request(bus, &subjects::saga(saga, op), &hint, request).await
}

/// Request/reply with the runtime's convention: `{"ok": value}` or `{"error": "..."}`.
pub async fn request(
    bus: &Bus,
    subject: &str,
    hint: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let req = async_nats::Request::new()
        .payload(Bytes::from(body.to_string()))
        .timeout(Some(Duration::from_secs(10)));
    let reply = bus
        .client
        .send_request(subject.to_string(), req)
        .await
        .map_err(|e| ClientError::NoAnswer {
            subject: subject.to_string(),
            reason: e.to_string(),
            hint: hint.to_string(),
        })?;
    let refused = |reason: String| ClientError::Refused {
        subject: subject.to_string(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| refused(format!("reply is not JSON: {e}")))?;
    if let Some(e) = v.get("error") {
        return Err(refused(e.as_str().unwrap_or("error").to_string()));
    }
    Ok(v.get("ok").cloned().unwrap_or(serde_json::Value::Null))
}

/// The events of type `M` published from now on (see [`watch`]).
pub struct Watch<M> {
    sub: async_nats::Subscriber,
    _m: PhantomData<fn() -> M>,
}

/// Starts watching the events of type `M` (published by the context its [`Message`]
/// declares). Start watching before sending what causes the event: events published before
/// are not seen.
pub async fn watch<M: Message>(bus: &Bus) -> Result<Watch<M>, ClientError> {
    if M::CONTEXT.is_empty() {
        return Err(ClientError::NoContext(M::TYPE));
    }
    let sub = bus
        .client
        .subscribe(subjects::event(M::CONTEXT, M::TYPE))
        .await
        .map_err(|e| ClientError::Other(e.to_string()))?;
    Ok(Watch {
        sub,
        _m: PhantomData,
    })
}

impl<M: Message> Watch<M> {
    /// The first event that `matches`, waiting at most `timeout`. Events that do not decode
    /// or do not match are skipped.
    pub async fn until(
        mut self,
        matches: impl Fn(&M) -> bool,
        timeout: Duration,
    ) -> Result<M, ClientError> {
        let found = tokio::time::timeout(timeout, async {
            while let Some(msg) = self.sub.next().await {
                if let Ok(m) = serde_json::from_slice::<M>(&msg.payload) {
                    if matches(&m) {
                        return Some(m);
                    }
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(m)) => Ok(m),
            _ => Err(ClientError::Timeout {
                msg_type: M::TYPE,
                waited: timeout,
            }),
        }
    }
}

/// One partition of a context as the lease bucket and its changelog show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Partition {
    /// The context's name.
    pub context: String,
    /// The partition's name (`p0`, ...).
    pub partition: String,
    /// The node serving it, none while nobody holds the lease.
    pub owner: Option<String>,
    /// The owner's fencing epoch.
    pub epoch: Option<u64>,
    /// Milliseconds since the owner last renewed its lease.
    pub renewed_ms_ago: Option<u64>,
    /// The owner's metrics address.
    pub metrics: Option<String>,
    /// Nodes standing by to take it over.
    pub standby: Vec<String>,
    /// The sequence of its changelog's last record (0: none).
    pub changelog_last: u64,
}

/// Every partition with a lease or a standby in this namespace (empty when no node runs
/// with ownership); sorted by context.
pub async fn partitions(bus: &Bus) -> Result<Vec<Partition>, ClientError> {
    use crate::wire::lease::Leases;
    let Some(leases) = Leases::existing(bus).await? else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Partition> = Vec::new();
    let now = now_ms();
    for (key, holder) in leases.all().await? {
        let mut tokens = key.splitn(3, '.');
        let (Some(context), Some(partition)) = (tokens.next(), tokens.next()) else {
            continue;
        };
        let i = match out
            .iter()
            .position(|p| p.context == context && p.partition == partition)
        {
            Some(i) => i,
            None => {
                let n: u32 = partition.trim_start_matches('p').parse().unwrap_or(0);
                let changelog_last = crate::wire::changelog::Changelog::bind(bus, context, n)
                    .last()
                    .await
                    .unwrap_or_default();
                out.push(Partition {
                    context: context.to_string(),
                    partition: partition.to_string(),
                    owner: None,
                    epoch: None,
                    renewed_ms_ago: None,
                    metrics: None,
                    standby: Vec::new(),
                    changelog_last,
                });
                out.len() - 1
            }
        };
        let p = &mut out[i];
        match tokens.next() {
            None => {
                p.owner = Some(holder.node);
                p.epoch = Some(holder.epoch);
                p.renewed_ms_ago = Some(now.saturating_sub(holder.renewed_at_ms));
                p.metrics = Some(holder.metrics);
            }
            Some(_) => p.standby.push(holder.node),
        }
    }
    out.sort_by(|a, b| (&a.context, &a.partition).cmp(&(&b.context, &b.partition)));
    Ok(out)
}

/// One invariant a running context declares, and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Invariant {
    /// The context declaring it.
    pub context: String,
    /// Its name (the query `invariant-<name>`).
    pub name: String,
    /// What it checked and found, or why it could not be checked.
    pub outcome: Result<crate::context::Check, String>,
}

/// Every invariant the `running` contexts ([`discover`]) declare
/// ([`ContextBuilder::invariant`](crate::context::ContextBuilder::invariant)), each checked
/// once per context by whichever of its nodes answers; sorted by context and name.
pub async fn invariants(bus: &Bus, running: &[RunningContext]) -> Vec<Invariant> {
    let mut declared: Vec<(&str, &str)> = running
        .iter()
        .flat_map(|c| {
            c.queries.iter().filter_map(|q| {
                let name = q.strip_prefix(crate::context::INVARIANT_QUERY)?;
                Some((c.context.as_str(), name))
            })
        })
        .collect();
    declared.sort();
    declared.dedup();
    let mut out = Vec::new();
    for (context, name) in declared {
        out.push(Invariant {
            context: context.to_string(),
            name: name.to_string(),
            outcome: invariant(bus, context, name).await,
        });
    }
    out
}

/// The invariant `name` of `context`, checked by whichever of its nodes answers: what it
/// checked and found, or why it could not be checked.
pub async fn invariant(
    bus: &Bus,
    context: &str,
    name: &str,
) -> Result<crate::context::Check, String> {
    let query = format!("{}{name}", crate::context::INVARIANT_QUERY);
    match self::query(bus, context, &query, serde_json::json!({})).await {
        Ok(v) => serde_json::from_value(v).map_err(|e| format!("unreadable answer: {e}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A context a running node hosts, as it registered itself with the NATS service API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunningContext {
    /// The context's name.
    pub context: String,
    /// The service instance (one per node hosting the context).
    pub instance: String,
    /// The queries it serves (the service's endpoints), sorted.
    pub queries: Vec<String>,
    /// The sagas it hosts.
    pub sagas: Vec<String>,
}

/// The contexts of this namespace that running nodes host, found with the NATS service
/// API (`$SRV.INFO`), answers collected for `wait`; sorted by context, then instance.
pub async fn discover(bus: &Bus, wait: Duration) -> Result<Vec<RunningContext>, ClientError> {
    let inbox = bus.client.new_inbox();
    let mut sub = bus
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| ClientError::Other(e.to_string()))?;
    bus.client
        .publish_with_reply("$SRV.INFO".to_string(), inbox, Bytes::new())
        .await
        .map_err(|e| ClientError::Other(e.to_string()))?;
    let mut found = Vec::new();
    let until = tokio::time::Instant::now() + wait;
    while let Ok(Some(m)) = tokio::time::timeout_at(until, sub.next()).await {
        let Ok(info) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
            continue;
        };
        let meta = |k: &str| info["metadata"][k].as_str().unwrap_or("").to_string();
        if meta("namespace") != subjects::namespace() || meta("context").is_empty() {
            continue;
        }
        let list = |s: String| -> Vec<String> {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        };
        // Sorted: the service API lists its endpoints in no fixed order.
        let mut queries: Vec<String> = info["endpoints"]
            .as_array()
            .map(|es| {
                es.iter()
                    .filter_map(|e| e["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        queries.sort();
        found.push(RunningContext {
            context: meta("context"),
            instance: info["id"].as_str().unwrap_or("").to_string(),
            queries,
            sagas: list(meta("sagas")),
        });
    }
    found.sort_by(|a, b| (&a.context, &a.instance).cmp(&(&b.context, &b.instance)));
    Ok(found)
}
