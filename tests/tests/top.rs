//! `lb top` in a real terminal (tmux): it shows the lab's backends with
//! their states, and key presses select one and drain it.

use std::process::Command;
use std::time::Duration;

use lb_tests::{RunningLab, wait_for};
use lb_userspace::control::protocol::{AdminState, BackendInfo};
use lb_userspace::lab::{TCP_PORT, backend_v4};

/// A tmux server of its own (`-L`), killed when dropped, with `lb top` in
/// its one session.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("lbtop-{}", std::process::id()),
        };
        let out = tmux
            .cmd(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "160",
                "-y",
                "50",
                command,
            ])
            .output()
            .expect("run tmux");
        assert!(out.status.success(), "tmux: {out:?}");
        tmux
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.env("TERM", "xterm-256color")
            .args(["-L", &self.socket])
            .args(args);
        c
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend(keys);
        let out = self.cmd(&args).output().expect("tmux send-keys");
        assert!(out.status.success(), "{out:?}");
    }

    fn screen(&self) -> String {
        let out = self
            .cmd(&["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Only this test's server: its own socket.
        let _ = self.cmd(&["kill-server"]).output();
    }
}

fn admin_state(lab: &RunningLab, service: &str, address: &str) -> Option<AdminState> {
    let out = lab.lb(&["show", "backends", service, "--json"]);
    let list: Vec<BackendInfo> = serde_json::from_slice(&out.stdout).ok()?;
    list.iter()
        .find(|b| b.address.to_string() == address)
        .map(|b| b.admin)
}

/// The screen line of `address` (its first: tcp4 comes first).
fn line_of(screen: &str, address: &str) -> String {
    screen
        .lines()
        .find(|l| l.contains(address))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn lb_top_shows_backends_and_drains_the_selected_one() {
    let lab = RunningLab::start("top", 2, &[1, 1]).unwrap();
    let command = format!(
        "{} --socket {} top --interval 200ms --for 120s",
        lab.lab.options().lb_bin.display(),
        lab.socket.display()
    );
    let tmux = Tmux::start(&command);
    let be1 = format!("{}:{TCP_PORT}", backend_v4(1));
    let be2 = format!("{}:{TCP_PORT}", backend_v4(2));
    wait_for("lb top shows the backends", Duration::from_secs(15), || {
        let s = tmux.screen();
        line_of(&s, &be1).contains("ready") && line_of(&s, &be2).contains("ready")
    });
    assert!(tmux.screen().contains("tcp4"), "{}", tmux.screen());
    // The first backend is selected at start: down to the second, back up, drain.
    tmux.keys(&["j"]);
    tmux.keys(&["k"]);
    tmux.keys(&["d"]);
    wait_for("the agent drained it", Duration::from_secs(10), || {
        admin_state(&lab, "tcp4", &be1) == Some(AdminState::Drain)
    });
    wait_for("lb top shows it drained", Duration::from_secs(10), || {
        line_of(&tmux.screen(), &be1).contains("drain")
    });
    let screen = tmux.screen();
    eprintln!("{screen}");
    assert!(line_of(&screen, &be2).contains("ready"), "{screen}");
    assert_eq!(admin_state(&lab, "tcp4", &be2), Some(AdminState::Ready));
    // The selection stays on it across refreshes: enable it again.
    tmux.keys(&["e"]);
    wait_for("enabled again", Duration::from_secs(10), || {
        admin_state(&lab, "tcp4", &be1) == Some(AdminState::Ready)
    });
    tmux.keys(&["q"]);
}
