//! `choreo bench`: the whole shop, every context in its own process (or as `--node` groups
//! them), simulators with zero latency and no failures. For each nats-server sync setting
//! it drives orders (a) as fast as the system completes them and (b) at fixed rates, and
//! reports completed orders per second, end-to-end latency (PlaceOrder published to
//! terminal event observed), CPU seconds per order and resident memory of every process,
//! and for the fixed-rate phases the latency stage by stage ([`crate::stages`]). Writes JSON
//! and compares with a baseline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orders::PlaceOrder;
use runtime::component::Message as _;
use runtime::config::NodeConfig;
use runtime::wire::bus::Bus;
use runtime::wire::subjects;
use serde::{Deserialize, Serialize};

use crate::host;
use crate::load::{self, LoadConfig};
use crate::shop::{Shop, ShopOptions};
use crate::stages::{self, Stages};

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
    /// Let each fixed-rate phase start from a settled machine (see [`settle`]).
    pub settle: bool,
    /// Node processes: the contexts each one hosts, comma-separated (see [`check_nodes`]).
    pub nodes: Vec<String>,
}

/// Every context alone in its own process: the shop as the targets state it.
pub fn separate_nodes() -> Vec<String> {
    crate::contexts::all()
}

/// A bench layout must host every context of the shop exactly once, each a known one.
pub fn check_nodes(nodes: &[String]) -> anyhow::Result<()> {
    let mut seen: Vec<String> = Vec::new();
    for node in nodes {
        let contexts = crate::contexts::expand(node);
        anyhow::ensure!(!contexts.is_empty(), "--node {node:?} names no context");
        for c in contexts {
            crate::contexts::ensure_known(&c)
                .map_err(|e| anyhow::anyhow!("--node {node:?}: {e}"))?;
            anyhow::ensure!(!seen.contains(&c), "context {c:?} is in two --node values");
            seen.push(c);
        }
    }
    let missing: Vec<&str> = crate::contexts::KNOWN
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub phase: String,
    pub sync: String,
    /// 0 = as fast as possible.
    pub target_rate: f64,
    pub placed: usize,
    pub completed: usize,
    pub cancelled: usize,
    pub unfinished: usize,
    pub seconds: f64,
    pub completed_per_second: f64,
    pub latency_ms: load::Latency,
    /// CPU seconds (user + system) of every process, per terminal order.
    pub cpu_seconds_per_order: f64,
    pub cpu_seconds: BTreeMap<String, f64>,
    /// Peak resident memory so far (VmHWM), MiB.
    pub peak_rss_mib: BTreeMap<String, f64>,
    /// Fixed-rate phases: where the time went, stage by stage (see [`crate::stages`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Stages>,
    /// Latency of the orders placed in each second of the phase: whether the tail is spread
    /// over the phase (queueing) or comes from a few seconds (a stall).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_second: Vec<Second>,
    /// Seconds waited before the phase for the previous one's effects to pass (see
    /// [`settle`]); 0 without.
    #[serde(default)]
    pub settled_seconds: f64,
    /// The whole machine's CPU during the phase, the bench's own included (reports before
    /// this field: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_cpu: Option<host::Usage>,
    /// The same, second by second from the phase's first order (see [`host::Sampler`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine_by_second: Vec<host::Second>,
}

/// The orders placed in one second of a phase that reached a terminal state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the phase's first order.
    pub second: u64,
    pub orders: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// [`Second`]s from (placed, ended) Unix ms of each order, in placing order.
