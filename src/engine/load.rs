//! Whether the server is saturated: the signal behind the busy write delay
//! (`RUSTY_SOCKS_BUSY_WRITE_DELAY_MS`).
//!
//! Why: a write delay cuts the system calls a streaming subscriber costs, which is what a
//! saturated server needs (docs/BENCHMARKS.md, "Write delay"), but on a server with room to
//! spare it only adds latency. So the delay that is on by default applies only while the
//! server's CPU is the limit. [`probe`] reads the process's CPU time every [`WINDOW`] and
//! compares it with what its worker threads could use (their number, or the CPUs the process
//! may run on if fewer). A window at [`ENGAGE`] or busier marks the server saturated; it
//! stays so while windows stay at [`KEEP`] or busier, which the delay itself keeps a
//! saturated server at (it takes the load off but does not remove it), and for [`HOLD`] after
//! the last one. Without that hysteresis the delay would switch itself off the moment it
//! worked, and the backlog of every saturated spell would set the latency tail. A server
//! whose load falls below [`KEEP`] for [`HOLD`] stops waiting.
//!
//! A runtime lag probe (how late a timer fires) was tried first and measured nothing: a task
//! woken by the timer runs next on tokio's scheduler, ahead of the queue, so even a
//! saturated server woke it within 1-2 ms.
//!
//! The CPU time comes from `/proc/self/stat`; where there is none the server never counts as
//! saturated and only `RUSTY_SOCKS_WRITE_DELAY_MS` applies. It is the whole process's, so work
//! off the workers (blocking threads of the durable history, webhooks) counts too. Sessions
//! read the result as one relaxed load of a flag the probe keeps, no clock read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::types::clock::now_us;

/// How often the probe reads the CPU time: the kernel counts it in 10 ms ticks, so a window
/// of ten reads it to within 10 %.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Share of the workers' CPU, in percent, at which the server counts as saturated.
pub const ENGAGE: u64 = 90;
/// Share, in percent, at or above which a saturated server stays so. A compromise: with the
/// delay on, the benchmark's server at 1,000 msg/s read 50-100 % per window, mostly 59-70 %,
/// so it stays on there through the windows at 75 % or more (one a second is enough); a lower
/// value would also keep the delay on a server that no longer needs it.
pub const KEEP: u64 = 75;
/// How long the server stays marked saturated after its last busy window.
pub const HOLD: Duration = Duration::from_secs(1);

/// The probe's findings, read by every session.
#[derive(Debug, Default)]
pub struct Load {
    /// Whether the server counts as saturated: what sessions read.
    saturated: AtomicBool,
    /// [`now_us`] until which it does (0: never did); only the probe uses it.
    saturated_until: AtomicU64,
    /// The last window's share of the workers' CPU, in percent, for `/metrics`.
    busy_pct: AtomicU64,
    /// Windows in which the server counted as saturated, for `/metrics`.
    saturated_windows: AtomicU64,
}

impl Load {
    /// Whether the server counts as saturated, as of the probe's last window.
    pub fn saturated(&self) -> bool {
        self.saturated.load(Ordering::Relaxed)
    }

    /// Takes one window in which the workers were `busy_pct` percent busy.
    pub fn observe(&self, busy_pct: u64) {
        self.observe_at(busy_pct, now_us());
    }

    /// [`Load::observe`] at `now` ([`now_us`]).
    fn observe_at(&self, busy_pct: u64, now: u64) {
        self.busy_pct.store(busy_pct, Ordering::Relaxed);
        let mut until = self.saturated_until.load(Ordering::Relaxed);
        let threshold = if now < until { KEEP } else { ENGAGE };
        if busy_pct >= threshold {
            self.saturated_windows.fetch_add(1, Ordering::Relaxed);
            let hold = u64::try_from(HOLD.as_micros()).unwrap_or(u64::MAX);
            until = now.saturating_add(hold);
            self.saturated_until.store(until, Ordering::Relaxed);
        }
        self.saturated.store(now < until, Ordering::Relaxed);
    }

    /// The probe stopped: nothing is measured any more, so nothing counts as saturated.
    fn stopped(&self) {
        self.saturated.store(false, Ordering::Relaxed);
        self.saturated_until.store(0, Ordering::Relaxed);
        self.busy_pct.store(0, Ordering::Relaxed);
    }

    /// The last window's share of the workers' CPU, in percent.
    pub fn busy_pct(&self) -> u64 {
        self.busy_pct.load(Ordering::Relaxed)
    }

