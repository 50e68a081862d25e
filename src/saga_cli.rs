//! `choreo saga ...`: the saga graph from its definition, and inspection and operator
//! requests to the node hosting a saga.

use std::io::Write;

use anyhow::anyhow;
use runtime::wire::bus::Bus;
use serde_json::{json, Value};

use crate::client;

/// The graph of a saga by name, as Mermaid or DOT: from the node hosting it (its own
/// declaration), or, when no node answers, from the shop's sagas built into this binary.
pub async fn graph(bus: Option<&Bus>, name: &str, dot: bool) -> anyhow::Result<String> {
    let format = if dot { "dot" } else { "mermaid" };
    if let Some(bus) = bus {
        match client::saga(bus, name, "graph", json!({})).await {
            Ok(v) => {
                let text = v[format]
                    .as_str()
                    .ok_or_else(|| anyhow!("no {format} in {v}"))?;
                return Ok(text.to_string());
            }
            Err(e) if sagas::definition(name).is_none() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "no node answered; the built-in definition"),
        }
    }
    let def = sagas::definition(name).ok_or_else(|| {
        anyhow!(
            "no node hosts saga {name:?}, and this binary knows only {}",
            sagas::NAMES.join(", ")
        )
    })?;
    Ok(if dot { def.dot() } else { def.mermaid() })
}

fn age(now: u64, t: u64) -> String {
    let s = now.saturating_sub(t) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// Prints `list` or `stuck` results as a table.
pub fn print_list(v: &Value) {
    // Write errors (a closed pipe, `| head`) end the listing quietly instead of panicking.
    let mut o = std::io::stdout().lock();
    let now = v["now_ms"].as_u64().unwrap_or(0);
    let empty = vec![];
    let list = v["instances"].as_array().unwrap_or(&empty);
    let _ = writeln!(
        o,
        "{:<28} {:<24} {:>7} {:>8} {:>8}  deadlines",
        "id", "state", "version", "age", "idle"
    );
    for i in list {
        let deadlines: Vec<String> = i["deadlines"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, at)| format!("{k} in {}", age(at.as_u64().unwrap_or(0), now)))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "{:<28} {:<24} {:>7} {:>8} {:>8}  {}",
            i["id"].as_str().unwrap_or(""),
            i["status"].as_str().unwrap_or(""),
            i["version"],
            age(now, i["started_at_ms"].as_u64().unwrap_or(0)),
            age(now, i["updated_at_ms"].as_u64().unwrap_or(0)),
            deadlines.join(", ")
        );
    }
    let _ = writeln!(o, "{} instance(s)", list.len());
}

/// Prints one instance with its full history.
pub fn print_instance(v: &Value) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(
        o,
        "saga {} instance {}",
        v["saga"].as_str().unwrap_or(""),
        v["id"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        o,
        "state    {} (version {}{})",
        v["status"].as_str().unwrap_or(""),
        v["version"],
        if v["terminal"] == true {
            ", terminal"
        } else {
            ""
        }
    );
    // A builder saga keeps its data under `data`; a hand-written one at the top.
    let state = &v["state"];
    if let Some(r) = state["data"]["reason"]
        .as_str()
        .or(state["reason"].as_str())
    {
        let _ = writeln!(o, "reason   {r}");
    }
    if let Some(d) = v["deadlines"].as_object().filter(|d| !d.is_empty()) {
        let _ = writeln!(
            o,
            "deadlines {}",
            d.iter()
                .map(|(k, at)| format!("{k} at {at}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(o, "history:");
    let empty = vec![];
    let start = v["started_at_ms"].as_u64().unwrap_or(0);
    for h in v["history"].as_array().unwrap_or(&empty) {
        let sent: Vec<&str> = h["sent"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let set: Vec<&str> = h["deadlines_set"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  v{:<3} +{:>6} ms  {:<8} {:<20} {:<38} {} -> {}{}{}",
            h["version"],
            h["at_ms"].as_u64().unwrap_or(0).saturating_sub(start),
            h["trigger"].as_str().unwrap_or(""),
            h["message_type"].as_str().unwrap_or(""),
            h["message_id"].as_str().unwrap_or(""),
            h["from"].as_str().unwrap_or(""),
            h["to"].as_str().unwrap_or(""),
            if sent.is_empty() {
                String::new()
            } else {
                format!("  sent {}", sent.join(", "))
            },
            if set.is_empty() {
                String::new()
            } else {
                format!("  deadline {}", set.join(", "))
            },
        );
    }
}

/// The request body of `retry`, with an id so that a repeated request retries once.
pub fn retry_body(id: &str) -> Value {
    json!({ "id": id, "request_id": runtime::wire::envelope::new_id() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_node_the_built_in_graph_or_a_clear_refusal() {
        let mermaid = graph(None, "order-fulfilment", false).await.unwrap();
        assert!(mermaid.contains("stateDiagram-v2"));
        let dot = graph(None, "order-fulfilment", true).await.unwrap();
        assert!(dot.starts_with("digraph"));
        let e = graph(None, "loan", false).await.unwrap_err().to_string();
        assert!(e.contains("no node hosts saga \"loan\""), "{e}");
    }
}
