//! BGP announcements through a real BIRD 2, on one node: the agent in the
//! lab's balancer namespace writes its include file and drives BIRD over
//! its control socket; what BIRD holds is read back with `birdc`. (Several
//! nodes behind an ECMP router are `cluster.rs`.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lb_tests::RunningLab;
use lb_tests::wait_for;
use lb_userspace::bgp::VipAnnouncement;
use lb_userspace::control::protocol::BgpInfo;
use lb_userspace::lab::{VIP_V4, VIP_V6};

const HEALTH: &str =
    "kind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1";
const V4_ROUTE: &str = "198.18.100.1/32";
const V6_ROUTE: &str = "fd00:18:100::1/128";
/// Longer than a health check's fall plus the speaker's retry.
const SETTLE: Duration = Duration::from_secs(10);

struct Bird {
    socket: PathBuf,
    config: PathBuf,
    pid: Option<u32>,
}

impl Bird {
    fn new(dir: &Path, include: &Path) -> Self {
        let config = dir.join("bird.conf");
        std::fs::write(
            &config,
            format!(
                "router id 198.18.2.1;\nprotocol device {{}}\ninclude \"{}\";\n",
                include.display()
            ),
        )
        .unwrap();
        Bird {
            socket: dir.join("bird.ctl"),
            config,
            pid: None,
        }
    }

    fn start(&mut self, lab: &mut RunningLab) {
        let ns = lab.lab.balancer_ns().to_string();
        let args = [
            "-f".into(),
            "-c".into(),
            self.config.clone().into_os_string(),
            "-s".into(),
            self.socket.clone().into_os_string(),
        ];
        self.pid = Some(
            lab.lab
                .spawn_in_ns(&ns, Path::new("/usr/sbin/bird"), &args)
                .unwrap(),
        );
        wait_for("BIRD's control socket", SETTLE, || {
            self.birdc(&["show", "status"]).is_some()
        });
    }

    fn stop(&mut self, lab: &mut RunningLab) {
        if let Some(pid) = self.pid.take() {
            lab.lab.stop(pid).unwrap();
        }
    }

