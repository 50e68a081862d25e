//! Hosting an application's contexts in a node process, in a few lines:
//!
//! ```no_run
//! use runtime::app::App;
//! use runtime::context::ContextBuilder;
//!
//! fn main() -> std::process::ExitCode {
//!     App::new("notes")
//!         .context("notes", |_config| {
//!             Ok(ContextBuilder::new("notes")
//!                 .query("count", |state, _| Ok(serde_json::json!(state.scan_prefix("note/")?.len())))
//!                 .build()?)
//!         })
//!         .run()
//! }
//! ```
//!
//! `run` reads the same flags, environment and config file as `choreo node` (`--context`,
//! `--nats`, `--data`, `--metrics`, `--config`; `CHOREO_CONTEXT`, `NATS_URL`,
//! `CHOREO_DATA`, `CHOREO_METRICS_ADDR`, `CHOREO_CONFIG`), logs as it does (`CHOREO_LOG`,
//! `CHOREO_LOG_FORMAT=json`), runs the node until SIGINT or SIGTERM with its metrics,
//! readiness and graceful shutdown, and runs it again in place when a store asks for it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, CommandFactory, FromArgMatches, Parser};

use crate::config::NodeConfig;
use crate::context::Context;
use crate::node::{self, Exit, NodeError};

/// Builds a context from the node's config (its saga settings, say).
pub type ContextFactory =
    Box<dyn Fn(&NodeConfig) -> Result<Arc<dyn Context>, Box<dyn std::error::Error>>>;

/// Where a node runs and with what: the flags of `choreo node` and of every [`App`].
#[derive(Args, Debug, Clone, Default)]
pub struct HostArgs {
    /// Contexts to host, comma-separated, or `all`.
    #[arg(long, env = "CHOREO_CONTEXT")]
    pub context: Option<String>,
    /// NATS server URL, or several comma-separated (a cluster's servers) [default:
    /// nats://127.0.0.1:4222, or the config file's nats_url].
    #[arg(long = "nats", env = "NATS_URL")]
    pub nats: Option<String>,
    /// Directory for the contexts' sled databases (one subdirectory each).
    #[arg(long, env = "CHOREO_DATA")]
    pub data: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz [default: 127.0.0.1:9464].
    #[arg(long, env = "CHOREO_METRICS_ADDR")]
    pub metrics: Option<String>,
    /// TOML config file (see config/node.example.toml); flags and environment override it.
    #[arg(long, env = "CHOREO_CONFIG")]
    pub config: Option<PathBuf>,
    /// The application's namespace (subject and stream prefix) [default: choreo, or the
    /// config file's namespace].
    #[arg(long, env = "CHOREO_NAMESPACE")]
    pub namespace: Option<String>,
    /// File holding the node's nkey seed (its NATS identity; `choreo auth gen`).
    #[arg(long, env = "CHOREO_NATS_SEED")]
    pub nats_seed: Option<PathBuf>,
    /// Credentials file (user JWT and seed) instead of a seed.
    #[arg(long, env = "CHOREO_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) the server's must chain to; TLS is then required.
    #[arg(long, env = "CHOREO_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a server that verifies clients.
    #[arg(long, env = "CHOREO_NATS_CERT", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// Key (PEM) of --nats-cert.
    #[arg(long, env = "CHOREO_NATS_KEY", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
}

/// Why an application's node could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The configuration file cannot be read or parsed, or the configuration is not valid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The context `context` cannot be built from the configuration; `message` says why.
    #[error("invalid configuration: context {context}: {message}")]
    Context {
        /// The context's name.
        context: String,
        /// Why it cannot be built.
        message: String,
    },
    /// The node failed to start or stopped on an error.
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// An application: the contexts a node of it can host.
pub struct App {
    name: &'static str,
    contexts: Vec<(&'static str, ContextFactory)>,
}

#[derive(Parser)]
#[command(about = "Runs a node hosting this application's contexts until SIGINT/SIGTERM.")]
struct Cli {
    #[command(flatten)]
    host: HostArgs,
}

impl App {
    /// An application named `name` (used in logs and the command line's help).
    pub fn new(name: &'static str) -> Self {
        App {
            name,
            contexts: Vec::new(),
        }
    }

