//! Network-namespace plumbing: entering a namespace on a thread, running `ip`
//! and `nft` in one, and sweeping namespaces left behind by dead labs.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Where `ip netns add` keeps its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace a lab creates: `lbl-{tag}-{pid}-{role}`.
pub const NS_PREFIX: &str = "lbl-";

/// Runs `f` on a new thread that has first entered network namespace `ns`.
///
/// `setns(CLONE_NEWNET)` is per-thread, so the caller's own namespace is never
/// touched. A panic in `f` is resumed on the caller's thread, so assertions
/// inside `f` behave as if they ran inline.
pub fn run_in_ns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    let path = Path::new(NETNS_DIR).join(ns);
    // Opened here so a missing namespace is reported before a thread is spawned.
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let thread_name = format!("netns-{ns}");
    let handle = std::thread::Builder::new()
        .name(thread_name)
        // Room for 256 KiB map values (a Maglev ring) read by value in debug builds.
        .stack_size(16 << 20)
        .spawn(move || -> std::io::Result<R> {
            // SAFETY: `file` is an open namespace handle that outlives the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            drop(file);
            Ok(f())
        })
        .context("spawning namespace thread")?;
    match handle.join() {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e).with_context(|| format!("setns into {ns}")),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs a command to completion and turns a non-zero exit into an error that
/// carries its stderr.
pub(crate) fn run_checked(cmd: &mut Command, stdin: Option<&str>) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    if let Some(input) = stdin
        && let Some(mut pipe) = child.stdin.take()
    {
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
        );
    }
    Ok(out)
}

/// Runs `ip ARGS` in the root namespace.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<Output> {
    run_checked(Command::new("ip").args(args), None)
}

/// Runs several `ip` commands (without the leading `ip`) in namespace `ns`
/// Creates a veth pair straight inside its namespaces, so no name ever
/// exists in the root namespace: `(name, namespace, MAC)` of each end (no
/// MAC: the kernel picks one).
pub(crate) fn veth(
    a: (&str, &str, Option<[u8; 6]>),
    b: (&str, &str, Option<[u8; 6]>),
) -> Result<()> {
    let mut args = vec!["link".to_string(), "add".into()];
    for (i, (name, ns, mac)) in [a, b].into_iter().enumerate() {
        if i == 1 {
            args.extend(["type".into(), "veth".into(), "peer".into(), "name".into()]);
        }
        args.extend([name.to_string(), "netns".into(), ns.to_string()]);
        if let Some(mac) = mac {
            args.extend(["address".into(), super::mac_str(mac)]);
        }
    }
    ip(&args).map(drop)
}

/// with one `ip -batch` process, which is much faster than one process each.
pub(crate) fn ip_batch(ns: &str, commands: &[String]) -> Result<()> {
    let mut input = commands.join("\n");
    input.push('\n');
    run_checked(
        Command::new("ip").args(["-n", ns, "-batch", "-"]),
        Some(&input),
    )?;
    Ok(())
}

/// `program` run inside namespace `ns` (`ip netns exec NS PROGRAM`); the
/// caller adds the arguments.
pub fn command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Runs `nft -f -` with `ruleset` inside namespace `ns`.
pub(crate) fn nft_in(ns: &str, ruleset: &str) -> Result<()> {
    run_checked(command(ns, "nft").args(["-f", "-"]), Some(ruleset))?;
    Ok(())
}

/// Runs `nft ARGS` inside namespace `ns` and returns its stdout.
pub(crate) fn nft_output(ns: &str, args: &[&str]) -> Result<String> {
    let out = run_checked(command(ns, "nft").args(args), None)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes sysctls (`("net.ipv4.ip_forward", "1")`) inside namespace `ns`.
///
/// Net sysctls under /proc/sys resolve against the opening thread's namespace,
/// so a `setns` thread is enough and no `sysctl` process is needed.
pub(crate) fn sysctls_in(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let owned: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run_in_ns(ns, move || -> Result<()> {
        for (key, value) in owned {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            std::fs::write(&path, &value).with_context(|| format!("setting {key}={value}"))?;
        }
        Ok(())
    })?
}

/// Creates a named network namespace.
pub(crate) fn add_ns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    Ok(())
}

/// Deletes a named network namespace; the kernel tears down its interfaces.
pub(crate) fn del_ns(name: &str) -> Result<()> {
    ip(&["netns", "del", name])?;
    Ok(())
}

/// Names of all named network namespaces (the entries of /run/netns).
pub fn list_ns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.context(NETNS_DIR)?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Extracts the owner pid from a lab namespace name `lbl-{tag}-{pid}-{role}`.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    // From the right, so the role is the last field and the pid the one before.
    let mut fields = rest.rsplitn(3, '-');
    let _role = fields.next()?;
    let pid = fields.next()?.parse().ok()?;
    let _tag = fields.next()?;
    Some(pid)
}

/// Whether a process with this pid exists (a zombie counts as alive).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Deletes `lbl-*-{pid}-*` namespaces whose owning pid is no longer alive.
///
/// Processes still running inside such a namespace were started by that dead
/// lab (nothing else uses these names), so they are killed first; otherwise
/// they would keep the namespace alive after its name is gone.
pub fn sweep_stale() -> Result<()> {
    let mut failures = Vec::new();
    for name in list_ns()? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        tracing::info!(ns = %name, pid, "removing namespace of a dead lab");
        if let Ok(out) = ip(&["netns", "pids", &name]) {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Ok(p) = line.trim().parse::<libc::pid_t>() {
                    // SAFETY: plain kill(2) on a pid listed in the stale namespace.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        if let Err(e) = del_ns(&name) {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("could not remove stale namespaces: {}", failures.join("; "))
    }
}

/// Makes `iface` in `ns` send frames with complete checksums.
///
/// A veth hands locally generated TCP/UDP to its peer with only the
/// pseudo-header summed (CHECKSUM_PARTIAL), trusting the skb metadata to say
/// so. XDP_REDIRECT turns the frame into raw bytes and that metadata is lost,
/// so the receiver sees a wrong checksum. A real NIC delivers full checksums,
/// which is what this reproduces on the lab's traffic sources.
pub(crate) fn full_tx_checksums(ns: &str, iface: &str) -> Result<()> {
    run_checked(
        command(ns, "ethtool").args(["-K", iface, "tx", "off"]),
        None,
    )
    .with_context(|| format!("ethtool -K {iface} tx off in {ns} (is ethtool installed?)"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_from_the_right() {
        assert_eq!(owner_pid("lbl-e2e3-1234-be1"), Some(1234));
        assert_eq!(owner_pid("lbl-demo-7-cli"), Some(7));
        assert_eq!(owner_pid("lbl-x-notapid-cli"), None);
        assert_eq!(owner_pid("other-1-cli"), None);
        assert_eq!(owner_pid("lbl-1-cli"), None);
    }
}
