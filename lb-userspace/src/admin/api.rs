//! The REST API: URLs and JSON bodies into control requests, answers into
//! JSON. The routes (also in `openapi.json`):
//!
//! | Method | Path | Control request |
//! |---|---|---|
//! | GET | /api/services | ShowServices |
//! | POST | /api/services `{name, vip, protocol?, mode?, forwarding?, hash?, ring_size?}` | AddService |
//! | DELETE | /api/services/{service} | RemoveService |
//! | GET | /api/backends, /api/services/{service}/backends | ShowBackends |
//! | POST | /api/services/{service}/backends `{address, weight?}` | AddBackend |
//! | DELETE | /api/services/{service}/backends/{address} | RemoveBackend |
//! | POST | /api/services/{service}/backends/{address}/{drain,enable,disable} | SetBackendState |
//! | POST | /api/services/pool:{name}/backends/{address}/shutdown-sessions | ShutdownSessions |
//! | PUT | /api/services/{service}/backends/{address}/weight `{weight}` | SetWeight |
//! | GET | /api/stats, /api/proxy, /api/discovery, /api/bgp | ShowStats, ShowProxy, ... |
//! | POST | /api/reload, /api/node/drain, /api/node/undrain | Reload, DrainNode, UndrainNode |
//!
//! `{service}` is a service name or `pool:NAME`; `{address}` is `ip:port`
//! (`[ipv6]:port`, percent-encoded or not).

use std::net::SocketAddr;

use http::{Method, StatusCode, Uri};
use serde::Deserialize;

use super::{Admin, Answer, with_type};
use crate::config::Forwarding;
use crate::control::cli::{parse_mode, parse_protocol};
use crate::control::{AdminState, Request, Response};

/// The OpenAPI document, served at `/api/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// A refusal before the agent is asked: status and reason.
type Refusal = (StatusCode, String);

fn bad(reason: impl Into<String>) -> Refusal {
    (StatusCode::BAD_REQUEST, reason.into())
}

/// Answers one API request. `cross_site_safe`: it cannot come from another
/// site's form (Bearer auth or a JSON content type), which writes require.
pub(super) async fn route(
    admin: &Admin,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    cross_site_safe: bool,
) -> Answer {
    let segments: Vec<String> = uri
        .path()
        .trim_start_matches("/api")
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    if method == Method::GET && segments == ["openapi.json"] {
        return with_type(StatusCode::OK, "application/json", OPENAPI.to_string());
    }
    if method != Method::GET && !cross_site_safe {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "writes need Content-Type: application/json (or Bearer auth)",
        );
    }
    let request = match to_request(method, &segments, uri.query(), body) {
        Ok(r) => r,
        Err((status, reason)) => return error(status, &reason),
    };
    respond(admin.ask(request).await)
}

/// The control request a method, path and body stand for.
fn to_request(
    method: &Method,
    segments: &[&str],
    query: Option<&str>,
    body: &[u8],
) -> Result<Request, Refusal> {
    let r = match (method.as_str(), segments) {
        ("GET", ["services"]) => Request::ShowServices,
        ("POST", ["services"]) => add_service(json(body)?)?,
        ("DELETE", ["services", name]) => Request::RemoveService {
            name: name.to_string(),
        },
        ("GET", ["backends"]) => Request::ShowBackends {
            service: query_value(query, "service"),
        },
        ("GET", ["services", name, "backends"]) => Request::ShowBackends {
            service: Some(name.to_string()),
        },
        ("POST", ["services", name, "backends"]) => {
            let b: AddBackend = json(body)?;
            Request::AddBackend {
                service: name.to_string(),
                address: address(&b.address)?,
                weight: weight(b.weight.unwrap_or(1))?,
            }
        }
        ("DELETE", ["services", name, "backends", addr]) => Request::RemoveBackend {
            service: name.to_string(),
            address: address(addr)?,
        },
        ("POST", ["services", name, "backends", addr, "shutdown-sessions"]) => {
            Request::ShutdownSessions {
                service: name.to_string(),
                address: address(addr)?,
            }
        }
        ("POST", ["services", name, "backends", addr, action]) => Request::SetBackendState {
            service: name.to_string(),
            address: address(addr)?,
            state: state(action)?,
        },
        ("PUT", ["services", name, "backends", addr, "weight"]) => {
            let w: SetWeight = json(body)?;
            Request::SetWeight {
                service: name.to_string(),
                address: address(addr)?,
                weight: weight(w.weight)?,
            }
        }
        _ => return other(method, segments),
    };
    Ok(r)
}

