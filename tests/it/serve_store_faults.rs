//! `marketgate serve` as a real process under load while its store fails: the disk of
//! `data_dir` (a small tmpfs mounted for the test) fills up, and, separately, the database
//! file is removed. A buyer call that needs a lease refill meanwhile is answered at once —
//! 503 APIG.0606 with `Retry-After` and the reason, never 405 "calls used up", never a
//! 500 ms spin — the failure is logged once per state change, calls are served again once
//! the disk has room, and no acknowledged (200) call is lost: after a clean restart the
//! buyer's `quota_used` is at least every 200 answered and exactly what reached the backend.
//!
//! The tmpfs needs root (`mount -t tmpfs`); without it the test says so and passes nothing
//! off as shown: it fails, unless `MARKETGATE_SKIP_MOUNT_TESTS` is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::control::{
    bought_group, expect_status, market_base, write_serve_config, Api, Auth, BUYER_PROJECT,
    BUYER_TOKEN,
};
use crate::support::gateway::{request, signed_as, Backend, Buyer};
use crate::support::process::Process;

const DOMAIN: &str = "faults.example.com";
const READY: &str = "marketgate serve: both planes listening";
/// Buyers calling at once, each in a loop.
const BUYERS: usize = 4;
/// The store fails this long under load.
const OUTAGE: Duration = Duration::from_secs(4);
/// A refusal during the outage must come this fast (a debug build on a loaded 2-core
/// machine; the spin it replaces held each call 500 ms).
const PROMPT: Duration = Duration::from_millis(250);

/// A tmpfs of `size_mib` at `at`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mib: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m,mode=0700")])
            .arg("tmpfs")
            .arg(at)
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with one file until it is full; returns the file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
    path
}

/// What the buyers were answered: per status and code, how many and the slowest; every
/// 503 body seen once.
#[derive(Default, Debug)]
struct Answers {
    counts: BTreeMap<(u16, String), usize>,
    slowest: BTreeMap<(u16, String), Duration>,
    bodies: BTreeMap<(u16, String), String>,
    retry_after_missing: usize,
}

/// [`BUYERS`] buyers calling in a loop until `stop`, recording into `answers`.
fn load(
    buyers: std::net::SocketAddr,
    key: &str,
    secret: &str,
    answers: Arc<Mutex<Answers>>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..BUYERS)
        .map(|_| {
            let (key, secret) = (key.to_owned(), secret.to_owned());
            let (answers, stop) = (answers.clone(), stop.clone());
            tokio::spawn(async move {
                let client = Buyer::new(buyers);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = client
                        .send(signed_as(
                            &key,
                            &secret,
                            request("GET", DOMAIN, "/call", Bytes::new()),
                        ))
                        .await;
                    let took = started.elapsed();
                    let code = if answer.status == 200 {
                        String::new()
                    } else {
                        answer.code()
                    };
                    let mut answers = answers.lock().unwrap();
                    let entry = (answer.status.as_u16(), code);
                    *answers.counts.entry(entry.clone()).or_insert(0) += 1;
                    let slowest = answers.slowest.entry(entry.clone()).or_default();
                    *slowest = (*slowest).max(took);
                    if answer.status == 503 && !answer.headers.contains_key("retry-after") {
                        answers.retry_after_missing += 1;
                    }
                    answers
                        .bodies
                        .entry(entry)
                        .or_insert_with(|| String::from_utf8_lossy(&answer.body).into_owned());
                }
            })
        })
        .collect()
}

async fn quota_used(control: std::net::SocketAddr, purchase_id: &str) -> u64 {
    let answer = Api::new(control, Auth::Token(BUYER_TOKEN.into()))
        .get(&format!(
            "{}/purchases/{purchase_id}",
            market_base(BUYER_PROJECT)
        ))
        .await;
    expect_status("buyer's view", &answer, 200);
    answer.1["quota_used"].as_u64().unwrap()
}

