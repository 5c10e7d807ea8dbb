//! HAProxy-style `http-request` and `http-response` actions of a frontend
//! (`[[frontend.request]]`, `[[frontend.response]]`), compiled once and run in
//! order per request; each rule may carry an `if` condition over the
//! frontend's ACLs. Request rules run before the pool is chosen, so rewrites
//! are seen by later rules and by `use_pool`; the first terminal action (deny,
//! redirect, return, a failed auth) answers the client directly. Response
//! rules' conditions are evaluated on the (rewritten) request and their header
//! edits applied to the server's response head.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Response, StatusCode, Uri, request};
use http_body_util::Full;
use thiserror::Error;

use super::model::{HttpAction, ProxyConfig, UserList};
use crate::acl::{self, AclSet, Condition};

/// Compiled actions of every frontend that has any, by frontend name.
pub type ActionsByFrontend = HashMap<String, CompiledActions>;

/// An action rule or userlist the proxy refuses to start with.
#[derive(Debug, Error)]
pub enum ActionError {
    /// A rule is invalid.
    #[error("frontend {frontend:?}: {list} rule {index} ({action}): {reason}")]
    Rule {
        /// Frontend name.
        frontend: String,
        /// `request` or `response`.
        list: &'static str,
        /// 1-based position in its list.
        index: usize,
        /// The rule's action.
        action: String,
        /// What is wrong.
        reason: String,
    },
    /// A frontend's ACLs do not compile.
    #[error("frontend {frontend:?}: {source}")]
    Acl {
        /// Frontend name.
        frontend: String,
        /// What is wrong.
        source: acl::AclError,
    },
    /// A userlist is invalid.
    #[error("userlist {name:?}: {reason}")]
    UserList {
        /// Userlist name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a header value may name of its request's connection, as HAProxy's
/// sample fetches in `%[...]`: `set-header X-Real-IP "%[src]"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    /// The client's address.
    Src,
    /// The client's port.
    SrcPort,
    /// The address the client connected to.
    Dst,
    /// The port the client connected to.
    DstPort,
    /// `1` over TLS, else `0`.
    SslFc,
    /// The TLS server name the client asked for (empty without).
    SslFcSni,
    /// The request's ID (`request_id_header`; empty without).
    UniqueId,
}

impl Var {
    const ALL: [(&'static str, Var); 7] = [
        ("src", Var::Src),
        ("src_port", Var::SrcPort),
        ("dst", Var::Dst),
        ("dst_port", Var::DstPort),
        ("ssl_fc", Var::SslFc),
        ("ssl_fc_sni", Var::SslFcSni),
        ("unique-id", Var::UniqueId),
    ];
}

/// A header value with `%[...]` variables, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(Var),
}

/// What a template's variables are read from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connection<'a> {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Over TLS, with the server name the client asked for.
    pub tls: Option<Option<&'a str>>,
    /// The request's ID, on frontends with `request_id_header`.
    pub unique_id: Option<crate::log::RequestId>,
}

