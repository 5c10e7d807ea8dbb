//! `cargo xtask test`: the full check pipeline, stopping at the first failure.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::build::{self, Targets};
use crate::exec;
use crate::paths::{Profile, Workspace};

const STAGES: usize = 5;

fn banner(n: usize, what: &str) {
    println!("==> xtask test [{n}/{STAGES}] {what}");
}

/// Runs one stage's commands in order, naming the stage if one fails.
fn stage(n: usize, what: &str, cmds: &mut [Command]) -> Result<()> {
    banner(n, what);
    for cmd in cmds {
        exec::run(cmd)
            .with_context(|| format!("xtask test: stage {n}/{STAGES} ({what}) failed"))?;
    }
    Ok(())
}

/// `cargo test` arguments after `--`: fixed ones, then the user's extras.
pub fn test_harness_args(fixed: &[&str], extra: &[String]) -> Vec<String> {
    let mut args = vec!["--".to_string()];
    args.extend(fixed.iter().map(|s| s.to_string()));
    args.extend(extra.iter().cloned());
    // A bare `--` with nothing after it is harmless, but keep the command tidy.
    if args.len() == 1 { Vec::new() } else { args }
}

fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    format!("{}m{:02}s", secs / 60, secs % 60)
}

/// Builds (debug), then runs formatting, lints, unit tests and end-to-end tests.
pub fn run(ws: &Workspace, extra: &[String]) -> Result<()> {
    let start = Instant::now();
    let result = run_stages(ws, extra);
    println!(
        "xtask test: total time {}",
        format_duration(start.elapsed())
    );
    result?;
    println!("xtask test: all stages passed");
    Ok(())
}

fn run_stages(ws: &Workspace, extra: &[String]) -> Result<()> {
    let profile = Profile::Debug;
    let cargo = |args: &[&str]| {
        let mut cmd = build::host_cargo(ws, profile);
        cmd.args(args);
        cmd
    };

    println!("==> xtask test: building eBPF objects and the workspace (debug)");
    build::all(ws, profile, Targets::All)?;

    // rustfmt needs no matching compiler, so the excluded eBPF crate is checked here too.
    let mut ebpf_fmt = cargo(&["fmt", "--all", "--check", "--manifest-path"]);
    ebpf_fmt.arg(ws.ebpf_crate().join("Cargo.toml"));
    stage(
        1,
        "cargo fmt --all -- --check (workspace and lb-ebpf)",
        &mut [cargo(&["fmt", "--all", "--", "--check"]), ebpf_fmt],
    )?;

    // No module cycle in the userspace crates (see xtask/modcycles.py).
    let cycles = |src: &str| {
        let mut cmd = Command::new("python3");
        cmd.arg(ws.root.join("xtask/modcycles.py"))
            .arg(ws.root.join(src));
        cmd
    };
    stage(
        2,
        "cargo clippy --workspace --all-targets -- -D warnings; no module cycle",
        &mut [
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            cycles("lb-userspace/src"),
            cycles("lb-userspace/proxy/src"),
        ],
    )?;

    let what = "clippy of lb-ebpf (--release --target bpfel-unknown-none -- -D warnings)";
    match build::ebpf_clippy(ws) {
        Ok(cmd) => stage(3, what, &mut [cmd])?,
        Err(why) => {
            banner(3, what);
            println!("    skipped: {why}");
        }
    }

    let mut unit = cargo(&["test", "--workspace", "--exclude", "lb-tests"]);
    unit.args(test_harness_args(&[], extra));
    stage(4, "cargo test --workspace --exclude lb-tests", &mut [unit])?;

    // One test at a time: namespace tests are heavy and the machine has 2 cores.
    let mut e2e = cargo(&["test", "-p", "lb-tests"]);
    e2e.args(test_harness_args(&["--test-threads=1"], extra));
    stage(5, "cargo test -p lb-tests -- --test-threads=1", &mut [e2e])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_args_append_extras() {
        let extra = vec!["--nocapture".to_string(), "maglev".to_string()];
        assert_eq!(
            test_harness_args(&["--test-threads=1"], &extra),
            vec!["--", "--test-threads=1", "--nocapture", "maglev"]
        );
        assert_eq!(
            test_harness_args(&[], &extra),
            vec!["--", "--nocapture", "maglev"]
        );
        assert!(test_harness_args(&[], &[]).is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(Duration::from_secs(0)), "0m00s");
        assert_eq!(format_duration(Duration::from_secs(192)), "3m12s");
    }
}
