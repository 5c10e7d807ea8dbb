//! Announcing VIPs by BGP through BIRD 2, the speaker operators already run.
//!
//! The agent does not speak BGP itself. It writes one file that BIRD's
//! configuration includes, holding two static protocols (`<protocol>_v4`,
//! `<protocol>_v6`) with a `blackhole` route per announced VIP, and asks
//! BIRD to `configure` over its control socket. BIRD's BGP sessions export
//! those protocols' routes (`export where proto = "lb_vips_v4"`), with all
//! the policy (communities, MED, BFD, prefixes) in the operator's own
//! bird.conf. A reconfiguration only adds and removes the routes that
//! changed; sessions stay up. BIRD refuses a configuration it cannot parse
//! and keeps the old one, so a bad write cannot take routes down.
//!
//! A VIP address is announced while the node is not drained and at least
//! one service on it can take new flows (an l4 service with a backend that
//! is ready, not down and of weight > 0; an l7 service always, the proxy
//! answers). Backends not checked yet count as up, as in the data plane, so
//! a hitless restart announces what the previous agent did.
//!
//! Failures (socket missing, configuration refused) are logged, shown by
//! `lb show bgp`, and retried every [`RETRY`]; the agent never stops for them.

pub mod bird;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{BackendConfig, BgpConfig, Config, Mode, Service};

/// How often a failed update is tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// One VIP address and whether this node announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipAnnouncement {
    /// The VIP address (announced as a /32 or /128).
    pub vip: IpAddr,
    /// Whether it should be announced now.
    pub announced: bool,
    /// Why (e.g. "node drained", "no service has an available backend").
    pub reason: String,
    /// The services on this address.
    pub services: Vec<String>,
}

/// Every VIP address of `config` with whether it is announced: not when
/// `drained`; otherwise when one of its services takes new flows, l4
/// services through a backend for which `available` says so.
pub fn announcements(
    config: &Config,
    drained: bool,
    available: impl Fn(&Service, &BackendConfig) -> bool,
) -> Vec<VipAnnouncement> {
    let mut by_vip: BTreeMap<IpAddr, (Vec<String>, usize)> = BTreeMap::new();
    for s in &config.services {
        let live = match s.mode {
            Mode::L7 => true,
            Mode::L4 => s.backends.iter().any(|b| b.weight > 0 && available(s, b)),
        };
        let entry = by_vip.entry(s.vip.ip()).or_default();
        entry.0.push(s.name.clone());
        entry.1 += usize::from(live);
    }
    by_vip
        .into_iter()
        .map(|(vip, (services, live))| {
            let (announced, reason) = match (drained, live) {
                (true, _) => (false, "node drained".to_string()),
                (false, 0) => (false, "no service has an available backend".to_string()),
                (false, n) => (
                    true,
                    format!("{n} of {} services available", services.len()),
                ),
            };
            VipAnnouncement {
                vip,
                announced,
                reason,
                services,
            }
        })
        .collect()
}

/// The include file announcing `vips`, one static protocol per family.
pub fn render(protocol: &str, vips: &[IpAddr]) -> String {
    let mut out = String::from(
        "# Written by the lb agent on every change; do not edit.\n\
         # Included by bird.conf: export these protocols' routes to BGP peers.\n",
    );
    for (suffix, channel, v6) in [("v4", "ipv4", false), ("v6", "ipv6", true)] {
        out.push_str(&format!(
            "protocol static {protocol}_{suffix} {{\n  {channel};\n"
        ));
        for vip in vips.iter().filter(|v| v.is_ipv6() == v6) {
            let len = if v6 { 128 } else { 32 };
            out.push_str(&format!("  route {vip}/{len} blackhole;\n"));
        }
        out.push_str("}\n");
    }
    out
}

/// Mode of a new include file: BIRD may run as its own user, and it holds
/// nothing secret (the VIPs).
const INCLUDE_MODE: u32 = 0o644;

/// Writes the include file announcing `vips` (replacing it whole).
pub fn write_include(cfg: &BgpConfig, vips: &[IpAddr]) -> Result<(), String> {
    let text = render(&cfg.protocol, vips);
    crate::atomic_file::replace(&cfg.include_file, text.as_bytes(), INCLUDE_MODE)
        .map_err(|e| format!("writing {}: {e}", cfg.include_file.display()))
}