/// The routes without a service: listings, reload, node drain.
fn other(method: &Method, segments: &[&str]) -> Result<Request, Refusal> {
    Ok(match (method.as_str(), segments) {
        ("GET", ["stats"]) => Request::ShowStats,
        ("GET", ["proxy"]) => Request::ShowProxy,
        ("GET", ["discovery"]) => Request::ShowDiscovery,
        ("GET", ["bgp"]) => Request::ShowBgp,
        ("POST", ["reload"]) => Request::Reload,
        ("POST", ["node", "drain"]) => Request::DrainNode,
        ("POST", ["node", "undrain"]) => Request::UndrainNode,
        _ => {
            return Err((
                StatusCode::NOT_FOUND,
                format!("no route {method} /api/{}", segments.join("/")),
            ));
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddService {
    name: String,
    vip: String,
    protocol: Option<String>,
    mode: Option<String>,
    forwarding: Option<String>,
    hash: Option<String>,
    ring_size: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackend {
    address: String,
    weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetWeight {
    weight: i64,
}

fn add_service(b: AddService) -> Result<Request, Refusal> {
    Ok(Request::AddService {
        name: b.name,
        vip: address(&b.vip)?,
        protocol: parse_protocol(b.protocol.as_deref().unwrap_or("tcp")).map_err(bad)?,
        mode: parse_mode(b.mode.as_deref().unwrap_or("l4")).map_err(bad)?,
        forwarding: Forwarding::parse(b.forwarding.as_deref().unwrap_or("nat")).map_err(bad)?,
        hash: crate::config::FlowHash::parse(b.hash.as_deref().unwrap_or("flow")).map_err(bad)?,
        ring_size: b.ring_size,
    })
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| bad(format!("bad JSON body: {e}")))
}

fn address(text: &str) -> Result<SocketAddr, Refusal> {
    text.parse().map_err(|_| {
        bad(format!(
            "{text:?} is not a socket address; expected \"a.b.c.d:port\" or \"[ipv6]:port\""
        ))
    })
}

/// A weight the protocol can carry; its range is the agent's to check
/// (the same rule as `lb weight`).
fn weight(w: i64) -> Result<u32, Refusal> {
    u32::try_from(w).map_err(|_| bad(format!("weight {w} is out of range 0..=65535")))
}

fn state(action: &str) -> Result<AdminState, Refusal> {
    match action {
        "drain" => Ok(AdminState::Drain),
        "enable" => Ok(AdminState::Ready),
        "disable" => Ok(AdminState::Maint),
        _ => Err((
            StatusCode::NOT_FOUND,
            format!(
                "unknown action {action:?}; expected drain, enable, disable or shutdown-sessions"
            ),
        )),
    }
}

fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

/// Decodes `%XX` escapes (and `+` as a space, for forms); bad escapes stay as they are.
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The agent's answer as JSON; its refusals as 4xx (5xx when it failed).
fn respond(response: Response) -> Answer {
    let body = match response {
        Response::Ok => Ok(serde_json::json!({ "ok": true })),
        Response::Error(reason) => return error(status_of(&reason), &reason),
        Response::Services(v) => serde_json::to_value(v),
        Response::Backends(v) => serde_json::to_value(v),
        Response::Stats(v) => serde_json::to_value(v),
        Response::Bgp(v) => serde_json::to_value(v),
        Response::Discovery(v) => serde_json::to_value(v),
        Response::Proxy(v) => serde_json::to_value(v),
    };
    match body {
        Ok(v) => with_type(StatusCode::OK, "application/json", v.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The status of an agent's refusal: nothing was changed by a 4xx.
fn status_of(reason: &str) -> StatusCode {
    if reason.starts_with("applied, but not saved") || reason.starts_with("reload failed") {
        StatusCode::INTERNAL_SERVER_ERROR
    } else if reason.starts_with("unknown") || reason.contains(" has no ") {
        StatusCode::NOT_FOUND
    } else if reason.contains("already") {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_REQUEST
    }
}

fn error(status: StatusCode, reason: &str) -> Answer {
    let body = serde_json::json!({ "error": reason });
    with_type(status, "application/json", body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, path: &str, body: &str) -> Result<Request, Refusal> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        to_request(&method, &segs, None, body.as_bytes())
    }

    #[test]
    fn routes_to_requests() {
        assert_eq!(
            req(Method::POST, "services/web/backends/10.0.0.1:80/drain", ""),
            Ok(Request::SetBackendState {
                service: "web".into(),
                address: "10.0.0.1:80".parse().unwrap(),
                state: AdminState::Drain,
            })
        );
        assert_eq!(
            req(
                Method::POST,
                "services/pool:app/backends/10.0.0.1:80/shutdown-sessions",
                ""
            ),
            Ok(Request::ShutdownSessions {
                service: "pool:app".into(),
                address: "10.0.0.1:80".parse().unwrap(),
            })
        );
        assert_eq!(
            req(
                Method::PUT,
                "services/pool:app/backends/10.0.0.1:80/weight",
                "{\"weight\":7}"
            ),
            Ok(Request::SetWeight {
                service: "pool:app".into(),
                address: "10.0.0.1:80".parse().unwrap(),
                weight: 7,
            })
        );
        let e = req(
            Method::PUT,
            "services/web/backends/nope/weight",
            "{\"weight\":1}",
        );
        assert_eq!(e.unwrap_err().0, StatusCode::BAD_REQUEST);
        let e = req(
            Method::PUT,
            "services/web/backends/10.0.0.1:80/weight",
            "{\"weight\":-1}",
        );
        assert_eq!(e.unwrap_err().0, StatusCode::BAD_REQUEST);
        let e = req(Method::POST, "services", "{\"name\":\"x\"}");
        assert_eq!(e.unwrap_err().0, StatusCode::BAD_REQUEST);
        assert_eq!(
            req(Method::GET, "nope", "").unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(percent_decode("%5Bfd00%3A%3A1%5D%3A80"), "[fd00::1]:80");
        assert_eq!(status_of("unknown service \"x\""), StatusCode::NOT_FOUND);
    }

    #[test]
    fn openapi_is_json_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/api/services",
            "/api/services/{service}",
            "/api/backends",
            "/api/services/{service}/backends",
            "/api/services/{service}/backends/{address}",
            "/api/services/{service}/backends/{address}/{action}",
            "/api/services/{service}/backends/{address}/weight",
            "/api/stats",
            "/api/proxy",
            "/api/discovery",
            "/api/bgp",
            "/api/reload",
            "/api/node/drain",
            "/api/node/undrain",
        ] {
            assert!(paths.contains_key(p), "{p} missing from openapi.json");
        }
    }
}
