//! Answers to fault-injection admin requests on `choreo.admin.<context>.faults` (`choreo
//! chaos inject|clear|list`); the node serves the subject.

use serde::{Deserialize, Serialize};

use super::{FaultRule, Faults, FaultsError};

/// A request on `choreo.admin.<context>.faults`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Installs a rule for the context (a rule naming another context is refused); answers
    /// `{"installed": <id>}`.
    Inject {
        /// The rule; without a context it gets the one the request was sent to.
        rule: FaultRule,
        /// Reseeds the random choices first, so that a run can be repeated.
        #[serde(default)]
        seed: Option<u64>,
    },
    /// Removes the rules that apply to the context (its own and those without a context);
    /// answers `{"cleared": <count>}`.
    Clear,
    /// Answers whether injection is enabled and the rules that apply to the context, each
    /// with how often it fired and how long it has left.
    List,
}

/// Answers one admin request for `context`: `{"ok": ...}` or `{"error": "..."}`.
pub fn answer(faults: &Faults, context: &str, payload: &[u8]) -> serde_json::Value {
    let req = match serde_json::from_slice::<AdminRequest>(payload) {
        Ok(r) => r,
        Err(e) => return serde_json::json!({ "error": format!("bad request: {e}") }),
    };
    let result = match req {
        AdminRequest::Inject { mut rule, seed } => {
            rule.context.get_or_insert_with(|| context.to_string());
            if rule.context.as_deref() != Some(context) {
                Err(FaultsError::Invalid(format!(
                    "rule is for context {:?}, sent to {context}",
                    rule.context
                )))
            } else {
                faults
                    .install(rule, seed)
                    .map(|id| serde_json::json!({ "installed": id }))
            }
        }
        AdminRequest::Clear => Ok(serde_json::json!({ "cleared": faults.clear(Some(context)) })),
        AdminRequest::List => Ok(serde_json::json!({
            "enabled": faults.enabled(),
            "rules": faults.list().into_iter()
                .filter(|r| r["rule"]["context"].as_str().is_none_or(|c| c == context))
                .collect::<Vec<_>>(),
        })),
    };
    match result {
        Ok(v) => serde_json::json!({ "ok": v }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}