/// Makes BIRD announce exactly `vips`: writes the include file, then `configure`.
pub fn apply(cfg: &BgpConfig, vips: &[IpAddr]) -> Result<(), String> {
    write_include(cfg, vips)?;
    bird::configure(&cfg.bird_socket).map_err(|e| e.to_string())
}

/// What the speaker last did, for `lb show bgp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeakerStatus {
    /// The VIPs BIRD was last told to announce, if it ever accepted an update.
    pub in_bird: Option<Vec<IpAddr>>,
    /// When BIRD last accepted an update (seconds since the Unix epoch).
    pub last_ok: Option<u64>,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

/// What the speaker should make BIRD announce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wanted {
    /// `[bgp]` of the running configuration (`None`: announce nothing, touch nothing).
    pub config: Option<BgpConfig>,
    /// The VIPs to announce.
    pub vips: Vec<IpAddr>,
}

/// The agent's side of the speaker task: set what is wanted, read the status.
#[derive(Clone)]
pub struct Speaker {
    wanted: watch::Sender<Wanted>,
    status: Arc<Mutex<SpeakerStatus>>,
}

impl Speaker {
    /// A speaker with nothing wanted yet; `run` starts its task.
    pub fn new() -> Self {
        Self {
            wanted: watch::Sender::new(Wanted::default()),
            status: Arc::default(),
        }
    }

    /// Sets what BIRD should announce (applied by the task, in order, latest wins).
    pub fn want(&self, wanted: Wanted) {
        self.wanted.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
    }

    /// What was last asked.
    pub fn wanted(&self) -> Wanted {
        self.wanted.borrow().clone()
    }

    /// What the task last did.
    pub fn status(&self) -> SpeakerStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies every change of what is wanted, retrying failures every
    /// [`RETRY`], until the task is aborted.
    pub async fn run(self) {
        let mut rx = self.wanted.subscribe();
        // The include file BIRD was last given, to withdraw from if `[bgp]` changes.
        let mut current: Option<BgpConfig> = None;
        loop {
            let wanted = rx.borrow_and_update().clone();
            if let Some(old) = current
                .as_ref()
                .filter(|c| Some(*c) != wanted.config.as_ref())
            {
                // `[bgp]` changed or went away: what the old file announced goes.
                let old = old.clone();
                match tokio::task::spawn_blocking(move || apply(&old, &[])).await {
                    Ok(Ok(())) => info!("withdrew the VIPs of the previous [bgp] settings"),
                    Ok(Err(e)) => warn!("withdrawing under the previous [bgp] settings: {e}"),
                    Err(e) => warn!("withdrawing under the previous [bgp] settings: {e}"),
                }
                current = None;
            }
            let failed = match wanted.config.clone() {
                None => false,
                Some(cfg) => {
                    let vips = wanted.vips.clone();
                    let result = {
                        let (cfg, vips) = (cfg.clone(), vips.clone());
                        tokio::task::spawn_blocking(move || apply(&cfg, &vips))
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()))
                    };
                    current = Some(cfg);
                    self.record(&vips, result)
                }
            };
            if failed {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(RETRY) => {}
                }
            } else if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Records an attempt's outcome; true if it failed.
    fn record(&self, vips: &[IpAddr], result: Result<(), String>) -> bool {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                if status.in_bird.as_deref() != Some(vips) || status.last_error.is_some() {
                    info!(vips = ?vips, "BIRD announces the VIPs");
                }
                status.in_bird = Some(vips.to_vec());
                status.last_ok = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                status.last_error = None;
                false
            }
            Err(e) => {
                if status.last_error.as_ref() != Some(&e) {
                    warn!("updating BIRD failed, retrying every {RETRY:?}: {e}");
                }
                status.last_error = Some(e);
                true
            }
        }
    }
}

impl Default for Speaker {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn config(text: &str) -> Config {
        config::parse(text, "lb.toml").unwrap()
    }

