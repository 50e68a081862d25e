//! The `choreo-bench` command line: parse, set up tracing, run the bench, write and print
//! the report. The shop's processes are started with the `choreo` binary next to this one
//! (or `$CHOREO_BIN`).

use std::path::PathBuf;
use std::process::ExitCode;

use choreo_bench::{layout, report, run};
use clap::Parser;

/// The same allocator as the `choreo` binary: the bench shares the machine's cores with the
/// shop it measures, and costs on them what `choreo` would.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark the whole shop: max throughput and fixed rates, latency (end to end and by
/// stage), CPU, memory, and the host it ran on (a probe, busy and stolen CPU).
#[derive(Parser)]
#[command(name = "choreo-bench", version, about, long_about = None)]
struct Cli {
    /// Working directory (server stores, node data, logs); wiped per run.
    #[arg(long, default_value = ".choreo/bench")]
    dir: PathBuf,
    /// Length of the as-fast-as-possible phase (e.g. 60s).
    #[arg(long, value_parser = runtime::config::duration::parse, default_value = "60s")]
    max_duration: std::time::Duration,
    /// Orders in flight during the as-fast-as-possible phase.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Fixed rates in orders per second, comma-separated.
    #[arg(long, default_value = "100,250,500", value_delimiter = ',')]
    rates: Vec<f64>,
    /// Length of each fixed-rate phase (e.g. 20s).
    #[arg(long, value_parser = runtime::config::duration::parse, default_value = "20s")]
    rate_duration: std::time::Duration,
    /// nats-server sync settings to run with: default, always (comma-separated).
    #[arg(long, default_value = "default,always", value_delimiter = ',')]
    sync: Vec<String>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench/latest.json")]
    out: PathBuf,
    /// A previous report to compare with (ratios printed and stored).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Start each fixed-rate phase right after the previous one. By default it waits until
    /// the previous phase's message ids have left nats-server's duplicate window and the
    /// page cache is written back (`sync`), so each phase measures its own rate.
    #[arg(long)]
    no_settle: bool,
    /// Contexts one node process hosts, comma-separated; repeat for each process. Together
    /// they must name every context once. Default: each context in its own process, as the
    /// targets in the README are stated.
    #[arg(long = "node", value_name = "CONTEXTS")]
    nodes: Vec<String>,
    /// nats-servers: 1, or 3 (a cluster on loopback, everything replicated three times).
    #[arg(long, default_value_t = 1, value_parser = servers)]
    servers: usize,
    /// A node config file for every node (TOML; with `--servers 3`, `[stream] replicas = 3`
    /// is added unless it sets `[stream]` itself).
    #[arg(long)]
    node_config: Option<PathBuf>,
    /// No NATS identities, rights or TLS (by default the shop runs secured, as `choreo
    /// demo` does); to measure what security costs.
    #[arg(long)]
    insecure: bool,
}

fn servers(s: &str) -> Result<usize, String> {
    match s {
        "1" => Ok(1),
        "3" => Ok(3),
        _ => Err(format!("1 or 3 servers, not {s:?}")),
    }
}

impl Cli {
    fn config(self) -> anyhow::Result<run::BenchConfig> {
        let sync_modes = self
            .sync
            .iter()
            .map(|s| match s.as_str() {
                "default" => Ok(false),
                "always" => Ok(true),
                other => Err(anyhow::anyhow!(
                    "--sync takes default and/or always, not {other:?}"
                )),
            })
            .collect::<anyhow::Result<Vec<bool>>>()?;
        anyhow::ensure!(
            self.rates.iter().all(|r| *r > 0.0),
            "--rates must be positive"
        );
        let nodes = if self.nodes.is_empty() {
            layout::separate_nodes()
        } else {
            self.nodes
        };
        layout::check_nodes(&nodes)?;
        Ok(run::BenchConfig {
            dir: self.dir,
            max_seconds: self.max_duration.as_secs(),
            concurrency: self.concurrency,
            rates: self.rates,
            rate_seconds: self.rate_duration.as_secs(),
            sync_modes,
            settle: !self.no_settle,
            nodes,
            servers: self.servers,
            node_config: self
                .node_config
                .map(std::fs::read_to_string)
                .transpose()?
                .unwrap_or_default(),
            secure: !self.insecure,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Log level from `CHOREO_LOG` (default `warn`), as the `choreo` client commands.
    runtime::app::init_tracing("warn");
    match bench(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn bench(cli: Cli) -> anyhow::Result<()> {
    let (out, baseline) = (cli.out.clone(), cli.baseline.clone());
    let cfg = cli.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut report = rt.block_on(run::run(&cfg, |line| println!("{line}")))?;
    if let Some(b) = &baseline {
        report::compare(&mut report, b)?;
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!();
    report::print(&report);
    println!("report: {}", out.display());
    Ok(())
}
