//! Which components and queries make up each bounded context of the shop.
//!
//! The orders context hosts the order aggregate and the order-fulfilment process manager;
//! composition lives here so that domain crates stay independent of each other's hosting.

use std::sync::Arc;

use runtime::component::DynComponent;
use runtime::config::NodeConfig;
use runtime::saga::DynSaga;
use runtime::{Context, QueryError, StateRead};

/// Every context a node can host, in start order.
pub const KNOWN: &[&str] = &["customers", "orders", "inventory", "payments", "shipping"];

type QueryFn = fn(&dyn StateRead, &str, &[u8]) -> Result<serde_json::Value, QueryError>;

/// A part of a context: components plus the queries they answer.
struct Part {
    components: Vec<Arc<dyn DynComponent>>,
    queries: &'static [&'static str],
    query: QueryFn,
}

/// A context assembled from parts.
pub struct Hosted {
    name: &'static str,
    parts: Vec<Part>,
    sagas: Vec<Arc<dyn DynSaga>>,
}

impl Context for Hosted {
    fn name(&self) -> &'static str {
        self.name
    }
    fn components(&self) -> Vec<Arc<dyn DynComponent>> {
        self.parts
            .iter()
            .flat_map(|p| p.components.iter().cloned())
            .collect()
    }
    fn queries(&self) -> Vec<&'static str> {
        self.parts
            .iter()
            .flat_map(|p| p.queries.iter().copied())
            .collect()
    }
    fn sagas(&self) -> Vec<Arc<dyn DynSaga>> {
        self.sagas.clone()
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

/// Builds one context by name with the node's configuration (saga settings).
pub fn build(name: &str, cfg: &NodeConfig) -> Result<Arc<dyn Context>, String> {
    let part = |components, queries, query| Part {
        components,
        queries,
        query,
    };
    let mut sagas: Vec<Arc<dyn DynSaga>> = Vec::new();
    let (name, parts): (&'static str, Vec<Part>) = match name {
        "customers" => (
            "customers",
            vec![part(
                customers::components(),
                customers::QUERIES,
                customers::query,
            )],
        ),
        "orders" => {
            let (component, saga) = sagas::order_fulfilment(&cfg.sagas)?;
            sagas.push(saga);
            (
                "orders",
                vec![
                    part(orders::components(), orders::QUERIES, orders::query),
                    part(vec![component], &[], no_query),
                ],
            )
        }
        "inventory" => (
            "inventory",
            vec![part(
                inventory::components(),
                inventory::QUERIES,
                inventory::query,
            )],
        ),
        "payments" => (
            "payments",
            vec![part(
                payments::components(),
                payments::QUERIES,
                payments::query,
            )],
        ),
        "shipping" => (
            "shipping",
            vec![part(
                shipping::components(),
                shipping::QUERIES,
                shipping::query,
            )],
        ),
        other => return Err(format!("unknown context {other:?}")),
    };
    for key in cfg.sagas.keys() {
        if sagas::definition(key).is_none() {
            return Err(format!(
                "unknown saga in [sagas.{key}]; known: {}",
                sagas::NAMES.join(", ")
            ));
        }
    }
    Ok(Arc::new(Hosted { name, parts, sagas }))
}

fn no_query(_: &dyn StateRead, name: &str, _: &[u8]) -> Result<serde_json::Value, QueryError> {
    Err(QueryError::Unknown(name.to_string()))
}

/// Every context, by name, in start order.
pub fn all() -> Vec<String> {
    KNOWN.iter().map(|s| s.to_string()).collect()
}

/// A context name given on the command line must be one of [`KNOWN`].
pub fn ensure_known(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        KNOWN.contains(&name),
        "unknown context {name:?}; known: {} (or `all`)",
        KNOWN.join(", ")
    );
    Ok(())
}

/// Expands a `--context` list: names separated by commas, or `all`.
pub fn expand(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "all" {
            out.extend(all());
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
            let c = build(name, &NodeConfig::default()).unwrap();
            let q = c.queries();
            let mut dedup = q.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(q.len(), dedup.len(), "{name} has a query twice");
            assert!(!c.components().is_empty());
        }
        assert!(build("shop", &NodeConfig::default()).is_err());
        assert_eq!(
            build("orders", &NodeConfig::default())
                .unwrap()
                .sagas()
                .len(),
            1
        );
        let mut bad = NodeConfig::default();
        bad.sagas.insert(
            "order-fulfilment".into(),
            [(
                "awaiting_ms".to_string(),
                runtime::config::duration::Setting::Count(5),
            )]
            .into(),
        );
        assert!(build("orders", &bad).err().unwrap().contains("unknown key"));
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
