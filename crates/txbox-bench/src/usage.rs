//! Where the machine's CPU went during a run, from `/proc` (Linux): the
//! whole machine, the benchmark's own processes, PostgreSQL's and the
//! Kafka broker's (a JVM), in cores used on average.
//!
//! A figure of 2.0 on a 2-core machine is everything; the split shows
//! which side a run that stops scaling is waiting on.

use std::time::Instant;

/// CPU counters at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    at: Instant,
    /// Jiffies of all CPUs, all states.
    total: u64,
    /// Jiffies of all CPUs not idle or waiting on I/O.
    busy: u64,
    /// Jiffies of processes named `postgres`.
    postgres: u64,
    /// Jiffies of processes named `java` (the broker).
    java: u64,
    /// Jiffies of the processes given to [`Sample::take`].
    own: u64,
}

/// What happened between two samples, in cores used on average.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub machine: f64,
    pub postgres: f64,
    pub broker: f64,
    pub own: f64,
    pub seconds: f64,
}

impl Sample {
    /// Reads the counters now; `own` are the pids counted as the
    /// benchmark's (this process's threads count as its own pid).
    pub(crate) fn take(own: &[u32]) -> Sample {
        let (total, busy) = machine();
        let (mut postgres, mut java) = (0, 0);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                match process(pid) {
                    Some((comm, j)) if comm == "postgres" => postgres += j,
                    Some((comm, j)) if comm == "java" => java += j,
                    _ => {}
                }
            }
        }
        let own = own.iter().filter_map(|&p| process(p)).map(|(_, j)| j).sum();
        Sample {
            at: Instant::now(),
            total,
            busy,
            postgres,
            java,
            own,
        }
    }

    /// Usage from `self` to `later`. Processes that ended in between
    /// (PostgreSQL backends of closed connections) are not counted.
    pub(crate) fn until(&self, later: &Sample) -> Usage {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 * cpus / total;
        Usage {
            machine: cores(self.busy, later.busy),
            postgres: cores(self.postgres, later.postgres),
            broker: cores(self.java, later.java),
            own: cores(self.own, later.own),
            seconds: later.at.duration_since(self.at).as_secs_f64(),
        }
    }
}

/// A run's CPU time divided over its messages, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PerMessage {
    pub machine: f64,
    pub postgres: f64,
    pub broker: f64,
    pub own: f64,
}

impl Usage {
    /// The CPU time of the run, divided over its `messages`.
    pub(crate) fn per_message(&self, messages: usize) -> PerMessage {
        let us = |cores: f64| cores * self.seconds * 1e6 / messages.max(1) as f64;
        PerMessage {
            machine: us(self.machine),
            postgres: us(self.postgres),
            broker: us(self.broker),
            own: us(self.own),
        }
    }
}

/// Runs `run`; returns its result and where the CPU went meanwhile (this
/// process's as the benchmark's own).
pub(crate) async fn during<T>(
    run: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Usage)> {
    let me = [std::process::id()];
    let started = Sample::take(&me);
    let out = run.await?;
    Ok((out, started.until(&Sample::take(&me))))
}

/// (all, busy) jiffies from the first line of `/proc/stat`.
fn machine() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, total.saturating_sub(idle))
}

/// (comm, utime + stime jiffies) of `pid`, threads included.
fn process(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // After "pid (comm) ": state is field 3, utime 14, stime 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read() {
        let (comm, _) = process(std::process::id()).expect("own /proc entry");
        assert!(!comm.is_empty());
    }

    #[test]
    fn a_busy_loop_shows_as_own_cpu() {
        let me = [std::process::id()];
        let a = Sample::take(&me);
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let u = a.until(&Sample::take(&me));
        assert!(u.own > 0.3, "{u:?}");
        assert!(u.machine >= u.own * 0.8, "{u:?}");
    }
}
