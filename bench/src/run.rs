//! Runs the benchmark: the whole shop, every context in its own process (or as `--node`
//! groups them), simulators with zero latency and no failures. For each nats-server sync
//! setting it drives orders (a) as fast as the system completes them and (b) at fixed rates,
//! and measures completed orders per second, end-to-end latency (PlaceOrder published to
//! terminal event observed), CPU seconds per order and resident memory of every process, the
//! machine's CPU ([`crate::host`]) and, for the fixed-rate phases, the latency stage by stage
//! ([`crate::stages`]), into a [`Report`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use choreo::load::{self, LoadConfig};
use choreo::shop::{Shop, ShopOptions};
use orders::PlaceOrder;
use runtime::component::Message as _;
use runtime::config::NodeConfig;
use runtime::wire::bus::Bus;
use runtime::wire::subjects;

use crate::host;
use crate::report::{by_second, phase_line, probe_line, Phase, Report};
use crate::stages;

/// What to run: the phases, the sync settings and the node layout.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub dir: PathBuf,
    /// Length of the as-fast-as-possible phase.
    pub max_seconds: u64,
    /// Orders in flight during the as-fast-as-possible phase.
    pub concurrency: usize,
    /// Fixed rates, orders per second.
    pub rates: Vec<f64>,
    pub rate_seconds: u64,
    /// nats-server `sync_interval: always` (true) or the default (false); one run each.
    pub sync_modes: Vec<bool>,
    /// Let each fixed-rate phase start from a settled machine: once the previous phase's
    /// message ids have left nats-server's duplicate window and the page cache is written
    /// back.
    pub settle: bool,
    /// Node processes: the contexts each one hosts, comma-separated (see
    /// [`check_nodes`](crate::layout::check_nodes)).
    pub nodes: Vec<String>,
    /// nats-servers: 1, or 3 in a cluster with everything replicated three times.
    pub servers: usize,
    /// Node config (TOML) for every node; empty: the defaults.
    pub node_config: String,
    /// Per-process NATS identities, rights and TLS (the default), or none.
    pub secure: bool,
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32, tck: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is [0], ..., utime [11] and stime [12] (fields 14, 15).
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / tck
}

/// A `/proc/<pid>/status` value in kB, as MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| (kb / 1024.0 * 10.0).round() / 10.0)
        .unwrap_or(0.0)
}

fn processes(shop: &Shop) -> Vec<(String, u32)> {
    let mut p: Vec<(String, u32)> = shop
        .nodes
        .iter()
        .map(|n| (n.context.clone(), n.proc.pid()))
        .collect();
    p.push(("nats-server".into(), shop.nats.proc.pid()));
    for (i, peer) in shop.peers.iter().enumerate() {
        p.push((format!("nats-server-{}", i + 1), peer.proc.pid()));
    }
    if let Some(s) = &shop.sim {
        p.push(("sim".into(), s.pid()));
    }
    p
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
            .to_string(),
    );
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(kb) = mem
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
    {
        m.insert("memory_gib".into(), format!("{:.1}", kb / 1024.0 / 1024.0));
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
    {
        m.insert("cpu".into(), model.trim().to_string());
    }
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        m.insert("kernel".into(), k.trim().to_string());
    }
    m
}

fn load_config(rate: f64, seconds: u64, concurrency: usize) -> LoadConfig {
    // Enough orders (and so stock) for the phase: at most 5,000/s when unpaced.
    let per_second = if rate > 0.0 { rate } else { 5_000.0 };
    LoadConfig {
        orders: (per_second * seconds as f64) as usize + 1_000,
        rate,
        concurrency,
        customers: 50,
        fail_stock_pct: 0.0,
        fail_payment_pct: 0.0,
        fail_shipping_pct: 0.0,
        timeout: Duration::from_secs(60),
        max_duration: Some(Duration::from_secs(seconds)),
        seed: 11,
    }
}