impl Template {
    /// `value` with its `%[name]` variables; None when it has none.
    fn parse(value: &str) -> Result<Option<Template>, String> {
        if !value.contains("%[") {
            return Ok(None);
        }
        let mut pieces = Vec::new();
        let mut rest = value;
        while let Some(at) = rest.find("%[") {
            if at > 0 {
                pieces.push(Piece::Text(rest[..at].to_string()));
            }
            let after = &rest[at + 2..];
            let end = after
                .find(']')
                .ok_or_else(|| format!("{value:?}: `%[` without `]`"))?;
            let name = &after[..end];
            let var = Var::ALL
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    let known: Vec<&str> = Var::ALL.iter().map(|(n, _)| *n).collect();
                    format!(
                        "unknown variable %[{name}]; expected one of {}",
                        known.join(", ")
                    )
                })?;
            pieces.push(Piece::Var(var));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Some(Template(pieces)))
    }

    /// The value for `conn` (addresses, ports and server names are valid
    /// header text; None if it is not all the same).
    fn render(&self, conn: &Connection<'_>) -> Option<HeaderValue> {
        use std::fmt::Write as _;
        let mut out = String::new();
        for piece in &self.0 {
            let _ = match piece {
                Piece::Text(t) => write!(out, "{t}"),
                Piece::Var(Var::Src) => write!(out, "{}", conn.peer.ip()),
                Piece::Var(Var::SrcPort) => write!(out, "{}", conn.peer.port()),
                Piece::Var(Var::Dst) => write!(out, "{}", conn.local.ip()),
                Piece::Var(Var::DstPort) => write!(out, "{}", conn.local.port()),
                Piece::Var(Var::SslFc) => write!(out, "{}", u8::from(conn.tls.is_some())),
                Piece::Var(Var::SslFcSni) => write!(out, "{}", conn.tls.flatten().unwrap_or("")),
                Piece::Var(Var::UniqueId) => match conn.unique_id {
                    Some(id) => write!(out, "{id}"),
                    None => Ok(()),
                },
            };
        }
        HeaderValue::from_str(&out).ok()
    }
}

/// A header edit as configured: a fixed one, or a value with variables
/// made per request (`Edit::resolve`).
#[derive(Debug, Clone)]
enum Edit {
    Fixed(HeaderOp),
    /// `set-header` (`add` false) or `add-header` with a templated value.
    Templated {
        name: HeaderName,
        template: Template,
        add: bool,
    },
}

impl Edit {
    /// The edit for this request's connection (None: its value came out
    /// invalid, and it is skipped).
    fn resolve(&self, conn: &Connection<'_>) -> Option<HeaderOp> {
        match self {
            Edit::Fixed(op) => Some(op.clone()),
            Edit::Templated {
                name,
                template,
                add,
            } => {
                let value = template.render(conn)?;
                Some(match add {
                    true => HeaderOp::Add(name.clone(), value),
                    false => HeaderOp::Set(name.clone(), value),
                })
            }
        }
    }
}

/// A header edit.
#[derive(Debug, Clone)]
pub(crate) enum HeaderOp {
    /// Replace every value of the header with this one.
    Set(HeaderName, HeaderValue),
    /// Append a value.
    Add(HeaderName, HeaderValue),
    /// Remove every value.
    Del(HeaderName),
}

impl HeaderOp {
    fn apply(&self, headers: &mut HeaderMap) {
        match self {
            HeaderOp::Set(n, v) => {
                headers.insert(n.clone(), v.clone());
            }
            HeaderOp::Add(n, v) => {
                headers.append(n.clone(), v.clone());
            }
            HeaderOp::Del(n) => {
                headers.remove(n);
            }
        }
    }
}

#[derive(Debug)]
enum Redirect {
    /// A fixed Location.
    Location(String),
    /// Prefix (without a trailing `/`) followed by the request's path and query.
    Prefix(String),
    /// This scheme, the request's host, path and query.
    Scheme(String),
}

#[derive(Debug)]
enum RequestOp {
    Deny(StatusCode),
    Redirect {
        to: Redirect,
        code: StatusCode,
    },
    Header(Edit),
    SetPath(String),
    Return {
        status: StatusCode,
        content_type: HeaderValue,
        body: Bytes,
    },
    Auth {
        verifier: Arc<crate::basic_auth::Verifier>,
        challenge: HeaderValue,
    },
}

/// One frontend's request and response rules with its ACLs.
#[derive(Debug)]
pub struct CompiledActions {
    acls: AclSet,
    /// The conditions of `reject` rules, decided at accept (`rejects`).
    reject: Vec<Option<Condition>>,
    request: Vec<(Option<Condition>, RequestOp)>,
    response: Vec<(Option<Condition>, Edit)>,
}

