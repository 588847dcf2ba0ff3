//! The output directory of a run: one run at a time (a lock held for the run's
//! life), never one that holds the run's own inputs, and no temporary files left
//! behind by a killed run.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use super::{Result, TrainError};

const LOCK_FILE: &str = ".lock";

/// Refuses an `--out` that is, or contains, one of the run's inputs: the final
/// model, checkpoints and metrics would be written over them.
pub fn refuse_inputs_inside(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out_abs = absolute(out)?;
    for (flag, input) in inputs {
        let input_abs = absolute(input)?;
        if input_abs.starts_with(&out_abs) {
            return Err(TrainError::msg(format!(
                "--out {} contains {flag} {}: the run would write over its own input; choose another --out",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// `path` with symlinks and `..` resolved, also when its last components do not
/// exist yet (an `--out` about to be created).
fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| TrainError::io("resolving", path, e))?;
    let parts: Vec<Component> = abs.components().collect();
    for existing in (1..=parts.len()).rev() {
        if let Ok(mut resolved) = parts[..existing].iter().collect::<PathBuf>().canonicalize() {
            // What does not exist yet cannot be a symlink: its `..` are lexical.
            for part in &parts[existing..] {
                match part {
                    Component::ParentDir => {
                        resolved.pop();
                    }
                    Component::Normal(name) => resolved.push(name),
                    _ => {}
                }
            }
            return Ok(resolved);
        }
    }
    Ok(abs)
}

/// An advisory lock on `<out>/.lock` (flock), released by the OS when the process
/// dies, so a lock left by a killed run never blocks the next one. The file holds
/// the holder's pid, to name it to a run that is refused.
pub struct OutDirLock {
    path: PathBuf,
    file: File,
}

impl OutDirLock {
    pub fn acquire(out: &Path) -> Result<Self> {
        fs::create_dir_all(out).map_err(|e| TrainError::io("creating", out, e))?;
        let path = out.join(LOCK_FILE);
        // Another run may unlink the file between our open and our lock; a lock on
        // an unlinked file guards nothing, so open again until the lock is on the
        // file the path names.
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| TrainError::io("opening", &path, e))?;
            let mut holder = String::new();
            if let Err(e) = file.try_lock() {
                let _ = file.read_to_string(&mut holder);
                return Err(TrainError::msg(match e {
                    fs::TryLockError::WouldBlock => format!(
                        "--out {} is in use by another run (pid {}, lock {}): wait for it to finish or choose another --out",
                        out.display(),
                        holder.trim(),
                        path.display()
                    ),
                    fs::TryLockError::Error(e) => format!("locking {}: {e}", path.display()),
                }));
            }
            if !same_file(&file, &path) {
                continue;
            }
            file.read_to_string(&mut holder).map_err(|e| TrainError::io("reading", &path, e))?;
            let holder = holder.trim();
            if !holder.is_empty() {
                eprintln!(
                    "note: taking over the lock {} left by pid {holder}, which no longer runs (a killed run)",
                    path.display()
                );
            }
            file.set_len(0).map_err(|e| TrainError::io("writing", &path, e))?;
            file.seek(SeekFrom::Start(0)).map_err(|e| TrainError::io("writing", &path, e))?;
            writeln!(file, "{}", std::process::id()).map_err(|e| TrainError::io("writing", &path, e))?;
            file.sync_all().map_err(|e| TrainError::io("syncing", &path, e))?;
            return Ok(Self { path, file });
        }
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    path.exists()
}

impl Drop for OutDirLock {
    /// Unlinks the file while still holding the lock, so that a waiting run
    /// re-opens a fresh file instead of locking this one (see `acquire`).
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// Removes the `.<name>.tmp-<pid>` files an atomic write leaves when its process is
/// killed between writing and renaming, anywhere under `out`. Only called with the
/// lock held, so no live writer owns them. Returns the removed paths.
pub fn remove_stale_temps(out: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut dirs = vec![out.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(TrainError::io("listing", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io("listing", &dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = entry.file_type().map_err(|e| TrainError::io("listing", &path, e))?;
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() && is_atomic_write_temp(&name) {
                fs::remove_file(&path).map_err(|e| TrainError::io("removing stale temporary file", &path, e))?;
                removed.push(path);
            }
        }
    }
    removed.sort();
    Ok(removed)
}

/// The names `hf::atomic_write` (also behind `fsx::write_atomic`) gives its temporary files.
fn is_atomic_write_temp(name: &str) -> bool {
    name.starts_with('.')
        && name.rsplit_once(".tmp-").is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_recognized_and_nothing_else() {
        for name in [".model.safetensors.tmp-123", ".LATEST.tmp-9"] {
            assert!(is_atomic_write_temp(name), "{name}");
        }
        for name in ["model.safetensors", ".lock", ".x.tmp-", ".x.tmp-12a", "a.tmp-3"] {
            assert!(!is_atomic_write_temp(name), "{name}");
        }
    }

    #[test]
    fn out_may_not_hold_an_input_even_through_dot_dot() {
        let d = std::env::temp_dir().join(format!("host-outdir-{}", std::process::id()));
        let model = d.join("x/model");
        fs::create_dir_all(&model).unwrap();
        let err = refuse_inputs_inside(&d.join("x"), &[("--model", &model)]).unwrap_err().to_string();
        assert!(err.contains("contains --model"), "{err}");
        let err = refuse_inputs_inside(&d.join("y/../x"), &[("--model", &model)]).unwrap_err().to_string();
        assert!(err.contains("contains --model"), "{err}");
        refuse_inputs_inside(&d.join("x/model/run"), &[("--model", &model)]).unwrap();
        refuse_inputs_inside(&d.join("x2"), &[("--model", &model)]).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
