//! Which components and queries make up each bounded context of the shop.
//!
//! The orders context hosts the order aggregate and the order-fulfilment process manager;
//! composition lives here so that domain crates stay independent of each other's hosting.

use std::sync::Arc;

use runtime::app::App;
use runtime::config::NodeConfig;
use runtime::context::ContextBuilder;
use runtime::Context;

/// Every context a node can host, in start order.
pub const KNOWN: &[&str] = &["customers", "orders", "inventory", "payments", "shipping"];

/// Builds one context by name with the node's configuration (saga settings).
pub fn build(name: &str, cfg: &NodeConfig) -> Result<Arc<dyn Context>, String> {
    for key in cfg.sagas.keys() {
        if sagas::definition(key).is_none() {
            return Err(format!(
                "unknown saga in [sagas.{key}]; known: {}",
                sagas::NAMES.join(", ")
            ));
        }
    }
    let context = match name {
        "customers" => customers::context(),
        "orders" => orders::context()
            .saga(sagas::order_fulfilment(&cfg.sagas)?)
            .sends(inventory::CONTEXT, &["CommitStock", "ReleaseStock"])
            .sends(payments::CONTEXT, &["CapturePayment", "CancelPayment"])
            .sends(shipping::CONTEXT, &["ShipOrder", "CancelShipment"]),
        "inventory" => ContextBuilder::new("inventory")
            .components(inventory::components())
            .queries(inventory::QUERIES, inventory::query)
            .invariant("stock", inventory::stock_conserved),
        "payments" => ContextBuilder::new("payments")
            .components(payments::components())
            .queries(payments::QUERIES, payments::query),
        "shipping" => ContextBuilder::new("shipping")
            .components(shipping::components())
            .queries(shipping::QUERIES, shipping::query),
        other => return Err(format!("unknown context {other:?}")),
    };
    // Every node exports the metric, with a zero series for each type that carries money.
    std::sync::LazyLock::force(&crate::business::AMOUNT);
    let amounts = crate::business::types(name);
    let context = if amounts.is_empty() {
        context
    } else {
        context.on_published(&amounts, crate::business::count)
    };
    context.build().map_err(|e| e.to_string())
}

/// Builds each context of `names` with `cfg` (see [`build`]).
pub fn build_all(names: &[String], cfg: &NodeConfig) -> anyhow::Result<Vec<Arc<dyn Context>>> {
    names
        .iter()
        .map(|c| build(c, cfg).map_err(anyhow::Error::msg))
        .collect()
}

/// The shop as an application: a node of it hosts any of its contexts (`choreo node`).
pub fn app() -> App {
    KNOWN.iter().fold(App::new("choreo"), |app, &name| {
        app.context(name, move |cfg| Ok(build(name, cfg)?))
    })
}

/// Every context, by name, in start order.
pub fn all() -> Vec<String> {
    KNOWN.iter().map(|s| s.to_string()).collect()
}

/// A context name must be one of [`KNOWN`] (the bench's `--node` lists).
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
    app().expand(list)
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
