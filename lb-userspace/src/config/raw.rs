//! What serde reads: the file's tables with every value's byte span, all
//! optional and loosely typed (strings, i64) so that a missing or
//! out-of-range value becomes a located semantic error instead of serde's
//! first and only one.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
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
    pub(super) frontend: Option<Vec<Spanned<RawTable>>>,
    pub(super) pool: Option<Vec<Spanned<RawPool>>>,
    pub(super) userlist: Option<Vec<Spanned<RawTable>>>,
    pub(super) admin: Option<Spanned<RawAdmin>>,
    pub(super) proxy: Option<Spanned<RawProxy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) bind: Option<Spanned<String>>,
    pub(super) userlist: Option<Spanned<String>>,
    pub(super) token_file: Option<Spanned<String>>,
}

/// `[proxy]`: settings of the L7 proxy as a whole.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) threads: Option<Spanned<i64>>,
    pub(super) cpu_map: Option<Spanned<Vec<Spanned<i64>>>>,
    pub(super) hard_stop_after: Option<Spanned<String>>,
    pub(super) syslog: Option<Spanned<String>>,
    pub(super) syslog_facility: Option<Spanned<String>>,
    pub(super) syslog_format: Option<Spanned<String>>,
}

/// One of the proxy's tables, key by key, each value with its span: the
/// proxy's own model (`lb_proxy`) gives the types, the spans say where
/// each problem is (see `super::l7`).
pub(super) type RawTable = BTreeMap<String, Spanned<toml::Value>>;

/// A `[[pool]]`: its keys as a [`RawTable`], except `[pool.health]` and
/// `[pool.discovery]`, read like a service's with their own spans.
pub(super) struct RawPool {
    pub(super) keys: RawTable,
    pub(super) health: Option<Spanned<RawHealth>>,
    pub(super) discovery: Option<Spanned<RawDiscovery>>,
}

impl<'de> Deserialize<'de> for RawPool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = RawPool;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a [[pool]] table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPool, A::Error> {
                let mut pool = RawPool {
                    keys: RawTable::new(),
                    health: None,
                    discovery: None,
                };
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "health" => pool.health = Some(map.next_value()?),
                        "discovery" => pool.discovery = Some(map.next_value()?),
                        _ => {
                            pool.keys.insert(key, map.next_value()?);
                        }
                    }
                }
                Ok(pool)
            }
        }
        d.deserialize_map(Keys)
    }
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
    pub(super) hash: Option<Spanned<String>>,
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
    pub(super) fast_interval: Option<Spanned<String>>,
    pub(super) down_interval: Option<Spanned<String>>,
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
