//! The real `marketgate` binary as a child process: started on a config file, its listeners
//! read from its JSON log, then stopped with SIGTERM (a clean stop) or SIGKILL (a crash that
//! flushes nothing). Tests that need what only a separate process shows — a `kill -9`, the
//! binary's own wiring between the planes — use this; the rest run in-process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a process may take to log that it listens, or to log an awaited message.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test: `$MARKETGATE_BIN`, else the one cargo built for these tests.
fn binary() -> String {
    std::env::var("MARKETGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_marketgate").to_owned())
}

/// A running `marketgate` subcommand. Dropping it kills it.
pub struct Process {
    child: Child,
    /// The fields of the log record that said it listens (`buyers`, `admin`, `listen`, …).
    listening: Value,
    /// Every JSON log record so far (stdout), in order.
    log: Arc<Mutex<Vec<Value>>>,
}

impl Process {
    /// Starts `marketgate <command> --config <config>` and waits until it logs `ready` (the
    /// message of its "listening" record). Its stdout must be JSON logs (`[log] format =
    /// "json"`). Panics if it has not after [`START_TIMEOUT`].
    pub async fn start(command: &str, config: &Path, ready: &str) -> Process {
        Self::start_under(&[], command, config, ready).await
    }

    /// [`Process::start`] under a wrapper command, e.g. `["prlimit", "--nofile=256"]`.
    pub async fn start_under(
        wrapper: &[&str],
        command: &str,
        config: &Path,
        ready: &str,
    ) -> Process {
        let mut cmd = match wrapper.split_first() {
            None => Command::new(binary()),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(binary());
                cmd
            }
        };
        // Every MARKETGATE_* variable is a config override for the binary (MARKETGATE_BIN
        // would be an unknown key): the child gets none.
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("MARKETGATE_")) {
            cmd.env_remove(name);
        }
        beside_config(&mut cmd, config);
        let mut child = cmd
            .args([command, "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (listening_tx, listening_rx) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let awaited = ready.to_owned();
        let records = log.clone();
        // One reader for the process's whole life: it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let Ok(record) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if record["fields"]["message"] == awaited.as_str() {
                    let _ = listening_tx.send(record["fields"].clone());
                }
                records.lock().unwrap().push(record);
            }
        });
        let listening =
            tokio::task::spawn_blocking(move || listening_rx.recv_timeout(START_TIMEOUT))
                .await
                .unwrap();
        match listening {
            Ok(listening) => Process {
                child,
                listening,
                log,
            },
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("marketgate {command} did not log '{ready}' (exit: {status:?})");
            }
        }
    }

    /// Runs `marketgate <command> --config <config>` expecting it to stop by itself (a start
    /// that is refused): its exit status and everything it wrote to stderr. Panics if it is
    /// still running after [`START_TIMEOUT`] (it is killed first).
    pub async fn run_to_exit(command: &str, config: &Path) -> (std::process::ExitStatus, String) {
        let mut cmd = Command::new(binary());
        for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("MARKETGATE_")) {
            cmd.env_remove(name);
        }
        beside_config(&mut cmd, config);
        let mut child = cmd
            .args([command, "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("marketgate {command} kept running; it was expected to refuse to start");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        (status, reader.join().unwrap())
    }

    /// An address field of the "listening" record, e.g. `"buyers"` or `"admin"`.
    pub fn addr(&self, field: &str) -> SocketAddr {
        self.listening[field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no address '{field}' in {}", self.listening))
    }

    /// Waits (off the runtime's threads) until the process logs `message`; panics after
    /// [`START_TIMEOUT`].
    pub async fn logged(&self, message: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|r| r["fields"]["message"] == message)
        {
            assert!(Instant::now() < deadline, "never logged '{message}'");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many times the process has logged `message` so far.
    pub fn count_logged(&self, message: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["fields"]["message"] == message)
            .count()
    }

    /// Every JSON log record so far, in order.
    pub fn records(&self) -> Vec<Value> {
        self.log.lock().unwrap().clone()
    }

    /// CPU time the process has used so far (user + system), from `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the process is alive");
        // Fields after the command name (which is in parentheses and may hold spaces).
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on every Linux this runs on.
        Duration::from_millis(ticks * 10)
    }

    /// SIGKILL: no chance to flush, report or give anything back.
    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit: the clean stop an operator's `systemctl stop` is.
    /// Panics if it does not exit successfully within [`START_TIMEOUT`].
    pub fn terminate(&mut self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM could not be sent");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exited with {status} after SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "still running after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the child in the config's folder: a relative path in the config (the default
/// `./marketgate-data`) lands in the test's own directory, not in the repository.
fn beside_config(cmd: &mut Command, config: &Path) {
    if let Some(dir) = config.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.current_dir(dir);
    }
}

/// A loopback port that was free a moment ago, for a process that must come back on the same
/// address after a restart (a proxy's admin listener, named in the control plane's config).
/// Taken below the kernel's ephemeral range (32768–60999 by default), so that no outgoing
/// connection of a test running beside it can be given the port between this check and the
/// process's bind (port 0 comes from that range: it failed that way under CI's load); each
/// test process walks its own stretch of 20000–32767, from its pid, skipping ports in use.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_768;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(397) % SPAN;
    for _ in 0..SPAN {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().unwrap();
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

/// Runs `marketgate <command> --config <config>` expecting it to stop on its own, unsuccessfully,
/// within [`START_TIMEOUT`]; returns what it wrote (stdout and stderr). Panics if it keeps
/// running (it is killed first) or exits successfully.
pub async fn refused(command: &str, config: &Path) -> String {
    let mut cmd = Command::new(binary());
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("MARKETGATE_")) {
        cmd.env_remove(name);
    }
    let mut child = cmd
        .args([command, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("marketgate {command} kept running");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!status.success(), "marketgate {command} exited 0: {text}");
    text
}

impl Process {
    /// How many log records it wrote so far.
    pub fn log_records(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
