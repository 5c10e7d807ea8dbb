//! Builds: the eBPF objects (Debian's rustc + bpf-linker) and the host workspace.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::exec;
use crate::paths::{self, Profile, Workspace};

/// Debian's compiler: it has prebuilt `core` for the BPF targets (rustup's has not).
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// Debian's clippy matching [`DEBIAN_RUSTC`] (package rust-web-clippy).
const DEBIAN_CARGO_CLIPPY: &str = "/usr/bin/cargo-clippy";
const DEBIAN_CLIPPY_DRIVER: &str = "/usr/bin/clippy-driver";
/// The eBPF target.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Which host targets to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Binaries only (enough to run).
    Bins,
    /// Everything, including tests, so later test runs only link.
    All,
}

/// Rustflags for the eBPF build, joined by 0x1f as `CARGO_ENCODED_RUSTFLAGS` wants.
pub fn encoded_rustflags(host_arch: &str) -> String {
    [
        // aya-ebpf picks per-architecture pt_regs layouts from this cfg.
        format!("--cfg=bpf_target_arch=\"{host_arch}\""),
        // BTF needs debug info; bpf-linker emits BTF with --btf.
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ]
    .join("\x1f")
}

/// A cargo command in the eBPF crate with the eBPF toolchain environment.
pub fn ebpf_cargo(ws: &Workspace, program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(ws.ebpf_crate())
        // Host-oriented flags and wrappers would break or be wrong for the BPF target.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf uses unstable features; Debian's compiler is a stable release.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", ws.ebpf_target())
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            encoded_rustflags(std::env::consts::ARCH),
        )
        // bpf-linker lives in cargo's bin directory.
        .env("PATH", paths::path_with_first(&paths::cargo_bin()));
    cmd
}

/// Builds `lb-xdp`, `lab-xdp` and `lb-decap` into `target/ebpf/bpfel-unknown-none/release/`.
pub fn ebpf(ws: &Workspace) -> Result<()> {
    exec::run(ebpf_cargo(ws, &paths::cargo()).args(["build", "--release", "--target", BPF_TARGET]))
        .context("building the eBPF objects (lb-ebpf)")?;
    for object in [ws.lb_object(), ws.lab_object(), ws.decap_object()] {
        anyhow::ensure!(
            object.is_file(),
            "eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(())
}

/// A host cargo command in the workspace, with the artefact variables set.
pub fn host_cargo(ws: &Workspace, profile: Profile) -> Command {
    let mut cmd = Command::new(paths::cargo());
    cmd.current_dir(&ws.root);
    ws.set_artifact_env(&mut cmd, profile);
    cmd
}

/// Builds the host workspace in `profile`.
pub fn userspace(ws: &Workspace, profile: Profile, targets: Targets) -> Result<()> {
    let mut cmd = host_cargo(ws, profile);
    cmd.args(["build", "--workspace"])
        .args(profile.cargo_args());
    cmd.arg(match targets {
        Targets::Bins => "--bins",
        Targets::All => "--all-targets",
    });
    exec::run(&mut cmd).context("building the workspace")
}

/// Builds the eBPF objects, then the host workspace.
pub fn all(ws: &Workspace, profile: Profile, targets: Targets) -> Result<()> {
    ebpf(ws)?;
    userspace(ws, profile, targets)
}

/// The clippy command for the eBPF crate, or why it cannot run here.
///
/// rustup's clippy-driver embeds rustup's compiler, which has no `core` for the
/// BPF target, so only a clippy built with Debian's rustc will do.
pub fn ebpf_clippy(ws: &Workspace) -> std::result::Result<Command, String> {
    if !Path::new(DEBIAN_CARGO_CLIPPY).is_file() {
        return Err(format!(
            "{DEBIAN_CARGO_CLIPPY} not found (Debian package rust-web-clippy)"
        ));
    }
    let rustc = tool_version(DEBIAN_RUSTC);
    let clippy = tool_version(DEBIAN_CLIPPY_DRIVER);
    match (&rustc, &clippy) {
        (Some(r), Some(c)) if clippy_matches_rustc(r, c) => {}
        _ => {
            return Err(format!(
                "no clippy matching {DEBIAN_RUSTC} ({} vs {})",
                rustc.as_deref().unwrap_or("rustc: unknown"),
                clippy.as_deref().unwrap_or("clippy-driver: unknown"),
            ));
        }
    }
    let mut cmd = ebpf_cargo(ws, Path::new(DEBIAN_CARGO_CLIPPY));
    // cargo-clippy runs `$CARGO check` with its own clippy-driver as the workspace wrapper.
    cmd.env("CARGO", paths::cargo()).args([
        "clippy",
        "--release",
        "--target",
        BPF_TARGET,
        "--",
        "-D",
        "warnings",
    ]);
    Ok(cmd)
}

fn tool_version(program: &str) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// True if `clippy 0.1.N ...` belongs to `rustc 1.N.x ...` (clippy numbers itself 0.1.<minor>).
pub fn clippy_matches_rustc(rustc_version: &str, clippy_version: &str) -> bool {
    let minor = |text: &str, prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|rest| rest.split(['.', '-', ' ']).next())
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
    };
    matches!(
        (minor(rustc_version, "rustc 1."), minor(clippy_version, "clippy 0.1.")),
        (Some(r), Some(c)) if r == c
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustflags_are_unit_separated() {
        let flags = encoded_rustflags("x86_64");
        assert_eq!(
            flags,
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"
        );
        assert_eq!(flags.split('\x1f').count(), 3);
        assert!(!flags.contains(' '));
    }

    #[test]
    fn ebpf_env_is_clean() {
        let ws = Workspace {
            root: "/ws".into(),
            target: "/ws/target".into(),
        };
        let cmd = ebpf_cargo(&ws, Path::new("cargo"));
        let envs: Vec<_> = cmd.get_envs().collect();
        let get = |k: &str| {
            envs.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
        };
        assert_eq!(get("RUSTC"), Some(Some("/usr/bin/rustc".into())));
        assert_eq!(get("RUSTC_BOOTSTRAP"), Some(Some("1".into())));
        assert_eq!(
            get("CARGO_TARGET_DIR"),
            Some(Some("/ws/target/ebpf".into()))
        );
        for removed in [
            "RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
        ] {
            assert_eq!(get(removed), Some(None), "{removed} must be removed");
        }
        let path = get("PATH").flatten().unwrap();
        assert!(path.starts_with(&*paths::cargo_bin().to_string_lossy()));
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/ws/lb-ebpf")));
    }

    #[test]
    fn clippy_version_matching() {
        let rustc = "rustc 1.96.0 (abcdef 2026-05-25) (built from a source tarball)";
        assert!(clippy_matches_rustc(
            rustc,
            "clippy 0.1.96 (abcdef 2026-05-25)"
        ));
        assert!(!clippy_matches_rustc(rustc, "clippy 0.1.95 (x 2026-01-01)"));
        assert!(!clippy_matches_rustc(rustc, "garbage"));
        assert!(!clippy_matches_rustc("garbage", "clippy 0.1.96"));
        assert!(clippy_matches_rustc(
            "rustc 1.97.0-beta.2 (x)",
            "clippy 0.1.97-beta.2 (x)"
        ));
    }
}
