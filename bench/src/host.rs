//! What the host is like while the bench runs, so that two `make bench` results can be told
//! apart from the host they ran on: a probe of the three costs the shop's latency is made
//! of (a fixed amount of CPU work, a thread waking another, a durable write), taken before
//! the shop starts, and the machine's busy and stolen CPU during each phase.
//!
//! A VM's speed moves between hosts and hours by more than most changes do (measured in
//! bench/PROFILE.md); these figures tell such a move from a change of the shop.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use runtime::wire::envelope::now_ms;
use serde::{Deserialize, Serialize};

/// The probe's results (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Probe {
    /// A fixed single-thread integer loop, ms: the best of [`CPU_ROUNDS`].
    pub cpu_loop_ms: f64,
    /// One thread waking another that waits on a condition variable and being woken back
    /// (a futex each way), µs per round trip: p50 and p99 of [`WAKE_ROUNDS`].
    pub wake_round_trip_us_p50: f64,
    pub wake_round_trip_us_p99: f64,
    /// A 4 KiB write and `fdatasync` in the bench's directory (the stores' disk), ms: p50
    /// and p99 of [`SYNC_ROUNDS`].
    pub fdatasync_ms_p50: f64,
    pub fdatasync_ms_p99: f64,
}

/// Runs of the CPU loop; the best counts.
pub const CPU_ROUNDS: usize = 5;
/// Thread wake-up round trips measured.
pub const WAKE_ROUNDS: usize = 2_000;
/// 4 KiB writes with `fdatasync` measured.
pub const SYNC_ROUNDS: usize = 100;

/// Runs the probe (about half a second on an idle machine); `dir` must exist.
pub fn probe(dir: &Path) -> std::io::Result<Probe> {
    let best = (0..CPU_ROUNDS)
        .map(|_| cpu_loop())
        .fold(f64::INFINITY, f64::min);
    let cpu_loop_ms = (best * 100.0).round() / 100.0;
    let mut wake = wake_round_trips(WAKE_ROUNDS);
    let mut sync = fdatasyncs(dir, SYNC_ROUNDS)?;
    Ok(Probe {
        cpu_loop_ms,
        wake_round_trip_us_p50: quantile(&mut wake, 0.50),
        wake_round_trip_us_p99: quantile(&mut wake, 0.99),
        fdatasync_ms_p50: quantile(&mut sync, 0.50),
        fdatasync_ms_p99: quantile(&mut sync, 0.99),
    })
}

/// ms for 20 million rounds of a multiply-xorshift chain (each round depends on the last,
/// so it cannot be vectorized or skipped).
fn cpu_loop() -> f64 {
    let started = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..20_000_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x = x.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(i);
    }
    std::hint::black_box(x);
    started.elapsed().as_secs_f64() * 1e3
}

/// µs per round trip of a ping-pong between two threads over a mutex and condition variable.
fn wake_round_trips(rounds: usize) -> Vec<f64> {
    // The turn: true = the other thread's.
    let pair = Arc::new((Mutex::new(false), Condvar::new()));
    let other = {
        let pair = pair.clone();
        std::thread::spawn(move || {
            let (turn, cv) = &*pair;
            for _ in 0..rounds {
                let mut t = cv.wait_while(turn.lock().unwrap(), |t| !*t).unwrap();
                *t = false;
                cv.notify_one();
            }
        })
    };
    let (turn, cv) = &*pair;
    let mut trips = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut t = turn.lock().unwrap();
        *t = true;
        cv.notify_one();
        let _t = cv.wait_while(t, |t| *t).unwrap();
        trips.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let _ = other.join();
    trips
}

