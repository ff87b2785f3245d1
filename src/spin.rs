//! Polling for the next job before sleeping, and whether it pays on this machine.
//!
//! A thread that sleeps on a channel costs a wake-up (several microseconds) when work comes.
//! A short poll first saves it, but only while the thread that hands over the work runs on
//! another CPU: on the only one, the poll takes the CPU from that very thread. Pinned with
//! `taskset -c 0`, half of all sequential calls waited out a whole 30 µs poll (p50 46 µs
//! instead of 17 µs). So the poll runs only when the process may use two CPUs at once.

use crossbeam_channel::Receiver;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long an idle worker polls for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(30);

/// A sequential caller's next request tends to arrive a few microseconds after the reply;
/// a worker that has gone to sleep by then costs a wake-up, which on a virtual machine is
/// often the largest single cost of a round trip. Polling briefly first avoids it.
pub fn spin_for_job<T>(rx: &Receiver<T>) -> Option<T> {
    spin_for(|| rx.try_recv().ok())
}

/// Polls `try_next` for up to [`SPIN`] when [`spinning_pays`]; otherwise tries once.
pub fn spin_for<T>(mut try_next: impl FnMut() -> Option<T>) -> Option<T> {
    if !spinning_pays() {
        return try_next();
    }
    let start = Instant::now();
    loop {
        if let Some(job) = try_next() {
            return Some(job);
        }
        if start.elapsed() >= SPIN {
            return None;
        }
        std::hint::spin_loop();
    }
}

/// Whether the process may run on more than one CPU at a time: its affinity allows several
/// and no CPU quota (cgroup `cpu.max`, or `cpu.cfs_quota_us` in cgroup v1, as `docker
/// --cpus=1` or a Kubernetes limit sets) holds it to less than two CPUs' worth of time.
/// Read once, when the pool starts (before any Python code could change the affinity).
pub fn spinning_pays() -> bool {
    static PAYS: OnceLock<bool> = OnceLock::new();
    *PAYS.get_or_init(|| allowed_cpus().is_none_or(|n| n > 1) && cpu_quota().is_none_or(|q| q >= 2.0))
}

/// Whether the process may use at most one CPU's worth of time: its affinity allows one
/// CPU, or a CPU quota holds it to one CPU or less. There a thread hand-off mostly costs a
/// context switch rather than a wake-up on another CPU (see `pool::Turn`).
pub fn single_cpu() -> bool {
    static ONE: OnceLock<bool> = OnceLock::new();
    *ONE.get_or_init(|| allowed_cpus() == Some(1) || cpu_quota().is_some_and(|q| q <= 1.0))
}

/// The CPU time this process's cgroup may use, in CPUs (1.5 = one and a half), if limited.
fn cpu_quota() -> Option<f64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_end_matches('/');
        let quota = if controllers.is_empty() {
            std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max")).ok().and_then(|t| parse_cpu_max(&t))
        } else if controllers.split(',').any(|c| c == "cpu") {
            ["cpu", "cpu,cpuacct"].iter().find_map(|mount| {
                let dir = format!("/sys/fs/cgroup/{mount}{path}");
                let quota = std::fs::read_to_string(format!("{dir}/cpu.cfs_quota_us")).ok()?;
                let period = std::fs::read_to_string(format!("{dir}/cpu.cfs_period_us")).ok()?;
                parse_cfs(&quota, &period)
            })
        } else {
            None
        };
        if quota.is_some() {
            return quota;
        }
    }
    None
}

/// cgroup v2 `cpu.max`: "QUOTA PERIOD" in µs, or "max PERIOD" for no limit.
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let (quota, period) = (it.next()?, it.next()?);
    parse_cfs(quota, period)
}

/// cgroup v1 `cpu.cfs_quota_us` (-1 for no limit) and `cpu.cfs_period_us`.
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// How many CPUs this process may run on (`sched_getaffinity`), if the kernel says.
fn allowed_cpus() -> Option<usize> {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills in; zeroed is its empty
    // value.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        usize::try_from(libc::CPU_COUNT(&set)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_quotas_in_cpus() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("100000 100000"), Some(1.0));
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("200000\n", "100000\n"), Some(2.0));
        assert_eq!(parse_cfs("garbage", "100000"), None);
    }

    #[test]
    fn this_process_has_at_least_one_cpu() {
        assert!(allowed_cpus().is_some_and(|n| n >= 1));
    }
}
