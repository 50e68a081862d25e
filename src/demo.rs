//! `choreo demo`: the shop end to end on this machine. Starts nats-server (the project's own
//! install) with a JetStream store, one `choreo node` process per context, the external
//! system simulators, then places orders while printing progress, verifies the invariants
//! and prints a summary. Ctrl-C stops everything cleanly.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::contexts::KNOWN;
use crate::load::{self, LoadConfig};
use crate::procs::{free_port, NatsServer, Proc};
use crate::{client, verify};

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub dir: PathBuf,
    pub port: Option<u16>,
    pub sync_always: bool,
    pub load: LoadConfig,
}

/// A running shop: nats-server, one node per context, the simulators.
pub struct Shop {
    pub nats: NatsServer,
    pub nodes: Vec<(String, Proc, String)>,
    pub sim: Proc,
    pub dir: PathBuf,
}

impl Shop {
    /// Starts everything under `dir` (wiped first) and waits until every context answers.
    pub async fn start(dir: PathBuf, port: Option<u16>, sync_always: bool, sim_args: &[String]) -> anyhow::Result<Shop> {
        for sub in ["nats", "data", "logs"] {
            let _ = std::fs::remove_dir_all(dir.join(sub));
        }
        let nats_dir = dir.join("nats");
        let nats = tokio::task::spawn_blocking(move || NatsServer::start(&nats_dir, port, sync_always)).await??;
        let exe = std::env::current_exe().context("locate the choreo binary")?;
        let mut nodes = Vec::new();
        for ctx in KNOWN {
            let metrics = format!("127.0.0.1:{}", free_port());
            let args: Vec<String> = ["node", "--context", ctx, "--nats", &nats.url, "--data", &dir.join("data").display().to_string(), "--metrics", &metrics]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let p = Proc::spawn(ctx, &exe, &args, &dir.join("logs").join(format!("{ctx}.log")), &[])?;
            nodes.push((ctx.to_string(), p, metrics));
        }
        let mut args = vec!["sim".to_string(), "--nats".into(), nats.url.clone()];
        args.extend_from_slice(sim_args);
        let sim = Proc::spawn("sim", &exe, &args, &dir.join("logs/sim.log"), &[])?;
        let mut shop = Shop { nats, nodes, sim, dir };
        let bus = client::connect(&shop.nats.url, Duration::from_secs(10)).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(dead) = shop.dead_node() {
                anyhow::bail!("{dead}");
            }
            if client::wait_ready(&bus, KNOWN, Duration::from_secs(1)).await.is_ok() {
                return Ok(shop);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "contexts not ready after 60 s; see {}", shop.dir.join("logs").display());
        }
    }

    /// The first node that exited, with the end of its log.
    pub fn dead_node(&mut self) -> Option<String> {
        let logs = self.dir.join("logs");
        self.nodes.iter_mut().find_map(|(name, p, _)| (!p.is_running()).then_some(name)).map(|name| {
            let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            format!("node {name} exited:\n  {}", tail.into_iter().rev().collect::<Vec<_>>().join("\n  "))
        })
    }

    /// SIGTERM to every node and the simulators (they finish in-flight work), then the server.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for (_, p, _) in &self.nodes {
            let _ = p.signal(nix::sys::signal::Signal::SIGTERM);
        }
        for (name, p, _) in &mut self.nodes {
            if let Err(e) = p.terminate(Duration::from_secs(30)) {
                problems.push(format!("{name}: {e}"));
            }
        }
        let _ = self.sim.terminate(Duration::from_secs(5));
        let _ = self.nats.proc.terminate(Duration::from_secs(10));
        anyhow::ensure!(problems.is_empty(), "unclean stop: {}", problems.join("; "));
        Ok(())
    }
}

/// Runs the demo. Returns true if every order ended as set up and verify found nothing.
pub async fn run(cfg: DemoConfig) -> anyhow::Result<bool> {
    println!("choreo demo: starting nats-server, {} context nodes and the simulators in {}", KNOWN.len(), cfg.dir.display());
    let shop = Shop::start(cfg.dir.clone(), cfg.port, cfg.sync_always, &[]).await?;
    println!("nats-server {} (JetStream store {}, sync_interval {})", shop.nats.url, shop.nats.dir.join("jetstream").display(), if cfg.sync_always { "always" } else { "default (2 min)" });
    for (ctx, p, metrics) in &shop.nodes {
        println!("  node {ctx:<10} pid {:<7} metrics http://{metrics}/metrics", p.pid());
    }
    let bus = client::connect(&shop.nats.url, Duration::from_secs(10)).await?;
    let c = &cfg.load;
    println!(
        "placing {} orders ({}; {}% out of stock, {}% declined, {}% undeliverable)",
        c.orders,
        if c.rate > 0.0 { format!("{} orders/s", c.rate) } else { "as fast as possible".into() },
        c.fail_stock_pct, c.fail_payment_pct, c.fail_shipping_pct
    );
    let work = async {
        let report = load::run(&bus, &cfg.load, |p| {
            println!("  placed {:>6}  completed {:>6}  cancelled {:>6}", p.placed, p.completed, p.cancelled);
        })
        .await?;
        let verified = verify::run(&bus, Some(&report.run_id)).await?;
        anyhow::Ok((report, verified))
    };
    let outcome = tokio::select! {
        r = work => Some(r),
        _ = crate::shutdown_signal() => None,
    };
    let dlq = bus.js.get_stream(runtime::subjects::DLQ_STREAM).await.ok();
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
    println!("logs: {}", shop.dir.join("logs").display());
    shop.stop()?;
    println!("stopped cleanly");
    Ok(ok)
}
