//! Which components and queries make up each bounded context of the shop.
//!
//! The orders context hosts the order aggregate and the order-fulfilment process manager;
//! composition lives here so that domain crates stay independent of each other's hosting.

use std::sync::Arc;

use runtime::component::DynComponent;
use runtime::{Context, QueryError, StateRead};

/// Every context a node can host, in start order.
pub const KNOWN: &[&str] = &["customers", "orders", "inventory", "payments", "shipping"];

type QueryFn = fn(&dyn StateRead, &str, &[u8]) -> Result<serde_json::Value, QueryError>;

/// A part of a context: components plus the queries they answer.
struct Part {
    components: fn() -> Vec<Arc<dyn DynComponent>>,
    queries: &'static [&'static str],
    query: QueryFn,
}

/// A context assembled from parts.
pub struct Hosted {
    name: &'static str,
    parts: Vec<Part>,
}

impl Context for Hosted {
    fn name(&self) -> &'static str {
        self.name
    }
    fn components(&self) -> Vec<Arc<dyn DynComponent>> {
        self.parts.iter().flat_map(|p| (p.components)()).collect()
    }
    fn queries(&self) -> Vec<&'static str> {
        self.parts
            .iter()
            .flat_map(|p| p.queries.iter().copied())
            .collect()
    }
    fn query(
        &self,
        state: &dyn StateRead,
        name: &str,
        request: &[u8],
    ) -> Result<serde_json::Value, QueryError> {
        match self.parts.iter().find(|p| p.queries.contains(&name)) {
            Some(p) => (p.query)(state, name, request),
            None => Err(QueryError::Unknown(name.to_string())),
        }
    }
}

/// Builds one context by name.
pub fn build(name: &str) -> Option<Arc<dyn Context>> {
    let part = |components, queries, query| Part {
        components,
        queries,
        query,
    };
    let (name, parts): (&'static str, Vec<Part>) = match name {
        "customers" => (
            "customers",
            vec![part(
                customers::components,
                customers::QUERIES,
                customers::query,
            )],
        ),
        "orders" => (
            "orders",
            vec![
                part(orders::components, orders::QUERIES, orders::query),
                part(sagas::components, sagas::QUERIES, sagas::query),
            ],
        ),
        "inventory" => (
            "inventory",
            vec![part(
                inventory::components,
                inventory::QUERIES,
                inventory::query,
            )],
        ),
        "payments" => (
            "payments",
            vec![part(
                payments::components,
                payments::QUERIES,
                payments::query,
            )],
        ),
        "shipping" => (
            "shipping",
            vec![part(
                shipping::components,
                shipping::QUERIES,
                shipping::query,
            )],
        ),
        _ => return None,
    };
    Some(Arc::new(Hosted { name, parts }))
}

/// Expands a `--context` list: names separated by commas, or `all`.
pub fn expand(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "all" {
            out.extend(KNOWN.iter().map(|s| s.to_string()));
        } else {
            out.push(item.to_string());
        }
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_all_and_lists() {
        assert_eq!(expand("all").len(), 5);
        assert_eq!(expand("orders, payments"), vec!["orders", "payments"]);
    }

    #[test]
    fn every_known_context_builds_and_queries_are_unique() {
        for name in KNOWN {
            let c = build(name).unwrap();
            let q = c.queries();
            let mut dedup = q.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(q.len(), dedup.len(), "{name} has a query twice");
            assert!(!c.components().is_empty());
        }
        assert!(build("shop").is_none());
    }
}

#[cfg(test)]
mod config_file_tests {
    use runtime::config::NodeConfig;

    /// The shipped example config documents exactly the defaults.
    #[test]
    fn example_config_equals_the_defaults() {
        let text = include_str!("../config/node.example.toml");
        let parsed: NodeConfig = toml::from_str(text).expect("example config parses");
        assert_eq!(parsed, NodeConfig::default());
    }
}