/// What the request rules decided.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// A terminal action's answer and its log termination state.
    pub answer: Option<(Response<Full<Bytes>>, [char; 2])>,
    /// Response header edits whose condition held, in order.
    pub response: Vec<HeaderOp>,
}

/// Applies response header edits to a server's response head.
pub(crate) fn apply_response(ops: &[HeaderOp], headers: &mut HeaderMap) {
    for op in ops {
        op.apply(headers);
    }
}

/// Validates every userlist and compiles every frontend's rules; frontends without rules are left out.
pub fn compile(cfg: &ProxyConfig) -> Result<ActionsByFrontend, ActionError> {
    let userlists = compile_userlists(&cfg.userlists)?;
    let mut out = HashMap::new();
    for f in &cfg.frontends {
        if f.request.is_empty() && f.response.is_empty() {
            continue;
        }
        let acls = AclSet::compile(&f.acl).map_err(|source| ActionError::Acl {
            frontend: f.name.clone(),
            source,
        })?;
        let rule_error = |list, index: usize, a: &HttpAction, reason: String| ActionError::Rule {
            frontend: f.name.clone(),
            list,
            index: index + 1,
            action: a.action.clone(),
            reason,
        };
        let mut request = Vec::new();
        let mut reject = Vec::new();
        for (i, a) in f.request.iter().enumerate() {
            let cond = condition(a, &acls).map_err(|r| rule_error("request", i, a, r))?;
            if a.action == "reject" {
                let c = reject_condition(a, cond, &f.acl)
                    .map_err(|r| rule_error("request", i, a, r))?;
                reject.push(c);
                continue;
            }
            let op =
                request_op(a, &f.name, &userlists).map_err(|r| rule_error("request", i, a, r))?;
            request.push((cond, op));
        }
        let mut response = Vec::new();
        for (i, a) in f.response.iter().enumerate() {
            let cond = condition(a, &acls).map_err(|r| rule_error("response", i, a, r))?;
            let op = match a.action.as_str() {
                "set-header" | "add-header" | "del-header" => header_op(a),
                other => Err(format!(
                    "unknown response action {other:?}; expected set-header, add-header or del-header"
                )),
            }
            .map_err(|r| rule_error("response", i, a, r))?;
            response.push((cond, op));
        }
        out.insert(
            f.name.clone(),
            CompiledActions {
                acls,
                reject,
                request,
                response,
            },
        );
    }
    Ok(out)
}

fn compile_userlists(
    lists: &[UserList],
) -> Result<HashMap<String, Arc<HashMap<String, String>>>, ActionError> {
    let mut out = HashMap::new();
    for l in lists {
        let err = |reason: String| ActionError::UserList {
            name: l.name.clone(),
            reason,
        };
        if l.name.is_empty() {
            return Err(err("empty name".into()));
        }
        let mut users = HashMap::new();
        for u in &l.users {
            if u.name.is_empty() || u.name.contains(':') {
                return Err(err(format!("bad user name {:?}", u.name)));
            }
            check_sha512_crypt(&u.password)
                .map_err(|r| err(format!("user {:?}: password {r}", u.name)))?;
            if users.insert(u.name.clone(), u.password.clone()).is_some() {
                return Err(err(format!("duplicate user {:?}", u.name)));
            }
        }
        if out.insert(l.name.clone(), Arc::new(users)).is_some() {
            return Err(err("defined twice".into()));
        }
    }
    Ok(out)
}

/// Checks the shape of a `$6$[rounds=N$]salt$hash` string without hashing anything.
fn check_sha512_crypt(hash: &str) -> Result<(), String> {
    const FORM: &str = "must be a SHA-512 crypt hash `$6$salt$hash` (mkpasswd -m sha-512)";
    let Some(rest) = hash.strip_prefix("$6$") else {
        return Err(FORM.into());
    };
    let mut fields: Vec<&str> = rest.split('$').collect();
    if fields.first().is_some_and(|f| f.starts_with("rounds=")) {
        let rounds = fields.remove(0);
        let n: usize = rounds["rounds=".len()..]
            .parse()
            .map_err(|_| format!("{FORM}: bad {rounds:?}"))?;
        if !(1_000..=999_999_999).contains(&n) {
            return Err(format!("{FORM}: rounds must be 1000..=999999999"));
        }
    }
    let crypt64 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    };
    match fields.as_slice() {
        [salt, digest] if salt.len() <= 16 && digest.len() == 86 && crypt64(digest) => Ok(()),
        _ => Err(FORM.into()),
    }
}