    /// How many windows were busy enough to (keep the server) count as saturated.
    pub fn saturated_windows(&self) -> u64 {
        self.saturated_windows.load(Ordering::Relaxed)
    }
}

/// Measures how busy `workers` worker threads are into `load`, forever (the caller ends it
/// with the server); returns at once where the process's CPU time cannot be read.
pub async fn probe(load: &Load, workers: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let capacity = workers.clamp(1, cpus.max(1)) as u128;
    let Some(mut cpu) = process_cpu() else {
        tracing::info!("no process CPU time here: the busy write delay stays off");
        return;
    };
    let mut at = Instant::now();
    let mut ticks = tokio::time::interval(WINDOW);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let (Some(now_cpu), now) = (process_cpu(), Instant::now()) else {
            tracing::warn!(
                "the process's CPU time can no longer be read: the busy write delay stops"
            );
            load.stopped();
            return;
        };
        let wall = now.duration_since(at).as_micros() * capacity;
        let used = now_cpu.saturating_sub(cpu).as_micros();
        if let Some(pct) = (used * 100).checked_div(wall) {
            load.observe(u64::try_from(pct).unwrap_or(u64::MAX));
        }
        (cpu, at) = (now_cpu, now);
    }
}

/// This process's CPU time (user and system, every thread), from `/proc/self/stat`: a read
/// of a few microseconds from the kernel's memory, ten times a second, so it is done in place
/// rather than on a blocking thread.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu(&stat)
}

/// The user and system time of a `/proc/<pid>/stat` line: the 14th and 15th fields, counted
/// after the command name, which is in parentheses and may hold spaces. They are in clock
/// ticks of 1/100 s (`USER_HZ`, 100 on every Linux architecture). Public for the benchmark
/// tools, which read the server's CPU time the same way.
pub fn parse_cpu(stat: &str) -> Option<Duration> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        user.saturating_add(system).saturating_mul(10),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 5 0";
        assert_eq!(parse_cpu(stat), Some(Duration::from_millis(2870)));
        assert_eq!(parse_cpu("4242 (x) S 1 2"), None);
        assert_eq!(parse_cpu("no parenthesis"), None);
    }

    #[test]
    fn a_busy_window_engages_a_quieter_one_keeps_it_and_a_second_below_ends_it() {
        let hold = u64::try_from(HOLD.as_micros()).expect("small");
        let load = Load::default();
        assert!(!load.saturated(), "never observed");
        load.observe_at(ENGAGE - 1, 1_000);
        assert!(!load.saturated(), "below the threshold");
        load.observe_at(KEEP, 2_000);
        assert!(!load.saturated(), "KEEP does not engage");
        load.observe_at(ENGAGE, 3_000);
        assert!(load.saturated());
        assert_eq!(load.saturated_windows(), 1);
        load.observe_at(KEEP, 3_000 + hold - 1);
        assert!(load.saturated(), "KEEP extends it");
        assert_eq!(load.saturated_windows(), 2);
        load.observe_at(KEEP - 1, 3_000 + 2 * hold - 2);
        assert!(
            load.saturated(),
            "below KEEP: held for HOLD after the last busy window"
        );
        assert_eq!(load.saturated_windows(), 2, "and not counted");
        load.observe_at(KEEP - 1, 3_000 + 2 * hold - 1);
        assert!(!load.saturated(), "HOLD passed");
        load.observe_at(KEEP, 3_000 + 2 * hold);
        assert!(!load.saturated(), "once ended, only ENGAGE engages again");
        assert_eq!(load.busy_pct(), KEEP);
        load.observe_at(100, 10 * hold);
        load.stopped();
        assert!(!load.saturated() && load.busy_pct() == 0, "a stopped probe");
    }

    #[tokio::test]
    async fn the_probe_finds_a_process_that_burns_its_cpu_saturated() {
        if process_cpu().is_none() {
            return; // No /proc here: the probe turns itself off (the test above covers it).
        }
        let load = std::sync::Arc::new(Load::default());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let probing = {
            let load = std::sync::Arc::clone(&load);
            tokio::spawn(async move { probe(&load, 1).await })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !load.saturated() && Instant::now() < deadline {
            tokio::time::sleep(WINDOW).await;
        }
        stop.store(true, Ordering::Relaxed);
        probing.abort();
        let _ = spinner.join();
        assert!(
            load.saturated(),
            "a thread spinning on one worker's CPU for 10 s, last window {} %",
            load.busy_pct()
        );
    }
}
