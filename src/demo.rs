//! `choreo demo`: the shop end to end on this machine. Starts nats-server (the project's own
//! install) with a JetStream store, one `choreo node` process per context, the external
//! system simulators, then places orders while printing progress, verifies the invariants
//! and prints a summary. Ctrl-C stops everything cleanly.

use std::path::PathBuf;

use crate::contexts::KNOWN;
use crate::load::{self, LoadConfig};
use crate::shop::{Shop, ShopOptions};
use crate::verify;

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub dir: PathBuf,
    pub port: Option<u16>,
    pub sync_always: bool,
    /// Keep the shop running after the summary until Ctrl-C.
    pub keep_running: bool,
    /// Three nats-servers in a cluster, everything replicated three times.
    pub cluster: bool,
    /// Per-process NATS identities, rights and TLS (see `ShopOptions::secure`).
    pub secure: bool,
    pub load: LoadConfig,
}

/// Runs the demo. Returns true if every order ended as set up and verify found nothing.
pub async fn run(cfg: DemoConfig) -> anyhow::Result<bool> {
    println!(
        "choreo demo: starting {}, {} context nodes and the simulators in {}",
        if cfg.cluster {
            "a cluster of 3 nats-servers"
        } else {
            "nats-server"
        },
        KNOWN.len(),
        cfg.dir.display()
    );
    let node_config = if cfg.cluster {
        std::fs::create_dir_all(&cfg.dir)?;
        let path = cfg.dir.join("node-cluster.toml");
        std::fs::write(&path, "[stream]\nreplicas = 3\n")?;
        Some(path)
    } else {
        None
    };
    let shop = Shop::start(ShopOptions {
        port: cfg.port,
        sync_always: cfg.sync_always,
        servers: if cfg.cluster { 3 } else { 1 },
        node_config,
        secure: cfg.secure,
        ..ShopOptions::new(cfg.dir.clone())
    })
    .await?;
    match &shop.auth {
        Some(a) => println!(
            "secured: an nkey per context with only the rights its code needs, TLS (CA {}); rights in {}",
            a.ca.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            a.conf.display()
        ),
        None => println!(
            "INSECURE (--insecure): no identities, no rights, no TLS; any process on the bus may publish anything"
        ),
    }
    println!(
        "nats-server {} (JetStream store {}, sync_interval {}{})",
        shop.nats.url,
        shop.nats.dir.join("jetstream").display(),
        if cfg.sync_always {
            "always"
        } else {
            "default (2 min)"
        },
        if cfg.cluster { "; R3" } else { "" }
    );
    // Scrape targets for dashboards/prometheus.yml (file_sd).
    let targets: Vec<serde_json::Value> = shop
        .nodes
        .iter()
        .map(
            |n| serde_json::json!({ "targets": [n.metrics_addr], "labels": { "node": n.context } }),
        )
        .collect();
    std::fs::write(
        cfg.dir.join("prometheus-targets.json"),
        serde_json::to_string_pretty(&targets)?,
    )?;
    for n in &shop.nodes {
        println!(
            "  node {:<10} pid {:<7} metrics http://{}/metrics",
            n.context,
            n.proc.pid(),
            n.metrics_addr
        );
    }
    let bus = shop.operator().await?;
    let c = &cfg.load;
    println!(
        "placing {} orders ({}; {}% out of stock, {}% declined, {}% undeliverable)",
        c.orders,
        if c.rate > 0.0 {
            format!("{} orders/s", c.rate)
        } else {
            "as fast as possible".into()
        },
        c.fail_stock_pct,
        c.fail_payment_pct,
        c.fail_shipping_pct
    );
    let work = async {
        let report = load::run(&bus, &cfg.load, |p| {
            println!(
                "  placed {:>6}  completed {:>6}  cancelled {:>6}",
                p.placed, p.completed, p.cancelled
            );
        })
        .await?;
        let verified = verify::run(&bus, Some(&report.run_id)).await?;
        anyhow::Ok((report, verified))
    };
    let outcome = tokio::select! {
        r = work => Some(r),
        _ = runtime::app::shutdown_signal() => None,
    };
    let dlq = bus
        .js
        .get_stream(runtime::wire::subjects::dlq_stream())
        .await
        .ok();
    let dead_letters = match dlq {
        Some(s) => s.get_info().await.map(|i| i.state.messages).unwrap_or(0),
        None => 0,
    };
    let ok = match outcome {
        None => {
            println!("interrupted: stopping everything");
            false
        }
        Some(Err(e)) => {
            println!("demo failed: {e:#}");
            false
        }
        Some(Ok((report, verified))) => {
            println!("\n== summary ==");
            report.print();
            println!("dead letters: {dead_letters}");
            verified.print();
            report.ok() && verified.violations() == 0
        }
    };
    println!("logs: {}", shop.logs().display());
    if cfg.keep_running && ok {
        println!(
            "still running (NATS {}); Prometheus: `make prometheus`; Ctrl-C stops everything",
            shop.nats.url
        );
        runtime::app::shutdown_signal().await;
    }
    shop.stop()?;
    println!("stopped cleanly");
    Ok(ok)
}
