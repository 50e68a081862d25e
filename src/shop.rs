//! A running shop on this machine: nats-server, one `choreo node` process per context, and
//! the simulators. Used by `choreo demo` and by the black-box tests; every process is
//! killed when the `Shop` drops.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::Signal;

use crate::client;
use crate::procs::{free_port, NatsServer, Proc};

/// How to start a shop.
#[derive(Debug, Clone)]
pub struct ShopOptions {
    /// Working directory: `nats/`, `data/`, `logs/` (wiped at start).
    pub dir: PathBuf,
    /// nats-server port (a free one if `None`).
    pub port: Option<u16>,
    /// nats-server `sync_interval: always`.
    pub sync_always: bool,
    /// Nodes to start, one process each: a context name, a comma-separated list, or `all`.
    pub contexts: Vec<String>,
    /// Start `choreo sim` with these extra arguments (`None`: no simulators).
    pub sim: Option<Vec<String>>,
    /// Node config file passed with `--config`.
    pub node_config: Option<PathBuf>,
    /// Servers of the NATS cluster (1: a single server, no cluster; 3: a cluster of three on
    /// loopback, every node given every server).
    pub servers: usize,
    /// Every process with an identity of its own and only the rights its code needs, over
    /// TLS (`choreo auth gen --tls` into `auth/`); `false`: anonymous and plaintext.
    pub secure: bool,
}

impl ShopOptions {
    /// Every context, the simulators, default node config.
    pub fn new(dir: PathBuf) -> Self {
        ShopOptions {
            dir,
            port: None,
            sync_always: false,
            contexts: crate::contexts::all(),
            sim: Some(vec![]),
            node_config: None,
            servers: 1,
            secure: true,
        }
    }
}

/// One node process.
pub struct Node {
    pub context: String,
    pub proc: Proc,
    pub metrics_addr: String,
}

impl Node {
    /// Starts `choreo node` for `ctx` against the server at `nats`, with its data under
    /// `data`, its output in `log`, metrics on a free port and `--config` if given.
    pub fn spawn(
        ctx: &str,
        nats: &str,
        data: &Path,
        log: &Path,
        config: Option<&Path>,
        env: &[(String, String)],
    ) -> anyhow::Result<Node> {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let data = data.display().to_string();
        let mut args: Vec<String> = [
            "node",
            "--context",
            ctx,
            "--nats",
            nats,
            "--data",
            &data,
            "--metrics",
            &metrics_addr,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(c) = config {
            args.push("--config".into());
            args.push(c.display().to_string());
        }
        let proc = Proc::spawn(ctx, &exe()?, &args, log, &pairs(env))?;
        Ok(Node {
            context: ctx.to_string(),
            proc,
            metrics_addr,
        })
    }
}

/// A running shop.
pub struct Shop {
    /// The server (the first of a cluster, whose `url` lists them all).
    pub nats: NatsServer,
    /// The other servers of a cluster.
    pub peers: Vec<NatsServer>,
    pub nodes: Vec<Node>,
    pub sim: Option<Proc>,
    pub opts: ShopOptions,
    /// NATS URL a context's node uses instead of the server's (e.g. through a proxy).
    pub node_nats: std::collections::HashMap<String, String>,
    /// The identities and TLS files, when secure.
    pub auth: Option<crate::auth::Generated>,
}

impl Shop {
    /// Starts everything and waits until every started context answers queries.
    pub async fn start(opts: ShopOptions) -> anyhow::Result<Shop> {
        for sub in ["nats", "data", "logs", "auth"] {
            let _ = std::fs::remove_dir_all(opts.dir.join(sub));
        }
        let auth = if opts.secure {
            Some(identities(&opts)?)
        } else {
            None
        };
        let (nats_dir, port, sync) = (opts.dir.join("nats"), opts.port, opts.sync_always);
        let n = opts.servers;
        let secured = auth.clone();
        let mut servers = tokio::task::spawn_blocking(move || {
            if n > 1 {
                NatsServer::start_cluster(&nats_dir, n, sync, secured.as_ref())
            } else {
                NatsServer::start_with(&nats_dir, port, sync, secured.as_ref()).map(|s| vec![s])
            }
        })
        .await??;
        let nats = servers.remove(0);
        let mut shop = Shop {
            nats,
            peers: servers,
            nodes: Vec::new(),
            sim: None,
            opts,
            node_nats: Default::default(),
            auth,
        };
        shop.provision(&shop.opts.contexts.clone()).await?;
        for ctx in shop.opts.contexts.clone() {
            let node = shop.spawn_node(&ctx)?;
            shop.nodes.push(node);
        }
        if let Some(extra) = shop.opts.sim.clone() {
            let mut args = vec!["sim".to_string(), "--nats".into(), shop.nats.url.clone()];
            args.extend(extra);
            shop.sim = Some(Proc::spawn(
                "sim",
                &exe()?,
                &args,
                &shop.opts.dir.join("logs/sim.log"),
                &pairs(&shop.env(crate::auth::SIM)),
            )?);
        }
        shop.wait_ready(Duration::from_secs(60)).await?;
        Ok(shop)
    }