    /// A context a node of this application can host, built from the node's config.
    pub fn context(
        mut self,
        name: &'static str,
        build: impl Fn(&NodeConfig) -> Result<Arc<dyn Context>, Box<dyn std::error::Error>> + 'static,
    ) -> Self {
        self.contexts.push((name, Box::new(build)));
        self
    }

    /// A context that needs nothing from the node's config: assembled here, checked when
    /// the node starts.
    pub fn with(self, context: crate::context::ContextBuilder) -> Self {
        let name = context.name();
        let built = context.build().map_err(|e| e.to_string());
        self.context(name, move |_| Ok(built.clone()?))
    }

    /// The names of the contexts, in the order they were added.
    pub fn context_names(&self) -> Vec<&'static str> {
        self.contexts.iter().map(|(n, _)| *n).collect()
    }

    /// The help of `--context`, naming this application's contexts.
    pub fn context_help(&self) -> String {
        format!(
            "Contexts to host: a comma-separated list of {}, or `all`",
            self.context_names().join(", ")
        )
    }

    /// Parses the command line, sets up logging, runs the node; the exit code to return
    /// from `main` (0 stopped cleanly, 2 an error, 70 a store stalled while stopping).
    pub fn run(self) -> ExitCode {
        let help = self.context_help();
        let matches = Cli::command()
            .name(self.name)
            .mut_arg("context", |a| a.help(help))
            .get_matches();
        let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        init_tracing("info");
        match self.run_with(cli.host) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        }
    }

    /// Runs a node with these arguments until SIGINT or SIGTERM (logging already set up).
    /// A store that cannot recover in the process runs the node again in place (an exec).
    pub fn run_with(self, args: HostArgs) -> Result<(), AppError> {
        let (cfg, hosted) = self.configure(args)?;
        tracing::debug!(app = self.name, "starting node");
        match node::run(cfg, hosted, shutdown_signal())? {
            Exit::Stopped => Ok(()),
            Exit::Stalled => std::process::exit(70),
            Exit::RestartInPlace(why) => restart_in_place(why),
        }
    }

    /// The node config from the arguments (file, then flags and environment over it) and
    /// the contexts it hosts, validated.
    pub fn configure(
        &self,
        args: HostArgs,
    ) -> Result<(NodeConfig, Vec<Arc<dyn Context>>), AppError> {
        let mut cfg = match &args.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(c) = &args.context {
            cfg.contexts = vec![c.clone()];
        }
        cfg.contexts = cfg.contexts.iter().flat_map(|c| self.expand(c)).collect();
        if let Some(n) = args.nats {
            cfg.nats_url = n;
        }
        if let Some(d) = args.data {
            cfg.data_dir = d;
        }
        if let Some(m) = args.metrics {
            cfg.metrics_addr = m;
        }
        if let Some(ns) = args.namespace {
            cfg.namespace = ns;
        }
        for (arg, slot) in [
            (args.nats_seed, &mut cfg.nats.seed_file),
            (args.nats_creds, &mut cfg.nats.credentials_file),
            (args.nats_ca, &mut cfg.nats.tls_ca),
            (args.nats_cert, &mut cfg.nats.tls_cert),
            (args.nats_key, &mut cfg.nats.tls_key),
        ] {
            if arg.is_some() {
                *slot = arg;
            }
        }
        cfg.validate(&self.context_names())?;
        let hosted = cfg
            .contexts
            .iter()
            .map(|name| {
                let (_, build) = self
                    .contexts
                    .iter()
                    .find(|(n, _)| n == name)
                    .expect("validated: a known context");
                build(&cfg).map_err(|e| AppError::Context {
                    context: name.clone(),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((cfg, hosted))
    }

    /// A `--context` list: names separated by commas, or `all`.
    pub fn expand(&self, list: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for item in context_items(list) {
            if item == "all" {
                out.extend(self.context_names().iter().map(|s| s.to_string()));
            } else {
                out.push(item.to_string());
            }
        }
        out.dedup();
        out
    }
}

/// The items of a `--context` list: names separated by commas (blanks around them and
/// empty items ignored), `all` standing for every context (which ones is the caller's).
pub fn context_items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Logs to stderr: the level from `CHOREO_LOG` (e.g. `debug`, `runtime=debug,info`; else
/// `default`), JSON lines with `CHOREO_LOG_FORMAT=json`, colours only on a terminal (nodes
/// started by a parent log to files, where escape codes are noise). Does nothing if a
/// subscriber is set already.
pub fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CHOREO_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("CHOREO_LOG_FORMAT").is_ok_and(|v| v == "json");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

/// Replaces this process with a fresh run of the same command line (same pid; every file
/// and socket is closed on exec), its restarts in place counted in the environment.
fn restart_in_place(why: node::Restart) -> ! {
    use std::os::unix::process::CommandExt;
    let (name, value) = why.env_for_next_run();
    let err = std::env::current_exe()
        .map(|exe| {
            std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env(name, value)
                .exec()
        })
        .unwrap_or_else(|e| e);
    eprintln!("error: cannot restart in place: {err}");
    std::process::exit(70);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ContextBuilder;

    fn app() -> App {
        App::new("test")
            .context("a", |_| Ok(ContextBuilder::new("a").build()?))
            .context("b", |_| Ok(ContextBuilder::new("b").build()?))
    }

    #[test]
    fn flags_pick_the_contexts_and_override_the_config() {
        let args = HostArgs {
            context: Some("all".into()),
            nats: Some("nats://elsewhere:4222".into()),
            ..Default::default()
        };
        let (cfg, hosted) = app().configure(args).unwrap();
        assert_eq!(cfg.contexts, ["a", "b"]);
        assert_eq!(cfg.nats_url, "nats://elsewhere:4222");
        assert_eq!(hosted.len(), 2);
        let one = HostArgs {
            context: Some("b".into()),
            ..Default::default()
        };
        assert_eq!(app().configure(one).unwrap().1[0].name(), "b");
    }

    #[test]
    fn the_namespace_comes_from_the_flag_and_a_bad_one_is_refused() {
        let args = |ns: &str| HostArgs {
            context: Some("a".into()),
            namespace: Some(ns.into()),
            ..Default::default()
        };
        let (cfg, _) = app().configure(args("east")).unwrap();
        assert_eq!(cfg.namespace, "east");
        let e = app().configure(args("East.1")).err().unwrap().to_string();
        assert!(e.contains("namespace \"East.1\""), "{e}");
    }

    #[test]
    fn an_unknown_context_is_refused_with_the_known_ones() {
        let args = HostArgs {
            context: Some("c".into()),
            ..Default::default()
        };
        let e = app().configure(args).err().unwrap().to_string();
        assert!(
            e.contains("unknown context \"c\"") && e.contains("a, b"),
            "{e}"
        );
    }

    /// A saga whose graph leaves a state waiting forever stops the node before it starts,
    /// with the state named.
    #[test]
    fn a_saga_declared_wrongly_is_refused_before_the_node_starts() {
        use crate::saga::testing::fixtures::Counter;
        let app = App::new("test").context("a", |_| {
            let waits_forever = Counter {
                name: "counter",
                ends: false,
                steps: false,
            };
            Ok(ContextBuilder::new("a").saga(waits_forever).build()?)
        });
        let args = HostArgs {
            context: Some("a".into()),
            ..Default::default()
        };
        let e = app.configure(args).err().unwrap().to_string();
        assert!(
            e.contains("saga counter is declared wrongly") && e.contains("Counting"),
            "{e}"
        );
    }
}
