//! What the proxy answers when it cannot serve a request, for both request
//! paths (ours, `h1`, and hyper's, `forward`): a `Failure` says what failed,
//! who caused it and whether it may be retried, and gives the status, the
//! termination state of the access log and the error page (one renderer).

use http::StatusCode;

/// Why a request was not served as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The request is invalid: refused before anything is forwarded.
    BadRequest,
    /// The request names a host the connection's TLS certificate does not
    /// serve (another than its SNI): 421, RFC 9110 15.5.20.
    Misdirected,
    /// The request head did not arrive within `timeout_http_request`.
    HeadTimeout,
    /// The client's request body broke off (closed or reset).
    ClientAborted,
    /// The client's request body stopped coming for `timeout_client`.
    ClientTimeout,
    /// The client's request body is framed wrongly (bad chunks).
    BadBodyFraming,
    /// No server of the pool is up.
    NoServer,
    /// The request waited in the pool's queue for `timeout_queue`.
    QueueTimeout,
    /// No server could be connected to.
    ConnectFailed,
    /// The proxy cannot send the request: it lost it, or the pool speaks a
    /// protocol this path does not.
    Internal,
    /// The client reset the request before it was sent.
    ClientGone,
    /// The server closed the connection before taking the request or
    /// answering any byte (a kept connection whose keep-alive ended).
    ServerClosed,
    /// The server's answer is invalid, or it ended inside it.
    BadResponse,
    /// No response head within `timeout_server`.
    ServerTimeout,
    /// The server closed or failed inside its response body.
    ServerAborted,
    /// The server's response body is framed wrongly (bad chunks).
    BadResponseFraming,
    /// The server's response body stopped coming for `timeout_server`.
    ServerDataTimeout,
}

/// Who caused a failure: the first letter of HAProxy's termination state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client closed or reset (`C`).
    Client,
    /// The client did not send in time (`c`).
    ClientTimeout,
    /// The server closed, refused or answered wrongly (`S`).
    Server,
    /// The server did not answer in time (`s`).
    ServerTimeout,
    /// The proxy refused or could not go on (`P`).
    Proxy,
}

/// Where the request was when it failed: the second letter of the termination state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Reading or checking the request (`R`).
    Request,
    /// Waiting in a pool's queue (`Q`).
    Queue,
    /// Connecting to a server, or before the request went out (`C`).
    Connect,
    /// Waiting for the response head (`H`).
    Headers,
    /// Relaying a body (`D`).
    Data,
}

impl Phase {
    /// Its letter in the termination state.
    pub(crate) fn letter(self) -> char {
        match self {
            Phase::Request => 'R',
            Phase::Queue => 'Q',
            Phase::Connect => 'C',
            Phase::Headers => 'H',
            Phase::Data => 'D',
        }
    }
}

/// Whether a failed attempt may be tried again (within the pool's `retries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Never: the request may have had effects, or trying again cannot help.
    Never,
    /// Only when the request went out on a reused connection and nothing of
    /// it can have been processed: a kept connection may be closed by the
    /// server at any time.
    OnReusedConnection,
    /// On another server of the pool (a connect failure).
    Redispatch,
}

