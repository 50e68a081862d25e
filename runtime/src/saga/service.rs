//! The node's side of sagas: the deadline timer and the inspection/operator service.
//!
//! The timer scans the time-ordered deadline index of one context's store, fires every due
//! deadline through [`ContextRuntime::commit_local`] (one transaction: index entry removed,
//! transition applied, outbox written, inbox mark `deadline/<saga>/<id>/<name>/<at>`), and
//! records how late it fired. Deadlines that came due while the node was down fire at start.
//!
//! The service answers `choreo.saga.<name>.<op>` (request/reply, JSON):
//! `list {state?, older_than_ms?, active_only?}`, `show {id}`, `stuck {older_than_ms}`,
//! `retry {id, request_id}`. Replies are `{"ok": ...}` or `{"error": "..."}`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use super::instance::{self, parse_deadline_key, InstanceSummary, DEADLINE_PREFIX, ENDED_PREFIX};
use super::DynSaga;
use crate::pipeline::{ContextRuntime, LocalError};
use crate::store::Committed;
use crate::telemetry::{metrics, saga_counts};
use crate::wire::envelope::{derived_id, now_ms, Envelope};
use crate::wire::identity;
use crate::wire::subjects;

/// Most deadlines fired per scan.
const BATCH: usize = 256;

/// Fires due deadlines until `shutdown` turns true.
pub async fn run_deadlines(
    rt: Arc<ContextRuntime>,
    sagas: Vec<Arc<dyn DynSaga>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = now_ms();
        let upper = format!("{DEADLINE_PREFIX}{:020}", now + 1);
        let due = rt
            .store
            .state_keys(DEADLINE_PREFIX, &upper, BATCH)
            .unwrap_or_else(|e| {
                tracing::error!(context = rt.context, error = %e, "deadline scan failed");
                vec![]
            });
        for key in &due {
            fire_one(&rt, &sagas, key).await;
        }
        let pause = match rt.store.first_key_from(DEADLINE_PREFIX, DEADLINE_PREFIX) {
            Ok(Some(k)) => parse_deadline_key(&k)
                .map(|d| Duration::from_millis(d.at_ms.saturating_sub(now_ms()).clamp(5, 500)))
                .unwrap_or(Duration::from_millis(500)),
            _ => Duration::from_millis(500),
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn fire_one(rt: &ContextRuntime, sagas: &[Arc<dyn DynSaga>], key: &str) {
    let Some(due) = parse_deadline_key(key) else {
        tracing::error!(key, "malformed deadline key; removed");
        let _ = rt.store.state_remove(key);
        return;
    };
    let Some(saga) = sagas.iter().find(|s| s.name() == due.saga) else {
        // A saga this node does not host (another node owns it): leave it.
        return;
    };
    let inbox_key = format!(
        "deadline/{}/{}/{}/{}",
        due.saga, due.id, due.name, due.at_ms
    );
    // An error or a drop skips this firing: the next scan finds it due again.
    crate::fault!(async rt.faults, DeadlineFire, rt.context, &due.name, inbox_key.as_bytes(), |_injected| return);
    let cause_id = derived_id(&inbox_key);
    let mut cause = Envelope::first(cause_id.clone(), "DeadlineReached", rt.context, now_ms());
    cause.correlation_id = due.id.clone();
    let result = rt
        .commit_local(&inbox_key, &cause, saga.name(), {
            let (saga, due, cause_id) = (saga.clone(), due.clone(), cause_id.clone());
            move |tx| {
                tx.remove(&due.key)?;
                saga.fire(tx, &due.id, &due.name, &cause_id, now_ms())
            }
        })
        .await;
    match result {
        Ok(Committed::Written { .. }) => {
            let late = now_ms().saturating_sub(due.at_ms);
            metrics::SAGA_DEADLINES_FIRED
                .with_label_values(&[saga.name(), &due.name])
                .inc();
            metrics::SAGA_DEADLINE_LATENESS
                .with_label_values(&[saga.name()])
                .observe(late as f64 / 1000.0);
            tracing::info!(saga = saga.name(), id = %due.id, deadline = %due.name, late_ms = late, "deadline fired");
        }
        Ok(Committed::Duplicate) => {
            let _ = rt.store.state_remove(&due.key);
        }
        Err(LocalError::Handler(crate::component::HandleError::Permanent(m))) => {
            metrics::SAGA_DEADLINES_DROPPED
                .with_label_values(&[saga.name(), &due.name])
                .inc();
            tracing::error!(saga = saga.name(), id = %due.id, deadline = %due.name, error = %m, "deadline cannot fire; dropped");
            let _ = rt.store.state_remove(&due.key);
        }
        Err(e) => {
            tracing::warn!(saga = saga.name(), id = %due.id, deadline = %due.name, error = %e, "deadline will be retried")
        }
    }
}

/// Removes ended instances (and their histories) once they have been terminal for
/// `retention`, in batches through the transactional path, until `shutdown` turns true;
/// the saga counts forget them. Recent ones stay for inspection.
pub async fn run_retention(
    rt: Arc<ContextRuntime>,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        loop {
            let until = now_ms().saturating_sub(retention.as_millis() as u64);
            let upper = format!("{ENDED_PREFIX}{until:020}");
            let keys = match rt.store.state_keys(ENDED_PREFIX, &upper, BATCH) {
                Ok(keys) if keys.is_empty() => break,
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!(context = rt.context, error = %e, "retention scan failed");
                    break;
                }
            };
            let inbox_key = format!("retention/{}", keys[keys.len() - 1]);
            let cause = Envelope::first(derived_id(&inbox_key), "Retention", rt.context, now_ms());
            let forgotten = Arc::new(std::sync::Mutex::new(Vec::new()));
            let result = rt
                .commit_local(&inbox_key, &cause, "retention", {
                    let (keys, forgotten) = (keys.clone(), forgotten.clone());
                    move |tx| {
                        let mut ended = Vec::new();
                        for key in &keys {
                            if let Some(state) = instance::forget_ended(tx, key)? {
                                ended.push((key.clone(), state));
                            }
                        }
                        *forgotten.lock().unwrap_or_else(|p| p.into_inner()) = ended;
                        Ok(crate::component::Decision::default())
                    }
                })
                .await;
            match result {
                Ok(Committed::Written { .. }) => {
                    let ended =
                        std::mem::take(&mut *forgotten.lock().unwrap_or_else(|p| p.into_inner()));
                    for (key, state) in &ended {
                        if let Some((_, saga, _)) = instance::parse_ended_key(key) {
                            saga_counts::forget(&saga, state, 1);
                        }
                    }
                    tracing::debug!(
                        context = rt.context,
                        removed = ended.len(),
                        "ended saga instances removed after their retention"
                    );
                }
                Ok(Committed::Duplicate) => break,
                Err(e) => {
                    tracing::warn!(context = rt.context, error = %e, "retention failed; retried");
                    break;
                }
            }
            if keys.len() < BATCH {
                break;
            }
        }
    }
}

