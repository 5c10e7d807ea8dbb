//! The stats page: server-rendered HTML in the spirit of HAProxy's, with a
//! little inline JavaScript (request rates from the previous load, and
//! reloading itself), and per backend forms to drain, enable, disable or
//! weigh it (a pool server's also to shut its sessions down), each
//! carrying the CSRF token.

use std::collections::HashMap;
use std::fmt::Write as _;

use http::StatusCode;

use super::api::percent_decode;
use super::{Admin, Answer, Login, redirect, with_type};
use crate::config::Group;
use crate::control::{AdminState, BackendInfo, ProxyInfo, Request, Response, ServiceInfo};

/// Seconds between reloads unless `?refresh=N` says otherwise (0: never).
const DEFAULT_REFRESH: u64 = 5;

const STYLE: &str = "body{font-family:sans-serif;font-size:13px;margin:1em}\
table{border-collapse:collapse;margin-bottom:1.5em}\
th,td{border:1px solid #999;padding:2px 6px;text-align:right}\
th{background:#eee}td.name{text-align:left}\
tr.group td{background:#b0b0e0;font-weight:bold;text-align:left}\
tr.ready.up,tr.ready.unchecked,tr.fe{background:#c0f0c0}tr.ready.down{background:#ff9090}\
tr.drain{background:#b0d0ff}tr.maint{background:#c8c8c8}\
form{margin:0;display:inline}input.w{width:4em}";

const SCRIPT: &str = r#"(function(){
var now=Date.now(),prev={},cur={t:now,v:{}};
try{prev=JSON.parse(sessionStorage.getItem('lbrates')||'{}')}catch(e){}
document.querySelectorAll('td[data-total]').forEach(function(td){
 var k=td.dataset.key,v=+td.dataset.total;cur.v[k]=v;
 var r=td.parentNode.querySelector('td.rate');
 if(r&&prev.t&&prev.v&&prev.v[k]!==undefined&&now>prev.t){r.textContent=((v-prev.v[k])*1000/(now-prev.t)).toFixed(1)}
});
sessionStorage.setItem('lbrates',JSON.stringify(cur));
var n=REFRESH;function tick(){var a=document.activeElement;
 if(a&&a.tagName==='INPUT'){setTimeout(tick,n*1000)}else{location.reload()}}
if(n>0){setTimeout(tick,n*1000)}
})();"#;

/// What the page shows, read from the agent.
struct Data {
    services: Vec<ServiceInfo>,
    backends: Vec<BackendInfo>,
    proxy: ProxyInfo,
}

async fn data(admin: &Admin) -> Result<Data, String> {
    let services = match admin.ask(Request::ShowServices).await {
        Response::Services(s) => s,
        Response::Error(e) => return Err(e),
        _ => Vec::new(),
    };
    let backends = match admin.ask(Request::ShowBackends { service: None }).await {
        Response::Backends(b) => b,
        Response::Error(e) => return Err(e),
        _ => Vec::new(),
    };
    let proxy = match admin.ask(Request::ShowProxy).await {
        Response::Proxy(p) => p,
        Response::Error(e) => return Err(e),
        _ => ProxyInfo::default(),
    };
    Ok(Data {
        services,
        backends,
        proxy,
    })
}

/// `GET /stats[?refresh=N]`.
pub(super) async fn render(admin: &Admin, query: Option<&str>, login: &Login) -> Answer {
    let refresh = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("refresh=")))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_REFRESH)
        .min(3600);
    let data = match data(admin).await {
        Ok(d) => d,
        Err(e) => return message(StatusCode::INTERNAL_SERVER_ERROR, &e),
    };
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>lb statistics</title>\
         <style>{STYLE}</style></head><body><h1>lb statistics</h1>\
         <p>Refreshes every {refresh} s (<a href=\"?refresh=0\">stop</a>, \
         <a href=\"?refresh=5\">5 s</a>). Metrics: <code>/metrics</code> on the metrics \
         address; API: <a href=\"/api/openapi.json\">/api/openapi.json</a>.</p>"
    );
    let csrf = escape(login.csrf());
    services_table(&mut html, &data, &csrf);
    frontends_table(&mut html, &data.proxy);
    pools_table(&mut html, &data, &csrf);
    let script = SCRIPT.replace("REFRESH", &refresh.to_string());
    let _ = write!(html, "<script>{script}</script></body></html>");
    let mut answer = with_type(StatusCode::OK, "text/html; charset=utf-8", html);
    if let Ok(csp) = http::HeaderValue::from_str(&policy(&script)) {
        answer
            .headers_mut()
            .insert(http::header::CONTENT_SECURITY_POLICY, csp);
    }
    answer
}

