//! One process per `data_dir` (CONTRACT §1), and nothing in it readable by others.
//!
//! [`FileLock`] is an exclusive `flock(2)` on a lock file that holds the holder's pid. The
//! kernel drops the lock when the holder's last descriptor closes, so a `kill -9` never leaves
//! a stale lock behind, and a second process learns who holds it. It is reusable for any file
//! a process must own alone (a SQLite database kept outside `data_dir` locks `<db>.lock`).
//!
//! [`DataDir::claim`] is what every role (`serve`, `proxy`, `control` on SQLite) calls first,
//! before it reads or writes anything in `data_dir`: it creates the directory (mode 0700, or
//! tightens a looser one), takes the lock on [`LOCK_FILE`], restricts the process's file
//! creation mask to 0077 (so the store, its WAL and journal, the quota journal, the lease
//! state and the snapshot file are all created 0600), and tightens any file already in the
//! directory that others could read (stores created by earlier versions were 0644). This
//! module does not open or interpret any of those files.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The lock file inside `data_dir`.
pub const LOCK_FILE: &str = "marketgate.lock";
/// Mode of `data_dir` itself: owner only.
pub const DATA_DIR_MODE: u32 = 0o700;
/// Mode of every file in `data_dir`: owner read/write only (they hold AppSecrets).
pub const DATA_FILE_MODE: u32 = 0o600;
/// The file creation mask set by [`DataDir::claim`]: nothing for group or others.
pub const PRIVATE_UMASK: u32 = 0o077;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the lock.
    #[error(
        "{what} {path} is in use by another marketgate process ({holder}, holding the lock on \
         {lock}): stop that process, or give this one another {what}",
        holder = match .pid { Some(pid) => format!("pid {pid}"), None => "pid not yet written".to_owned() },
        lock = .lock.display(),
        path = .path.display(),
    )]
    Held {
        what: &'static str,
        path: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error<'p>(
    action: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> LockError + 'p {
    move |source| LockError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// An exclusive lock held for as long as this value lives (or the process does).
#[derive(Debug)]
pub struct FileLock {
    /// Kept open: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

impl FileLock {
    /// Takes the lock on `lock_path` (created 0600 if absent) without waiting, and writes this
    /// process's pid into it. `what` and `owned` name the thing it protects in the error
    /// (`"data_dir"`, the directory), which names the holder's pid when another process has it.
    pub fn acquire(lock_path: &Path, what: &'static str, owned: &Path) -> Result<Self, LockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(DATA_FILE_MODE)
            .open(lock_path)
            .map_err(io_error("open the lock file", lock_path))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    what,
                    path: owned.to_owned(),
                    lock: lock_path.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(errno) => {
                return Err(io_error("lock", lock_path)(std::io::Error::from(errno)));
            }
        }
        // Ours now: replace whatever pid a dead holder left.
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io_error("write the pid into", lock_path))?;
        Ok(FileLock {
            _file: file,
            path: lock_path.to_owned(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A claimed `data_dir`: this process alone uses it while the value lives.
#[derive(Debug)]
pub struct DataDir {
    lock: FileLock,
}

impl DataDir {
    /// Creates `dir` (0700) or tightens it to 0700, locks it, sets the process umask to
    /// [`PRIVATE_UMASK`] and tightens files in it to [`DATA_FILE_MODE`]. Fails, touching no
    /// other file, when another process holds it.
    pub fn claim(dir: &Path) -> Result<DataDir, LockError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DATA_DIR_MODE)
            .create(dir)
            .map_err(io_error("create", dir))?;
        let lock = FileLock::acquire(&dir.join(LOCK_FILE), "data_dir", dir)?;
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(PRIVATE_UMASK as _));
        tighten(dir, DATA_DIR_MODE)?;
        let entries = std::fs::read_dir(dir).map_err(io_error("list", dir))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                tighten(&entry.path(), DATA_FILE_MODE)?;
            }
        }
        Ok(DataDir { lock })
    }

    /// The lock file held.
    pub fn lock_path(&self) -> &Path {
        self.lock.path()
    }
}

/// Removes every permission bit beyond `mode` from `path`, saying so when it changed any.
fn tighten(path: &Path, mode: u32) -> Result<(), LockError> {
    let meta = std::fs::metadata(path).map_err(io_error("read the mode of", path))?;
    let current = meta.permissions().mode() & 0o7777;
    if current & !mode == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(current & mode))
        .map_err(io_error("restrict the mode of", path))?;
    tracing::warn!(
        path = %path.display(),
        was = format!("{current:o}"),
        now = format!("{:o}", current & mode),
        "tightened the mode of a data_dir entry: it holds secrets"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_first_holder_and_is_free_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("x.lock");
        let first = FileLock::acquire(&lock, "data_dir", dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in the same
        // process conflicts exactly as another process would.
        match FileLock::acquire(&lock, "data_dir", dir.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        FileLock::acquire(&lock, "data_dir", dir.path()).unwrap();
    }

    #[test]
    fn the_message_names_the_path_and_the_pid() {
        let error = LockError::Held {
            what: "data_dir",
            path: "/var/lib/mg".into(),
            lock: "/var/lib/mg/marketgate.lock".into(),
            pid: Some(42),
        };
        let text = error.to_string();
        assert!(text.contains("data_dir /var/lib/mg is in use"), "{text}");
        assert!(text.contains("pid 42"), "{text}");
    }
}