    const TWO_SERVICES: &str = r#"
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
[[service.backend]]
address = "198.18.2.11:8080"
[[service.backend]]
address = "198.18.2.12:8080"
weight = 0
[[service]]
name = "dns"
vip = "198.18.100.1:53"
protocol = "udp"
[[service.backend]]
address = "198.18.2.11:53"
[[service]]
name = "web6"
vip = "[fd00:18:100::1]:80"
[[service.backend]]
address = "[fd00:18:2::11]:8080"
[[service]]
name = "proxy"
vip = "198.18.100.2:443"
mode = "l7"
"#;

    #[test]
    fn a_vip_is_announced_while_one_of_its_services_has_a_backend() {
        let c = config(TWO_SERVICES);
        let all = announcements(&c, false, |_, _| true);
        let vips: Vec<_> = all
            .iter()
            .map(|a| (a.vip.to_string(), a.announced))
            .collect();
        assert_eq!(
            vips,
            [
                ("198.18.100.1".to_string(), true),
                ("198.18.100.2".to_string(), true),
                ("fd00:18:100::1".to_string(), true)
            ]
        );
        assert_eq!(all[0].services, ["web", "dns"]);
        // web's only weighted backend down: dns still holds the address.
        let one_down = announcements(&c, false, |s, b| {
            !(s.name == "web" && b.address.port() == 8080 && b.address.ip().is_ipv4())
        });
        assert!(one_down[0].announced);
        assert_eq!(one_down[0].reason, "1 of 2 services available");
        // Everything down: l4 VIPs go, the l7 one (the proxy answers) stays.
        let down = announcements(&c, false, |_, _| false);
        assert!(!down[0].announced);
        assert_eq!(down[0].reason, "no service has an available backend");
        assert!(down[1].announced);
        assert!(!down[2].announced);
        // A weight-0 backend does not count even if up.
        let only_zero = announcements(&c, false, |_, b| b.weight == 0);
        assert!(!only_zero[0].announced);
        // Drained: nothing.
        let drained = announcements(&c, true, |_, _| true);
        assert!(
            drained
                .iter()
                .all(|a| !a.announced && a.reason == "node drained")
        );
    }

    #[test]
    fn the_include_file_has_both_protocols_even_when_empty() {
        let vips: Vec<IpAddr> = vec![
            "198.18.100.1".parse().unwrap(),
            "fd00:18:100::1".parse().unwrap(),
        ];
        let text = render("lb_vips", &vips);
        assert!(text.contains(
            "protocol static lb_vips_v4 {\n  ipv4;\n  route 198.18.100.1/32 blackhole;\n}\n"
        ));
        assert!(text.contains(
            "protocol static lb_vips_v6 {\n  ipv6;\n  route fd00:18:100::1/128 blackhole;\n}\n"
        ));
        let empty = render("x", &[]);
        assert!(empty.contains("protocol static x_v4 {\n  ipv4;\n}\n"));
        assert!(empty.contains("protocol static x_v6 {\n  ipv6;\n}\n"));
    }

    #[test]
    fn an_unreachable_bird_is_an_error_the_status_keeps() {
        let dir = std::env::temp_dir().join(format!("lb-bgp-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = BgpConfig {
            bird_socket: dir.join("missing.ctl"),
            include_file: dir.join("vips.conf"),
            protocol: "lb_vips".into(),
            line: 1,
        };
        let vips: Vec<IpAddr> = vec!["198.18.100.1".parse().unwrap()];
        let err = apply(&cfg, &vips).unwrap_err();
        assert!(err.contains("cannot connect to BIRD"), "{err}");
        // The file is written anyway: BIRD reads it whenever it (re)starts.
        assert!(
            std::fs::read_to_string(&cfg.include_file)
                .unwrap()
                .contains("198.18.100.1/32")
        );
        let speaker = Speaker::new();
        assert!(speaker.record(&vips, Err(err.clone())));
        assert_eq!(speaker.status().last_error, Some(err));
        assert!(!speaker.record(&vips, Ok(())));
        assert_eq!(speaker.status().in_bird, Some(vips));
        assert_eq!(speaker.status().last_error, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