    /// `birdc` output, or `None` if BIRD does not answer.
    fn birdc(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The routes BIRD holds from the agent's static protocols.
    fn routes(&self) -> String {
        let v4 = self
            .birdc(&["show", "route", "protocol", "lb_vips_v4"])
            .unwrap_or_default();
        let v6 = self
            .birdc(&["show", "route", "protocol", "lb_vips_v6"])
            .unwrap_or_default();
        v4 + &v6
    }
}

fn show_bgp(lab: &RunningLab) -> BgpInfo {
    let out = lab.lb(&["show", "bgp", "--json"]);
    assert!(out.status.success(), "lb show bgp failed");
    serde_json::from_slice(&out.stdout).expect("show bgp --json parses")
}

fn vip(info: &BgpInfo, addr: std::net::IpAddr) -> VipAnnouncement {
    info.vips
        .iter()
        .find(|v| v.vip == addr)
        .cloned()
        .unwrap_or_else(|| panic!("{addr} not in {info:?}"))
}

fn routes_are(bird: &Bird, v4: bool, v6: bool) -> bool {
    let r = bird.routes();
    r.contains(V4_ROUTE) == v4 && r.contains(V6_ROUTE) == v6
}

#[test]
fn vips_follow_backends_drain_and_restarts_in_bird() {
    let mut bird: Option<Bird> = None;
    let mut lab = RunningLab::start_custom("bgp", 2, &[1, 1], Some(HEALTH), |_, dir| {
        let include = dir.join("lb-vips.conf");
        bird = Some(Bird::new(dir, &include));
        Ok(format!(
            "\n[bgp]\nbird_socket = \"{}\"\ninclude_file = \"{}\"\n",
            dir.join("bird.ctl").display(),
            include.display()
        ))
    })
    .unwrap();
    let mut bird = bird.unwrap();
    let include = lab.config_path.with_file_name("lb-vips.conf");

    // BIRD is not running yet: the agent says so and keeps going; the file
    // is written anyway, so BIRD can start from it.
    wait_for("the include file", SETTLE, || include.exists());
    let info = show_bgp(&lab);
    assert!(info.enabled);
    assert!(
        info.bird_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot connect")),
        "{info:?}"
    );
    assert!(info.speaker.last_error.is_some(), "{info:?}");

    bird.start(&mut lab);
    wait_for("both VIPs in BIRD", SETTLE, || {
        routes_are(&bird, true, true)
    });
    // BIRD read the file when it started; the agent's next retry succeeds.
    wait_for("the agent's retry", SETTLE, || {
        show_bgp(&lab).speaker.last_error.is_none()
    });
    let info = show_bgp(&lab);
    assert!(vip(&info, VIP_V4.into()).announced);
    assert!(
        info.protocols
            .iter()
            .any(|p| p.name == "lb_vips_v4" && p.state == "up"),
        "{info:?}"
    );
    let table = String::from_utf8(lab.lb(&["show", "bgp"]).stdout).unwrap();
    assert!(
        table.contains("announced") && table.contains("lb_vips_v6"),
        "{table}"
    );

    // Drain: everything goes; undrain: it comes back.
    assert!(lab.lb(&["drain-node"]).status.success());
    wait_for("withdrawal on drain", SETTLE, || {
        routes_are(&bird, false, false)
    });
    let info = show_bgp(&lab);
    assert!(info.drained);
    assert_eq!(vip(&info, VIP_V6.into()).reason, "node drained");
    assert!(lab.lb(&["undrain-node"]).status.success());
    wait_for("announcement on undrain", SETTLE, || {
        routes_are(&bird, true, true)
    });

    // Every backend down: the IPv6 VIP (l4 services only) goes; the IPv4
    // VIP stays, its l7 service is answered by the proxy.
    for i in 1..=2 {
        lab.lab.stop_backend_server(i).unwrap();
    }
    wait_for("withdrawal of the IPv6 VIP", SETTLE, || {
        routes_are(&bird, true, false)
    });
    let info = show_bgp(&lab);
    assert_eq!(
        vip(&info, VIP_V6.into()).reason,
        "no service has an available backend"
    );
    lab.lab.start_backend_server(1).unwrap();
    wait_for("the IPv6 VIP back", SETTLE, || {
        routes_are(&bird, true, true)
    });

    // Drained state survives a hitless restart, and the restart itself
    // withdraws nothing.
    assert!(lab.lb(&["drain-node"]).status.success());
    wait_for("withdrawal on drain", SETTLE, || {
        routes_are(&bird, false, false)
    });
    assert!(lab.lb(&["undrain-node"]).status.success());
    wait_for("announcement", SETTLE, || routes_are(&bird, true, true));
    lab.lab.stop(lab.agent).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        routes_are(&bird, true, true),
        "a plain stop withdrew: {}",
        bird.routes()
    );
    lab.agent =
        lb_userspace::demo::start_agent(&mut lab.lab, &lab.config_path, &lab.socket).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        routes_are(&bird, true, true),
        "the restart withdrew: {}",
        bird.routes()
    );

    // BIRD goes away and comes back: the agent retries and catches up.
    // Meanwhile `drain-node` says BIRD did not take it (exit 1), rather
    // than succeed while BIRD goes on announcing.
    bird.stop(&mut lab);
    let drained = lab.lb(&["drain-node"]);
    assert!(!drained.status.success());
    let said = String::from_utf8_lossy(&drained.stderr);
    assert!(said.contains("BIRD has not taken it"), "{said}");
    wait_for("the failure reported", SETTLE, || {
        show_bgp(&lab).speaker.last_error.is_some()
    });
    bird.start(&mut lab);
    wait_for("the drain applied after BIRD's return", SETTLE, || {
        routes_are(&bird, false, false) && show_bgp(&lab).speaker.last_error.is_none()
    });
    assert!(lab.lb(&["undrain-node"]).status.success());
    wait_for("announcement", SETTLE, || routes_are(&bird, true, true));

    // `lb stop --detach` withdraws before it goes.
    assert!(lab.lb(&["stop", "--detach"]).status.success());
    wait_for("the agent to exit", SETTLE, || {
        lab.lab.try_wait(lab.agent).unwrap().is_some()
    });
    assert!(routes_are(&bird, false, false), "{}", bird.routes());
    let text = std::fs::read_to_string(&include).unwrap();
    assert!(!text.contains("route "), "{text}");
    bird.stop(&mut lab);
}
