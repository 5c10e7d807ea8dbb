//! What serde reads: the file's tables with every value's byte span, all
//! optional and loosely typed (strings, i64) so that a missing or
//! out-of-range value becomes a located semantic error instead of serde's
//! first and only one.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) xdp_mode: Option<Spanned<String>>,
    pub(super) metrics: Option<Spanned<String>>,
    pub(super) new_flow_limit: Option<Spanned<i64>>,
    pub(super) deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) encap_source_v4: Option<Spanned<String>>,
    pub(super) encap_source_v6: Option<Spanned<String>>,
    pub(super) service: Option<Vec<Spanned<RawService>>>,
    pub(super) bgp: Option<Spanned<RawBgp>>,
    // Read again, typed, by `proxy_section`; here they only need to be allowed.
    pub(super) frontend: Option<Spanned<toml::Value>>,
    pub(super) pool: Option<Spanned<toml::Value>>,
    pub(super) userlist: Option<Spanned<toml::Value>>,
}

/// The proxy's tables, read with spans so errors point at their entry.
#[derive(Deserialize)]
pub(super) struct RawProxy {
    #[serde(default)]
    pub(super) frontend: Vec<Spanned<crate::proxy::Frontend>>,
    #[serde(default)]
    pub(super) pool: Vec<Spanned<crate::proxy::Pool>>,
    #[serde(default)]
    pub(super) userlist: Vec<crate::proxy::UserList>,
}

/// Just the `[pool.health]` tables, with their spans (other keys are ignored here).
#[derive(Deserialize)]
pub(super) struct RawPoolChecks {
    #[serde(default)]
    pub(super) pool: Vec<RawPoolCheck>,
}

#[derive(Deserialize)]
pub(super) struct RawPoolCheck {
    pub(super) name: Option<String>,
    pub(super) health: Option<Spanned<RawHealth>>,
    pub(super) discovery: Option<Spanned<RawDiscovery>>,
}

// Everything is optional and loosely typed (strings, i64) so that missing or
// out-of-range values become located semantic errors instead of one serde error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Option<Spanned<String>>,
    pub(super) vip: Option<Spanned<String>>,
    pub(super) protocol: Option<Spanned<String>>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) forwarding: Option<Spanned<String>>,
    pub(super) mss_clamp: Option<Spanned<bool>>,
    pub(super) ring_size: Option<Spanned<i64>>,
    pub(super) backend: Option<Vec<Spanned<RawBackend>>>,
    pub(super) health: Option<Spanned<RawHealth>>,
    pub(super) discovery: Option<Spanned<RawDiscovery>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) name: Option<Spanned<String>>,
    #[serde(rename = "type")]
    pub(super) kind: Option<Spanned<String>>,
    pub(super) nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) hold: Option<Spanned<String>>,
    pub(super) port: Option<Spanned<i64>>,
    pub(super) weight: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) kind: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) rise: Option<Spanned<i64>>,
    pub(super) fall: Option<Spanned<i64>>,
    pub(super) method: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) host: Option<Spanned<String>>,
    // A range string, one code or a list of codes: checked by hand for a clear message.
    pub(super) status: Option<Spanned<toml::Value>>,
    pub(super) body: Option<Spanned<String>>,
    pub(super) port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBgp {
    pub(super) bird_socket: Option<Spanned<String>>,
    pub(super) include_file: Option<Spanned<String>>,
    pub(super) protocol: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
}