/// Waits until a call is served again; fails after `within`.
async fn served_again(buyers: std::net::SocketAddr, key: &str, secret: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let answer = Buyer::new(buyers)
            .send(signed_as(
                key,
                secret,
                request("GET", DOMAIN, "/call", Bytes::new()),
            ))
            .await;
        if answer.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not served {within:?} after the store came back: {} {:?}",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a store outage under load showed: the answers before, during and after, and the
/// warnings and errors logged during it.
struct Outage {
    healthy: Answers,
    during: Answers,
    after: Answers,
    warnings: BTreeMap<String, usize>,
}

impl Outage {
    /// Runs [`BUYERS`] buyers, healthy for a second, then `fail`s the store for [`OUTAGE`],
    /// then `mend`s it and runs until calls are served again, plus a second.
    async fn under_load(
        serve: &Process,
        bought: &crate::support::control::Bought,
        fail: impl FnOnce(),
        mend: impl FnOnce(),
    ) -> Outage {
        let buyers = serve.addr("buyers");
        let answers = Arc::new(Mutex::new(Answers::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = load(
            buyers,
            &bought.key,
            &bought.secret,
            answers.clone(),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let healthy = std::mem::take(&mut *answers.lock().unwrap());
        let logged_before = serve.records().len();
        fail();
        tokio::time::sleep(OUTAGE).await;
        let during = std::mem::take(&mut *answers.lock().unwrap());
        let records = serve.records()[logged_before..].to_vec();
        mend();
        served_again(buyers, &bought.key, &bought.secret, Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
        let after = std::mem::take(&mut *answers.lock().unwrap());
        let warnings = records
            .iter()
            .filter(|r| r["level"] == "WARN" || r["level"] == "ERROR")
            .fold(BTreeMap::new(), |mut seen, r| {
                let message = r["fields"]["message"].as_str().unwrap_or("").to_owned();
                *seen.entry(message).or_insert(0) += 1;
                seen
            });
        Outage {
            healthy,
            during,
            after,
            warnings,
        }
    }

    /// Calls answered 200 in all three phases, and the `served_again` call.
    fn served(&self) -> u64 {
        let ok = (200, String::new());
        [&self.healthy, &self.during, &self.after]
            .iter()
            .map(|a| a.counts.get(&ok).copied().unwrap_or(0) as u64)
            .sum::<u64>()
            + 1
    }

    /// During the outage: served from what is held, or refused at once with 503 APIG.0606,
    /// `Retry-After` and a reason naming the store; never 405 "calls used up" or 500; and
    /// logged once per state change, not per call.
    fn assert_answered_at_once(&self, what: &str) {
        eprintln!(
            "{what}: healthy {:?}; during the {OUTAGE:?} outage {:?} (slowest {:?}, bodies \
             {:?}); after {:?}; warnings and errors logged during the outage: {:?}",
            self.healthy.counts,
            self.during.counts,
            self.during.slowest,
            self.during.bodies,
            self.after.counts,
            self.warnings
        );
        for ((status, code), count) in &self.during.counts {
            assert!(
                *status == 200 || (*status == 503 && code == "APIG.0606"),
                "{what}: {count} answered {status} {code} during the outage: {:?}",
                self.during.bodies
            );
        }
        let refused = (503, "APIG.0606".to_owned());
        assert!(
            self.during.counts.contains_key(&refused),
            "{what}: no call needed a refill during the outage: the test shows nothing ({:?})",
            self.during.counts
        );
        assert!(
            self.during.slowest[&refused] < PROMPT,
            "{what}: a refusal took {:?}",
            self.during.slowest[&refused]
        );
        assert_eq!(
            self.during.retry_after_missing, 0,
            "{what}: a 503 without Retry-After"
        );
        assert!(
            self.during.bodies[&refused].contains("store"),
            "{what}: the 503 does not say why: {}",
            self.during.bodies[&refused]
        );
        assert!(
            self.warnings.values().all(|&n| n <= 2),
            "{what}: logged per call: {:?}",
            self.warnings
        );
    }
}

/// No acknowledged call lost: after a clean restart the ledger holds every 200, and
/// exactly what reached the backend.
async fn assert_nothing_lost(
    what: &str,
    mut serve: Process,
    config: &Path,
    bought: &crate::support::control::Bought,
    served: u64,
    backend: &Backend,
) {
    serve.terminate();
    let restarted = Process::start("serve", config, READY).await;
    let used = quota_used(restarted.addr("control"), &bought.purchase_id).await;
    eprintln!(
        "{what}: {served} calls answered 200, the backend saw {}, quota_used after a clean \
         restart {used}",
        backend.hits()
    );
    assert!(used >= served, "{what}: {used} used < {served} served");
    assert_eq!(
        used,
        backend.hits(),
        "{what}: charged calls that never reached the backend"
    );
}

/// `serve` on `data` (small leases, at most 16 calls and a 1 s outage budget, so that the
/// load needs refills all the time, outage included), a group bought with a million calls,
/// and a first call served.
async fn selling(
    dir: &Path,
    data: &Path,
) -> (Backend, PathBuf, Process, crate::support::control::Bought) {
    let backend = Backend::echo().await;
    let config = write_serve_config(
        dir,
        data,
        "[proxy]\noutage_budget_secs = 1\nlease_min_calls = 4\nlease_max_calls = 16\n",
    );
    let serve = Process::start("serve", &config, READY).await;
    let bought = bought_group(serve.addr("control"), backend.addr, DOMAIN, 1_000_000).await;
    served_again(
        serve.addr("buyers"),
        &bought.key,
        &bought.secret,
        Duration::from_secs(10),
    )
    .await;
    (backend, config, serve, bought)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_load_is_answered_at_once_and_loses_no_served_call() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(_tmpfs) = Tmpfs::mount(&data, 24) else {
        assert!(
            std::env::var_os("MARKETGATE_SKIP_MOUNT_TESTS").is_some(),
            "cannot mount a tmpfs (needs root); set MARKETGATE_SKIP_MOUNT_TESTS to skip"
        );
        eprintln!("full-disk fault test skipped: no tmpfs");
        return;
    };
    let (backend, config, serve, bought) = selling(dir.path(), &data).await;
    let filler = data.join("filler");
    let outage = Outage::under_load(
        &serve,
        &bought,
        || {
            fill(&data);
        },
        || std::fs::remove_file(&filler).unwrap(),
    )
    .await;
    outage.assert_answered_at_once("full disk");
    let served = outage.served() + 1;
    assert_nothing_lost("full disk", serve, &config, &bought, served, &backend).await;
}

/// The database file moved away under load (what `rm` does to the path; the process keeps
/// the file open), then put back. Before: every write was acknowledged into the open file,
/// which no restart would find.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_moved_away_under_load_is_answered_at_once_and_loses_no_served_call() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (backend, config, serve, bought) = selling(dir.path(), &data).await;
    let db = data.join("marketgate.db");
    let aside = dir.path().join("marketgate.db.aside");
    let outage = Outage::under_load(
        &serve,
        &bought,
        || std::fs::rename(&db, &aside).unwrap(),
        || std::fs::rename(&aside, &db).unwrap(),
    )
    .await;
    outage.assert_answered_at_once("database moved away");
    let served = outage.served() + 1;
    assert_nothing_lost(
        "database moved away",
        serve,
        &config,
        &bought,
        served,
        &backend,
    )
    .await;
}