/// The page's Content-Security-Policy: its own inline style and `script`
/// only (by hash: an injected one would not run), forms to itself, no frame.
fn policy(script: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let hash = |text: &str| {
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
    };
    format!(
        "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        hash(STYLE),
        hash(script)
    )
}

/// Class names of a row: its admin state and its health.
fn state_class(b: &BackendInfo) -> String {
    format!("{} {}", b.admin, b.health)
}

/// The drain/enable/disable/weight form of one backend; a pool server's
/// also shuts its sessions down (HAProxy's "Kill Sessions").
fn actions(b: &BackendInfo, csrf: &str) -> String {
    let (group, addr) = (escape(&b.service), b.address);
    let shutdown = match Group::parse(&b.service) {
        Group::Pool(_) => {
            " <button name=\"action\" value=\"shutdown-sessions\">shut down sessions</button>"
        }
        Group::Service(_) => "",
    };
    format!(
        "<form method=\"post\" action=\"/stats/action\" data-backend=\"{group} {addr}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"service\" value=\"{group}\">\
         <input type=\"hidden\" name=\"backend\" value=\"{addr}\">\
         <button name=\"action\" value=\"drain\">drain</button>\
         <button name=\"action\" value=\"enable\">enable</button>\
         <button name=\"action\" value=\"disable\">disable</button> \
         <input class=\"w\" name=\"weight\" value=\"{}\">\
         <button name=\"action\" value=\"weight\">set weight</button>{shutdown}</form>",
        b.weight
    )
}

/// The cells every backend row starts with: name, state, health, last check, weight.
fn backend_cells(b: &BackendInfo) -> String {
    format!(
        "<td class=\"name\">{}</td><td class=\"state\">{}</td><td class=\"health\">{}</td>\
         <td>{}</td><td class=\"weight\">{}</td>",
        b.address,
        b.admin.as_str(),
        b.health.as_str(),
        escape(b.last_check.as_deref().unwrap_or("-")),
        b.weight
    )
}

fn services_table(html: &mut String, data: &Data, csrf: &str) {
    if data.services.is_empty() {
        return;
    }
    html.push_str(
        "<h2>L4 services (XDP)</h2><table id=\"services\"><tr><th>Service / backend</th>\
         <th>State</th><th>Health</th><th>Last check</th><th>Weight</th><th>Flows</th>\
         <th>Packets</th><th>Pkt/s</th><th>Bytes</th><th>Actions</th></tr>",
    );
    for s in &data.services {
        let _ = write!(
            html,
            "<tr class=\"group\"><td colspan=\"6\">{} {} {:?} {:?}</td>\
             <td data-key=\"s/{0}\" data-total=\"{}\">{4}</td><td class=\"rate\">-</td>\
             <td>{}</td><td></td></tr>",
            escape(&s.name),
            s.vip,
            s.mode,
            s.forwarding,
            s.packets,
            s.bytes
        );
        for b in data.backends.iter().filter(|b| b.service == s.name) {
            let _ = write!(
                html,
                "<tr class=\"backend {class}\" data-group=\"{group}\" data-backend=\"{addr}\">\
                 {cells}<td>{flows}</td><td data-key=\"b/{group}/{addr}\" data-total=\"{packets}\">\
                 {packets}</td><td class=\"rate\">-</td><td>{bytes}</td><td>{actions}</td></tr>",
                class = state_class(b),
                group = escape(&b.service),
                addr = b.address,
                cells = backend_cells(b),
                flows = b.active_flows,
                packets = b.packets,
                bytes = b.bytes,
                actions = actions(b, csrf)
            );
        }
    }
    html.push_str("</table>");
}

