//! The bench's report: per phase and sync setting, throughput, end-to-end latency (also by
//! second of placing), CPU per order, memory, the machine's CPU and, for the fixed-rate
//! phases, the latency by stage; the comparison with a baseline report, and the table
//! printed from it. Its JSON is what `bench/latest.json`, `bench/baseline.json` and
//! `bench/ab/stat.py` hold and read; a field added later has a default, so the reports
//! written before it still read.

use std::collections::BTreeMap;
use std::path::Path;

use choreo::load;
use serde::{Deserialize, Serialize};

use crate::host;
use crate::layout::separate_nodes;
use crate::stages::{self, Stages};

/// One phase (max or a fixed rate) with one sync setting.
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
    /// [`BenchConfig::settle`](crate::run::BenchConfig::settle)); 0 without.
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

/// A phase against the same phase of the baseline report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub phase: String,
    pub sync: String,
    pub baseline_completed_per_second: f64,
    pub throughput_ratio: f64,
    pub baseline_p99_ms: f64,
    pub p99_ratio: f64,
}

/// A whole run: the machine, the host probe, the layout and every phase.
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

/// A phase in one line, as printed while the bench runs and in the table.
pub(crate) fn phase_line(p: &Phase) -> String {
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

/// The host probe in one line.
pub(crate) fn probe_line(p: &host::Probe) -> String {
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

/// The report as the table `choreo-bench` prints.
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
