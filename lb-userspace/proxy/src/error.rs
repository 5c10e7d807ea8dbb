//! What the proxy answers when it cannot serve a request: HAProxy-like
//! error pages, one renderer for both request paths and the actions.

use http::StatusCode;

/// A small HAProxy-like error page.
pub(crate) fn page(status: StatusCode) -> String {
    let text = match status.as_u16() {
        400 => "Your browser sent an invalid request.",
        408 => "Your browser didn't send a complete request in time.",
        502 => "The server returned an invalid or incomplete response.",
        503 => "No server is available to handle this request.",
        504 => "The server didn't respond in time.",
        _ => "The request could not be served.",
    };
    format!(
        "<html><body><h1>{} {}</h1>\n{}\n</body></html>\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        text
    )
}

/// HAProxy's 408 answer to a request head that did not arrive in time, written
/// as is from a timer (HAProxy's own title, "Time-out", unlike `page`'s).
pub(crate) const TIMEOUT_408: &[u8] = b"HTTP/1.1 408 Request Time-out\r\ncontent-length: 110\r\ncache-control: no-cache\r\nconnection: close\r\ncontent-type: text/html\r\n\r\n<html><body><h1>408 Request Time-out</h1>\nYour browser didn't send a complete request in time.\n</body></html>\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_pages() {
        assert!(page(StatusCode::SERVICE_UNAVAILABLE).contains("503 Service Unavailable"));
    }
}
