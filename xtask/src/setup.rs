//! Toolchain checks and installs: Debian packages, bpf-linker, bpffs.
//!
//! Each check is cheap so that every command can run setup first; only missing
//! pieces are installed, each announced with a single line.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::exec;
use crate::paths;

/// Debian packages the build, tests and demo need.
pub const PACKAGES: &[&str] = &[
    // rustc 1.96 (LLVM 22) at /usr/bin/rustc: builds the eBPF crate.
    "rustc-web",
    // Prebuilt core for bpfel-unknown-none, so no build-std (and no rustup download).
    "libstd-rust-web-dev-bpf",
    // clippy-driver matching /usr/bin/rustc, for linting the eBPF crate.
    "rust-web-clippy",
    // bpf-linker links against the same LLVM major version as rustc-web.
    "llvm-22-dev",
    // Runtime tools used by the tests and the demo.
    "iproute2",
    "nftables",
    "curl",
    // `ping` of a VIP, answered from XDP (tests/tests/e2e.rs).
    "iputils-ping",
    // The lab turns off veth TX checksum offload (see lab::netns::full_tx_checksums).
    "ethtool",
    "bpftool",
    // BGP speaker of the cluster lab's router and balancer nodes (`bird`, `birdc`).
    "bird2",
    // xtask/modcycles.py, the module-cycle check of `cargo xtask test`.
    "python3",
    // `cargo xtask bench` compares the L7 proxy with HAProxy, loaded by wrk,
    // and counts both proxies' instructions per request with callgrind;
    // nginx is its third column (`lb-bench l7`).
    "haproxy",
    "nginx-light",
    // nginx's stream module: its column of the L7 bench's TCP relay row.
    "libnginx-mod-stream",
    "wrk",
    // `openssl s_client`: the L7 bench checks that the proxies negotiate the
    // same TLS version.
    "openssl",
    "valgrind",
    // h2load: the HTTP/2 row of `lb-bench l7instr`.
    "nghttp2-client",
    // The DNS server (knotd, knotc) serving SRV and A records to the
    // discovery tests (tests/tests/discovery.rs).
    "knot",
    // The admin stats page loaded, screenshotted and clicked in a headless
    // browser over WebDriver (tests/tests/admin.rs).
    "chromium",
    "chromium-driver",
    // `lb top` driven by key presses and read back (tests/tests/top.rs).
    "tmux",
    // The syslog daemon the access log is sent to over TCP (tests/tests/proxy_only.rs).
    "rsyslog",
    // What outside audits run against the proxy (tests/tests/audit.rs).
    "testssl.sh",
    "slowhttptest",
];

/// LLVM installation bpf-linker is built against.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Version range of bpf-linker known to build with LLVM 22 and rustc 1.95.
const BPF_LINKER_VERSION: &str = "^0.13";
/// Where bpffs must be mounted for pinning.
const BPFFS: &str = "/sys/fs/bpf";

/// What is missing from this machine.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    /// Debian packages not installed.
    pub packages: Vec<String>,
    /// bpf-linker not found or not runnable.
    pub bpf_linker: bool,
    /// bpffs not mounted at /sys/fs/bpf.
    pub bpffs: bool,
}

impl Missing {
    /// True when nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.packages.is_empty() && !self.bpf_linker && !self.bpffs
    }
}

/// Checks everything and installs what is missing; prints nothing when all is present.
pub fn ensure() -> Result<()> {
    let missing = detect();
    if missing.is_empty() {
        return Ok(());
    }
    if let Some(reason) = cannot_install_reason() {
        bail!(
            "setup: cannot install the missing tools automatically ({reason}); \
             run these commands by hand, then retry:\n{}",
            manual_commands(&missing)
                .iter()
                .map(|c| format!("  {c}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    if !missing.packages.is_empty() {
        install_packages(&missing.packages)?;
    }
    if missing.bpf_linker {
        install_bpf_linker()?;
    }
    if missing.bpffs {
        mount_bpffs()?;
    }
    Ok(())
}

/// Finds what is missing, without changing anything.
pub fn detect() -> Missing {
    Missing {
        packages: missing_packages(PACKAGES),
        bpf_linker: find_bpf_linker().is_none(),
        bpffs: !fs::read_to_string("/proc/mounts")
            .map(|m| bpffs_mounted(&m, BPFFS))
            .unwrap_or(false),
    }
}

/// Why automatic installation is impossible here, if it is.
fn cannot_install_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root");
    }
    if !Path::new("/etc/debian_version").exists() || paths::which("apt-get").is_none() {
        return Some("not a Debian system with apt-get");
    }
    None
}

/// Packages from `wanted` that dpkg does not report as installed.
fn missing_packages(wanted: &[&str]) -> Vec<String> {
    // One dpkg-query call for all packages keeps the no-op path fast; it exits
    // non-zero when some package is unknown, so only its stdout matters.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package}\t${Status}\n")
        .args(wanted)
        .stderr(Stdio::null())
        .output();
    let installed = match out {
        Ok(out) => installed_packages(&String::from_utf8_lossy(&out.stdout)),
        // No dpkg at all: everything counts as missing.
        Err(_) => HashSet::new(),
    };
    wanted
        .iter()
        .filter(|p| !installed.contains(**p))
        .map(|p| p.to_string())
        .collect()
}

/// Parses `dpkg-query -W -f='${Package}\t${Status}\n'` output into installed package names.
pub fn installed_packages(dpkg_output: &str) -> HashSet<String> {
    dpkg_output
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| status.contains("install ok installed"))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// True if `/proc/mounts` text has a bpf filesystem mounted at `at`.
pub fn bpffs_mounted(proc_mounts: &str, at: &str) -> bool {
    proc_mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(at) && fields.next() == Some("bpf")
    })
}