pub fn by_second(timeline: &[(u64, Option<u64>)]) -> Vec<Second> {
    let Some(&(start, _)) = timeline.first() else {
        return Vec::new();
    };
    let mut seconds: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for &(placed, ended) in timeline {
        if let Some(ended) = ended {
            let ms = ended.saturating_sub(placed) as f64;
            seconds
                .entry(placed.saturating_sub(start) / 1000)
                .or_default()
                .push(ms);
        }
    }
    seconds
        .into_iter()
        .map(|(second, mut ms)| {
            ms.sort_by(f64::total_cmp);
            let latency = load::Latency::of(&ms);
            Second {
                second,
                orders: ms.len(),
                p50_ms: latency.p50,
                p99_ms: latency.p99,
                max_ms: latency.max,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub phase: String,
    pub sync: String,
    pub baseline_completed_per_second: f64,
    pub throughput_ratio: f64,
    pub baseline_p99_ms: f64,
    pub p99_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: BTreeMap<String, String>,
    /// The host's costs measured before the shop starts (see [`host`]; reports before this
    /// field: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<host::Probe>,
    pub build: String,
    /// Node processes, each with the contexts it hosts (reports before this field: every
    /// context in its own process).
    #[serde(default = "separate_nodes")]
    pub nodes: Vec<String>,
    /// Resident memory after start-up, before any load, MiB, per sync setting and process.
    pub idle_rss_mib: BTreeMap<String, BTreeMap<String, f64>>,
    pub phases: Vec<Phase>,
    #[serde(default)]
    pub comparison: Vec<Comparison>,
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
        let shop = Shop::start(ShopOptions {
            sync_always: sync,
            contexts: cfg.nodes.clone(),
            ..ShopOptions::new(cfg.dir.join(sync_name))
        })
        .await?;
        let bus = crate::client::connect(&shop.nats.url, Duration::from_secs(10)).await?;
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
        Err(_) => Duration::from_millis(NodeConfig::default().stream.duplicate_window_ms),
    }
}

fn phase_line(p: &Phase) -> String {
    let worst = p
        .machine_by_second
        .iter()
        .map(|s| s.usage.steal_pct)
        .reduce(f64::max);
    let machine = match (p.machine_cpu, worst) {
        (Some(u), Some(w)) => format!(
            "  cores busy {:.2}, steal {:.1}% (worst second {w:.1}%)",
            u.cores_busy, u.steal_pct
        ),
        (Some(u), None) => format!(
            "  cores busy {:.2}, steal {:.1}%",
            u.cores_busy, u.steal_pct
        ),
        (None, _) => String::new(),
    };
    format!(
        "{:<9} sync={:<7} {:>7.1} completed/s ({} placed, {} unfinished)  p50 {:>7.1} ms  p99 {:>7.1} ms  p99.9 {:>7.1} ms  cpu {:.2} ms/order{machine}",
        p.phase,
        p.sync,
        p.completed_per_second,
        p.placed,
        p.unfinished,
        p.latency_ms.p50,
        p.latency_ms.p99,
        p.latency_ms.p999,
        p.cpu_seconds_per_order * 1000.0
    )
}

fn probe_line(p: &host::Probe) -> String {
    format!(
        "host: cpu loop {:.1} ms, thread wake-up round trip p50 {:.1} / p99 {:.1} us, 4 KiB write + fdatasync p50 {:.2} / p99 {:.2} ms",
        p.cpu_loop_ms,
        p.wake_round_trip_us_p50,
        p.wake_round_trip_us_p99,
        p.fdatasync_ms_p50,
        p.fdatasync_ms_p99
    )
}

/// Adds the comparison with a stored baseline report.
pub fn compare(report: &mut Report, baseline: &Path) -> anyhow::Result<()> {
    let base: Report = serde_json::from_str(&std::fs::read_to_string(baseline)?)?;
    report.comparison = report
        .phases
        .iter()
        .filter_map(|p| {
            let b = base
                .phases
                .iter()
                .find(|b| b.phase == p.phase && b.sync == p.sync)?;
            Some(Comparison {
                phase: p.phase.clone(),
                sync: p.sync.clone(),
                baseline_completed_per_second: b.completed_per_second,
                throughput_ratio: p.completed_per_second / b.completed_per_second.max(0.001),
                baseline_p99_ms: b.latency_ms.p99,
                p99_ratio: p.latency_ms.p99 / b.latency_ms.p99.max(0.001),
            })
        })
        .collect();
    Ok(())
}

/// The report as the table `choreo bench` prints.
pub fn print(report: &Report) {
    println!("machine: {:?}, build {}", report.machine, report.build);
    if let Some(p) = &report.host {
        println!("{}", probe_line(p));
    }
    if report.nodes == separate_nodes() {
        println!("nodes: every context in its own process");
    } else {
        println!(
            "nodes: {} processes: {}",
            report.nodes.len(),
            report.nodes.join(" | ")
        );
    }
    for p in &report.phases {
        println!("{}", phase_line(p));
    }
    for (sync, rss) in &report.idle_rss_mib {
        println!("idle RSS MiB (sync={sync}): {rss:?}");
    }
    for p in report.phases.iter().filter(|p| p.phase == "max") {
        println!(
            "peak RSS MiB (after the max phase, sync={}): {:?}",
            p.sync, p.peak_rss_mib
        );
    }
    for p in &report.phases {
        if let Some(st) = &p.stages {
            print_stages(p, st);
            print_seconds(p);
        }
    }
    for c in &report.comparison {
        println!(
            "vs baseline {:<9} sync={:<7} throughput x{:.2} ({:.1}/s before), p99 x{:.2} ({:.1} ms before)",
            c.phase, c.sync, c.throughput_ratio, c.baseline_completed_per_second, c.p99_ratio, c.baseline_p99_ms
        );
    }
}

/// The spread of a phase's p99 over its seconds, and its worst seconds.
fn print_seconds(p: &Phase) {
    if p.by_second.is_empty() {
        return;
    }
    let mut p99: Vec<f64> = p.by_second.iter().map(|s| s.p99_ms).collect();
    p99.sort_by(f64::total_cmp);
    let mut worst: Vec<&Second> = p.by_second.iter().collect();
    worst.sort_by(|a, b| b.p99_ms.total_cmp(&a.p99_ms));
    let worst: Vec<String> = worst
        .iter()
        .take(3)
        .map(|s| {
            let stolen = p
                .machine_by_second
                .iter()
                .find(|m| m.second == s.second)
                .map_or(String::new(), |m| {
                    format!(", steal {:.1}%", m.usage.steal_pct)
                });
            format!(
                "second {} {:.1} ms ({} orders{stolen})",
                s.second, s.p99_ms, s.orders
            )
        })
        .collect();
    println!(
        "  p99 of the orders placed in each second: min {:.1}, median {:.1}, max {:.1} ms; worst: {}",
        p99[0],
        load::quantile(&p99, 0.5),
        p99[p99.len() - 1],
        worst.join(", ")
    );
}

/// A phase's stages: the message types of its orders (at least one per ten orders; the
/// customers and stock a phase sets up are left out), slowest "to stream" first, and what
/// held up its slowest orders. Whole milliseconds, as measured.
fn print_stages(p: &Phase, st: &Stages) {
    println!(
        "stages, {} sync={} (ms; to stream = decided -> stored, from cause = cause stored -> decided, or cause decided -> decided when delivered in the node before its cause was stored):",
        p.phase, p.sync
    );
    let mut rows: Vec<&stages::Stage> = st
        .stages
        .iter()
        .filter(|s| s.messages * 10 >= p.placed)
        .collect();
    rows.sort_by(|a, b| b.to_stream_ms.p99.total_cmp(&a.to_stream_ms.p99));
    for s in rows {
        let mut from = s.from_cause_ms.as_ref().map_or("-".to_string(), |f| {
            format!("p50 {:>3.0} p99 {:>3.0}", f.p50, f.p99)
        });
        if s.in_node > 0 {
            from += &format!("   in node {}", s.in_node);
        }
        println!(
            "  {:<10} {:<20} {:>6}  to stream p50 {:>3.0} p99 {:>3.0}   from cause {from}",
            s.source, s.msg_type, s.messages, s.to_stream_ms.p50, s.to_stream_ms.p99
        );
    }
    let mut slow: Vec<(&String, &usize)> = st.slowest_by_stage.iter().collect();
    slow.sort_by(|a, b| b.1.cmp(a.1));
    let slow: Vec<String> = slow.iter().map(|(k, n)| format!("{k} ({n})")).collect();
    println!(
        "  longest stage of the slowest {} orders: {}",
        st.slowest_orders,
        slow.join(", ")
    );
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

    #[test]
    fn seconds_split_orders_by_when_they_were_placed() {
        // Placed at 0, 0.5 s, 1.2 s and 2.9 s (the last unfinished): two seconds with orders.
        let t0 = 1_000_000;
        let timeline = [
            (t0, Some(t0 + 10)),
            (t0 + 500, Some(t0 + 530)),
            (t0 + 1200, Some(t0 + 1300)),
            (t0 + 2900, None),
        ];
        let s = by_second(&timeline);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].second, s[0].orders), (0, 2));
        assert_eq!((s[0].p50_ms, s[0].p99_ms, s[0].max_ms), (10.0, 30.0, 30.0));
        assert_eq!((s[1].second, s[1].orders, s[1].p99_ms), (1, 1, 100.0));
        assert!(by_second(&[]).is_empty());
    }
}
