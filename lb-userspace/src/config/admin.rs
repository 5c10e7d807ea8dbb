//! `[admin]`: the admin listener (REST API and stats page, `crate::admin`).

use anyhow::{Context as _, ensure};
use toml::Spanned;

use super::listeners::Listener;
use super::raw::RawAdmin;
use super::{ADDR_FORM, AdminConfig, Checker};

impl Checker<'_> {
    /// Checks `[admin]`: a bind address and at least one way to log in (a
    /// userlist of the file, or an absolute token file).
    pub(super) fn admin(
        &mut self,
        raw: Spanned<RawAdmin>,
        userlists: &[lb_proxy::UserList],
    ) -> Option<AdminConfig> {
        let span = raw.span();
        let line = self.line(&span);
        let raw = raw.into_inner();
        let bind = match &raw.bind {
            None => {
                self.at(&span, "[admin] needs `bind`, e.g. \"127.0.0.1:8404\"");
                None
            }
            Some(b) => b
                .get_ref()
                .parse()
                .map_err(|_| {
                    let why = format!(
                        "admin bind \"{}\" is not a socket address; {ADDR_FORM}",
                        b.get_ref()
                    );
                    self.at(&b.span(), why);
                })
                .ok()
                .inspect(|addr| {
                    self.listening(Listener {
                        addr: *addr,
                        span: b.span(),
                        owner: super::listeners::ADMIN.into(),
                        try_bind: true,
                    })
                }),
        };
        let had_any = raw.userlist.is_some() || raw.token_file.is_some();
        let userlist = raw.userlist.and_then(|u| {
            if userlists.iter().any(|l| &l.name == u.get_ref()) {
                Some(u.into_inner())
            } else {
                self.at(
                    &u.span(),
                    format!(
                        "admin userlist \"{}\" is not a [[userlist]] of this file",
                        u.get_ref()
                    ),
                );
                None
            }
        });
        let mut token = None;
        let token_file = raw.token_file.and_then(|t| {
            let path = std::path::PathBuf::from(t.get_ref());
            if path.is_absolute() {
                // Read as `lb run` will, when the file is checked on its host.
                if self.host_resources {
                    match read_token(&path) {
                        Ok(t) => token = Some(AdminToken(t)),
                        Err(e) => self.at(&t.span(), format!("{e:#}")),
                    }
                }
                Some(path)
            } else {
                self.at(
                    &t.span(),
                    format!(
                        "admin token_file \"{}\" must be an absolute path",
                        t.get_ref()
                    ),
                );
                None
            }
        });
        if userlist.is_none() && token_file.is_none() {
            if !had_any {
                self.at(&span, "[admin] needs `userlist` (Basic auth) or `token_file` (Bearer token): it is never open to anyone");
            }
            return None;
        }
        Some(AdminConfig {
            bind: bind?,
            userlist,
            token_file,
            token,
            line,
        })
    }
}

/// A Bearer token, never shown in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Shortest token accepted: 32 characters, as `openssl rand -hex 16` at
/// least (a short one could be guessed).
pub const MIN_TOKEN_LEN: usize = 32;

/// Largest token file read: a token, not a document.
const MAX_TOKEN_FILE: u64 = 4096;

/// The Bearer token in `path` (trimmed), which must hold `MIN_TOKEN_LEN`
/// characters at least: what `lb run` and reloads read, `lb check` tries.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = lb_proxy::config_file::read_to_string(path, MAX_TOKEN_FILE)
        .with_context(|| format!("reading admin token_file {}", path.display()))?;
    let token = text.trim().to_string();
    ensure!(
        token.len() >= MIN_TOKEN_LEN,
        "admin token_file {} holds less than {MIN_TOKEN_LEN} characters \
         (make one with `openssl rand -hex 32`)",
        path.display()
    );
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::config::*;

    const USERLIST: [&str; 3] = [
        "[[userlist]]",
        "name = \"admins\"",
        "users = [{ name = \"alice\", password = \"$6$lbexample$Q10HPOl0/My7Sge6eVDnu/NiEHV4k3/WUhwy3ND9Df4YnPbxKGK3rNydqTHspxPealV3SLQ3lbC.RB.mjwZvu.\" }]",
    ];

    #[test]
    fn admin_section() {
        let mut lines = svc(&[]);
        lines.extend(USERLIST);
        lines.extend([
            "[admin]",
            "bind = \"127.0.0.1:8404\"",
            "userlist = \"admins\"",
        ]);
        let c = parse(&text(&lines), "lb.toml").unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(admin.bind, "127.0.0.1:8404".parse().unwrap());
        assert_eq!(admin.userlist.as_deref(), Some("admins"));
        assert_eq!(admin.token_file, None);
    }

    #[test]
    fn a_token_file_is_read_at_load_as_lb_run_reads_it() {
        let dir = std::env::temp_dir().join(format!("lb-config-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (token, file) = (dir.join("token"), dir.join("lb.toml"));
        let mut lines = svc(&[]);
        let at = lines.len() + 3;
        let line = format!("token_file = \"{}\"", token.display());
        lines.extend(["[admin]", "bind = \"127.0.0.1:8404\"", &line]);
        std::fs::write(&file, text(&lines)).unwrap();
        // Text alone reads no file; a load does.
        assert!(parse(&text(&lines), "lb.toml").is_ok());
        let e = load(&file).unwrap_err().to_string();
        assert!(
            e.contains(&format!(":{at}:14: reading admin token_file")),
            "{e}"
        );
        std::fs::write(&token, "short\n").unwrap();
        let e = load(&file).unwrap_err().to_string();
        assert!(e.contains(&format!(":{at}:14: admin token_file")), "{e}");
        assert!(e.contains("less than 32 characters"), "{e}");
        std::fs::write(&token, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n").unwrap();
        assert!(load(&file).is_err(), "31 characters");
        // Not a file: refused at once (a FIFO with no writer would block).
        std::fs::remove_file(&token).unwrap();
        let c = std::ffi::CString::new(token.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = load(&file).unwrap_err().to_string();
        assert!(e.contains("a FIFO, not a regular file"), "{e}");
        std::fs::remove_file(&token).unwrap();
        std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
        let admin = load(&file).unwrap().admin.unwrap();
        let read = admin.token.as_ref().map(AdminToken::expose);
        assert_eq!(read, Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(format!("{:?}", admin.token), "Some(AdminToken(..))");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn admin_mistakes_at_their_lines() {
        let mut lines = svc(&[]);
        let at = lines.len() + 1;
        lines.extend([
            "[admin]",
            "bind = \"localhost\"",
            "userlist = \"nobody\"",
            "token_file = \"rel\"",
        ]);
        let e = parse(&text(&lines), "lb.toml").unwrap_err().to_string();
        assert!(
            e.contains(&format!("lb.toml:{}:8: admin bind \"localhost\"", at + 1)),
            "{e}"
        );
        assert!(
            e.contains(&format!("lb.toml:{}:12: admin userlist \"nobody\"", at + 2)),
            "{e}"
        );
        assert!(
            e.contains(&format!("lb.toml:{}:14: admin token_file \"rel\"", at + 3)),
            "{e}"
        );
        let mut lines = svc(&[]);
        lines.extend(["[admin]", "bind = \"127.0.0.1:8404\""]);
        let e = parse(&text(&lines), "lb.toml").unwrap_err().to_string();
        assert!(
            e.contains("[admin] needs `userlist` (Basic auth) or `token_file`"),
            "{e}"
        );
    }
}