/// A runnable bpf-linker: cargo's bin directory first, then PATH.
pub fn find_bpf_linker() -> Option<PathBuf> {
    let candidates = [
        Some(paths::cargo_bin().join("bpf-linker")),
        paths::which("bpf-linker"),
    ];
    candidates.into_iter().flatten().find(|linker| {
        Command::new(linker)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn install_packages(packages: &[String]) -> Result<()> {
    println!("setup: installing Debian packages: {}", packages.join(" "));
    // The package lists may be missing or stale on a new machine.
    exec::run(Command::new("apt-get").args(["-q", "update"]))?;
    exec::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(packages),
    )
}

fn install_bpf_linker() -> Result<()> {
    println!("setup: building bpf-linker for LLVM 22 (about a minute)");
    exec::run(
        Command::new(paths::cargo())
            .args(bpf_linker_install_args())
            // llvm-sys finds llvm-config on PATH and needs the prefix to link -lLLVM.
            .env(
                "PATH",
                paths::path_with_first(&Path::new(LLVM_PREFIX).join("bin")),
            )
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )
}

/// Arguments for `cargo install` of bpf-linker.
fn bpf_linker_install_args() -> Vec<&'static str> {
    vec![
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
        // Reinstall over a present-but-broken binary instead of "already installed".
        "--force",
    ]
}

fn mount_bpffs() -> Result<()> {
    println!("setup: mounting bpffs at {BPFFS}");
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    exec::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// The commands a user without root (or without apt) should run by hand.
pub fn manual_commands(missing: &Missing) -> Vec<String> {
    let mut cmds = Vec::new();
    if !missing.packages.is_empty() {
        cmds.push("sudo apt-get update".to_string());
        cmds.push(format!(
            "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
            missing.packages.join(" ")
        ));
    }
    if missing.bpf_linker {
        // No sudo: cargo install must write to the invoking user's cargo home.
        cmds.push(format!(
            "PATH={LLVM_PREFIX}/bin:$PATH LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo {}",
            bpf_linker_install_args().join(" ")
        ));
    }
    if missing.bpffs {
        cmds.push(format!("sudo mount -t bpf bpf {BPFFS}"));
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dpkg_status() {
        let out = "rustc-web\tinstall ok installed\n\
                   curl\tdeinstall ok config-files\n\
                   bpftool\tinstall ok unpacked\n\
                   llvm-22-dev\tinstall ok installed\n\
                   garbage line\n";
        let got = installed_packages(out);
        assert!(got.contains("rustc-web"));
        assert!(got.contains("llvm-22-dev"));
        assert!(
            !got.contains("curl"),
            "removed but config kept is not installed"
        );
        assert!(!got.contains("bpftool"), "unpacked is not installed");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn unknown_packages_are_missing() {
        let missing = missing_packages(&["definitely-not-a-package-xtask"]);
        assert_eq!(missing, vec!["definitely-not-a-package-xtask".to_string()]);
    }

    #[test]
    fn finds_bpffs_in_proc_mounts() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0\n\
                      bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n";
        assert!(bpffs_mounted(mounts, "/sys/fs/bpf"));
        let other = "sysfs /sys sysfs rw 0 0\nnone /sys/fs/bpf tmpfs rw 0 0\n\
                     bpf /mnt/bpf bpf rw 0 0\n";
        assert!(!bpffs_mounted(other, "/sys/fs/bpf"));
        assert!(!bpffs_mounted("", "/sys/fs/bpf"));
    }

    #[test]
    fn manual_commands_cover_only_what_is_missing() {
        assert!(manual_commands(&Missing::default()).is_empty());
        let all = Missing {
            packages: vec!["rustc-web".into(), "llvm-22-dev".into()],
            bpf_linker: true,
            bpffs: true,
        };
        assert_eq!(
            manual_commands(&all),
            vec![
                "sudo apt-get update",
                "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y \
                 --no-install-recommends rustc-web llvm-22-dev",
                "PATH=/usr/lib/llvm-22/bin:$PATH LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
                 cargo install bpf-linker --version ^0.13 --no-default-features \
                 --features llvm-22 --force",
                "sudo mount -t bpf bpf /sys/fs/bpf",
            ]
        );
        let only_mount = Missing {
            bpffs: true,
            ..Missing::default()
        };
        assert_eq!(
            manual_commands(&only_mount),
            vec!["sudo mount -t bpf bpf /sys/fs/bpf"]
        );
    }
}
