//! Running child processes: checked runs and a foreground run that passes signals on.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, bail};

/// Runs `cmd` to completion and fails if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// A readable one-line rendering of a command (program name and arguments).
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    // The toolchain's full cargo path is noise in messages; the name says enough.
    std::iter::once(program.file_name().unwrap_or(program.as_os_str()))
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Pid of the foreground child, for the SIGTERM forwarder (0 when none).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    // pid 0 would signal our whole process group; only forward to a real child.
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

extern "C" fn swallow_signal(_: libc::c_int) {}

fn set_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handlers only touch an atomic and call kill.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

/// Runs `cmd` in the foreground and returns the exit code to pass on.
///
/// The terminal delivers Ctrl-C to the child directly, so xtask ignores SIGINT
/// and lets the child clean up; a SIGTERM sent to xtask is passed to the child.
/// Handlers (not SIG_IGN) are used because exec resets them to the default in
/// the child, whereas an ignored disposition would be inherited.
pub fn run_foreground(cmd: &mut Command) -> Result<i32> {
    set_handler(libc::SIGINT, swallow_signal)?;
    set_handler(libc::SIGTERM, forward_signal)?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    Ok(exit_code(status.with_context(|| {
        format!("waiting for `{}`", display(cmd))
    })?))
}

/// The shell-style exit code for a child's status (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGTERM (15).
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn display_joins_program_and_args() {
        let mut cmd = Command::new("/root/.rustup/toolchains/x/bin/cargo");
        cmd.args(["build", "--release"]);
        assert_eq!(display(&cmd), "cargo build --release");
    }

    #[test]
    fn run_reports_failure() {
        assert!(run(&mut Command::new("true")).is_ok());
        let err = run(&mut Command::new("false")).unwrap_err().to_string();
        assert!(err.contains("`false` failed"), "{err}");
    }
}
