//! The `rusty_socks` binary as a child process: a clean environment, its log lines, signals,
//! and a guard that never lets it outlive a failed test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::WAIT;

/// The server binary built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_rusty_socks");

/// Removes every `RUSTY_SOCKS_*` variable of the test's own environment and logs at INFO.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars() {
        if key.starts_with("RUSTY_SOCKS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info")
}

/// Runs the binary to completion in a clean environment with `args` and `envs`: (exit code,
/// stdout, stderr).
pub fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    clean_env(&mut cmd).args(args).envs(envs.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills the server if a test fails before stopping it, so no process outlives the test.
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Reap {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reap {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A running server whose standard output (its log) is read line by line.
pub struct Logged {
    pub child: Reap,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Logged {
    /// Starts the binary on a free loopback port with `extra` settings.
    pub fn start(extra: &[(&str, &str)]) -> Self {
        let mut envs = vec![("RUSTY_SOCKS_PORT", "0")];
        envs.extend_from_slice(extra);
        Self::spawn(&[], &envs)
    }

    /// Starts the binary on loopback with command-line `args` and `envs` settings (the port is
    /// whatever they, or a config file they name, say).
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        clean_env(&mut cmd)
            .env("RUSTY_SOCKS_HOST", "127.0.0.1")
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child: Reap(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// The first log line that contains `needle`, read so far or waited for (failing after
    /// [`WAIT`]).
    pub fn wait_for(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no log line with {needle:?} within {WAIT:?}: {:#?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("log ended without {needle:?}: {:#?}", self.seen)
                }
            }
        }
    }

    /// Waits for the "listening on" line and returns the address it names.
    pub fn address(&mut self) -> std::net::SocketAddr {
        let line = self.wait_for("listening on ");
        let rest = line.split("listening on ").nth(1).unwrap();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Stops the server with SIGTERM and expects a clean exit.
    pub fn stop(mut self) {
        signal(&self.child, "TERM");
        assert!(wait_exit(&mut self.child, Duration::from_secs(10)).success());
    }

    /// Every remaining line, until the process closes its output.
    pub fn rest(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => return self.seen.clone(),
                Err(RecvTimeoutError::Timeout) => panic!("log never ended: {:#?}", self.seen),
            }
        }
    }
}

/// Sends signal `name` (`TERM`, `INT`, ...) to the child.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the child to exit, killing it and failing after `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