fn condition(a: &HttpAction, acls: &AclSet) -> Result<Option<Condition>, String> {
    a.condition
        .as_deref()
        .map(|text| acl::parse_condition(text, &|name| acls.contains(name)))
        .transpose()
        .map_err(|e| e.to_string())
}

/// A `reject` rule's condition, which may look at the source alone: it is
/// decided as the connection is accepted, before TLS and before any request
/// (HAProxy's `tcp-request connection reject`).
fn reject_condition(
    a: &HttpAction,
    cond: Option<Condition>,
    acls: &[acl::AclSpec],
) -> Result<Option<Condition>, String> {
    only(a, &[])?;
    if let Some(c) = &cond
        && let Some(acl) = acls
            .iter()
            .find(|acl| c.names().contains(&acl.name.as_str()) && acl.matcher.key() != "src")
    {
        return Err(format!(
            "reject is decided when the connection is accepted, before TLS and any request: \
             its condition may use `src` ACLs only, and `{}` uses `{}`",
            acl.name,
            acl.matcher.key()
        ));
    }
    Ok(cond)
}

/// Refuses fields that the action does not take, so typos and mix-ups are not silently ignored.
fn only(a: &HttpAction, allowed: &[&str]) -> Result<(), String> {
    let set = [
        ("status", a.status.is_some()),
        ("code", a.code.is_some()),
        ("location", a.location.is_some()),
        ("prefix", a.prefix.is_some()),
        ("scheme", a.scheme.is_some()),
        ("name", a.name.is_some()),
        ("value", a.value.is_some()),
        ("path", a.path.is_some()),
        ("content_type", a.content_type.is_some()),
        ("body", a.body.is_some()),
        ("userlist", a.userlist.is_some()),
        ("realm", a.realm.is_some()),
    ];
    match set.iter().find(|(f, on)| *on && !allowed.contains(f)) {
        Some((f, _)) => Err(format!("`{f}` does not apply to {}", a.action)),
        None => Ok(()),
    }
}

fn status(code: Option<u16>, default: u16) -> Result<StatusCode, String> {
    let code = code.unwrap_or(default);
    match StatusCode::from_u16(code) {
        Ok(s) if (200..=599).contains(&code) => Ok(s),
        _ => Err(format!("status {code} is not within 200..=599")),
    }
}

fn header_op(a: &HttpAction) -> Result<Edit, String> {
    let del = a.action == "del-header";
    only(a, if del { &["name"] } else { &["name", "value"] })?;
    let name = a.name.as_deref().ok_or("missing `name`")?;
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    // Message framing stays the proxy's business (request smuggling, broken bodies).
    if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
        return Err(format!("{name} cannot be changed"));
    }
    if del {
        return Ok(Edit::Fixed(HeaderOp::Del(name)));
    }
    let value = a.value.as_deref().ok_or("missing `value`")?;
    let add = a.action == "add-header";
    // The text around variables must be valid header text by itself.
    HeaderValue::from_str(value).map_err(|_| format!("{value:?} is not a valid header value"))?;
    if let Some(template) = Template::parse(value)? {
        return Ok(Edit::Templated {
            name,
            template,
            add,
        });
    }
    let value = HeaderValue::from_str(value)
        .map_err(|_| format!("{value:?} is not a valid header value"))?;
    Ok(Edit::Fixed(match add {
        true => HeaderOp::Add(name, value),
        false => HeaderOp::Set(name, value),
    }))
}

