//! `use_pool` rules: which pool a request goes to, and the rules refused.

use crate::support::two_pool_config;
use lb_proxy::routing::*;
use lb_proxy::*;

fn cfg(rules: &str) -> ProxyConfig {
    let unused = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    two_pool_config(unused(1), unused(2), rules, "")
}

fn route(router: &Router, path: &str, host: &str) -> Option<usize> {
    let headers = http::HeaderMap::new();
    router(
        0,
        &acl::Request {
            method: "GET",
            path,
            query: None,
            host: Some(host),
            headers: &headers,
            src: "198.18.1.2".parse().unwrap(),
            sni: None,
            client_cert: false,
            src_request_rates: &[],
        },
    )
}

#[test]
fn rules_pick_pools_in_order_else_the_default() {
    let c = cfg(r#"
[[frontend.acl]]
name = "is_api"
path_prefix = "/api/"
[[frontend.acl]]
name = "admin"
host = "admin.example"
[[frontend.use_pool]]
pool = "api"
if = "is_api and not admin"
"#);
    let r = router(&c).unwrap();
    assert_eq!(route(&r, "/api/x", "www.example"), Some(1));
    assert_eq!(route(&r, "/api/x", "admin.example"), None);
    assert_eq!(route(&r, "/", "www.example"), None);
}

#[test]
fn unknown_pools_and_acls_are_refused() {
    let c = cfg(r#"
[[frontend.use_pool]]
pool = "nope"
if = "x"
"#);
    assert!(matches!(router(&c), Err(RoutingError::UnknownPool { .. })));
    let c = cfg(r#"
[[frontend.use_pool]]
pool = "api"
if = "missing_acl"
"#);
    let err = router(&c).err().unwrap().to_string();
    assert!(err.contains("missing_acl"), "{err}");
}
