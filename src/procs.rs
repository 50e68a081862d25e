//! Child processes: nats-server and `choreo` nodes, for `choreo demo`, `choreo-bench` and
//! the black-box tests. Every child is killed when its guard drops, so a failing test or a
//! Ctrl-C leaves nothing running; and on Linux every child gets SIGKILL when its parent dies
//! without dropping its guards (`kill -9`, a panic that aborts): see [`spawn_child`].

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Oldest nats-server this project runs on (stream-loss fixes; KV with async-nats 0.51).
pub const MIN_NATS_SERVER: (u32, u32, u32) = (2, 14, 0);

/// A running child process; killed (SIGKILL) on drop if still running.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args`, sending stdout and stderr to `log` (appended).
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child =
            spawn_child(cmd).with_context(|| format!("start {name}: {}", program.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until something accepts connections on the loopback `port`, failing early if
    /// the process exits.
    pub fn wait_listening(&mut self, port: u16, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                bail!("{} exited at start; see {}", self.name, self.log.display());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} not listening on {port} after {timeout:?}", self.name)
    }

    /// Sends a signal (e.g. SIGSTOP, SIGCONT, SIGTERM).
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), sig)
            .map_err(|e| anyhow!("signal {sig} to {}: {e}", self.name))
    }

    /// `kill -9`, then reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `grace` before SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Ok(st);
        }
        let _ = self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        let st = self.child.wait()?;
        bail!(
            "{} did not stop within {grace:?} after SIGTERM; killed ({st})",
            self.name
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `cmd` so that it dies with this process.
///
/// On Linux the child's parent-death signal is SIGKILL (`prctl(PR_SET_PDEATHSIG)`, set
/// between fork and exec). The kernel sends it when the *thread* that forked the child
/// exits, not the process: a child forked from a tokio blocking-pool thread (which exits
/// after 10 s idle) or from a test's thread would be killed with that thread. So every child
/// is forked on one thread kept for the life of the process ([`spawner`]), and the signal
/// comes when the process ends, however it ends. A parent that died between the fork and the
/// `prctl` is caught by comparing the parent pid after it: the child then exits at once.
fn spawn_child(cmd: Command) -> std::io::Result<Child> {
    let (reply, answer) = mpsc::sync_channel(1);
    spawner()
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// A child to start and where to send the outcome.
type SpawnJob = (Command, mpsc::SyncSender<std::io::Result<Child>>);

/// The thread every child is forked from; it lives as long as the process (its channel's
/// sender is a static, so it never sees the channel close).
fn spawner() -> &'static mpsc::Sender<SpawnJob> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("choreo-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    die_with_parent(&mut cmd);
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        tx
    })
}

/// Sets the child's parent-death signal to SIGKILL (Linux). Must run on [`spawner`]'s
/// thread: the signal follows the thread that forks.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes two system calls (prctl, getppid) and
    // builds an io::Error from an errno, which does not allocate. It touches no lock and
    // no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != parent {
                // The parent died before the prctl: the signal will not come.
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// A free TCP port on the loopback interface, for a child to listen on.
///
/// Taken below the kernel's ephemeral range: a port the kernel hands out for `bind(0)` is
/// also handed out as the local port of outgoing connections, so between this check and
/// the child's bind another connection could take it (seen once in the chaos suite: a
/// node exited with "Address already in use" on its metrics port). Candidates walk from a
/// per-process start so parallel tests in one process, and processes started together, do
/// not pick the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = u32::from(ephemeral_low().unwrap_or(32768));
    const FLOOR: u32 = 10_000;
    if low > FLOOR + 1_000 {
        let span = low - FLOOR;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span.min(2_000) {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = FLOOR + (start + n.wrapping_mul(37)) % span;
            if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The first port of the kernel's ephemeral range (Linux), if readable.
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Finds nats-server: `$CHOREO_NATS_SERVER`, then `.tools/venv/bin/nats-server` in the current
/// directory or any parent of it or of this executable (installed by
/// `scripts/install-nats.sh`), then `PATH`. Refuses versions older than 2.14.0 (a starting node asks for its consumers' unacked messages with the consumer reset of 2.14).
pub fn find_nats_server() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("CHOREO_NATS_SERVER") {
        candidates.push(PathBuf::from(p));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(Path::to_path_buf));
    }
    candidates.extend(roots.iter().map(|r| r.join(".tools/venv/bin/nats-server")));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let mut too_old = None;
    for c in candidates.into_iter().filter(|c| c.is_file()) {
        match nats_version(&c) {
            Some(v) if v >= MIN_NATS_SERVER => return Ok(c),
            Some(v) => too_old = Some((c, v)),
            None => {}
        }
    }
    match too_old {
        Some((c, v)) => bail!(
            "{} is nats-server {}.{}.{}; Choreo needs 2.14.0 or newer: run `make setup-nats` (scripts/install-nats.sh)",
            c.display(), v.0, v.1, v.2
        ),
        None => bail!("nats-server not found: run `make setup-nats` (scripts/install-nats.sh) or set CHOREO_NATS_SERVER"),
    }
}