/// A `redirect` action: exactly one of `location`, `prefix`, `scheme`, and a 3xx `code`.
fn redirect_op(a: &HttpAction) -> Result<RequestOp, String> {
    only(a, &["location", "prefix", "scheme", "code"])?;
    let code = a.code.unwrap_or(302);
    if ![301, 302, 303, 307, 308].contains(&code) {
        return Err(format!(
            "code {code} is not a redirect; use 301, 302, 303, 307 or 308"
        ));
    }
    let code = StatusCode::from_u16(code).map_err(|e| e.to_string())?;
    let to = match (&a.location, &a.prefix, &a.scheme) {
        (Some(l), None, None) => {
            HeaderValue::from_str(l).map_err(|_| format!("bad location {l:?}"))?;
            Redirect::Location(l.clone())
        }
        (None, Some(p), None) => {
            HeaderValue::from_str(p).map_err(|_| format!("bad prefix {p:?}"))?;
            Redirect::Prefix(p.trim_end_matches('/').to_string())
        }
        (None, None, Some(s)) => {
            let ok = s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
            if !ok {
                return Err(format!("bad scheme {s:?}"));
            }
            Redirect::Scheme(s.clone())
        }
        _ => return Err("needs exactly one of `location`, `prefix`, `scheme`".into()),
    };
    Ok(RequestOp::Redirect { to, code })
}

/// One request action, checked.
fn request_op(
    a: &HttpAction,
    frontend: &str,
    userlists: &HashMap<String, Arc<HashMap<String, String>>>,
) -> Result<RequestOp, String> {
    match a.action.as_str() {
        "deny" => {
            only(a, &["status"])?;
            Ok(RequestOp::Deny(status(a.status, 403)?))
        }
        "redirect" => redirect_op(a),
        "set-header" | "add-header" | "del-header" => Ok(RequestOp::Header(header_op(a)?)),
        "set-path" => {
            only(a, &["path"])?;
            let path = a.path.as_deref().ok_or("missing `path`")?;
            let valid = path.starts_with('/')
                && !path.contains(['?', '#'])
                && path.parse::<PathAndQuery>().is_ok();
            if !valid {
                return Err(format!(
                    "bad path {path:?}; it must start with / and have no query"
                ));
            }
            Ok(RequestOp::SetPath(path.to_string()))
        }
        "return" => {
            only(a, &["status", "content_type", "body"])?;
            let ct = a.content_type.as_deref().unwrap_or("text/plain");
            let content_type =
                HeaderValue::from_str(ct).map_err(|_| format!("bad content_type {ct:?}"))?;
            Ok(RequestOp::Return {
                status: status(a.status, 200)?,
                content_type,
                body: Bytes::from(a.body.clone().unwrap_or_default()),
            })
        }
        "auth" => {
            only(a, &["userlist", "realm"])?;
            let name = a.userlist.as_deref().ok_or("missing `userlist`")?;
            let users = userlists
                .get(name)
                .ok_or_else(|| format!("unknown userlist {name:?}"))?
                .clone();
            let realm = a.realm.as_deref().unwrap_or(frontend);
            if realm.contains(['"', '\\']) {
                return Err(format!(
                    "realm {realm:?} may not contain quotes or backslashes"
                ));
            }
            let challenge = HeaderValue::from_str(&format!("Basic realm=\"{realm}\""))
                .map_err(|_| format!("bad realm {realm:?}"))?;
            let verifier = Arc::new(crate::basic_auth::Verifier::shared(users));
            Ok(RequestOp::Auth {
                verifier,
                challenge,
            })
        }
        other => Err(format!(
            "unknown action {other:?}; expected deny, reject, redirect, set-header, add-header, \
             del-header, set-path, return or auth"
        )),
    }
}

/// Host header, else the URI's authority (HTTP/2), as `prepare::prepare` sees it.
fn host_of(parts: &request::Parts) -> Option<&str> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