fn frontends_table(html: &mut String, proxy: &ProxyInfo) {
    if proxy.frontends.is_empty() {
        return;
    }
    html.push_str(
        "<h2>L7 frontends</h2><table id=\"frontends\"><tr><th>Frontend</th><th>Cur</th>\
         <th>Max</th><th>Limit</th><th>Sessions</th><th>Requests</th><th>Req/s</th><th>2xx</th><th>3xx</th>\
         <th>4xx</th><th>5xx</th><th>Denied req</th><th>Denied conn</th><th>Bytes in</th><th>Bytes out</th></tr>",
    );
    for f in &proxy.frontends {
        let c = &f.counters;
        let _ = write!(
            html,
            "<tr class=\"fe\" data-frontend=\"{0}\"><td class=\"name\">{0}</td><td>{1}</td>\
             <td>{12}</td><td>{2}</td><td>{3}</td><td data-key=\"f/{0}\" data-total=\"{4}\">{4}</td>\
             <td class=\"rate\">-</td><td>{5}</td><td>{6}</td><td>{7}</td><td>{8}</td>\
             <td>{9}</td><td>{13}</td><td>{10}</td><td>{11}</td></tr>",
            escape(&f.name),
            f.current_connections,
            f.max_connections,
            c.connections,
            c.requests,
            c.responses[1],
            c.responses[2],
            c.responses[3],
            c.responses[4],
            c.denied,
            c.bytes_in,
            c.bytes_out,
            c.max_current,
            c.denied_connections
        );
    }
    html.push_str("</table>");
}

fn pools_table(html: &mut String, data: &Data, csrf: &str) {
    if data.proxy.pools.is_empty() {
        return;
    }
    html.push_str(
        "<h2>L7 pools</h2><table id=\"pools\"><tr><th>Pool / server</th><th>State</th>\
         <th>Health</th><th>Last check</th><th>Weight</th><th>Cur</th><th>Max</th>\
         <th>Limit</th><th>Requests</th><th>Req/s</th><th>Errors</th><th>Bytes out</th><th>Actions</th></tr>",
    );
    let info: HashMap<(&str, std::net::SocketAddr), &BackendInfo> = data
        .backends
        .iter()
        .map(|b| ((b.service.as_str(), b.address), b))
        .collect();
    for p in &data.proxy.pools {
        let group = format!("pool:{}", p.name);
        let c = &p.counters;
        let cur: usize = p.servers.iter().map(|s| s.current).sum();
        let _ = write!(
            html,
            "<tr class=\"group\"><td colspan=\"5\">{0} (queued {1})</td><td>{2}</td><td></td><td></td>\
             <td data-key=\"p/{0}\" data-total=\"{3}\">{3}</td><td class=\"rate\">-</td>\
             <td>{4}</td><td>{5}</td><td></td></tr>",
            escape(&group),
            p.queued,
            cur,
            c.requests,
            c.connect_errors + c.responses[4],
            c.bytes_out
        );
        for s in &p.servers {
            let Some(b) = info.get(&(group.as_str(), s.address)) else {
                continue;
            };
            let c = &s.counters;
            let max = match b.max_flows {
                0 => "-".to_string(),
                n => n.to_string(),
            };
            let _ = write!(
                html,
                "<tr class=\"backend {class}\" data-group=\"{group}\" data-backend=\"{addr}\">\
                 {cells}<td>{cur}</td><td>{smax}</td><td>{max}</td><td data-key=\"s/{group}/{addr}\" \
                 data-total=\"{requests}\">{requests}</td><td class=\"rate\">-</td>\
                 <td>{errors}</td><td>{bytes}</td><td>{actions}</td></tr>",
                class = state_class(b),
                group = escape(&group),
                addr = s.address,
                cells = backend_cells(b),
                cur = s.current,
                smax = c.max_current,
                requests = c.requests,
                errors = c.connect_errors + c.responses[4],
                bytes = c.bytes_out,
                actions = actions(b, csrf)
            );
        }
    }
    html.push_str("</table>");
}

