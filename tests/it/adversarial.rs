//! An adversary on loopback against a real `marketgate proxy`: raw sockets, bounded in count
//! and time. Each case asserts the answer, that the process's open files, memory (VmRSS) and
//! CPU stay bounded (read from `/proc/<pid>`), and that another buyer's calls keep being
//! answered meanwhile.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::gateway::*;
use crate::support::process::Process;

/// What `/proc/<pid>` says of a process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    open_files: usize,
    rss_kib: u64,
    /// User plus system CPU, in clock ticks (1/100 s).
    cpu_ticks: u64,
}

fn usage(pid: u32) -> Usage {
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let cpu_ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Usage {
        open_files,
        rss_kib,
        cpu_ticks,
    }
}

/// Starts `marketgate proxy` in `dir` with at most `nofile` open files and `extra` config, and
/// pushes it the test market (echo backend, unlimited purchase).
async fn proxy(dir: &Path, nofile: u32, extra: &str, backend: SocketAddr) -> Process {
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = '{}'\n[gateway]\nlisten = '127.0.0.1:0'\n{extra}\n[admin]\nlisten = '127.0.0.1:0'\ntoken = '{ADMIN_TOKEN}'\n[log]\nformat = 'json'\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let limit = format!("--nofile={nofile}:{nofile}");
    let process =
        Process::start_under(&["prlimit", &limit], "proxy", &config, "proxy listening").await;
    let answer = push(
        process.addr("admin"),
        serde_json::to_vec(&market(1, backend, None)).unwrap(),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    process
}

/// One signed buyer call on a fresh connection; its status and how long it took.
async fn timed_call(buyers: SocketAddr) -> (u16, Duration) {
    let started = Instant::now();
    let request = signed_as(
        KEY,
        SECRET,
        request("GET", MARKET, "/v1/echo/1", Bytes::new()),
    );
    let mut head = String::from("GET /v1/echo/1 HTTP/1.1\r\nconnection: close\r\n");
    for (name, value) in request.headers() {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("\r\n");
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = TcpStream::connect(buyers).await.ok()?;
        stream.write_all(head.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        text.split(' ').nth(1)?.parse::<u16>().ok()
    })
    .await
    .ok()
    .flatten();
    (answer.unwrap_or(0), started.elapsed())
}

async fn healthz(admin: SocketAddr) -> u16 {
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = TcpStream::connect(admin).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.ok()?;
        String::from_utf8_lossy(&out)
            .split(' ')
            .nth(1)?
            .parse::<u16>()
            .ok()
    })
    .await;
    answer.ok().flatten().unwrap_or(0)
}

/// Waits until the server closes `stream` (EOF or reset) or `within` passes.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Item 1: more idle sockets than the process may open files. Before: the buyer, control and
/// admin listeners all stopped (`/healthz` included) and the accept loop spun on EMFILE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_past_the_open_file_limit_starve_no_listener() {
    const NOFILE: u32 = 256;
    const ATTACKERS: usize = 300;
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let process = proxy(
        dir.path(),
        NOFILE,
        "header_read_timeout_ms = 1500\nidle_timeout_ms = 3000",
        backend.addr,
    )
    .await;
    let (buyers, admin, pid) = (process.addr("buyers"), process.addr("admin"), process.pid());
    let (status, baseline) = timed_call(buyers).await;
    assert_eq!(status, 200);
    let before = usage(pid);
    let logged_before = process.log_records();

    // Idle sockets: some send nothing, some an HTTP/2 preface and nothing more.
    let started = Instant::now();
    let mut idle = Vec::new();
    for i in 0..ATTACKERS {
        if let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(buyers)).await
        {
            if i % 3 == 0 {
                let _ = stream
                    .write_all(
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
                    )
                    .await;
            }
            idle.push(stream);
        }
    }
    // Meanwhile every other listener and another buyer are answered.
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        assert_eq!(healthz(admin).await, 200, "/healthz during the flood");
        let (status, took) = timed_call(buyers).await;
        assert_eq!(status, 200, "a buyer's call during the flood");
        worst = worst.max(took);
    }
    assert!(
        worst < Duration::from_secs(2),
        "a buyer's call took {worst:?}"
    );
    let during = usage(pid);
    assert!(
        during.open_files < NOFILE as usize,
        "open files {} of {NOFILE}",
        during.open_files
    );
    // The idle ones are closed by the server, without the client doing anything.
    let mut closed = 0;
    for stream in &mut idle {
        if closed_within(stream, Duration::from_secs(12)).await {
            closed += 1;
        }
    }
    let elapsed = started.elapsed();
    let after = usage(pid);
    assert_eq!(closed, idle.len(), "every idle socket is reaped");
    let cpu_secs = (after.cpu_ticks - before.cpu_ticks) as f64 / 100.0;
    assert!(
        cpu_secs < elapsed.as_secs_f64() * 0.5,
        "{cpu_secs} s of CPU in {elapsed:?}"
    );
    let logged = process.log_records() - logged_before;
    assert!(logged < 100, "{logged} log records during the flood");
    assert!(
        after.rss_kib < before.rss_kib + 64 * 1024,
        "{before:?} → {after:?}"
    );
    eprintln!(
        "idle flood: {} sockets, buyer call {baseline:?} before, worst {worst:?} during; \
         {} → {} open files; {cpu_secs} s CPU in {elapsed:?}; {logged} log records; \
         RSS {} → {} KiB",
        idle.len(),
        before.open_files,
        during.open_files,
        before.rss_kib,
        after.rss_kib
    );
}
