//! Project tasks, run as `cargo xtask <command>`: setup, build, run, test, bench.
// Functions stay short enough to read at once (threshold in clippy.toml);
// tests, which read as one scenario each, are exempt.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod build;
mod exec;
mod paths;
mod setup;
mod stages;

use anyhow::{Result, ensure};
use clap::{Parser, Subcommand};

use crate::build::Targets;
use crate::paths::{Profile, Workspace};

/// Project tasks for the XDP load balancer.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check and install the toolchain (Debian packages, bpf-linker, bpffs).
    Setup,
    /// Build the eBPF objects and the whole workspace (all targets).
    Build {
        /// Build the host crates in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `lb ARGS...` (`lb demo` without ARGS).
    Run {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
        /// Arguments for `lb`; a leading `--config` means `run --config`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run fmt, clippy (host and eBPF), unit and end-to-end tests.
    Test {
        /// Extra arguments for both test harnesses (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        extra: Vec<String>,
    },
    /// Build in release mode, then run `lb-bench` (all sections, or those named:
    /// xdp, rates, l4, l4live (l4's live XDP cost only), tables, control, l7, l7instr, l7mem, cluster).
    Bench {
        /// Sections to run; all when empty.
        sections: Vec<String>,
    },
}

/// The `lb` arguments for `cargo xtask run ARGS`.
fn lb_args(args: Vec<String>) -> Vec<String> {
    match args.first() {
        // The self-contained namespace demo is the friendliest default.
        None => vec!["demo".to_string()],
        // `lb --config FILE` reads naturally; the CLI spells it `lb run --config FILE`.
        Some(first) if first.starts_with("--config") => {
            std::iter::once("run".to_string()).chain(args).collect()
        }
        Some(_) => args,
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // Print the cause chain on one screen, without anyhow's RUST_BACKTRACE dump.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let ws = Workspace::locate();
    setup::ensure()?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::Build { release } => build::all(&ws, Profile::from_release(release), Targets::All),
        Cmd::Run { release, args } => {
            let profile = Profile::from_release(release);
            build::all(&ws, profile, Targets::Bins)?;
            let mut cmd = std::process::Command::new(ws.bin(profile, "lb"));
            cmd.args(lb_args(args));
            ws.set_artifact_env(&mut cmd, profile);
            std::process::exit(exec::run_foreground(&mut cmd)?);
        }
        Cmd::Test { extra } => stages::run(&ws, &extra),
        Cmd::Bench { sections } => {
            let profile = Profile::Release;
            build::all(&ws, profile, Targets::Bins)?;
            exec::run(build::host_cargo(&ws, profile).args([
                "build",
                "--release",
                "-p",
                "lb-tests",
                "--bins",
            ]))?;
            let bench = ws.bin(profile, "lb-bench");
            ensure!(bench.is_file(), "{} was not built", bench.display());
            let mut cmd = std::process::Command::new(bench);
            cmd.args(sections);
            ws.set_artifact_env(&mut cmd, profile);
            std::process::exit(exec::run_foreground(&mut cmd)?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_args_translation() {
        assert_eq!(lb_args(vec![]), strings(&["demo"]));
        assert_eq!(
            lb_args(strings(&["--config", "lb.toml"])),
            strings(&["run", "--config", "lb.toml"])
        );
        assert_eq!(
            lb_args(strings(&["--config=lb.toml"])),
            strings(&["run", "--config=lb.toml"])
        );
        assert_eq!(
            lb_args(strings(&["run", "--config", "x"])),
            strings(&["run", "--config", "x"])
        );
        assert_eq!(lb_args(strings(&["status"])), strings(&["status"]));
    }

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    #[test]
    fn cli_parsing() {
        match parse(&["run", "--release", "--", "--config", "f.toml"]) {
            Cmd::Run { release, args } => {
                assert!(release);
                assert_eq!(args, strings(&["--config", "f.toml"]));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["run"]) {
            Cmd::Run { release, args } => assert!(!release && args.is_empty()),
            other => panic!("{other:?}"),
        }
        match parse(&["run", "demo", "--verbose"]) {
            Cmd::Run { args, .. } => assert_eq!(args, strings(&["demo", "--verbose"])),
            other => panic!("{other:?}"),
        }
        match parse(&["test", "--", "--nocapture", "maglev"]) {
            Cmd::Test { extra } => assert_eq!(extra, strings(&["--nocapture", "maglev"])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["build", "--release"]),
            Cmd::Build { release: true }
        ));
        assert!(matches!(parse(&["setup"]), Cmd::Setup));
        assert!(matches!(parse(&["bench"]), Cmd::Bench { sections } if sections.is_empty()));
        assert!(matches!(parse(&["bench", "l7"]), Cmd::Bench { sections } if sections == ["l7"]));
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
