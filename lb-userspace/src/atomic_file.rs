//! Replacing a state file whole and durably: the journal, the discovery
//! cache and BIRD's include file are read back after a crash or a power
//! loss, and must then be the old version or the new one, never empty or
//! half-written (a rename alone is atomic but not durable: the new name can
//! reach the disk before the data does).

//!
//! The temporary file is created beside the target under an unpredictable
//! name with O_CREAT|O_EXCL|O_NOFOLLOW: a symlink or file planted there in
//! advance makes the write fail (another name is tried), it is never
//! written through. The target itself is replaced by the rename, never
//! opened, so a symlink at `path` is replaced, not followed.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Mode of a state file written for the first time: the agent's alone.
pub const PRIVATE: u32 = 0o600;

/// Names tried before giving up (each is random: a clash is an attack or a bug).
const ATTEMPTS: usize = 8;

/// Writes `bytes` to `path`, replacing it: a temporary file beside it is
/// written and synced, renamed over `path`, and the directory synced. On
/// failure `path` is unchanged and the temporary file removed. The file
/// keeps the mode of the one it replaces; a new one gets `new_mode`.
pub fn replace(path: &Path, bytes: &[u8], new_mode: u32) -> io::Result<()> {
    let mode = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => m.permissions().mode() & 0o7777,
        _ => new_mode,
    };
    let (tmp, file) = create_temporary(path, mode)?;
    let written = write_synced(file, bytes, mode).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable once the directory entry is.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// A new file beside `path` (a rename does not cross file systems) named
/// `path` + `.tmp-` + 16 random hex digits, created by this call alone.
fn create_temporary(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{:016x}", random_u64()?));
        let tmp = PathBuf::from(tmp);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        match created {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary file name was free")))
}

/// 64 random bits from the kernel.
fn random_u64() -> io::Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(buf))
}

fn write_synced(mut file: File, bytes: &[u8], mode: u32) -> io::Result<()> {
    // Exactly `mode`, whatever the umask took from it at creation.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-atomic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary() {
        let d = dir("ok");
        let path = d.join("state");
        replace(&path, b"one", PRIVATE).unwrap();
        replace(&path, b"two, longer", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two, longer");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_planted_symlink_is_never_written_through() {
        use std::os::unix::fs::MetadataExt as _;
        let d = dir("symlink");
        let (path, victim) = (d.join("state"), d.join("victim"));
        std::fs::write(&victim, b"precious").unwrap();
        // The old predictable name, and the target itself, as symlinks.
        std::os::unix::fs::symlink(&victim, d.join(format!("state.tmp-{}", std::process::id())))
            .unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        replace(&path, b"journal", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file(), "the symlink is replaced by a file");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"journal");
        // An operator's mode stays.
        std::fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        replace(&path, b"again", PRIVATE).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_replace_keeps_the_old_file_and_no_temporary() {
        let d = dir("fail");
        let path = d.join("state");
        replace(&path, b"old", PRIVATE).unwrap();
        // A directory where the file should go: the rename fails.
        let blocked = d.join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(replace(&blocked, b"new", PRIVATE).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let mut names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked", "state"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