fn nats_version(bin: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.trim().rsplit('v').next()?;
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|n| n.parse().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// A nats-server with JetStream, storing in its own directory, on loopback.
pub struct NatsServer {
    pub proc: Proc,
    pub port: u16,
    /// Its URL; for the first server of a cluster, every server's, comma-separated.
    pub url: String,
    pub dir: PathBuf,
    bin: PathBuf,
    sync_always: bool,
    cluster: Option<ClusterSpec>,
    /// Identities, rights and TLS (from `choreo auth gen`), when secured.
    auth: Option<crate::auth::Generated>,
}

/// A server's place in a cluster on loopback.
#[derive(Clone)]
struct ClusterSpec {
    /// `n0`, `n1`, ...: the server name JetStream reports (stream leaders, peers).
    name: String,
    /// This server's route port.
    route_port: u16,
    /// Every server's route port.
    routes: Vec<u16>,
}

impl NatsServer {
    /// Starts nats-server on `port` (a free one if `None`) with JetStream in `dir/jetstream`.
    /// `sync_always`: fsync every write (see `config/nats-server.conf`).
    pub fn start(dir: &Path, port: Option<u16>, sync_always: bool) -> anyhow::Result<NatsServer> {
        Self::start_with(dir, port, sync_always, None)
    }

    /// [`NatsServer::start`] secured by `auth` (`choreo auth gen`: its authorization and
    /// TLS appended to the server's config).
    pub fn start_with(
        dir: &Path,
        port: Option<u16>,
        sync_always: bool,
        auth: Option<&crate::auth::Generated>,
    ) -> anyhow::Result<NatsServer> {
        let bin = find_nats_server()?;
        let port = port.unwrap_or_else(free_port);
        let mut s = NatsServer {
            proc: Self::launch(&bin, dir, port, sync_always, None, auth)?,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            bin,
            sync_always,
            cluster: None,
            auth: auth.cloned(),
        };
        s.wait_listening(Duration::from_secs(15))?;
        Ok(s)
    }

    /// Starts a cluster of `n` servers on loopback (`dir/n0`, `dir/n1`, ...; free client and
    /// route ports; every server routes to every other). The first server's `url` lists
    /// every server's.
    pub fn start_cluster(
        dir: &Path,
        n: usize,
        sync_always: bool,
        auth: Option<&crate::auth::Generated>,
    ) -> anyhow::Result<Vec<NatsServer>> {
        let bin = find_nats_server()?;
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for (i, route_port) in routes.iter().enumerate() {
            let port = free_port();
            let spec = ClusterSpec {
                name: format!("n{i}"),
                route_port: *route_port,
                routes: routes.clone(),
            };
            let dir = dir.join(&spec.name);
            servers.push(NatsServer {
                proc: Self::launch(&bin, &dir, port, sync_always, Some(&spec), auth)?,
                port,
                url: format!("nats://127.0.0.1:{port}"),
                dir,
                bin: bin.clone(),
                sync_always,
                cluster: Some(spec),
                auth: auth.cloned(),
            });
        }
        for s in &mut servers {
            s.wait_listening(Duration::from_secs(15))?;
        }
        let all: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        servers[0].url = all.join(",");
        Ok(servers)
    }

    /// The port other servers of its cluster route to, if it is in one.
    pub fn route_port(&self) -> Option<u16> {
        self.cluster.as_ref().map(|c| c.route_port)
    }

    /// The server's name in its cluster (`n0`, ...), if it is in one.
    pub fn name(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.name.as_str())
    }

    fn launch(
        bin: &Path,
        dir: &Path,
        port: u16,
        sync_always: bool,
        cluster: Option<&ClusterSpec>,
        auth: Option<&crate::auth::Generated>,
    ) -> anyhow::Result<Proc> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("nats-server.conf");
        let store = dir.join("jetstream");
        let sync = if sync_always {
            "\n  sync_interval: always"
        } else {
            ""
        };
        let mut text = format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 1MB\njetstream {{\n  store_dir: {:?}\n  max_file_store: 4GB\n  max_memory_store: 256MB{sync}\n}}\n",
            store.display().to_string()
        );
        if let Some(c) = cluster {
            let routes: Vec<String> = c
                .routes
                .iter()
                .filter(|p| **p != c.route_port)
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let tls = auth.and_then(|a| a.route_tls.as_deref()).unwrap_or("");
            text.push_str(&format!(
                "server_name: {}\ncluster {{\n  name: choreo\n  listen: 127.0.0.1:{}\n  routes: [{}]\n{tls}}}\n",
                c.name,
                c.route_port,
                routes.join(", ")
            ));
        }
        if let Some(auth) = auth {
            text.push_str(&std::fs::read_to_string(&auth.conf)?);
        }
        std::fs::write(&conf, text)?;
        Proc::spawn(
            "nats-server",
            bin,
            &["-c".into(), conf.display().to_string()],
            &dir.join("nats-server.log"),
            &[],
        )
    }

    fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.proc.wait_listening(self.port, timeout)
    }

    /// `kill -9` the server, then starts it again on the same port and store.
    pub fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.start_again()
    }

    /// `kill -9` the server (it stays down until [`NatsServer::start_again`]).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts the server again on the same port and store.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.proc = Self::launch(
            &self.bin,
            &self.dir,
            self.port,
            self.sync_always,
            self.cluster.as_ref(),
            self.auth.as_ref(),
        )?;
        self.wait_listening(Duration::from_secs(15))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parent-death signal follows the thread that forked: a child started from a
    /// thread that then ends (as tokio's blocking threads do) must keep running.
    #[test]
    fn a_child_outlives_the_thread_that_started_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let mut child = std::thread::spawn(move || {
            Proc::spawn("sleep", Path::new("/bin/sleep"), &["30".into()], &log, &[]).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(child.is_running(), "killed when its starting thread ended");
        child.kill9();
    }

    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let low = ephemeral_low().unwrap_or(32768);
        let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        assert!(
            ports.iter().all(|p| *p < low),
            "{ports:?} vs ephemeral from {low}"
        );
    }
}