impl CompiledActions {
    /// The request header fields the rules set, add or delete: the
    /// proxy's to write, so a client's look-alikes are dropped
    /// (`prepare::drop_look_alikes`).
    pub(crate) fn request_header_names(&self) -> impl Iterator<Item = &HeaderName> {
        self.request.iter().filter_map(|(_, op)| match op {
            RequestOp::Header(Edit::Fixed(
                HeaderOp::Set(n, _) | HeaderOp::Add(n, _) | HeaderOp::Del(n),
            ))
            | RequestOp::Header(Edit::Templated { name: n, .. }) => Some(n),
            _ => None,
        })
    }

    fn holds(
        &self,
        cond: Option<&Condition>,
        parts: &request::Parts,
        (src, src_request_rates): (IpAddr, &[(std::time::Duration, u32)]),
        (sni, client_cert): (Option<&str>, bool),
    ) -> bool {
        let Some(cond) = cond else {
            return true;
        };
        let req = acl::Request {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            host: host_of(parts),
            headers: &parts.headers,
            src,
            sni,
            client_cert,
            src_request_rates,
        };
        cond.eval(&self.acls, &req)
    }

    /// Whether a `reject` rule holds for a connection from `src`: it is
    /// then closed unread, before TLS (HAProxy's `tcp-request connection reject`).
    pub(crate) fn rejects(&self, src: IpAddr) -> bool {
        if self.reject.is_empty() {
            return false;
        }
        let req = acl::Request::connection(src);
        self.reject
            .iter()
            .any(|c| c.as_ref().is_none_or(|c| c.eval(&self.acls, &req)))
    }

    /// Whether a `deny` rule holds for a `tcp` frontend's connection (the
    /// only rules such a frontend has, over connection ACLs only).
    pub(crate) fn denies_connection(&self, req: &acl::Request<'_>) -> bool {
        self.request.iter().any(|(cond, op)| {
            matches!(op, RequestOp::Deny(_))
                && cond.as_ref().is_none_or(|c| c.eval(&self.acls, req))
        })
    }

    /// Runs the request rules in order on `parts`, then picks the response edits.
    pub(crate) async fn run_request(
        &self,
        parts: &mut request::Parts,
        conn: Connection<'_>,
        tls: (Option<&str>, bool),
        rates: &[(std::time::Duration, u32)],
    ) -> Outcome {
        let src = (conn.peer.ip(), rates);
        for (cond, op) in &self.request {
            if !self.holds(cond.as_ref(), parts, src, tls) {
                continue;
            }
            let answer = match op {
                RequestOp::Header(edit) => {
                    if let Some(h) = edit.resolve(&conn) {
                        h.apply(&mut parts.headers);
                    }
                    continue;
                }
                RequestOp::SetPath(path) => {
                    set_path(parts, path);
                    continue;
                }
                RequestOp::Auth {
                    verifier,
                    challenge,
                } => {
                    if verifier.check(&parts.headers, Some(conn.peer.ip())).await {
                        continue;
                    }
                    let mut resp = page(StatusCode::UNAUTHORIZED);
                    resp.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, challenge.clone());
                    (resp, ['P', 'R'])
                }
                RequestOp::Deny(status) => (page(*status), ['P', 'R']),
                RequestOp::Redirect { to, code } => match redirect(to, *code, parts) {
                    Some(resp) => (resp, ['L', 'R']),
                    None => (page(StatusCode::BAD_REQUEST), ['P', 'R']),
                },
                RequestOp::Return {
                    status,
                    content_type,
                    body,
                } => {
                    let mut resp = Response::new(Full::new(body.clone()));
                    *resp.status_mut() = *status;
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, content_type.clone());
                    (resp, ['L', 'R'])
                }
            };
            return Outcome {
                answer: Some(answer),
                response: Vec::new(),
            };
        }
        let response = self
            .response
            .iter()
            .filter(|(cond, _)| self.holds(cond.as_ref(), parts, src, tls))
            .filter_map(|(_, edit)| edit.resolve(&conn))
            .collect();
        Outcome {
            answer: None,
            response,
        }
    }
}

