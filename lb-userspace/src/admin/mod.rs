//! The admin listener (`[admin]`): a REST API over the control protocol
//! (`api`, described by `openapi.json` at `/api/openapi.json`) and a stats
//! page in the spirit of HAProxy's (`page`, at `/stats`), both behind
//! `auth`. Every change goes through the control socket's `Handler`, so
//! validation and the journal are the same as for `lb drain` and friends.
//!
//! Writes are refused unless they cannot come from another site's page:
//! API writes need a Bearer token or `Content-Type: application/json`
//! (which a cross-site form cannot send), the page's forms the CSRF token
//! it embeds (403 otherwise).

mod api;
mod auth;
mod page;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

pub use auth::{Auth, Credential, constant_time_eq};

use crate::control::{Handler, Request, Response};

/// Largest request body read (JSON bodies and forms are small).
const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer of the admin listener.
pub type Answer = http::Response<Full<Bytes>>;

/// What the admin listener serves with.
pub struct Admin {
    handler: Arc<dyn Handler>,
    auth: Auth,
}

impl Admin {
    /// Serves with `handler` (the agent's control handler), admitting `auth`.
    pub fn new(handler: Arc<dyn Handler>, auth: Auth) -> Self {
        Admin { handler, auth }
    }

    /// Carries out a control request on a blocking thread, as the control socket does.
    async fn ask(&self, request: Request) -> Response {
        let handler = Arc::clone(&self.handler);
        tokio::task::spawn_blocking(move || handler.handle(request))
            .await
            .unwrap_or_else(|e| {
                warn!("admin handler failed: {e}");
                Response::Error("internal error while handling the request".into())
            })
    }

    /// Authenticates, then routes one request.
    async fn answer(&self, req: http::Request<Incoming>) -> Answer {
        let Some(credential) = self.auth.check(req.headers()).await else {
            let mut resp = text(StatusCode::UNAUTHORIZED, "authentication required\n");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(self.auth.challenge()),
            );
            return resp;
        };
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, &format!("{e}\n")),
        };
        let path = parts.uri.path();
        match (&parts.method, path) {
            (&Method::GET, "/") => redirect("/stats"),
            (&Method::GET, "/stats") => page::render(self, parts.uri.query()).await,
            (&Method::POST, "/stats/action") => page::action(self, &body).await,
            (_, p) if p == "/api" || p.starts_with("/api/") => {
                let json = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json"));
                let cross_site_safe = credential == Credential::Bearer || json;
                api::route(self, &parts.method, &parts.uri, &body, cross_site_safe).await
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// A plain text answer.
pub fn text(status: StatusCode, body: &str) -> Answer {
    with_type(status, "text/plain; charset=utf-8", body.to_string())
}

/// An answer of `content_type`.
pub fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A 303 to `location` (after a form POST, so a reload does not repeat it).
pub fn redirect(location: &'static str) -> Answer {
    let mut resp = text(StatusCode::SEE_OTHER, "");
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    resp
}

/// Binds the admin address (before anything is spawned, so a taken port fails the start).
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener {addr}"))
}

/// Serves HTTP/1.1 on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) -> Result<()> {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!("admin accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.answer(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "admin connection");
            }
        });
    }
}
