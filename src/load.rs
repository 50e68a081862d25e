//! `choreo load`: places orders, waits for each to reach a terminal state, reports.
//!
//! A share of orders is set to fail on purpose: out of stock (a sku never stocked),
//! payment declined (`card_declined`), undeliverable (a customer whose address the carrier
//! refuses). Each order's expected outcome is known, so an order that ends otherwise is
//! reported as unexpected. Terminal states are observed on an ordered JetStream consumer of
//! `OrderCompleted`/`OrderCancelled` created before the first order is placed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use orders::{LineItem, OrderCancelled, OrderCompleted, PlaceOrder};
use runtime::component::Message as _;
use runtime::wire::bus::Bus;
use runtime::wire::subjects;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::client;

/// Skus stocked by `load` (and never `sku-scarce`).
pub const SKUS: &[&str] = &["sku-1", "sku-2", "sku-3", "sku-4", "sku-5"];
const SCARCE: &str = "sku-scarce";

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub orders: usize,
    /// Orders per second; 0 places them as fast as `concurrency` allows.
    pub rate: f64,
    /// Most orders placed and not yet terminal at once.
    pub concurrency: usize,
    pub customers: usize,
    pub fail_stock_pct: f64,
    pub fail_payment_pct: f64,
    pub fail_shipping_pct: f64,
    /// Give up waiting for terminal states after this long without progress.
    pub timeout: Duration,
    /// Stop placing new orders after this long (then wait for those in flight).
    pub max_duration: Option<Duration>,
    pub seed: u64,
}

/// How an order was set up, and so how it must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Normal,
    OutOfStock,
    Declined,
    Undeliverable,
}

impl Kind {
    fn expect_completed(self) -> bool {
        self == Kind::Normal
    }
}

/// Progress while running.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub placed: usize,
    pub completed: usize,
    pub cancelled: usize,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub run_id: String,
    pub placed: usize,
    pub completed: usize,
    pub cancelled: usize,
    pub unfinished: usize,
    pub unexpected: Vec<String>,
    pub by_kind: HashMap<String, usize>,
    pub elapsed_seconds: f64,
    pub orders_per_second: f64,
    pub latency_ms: Latency,
    /// Order ids of the run, with how each was set up.
    #[serde(skip)]
    pub orders: Vec<(String, Kind)>,
    /// When each order was placed and ended (Unix ms), in the order they were placed.
    #[serde(skip)]
    pub timeline: Vec<(u64, Option<u64>)>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// The quantiles of `ms`, sorted ascending (nearest rank; zeros when empty).
    pub fn of(ms: &[f64]) -> Latency {
        Latency {
            p50: quantile(ms, 0.50),
            p99: quantile(ms, 0.99),
            p999: quantile(ms, 0.999),
            max: ms.last().copied().unwrap_or(0.0),
        }
    }
}

impl LoadReport {
    /// Every order reached a terminal state, and the one it was set up for.
    pub fn ok(&self) -> bool {
        self.unfinished == 0 && self.unexpected.is_empty()
    }

    pub fn print(&self) {
        println!(
            "run {}: placed {}, completed {}, cancelled {}, unfinished {}",
            self.run_id, self.placed, self.completed, self.cancelled, self.unfinished
        );
        println!(
            "throughput {:.1} orders/s over {:.2} s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.orders_per_second, self.elapsed_seconds, self.latency_ms.p50, self.latency_ms.p99, self.latency_ms.max
        );
        if !self.unexpected.is_empty() {
            println!("UNEXPECTED outcomes ({}):", self.unexpected.len());
            for u in self.unexpected.iter().take(20) {
                println!("  {u}");
            }
        }
    }
}

