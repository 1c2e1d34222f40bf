//! The last good snapshot on disk: a full checkpoint (`snapshot.json`) and the deltas applied
//! since, appended as JSON lines to log segments (`snapshot.log.<V>`, the records that follow
//! from version `V`). This module owns the file layout, appending, writing a checkpoint and
//! the recovery at start; it does not decide when to checkpoint nor hold any lock (the
//! [`super::Gateway`] does both).
//!
//! Invariant, at every instant (crashes included): the checkpoint plus every record after
//! its version, read from the segments in order of `V`, rebuild the latest acknowledged
//! version. That holds because a segment is started (the proxy "rotates") at the version a
//! checkpoint is about to be written for, the checkpoint replaces `snapshot.json` atomically
//! (`durable::write_atomic_with`), and only then are the segments it covers (started before
//! its version) removed. Recovery skips records whose version the checkpoint already has.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{GatewayError, SNAPSHOT_LOG_FILE};
use crate::snapshot::delta::{self, Delta};
use crate::snapshot::Snapshot;

/// The checkpoint file and its log segments beside it.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotFiles {
    checkpoint: PathBuf,
}

/// The last good snapshot as [`SnapshotFiles::load`] rebuilt it, and what its log holds.
pub(crate) struct Loaded {
    pub(crate) snapshot: Snapshot,
    /// Records replayed after the checkpoint, and their bytes.
    pub(crate) logged: usize,
    pub(crate) logged_bytes: usize,
    pub(crate) checkpoint_bytes: usize,
    /// The version the checkpoint on disk holds.
    pub(crate) checkpoint_version: u64,
    /// The segment the next record is appended to (the last one replayed).
    pub(crate) segment_from: u64,
}

impl SnapshotFiles {
    pub(crate) fn new(checkpoint: PathBuf) -> SnapshotFiles {
        SnapshotFiles { checkpoint }
    }

    fn dir(&self) -> &Path {
        match self.checkpoint.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    /// The log segment holding the records that follow from version `from`.
    pub(crate) fn segment(&self, from: u64) -> PathBuf {
        self.dir().join(format!("{SNAPSHOT_LOG_FILE}.{from}"))
    }

    /// The log segments on disk, in replay order: `(V, path)` by `V`. A log written before
    /// segments (`snapshot.log`, emptied at every checkpoint) follows from the checkpoint's
    /// version `checkpoint_version`, ahead of a segment of the same `V`.
    fn segments(&self, checkpoint_version: u64) -> std::io::Result<Vec<(u64, bool, PathBuf)>> {
        let prefix = format!("{SNAPSHOT_LOG_FILE}.");
        let mut segments = Vec::new();
        for entry in std::fs::read_dir(self.dir())? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == SNAPSHOT_LOG_FILE {
                segments.push((checkpoint_version, false, entry.path()));
            } else if let Some(from) = name
                .strip_prefix(&prefix)
                .and_then(|v| v.parse::<u64>().ok())
            {
                segments.push((from, true, entry.path()));
            }
        }
        segments.sort();
        Ok(segments)
    }