/// Runs every phase for every sync setting. `progress` gets one line per phase.
pub async fn run(cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> anyhow::Result<Report> {
    let tck = clk_tck();
    std::fs::create_dir_all(&cfg.dir)?;
    let dir = cfg.dir.clone();
    let probe = tokio::task::spawn_blocking(move || host::probe(&dir)).await??;
    progress(&probe_line(&probe));
    let mut report = Report {
        machine: machine(),
        host: Some(probe),
        build: if cfg!(debug_assertions) {
            "debug".into()
        } else {
            "release".into()
        },
        nodes: cfg.nodes.clone(),
        idle_rss_mib: BTreeMap::new(),
        phases: Vec::new(),
        comparison: Vec::new(),
    };
    for &sync in &cfg.sync_modes {
        let sync_name = if sync { "always" } else { "default" };
        let mut config = cfg.node_config.clone();
        if cfg.servers > 1 && !config.contains("[stream]") {
            config.push_str(&format!("\n[stream]\nreplicas = {}\n", cfg.servers));
        }
        let node_config = if config.trim().is_empty() {
            None
        } else {
            let path = cfg.dir.join("node.toml");
            std::fs::write(&path, &config)?;
            Some(path)
        };
        let shop = Shop::start(ShopOptions {
            sync_always: sync,
            contexts: cfg.nodes.clone(),
            servers: cfg.servers,
            node_config,
            secure: cfg.secure,
            ..ShopOptions::new(cfg.dir.join(sync_name))
        })
        .await?;
        let bus = shop.operator().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let procs = processes(&shop);
        report.idle_rss_mib.insert(
            sync_name.into(),
            procs
                .iter()
                .map(|(n, pid)| (n.clone(), status_mib(*pid, "VmRSS:")))
                .collect(),
        );
        // Warm-up: connections, consumers, caches.
        let mut warm = load_config(0.0, 5, 128);
        warm.orders = 200;
        load::run(&bus, &warm, |_| {}).await?;
        let mut phases: Vec<(String, f64, u64, usize)> =
            vec![("max".into(), 0.0, cfg.max_seconds, cfg.concurrency)];
        phases.extend(
            cfg.rates
                .iter()
                .map(|r| (format!("rate-{r}"), *r, cfg.rate_seconds, 4096)),
        );
        let window = duplicate_window(&bus).await;
        let mut previous_end = None;
        for (name, rate, seconds, concurrency) in phases {
            let settled_seconds = match previous_end {
                Some(end) if cfg.settle => settle(end, window).await,
                _ => 0.0,
            };
            let before: Vec<f64> = procs
                .iter()
                .map(|(_, pid)| cpu_seconds(*pid, tck))
                .collect();
            let sampler = host::Sampler::start();
            // The fixed-rate phases get their stages: where each stream stood before.
            let marks = if rate > 0.0 {
                Some(stages::mark(&bus).await?)
            } else {
                None
            };
            let r = load::run(&bus, &load_config(rate, seconds, concurrency), |_| {}).await?;
            previous_end = Some(Instant::now());
            let first_placed = r.timeline.first().map(|&(placed, _)| placed);
            let (machine_cpu, machine_by_second) = sampler.stop(first_placed).await;
            let cpu: BTreeMap<String, f64> = procs
                .iter()
                .zip(before)
                .map(|((n, pid), b)| {
                    (
                        n.clone(),
                        ((cpu_seconds(*pid, tck) - b) * 100.0).round() / 100.0,
                    )
                })
                .collect();
            let terminal = (r.completed + r.cancelled).max(1);
            let peak_rss_mib = procs
                .iter()
                .map(|(n, pid)| (n.clone(), status_mib(*pid, "VmHWM:")))
                .collect();
            // Read back after the CPU and memory are taken: the reading is the bench's work.
            let stages = match &marks {
                Some(marks) => {
                    let stored = stages::read_since(&bus, marks).await?;
                    Some(stages::analyze(&stored, PlaceOrder::TYPE, &load::TERMINAL))
                }
                None => None,
            };
            let phase = Phase {
                phase: name,
                sync: sync_name.into(),
                target_rate: rate,
                placed: r.placed,
                completed: r.completed,
                cancelled: r.cancelled,
                unfinished: r.unfinished,
                seconds: r.elapsed_seconds,
                completed_per_second: r.completed as f64 / r.elapsed_seconds.max(0.001),
                latency_ms: r.latency_ms,
                cpu_seconds_per_order: cpu.values().sum::<f64>() / terminal as f64,
                cpu_seconds: cpu,
                peak_rss_mib,
                stages,
                by_second: by_second(&r.timeline),
                settled_seconds,
                machine_cpu: Some(machine_cpu),
                machine_by_second,
            };
            progress(&phase_line(&phase));
            report.phases.push(phase);
        }
        shop.stop()?;
    }
    Ok(report)
}

/// Waits until the previous phase, which ended at `previous_end`, no longer weighs on the
/// next: its message ids have left nats-server's duplicate `window` (expiring them takes the
/// stream's lock) and the machine's dirty pages are written back (`sync`; the kernel would
/// otherwise write the previous phase's data out during the next one). So each fixed-rate
/// phase measures its own rate, not the end of an overload before it. Returns the seconds
/// waited.
async fn settle(previous_end: Instant, window: Duration) -> f64 {
    let started = Instant::now();
    tokio::time::sleep(window.saturating_sub(previous_end.elapsed())).await;
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
    started.elapsed().as_secs_f64()
}

/// The duplicate window the shop's streams were created with (the orders stream's; the
/// nodes' default if it cannot be read).
async fn duplicate_window(bus: &Bus) -> Duration {
    match bus.js.get_stream(subjects::stream("orders")).await {
        Ok(stream) => stream.cached_info().config.duplicate_window,
        Err(_) => NodeConfig::default().stream.duplicate_window,
    }
}
