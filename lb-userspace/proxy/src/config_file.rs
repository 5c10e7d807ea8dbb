//! Files the configuration names (error pages, certificates, keys, CAs,
//! CRLs, the admin token): read at load and reload, often while other work
//! waits. A FIFO, a device or a huge file named by mistake must fail at
//! once, not block or fill memory: [`read`] opens without blocking, takes
//! only regular files, and never reads more than its bound (the size in
//! the metadata is not trusted: `/dev/zero` and `/proc` files say 0).

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Largest PEM file read (a CA bundle or a CRL may be large; not a disk).
pub const MAX_PEM: u64 = 16 << 20;

/// The contents of `path`, a regular file of at most `limit` bytes. The
/// errors say why (not a regular file, too large, the OS's reason); the
/// caller names the file and what it is for.
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO with no writer would wait for one.
    // O_NOCTTY: a terminal named by mistake does not become ours.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    // The type of what was opened, not of what the path named a moment before.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}, not a regular file", kind(&meta.file_type())),
        ));
    }
    let mut buf = Vec::with_capacity(meta.len().min(limit) as usize + 1);
    read_bounded(file, limit, &mut buf)?;
    Ok(buf)
}

/// [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read(path, limit)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Reads at most `limit + 1` bytes: one more than allowed tells it is too large.
fn read_bounded(file: File, limit: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    file.take(limit.saturating_add(1)).read_to_end(buf)?;
    if buf.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(())
}

/// What a file type is, for an error.
fn kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lb-config-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_regular_files_up_to_the_bound_only() {
        let d = dir("regular");
        let f = d.join("page");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read(&f, 10).unwrap(), b"0123456789");
        let e = read(&f, 9).unwrap_err().to_string();
        assert_eq!(e, "larger than 9 bytes");
        assert!(read(&d.join("missing"), 10).is_err());
        let e = read(&d, 10).unwrap_err().to_string();
        assert_eq!(e, "a directory, not a regular file");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_fifo_or_a_device_fails_at_once() {
        let d = dir("fifo");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would wait here for ever.
        let e = read(&fifo, 10).unwrap_err().to_string();
        assert_eq!(e, "a FIFO, not a regular file");
        let e = read(Path::new("/dev/zero"), 10).unwrap_err().to_string();
        assert_eq!(e, "a character device, not a regular file");
        let _ = std::fs::remove_dir_all(&d);
    }
}
