//! The scenarios, how one runs, and the summary.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use async_nats::HeaderMap;
use bytes::Bytes;
use choreo::contexts::KNOWN;
use choreo::load::{self, LoadConfig};
use choreo::verify;
use futures::StreamExt;
use nix::sys::signal::Signal;
use runtime::wire::envelope::{headers, new_id, now_ms};
use runtime::{wire::subjects, Envelope};
use serde::Serialize;

use crate::harness::{self, TestShop};
use crate::proxy::Proxy;

/// Orders per run, placed at `RATE` per second (so for about 15 s).
const ORDERS: usize = 300;
const RATE: f64 = 20.0;
/// Load before the fault starts, and how long a fault lasts.
const WARMUP: Duration = Duration::from_secs(3);
const HOLD: Duration = Duration::from_secs(4);
/// `ack_wait_ms` of the harness config (a SIGSTOP outlasts it).
const ACK_WAIT: Duration = Duration::from_secs(3);

/// What goes wrong.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// `kill -9` of one context's node, restarted after [`HOLD`].
    Kill9(&'static str),
    /// `kill -9` of every node at once.
    Kill9All,
    /// `choreo chaos inject --action crash --times 1` at a point; restarted once it fired.
    Crash {
        context: &'static str,
        point: &'static str,
        msg_type: Option<&'static str>,
    },
    /// SIGSTOP past the consumers' ack_wait, then SIGCONT.
    SigStop(&'static str),
    /// `kill -9` of nats-server, started again on the same store.
    NatsKill9,
    /// A simulator fails or is slow for `hold`.
    External {
        system: &'static str,
        failure_rate: f64,
        latency_ms: u64,
        hold: Duration,
    },
    /// The node talks to NATS through a proxy that adds this much latency each way.
    ProxyLatency(&'static str, u64),
    /// ... or that resets every connection twice a second.
    ProxyResets(&'static str),
    /// A node stopped (SIGTERM) for this long, then started again.
    Stopped(&'static str, Duration),
    /// Stored messages published again (same `Choreo-Id`, new `Nats-Msg-Id`), newest first.
    Replays,
    /// 1% of the messages on the bus malformed in one way or another.
    Malformed,
    /// The node's sled directory on a small tmpfs, filled up, then freed.
    DiskFull(&'static str),
    /// A store flush of the node that does not return (`store_flush` delay of 10 minutes).
    FlushStall(&'static str),
}

pub(crate) struct Scenario {
    pub(crate) name: String,
    fault: Fault,
    /// Appended to the node config.
    config: String,
    /// Normal orders may end cancelled (a deadline belongs to the scenario).
    cancellations_expected: bool,
    /// Orders lost are expected (a `[danger]` switch is on): give up waiting sooner.
    danger: bool,
    /// Orders placed, and how many a second.
    orders: usize,
    rate: f64,
    /// The consumers' `ack_wait` at its default (30 s) instead of the harness's 3 s: for
    /// scenarios whose point is that nothing waits for it.
    default_ack_wait: bool,
}

impl Scenario {
    pub(crate) fn new(name: &str, fault: Fault) -> Self {
        Scenario {
            name: name.to_string(),
            fault,
            config: String::new(),
            cancellations_expected: false,
            danger: false,
            orders: ORDERS,
            rate: RATE,
            default_ack_wait: false,
        }
    }

    /// `orders` orders at `rate` a second instead of the default load.
    fn load(mut self, orders: usize, rate: f64) -> Self {
        self.orders = orders;
        self.rate = rate;
        self
    }

    /// With the consumers' `ack_wait` at its default (30 s).
    fn default_ack_wait(mut self) -> Self {
        self.default_ack_wait = true;
        self
    }

    fn config(mut self, c: &str) -> Self {
        self.config.push_str(c);
        self.config.push('\n');
        self
    }

    /// Switches a mechanism off (`[danger]`).
    pub(crate) fn danger(mut self, switch: &str) -> Self {
        self.danger = true;
        self.config(&format!("[danger]\n{switch}"))
    }
}

fn crash(context: &'static str, point: &'static str) -> Scenario {
    Scenario::new(
        &format!("crash-{}-{context}", point.replace('-', "_")),
        Fault::Crash {
            context,
            point,
            msg_type: None,
        },
    )
}

/// Every scenario.
pub(crate) fn full() -> Vec<Scenario> {
    let mut v: Vec<Scenario> = KNOWN
        .iter()
        .map(|c| Scenario::new(&format!("kill9-{c}"), Fault::Kill9(c)))
        .collect();
    v.push(Scenario::new("kill9-all", Fault::Kill9All));
    // The README's recovery figure: every node killed at 200 orders/s, ack_wait 30 s.
    v.push(
        Scenario::new("kill9-all-200", Fault::Kill9All)
            .load(2_000, 200.0)
            .default_ack_wait(),
    );
    // The README's stream-limit figure, scaled down: every stream limited to 4 MiB,
    // payments stopped for 60 s while 6,000 orders are placed at 100/s.
    v.push(
        Scenario::new(
            "stream-limit-payments-stopped",
            Fault::Stopped("payments", Duration::from_secs(60)),
        )
        .load(6_000, 100.0)
        .config("[stream]\nmax_bytes = 4194304\n[sagas.order-fulfilment]\nawaiting = \"5m\""),
    );
    v.push(crash("shipping", "handler"));
    v.push(crash("orders", "after-commit"));
    v.push(crash("inventory", "outbox-publish"));
    v.push(crash("payments", "external-call"));
    let mut deadline = crash("orders", "deadline-fire")
        // Deadlines come due while the gateway hangs.
        .config("[sagas.order-fulfilment]\nawaiting = \"2s\"");
    deadline.cancellations_expected = true;
    v.push(deadline);
    v.push(Scenario::new("sigstop-orders", Fault::SigStop("orders")));
    v.push(Scenario::new(
        "sigstop-payments",
        Fault::SigStop("payments"),
    ));
    v.push(Scenario::new("nats-kill9", Fault::NatsKill9));
    for (name, system, failure_rate, latency_ms) in [
        ("gateway-errors", "payment-gateway", 1.0, 0),
        ("gateway-outage-10s", "payment-gateway", 1.0, 0),
        ("gateway-timeouts", "payment-gateway", 0.0, 1_500),
        ("gateway-hang", "payment-gateway", 0.0, 30_000),
        ("carrier-errors", "carrier", 0.5, 0),
        ("carrier-timeouts", "carrier", 0.0, 1_500),
        ("carrier-hang", "carrier", 0.0, 30_000),
    ] {
        let hold = if name == "gateway-outage-10s" {
            Duration::from_secs(10)
        } else {
            HOLD
        };
        let s = Scenario::new(
            name,
            Fault::External {
                system,
                failure_rate,
                latency_ms,
                hold,
            },
        );
        // The README's breaker-drain figure: a 10 s outage, ack_wait at its default.
        v.push(if name == "gateway-outage-10s" {
            s.default_ack_wait()
        } else {
            s
        });
    }
    v.push(Scenario::new(
        "proxy-latency-payments",
        Fault::ProxyLatency("payments", 100),
    ));
    v.push(Scenario::new(
        "proxy-resets-orders",
        Fault::ProxyResets("orders"),
    ));
    v.push(Scenario::new("replays", Fault::Replays));
    v.push(Scenario::new("malformed-1pct", Fault::Malformed));
    v.push(Scenario::new(
        "disk-full-inventory",
        Fault::DiskFull("inventory"),
    ));
    v.push(
        Scenario::new("flush-stall-inventory", Fault::FlushStall("inventory")).config(&format!(
            "[store]\nflush_stall = \"{}s\"",
            FLUSH_STALL.as_secs()
        )),
    );
    v
}

/// `store.flush_stall_ms` of the flush-stall scenario.
const FLUSH_STALL: Duration = Duration::from_secs(5);

/// The short matrix of the default test command: it still kills and restarts processes.
pub(crate) fn short() -> Vec<Scenario> {
    let names = [
        "kill9-orders",
        "kill9-all",
        "crash-after_commit-orders",
        "nats-kill9",
        "replays",
        "flush-stall-inventory",
    ];
    full()
        .into_iter()
        .filter(|s| names.contains(&s.name.as_str()))
        .collect()
}

/// One scenario's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Outcome {
    pub(crate) scenario: String,
    pub(crate) seed: u64,
    pub(crate) placed: usize,
    pub(crate) completed: usize,
    pub(crate) cancelled: usize,
    /// Orders that never reached a terminal state.
    pub(crate) lost: usize,
    /// Invariant violations: `verify`'s plus the scenario's own checks.
    pub(crate) violations: usize,
    /// Normal orders that ended cancelled (allowed only where a deadline is the point).
    pub(crate) unexpected: usize,
    /// From the end of the fault until the first order placed after it completed.
    pub(crate) recover_s: Option<f64>,
    /// From the end of the fault until every order placed before it ended had ended.
    pub(crate) drain_s: Option<f64>,
    pub(crate) details: Vec<String>,
    /// The scenario could not run as designed (a fault that never fired, a node that died).
    pub(crate) error: Option<String>,
    pub(crate) skipped: Option<String>,
    #[serde(skip)]
    cancellations_expected: bool,
}

impl Outcome {
    pub(crate) fn passed(&self) -> bool {
        self.skipped.is_some()
            || (self.error.is_none()
                && self.lost == 0
                && self.violations == 0
                && (self.cancellations_expected || self.unexpected == 0))
    }

    pub(crate) fn line(&self) -> String {
        let secs = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.1}"));
        format!(
            "{:<30} {:>4} {:>6} {:>9} {:>9} {:>4} {:>10} {:>10} {:>9} {:>7}  {}",
            self.scenario,
            self.seed,
            self.placed,
            self.completed,
            self.cancelled,
            self.lost,
            self.violations,
            secs(self.recover_s),
            secs(self.drain_s),
            if self.skipped.is_some() {
                "skipped"
            } else if self.passed() {
                "ok"
            } else {
                "FAILED"
            },
            self.error
                .iter()
                .chain(self.skipped.iter())
                .chain(self.details.iter())
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )
    }
}

/// Prints the table and writes it as JSON.
pub(crate) fn report(outcomes: &[Outcome], matrix: &str) {
    println!(
        "\n{:<30} {:>4} {:>6} {:>9} {:>9} {:>4} {:>10} {:>10} {:>9} {:>7}  notes",
        "scenario",
        "seed",
        "placed",
        "completed",
        "cancelled",
        "lost",
        "violations",
        "recover_s",
        "drain_s",
        "result"
    );
    for o in outcomes {
        println!("{}", o.line());
    }
    let out = std::env::var("CHOREO_CHAOS_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/chaos/summary.json")
        });
    if let Some(d) = out.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let json = serde_json::json!({
        "matrix": matrix,
        "machine": machine(),
        "orders_per_run": ORDERS,
        "rate": RATE,
        "scenarios": outcomes,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("write summary");
    println!("summary: {}", out.display());
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}

/// What a fault left to check or undo.
#[derive(Default)]
struct Applied {
    /// When the fault ended (Unix ms).
    ended_ms: u64,
    /// For a kill: when it began and when the nodes were ready again (Unix ms).
    killed_ms: Option<u64>,
    ready_ms: Option<u64>,
    details: Vec<String>,
    violations: Vec<String>,
    /// Malformed messages sent: each must come out as a dead letter.
    probes: Vec<String>,
}

/// Things set up before the load that must outlive it.
#[derive(Default)]
struct Setup {
    proxy: Option<Proxy>,
    mount: Option<Mount>,
}

/// Runs one scenario end to end.
pub(crate) async fn run(s: &Scenario, seed: u64) -> Outcome {
    let mut o = Outcome {
        scenario: s.name.clone(),
        seed,
        cancellations_expected: s.cancellations_expected,
        ..Default::default()
    };
    if let Fault::DiskFull(_) = s.fault {
        if let Err(why) = Mount::check() {
            o.skipped = Some(format!("no tmpfs mount here: {why}"));
            return o;
        }
    }
    let base = if s.default_ack_wait {
        harness::TEST_CONFIG.replace("ack_wait = \"3s\"", "ack_wait = \"30s\"")
    } else {
        harness::TEST_CONFIG.to_string()
    };
    let config = format!(
        "{base}\n[faults]\nenabled = true\nseed = {seed}\n{}",
        s.config
    );
    let mut t = harness::start_config(KNOWN, true, &config).await;
    let mut setup = Setup::default();
    if let Err(e) = run_in(&mut t, s, seed, &mut o, &mut setup).await {
        o.error = Some(format!("{e:#}"));
    }
    if let Err(e) = t.shop.stop() {
        o.details.push(format!("stop: {e}"));
    }
    drop(setup);
    o
}

async fn run_in(
    t: &mut TestShop,
    s: &Scenario,
    seed: u64,
    o: &mut Outcome,
    setup: &mut Setup,
) -> anyhow::Result<()> {
    prepare(t, s.fault, setup).await?;
    let bus = t.bus.clone();
    let cfg = LoadConfig {
        orders: s.orders,
        rate: s.rate,
        concurrency: s.orders,
        customers: 20,
        fail_stock_pct: 4.0,
        fail_payment_pct: 4.0,
        fail_shipping_pct: 3.0,
        timeout: if s.danger {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(60)
        },
        max_duration: None,
        seed,
    };
    let debug = std::env::var("CHOREO_CHAOS_DEBUG").is_ok();
    let load = tokio::spawn(async move {
        load::run(&bus, &cfg, |p| {
            if debug {
                eprintln!(
                    "  {} placed {} completed {} cancelled {}",
                    now_ms(),
                    p.placed,
                    p.completed,
                    p.cancelled
                );
            }
        })
        .await
    });
    // The seed moves the fault within the run.
    tokio::time::sleep(WARMUP + Duration::from_millis(250 * (seed % 5))).await;
    let applied = apply(t, s.fault, setup, seed).await?;
    let report = load.await??;
    if let Some(dead) = t.shop.dead_node() {
        anyhow::bail!("a node is down after the run: {dead}");
    }
    o.placed = report.placed;
    o.completed = report.completed;
    o.cancelled = report.cancelled;
    o.lost = report.unfinished;
    o.unexpected = report.unexpected.len();
    let ended = applied.ended_ms;
    let orders = report.orders.iter().zip(&report.timeline);
    // Fresh work flows end to end again: the first order placed after the fault ended that
    // completed (a cancellation may not need the failed part).
    o.recover_s = orders
        .clone()
        .filter(|((_, kind), (placed, _))| *kind == load::Kind::Normal && *placed >= ended)
        .filter_map(|(_, (_, e))| *e)
        .min()
        .map(|e| e.saturating_sub(ended) as f64 / 1000.0);
    // The backlog is gone: every order placed before the fault ended has ended.
    o.drain_s = orders
        .filter(|(_, (placed, _))| *placed < ended)
        .filter_map(|(_, (_, e))| *e)
        .max()
        .map(|e| e.saturating_sub(ended) as f64 / 1000.0);
    if let (Some(killed), Some(ready)) = (applied.killed_ms, applied.ready_ms) {
        // The orders in flight at the kill, from when the nodes were ready again.
        let in_flight = report
            .timeline
            .iter()
            .filter(|(placed, _)| *placed < killed)
            .filter_map(|(_, ended)| *ended)
            .max()
            .map_or(0.0, |e| e.saturating_sub(ready) as f64 / 1000.0);
        let start_s = ready.saturating_sub(ended) as f64 / 1000.0;
        o.details.push(format!(
            "ready {start_s:.1} s after the restart; the orders in flight at the kill ended {in_flight:.1} s after that"
        ));
    }
    let v = verify::run(&t.bus, Some(&report.run_id)).await?;
    let mut violations: Vec<String> = v
        .checks
        .iter()
        .flat_map(|(name, c)| c.violations.iter().map(move |m| format!("{name}: {m}")))
        .collect();
    violations.extend(applied.violations);
    if !applied.probes.is_empty() {
        violations.extend(missing_dead_letters(t, &applied.probes).await);
    }
    o.violations = violations.len();
    o.details.extend(applied.details);
    o.details.extend(violations.into_iter().take(5));
    if o.unexpected > 0 && !s.cancellations_expected {
        o.details.extend(report.unexpected.iter().take(3).cloned());
    }
    Ok(())
}

/// Set-up a fault needs before the load starts.
async fn prepare(t: &mut TestShop, fault: Fault, setup: &mut Setup) -> anyhow::Result<()> {
    match fault {
        Fault::ProxyLatency(ctx, _) | Fault::ProxyResets(ctx) => {
            let proxy = Proxy::start(format!("127.0.0.1:{}", t.shop.nats.port)).await;
            t.shop.node_nats.insert(ctx.to_string(), proxy.url.clone());
            t.shop.stop_node(ctx)?;
            t.shop.restart(ctx).await?;
            setup.proxy = Some(proxy);
        }
        Fault::DiskFull(ctx) => {
            t.shop.stop_node(ctx)?;
            setup.mount = Some(Mount::over(&t.shop.data_dir().join(ctx), 64)?);
            t.shop.restart(ctx).await?;
        }
        _ => {}
    }
    Ok(())
}

/// Applies the fault, holds it, ends it.
async fn apply(
    t: &mut TestShop,
    fault: Fault,
    setup: &Setup,
    seed: u64,
) -> anyhow::Result<Applied> {
    let mut a = Applied::default();
    match fault {
        Fault::Kill9(ctx) => {
            t.shop.kill9(ctx)?;
            tokio::time::sleep(HOLD).await;
            a.ended_ms = now_ms();
            t.shop.restart(ctx).await?;
        }
        Fault::Stopped(ctx, hold) => {
            t.shop.stop_node(ctx)?;
            tokio::time::sleep(hold).await;
            a.ended_ms = now_ms();
            t.shop.restart(ctx).await?;
        }
        Fault::Kill9All => {
            a.killed_ms = Some(now_ms());
            for ctx in KNOWN {
                t.shop.kill9(ctx)?;
            }
            tokio::time::sleep(HOLD).await;
            a.ended_ms = now_ms();
            for ctx in KNOWN {
                t.shop.respawn(ctx)?;
            }
            t.shop.wait_ready(Duration::from_secs(60)).await?;
            a.ready_ms = Some(now_ms());
        }
        Fault::Crash {
            context,
            point,
            msg_type,
        } => {
            if point == "deadline-fire" {
                // Awaiting deadlines (2 s here) come due while the gateway hangs.
                set_external(t, "payment-gateway", 0.0, 5_000).await?;
            }
            let mut extra = vec!["--times", "1"];
            if let Some(m) = msg_type {
                extra.extend(["--type", m]);
            }
            let (ok, out) = harness::inject(t, context, point, "crash", &extra);
            anyhow::ensure!(ok, "chaos inject: {out}");
            let fired = harness::eventually(Duration::from_secs(30), || {
                let running = t.shop.node(context).map(|n| n.proc.is_running());
                async move { running.is_ok_and(|r| !r) }
            })
            .await;
            anyhow::ensure!(fired, "the crash at {point} never fired in {context}");
            if point == "deadline-fire" {
                set_external(t, "payment-gateway", 0.0, 0).await?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            a.ended_ms = now_ms();
            t.shop.restart(context).await?;
        }
        Fault::SigStop(ctx) => {
            let node = t.shop.node(ctx)?;
            node.proc.signal(Signal::SIGSTOP)?;
            tokio::time::sleep(ACK_WAIT + Duration::from_secs(2)).await;
            node.proc.signal(Signal::SIGCONT)?;
            a.ended_ms = now_ms();
        }
        Fault::NatsKill9 => {
            t.shop.nats.kill9();
            tokio::time::sleep(Duration::from_secs(2)).await;
            a.ended_ms = now_ms();
            tokio::task::block_in_place(|| t.shop.nats.start_again())?;
        }
        Fault::External {
            system,
            failure_rate,
            latency_ms,
            hold,
        } => {
            set_external(t, system, failure_rate, latency_ms).await?;
            tokio::time::sleep(hold).await;
            set_external(t, system, 0.0, 0).await?;
            a.ended_ms = now_ms();
        }
        Fault::ProxyLatency(_, ms) => {
            let proxy = setup.proxy.as_ref().expect("proxy set up");
            proxy.set_latency(Duration::from_millis(ms));
            tokio::time::sleep(HOLD).await;
            proxy.set_latency(Duration::ZERO);
            a.ended_ms = now_ms();
        }
        Fault::ProxyResets(_) => {
            let proxy = setup.proxy.as_ref().expect("proxy set up");
            let until = Instant::now() + HOLD;
            while Instant::now() < until {
                proxy.reset_all();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            a.ended_ms = now_ms();
        }
        Fault::Replays => {
            let until = Instant::now() + HOLD;
            let mut sent = 0;
            while Instant::now() < until {
                sent += replay_recent(t, seed).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            a.details.push(format!("{sent} messages replayed"));
            a.ended_ms = now_ms();
        }
        Fault::Malformed => {
            // About 12 messages per order at RATE orders/s: 1% is ~2.4 a second.
            let until = Instant::now() + HOLD + HOLD;
            let mut n = 0;
            while Instant::now() < until {
                a.probes.push(send_malformed(t, n).await?);
                n += 1;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            a.details.push(format!("{n} malformed messages"));
            a.ended_ms = now_ms();
        }
        Fault::DiskFull(ctx) => {
            let mount = setup.mount.as_ref().expect("mount set up");
            let addr = t.shop.node(ctx)?.metrics_addr.clone();
            let pid = t.shop.node(ctx)?.proc.pid();
            mount.fill()?;
            let unready = harness::readyz_becomes(&addr, 503, Duration::from_secs(15)).await;
            if !unready {
                a.violations
                    .push("the node stayed ready with its disk full".into());
            }
            let handled = harness::metric(&addr, "choreo_messages_total", &[("outcome", "acked")]);
            tokio::time::sleep(HOLD).await;
            let handled_later =
                harness::metric(&addr, "choreo_messages_total", &[("outcome", "acked")]);
            if handled_later > handled {
                a.violations.push(format!(
                    "{} messages acked while the disk was full",
                    handled_later - handled
                ));
            }
            mount.free()?;
            a.ended_ms = now_ms();
            let ready = harness::readyz_becomes(&addr, 200, Duration::from_secs(30)).await;
            if !ready {
                a.violations
                    .push("the node did not become ready once space returned".into());
            }
            let same = t.shop.node(ctx)?.proc.pid() == pid;
            let restarts = harness::try_metric(
                &addr,
                "choreo_node_restarts_in_place_total",
                &[("reason", "flush_failed")],
            );
            a.details.push(format!(
                "not ready while full: {unready}; recovered in place: {}; restarts in place: {}",
                ready && same,
                restarts.map_or("?".into(), |n| n.to_string())
            ));
        }
        Fault::FlushStall(ctx) => {
            let addr = t.shop.node(ctx)?.metrics_addr.clone();
            let pid = t.shop.node(ctx)?.proc.pid();
            let stalls = || {
                harness::try_metric(
                    &addr,
                    "choreo_faults_injected_total",
                    &[("point", "store_flush")],
                )
            };
            let (ok, out) = harness::inject(
                t,
                ctx,
                "store-flush",
                "delay",
                &["--times", "1", "--delay", "10m"],
            );
            anyhow::ensure!(ok, "chaos inject: {out}");
            // The node flushes for every batch it commits: the next one stalls.
            let fired = harness::eventually(Duration::from_secs(10), || {
                let n = stalls();
                async move { n.is_some_and(|n| n >= 1.0) }
            })
            .await;
            anyhow::ensure!(fired, "the store_flush delay never fired in {ctx}");
            let stalled = std::time::Instant::now();
            if !harness::readyz_becomes(&addr, 503, FLUSH_STALL).await {
                a.violations
                    .push("the node stayed ready while its flush stalled".into());
            }
            let acked =
                || harness::try_metric(&addr, "choreo_messages_total", &[("outcome", "acked")]);
            let before = acked();
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let (Some(b), Some(later)) = (before, acked()) {
                if later > b {
                    a.violations.push(format!(
                        "{} messages acked while the store's flush stalled",
                        later - b
                    ));
                }
            }
            // The watchdog restarts the process in place: same pid, the fault's count (in
            // memory) back to 0, one restart in place counted for the stall, ready again.
            let restarted = harness::eventually(FLUSH_STALL + Duration::from_secs(30), || {
                let counted = harness::try_metric(
                    &addr,
                    "choreo_node_restarts_in_place_total",
                    &[("reason", "flush_stalled")],
                );
                let back = stalls() == Some(0.0)
                    && counted == Some(1.0)
                    && harness::http_status(&addr, "/readyz") == 200;
                async move { back }
            })
            .await;
            a.ended_ms = now_ms();
            if !restarted {
                a.violations
                    .push("the node did not restart after its flush stalled".into());
            }
            let same = t.shop.node(ctx)?.proc.pid() == pid;
            if !same {
                a.violations
                    .push("the node was not restarted in place".into());
            }
            a.details.push(format!(
                "stalled flush: restarted in place and ready {:.1} s after it stalled",
                stalled.elapsed().as_secs_f64()
            ));
        }
    }
    Ok(a)
}

async fn set_external(
    t: &TestShop,
    system: &str,
    rate: f64,
    latency_ms: u64,
) -> anyhow::Result<()> {
    choreo::client::control_external(
        &t.bus,
        system,
        serde_json::json!({ "failure_rate": rate, "latency_ms": latency_ms }),
    )
    .await
    .map(|_| ())
}

/// Publishes the newest stored messages of every context stream again, newest first, with
/// their envelope (same `Choreo-Id`) but a new `Nats-Msg-Id`; plus one `AddStock`.
async fn replay_recent(t: &TestShop, seed: u64) -> anyhow::Result<usize> {
    let mut sent = 0;
    for ctx in ["orders", "inventory", "payments", "shipping"] {
        let mut stream = t.bus.js.get_stream(subjects::stream(ctx)).await?;
        let last = stream.info().await?.state.last_sequence;
        let from = last.saturating_sub(15).max(1);
        let mut batch = Vec::new();
        for seq in from..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                batch.push((m.subject.to_string(), m.headers, m.payload));
            }
        }
        // Out of order: newest first.
        for (subject, h, payload) in batch.into_iter().rev() {
            publish_copy(t, subject, h, payload).await?;
            sent += 1;
        }
    }
    // A restock command of the run, again (applied twice it adds twice).
    let inv = t.bus.js.get_stream(subjects::stream("inventory")).await?;
    let c = inv
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects::command("inventory", "AddStock"),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut msgs = c.messages().await?;
    let skip = (seed % 3) as usize;
    let mut i = 0;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), msgs.next()).await
    {
        if i == skip {
            let h = m.headers.clone().unwrap_or_default();
            publish_copy(t, m.subject.to_string(), h, m.payload.clone()).await?;
            sent += 1;
            break;
        }
        i += 1;
    }
    Ok(sent)
}

async fn publish_copy(
    t: &TestShop,
    subject: String,
    h: HeaderMap,
    payload: Bytes,
) -> anyhow::Result<()> {
    let mut copy = runtime::wire::envelope::headers_without_msg_id(Some(&h));
    copy.insert(
        headers::NATS_MSG_ID,
        format!("replay-{}", new_id()).as_str(),
    );
    t.bus
        .js
        .publish_with_headers(subject, copy, payload)
        .await?
        .await?;
    Ok(())
}

/// Sends the `n`th malformed message (a different defect each time); returns its probe id,
/// carried in a `Chaos-Probe` header that the dead letter keeps.
async fn send_malformed(t: &TestShop, n: usize) -> anyhow::Result<String> {
    let probe = format!("probe-{n}-{}", new_id());
    let env = |ty: &str| Envelope::first(new_id(), ty, "chaos", now_ms()).to_headers();
    let (subject, mut h, payload): (String, HeaderMap, Vec<u8>) = match n % 6 {
        0 => (
            subjects::command("orders", "PlaceOrder"),
            env("PlaceOrder"),
            b"{\"order_id\": ".to_vec(),
        ),
        1 => (
            subjects::command("inventory", "Teleport"),
            env("Teleport"),
            b"{}".to_vec(),
        ),
        2 => (
            subjects::command("payments", "CapturePayment"),
            HeaderMap::new(),
            b"{\"order_id\": \"nobody\"}".to_vec(),
        ),
        3 => (
            subjects::command("shipping", "DispatchShipment"),
            env("CancelShipment"),
            b"{}".to_vec(),
        ),
        4 => (
            subjects::command("orders", "PlaceOrder"),
            env("PlaceOrder"),
            format!("{{\"pad\": \"{}\"}}", "x".repeat(100 * 1024)).into_bytes(),
        ),
        _ => (
            subjects::event("payments", "PaymentAuthorized"),
            env("PaymentAuthorized"),
            b"[1, 2, 3]".to_vec(),
        ),
    };
    h.insert("Chaos-Probe", probe.as_str());
    t.bus
        .js
        .publish_with_headers(subject, h, payload.into())
        .await?
        .await?;
    Ok(probe)
}

/// Probes that did not come out as dead letters.
async fn missing_dead_letters(t: &TestShop, probes: &[String]) -> Vec<String> {
    let mut missing: Vec<String> = probes.to_vec();
    for _ in 0..40 {
        let dls = harness::dead_letters(&t.bus).await;
        missing.retain(|p| {
            !dls.iter()
                .any(|(h, _)| h.get("Chaos-Probe").is_some_and(|v| v.as_str() == p))
        });
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    missing
        .into_iter()
        .map(|p| format!("malformed message {p} was not dead-lettered"))
        .collect()
}

/// A small tmpfs over a node's store directory (its contents copied in).
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn check() -> Result<(), String> {
        let probe = std::env::temp_dir().join(format!("choreo-mount-{}", std::process::id()));
        std::fs::create_dir_all(&probe).map_err(|e| e.to_string())?;
        let r = sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=1m",
                "tmpfs",
                &probe.display().to_string(),
            ],
        );
        if r.is_ok() {
            let _ = sh("umount", &[&probe.display().to_string()]);
        }
        let _ = std::fs::remove_dir(&probe);
        r
    }

    fn over(dir: &std::path::Path, mib: u64) -> anyhow::Result<Mount> {
        let saved = dir.with_extension("saved");
        std::fs::rename(dir, &saved)?;
        std::fs::create_dir_all(dir)?;
        let d = dir.display().to_string();
        sh(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs", &d],
        )
        .map_err(anyhow::Error::msg)?;
        sh("cp", &["-a", &format!("{}/.", saved.display()), &d]).map_err(anyhow::Error::msg)?;
        Ok(Mount {
            dir: dir.to_path_buf(),
        })
    }

    /// Fills the file system to the last byte.
    fn fill(&self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.join("filler"))?;
        let block = vec![0u8; 1 << 16];
        while f.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        Ok(())
    }

    fn free(&self) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.dir.join("filler"))?)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Lazy: the node may still hold files open until the shop stops.
        let _ = sh("umount", &["-l", &self.dir.display().to_string()]);
    }
}

fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
