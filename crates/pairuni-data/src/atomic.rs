//! Atomic file writes: a reader (or a killed writer) never sees half a file.
//!
//! The content goes to a temporary file in the destination's folder (same file system, so the rename is atomic),
//! which is flushed and fsynced, then renamed over the destination; the folder is fsynced so the rename itself
//! survives a crash. Every file the pipeline writes goes through here.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::DataError;

/// Distinguishes temp files of concurrent writers within one process (the pid separates processes).
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `path` atomically with the bytes `fill` writes; creates missing parent folders.
///
/// On any error the temporary file is removed and `path` keeps its old content (or stays absent).
pub fn write_atomic<F>(path: impl AsRef<Path>, fill: F) -> Result<(), DataError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    let path = path.as_ref();
    let tmp = temp_path(path);
    let result = write_and_rename(path, &tmp, fill);
    if result.is_err() {
        // Best effort: the temp file may not exist if creating it was what failed.
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|source| DataError::io(path, source))
}

/// Writes `bytes` to `path` atomically (see [`write_atomic`]).
pub fn write_atomic_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), DataError> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// The folder a file lives in; `""` (a bare file name) means the current folder.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A hidden sibling name unique to this process and call, ending in `.tmp` so `.gitignore` skips strays.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_owned());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_dir(path).join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

fn write_and_rename<F>(path: &Path, tmp: &Path, fill: F) -> io::Result<()>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    let dir = parent_dir(path);
    fs::create_dir_all(dir)?;
    let file = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    let mut writer = BufWriter::new(file);
    fill(&mut writer)?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    sync_dir(dir)
}

/// Makes the rename durable. Only Unix can open and fsync a folder.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_atomic_bytes(&path, b"first version, longer").unwrap();
        write_atomic_bytes(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(entries(dir.path()), vec!["out.txt".to_owned()]);
    }

    #[test]
    fn failed_fill_keeps_old_content_and_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_atomic_bytes(&path, b"old").unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial new content")?;
            Err(io::Error::other("simulated crash"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("out.txt"), "{err}");
        assert!(err.to_string().contains("simulated crash"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(dir.path()), vec!["out.txt".to_owned()]);
    }

    #[test]
    fn creates_missing_parent_folders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/c.bin");
        write_atomic_bytes(&path, &[1, 2, 3]).unwrap();
        assert_eq!(fs::read(&path).unwrap(), vec![1, 2, 3]);
        assert_eq!(entries(&dir.path().join("a/b")), vec!["c.bin".to_owned()]);
    }

    #[test]
    fn unwritable_destination_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A folder in the way: the rename onto it must fail and the error must name the path.
        let path = dir.path().join("taken");
        fs::create_dir_all(path.join("inner")).unwrap();
        let err = write_atomic_bytes(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("taken"), "{err}");
        assert_eq!(entries(dir.path()), vec!["taken".to_owned()]);
    }
}
