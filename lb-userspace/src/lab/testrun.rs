//! A one-namespace fixture for running the XDP program on crafted frames with
//! BPF_PROG_TEST_RUN (packet tests and the per-packet benchmark).
//!
//! It mirrors the balancer's side of the lab: interface `lbc` toward the client
//! and `lbb` toward the backends, same addresses and MACs, permanent neighbours
//! for the client and backends 1..=8, so `bpf_fib_lookup` resolves exactly as in
//! the lab. Frames are never transmitted: test runs only report the action.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

use super::netns::{NS_PREFIX, add_ns, del_ns, ip_batch, run_in_ns, sysctls_in};
use super::{backend_neighbour_commands, balancer_side_commands, mac_str};

pub use super::{BALANCER_BACKEND_MAC as LBB_MAC, BALANCER_CLIENT_MAC as LBC_MAC, CLIENT_MAC};
/// Backends that get a neighbour entry.
pub const NEIGHBOURS: usize = 8;

/// The fixture namespace; removed on drop.
pub struct TestRunNet {
    ns: String,
    /// ifindex of `lbc` inside the namespace.
    pub lbc: u32,
    /// ifindex of `lbb` inside the namespace.
    pub lbb: u32,
}

impl TestRunNet {
    /// Creates the namespace `lbl-{tag}-{pid}-trun{n}` with its two interfaces.
    pub fn create(tag: &str) -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let ns = format!("{NS_PREFIX}{tag}-{}-trun{n}", std::process::id());
        add_ns(&ns)?;
        // From here on, Drop removes the namespace whatever fails next.
        let mut net = Self { ns, lbc: 0, lbb: 0 };
        // The same addresses, MACs and neighbours as the lab's balancer; the
        // peers (`lbcp`, `lbbp`) only exist so the links can be up.
        let mut cmds = vec![
            "link add lbc type veth peer name lbcp".to_string(),
            "link add lbb type veth peer name lbbp".into(),
            format!("link set lbc address {}", mac_str(LBC_MAC)),
            format!("link set lbb address {}", mac_str(LBB_MAC)),
            "link set lbcp up".into(),
            "link set lbbp up".into(),
        ];
        cmds.extend(balancer_side_commands());
        for i in 1..=NEIGHBOURS {
            cmds.extend(backend_neighbour_commands(i));
        }
        ip_batch(&net.ns, &cmds)?;
        sysctls_in(
            &net.ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ],
        )?;
        let (lbc, lbb) = run_in_ns(&net.ns, || (ifindex("lbc"), ifindex("lbb")))?;
        net.lbc = lbc.context("ifindex of lbc")?;
        net.lbb = lbb.context("ifindex of lbb")?;
        Ok(net)
    }

    /// The namespace's name (for `run_in_ns`).
    pub fn ns(&self) -> &str {
        &self.ns
    }
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

impl Drop for TestRunNet {
    fn drop(&mut self) {
        if let Err(e) = del_ns(&self.ns) {
            eprintln!("warning: removing namespace {}: {e:#}", self.ns);
        }
    }
}
