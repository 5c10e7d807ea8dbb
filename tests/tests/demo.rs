//! The demo's scenario end to end: the lab and `lb.toml` exactly as `lb demo`
//! builds them (`demo::prepare`), the agent started as the demo starts it,
//! and the L7 and UDP commands the demo prints (`demo::try_commands`) run as
//! printed, by `sh`, from the client namespace.

use std::collections::BTreeSet;
use std::process::Command;

use lb_userspace::demo::{self, TryCommand};
use lb_userspace::lab::{Lab, LabOptions};

/// Runs a printed command; its standard output, lines trimmed.
fn run(c: &TryCommand) -> Vec<String> {
    let out = lb_tests::output_within(
        Command::new("sh").arg("-c").arg(&c.shell),
        std::time::Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "{} failed: {}",
        c.shell,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn the_demo_l7_and_udp_commands_answer_as_printed() {
    let mut lab = Lab::create("demot", LabOptions::from_env(3).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-demo", lab.balancer_ns()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = demo::prepare(&lab, &dir).unwrap();
    demo::start_agent(&mut lab, &config, &dir.join("lb.sock")).unwrap();
    let commands = demo::try_commands(&lab);
    assert_eq!(commands.len(), 5);

    // HTTPS over HTTP/2 to pool web (be2, be3), balanced over both.
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let out = run(&commands[0]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(["be2", "be3"].contains(&out[0].as_str()), "{out:?}");
        assert_eq!(out[1], "2", "HTTP version: {out:?}");
        seen.insert(out[0].clone());
    }
    assert_eq!(seen.len(), 2, "web pool answers: {seen:?}");
    // /api/ to pool api (be1).
    for _ in 0..3 {
        assert_eq!(run(&commands[1]), ["be1"]);
    }
    // /admin denied.
    assert_eq!(run(&commands[2]), ["403"]);
    // UDP through XDP to a backend.
    let out = run(&commands[3]);
    assert!(
        out.len() == 1 && ["be1", "be2", "be3"].contains(&out[0].as_str()),
        "{out:?}"
    );
    // Both pings answered, from XDP.
    assert_eq!(run(&commands[4]), ["2"]);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
