//! The `lb` binary's configuration handling, as an operator meets it.

use std::path::PathBuf;
use std::process::Command;

fn lb() -> Command {
    let bin = std::env::var_os("LB_BIN").expect("LB_BIN is not set; run via `cargo xtask test`");
    Command::new(bin)
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
[[service.backend]]
address = "198.18.2.11:8080"
"#;

const BAD: &str = r#"interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
ring_size = 1000
[[service.backend]]
address = "[fd00:18:2::11]:8080"
[[service.backend]]
address = "198.18.2.12:8080"
weight = 70000
"#;

#[test]
fn check_accepts_a_good_file() {
    let path = write("good.toml", GOOD);
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("OK (1 services, 1 backends)"), "{stdout}");
}

#[test]
fn check_reports_every_error_with_file_line_and_reason() {
    let path = write("bad.toml", BAD);
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    for (line, reason) in [
        (5, "not a prime"),
        (7, "NAT does not translate"),
        (10, "out of range"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("{file}:{line}:")) && l.contains(reason)),
            "no error at line {line} mentioning {reason:?} in:\n{stderr}"
        );
    }
}

#[test]
fn run_refuses_a_bad_file_before_touching_the_kernel() {
    let path = write("bad-run.toml", BAD);
    let out = lb().arg("run").arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid configuration"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:5:", path.display())),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_syntax_error_with_its_line() {
    let path = write(
        "syntax.toml",
        "interfaces = [\"eth0\"]\n[[service]\nname = 1\n",
    );
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2:", path.display())),
        "{stderr}"
    );
}