/// `POST /stats/action`: a form of the page; 403 without its CSRF token.
pub(super) async fn action(admin: &Admin, body: &[u8], login: &Login) -> Answer {
    let form: HashMap<String, String> = String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if !login.csrf_ok(field("csrf")) {
        return message(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    let Ok(address) = field("backend").parse() else {
        return message(StatusCode::BAD_REQUEST, "backend is not a socket address");
    };
    let service = field("service").to_string();
    let state = |state| Request::SetBackendState {
        service: service.clone(),
        address,
        state,
    };
    let request = match field("action") {
        "drain" => state(AdminState::Drain),
        "enable" => state(AdminState::Ready),
        "disable" => state(AdminState::Maint),
        "weight" => match field("weight").trim().parse::<u32>() {
            Ok(weight) => Request::SetWeight {
                service: service.clone(),
                address,
                weight,
            },
            Err(_) => return message(StatusCode::BAD_REQUEST, "weight is not a number 0..=65535"),
        },
        "shutdown-sessions" => Request::ShutdownSessions {
            service: service.clone(),
            address,
        },
        other => {
            return message(
                StatusCode::BAD_REQUEST,
                &format!("unknown action {other:?}"),
            );
        }
    };
    match admin.ask(request).await {
        Response::Error(e) => message(StatusCode::BAD_REQUEST, &e),
        _ => redirect("/stats"),
    }
}

/// A small HTML page saying why, with a way back.
fn message(status: StatusCode, why: &str) -> Answer {
    let html = format!(
        "<!doctype html><html><body><h1>{status}</h1><p id=\"reason\">{}</p>\
         <p><a href=\"/stats\">back to the stats page</a></p></body></html>",
        escape(why)
    );
    with_type(status, "text/html; charset=utf-8", html)
}

/// Escapes text for HTML content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::admin::{Admin, Auth, AuthSlot, Handler};
    use crate::control::Health;

    /// Records what the page asks for.
    struct Recorder(Mutex<Vec<Request>>);

    impl Handler for Recorder {
        fn handle(&self, request: Request) -> Response {
            self.0.lock().unwrap().push(request);
            Response::Ok
        }
    }

    fn backend(service: &str) -> BackendInfo {
        BackendInfo {
            service: service.into(),
            address: "198.18.2.11:8080".parse().unwrap(),
            weight: 1,
            admin: AdminState::Ready,
            health: Health::Up,
            last_check: None,
            active_flows: 0,
            max_flows: 0,
            packets: 0,
            bytes: 0,
        }
    }

    #[tokio::test]
    async fn a_pool_servers_sessions_are_shut_down_from_its_row() {
        let button = "value=\"shutdown-sessions\"";
        assert!(actions(&backend("pool:app"), "t").contains(button));
        // An L4 backend's flows have no session to shut down (`disable` moves them).
        assert!(!actions(&backend("web"), "t").contains(button));
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
        let token = "0123456789abcdef0123456789abcdef";
        let auth = Auth::new(HashMap::new(), Some(token.into())).unwrap();
        let mut bearer = http::HeaderMap::new();
        bearer.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let login = auth.check(&bearer, None).await.unwrap();
        let csrf = login.csrf().to_string();
        let admin = Admin::new(recorder.clone(), Arc::new(AuthSlot::new(auth)));
        let form = format!(
            "csrf={csrf}&service=pool%3Aapp&backend=198.18.2.11%3A8080&weight=1&action=shutdown-sessions"
        );
        let answer = action(&admin, form.as_bytes(), &login).await;
        assert_eq!(answer.status(), StatusCode::SEE_OTHER);
        let asked = recorder.0.lock().unwrap().clone();
        assert_eq!(
            asked,
            [Request::ShutdownSessions {
                service: "pool:app".into(),
                address: "198.18.2.11:8080".parse().unwrap(),
            }]
        );
        // Without the page's token, nothing is asked.
        let forged = form.replace(&csrf, "guess");
        assert_eq!(
            action(&admin, forged.as_bytes(), &login).await.status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(recorder.0.lock().unwrap().len(), 1);
    }
}