impl Failure {
    /// The status the client is answered with.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Failure::BadRequest | Failure::ClientAborted | Failure::BadBodyFraming => {
                StatusCode::BAD_REQUEST
            }
            Failure::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Failure::HeadTimeout | Failure::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            // Like HAProxy: a server that cannot be reached is a 503 (SC).
            Failure::NoServer | Failure::QueueTimeout | Failure::ConnectFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Failure::Internal
            | Failure::ClientGone
            | Failure::ServerClosed
            | Failure::BadResponse => StatusCode::BAD_GATEWAY,
            Failure::ServerAborted | Failure::BadResponseFraming => StatusCode::BAD_GATEWAY,
            Failure::ServerTimeout | Failure::ServerDataTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Who caused it and where the request was.
    pub(crate) fn blame(self) -> (Side, Phase) {
        match self {
            Failure::BadRequest | Failure::Misdirected => (Side::Proxy, Phase::Request),
            Failure::HeadTimeout => (Side::ClientTimeout, Phase::Request),
            Failure::ClientAborted => (Side::Client, Phase::Data),
            Failure::ClientTimeout => (Side::ClientTimeout, Phase::Data),
            Failure::BadBodyFraming | Failure::BadResponseFraming => (Side::Proxy, Phase::Data),
            Failure::NoServer | Failure::ConnectFailed => (Side::Server, Phase::Connect),
            Failure::QueueTimeout => (Side::ServerTimeout, Phase::Queue),
            Failure::Internal => (Side::Proxy, Phase::Headers),
            Failure::ClientGone => (Side::Client, Phase::Connect),
            Failure::ServerClosed | Failure::BadResponse => (Side::Server, Phase::Headers),
            Failure::ServerTimeout => (Side::ServerTimeout, Phase::Headers),
            Failure::ServerAborted => (Side::Server, Phase::Data),
            Failure::ServerDataTimeout => (Side::ServerTimeout, Phase::Data),
        }
    }

    /// HAProxy's termination state, as the access log shows it.
    pub(crate) fn termination(self) -> [char; 2] {
        let (side, phase) = self.blame();
        let side = match side {
            Side::Client => 'C',
            Side::ClientTimeout => 'c',
            Side::Server => 'S',
            Side::ServerTimeout => 's',
            Side::Proxy => 'P',
        };
        [side, phase.letter()]
    }

    /// Whether the attempt may be made again.
    /// Whether it says the server gave no usable response (what
    /// `max_fails` counts): not connected, no head in time, a broken one.
    /// (A close before any byte is mostly a kept connection's keep-alive
    /// ending as the request went out: not counted.)
    pub(crate) fn no_response(self) -> bool {
        matches!(
            self,
            Failure::ConnectFailed | Failure::ServerTimeout | Failure::BadResponse
        )
    }

    pub(crate) fn retry(self) -> Retry {
        match self {
            Failure::ConnectFailed => Retry::Redispatch,
            Failure::ServerClosed => Retry::OnReusedConnection,
            _ => Retry::Never,
        }
    }

    /// The error page sent for it.
    pub(crate) fn page(self) -> String {
        page(self.status())
    }

    /// Appends the whole HTTP/1.1 answer to `out` (status line, headers,
    /// page: `custom`, else ours; `close` adds `connection: close`);
    /// returns the page's length.
    pub(crate) fn put_http1_answer(
        self,
        out: &mut Vec<u8>,
        close: bool,
        custom: Option<&[u8]>,
    ) -> usize {
        use std::io::Write as _;
        let status = self.status();
        let ours;
        let page = match custom {
            Some(page) => page,
            None => {
                ours = page(status);
                ours.as_bytes()
            }
        };
        let connection = if close { "connection: close\r\n" } else { "" };
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-length: {}\r\ncache-control: no-cache\r\n{connection}content-type: text/html\r\n\r\n",
            status.as_u16(),
            reason(status),
            page.len(),
        );
        out.extend_from_slice(page);
        page.len()
    }
}

/// The reason phrase: HAProxy's ("Request Time-out") where it differs from
/// the standard one.
fn reason(status: StatusCode) -> &'static str {
    match status.as_u16() {
        408 => "Request Time-out",
        _ => status.canonical_reason().unwrap_or(""),
    }
}

/// A small HAProxy-like error page.
pub(crate) fn page(status: StatusCode) -> String {
    let text = match status.as_u16() {
        400 => "Your browser sent an invalid request.",
        408 => "Your browser didn't send a complete request in time.",
        421 => "This connection does not serve the host the request names.",
        502 => "The server returned an invalid or incomplete response.",
        503 => "No server is available to handle this request.",
        504 => "The server didn't respond in time.",
        _ => "The request could not be served.",
    };
    format!(
        "<html><body><h1>{} {}</h1>\n{}\n</body></html>\n",
        status.as_u16(),
        reason(status),
        text
    )
}

/// The 408 answer to a request head that did not arrive in time, written as
/// is from a timer: rendered once, by `http1_answer`.
pub(crate) fn timeout_408() -> &'static [u8] {
    static ANSWER: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let mut out = Vec::new();
        Failure::HeadTimeout.put_http1_answer(&mut out, true, None);
        out
    });
    &ANSWER
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failure with the status and termination state it had as a pair.
    #[test]
    fn failures_keep_their_answers() {
        let all = [
            (Failure::BadRequest, 400, "PR"),
            (Failure::Misdirected, 421, "PR"),
            (Failure::HeadTimeout, 408, "cR"),
            (Failure::ClientAborted, 400, "CD"),
            (Failure::ClientTimeout, 408, "cD"),
            (Failure::BadBodyFraming, 400, "PD"),
            (Failure::NoServer, 503, "SC"),
            (Failure::QueueTimeout, 503, "sQ"),
            (Failure::ConnectFailed, 503, "SC"),
            (Failure::Internal, 502, "PH"),
            (Failure::ClientGone, 502, "CC"),
            (Failure::ServerClosed, 502, "SH"),
            (Failure::BadResponse, 502, "SH"),
            (Failure::ServerTimeout, 504, "sH"),
            (Failure::ServerAborted, 502, "SD"),
            (Failure::BadResponseFraming, 502, "PD"),
            (Failure::ServerDataTimeout, 504, "sD"),
        ];
        for (failure, status, term) in all {
            assert_eq!(failure.status().as_u16(), status, "{failure:?}");
            assert_eq!(
                String::from_iter(failure.termination()),
                term,
                "{failure:?}"
            );
        }
    }

    #[test]
    fn error_pages() {
        assert!(page(StatusCode::SERVICE_UNAVAILABLE).contains("503 Service Unavailable"));
        let answer = String::from_utf8(timeout_408().to_vec()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 408 Request Time-out\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        assert!(head.contains("connection: close"));
        assert!(body.contains("<h1>408 Request Time-out</h1>"));
    }
}
