//! The L7 proxy's tables: `[[frontend]]`, `[[pool]]` (with their
//! `[pool.health]` and `[pool.discovery]`) and `[[userlist]]`.

use toml::Spanned;

use super::raw::{RawPoolChecks, RawProxy};
use super::{Checker, Forwarding, ProxySection};

impl Checker<'_> {
    /// Reads and checks the `[[frontend]]` and `[[pool]]` tables.
    pub(super) fn proxy_section(&mut self, text: &str) -> ProxySection {
        let raw: RawProxy = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let reason = e.message().trim().replace('\n', ": ");
                match e.span() {
                    Some(span) => self.at(&span, reason),
                    None => self.whole(reason),
                }
                return ProxySection::default();
            }
        };
        let first = raw
            .frontend
            .first()
            .map(Spanned::span)
            .or_else(|| raw.pool.first().map(Spanned::span));
        // `[pool.health]` uses the service health checks' keys and rules; read
        // again from the text so errors point at their own lines.
        let mut checks = Vec::new();
        let mut discoveries = Vec::new();
        if let Ok(pools) = toml::from_str::<RawPoolChecks>(text) {
            for pool in pools.pool {
                let Some(name) = pool.name else { continue };
                if let Some(h) = pool.health
                    && let Some(check) = self.health(h)
                {
                    checks.push((name.clone(), check));
                }
                if let Some(d) = pool.discovery
                    && let Some(discovery) = self.discovery(d, None, Forwarding::Nat)
                {
                    discoveries.push((name, discovery));
                }
            }
        }
        let cfg = crate::proxy::ProxyConfig {
            frontends: raw.frontend.into_iter().map(Spanned::into_inner).collect(),
            pools: raw.pool.into_iter().map(Spanned::into_inner).collect(),
            userlists: raw.userlist,
        };
        let problem = cfg
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|()| crate::proxy::routing::router(&cfg).map_err(|e| e.to_string()))
            .and_then(|_| crate::proxy::actions::compile(&cfg).map_err(|e| e.to_string()))
            .map(drop);
        if let Err(reason) = problem {
            match first {
                Some(span) => self.at(&span, reason),
                None => self.whole(reason),
            }
        }
        ProxySection(cfg, checks, discoveries)
    }
}
