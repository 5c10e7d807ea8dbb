//! `lb run --takeover`: a new agent (a new binary, a new file) takes over
//! from the one running on the same control socket without a connection
//! refused or cut, as HAProxy's `-sf` and nginx's binary upgrade do.
//!
//! The XDP data plane already survives an agent (its pins are adopted);
//! the L7 proxy's listeners do not. So the new agent first starts its own
//! proxy from the file, its listeners joining the running one's in their
//! SO_REUSEPORT groups, with `net.ipv4.tcp_migrate_req` on (Linux 5.14:
//! connections still queued on a listener that closes move to another of
//! its group instead of being reset). Then it tells the running agent to
//! stop softly (`Request::SoftStop`): that one closes its listeners, frees
//! its control socket, pins and addresses at once and answers what it has
//! in flight. The new agent then starts as usual (waiting a moment for the
//! pins and addresses to be free) with the proxy it already runs, which
//! takes the journal's and DNS's pool servers in place.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use crate::control::{client, protocol::Request, protocol::Response};

/// How long the steps of a takeover may wait for the running agent.
pub const WAIT: Duration = Duration::from_secs(10);

/// Where the kernel moves requests queued on a closing listener.
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Tells the running agent on `socket` to stop softly, then waits until it
/// has let go of the socket.
pub fn stop_running(socket: &Path) -> Result<()> {
    match client::request(socket, Request::SoftStop) {
        Ok(Response::Ok) => {}
        Ok(other) => bail!(
            "the running agent on {} refused to stop: {other:?}",
            socket.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("--takeover: no agent answers on {}", socket.display()));
        }
    }
    let until = Instant::now() + WAIT;
    while socket.exists() {
        if Instant::now() > until {
            bail!(
                "the running agent did not let go of {} within {WAIT:?}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    info!("the running agent stops softly; taking over");
    Ok(())
}

/// Checks that an agent answers on `socket` before anything is started.
pub fn running_agent(socket: &Path) -> Result<()> {
    client::request(socket, Request::ShowProxy)
        .map(drop)
        .with_context(|| format!("--takeover: no agent answers on {}", socket.display()))
}

/// Turns `net.ipv4.tcp_migrate_req` on in this network namespace, so the
/// running agent's queued connections move to ours when its listeners
/// close; a kernel without it only warns.
pub fn migrate_queued_connections() {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(MIGRATE_REQ, "1") {
            Ok(()) => info!(
                "net.ipv4.tcp_migrate_req set to 1: connections queued on the running agent's listeners move to ours"
            ),
            Err(e) => warn!(
                "cannot set net.ipv4.tcp_migrate_req ({e}): connections queued on the running agent's listeners as they close are reset"
            ),
        },
        Err(e) => warn!(
            "no net.ipv4.tcp_migrate_req ({e}): connections queued on the running agent's listeners as they close are reset"
        ),
    }
}

/// Runs `step` until it succeeds, within `WAIT` when `takeover` (the
/// running agent is letting go of what it needs), else once.
pub fn when_free<T>(takeover: bool, mut step: impl FnMut() -> Result<T>) -> Result<T> {
    let until = Instant::now() + WAIT;
    loop {
        match step() {
            Err(e) if takeover && Instant::now() < until => {
                tracing::debug!("takeover: waiting for the running agent: {e:#}");
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}
