//! Claims on the addresses an agent listens on, so that a second `lb run`
//! cannot serve them too.
//!
//! Every listener is bound with SO_REUSEPORT (a reload starts the new
//! proxy beside the old one), so the kernel would let a second `lb run`
//! on the same addresses (another `--socket`, a proxy-only file, which
//! takes no pin lock) bind them as well and split their connections
//! between two configurations, as two HAProxies do. nginx refuses with
//! EADDRINUSE; so does this. An agent holds, for each address it listens
//! on, an abstract Unix socket named after it (`@lb/listen/ADDR`):
//! per network namespace, as the addresses are, and released by the
//! kernel however the process ends. A second agent finds the name taken
//! and is refused with the first one's pid. Abstract names have no
//! permissions, so only a holder of this agent's user that listens counts:
//! another user's squatting cannot keep `lb` from starting (it warns).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};

use anyhow::{Result, bail};

/// The addresses this agent holds.
#[derive(Debug, Default)]
pub struct Claims(BTreeMap<SocketAddr, Option<UnixListener>>);

/// The abstract socket name of `addr`'s claim.
fn name(addr: SocketAddr) -> String {
    format!("lb/listen/{addr}")
}

impl Claims {
    /// Holds exactly the addresses of `wanted` (address, owner as in
    /// `Config::listeners`): new ones are claimed first (all or none; the
    /// error names the owner, the address and the other agent's pid), then
    /// those no longer wanted are released. Port 0 is never claimed (each
    /// bind gets a port of its own).
    pub fn hold(&mut self, wanted: &[(SocketAddr, String)]) -> Result<()> {
        let mut taken = BTreeMap::new();
        for (addr, owner) in wanted {
            if addr.port() == 0 || self.0.contains_key(addr) || taken.contains_key(addr) {
                continue;
            }
            match claim(*addr) {
                Ok(l) => {
                    taken.insert(*addr, l);
                }
                Err(holder) => bail!(
                    "{owner} {addr}, which another lb agent ({holder}) serves: both would get its connections (SO_REUSEPORT); stop that one first (`lb stop`, or `lb stop --soft` to let its connections finish)"
                ),
            }
        }
        self.0.append(&mut taken);
        self.0.retain(|a, _| wanted.iter().any(|(w, _)| w == a));
        Ok(())
    }

    /// The addresses held.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.0.keys().copied().collect()
    }
}

/// Claims `addr`, or says which agent holds it. Abstract names have no
/// permissions: a name held by a process of another user (or by one that
/// does not listen, as no agent does) is no agent's, and must not keep
/// this one from starting; it is left with a warning (`None`: the address
/// is then unguarded), as is a claim that fails for any other reason.
fn claim(addr: SocketAddr) -> Result<Option<UnixListener>, String> {
    let unix = UnixAddr::from_abstract_name(name(addr)).map_err(|e| e.to_string())?;
    let e = match UnixListener::bind_addr(&unix) {
        Ok(l) => return Ok(Some(l)),
        Err(e) => e,
    };
    let holder = (e.kind() == std::io::ErrorKind::AddrInUse).then(|| holder(&unix));
    match holder {
        // SAFETY: geteuid has no failure mode.
        Some(Some(cred)) if cred.uid == unsafe { libc::geteuid() } => {
            Err(format!("pid {}", cred.pid))
        }
        Some(cred) => {
            let who = cred.map_or("a process that does not listen".into(), |c| {
                format!("pid {} of uid {}", c.pid, c.uid)
            });
            tracing::warn!(%addr, "the claim on this address is held by {who}, not an lb agent of this user: going on without it");
            Ok(None)
        }
        None => {
            tracing::warn!(%addr, "cannot claim the address for this agent: {e}");
            Ok(None)
        }
    }
}

/// The credentials of the process listening on `unix` (SO_PEERCRED of a
/// connection to it), if one listens.
fn holder(unix: &UnixAddr) -> Option<libc::ucred> {
    use std::os::fd::AsRawFd;
    let stream = UnixStream::connect_addr(unix).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a ucred of the size given, on a socket we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(addrs: &[&str]) -> Vec<(SocketAddr, String)> {
        addrs
            .iter()
            .map(|a| (a.parse().unwrap(), "frontend \"web\" binds".to_string()))
            .collect()
    }

    #[test]
    fn a_claimed_address_is_refused_to_another_holder_until_released() {
        // Names are per network namespace: a port of this process's own
        // keeps two test runs on one host apart.
        let port = 10_000 + std::process::id() % 50_000;
        let [a, b, c] = [0, 1, 2].map(|i| format!("198.51.100.{}:{port}", 7 + i));
        let (a, b, c) = (a.as_str(), b.as_str(), c.as_str());
        let mut first = Claims::default();
        first.hold(&wanted(&[a, b])).unwrap();
        let mut second = Claims::default();
        let err = second.hold(&wanted(&[c, b])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!(
                "frontend \"web\" binds {b}, which another lb agent (pid {})",
                std::process::id()
            )),
            "{msg}"
        );
        // All or none: the address claimed before the refusal was let go.
        assert!(second.addresses().is_empty());
        // Holding again what is held changes nothing; dropping one frees it.
        first.hold(&wanted(&[a])).unwrap();
        assert_eq!(first.addresses(), vec![a.parse().unwrap()]);
        second.hold(&wanted(&[b, "0.0.0.0:0"])).unwrap();
        assert_eq!(second.addresses(), vec![b.parse().unwrap()]);
        drop(first);
        second.hold(&wanted(&[a, b])).unwrap();
        assert_eq!(second.addresses().len(), 2);
        // A name taken by a socket that does not listen (no agent's) is
        // passed over with a warning, not a refusal.
        let squat = std::os::unix::net::UnixDatagram::bind_addr(
            &UnixAddr::from_abstract_name(name(c.parse().unwrap())).unwrap(),
        )
        .unwrap();
        let mut third = Claims::default();
        third.hold(&wanted(&[c])).unwrap();
        assert_eq!(third.addresses(), vec![c.parse().unwrap()]);
        drop(squat);
    }
}
