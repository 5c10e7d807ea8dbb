//! The process's file descriptor limit (RLIMIT_NOFILE), raised to what
//! the configuration may use, as HAProxy sizes its own from `maxconn`.
//!
//! A proxied connection holds two descriptors (the client's and the
//! server's), so frontends allowing 10 000 connections each need 20 000
//! and more, while services start with a soft limit of 1 024 (systemd's
//! default, `LimitNOFILE=1024:524288`): past it, accepts fail with
//! EMFILE (the accept loop backs off; clients wait in the backlog) and
//! servers cannot be connected to. The soft limit is raised to the need,
//! within the hard limit (and the hard limit too when the process may, as
//! root may, within `fs.nr_open`); a need above what could be had is
//! logged with the numbers, at start and at every reload.

use tracing::{info, warn};

use crate::config::Config;

/// Descriptors besides connections: listeners (one per bind and serving
/// thread), health checks, the control and admin sockets, BPF maps and
/// programs, the journal, syslog, DNS.
const BASE: u64 = 1024;

/// What `config` may use at once: two per connection its frontends
/// allow, plus [`BASE`].
pub fn needed(config: &Config) -> u64 {
    let connections: u64 = config
        .proxy
        .0
        .frontends
        .iter()
        .map(|fe| fe.max_connections as u64)
        .sum();
    connections.saturating_mul(2).saturating_add(BASE)
}

/// The soft limit to ask for and, if it must grow, the hard one, given the
/// limits now and the most the kernel allows (`fs.nr_open`).
pub fn wanted(need: u64, (soft, hard): (u64, u64), nr_open: u64) -> (u64, u64) {
    if need <= soft {
        return (soft, hard);
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE; the caller falls back
    // to the hard limit it has when that is refused.
    let hard = hard.max(need.min(nr_open));
    (need.min(hard), hard)
}

/// Raises this process's limit toward what `config` needs; logs the result.
pub fn raise_for(config: &Config) {
    let need = needed(config);
    match raise(need) {
        Ok(limit) if limit >= need => {
            info!(limit, need, "file descriptor limit (RLIMIT_NOFILE)")
        }
        Ok(limit) => warn!(
            limit,
            need,
            "the file descriptor limit is below what the frontends' max_connections may use (two per connection): \
             raise the hard limit (systemd's LimitNOFILE, ulimit -Hn) or lower max_connections"
        ),
        Err(e) => warn!(need, "reading or raising the file descriptor limit: {e}"),
    }
}

/// Raises the soft limit (and the hard one if allowed) toward `need`;
/// the soft limit in force after.
fn raise(need: u64) -> std::io::Result<u64> {
    let now = get()?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(now.1);
    let (soft, hard) = wanted(need, now, nr_open);
    if (soft, hard) == now {
        return Ok(now.0);
    }
    if set(soft, hard).is_err() {
        // Not allowed to raise the hard limit: as far as it goes.
        set(need.min(now.1).max(now.0), now.1)?;
    }
    Ok(get()?.0)
}

/// The soft and hard limits now.
fn get() -> std::io::Result<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((l.rlim_cur, l.rlim_max))
}

fn set(soft: u64, hard: u64) -> std::io::Result<()> {
    let l = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_connection_and_a_base() {
        let text = "[[frontend]]\nname = \"a\"\nbinds = [\"127.0.0.1:0\"]\ndefault_pool = \"p\"\n\
                    max_connections = 3000\n[[frontend]]\nname = \"b\"\nbinds = [\"127.0.0.1:0\"]\n\
                    default_pool = \"p\"\n[[pool]]\nname = \"p\"\n\
                    servers = [{ address = \"127.0.0.1:9\" }]\n";
        let config = crate::config::parse(text, "t.toml").unwrap();
        // 3000 and the default 10 000.
        assert_eq!(needed(&config), 2 * 13_000 + BASE);
    }

    #[test]
    fn the_soft_limit_rises_to_the_need_within_what_can_be_had() {
        // Enough already: unchanged (never lowered).
        assert_eq!(wanted(500, (1024, 4096), 1 << 20), (1024, 4096));
        assert_eq!(wanted(500, (65_536, 65_536), 1 << 20), (65_536, 65_536));
        // Within the hard limit: the soft one rises.
        assert_eq!(wanted(21_024, (1024, 524_288), 1 << 20), (21_024, 524_288));
        // Above it: the hard one too (root), within nr_open.
        assert_eq!(wanted(21_024, (1024, 4096), 1 << 20), (21_024, 21_024));
        assert_eq!(wanted(2 << 20, (1024, 4096), 1 << 20), (1 << 20, 1 << 20));
    }
}