/// Sets the saga gauges (instances by state, oldest active age) every few seconds from the
/// in-memory counts ([`saga_counts`]; the duration histogram is observed as transitions
/// commit).
pub async fn report_metrics(sagas: Vec<Arc<dyn DynSaga>>) {
    loop {
        let now = now_ms();
        for s in &sagas {
            let def = s.definition();
            let states: Vec<&str> = def.states.iter().map(|st| st.name).collect();
            let (by_state, oldest) = saga_counts::snapshot(s.name(), &states);
            for (state, n) in by_state {
                metrics::SAGA_INSTANCES
                    .with_label_values(&[s.name(), &state])
                    .set(n);
            }
            let oldest_ms = oldest.map_or(0, |started| now.saturating_sub(started));
            metrics::SAGA_OLDEST_ACTIVE_SECONDS
                .with_label_values(&[s.name()])
                .set(oldest_ms as f64 / 1000.0);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Request {
    id: Option<String>,
    state: Option<String>,
    older_than_ms: Option<u64>,
    active_only: bool,
    request_id: Option<String>,
}

/// Serves `choreo.saga.<name>.*` for every saga the context hosts.
pub async fn serve(
    client: async_nats::Client,
    rt: Arc<ContextRuntime>,
    sagas: Vec<Arc<dyn DynSaga>>,
) {
    let mut subs = Vec::new();
    for s in &sagas {
        match client
            .queue_subscribe(
                subjects::saga(s.name(), "*"),
                format!("choreo-saga-{}", s.name()),
            )
            .await
        {
            Ok(sub) => subs.push(sub),
            Err(e) => tracing::error!(saga = s.name(), error = %e, "cannot serve saga inspection"),
        }
    }
    let mut all = futures::stream::select_all(subs);
    while let Some(req) = all.next().await {
        let Some(reply) = req.reply.clone() else {
            continue;
        };
        if !identity::is_inbox(&reply) {
            identity::refuse_reply(rt.context, "saga", &reply);
            continue;
        }
        let mut parts = req.subject.rsplitn(2, '.');
        let op = parts.next().unwrap_or("").to_string();
        let name = parts
            .next()
            .and_then(|p| p.rsplit('.').next())
            .unwrap_or("")
            .to_string();
        let body = match sagas.iter().find(|s| s.name() == name) {
            Some(saga) => answer(&rt, saga, &op, &req.payload).await,
            None => Err(format!("saga {name} is not hosted here")),
        };
        let body = match body {
            Ok(v) => serde_json::json!({ "ok": v }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        let _ = client.publish(reply, body.to_string().into()).await;
    }
}

async fn answer(
    rt: &ContextRuntime,
    saga: &Arc<dyn DynSaga>,
    op: &str,
    payload: &[u8],
) -> Result<serde_json::Value, String> {
    let req: Request = if payload.is_empty() {
        Request::default()
    } else {
        serde_json::from_slice(payload).map_err(|e| format!("bad request: {e}"))?
    };
    let all =
        || instance::instances(rt.store.reader(), saga.name()).map_err(|e| format!("store: {e:?}"));
    let now = now_ms();
    match op {
        "list" | "stuck" => {
            let stuck = op == "stuck";
            let older = req.older_than_ms.unwrap_or(0);
            if stuck && req.older_than_ms.is_none() {
                return Err("stuck needs older_than_ms".into());
            }
            let mut out: Vec<InstanceSummary> = all()?
                .iter()
                .filter(|i| req.state.as_deref().is_none_or(|s| s == i.status))
                .filter(|i| !(stuck || req.active_only) || !i.terminal)
                .filter(|i| {
                    let since = if stuck {
                        i.updated_at_ms
                    } else {
                        i.started_at_ms
                    };
                    now.saturating_sub(since) >= older
                })
                .map(InstanceSummary::from)
                .collect();
            out.sort_by_key(|s| s.started_at_ms);
            Ok(serde_json::json!({ "now_ms": now, "count": out.len(), "instances": out }))
        }
        "show" => {
            let id = req.id.ok_or("show needs id")?;
            let v = instance::show(rt.store.reader(), saga.name(), &id)
                .map_err(|e| format!("store: {e:?}"))?;
            v.ok_or_else(|| format!("no {} instance {id}", saga.name()))
        }
        "retry" => {
            let id = req.id.ok_or("retry needs id")?;
            let request_id = req.request_id.unwrap_or_else(crate::wire::envelope::new_id);
            let inbox_key = format!("retry/{}/{id}/{request_id}", saga.name());
            let cause_id = derived_id(&inbox_key);
            let mut cause = Envelope::first(cause_id.clone(), "OperatorRetry", rt.context, now);
            cause.correlation_id = id.clone();
            rt.commit_local(&inbox_key, &cause, saga.name(), {
                let (saga, id, cause_id) = (saga.clone(), id.clone(), cause_id.clone());
                move |tx| saga.retry(tx, &id, &cause_id, now_ms())
            })
            .await
            .map_err(|e| e.to_string())?;
            let v = instance::show(rt.store.reader(), saga.name(), &id)
                .map_err(|e| format!("store: {e:?}"))?;
            Ok(v.unwrap_or_default())
        }
        "graph" => {
            let def = saga.definition();
            Ok(serde_json::json!({
                "definition": def, "mermaid": def.mermaid(), "dot": def.dot(),
            }))
        }
        other => Err(format!(
            "unknown operation {other:?} (list, show, stuck, retry, graph)"
        )),
    }
}