    /// Appends one record (and a newline) to the segment of `from` and makes it durable
    /// before returning: the delta is then as persisted as a checkpoint would have made it.
    /// A failed append is cut off again, so that no torn record is left before later ones.
    pub(crate) fn append(&self, from: u64, record: &[u8]) -> std::io::Result<()> {
        let path = self.segment(from);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)?;
        let before = file.metadata()?.len();
        let mut line = Vec::with_capacity(record.len() + 1);
        line.extend_from_slice(record);
        line.push(b'\n');
        if let Err(error) = file.write_all(&line).and_then(|()| file.sync_data()) {
            let _ = file.set_len(before);
            return Err(error);
        }
        if before == 0 {
            // A new file's name is durable once its directory is.
            std::fs::File::open(self.dir())?.sync_all()?;
        }
        Ok(())
    }

    /// Writes `snapshot` as the checkpoint (streamed, then `durable::write_atomic_with`),
    /// then removes the segments it covers: those started before its version, and with
    /// `segment_at_version_too` (a full snapshot: nothing follows from it yet) the one
    /// started at it. Returns the checkpoint's bytes.
    pub(crate) fn write_checkpoint(
        &self,
        snapshot: &Snapshot,
        segment_at_version_too: bool,
    ) -> std::io::Result<usize> {
        crate::durable::write_atomic_with(&self.checkpoint, |out| {
            serde_json::to_writer(out, snapshot).map_err(std::io::Error::other)
        })?;
        let bytes = std::fs::metadata(&self.checkpoint)?.len() as usize;
        let mut removed = false;
        for (from, numbered, path) in self.segments(snapshot.version)? {
            let covered = from < snapshot.version
                || !numbered
                || (segment_at_version_too && from == snapshot.version);
            if covered {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if removed {
            std::fs::File::open(self.dir())?.sync_all()?;
        }
        Ok(bytes)
    }

    /// The last good snapshot (validated by the caller), or `None` if there is none: the
    /// checkpoint, then every record of the segments that follows from it, in order
    /// (applied in place: time proportional to the log); records the checkpoint already
    /// has are skipped. A torn last record (a crash during its append: never acknowledged)
    /// or one that does not follow ends the replay; the snapshot replayed is then written as
    /// a new checkpoint and every segment removed, so the log restarts clean.
    pub(crate) fn load(&self) -> Result<Option<Loaded>, GatewayError> {
        let Some((mut snapshot, checkpoint_bytes)) = self.load_checkpoint()? else {
            return Ok(None);
        };
        let read_error = |path: &Path, source| GatewayError::SnapshotRead {
            path: path.to_owned(),
            source,
        };
        let checkpoint_version = snapshot.version;
        let segments = self
            .segments(checkpoint_version)
            .map_err(|source| read_error(self.dir(), source))?;
        let Replayed {
            mut replayed,
            mut replayed_bytes,
            mut segment_from,
            clean,
        } = replay(&mut snapshot, &segments).map_err(|(path, source)| read_error(&path, source))?;
        let mut checkpoint_bytes = checkpoint_bytes;
        let mut checkpoint_version = checkpoint_version;
        if !clean {
            tracing::warn!(
                dir = %self.dir().display(),
                replayed,
                version = snapshot.version,
                "the snapshot log ends in a record that does not apply (torn by a crash, or not following): serving what it replayed, checkpointed anew"
            );
            checkpoint_bytes = self
                .write_checkpoint(&snapshot, true)
                .map_err(|source| read_error(&self.checkpoint, source))?;
            for (_, _, path) in &segments {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(read_error(path, source)),
                }
            }
            std::fs::File::open(self.dir())
                .and_then(|dir| dir.sync_all())
                .map_err(|source| read_error(self.dir(), source))?;
            replayed = 0;
            replayed_bytes = 0;
            checkpoint_version = snapshot.version;
            segment_from = snapshot.version;
        }
        Ok(Some(Loaded {
            snapshot,
            logged: replayed,
            logged_bytes: replayed_bytes,
            checkpoint_bytes,
            checkpoint_version,
            segment_from,
        }))
    }

    /// Writes the checkpoint of version `through` without the snapshot served: the checkpoint
    /// on disk with the records of the segments started before `through` replayed (as at
    /// start), which must make exactly `through`; then removes those segments. Returns the
    /// checkpoint's bytes. Reads only sealed segments (records are appended to the segment
    /// of `through` meanwhile): a checkpoint written so touches nothing the apply lock
    /// guards, not even the wire snapshot served (which a copy would have to keep).
    pub(crate) fn compact(&self, through: u64) -> std::io::Result<usize> {
        let (mut snapshot, _) = self
            .load_checkpoint()
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("no checkpoint to compact the log into"))?;
        let sealed: Vec<_> = self
            .segments(snapshot.version)?
            .into_iter()
            .filter(|&(from, _, _)| from < through)
            .collect();
        let replayed = replay(&mut snapshot, &sealed).map_err(|(_, source)| source)?;
        if !replayed.clean || snapshot.version != through {
            return Err(std::io::Error::other(format!(
                "the snapshot log replays to version {}, not {through}",
                snapshot.version
            )));
        }
        self.write_checkpoint(&snapshot, false)
    }

    /// The checkpoint file as written and its size, or `None` if there is none.
    pub(crate) fn load_checkpoint(&self) -> Result<Option<(Snapshot, usize)>, GatewayError> {
        let path = &self.checkpoint;
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(GatewayError::SnapshotRead {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let snapshot: Snapshot =
            serde_json::from_slice(&bytes).map_err(|source| GatewayError::SnapshotParse {
                path: path.to_owned(),
                source,
            })?;
        Ok(Some((snapshot, bytes.len())))
    }
}

/// What [`replay`] did.
struct Replayed {
    replayed: usize,
    replayed_bytes: usize,
    /// The last numbered segment read (the snapshot's version if none).
    segment_from: u64,
    /// Every record read applied (or was in the snapshot already).
    clean: bool,
}

/// Applies to `snapshot` (a checkpoint) the records of `segments`, in order, that follow from
/// it; records it already has are skipped. Stops at a torn record or one that does not
/// follow (`clean: false`). `Err`: a segment could not be read.
fn replay(
    snapshot: &mut Snapshot,
    segments: &[(u64, bool, PathBuf)],
) -> Result<Replayed, (PathBuf, std::io::Error)> {
    let checkpoint_version = snapshot.version;
    let mut positions = delta::Positions::of(snapshot);
    let mut done = Replayed {
        replayed: 0,
        replayed_bytes: 0,
        segment_from: checkpoint_version,
        clean: true,
    };
    for (from, numbered, path) in segments {
        let bytes = std::fs::read(path).map_err(|source| (path.clone(), source))?;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                done.clean = false; // torn: never acknowledged
                return Ok(done);
            };
            let record = &rest[..end];
            rest = &rest[end + 1..];
            let Ok(delta) = serde_json::from_slice::<Delta>(record) else {
                done.clean = false;
                return Ok(done);
            };
            if delta.version <= checkpoint_version {
                continue; // in the checkpoint already (its segment not yet removed)
            }
            let follows =
                delta.from_version == snapshot.version && delta.version > delta.from_version;
            if !follows || delta::apply_in_place(snapshot, &mut positions, delta).is_err() {
                done.clean = false;
                return Ok(done);
            }
            done.replayed += 1;
            done.replayed_bytes += end + 1;
        }
        if *numbered {
            done.segment_from = *from;
        }
    }
    Ok(done)
}