/// ms of each 4 KiB write + `fdatasync` of a scratch file in `dir` (removed after).
fn fdatasyncs(dir: &Path, rounds: usize) -> std::io::Result<Vec<f64>> {
    let path = dir.join(".host-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    // Allocated first, so each round measures a data write, not the file growing.
    file.write_all(&vec![0u8; 4096 * rounds])?;
    file.sync_all()?;
    let block = vec![0xA5u8; 4096];
    let mut took = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let started = Instant::now();
        file.write_all_at(&block, (i * 4096) as u64)?;
        file.sync_data()?;
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

/// The `q` quantile (nearest rank, as the load's latencies) of `v`, rounded to 0.01; sorts
/// `v`.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    (choreo::load::quantile(v, q) * 100.0).round() / 100.0
}

/// The machine's CPU time so far, from `/proc/stat`'s `cpu` line, in clock ticks, and its
/// CPUs (the `cpuN` lines: the ones those ticks are of).
#[derive(Debug, Clone, Copy, Default)]
struct CpuTimes {
    busy: u64,
    steal: u64,
    total: u64,
    cpus: u32,
}

impl CpuTimes {
    fn now() -> CpuTimes {
        Self::parse(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
    }

    /// `/proc/stat`: its first line `cpu  user nice system idle iowait irq softirq steal
    /// guest guest_nice` (guest time is already counted in user and nice), then a `cpuN`
    /// line per CPU.
    fn parse(stat: &str) -> CpuTimes {
        let mut lines = stat.lines();
        let f: Vec<u64> = lines
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        let (idle, iowait, steal) = (at(3), at(4), at(7));
        let total = (0..8).map(at).sum::<u64>();
        CpuTimes {
            busy: total - idle - iowait - steal,
            steal,
            total,
            cpus: lines
                .filter(|l| {
                    l.starts_with("cpu") && l[3..].starts_with(|c: char| c.is_ascii_digit())
                })
                .count() as u32,
        }
    }

    /// Between an earlier reading and `self`: the cores busy on average and the share of
    /// time the hypervisor ran something else (stolen), in percent.
    fn since(self, earlier: CpuTimes) -> Usage {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let steal = self.steal.saturating_sub(earlier.steal) as f64;
        Usage {
            cores_busy: (busy / total * f64::from(self.cpus) * 100.0).round() / 100.0,
            steal_pct: (steal / total * 1000.0).round() / 10.0,
        }
    }
}

/// Samples the machine's CPU times once a second, from [`Sampler::start`] to
/// [`Sampler::stop`], so that a phase's slow seconds can be set against what the host did
/// in them (a stall with time stolen is the host's, not the shop's).
pub struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(u64, CpuTimes)>>,
}

impl Sampler {
    pub fn start() -> Sampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut samples = vec![(now_ms(), CpuTimes::now())];
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => samples.push((now_ms(), CpuTimes::now())),
                    _ = &mut stopped => break,
                }
            }
            samples.push((now_ms(), CpuTimes::now()));
            samples
        });
        Sampler { stop, task }
    }

    /// The machine's CPU from start to stop, and in each second since `start_ms` (Unix ms;
    /// without it, since the sampling began; time before it counts as its second 0).
    pub async fn stop(self, start_ms: Option<u64>) -> (Usage, Vec<Second>) {
        let _ = self.stop.send(());
        let samples = self.task.await.unwrap_or_default();
        let (first, last) = match (samples.first(), samples.last()) {
            (Some(first), Some(last)) => (*first, *last),
            _ => ((0, CpuTimes::default()), (0, CpuTimes::default())),
        };
        let start = start_ms.unwrap_or(first.0);
        (last.1.since(first.1), by_second(&samples, start))
    }
}

/// The usage between each two samples, by the second (since `start_ms`) the interval's
/// middle was in; an interval under half a second (the last, cut short by the stop) is left
/// out.
fn by_second(samples: &[(u64, CpuTimes)], start_ms: u64) -> Vec<Second> {
    samples
        .windows(2)
        .filter(|w| w[1].0.saturating_sub(w[0].0) >= 500)
        .map(|w| Second {
            second: ((w[0].0 + w[1].0) / 2).saturating_sub(start_ms) / 1000,
            usage: w[1].1.since(w[0].1),
        })
        .collect()
}

/// The machine's CPU in one second of a phase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Second {
    /// Seconds since the phase's first order.
    pub second: u64,
    #[serde(flatten)]
    pub usage: Usage,
}

/// The machine's CPU during a phase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// Cores busy on average (user, system, interrupts), of all the machine's.
    pub cores_busy: f64,
    /// Time stolen by the hypervisor, percent of all the machine's CPU time.
    pub steal_pct: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_split_busy_idle_and_stolen() {
        let cpus = "cpu0 1 0 1 1 0 0 0 0 0 0\ncpu1 1 0 1 1 0 0 0 0 0 0\nintr 7";
        let a = CpuTimes::parse(&format!("cpu  100 0 50 800 10 5 5 30 0 0\n{cpus}"));
        let b = CpuTimes::parse(&format!("cpu  300 0 150 1100 10 15 15 130 0 0\n{cpus}"));
        assert_eq!(b.cpus, 2);
        // 720 ticks between them: 320 busy, 300 idle, 100 stolen; of 2 cores.
        let u = b.since(a);
        assert_eq!(u.steal_pct, 13.9);
        assert_eq!(u.cores_busy, 0.89);
    }

    #[test]
    fn samples_become_seconds_of_the_phase() {
        let at = |total: u64, busy: u64, steal: u64| CpuTimes {
            busy,
            steal,
            total,
            cpus: 2,
        };
        let samples = [
            (9_800, at(0, 0, 0)),
            (10_800, at(200, 100, 0)),
            (11_800, at(400, 300, 20)),
            (12_100, at(460, 360, 20)),
        ];
        // The first sample came 200 ms before the phase's first order; each interval counts
        // in the second its middle is in. The last, 300 ms (cut short by the stop), is left
        // out.
        let s = by_second(&samples, 10_000);
        let got: Vec<(u64, f64, f64)> = s
            .iter()
            .map(|s| (s.second, s.usage.cores_busy, s.usage.steal_pct))
            .collect();
        assert_eq!(got, [(0, 1.0, 0.0), (1, 2.0, 10.0)]);
        let earlier: Vec<u64> = by_second(&samples, 9_000)
            .iter()
            .map(|s| s.second)
            .collect();
        assert_eq!(earlier, [1, 2]);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn the_probe_measures_each_cost() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path()).unwrap();
        assert!(p.cpu_loop_ms > 0.0, "{p:?}");
        assert!(p.wake_round_trip_us_p50 > 0.0, "{p:?}");
        assert!(
            p.wake_round_trip_us_p99 >= p.wake_round_trip_us_p50,
            "{p:?}"
        );
        assert!(p.fdatasync_ms_p99 >= p.fdatasync_ms_p50, "{p:?}");
        assert!(!dir.path().join(".host-probe").exists());
    }
}
