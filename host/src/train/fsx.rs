//! Durable file writes: a file is either absent, the old version, or the complete new
//! version after a crash, never a torn mix.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use super::{Result, TrainError};

/// Test hook (why: the kill-during-checkpoint test must kill the process at a known
/// point inside a write, which no signal sent from outside can hit reliably). When
/// `HOST_ABORT_WRITING` names a file (its final name, e.g. `optimizer.safetensors`)
/// and `HOST_ABORT_AT_STEP` the checkpoint's step, the process aborts after writing
/// half of that file's bytes.
pub(crate) fn abort_requested(file_name: &str, step: u64) -> bool {
    let Ok(name) = std::env::var("HOST_ABORT_WRITING") else { return false };
    let at = std::env::var("HOST_ABORT_AT_STEP").ok().and_then(|s| s.parse::<u64>().ok());
    name == file_name && at == Some(step)
}

/// Writes `bytes` to `path` and fsyncs it. `abort_step` arms the test hook above.
pub(crate) fn write_synced(path: &Path, bytes: &[u8], abort_step: Option<u64>) -> Result<()> {
    let mut f = File::create(path).map_err(|e| TrainError::io("creating", path, e))?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if let Some(step) = abort_step && abort_requested(file_name, step) {
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half]).map_err(|e| TrainError::io("writing", path, e))?;
        f.sync_all().map_err(|e| TrainError::io("syncing", path, e))?;
        eprintln!("HOST_ABORT_WRITING: aborting after {half} of {} bytes of {}", bytes.len(), path.display());
        std::process::abort();
    }
    f.write_all(bytes).map_err(|e| TrainError::io("writing", path, e))?;
    f.sync_all().map_err(|e| TrainError::io("syncing", path, e))
}

/// fsync a directory so that renames inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TrainError::io("syncing directory", dir, e))
}

/// Replaces `path` with `bytes` atomically ([`crate::hf::atomic_write`]: temp file
/// in the same directory, fsync, rename, fsync of the directory), creating the
/// directory first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| TrainError::io("creating directory", dir, e))?;
    crate::hf::atomic_write(path, bytes).map_err(|e| match e {
        crate::hf::HfError::Io { path, source } => TrainError::io("writing", &path, source),
        other => TrainError::from(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("host-fsx-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let p = dir.join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
