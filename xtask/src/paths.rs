//! Where things live: workspace root, target directories, built objects.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Host build profile (the eBPF objects are always built in release).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// Chooses the profile from a `--release` flag.
    pub fn from_release(release: bool) -> Self {
        if release { Self::Release } else { Self::Debug }
    }

    /// Name of the profile's directory under `target/`.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }

    /// Extra cargo arguments selecting this profile.
    pub fn cargo_args(self) -> &'static [&'static str] {
        match self {
            Self::Debug => &[],
            Self::Release => &["--release"],
        }
    }
}

/// Absolute paths of the workspace and its build outputs.
#[derive(Clone, Debug)]
pub struct Workspace {
    /// Workspace root (the directory holding the top-level Cargo.toml).
    pub root: PathBuf,
    /// Host target directory (`CARGO_TARGET_DIR` if set, else `<root>/target`).
    pub target: PathBuf,
}

impl Workspace {
    /// Locates the workspace from xtask's own manifest directory.
    pub fn locate() -> Self {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest.parent().unwrap_or(manifest).to_path_buf();
        // Honour a user's CARGO_TARGET_DIR so LB_BIN points at what cargo really built.
        let target = match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => {
                let dir = PathBuf::from(dir);
                if dir.is_absolute() {
                    dir
                } else {
                    env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or(dir)
                }
            }
            _ => root.join("target"),
        };
        Self { root, target }
    }

    /// Source directory of the eBPF crate.
    pub fn ebpf_crate(&self) -> PathBuf {
        self.root.join("lb-ebpf")
    }

    /// Separate target directory for the eBPF build (different compiler and target).
    pub fn ebpf_target(&self) -> PathBuf {
        self.target.join("ebpf")
    }

    /// Directory holding the built eBPF objects.
    pub fn ebpf_out(&self) -> PathBuf {
        self.ebpf_target()
            .join("bpfel-unknown-none")
            .join("release")
    }

    /// The load balancer's eBPF object.
    pub fn lb_object(&self) -> PathBuf {
        self.ebpf_out().join("lb-xdp")
    }

    /// The pass/bounce helper programs' eBPF object.
    pub fn lab_object(&self) -> PathBuf {
        self.ebpf_out().join("lab-xdp")
    }

    /// The backend-side decapsulation program's eBPF object (`lb decap`).
    pub fn decap_object(&self) -> PathBuf {
        self.ebpf_out().join("lb-decap")
    }

    /// A host binary built in `profile`.
    pub fn bin(&self, profile: Profile, name: &str) -> PathBuf {
        self.target.join(profile.dir()).join(name)
    }

    /// Sets the variables project binaries and tests use to find the built artefacts.
    pub fn set_artifact_env(&self, cmd: &mut Command, profile: Profile) {
        cmd.env("LB_BPF_OBJECT", self.lb_object())
            .env("LB_LAB_BPF_OBJECT", self.lab_object())
            .env("LB_DECAP_BPF_OBJECT", self.decap_object())
            .env("LB_BIN", self.bin(profile, "lb"));
    }
}

/// The cargo running us (rustup's toolchain cargo), falling back to `cargo` on PATH.
pub fn cargo() -> PathBuf {
    env::var_os("CARGO")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// Cargo's home, where `cargo install` puts binaries.
pub fn cargo_home() -> PathBuf {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

/// Cargo's bin directory (bpf-linker is installed there).
pub fn cargo_bin() -> PathBuf {
    cargo_home().join("bin")
}

/// PATH with `dir` in front, so tools there win over same-named ones elsewhere.
pub fn path_with_first(dir: &Path) -> std::ffi::OsString {
    let rest = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(env::split_paths(&rest));
    env::join_paths(dirs).unwrap_or(rest)
}

/// Finds an executable by name on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join(name)).find(|p| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_live_under_target_ebpf() {
        let ws = Workspace {
            root: "/ws".into(),
            target: "/ws/target".into(),
        };
        assert_eq!(
            ws.lb_object(),
            Path::new("/ws/target/ebpf/bpfel-unknown-none/release/lb-xdp")
        );
        assert_eq!(
            ws.lab_object(),
            Path::new("/ws/target/ebpf/bpfel-unknown-none/release/lab-xdp")
        );
        assert_eq!(
            ws.decap_object(),
            Path::new("/ws/target/ebpf/bpfel-unknown-none/release/lb-decap")
        );
        assert_eq!(
            ws.bin(Profile::Release, "lb"),
            Path::new("/ws/target/release/lb")
        );
        assert_eq!(
            ws.bin(Profile::Debug, "lb"),
            Path::new("/ws/target/debug/lb")
        );
    }

    #[test]
    fn locate_finds_the_workspace_root() {
        let ws = Workspace::locate();
        assert!(ws.root.join("Cargo.toml").is_file());
        assert!(ws.root.join("xtask").is_dir());
    }
}