    /// When secure, makes as the operator everything the nodes of `specs` use on JetStream
    /// (their rights do not let them create streams or durable consumers), with the shop's
    /// node config.
    async fn provision(&self, specs: &[String]) -> anyhow::Result<()> {
        if self.auth.is_none() {
            return Ok(());
        }
        let cfg = match &self.opts.node_config {
            Some(path) => runtime::config::NodeConfig::from_file(path)?,
            None => runtime::config::NodeConfig::default(),
        };
        let names: Vec<String> = specs
            .iter()
            .flat_map(|spec| crate::contexts::expand(spec))
            .collect();
        let contexts = crate::contexts::build_all(&names, &cfg)?;
        let bus = self.operator().await?;
        runtime::node::provision::provision(&bus, &cfg, &contexts).await?;
        Ok(())
    }

    fn spawn_node(&self, ctx: &str) -> anyhow::Result<Node> {
        let nats = self.node_nats.get(ctx).unwrap_or(&self.nats.url);
        let log = self.opts.dir.join("logs").join(format!("{ctx}.log"));
        Node::spawn(
            ctx,
            nats,
            &self.opts.dir.join("data"),
            &log,
            self.opts.node_config.as_deref(),
            &self.node_env(ctx),
        )
    }

    /// The environment of a node for `spec` (a context or a list): its identity's seed and
    /// the CA, when secure.
    fn node_env(&self, spec: &str) -> Vec<(String, String)> {
        let names = crate::contexts::expand(spec);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.env(&crate::auth::node_identity(&names))
    }

    /// The environment of a process of identity `who` (a context, `operator`, `client`,
    /// `sim`): empty when the shop is not secure.
    pub fn env(&self, who: &str) -> Vec<(String, String)> {
        self.auth.as_ref().map(|a| a.env(who)).unwrap_or_default()
    }

    /// How identity `who` connects (anonymous when the shop is not secure).
    pub fn auth(&self, who: &str) -> runtime::wire::identity::NatsAuth {
        self.auth.as_ref().map(|a| a.auth(who)).unwrap_or_default()
    }

    /// A connection as the operator (every right), for inspection and tests.
    pub async fn operator(&self) -> anyhow::Result<runtime::wire::bus::Bus> {
        let auth = self.auth(crate::auth::OPERATOR);
        Ok(runtime::client::connect_as(&self.nats.url, Duration::from_secs(10), auth).await?)
    }

