//! The `choreo` command line: parse, set up tracing, call the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use choreo::contexts;
use choreo::load::LoadConfig;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use runtime::app::{init_tracing, shutdown_signal, HostArgs};

const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// mimalloc instead of glibc malloc: in the profile of the orders node at full load,
/// malloc, free and `malloc_consolidate` took about a fifth of its CPU (bench/PROFILE.md).
/// Built without transparent huge pages (`no_thp`), which cost a node about 40 MiB idle.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Choreo: actor-based choreography and sagas over NATS JetStream and sled.
#[derive(Parser)]
#[command(name = "choreo", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node hosting one or more bounded contexts until SIGINT/SIGTERM.
    Node(HostArgs),
    /// Run the payment gateway and carrier simulators (NATS request/reply).
    Sim(SimArgs),
    /// Place orders, wait for each to end, print counts, throughput and latency.
    Load(LoadArgs),
    /// Send a command given as JSON to any context: prints its message id.
    Send {
        /// The addressee, e.g. orders.
        context: String,
        /// The command's type, e.g. PlaceOrder.
        msg_type: String,
        /// The payload, a JSON object.
        #[arg(value_parser = json_value)]
        json: serde_json::Value,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Ask any context's read-model query; prints the answer as JSON.
    Query {
        /// The context, e.g. orders.
        context: String,
        /// The query's name, e.g. order.
        name: String,
        /// The request, a JSON object.
        #[arg(value_parser = json_value, default_value = "{}")]
        json: serde_json::Value,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Read models of the orders context.
    Orders {
        #[command(subcommand)]
        command: OrdersCmd,
    },
    /// Check every running context's declared invariants, and the shop's across its
    /// contexts when its orders context runs; exits 1 on any violation.
    Verify {
        #[command(flatten)]
        nats: NatsArg,
        /// Only orders whose id starts with this prefix (one load run).
        #[arg(long)]
        only: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The shop end to end: nats-server, a node per context, simulators, orders, summary.
    Demo(DemoArgs),
    /// Process managers: the graph, and inspection and retry of instances.
    Saga {
        #[command(subcommand)]
        command: SagaCmd,
    },
    /// The contexts running nodes host in this namespace, with their queries and sagas
    /// (from the NATS service API); exits 1 if none answers.
    Contexts {
        #[command(flatten)]
        nats: NatsArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Who serves each context: its partition's owner and fencing epoch, the nodes standing
    /// by, the changelog's last record (from the lease bucket); exits 1 if a partition has
    /// no owner.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Creates, as the operator, every stream, bucket and durable consumer the contexts'
    /// nodes use, with a node config's settings, so that the nodes need no right to create
    /// them (docs/security.md); keeps what exists.
    Provision {
        /// Contexts, comma-separated, or `all`.
        #[arg(long, default_value = "all")]
        context: String,
        /// The nodes' config file (stream limits, replicas, consumer settings).
        #[arg(long, env = "CHOREO_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// NATS identities and their rights, derived from the code (docs/security.md).
    Auth {
        #[command(subcommand)]
        command: AuthCmd,
    },
    /// Streams: how full each is, how far each durable consumer has got, messages removed
    /// before a consumer acked them; exits 1 if a consumer may have missed messages.
    Streams {
        #[command(flatten)]
        nats: NatsArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list, show, replay (exactly once), discard.
    Dlq {
        #[command(subcommand)]
        command: DlqCmd,
    },
    /// Fault injection in running nodes (their config must set `[faults] enabled = true`).
    Chaos {
        #[command(subcommand)]
        command: ChaosCmd,
    },
    /// Change a running simulator's failure rate or latency (outages, slowness).
    SimSet {
        /// payment-gateway or carrier.
        system: String,
        /// Share of requests that fail (0.0 to 1.0).
        #[arg(long, value_parser = rate)]
        failure_rate: Option<f64>,
        /// Added latency of each reply (e.g. 2s, 500ms).
        #[arg(long, value_parser = duration)]
        latency: Option<Duration>,
        #[command(flatten)]
        nats: NatsArg,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Each partition's owner, epoch, last renewal, standbys and changelog sequence.
    Status {
        #[command(flatten)]
        nats: NatsArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Writes an nkey seed per context (all of its nodes share it), for the operator
    /// (`choreo` commands), client applications and the simulators, keeping those already
    /// there, and `auth.conf`: a nats-server authorization block (include it in the
    /// server's config) granting each identity only what its code needs.
    Gen {
        /// Directory for the seeds and auth.conf (keep it out of version control).
        #[arg(long, default_value = ".choreo/auth")]
        out: PathBuf,
        /// Contexts to make identities for, comma-separated, or `all`.
        #[arg(long, default_value = "all")]
        contexts: String,
        /// A node hosting several contexts together (`orders,payments`): one identity with
        /// the union of their rights, `orders+payments.nk`; repeat for several.
        #[arg(long = "node", value_name = "CONTEXTS")]
        nodes: Vec<String>,
        /// Also a CA and a server certificate for 127.0.0.1 and localhost, and a `tls`
        /// block in auth.conf (clients then need CHOREO_NATS_CA=<out>/ca.pem).
        #[arg(long)]
        tls: bool,
        /// A name or IP address the servers are reached at, for the server certificate
        /// (repeat for several; 127.0.0.1 and localhost are always in it).
        #[arg(long = "host", requires = "tls")]
        hosts: Vec<String>,
        /// Let the contexts create the streams, buckets and durable consumers they use (a
        /// development set-up); without it, run `choreo provision` as the operator before
        /// the nodes start.
        #[arg(long)]
        nodes_create: bool,
        /// The application's namespace (subject and stream prefix).
        #[arg(long, env = "CHOREO_NAMESPACE", default_value = "choreo")]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum ChaosCmd {
    /// Install a fault rule in the node hosting a context.
    Inject(InjectArgs),
    /// Remove every fault rule of the given contexts.
    Clear {
        /// Contexts (comma-separated) or `all`.
        #[arg(long, default_value = "all")]
        context: String,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Show the installed rules and how often each fired.
    List {
        /// Contexts (comma-separated) or `all`.
        #[arg(long, default_value = "all")]
        context: String,
        #[command(flatten)]
        nats: NatsArg,
    },
}

#[derive(Args)]
struct InjectArgs {
    /// The context whose node gets the fault (the rule applies to that context only).
    #[arg(long)]
    context: String,
    /// Where: handler, after-commit, outbox-publish, external-call, deadline-fire,
    /// store-flush (the store's flusher thread, before a flush).
    #[arg(long, value_enum)]
    point: FaultPointArg,
    /// What: crash (abort the process), error, delay, drop, panic.
    #[arg(long, value_enum)]
    action: FaultActionArg,
    /// Chance per matching message (0.0 to 1.0).
    #[arg(long, default_value_t = 1.0, value_parser = rate)]
    probability: f64,
    /// Fire at most this many times.
    #[arg(long)]
    times: Option<u64>,
    /// Remove the rule after this long (e.g. 10s).
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
    /// Delay of `--action delay` (e.g. 500ms).
    #[arg(long, value_parser = duration, default_value = "0s")]
    delay: Duration,
    /// Only messages of this type (a deadline's name at deadline-fire).
    #[arg(long = "type")]
    msg_type: Option<String>,
    /// Seed of the random choices from now on.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    nats: NatsArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FaultPointArg {
    Handler,
    AfterCommit,
    OutboxPublish,
    ExternalCall,
    DeadlineFire,
    StoreFlush,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FaultActionArg {
    Crash,
    Error,
    Delay,
    Drop,
    Panic,
}

#[derive(Args, Clone, Default)]
struct DlqFilter {
    /// Only dead letters of this context.
    #[arg(long)]
    context: Option<String>,
    /// Only dead letters whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters of this message type.
    #[arg(long = "type")]
    msg_type: Option<String>,
    /// Only dead letters given up by this durable consumer.
    #[arg(long)]
    consumer: Option<String>,
}

/// Which dead letters `replay` or `discard` applies to.
#[derive(Args)]
struct DlqTargets {
    /// Sequence numbers (from `dlq list`).
    seqs: Vec<u64>,
    /// Every dead letter matching the filters.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    filter: DlqFilter,
    #[command(flatten)]
    nats: NatsArg,
}

#[derive(Subcommand)]
enum DlqCmd {
    /// List dead letters with their reasons.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        #[command(flatten)]
        nats: NatsArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: headers, reason, payload.
    Show {
        seq: u64,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Publish dead letters again on their subjects (same message id: applied once), then remove them.
    Replay(DlqTargets),
    /// Remove dead letters for good.
    Discard(DlqTargets),
}

#[derive(Args, Clone)]
struct SagaTarget {
    /// Saga name; without it, the one saga the running nodes host (asked over NATS).
    #[arg(long)]
    saga: Option<String>,
    #[command(flatten)]
    nats: NatsArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SagaCmd {
    /// Print a saga's states and transitions from its definition (Mermaid, or DOT): the
    /// running node's, or without one the shop's built into this binary.
    Graph {
        /// Saga name, e.g. order-fulfilment.
        name: String,
        /// Graphviz DOT instead of Mermaid.
        #[arg(long)]
        dot: bool,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// List instances, optionally by state and age.
    List {
        /// Only instances in this state (e.g. Compensating).
        #[arg(long)]
        state: Option<String>,
        /// Only instances started at least this long ago (e.g. 30s, 5m, 2h).
        #[arg(long, value_parser = duration)]
        older_than: Option<Duration>,
        /// Only instances not in a terminal state.
        #[arg(long)]
        active: bool,
        #[command(flatten)]
        target: SagaTarget,
    },
    /// Show one instance: its state and every transition with the message that caused it.
    Show {
        /// Instance id (the order id for order-fulfilment).
        id: String,
        #[command(flatten)]
        target: SagaTarget,
    },
    /// Active instances that have not moved for at least this long.
    Stuck {
        /// e.g. 30s, 5m, 2h.
        #[arg(long, value_parser = duration)]
        older_than: Duration,
        #[command(flatten)]
        target: SagaTarget,
    },
    /// Retry a parked instance (the shop's: CompensationFailed or SettlementFailed).
    Retry {
        /// Instance id.
        id: String,
        #[command(flatten)]
        target: SagaTarget,
    },
}

/// A duration on the command line, as in the config: `500ms`, `30s`, `5m`, `1h30m`.
fn duration(s: &str) -> Result<Duration, String> {
    runtime::config::duration::parse(s)
}

#[derive(Args, Clone)]
struct NatsArg {
    /// NATS server URL, or several comma-separated (a cluster's servers).
    #[arg(long = "nats", env = "NATS_URL", default_value = DEFAULT_NATS)]
    url: String,
    /// The application's namespace (subject and stream prefix) [default: choreo].
    #[arg(long, env = "CHOREO_NAMESPACE")]
    namespace: Option<String>,
}

#[derive(Args)]
struct SimArgs {
    #[command(flatten)]
    nats: NatsArg,
    /// Added latency of each payment gateway reply (e.g. 2s).
    #[arg(long, value_parser = duration, default_value = "0s")]
    payment_latency: Duration,
    /// Share of payment gateway requests that fail (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    payment_failure_rate: f64,
    /// Added latency of each carrier reply (e.g. 2s).
    #[arg(long, value_parser = duration, default_value = "0s")]
    carrier_latency: Duration,
    /// Share of carrier requests that fail (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    carrier_failure_rate: f64,
    /// Seed of the failure draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args, Clone)]
struct LoadArgs {
    #[command(flatten)]
    nats: NatsArg,
    #[command(flatten)]
    shape: LoadShape,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct LoadShape {
    /// Number of orders to place.
    #[arg(long, default_value_t = 100)]
    orders: usize,
    /// Orders per second; 0 = as fast as the system completes them.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Most orders in flight (placed, not yet completed or cancelled).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Number of customers to register.
    #[arg(long, default_value_t = 20)]
    customers: usize,
    /// Percent of orders with a sku that is never in stock (they must be cancelled).
    #[arg(long, default_value_t = 0.0, value_parser = pct)]
    fail_stock: f64,
    /// Percent of orders paid with a card the gateway declines (they must be cancelled).
    #[arg(long, default_value_t = 0.0, value_parser = pct)]
    fail_payment: f64,
    /// Percent of orders to an address the carrier refuses (they must be cancelled).
    #[arg(long, default_value_t = 0.0, value_parser = pct)]
    fail_shipping: f64,
    /// Give up after this long without progress (e.g. 60s, 2m).
    #[arg(long, value_parser = duration, default_value = "60s")]
    timeout: Duration,
    /// Seed of the order mix.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Subcommand)]
enum OrdersCmd {
    /// Show one order from the orders read model.
    Show {
        /// Order id.
        id: String,
        #[command(flatten)]
        nats: NatsArg,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Working directory for the server store, node data and logs (wiped at start).
    #[arg(long, default_value = ".choreo/demo")]
    dir: PathBuf,
    /// Port for nats-server [default: a free port].
    #[arg(long)]
    port: Option<u16>,
    /// Run nats-server with `sync_interval: always` (fsync each write).
    #[arg(long)]
    sync_always: bool,
    /// After the summary, keep everything running until Ctrl-C (for Prometheus and Grafana:
    /// `make prometheus`).
    #[arg(long)]
    keep_running: bool,
    /// Run a cluster of three nats-servers on loopback, with every stream, consumer,
    /// changelog and the lease bucket replicated three times (R3).
    #[arg(long, conflicts_with = "port")]
    cluster: bool,
    /// No identities, no rights, no TLS: every process may publish anything (by default
    /// each has its own nkey and only the rights its code needs, over TLS).
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    shape: LoadShape,
}

/// A JSON object argument.
fn json_value(s: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(s) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn pct(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a percentage (0 to 100)"))
    }
}

fn rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a rate (0.0 to 1.0)"))
    }
}

impl LoadShape {
    fn config(&self) -> anyhow::Result<LoadConfig> {
        anyhow::ensure!(
            self.fail_stock + self.fail_payment + self.fail_shipping <= 100.0,
            "failure percentages add up to more than 100"
        );
        anyhow::ensure!(
            self.rate >= 0.0 && self.rate.is_finite(),
            "--rate must be 0 or positive"
        );
        anyhow::ensure!(self.concurrency > 0, "--concurrency must be at least 1");
        Ok(LoadConfig {
            orders: self.orders,
            rate: self.rate,
            concurrency: self.concurrency,
            customers: self.customers,
            fail_stock_pct: self.fail_stock,
            fail_payment_pct: self.fail_payment,
            fail_shipping_pct: self.fail_shipping,
            timeout: self.timeout,
            max_duration: None,
            seed: self.seed,
        })
    }
}

fn main() -> ExitCode {
    // `choreo node --help` lists the shop's contexts.
    let help = contexts::app().context_help();
    let matches = Cli::command()
        .mut_subcommand("node", |node| node.mut_arg("context", |a| a.help(help)))
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // One namespace per process, and the processes it starts (demo, chaos) inherit it.
    if let Some(ns) = namespace_of(&matches).or_else(|| std::env::var("CHOREO_NAMESPACE").ok()) {
        if let Err(e) = runtime::wire::subjects::set_namespace(&ns) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        std::env::set_var("CHOREO_NAMESPACE", &ns);
    }
    // Nodes and simulators log at `info`, the client commands at `warn` (`CHOREO_LOG`).
    init_tracing(if matches!(cli.command, Cmd::Node(_) | Cmd::Sim(_)) {
        "info"
    } else {
        "warn"
    });
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The `--namespace` given to the innermost subcommand that has one.
fn namespace_of(m: &clap::ArgMatches) -> Option<String> {
    let here = m.try_get_one::<String>("namespace").ok().flatten().cloned();
    m.subcommand()
        .and_then(|(_, sub)| namespace_of(sub))
        .or(here)
}

fn tokio_rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Cmd::Node(a) => contexts::app()
            .run_with(a)
            .map(|_| true)
            .map_err(Into::into),
        // One thread: the simulators stand in for systems on other machines, and their
        // little work, done where the request arrives, wakes no second worker on the
        // shop's cores (bench/PROFILE.md).
        Cmd::Sim(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let bus = choreo::client::connect(&a.nats.url, Duration::from_secs(15)).await?;
                let cfg = choreo::sim::SimConfig {
                    payment_latency: a.payment_latency,
                    payment_failure_rate: a.payment_failure_rate,
                    carrier_latency: a.carrier_latency,
                    carrier_failure_rate: a.carrier_failure_rate,
                    seed: a.seed,
                };
                tokio::select! {
                    r = choreo::sim::run(bus.client.clone(), cfg) => r?,
                    _ = shutdown_signal() => {}
                }
                Ok(true)
            }),
        Cmd::Load(a) => {
            let cfg = a.shape.config()?;
            tokio_rt()?.block_on(async {
                let bus = choreo::client::connect(&a.nats.url, Duration::from_secs(15)).await?;
                choreo::client::wait_ready(&bus, contexts::KNOWN, Duration::from_secs(30)).await?;
                let quiet = a.json;
                let report = choreo::load::run(&bus, &cfg, |p| {
                    if !quiet {
                        eprintln!(
                            "placed {} completed {} cancelled {}",
                            p.placed, p.completed, p.cancelled
                        );
                    }
                })
                .await?;
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    report.print();
                }
                Ok(report.ok())
            })
        }
        Cmd::Send {
            context,
            msg_type,
            json,
            nats,
        } => tokio_rt()?.block_on(async {
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let env = choreo::client::send_json(&bus, &context, &msg_type, &json).await?;
            println!("{}", env.id);
            Ok(true)
        }),
        Cmd::Query {
            context,
            name,
            json,
            nats,
        } => tokio_rt()?.block_on(async {
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let v = choreo::client::query(&bus, &context, &name, json).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(true)
        }),
        Cmd::Orders {
            command: OrdersCmd::Show { id, nats },
        } => tokio_rt()?.block_on(async {
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let v = choreo::client::query(
                &bus,
                "orders",
                "order",
                serde_json::json!({ "order_id": id }),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(true)
        }),
        Cmd::Verify { nats, only, json } => tokio_rt()?.block_on(async {
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let report = choreo::verify::run_any(&bus, only.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            Ok(report.violations() == 0)
        }),
        Cmd::Saga { command } => run_saga(command),
        Cmd::Cluster {
            command: ClusterCmd::Status { nats, json },
        } => tokio_rt()?.block_on(async {
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let partitions = runtime::client::partitions(&bus).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&partitions)?);
            } else if partitions.is_empty() {
                println!("no partition leases in this namespace (no node runs with ownership)");
            } else {
                println!(
                    "{:<12} {:<4} {:<36} {:>6} {:>9} {:>10}  standby",
                    "context", "part", "owner", "epoch", "renewed", "changelog"
                );
                for p in &partitions {
                    println!(
                        "{:<12} {:<4} {:<36} {:>6} {:>9} {:>10}  {}",
                        p.context,
                        p.partition,
                        p.owner.as_deref().unwrap_or("NONE"),
                        p.epoch.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
                        p.renewed_ms_ago
                            .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
                            .unwrap_or_else(|| "-".into()),
                        p.changelog_last,
                        if p.standby.is_empty() {
                            "-".to_string()
                        } else {
                            p.standby.join(", ")
                        }
                    );
                }
            }
            Ok(partitions.iter().all(|p| p.owner.is_some()))
        }),
        Cmd::Auth {
            command:
                AuthCmd::Gen {
                    out,
                    contexts,
                    nodes,
                    tls,
                    hosts,
                    nodes_create,
                    namespace,
                },
        } => {
            runtime::wire::subjects::set_namespace(&namespace).map_err(anyhow::Error::msg)?;
            let cfg = runtime::config::NodeConfig::default();
            let groups: Vec<Vec<String>> = contexts::expand(&contexts)
                .into_iter()
                .map(|c| vec![c])
                .chain(nodes.iter().map(|n| contexts::expand(n)))
                .collect();
            let built = groups
                .iter()
                .map(|group| contexts::build_all(group, &cfg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let tls = tls.then_some(hosts.as_slice());
            let g = choreo::auth::generate(&out, &built, tls, nodes_create)?;
            println!(
                "wrote {} (include it in nats-server.conf) and a seed per identity:",
                g.conf.display()
            );
            for group in &groups {
                let names: Vec<&str> = group.iter().map(String::as_str).collect();
                let seed = choreo::auth::seed_path(&out, &choreo::auth::node_identity(&names));
                println!(
                    "  CHOREO_NATS_SEED={} choreo node --context {}",
                    seed.display(),
                    group.join(",")
                );
            }
            for who in [
                choreo::auth::OPERATOR,
                choreo::auth::CLIENT,
                choreo::auth::SIM,
            ] {
                println!("  {who}: {}", choreo::auth::seed_path(&out, who).display());
            }
            if let Some(ca) = &g.ca {
                println!(
                    "TLS: every process also needs CHOREO_NATS_CA={}",
                    ca.display()
                );
                println!(
                    "a cluster's routes: paste {} into each server's cluster block",
                    out.join("route-tls.conf").display()
                );
            }
            Ok(true)
        }
        Cmd::Provision {
            context,
            config,
            nats,
        } => tokio_rt()?.block_on(async {
            let cfg = match &config {
                Some(path) => runtime::config::NodeConfig::from_file(path)?,
                None => runtime::config::NodeConfig::default(),
            };
            let built = contexts::build_all(&contexts::expand(&context), &cfg)?;
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            for made in runtime::node::provision::provision(&bus, &cfg, &built).await? {
                println!("{made}");
            }
            Ok(true)
        }),
        Cmd::Contexts { nats, json } => tokio_rt()?.block_on(async {
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let found = runtime::client::discover(&bus, DISCOVERY_WAIT).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                println!(
                    "{:<14} {:<24} {:<30} sagas",
                    "context", "instance", "queries"
                );
                for c in &found {
                    println!(
                        "{:<14} {:<24} {:<30} {}",
                        c.context,
                        c.instance,
                        c.queries.join(","),
                        c.sagas.join(",")
                    );
                }
                println!("{} running", found.len());
            }
            Ok(!found.is_empty())
        }),
        Cmd::Streams { nats, json } => tokio_rt()?.block_on(async {
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let streams = choreo::streams::list(&bus).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&streams)?);
                Ok(streams
                    .iter()
                    .all(|s| s.consumers.iter().all(|c| c.removed_unacked == 0)))
            } else {
                Ok(!choreo::streams::print(&streams))
            }
        }),
        Cmd::Dlq { command } => run_dlq(command),
        Cmd::Chaos { command } => run_chaos(command),
        Cmd::SimSet {
            system,
            failure_rate,
            latency,
            nats,
        } => tokio_rt()?.block_on(async {
            anyhow::ensure!(
                failure_rate.is_some() || latency.is_some(),
                "give --failure-rate and/or --latency"
            );
            let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
            let body = serde_json::json!({
                "failure_rate": failure_rate,
                "latency_ms": latency.map(|d| d.as_millis() as u64),
            });
            let v = choreo::client::control_external(&bus, &system, body).await?;
            println!("{v}");
            Ok(true)
        }),
        Cmd::Demo(a) => {
            let cfg = choreo::demo::DemoConfig {
                dir: a.dir,
                port: a.port,
                sync_always: a.sync_always,
                keep_running: a.keep_running,
                cluster: a.cluster,
                secure: !a.insecure,
                load: a.shape.config()?,
            };
            tokio_rt()?.block_on(choreo::demo::run(cfg))
        }
    }
}

fn run_dlq(cmd: DlqCmd) -> anyhow::Result<bool> {
    use choreo::dlq;
    let to_filter = |f: DlqFilter| dlq::Filter {
        context: f.context,
        reason: f.reason,
        msg_type: f.msg_type,
        consumer: f.consumer,
    };
    tokio_rt()?.block_on(async {
        match cmd {
            DlqCmd::List { filter, nats, json } => {
                let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
                let list = dlq::list(&bus, &to_filter(filter)).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    dlq::print_list(&list);
                }
            }
            DlqCmd::Show { seq, nats } => {
                let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
                let list = dlq::list(&bus, &dlq::Filter::default()).await?;
                let d = list
                    .iter()
                    .find(|d| d.seq == seq)
                    .ok_or_else(|| anyhow::anyhow!("no dead letter {seq}"))?;
                println!("{}", serde_json::to_string_pretty(d)?);
            }
            DlqCmd::Replay(DlqTargets {
                seqs,
                all,
                filter,
                nats,
            }) => {
                let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
                for seq in dlq_targets(&bus, seqs, all, to_filter(filter)).await? {
                    let (subject, id) = dlq::replay(&bus, seq).await?;
                    println!("replayed {seq}: {id} on {subject}");
                }
            }
            DlqCmd::Discard(DlqTargets {
                seqs,
                all,
                filter,
                nats,
            }) => {
                let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
                for seq in dlq_targets(&bus, seqs, all, to_filter(filter)).await? {
                    dlq::discard(&bus, seq).await?;
                    println!("discarded {seq}");
                }
            }
        }
        Ok(true)
    })
}

/// The dead letters a replay or discard applies to: the given sequence numbers, or every
/// one matching the filters with `--all`.
async fn dlq_targets(
    bus: &runtime::wire::bus::Bus,
    seqs: Vec<u64>,
    all: bool,
    filter: choreo::dlq::Filter,
) -> anyhow::Result<Vec<u64>> {
    match (seqs.is_empty(), all) {
        (false, false) => Ok(seqs),
        (true, true) => Ok(choreo::dlq::list(bus, &filter)
            .await?
            .into_iter()
            .map(|d| d.seq)
            .collect()),
        (false, true) => anyhow::bail!("give sequence numbers or --all, not both"),
        (true, false) => {
            anyhow::bail!("give sequence numbers (see `choreo dlq list`) or --all with filters")
        }
    }
}

fn run_chaos(cmd: ChaosCmd) -> anyhow::Result<bool> {
    let (context, nats, body) = match cmd {
        ChaosCmd::Inject(a) => {
            // The node validates the rule (and refuses it if its build or config has no
            // fault injection).
            fn name(v: &impl clap::ValueEnum) -> String {
                v.to_possible_value()
                    .map(|p| p.get_name().replace('-', "_"))
                    .unwrap_or_default()
            }
            let mut rule = serde_json::json!({
                "point": name(&a.point),
                "action": name(&a.action),
                "probability": a.probability,
                "delay": runtime::config::duration::format(a.delay),
            });
            for (key, value) in [
                ("msg_type", a.msg_type.map(serde_json::Value::from)),
                ("times", a.times.map(serde_json::Value::from)),
                (
                    "duration",
                    a.duration
                        .map(|d| serde_json::Value::from(runtime::config::duration::format(d))),
                ),
            ] {
                if let Some(v) = value {
                    rule[key] = v;
                }
            }
            let body = serde_json::json!({ "op": "inject", "rule": rule, "seed": a.seed });
            (a.context, a.nats, body)
        }
        ChaosCmd::Clear { context, nats } => (context, nats, serde_json::json!({ "op": "clear" })),
        ChaosCmd::List { context, nats } => (context, nats, serde_json::json!({ "op": "list" })),
    };
    tokio_rt()?.block_on(async {
        let bus = choreo::client::connect(&nats.url, Duration::from_secs(5)).await?;
        // `all`: every context a running node hosts; a name goes to the node hosting it.
        let targets = running_contexts(&bus, &context).await?;
        for t in &targets {
            let v = choreo::client::faults(&bus, t, body.clone()).await?;
            println!("{t}: {v}");
        }
        Ok(true)
    })
}

/// Expands a `--context` list, `all` standing for the contexts running nodes host.
async fn running_contexts(
    bus: &runtime::wire::bus::Bus,
    list: &str,
) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in runtime::app::context_items(list) {
        if item == "all" {
            let found = runtime::client::discover(bus, DISCOVERY_WAIT).await?;
            anyhow::ensure!(
                !found.is_empty(),
                "no running node answered (`choreo contexts`)"
            );
            out.extend(found.into_iter().map(|c| c.context));
        } else {
            out.push(item.to_string());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The saga running nodes host when there is exactly one; otherwise an error naming them.
async fn only_running_saga(bus: &runtime::wire::bus::Bus) -> anyhow::Result<String> {
    let found = runtime::client::discover(bus, DISCOVERY_WAIT).await?;
    let mut sagas: Vec<String> = found.into_iter().flat_map(|c| c.sagas).collect();
    sagas.sort();
    sagas.dedup();
    match sagas.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            anyhow::bail!("no running node hosts a saga (`choreo contexts`); name one with --saga")
        }
        many => anyhow::bail!(
            "running nodes host {}: name one with --saga",
            many.join(", ")
        ),
    }
}

use choreo::verify::DISCOVERY_WAIT;

fn run_saga(cmd: SagaCmd) -> anyhow::Result<bool> {
    use choreo::saga_cli;
    let (target, op, body) = match cmd {
        SagaCmd::Graph { name, dot, nats } => {
            return tokio_rt()?.block_on(async {
                let bus = choreo::client::connect(&nats.url, Duration::from_millis(500)).await;
                print!("{}", saga_cli::graph(bus.as_ref().ok(), &name, dot).await?);
                Ok(true)
            });
        }
        SagaCmd::List {
            state,
            older_than,
            active,
            target,
        } => {
            let body = serde_json::json!({
                "state": state, "active_only": active,
                "older_than_ms": older_than.map(|d| d.as_millis() as u64),
            });
            (target, "list", body)
        }
        SagaCmd::Stuck { older_than, target } => (
            target,
            "stuck",
            serde_json::json!({ "older_than_ms": older_than.as_millis() as u64 }),
        ),
        SagaCmd::Show { id, target } => (target, "show", serde_json::json!({ "id": id })),
        SagaCmd::Retry { id, target } => (target, "retry", saga_cli::retry_body(&id)),
    };
    tokio_rt()?.block_on(async {
        let bus = choreo::client::connect(&target.nats.url, Duration::from_secs(5)).await?;
        let saga = match target.saga {
            Some(name) => name,
            None => only_running_saga(&bus).await?,
        };
        let v = choreo::client::saga(&bus, &saga, op, body).await?;
        if target.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else if op == "list" || op == "stuck" {
            saga_cli::print_list(&v);
        } else {
            saga_cli::print_instance(&v);
        }
        Ok(true)
    })
}