/// Registers customers and stocks skus for `cfg.orders` orders; waits until inventory has
/// the stock (orders placed before would be rejected).
pub async fn prepare(bus: &Bus, cfg: &LoadConfig, run_id: &str) -> anyhow::Result<Vec<String>> {
    let mut customers = Vec::new();
    for i in 0..cfg.customers.max(1) {
        let id = format!("{run_id}-c{i}");
        client::send_command(
            bus,
            customers::CONTEXT,
            &customers::RegisterCustomer {
                customer_id: id.clone(),
                name: format!("Customer {i}"),
                address: format!("{i} Main Street"),
            },
        )
        .await?;
        customers.push(id);
    }
    client::send_command(
        bus,
        customers::CONTEXT,
        &customers::RegisterCustomer {
            customer_id: format!("{run_id}-nowhere"),
            name: "Nobody".into(),
            address: "nowhere".into(),
        },
    )
    .await?;
    let per_sku = (cfg.orders as u64).saturating_mul(6).clamp(10, 1 << 40);
    let before = stock_added(bus).await?;
    for sku in SKUS {
        client::send_command(
            bus,
            inventory::CONTEXT,
            &inventory::AddStock {
                sku: sku.to_string(),
                qty: per_sku,
            },
        )
        .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = stock_added(bus).await?;
        if SKUS.iter().all(|s| {
            now.get(*s).copied().unwrap_or(0) >= before.get(*s).copied().unwrap_or(0) + per_sku
        }) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "inventory did not take the stock within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(customers)
}

async fn stock_added(bus: &Bus) -> anyhow::Result<HashMap<String, u64>> {
    let v = client::query(bus, inventory::CONTEXT, "stock", serde_json::json!({})).await?;
    Ok(v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, s)| (k.clone(), s["added"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default())
}

/// Places the orders and waits for them. `progress` is called about once a second.
pub async fn run(
    bus: &Bus,
    cfg: &LoadConfig,
    mut progress: impl FnMut(Progress),
) -> anyhow::Result<LoadReport> {
    let run_id = format!("r{:08x}", fastrand::u32(..));
    let customers = prepare(bus, cfg, &run_id).await?;
    let mut rng = fastrand::Rng::with_seed(cfg.seed);

    // Terminal events, observed from before the first order.
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, bool, Instant)>();
    let first = client::stream_tip(bus, &subjects::stream(orders::CONTEXT))
        .await?
        .1
        + 1;
    let collector = tokio::spawn(watch_terminal(bus.clone(), first, tx));

    let mut placed_at: HashMap<String, (Instant, Kind)> = HashMap::new();
    let mut outcome: HashMap<String, (bool, f64)> = HashMap::new();
    let mut order_list = Vec::new();
    let mut p = Progress::default();
    let start = Instant::now();
    let mut last_report = Instant::now();
    let mut last_progress = Instant::now();
    let interval = if cfg.rate > 0.0 {
        Some(Duration::from_secs_f64(1.0 / cfg.rate))
    } else {
        None
    };
    let mut next_at = start;
    // Orders are placed without waiting for the previous one's publish ack (the acks are
    // awaited here, side by side), so the pace is the rate's, or the in-flight limit's, not
    // the round trip of one publish.
    let mut sending = FuturesUnordered::new();
    let record = |id: String,
                  completed: bool,
                  at: Instant,
                  placed_at: &HashMap<String, (Instant, Kind)>,
                  outcome: &mut HashMap<String, (bool, f64)>,
                  p: &mut Progress| {
        if let Some((t0, _)) = placed_at.get(&id) {
            if let std::collections::hash_map::Entry::Vacant(e) = outcome.entry(id) {
                e.insert((completed, at.duration_since(*t0).as_secs_f64() * 1000.0));
                if completed {
                    p.completed += 1
                } else {
                    p.cancelled += 1
                }
            }
        }
    };
    let placing =
        |placed: usize| placed < cfg.orders && cfg.max_duration.is_none_or(|d| start.elapsed() < d);
    while placing(p.placed) || outcome.len() < p.placed {
        while let Some(Some(sent)) = sending.next().now_or_never() {
            sent?;
        }
        while let Ok((id, completed, at)) = rx.try_recv() {
            record(id, completed, at, &placed_at, &mut outcome, &mut p);
            last_progress = Instant::now();
        }
        let in_flight = p.placed - outcome.len();
        let due = interval.is_none_or(|_| Instant::now() >= next_at);
        if placing(p.placed) && in_flight < cfg.concurrency && due {
            let i = p.placed;
            let kind = pick_kind(&mut rng, cfg);
            let order_id = format!("{run_id}-o{i}");
            let cmd = make_order(&mut rng, &order_id, kind, &customers, &run_id);
            placed_at.insert(order_id.clone(), (Instant::now(), kind));
            let correlation = order_id.clone();
            sending.push(async move {
                client::send_retrying(bus, orders::CONTEXT, &cmd, &correlation, cfg.timeout)
                    .await
                    .map(drop)
            });
            order_list.push((order_id, kind));
            p.placed += 1;
            last_progress = Instant::now();
            if let Some(iv) = interval {
                next_at += iv;
            }
            continue;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(p);
            last_report = Instant::now();
        }
        if last_progress.elapsed() > cfg.timeout {
            break;
        }
        let wait = match interval {
            Some(_) if placing(p.placed) && in_flight < cfg.concurrency => {
                next_at.saturating_duration_since(Instant::now())
            }
            _ => Duration::from_millis(200),
        };
        tokio::select! {
            r = rx.recv() => if let Some((id, completed, at)) = r {
                record(id, completed, at, &placed_at, &mut outcome, &mut p);
                last_progress = Instant::now();
            },
            Some(sent) = sending.next(), if !sending.is_empty() => sent?,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    progress(p);
    collector.abort();
    let elapsed = start.elapsed().as_secs_f64();

    let mut latencies: Vec<f64> = outcome.values().map(|(_, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    let unix_ms = |t: Instant| {
        let ago = Instant::now().saturating_duration_since(t);
        runtime::wire::envelope::now_ms().saturating_sub(ago.as_millis() as u64)
    };
    let timeline = order_list
        .iter()
        .map(|(id, _)| {
            let t0 = placed_at[id].0;
            let end = outcome.get(id).map(|(_, ms)| unix_ms(t0) + *ms as u64);
            (unix_ms(t0), end)
        })
        .collect();
    let mut unexpected = Vec::new();
    let mut by_kind: HashMap<String, usize> = HashMap::new();
    for (id, kind) in &order_list {
        *by_kind
            .entry(format!("{kind:?}").to_lowercase())
            .or_default() += 1;
        if let Some((completed, _)) = outcome.get(id) {
            if *completed != kind.expect_completed() {
                let got = if *completed { "completed" } else { "cancelled" };
                unexpected.push(format!("{id} ({kind:?}) ended {got}"));
            }
        }
    }
    Ok(LoadReport {
        run_id,
        placed: p.placed,
        completed: p.completed,
        cancelled: p.cancelled,
        unfinished: p.placed - outcome.len(),
        unexpected,
        by_kind,
        elapsed_seconds: elapsed,
        orders_per_second: if elapsed > 0.0 {
            outcome.len() as f64 / elapsed
        } else {
            0.0
        },
        latency_ms: Latency::of(&latencies),
        orders: order_list,
        timeline,
    })
}

/// Sends every `OrderCompleted`/`OrderCancelled` from stream sequence `from` on; the ordered
/// consumer is made again from the next sequence whenever it fails (a server restart).
async fn watch_terminal(
    bus: Bus,
    mut from: u64,
    tx: mpsc::UnboundedSender<(String, bool, Instant)>,
) {
    loop {
        let events = async {
            bus.js
                .get_stream(subjects::stream(orders::CONTEXT))
                .await
                .ok()?
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subjects: TERMINAL
                        .iter()
                        .map(|t| subjects::event(orders::CONTEXT, t))
                        .collect(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ..Default::default()
                })
                .await
                .ok()?
                .messages()
                .await
                .ok()
        };
        let stats = bus.client.statistics();
        let connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(mut events) = events.await {
            loop {
                // An ordered consumer lives in the server's memory: after a server restart it
                // is gone, and the client notices late. Start again at a reconnect.
                let next = tokio::select! {
                    n = events.next() => n,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        if stats.connects.load(std::sync::atomic::Ordering::Relaxed) != connects {
                            break;
                        }
                        continue;
                    }
                };
                let Some(Ok(m)) = next else { break };
                if let Ok(info) = m.info() {
                    from = info.stream_sequence + 1;
                }
                let completed = m.subject.ends_with(OrderCompleted::TYPE);
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                    if let Some(id) = v["order_id"].as_str() {
                        if tx
                            .send((id.to_string(), completed, Instant::now()))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An order's terminal events.
pub const TERMINAL: [&str; 2] = [OrderCompleted::TYPE, OrderCancelled::TYPE];

/// The `q` quantile (nearest rank) of `sorted`, ascending; 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn pick_kind(rng: &mut fastrand::Rng, cfg: &LoadConfig) -> Kind {
    let x = rng.f64() * 100.0;
    if x < cfg.fail_stock_pct {
        Kind::OutOfStock
    } else if x < cfg.fail_stock_pct + cfg.fail_payment_pct {
        Kind::Declined
    } else if x < cfg.fail_stock_pct + cfg.fail_payment_pct + cfg.fail_shipping_pct {
        Kind::Undeliverable
    } else {
        Kind::Normal
    }
}

fn make_order(
    rng: &mut fastrand::Rng,
    order_id: &str,
    kind: Kind,
    customers: &[String],
    run_id: &str,
) -> PlaceOrder {
    let lines = rng.usize(1..=2);
    let mut items: Vec<LineItem> = (0..lines)
        .map(|_| LineItem {
            sku: SKUS[rng.usize(..SKUS.len())].to_string(),
            qty: rng.u32(1..=3),
            unit_price_cents: rng.u64(100..=5000),
        })
        .collect();
    if kind == Kind::OutOfStock {
        items.push(LineItem {
            sku: SCARCE.into(),
            qty: 1,
            unit_price_cents: 999,
        });
    }
    let customer_id = if kind == Kind::Undeliverable {
        format!("{run_id}-nowhere")
    } else {
        customers[rng.usize(..customers.len())].clone()
    };
    PlaceOrder {
        order_id: order_id.to_string(),
        customer_id,
        items,
        payment_method: if kind == Kind::Declined {
            "card_declined".into()
        } else {
            "card_visa".into()
        },
    }
}