/// Replaces the path, keeping the query (HAProxy's `set-path`).
fn set_path(parts: &mut request::Parts, path: &str) {
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut uri = parts.uri.clone().into_parts();
    // Both parts were validated (compile time and hyper's parser); keep the URI on failure.
    if let Ok(pq) = PathAndQuery::try_from(pq)
        && let Ok(u) = Uri::from_parts({
            uri.path_and_query = Some(pq);
            uri
        })
    {
        parts.uri = u;
    }
}

fn redirect(
    to: &Redirect,
    code: StatusCode,
    parts: &request::Parts,
) -> Option<Response<Full<Bytes>>> {
    // The path as the rules saw it (normalized): the raw one could make a
    // Location another site's (`//evil.example/../v/` after a `/` prefix
    // is protocol-relative) while matching a rule on `/v/`.
    let path = crate::acl::normalize_path(parts.uri.path());
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    let location = match to {
        Redirect::Location(l) => l.clone(),
        Redirect::Prefix(p) => format!("{p}{pq}"),
        Redirect::Scheme(s) => format!("{s}://{}{pq}", host_of(parts)?),
    };
    let location = HeaderValue::from_str(&location).ok()?;
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::LOCATION, location);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(resp)
}

/// A HAProxy-like HTML page for a status the proxy answers itself.
fn page(status: StatusCode) -> Response<Full<Bytes>> {
    let text = match status.as_u16() {
        401 => format!(
            "<html><body><h1>401 Unauthorized</h1>\n{}\n</body></html>\n",
            "You need a valid user and password to access this content."
        ),
        403 => format!(
            "<html><body><h1>403 Forbidden</h1>\n{}\n</body></html>\n",
            "Request forbidden by administrative rules."
        ),
        _ => crate::error::page(status),
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_shapes() {
        let hash =
            sha_crypt::sha512_simple("pw", &sha_crypt::Sha512Params::new(5_000).unwrap()).unwrap();
        assert_eq!(check_sha512_crypt(&hash), Ok(()));
        assert!(sha_crypt::sha512_check("pw", &hash).is_ok());
        assert!(check_sha512_crypt("$6$rounds=10$salt$x").is_err());
        assert!(check_sha512_crypt("$1$salt$hash").is_err());
    }

    #[test]
    fn header_values_take_the_connection_s_variables() {
        let t = |v: &str| Template::parse(v);
        assert_eq!(t("plain"), Ok(None));
        let conn = Connection {
            peer: "[2001:db8::7]:40000".parse().unwrap(),
            local: "198.18.100.1:443".parse().unwrap(),
            tls: Some(Some("www.example")),
            unique_id: Some(crate::log::RequestId::from(0xab)),
        };
        let render = |v: &str, c: &Connection<'_>| t(v).unwrap().unwrap().render(c).unwrap();
        assert_eq!(render("%[src]", &conn), "2001:db8::7");
        assert_eq!(
            render("for=%[src]:%[src_port] by %[dst]:%[dst_port]", &conn),
            "for=2001:db8::7:40000 by 198.18.100.1:443"
        );
        assert_eq!(render("%[ssl_fc] %[ssl_fc_sni]%", &conn), "1 www.example%");
        assert_eq!(
            render("id=%[unique-id]", &conn),
            format!("id={:032x}", 0xab)
        );
        let plain = Connection {
            tls: None,
            unique_id: None,
            ..conn
        };
        assert_eq!(
            render("%[ssl_fc]<%[ssl_fc_sni]><%[unique-id]>", &plain),
            "0<><>"
        );
        assert!(t("%[src").unwrap_err().contains("without `]`"));
        assert!(
            t("%[req.hdr(host)]")
                .unwrap_err()
                .contains("unknown variable")
        );
    }
}