    /// Waits until every started context answers, failing early if a node exited.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let bus = self.operator().await?;
        let contexts: Vec<String> = self
            .opts
            .contexts
            .iter()
            .flat_map(|c| crate::contexts::expand(c))
            .collect();
        let names: Vec<&str> = contexts.iter().map(String::as_str).collect();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(dead) = self.dead_node() {
                anyhow::bail!("{dead}");
            }
            if client::wait_ready(&bus, &names, Duration::from_secs(1))
                .await
                .is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "contexts not ready after {timeout:?}; see {}",
                self.logs().display()
            );
        }
    }

    pub fn logs(&self) -> PathBuf {
        self.opts.dir.join("logs")
    }

    /// The first node that exited, with the end of its log.
    pub fn dead_node(&mut self) -> Option<String> {
        let logs = self.logs();
        self.nodes
            .iter_mut()
            .find_map(|n| (!n.proc.is_running()).then_some(&n.context))
            .map(|context| {
                let log = std::fs::read_to_string(logs.join(format!("{context}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                format!(
                    "node {context} exited:\n  {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
                )
            })
    }

    pub fn node(&mut self, ctx: &str) -> anyhow::Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.context == ctx)
            .with_context(|| format!("no node for {ctx}"))
    }

    /// `kill -9` of the node hosting `ctx`.
    pub fn kill9(&mut self, ctx: &str) -> anyhow::Result<()> {
        self.node(ctx)?.proc.kill9();
        Ok(())
    }

    /// The data directory of the node hosting `ctx` (one sled database per context inside).
    pub fn data_dir(&self) -> PathBuf {
        self.opts.dir.join("data")
    }

    /// SIGTERM to the node hosting `ctx`; waits until it finished its in-flight work.
    pub fn stop_node(&mut self, ctx: &str) -> anyhow::Result<()> {
        let node = self.node(ctx)?;
        let _ = node.proc.signal(Signal::SIGTERM);
        let st = node.proc.terminate(Duration::from_secs(30))?;
        anyhow::ensure!(st.success(), "node {ctx} exited with {st}");
        Ok(())
    }

    /// Starts the node hosting `ctx` again (same data directory) and waits until it answers.
    pub async fn restart(&mut self, ctx: &str) -> anyhow::Result<()> {
        self.respawn(ctx)?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Starts the node hosting `ctx` again without waiting (several at once, then
    /// [`Shop::wait_ready`]).
    pub fn respawn(&mut self, ctx: &str) -> anyhow::Result<()> {
        let fresh = self.spawn_node(ctx)?;
        *self.node(ctx)? = fresh;
        Ok(())
    }

    /// The cluster's server named `name` (`n0`, `n1`, ...).
    pub fn server(&mut self, name: &str) -> Option<&mut NatsServer> {
        std::iter::once(&mut self.nats)
            .chain(self.peers.iter_mut())
            .find(|s| s.name() == Some(name))
    }

    /// Starts one more node for `ctx` (a standby while another owns the context), with a
    /// data directory and a log of its own (`data-<name>`, `logs/<name>.log`); the caller
    /// keeps it. It does not answer before it owns the context, so nothing waits for it.
    pub fn spawn_standby(&self, ctx: &str, name: &str) -> anyhow::Result<Node> {
        let nats = self.node_nats.get(ctx).unwrap_or(&self.nats.url);
        Node::spawn(
            ctx,
            nats,
            &self.opts.dir.join(format!("data-{name}")),
            &self.logs().join(format!("{name}.log")),
            self.opts.node_config.as_deref(),
            &self.node_env(ctx),
        )
    }

    /// Starts a node for `ctx` that was not started with the shop, and waits until it answers.
    pub async fn add_node(&mut self, ctx: &str) -> anyhow::Result<()> {
        self.provision(&[ctx.to_string()]).await?;
        let node = self.spawn_node(ctx)?;
        self.nodes.push(node);
        self.opts.contexts.push(ctx.to_string());
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// SIGTERM to every node and the simulators (they finish in-flight work), then the server.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for n in &mut self.nodes {
            let refused = n
                .proc
                .is_running()
                .then(|| metric(&n.metrics_addr, VIOLATIONS, &[]))
                .flatten();
            if let Some(count) = refused.filter(|c| *c > 0.0) {
                problems.push(format!("{}: {count} operations refused by NATS", n.context));
            }
        }
        for n in &self.nodes {
            let _ = n.proc.signal(Signal::SIGTERM);
        }
        for n in &mut self.nodes {
            match n.proc.terminate(Duration::from_secs(30)) {
                Ok(st) if st.success() => {}
                Ok(st) => problems.push(format!("{}: exited with {st}", n.context)),
                Err(e) => problems.push(format!("{}: {e}", n.context)),
            }
        }
        if let Some(sim) = &mut self.sim {
            let _ = sim.terminate(Duration::from_secs(5));
        }
        for s in &mut self.peers {
            let _ = s.proc.terminate(Duration::from_secs(10));
        }
        let _ = self.nats.proc.terminate(Duration::from_secs(10));
        problems.extend(self.violations().into_iter().take(5));
        anyhow::ensure!(problems.is_empty(), "unclean stop: {}", problems.join("; "));
        Ok(())
    }

    /// The permission violations the servers logged (`... - Publish Violation - Subject
    /// "..."`): none in a shop whose rights match its code.
    pub fn violations(&self) -> Vec<String> {
        std::iter::once(&self.nats)
            .chain(&self.peers)
            .flat_map(|s| {
                std::fs::read_to_string(s.dir.join("nats-server.log"))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(" Violation - "))
                    .map(|l| format!("nats-server: {}", l.trim()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The shop's identities (`choreo auth gen --tls` into `auth/`): one per context (a context
/// may be added later) and one per node hosting several, the operator's, the clients' and
/// the simulators'; the contexts may create nothing (the shop provisions as the operator).
fn identities(opts: &ShopOptions) -> anyhow::Result<crate::auth::Generated> {
    let cfg = runtime::config::NodeConfig::default();
    let mut specs: Vec<Vec<String>> = crate::contexts::all()
        .into_iter()
        .map(|c| vec![c])
        .collect();
    for spec in &opts.contexts {
        let names = crate::contexts::expand(spec);
        if !specs.contains(&names) {
            specs.push(names);
        }
    }
    let groups = specs
        .iter()
        .map(|names| crate::contexts::build_all(names, &cfg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::auth::generate(&opts.dir.join("auth"), &groups, Some(&[]), false)
}

/// An environment as `Proc::spawn` takes it.
fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// What a node counts the operations NATS refused it in.
const VIOLATIONS: &str = "choreo_nats_permission_violations_total";

/// One metric of the node serving metrics on `addr`, summed over the series whose labels
/// contain every `labels` pair; `None` if it does not answer.
pub fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    if !body.starts_with("HTTP/1.") {
        return None;
    }
    let sum = body
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    Some(sum)
}

/// The `choreo` binary that nodes and simulators run: this executable if it is `choreo`,
/// else `$CHOREO_BIN`, else a `choreo` next to this executable (`choreo-bench` in
/// `target/<profile>/`) or one directory up (test binaries in `target/<profile>/deps/`).
fn exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locate the choreo binary")?;
    if me.file_name().is_some_and(|n| n == "choreo") {
        return Ok(me);
    }
    if let Ok(p) = std::env::var("CHOREO_BIN") {
        return Ok(PathBuf::from(p));
    }
    me.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("choreo"))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "choreo binary not found next to {} or one directory up; set CHOREO_BIN",
                me.display()
            )
        })
}
