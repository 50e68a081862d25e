//! Which contexts each node process of the benchmarked shop hosts: by default every context
//! alone in its own process; `--node` groups them, and the bench checks the grouping still
//! runs the whole shop.

use choreo::contexts;

/// Every context alone in its own process: the shop as the targets state it.
pub fn separate_nodes() -> Vec<String> {
    contexts::all()
}

/// A bench layout must host every context of the shop exactly once, each a known one.
pub fn check_nodes(nodes: &[String]) -> anyhow::Result<()> {
    let mut seen: Vec<String> = Vec::new();
    for node in nodes {
        let names = contexts::expand(node);
        anyhow::ensure!(!names.is_empty(), "--node {node:?} names no context");
        for c in names {
            contexts::ensure_known(&c).map_err(|e| anyhow::anyhow!("--node {node:?}: {e}"))?;
            anyhow::ensure!(!seen.contains(&c), "context {c:?} is in two --node values");
            seen.push(c);
        }
    }
    let missing: Vec<&str> = contexts::KNOWN
        .iter()
        .copied()
        .filter(|c| !seen.iter().any(|s| s == c))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the bench runs the whole shop; no --node hosts {}",
        missing.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_hosts_every_context_once() {
        let nodes = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check_nodes(&separate_nodes()).unwrap();
        check_nodes(&nodes(&["all"])).unwrap();
        check_nodes(&nodes(&[
            "orders,inventory",
            "payments,shipping",
            "customers",
        ]))
        .unwrap();
        let err = |v: &[&str]| check_nodes(&nodes(v)).unwrap_err().to_string();
        assert!(
            err(&["orders", "payments"]).contains("no --node hosts customers, inventory, shipping")
        );
        assert!(err(&["all", "orders"]).contains("\"orders\" is in two --node values"));
        assert!(err(&["all,billing"]).contains("unknown context \"billing\""));
        assert!(err(&["all", ","]).contains("names no context"));
    }
}
