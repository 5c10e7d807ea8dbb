//! The agent's side of the control socket.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use super::frame::{FrameError, decode, peek_version, read_frame_async, write_message_async};
use super::protocol::{Envelope, PROTOCOL_VERSION, Request, Response};

/// How long a client may take to send a frame, or to take our answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers control requests; the agent implements it over its state.
pub trait Handler: Send + Sync + 'static {
    /// Carries out one request; runs on a blocking thread.
    fn handle(&self, request: Request) -> Response;
}

/// Binds the control socket at `path` (see `serve`) without accepting yet.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    remove_if_stale(path)?;
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Control is root's business: nobody else may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting permissions of {}", path.display()))?;
    Ok(listener)
}

/// Removes a socket file nobody answers on; refuses to take over a live one.
fn remove_if_stale(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("another agent is already serving {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            debug!("removing stale control socket {}", path.display());
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing stale {}", path.display()))
                }
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("probing {}", path.display())),
    }
}

/// Removes the control socket at `path` on shutdown (if it is a socket).
pub fn remove_socket(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("removing control socket {}: {e}", path.display());
            }
        }
        _ => {}
    }
}

/// Serves control requests on a Unix socket at `path` until an error; see `bind`.
pub async fn serve(path: PathBuf, handler: Arc<dyn Handler>) -> anyhow::Result<()> {
    let listener = bind(&path)?;
    info!("control socket listening on {}", path.display());
    serve_listener(listener, handler).await
}

/// Accepts connections on an already bound listener, one task each; never returns Ok.
pub async fn serve_listener(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
) -> anyhow::Result<()> {
    let mut errors = lb_proxy::accept_errors::AcceptErrors::new("control socket");
    loop {
        let (stream, _) = errors.accept(|| listener.accept()).await;
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            debug!("control connection opened");
            connection(stream, handler).await;
            debug!("control connection closed");
        });
    }
}

/// What to do with a request frame.
enum Verdict {
    /// A valid request for the handler.
    Handle(Request),
    /// Answer with this error and keep the connection (framing is intact).
    Refuse(Response),
    /// Answer with this error and close (the peer is not speaking our protocol).
    RefuseAndClose(Response),
}

fn judge(body: &[u8]) -> Verdict {
    let version = match peek_version(body) {
        Ok(v) => v,
        Err(e) => return Verdict::RefuseAndClose(Response::Error(e.to_string())),
    };
    if version != PROTOCOL_VERSION {
        return Verdict::Refuse(Response::Error(format!(
            "unsupported control protocol version {version}; this agent speaks {PROTOCOL_VERSION}"
        )));
    }
    match decode::<Envelope<Request>>(body) {
        Ok(env) => Verdict::Handle(env.body),
        Err(e) => Verdict::RefuseAndClose(Response::Error(e.to_string())),
    }
}

async fn connection(mut stream: UnixStream, handler: Arc<dyn Handler>) {
    loop {
        let body = match tokio::time::timeout(IO_TIMEOUT, read_frame_async(&mut stream)).await {
            Err(_) => {
                debug!("control connection idle for {IO_TIMEOUT:?}; closing");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(body))) => body,
            Ok(Err(e @ FrameError::TooLarge { .. })) => {
                debug!("control request refused: {e}");
                reply(&mut stream, Response::Error(e.to_string())).await;
                return;
            }
            Ok(Err(e)) => {
                debug!("control connection read: {e}");
                return;
            }
        };
        let (response, close) = match judge(&body) {
            Verdict::Handle(request) => {
                debug!("control request {request:?}");
                let handler = Arc::clone(&handler);
                let response = tokio::task::spawn_blocking(move || handler.handle(request))
                    .await
                    .unwrap_or_else(|e| {
                        warn!("control handler failed: {e}");
                        Response::Error("internal error while handling the request".into())
                    });
                (response, false)
            }
            Verdict::Refuse(response) => (response, false),
            Verdict::RefuseAndClose(response) => (response, true),
        };
        if let Response::Error(msg) = &response {
            debug!("control request answered with error: {msg}");
        }
        if !reply(&mut stream, response).await || close {
            return;
        }
    }
}

/// Sends one response; false when the connection is no longer usable.
async fn reply(stream: &mut UnixStream, response: Response) -> bool {
    let env = Envelope {
        version: PROTOCOL_VERSION,
        body: response,
    };
    let write = async {
        match write_message_async(stream, &env).await {
            // A listing too big for one frame still deserves an answer.
            Err(e @ FrameError::TooLarge { .. }) => {
                let env = Envelope {
                    version: PROTOCOL_VERSION,
                    body: Response::Error(format!("answer too large: {e}")),
                };
                write_message_async(stream, &env).await
            }
            other => other,
        }
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            debug!("control connection write: {e}");
            false
        }
        Err(_) => {
            debug!("control client did not take the answer within {IO_TIMEOUT:?}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdStream;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::control::client::{self, ClientError};
    use crate::control::frame::{encode, read_frame, write_frame, write_message};
    use crate::control::protocol::{MAX_FRAME, ReasonCount};

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "lb-control-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Records requests; answers `ShowStats` with a listing, "missing" with an error, the rest Ok.
    #[derive(Default)]
    struct Fake {
        seen: Mutex<Vec<Request>>,
    }

    impl Handler for Fake {
        fn handle(&self, request: Request) -> Response {
            self.seen.lock().unwrap().push(request.clone());
            match request {
                Request::ShowStats => Response::Stats(vec![ReasonCount {
                    reason: "tx_forward".into(),
                    packets: 1,
                    bytes: 64,
                }]),
                Request::RemoveService { name } if name == "missing" => {
                    Response::Error(format!("no service {name:?}"))
                }
                _ => Response::Ok,
            }
        }
    }

    fn start(path: &Path) -> (Arc<Fake>, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let fake = Arc::new(Fake::default());
        let listener = bind(path).unwrap();
        let task = tokio::spawn(serve_listener(listener, fake.clone()));
        (fake, task)
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    fn read_response(s: &mut StdStream) -> Envelope<Response> {
        let body = read_frame(s).unwrap().expect("a response");
        decode(&body).unwrap()
    }

    fn is_closed(s: &mut StdStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(s.read(&mut buf), Ok(0))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn request_and_response_through_the_client() {
        let dir = TempDir::new();
        let path = dir.0.join("run/lb/lb.sock");
        let (fake, task) = start(&path);

        let p = path.clone();
        let answer = blocking(move || client::request(&p, Request::ShowStats))
            .await
            .unwrap();
        assert!(matches!(answer, Response::Stats(ref v) if v.len() == 1));
        let p = path.clone();
        let answer = blocking(move || {
            client::request(
                &p,
                Request::RemoveService {
                    name: "missing".into(),
                },
            )
        })
        .await
        .unwrap();
        assert_eq!(answer, Response::Error("no service \"missing\"".into()));
        assert_eq!(
            *fake.seen.lock().unwrap(),
            vec![
                Request::ShowStats,
                Request::RemoveService {
                    name: "missing".into()
                }
            ]
        );

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn several_requests_on_one_connection() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        let (fake, task) = start(&path);
        let requests = vec![Request::Reload, Request::ShowStats, Request::ShowServices];
        let sent = requests.clone();
        let answers = blocking(move || {
            let mut s = StdStream::connect(&path).unwrap();
            let mut answers = Vec::new();
            for body in sent {
                let env = Envelope {
                    version: PROTOCOL_VERSION,
                    body,
                };
                write_message(&mut s, &env).unwrap();
                answers.push(read_response(&mut s).body);
            }
            answers
        })
        .await;
        assert_eq!(answers[0], Response::Ok);
        assert!(matches!(answers[1], Response::Stats(_)));
        assert_eq!(answers[2], Response::Ok);
        assert_eq!(*fake.seen.lock().unwrap(), requests);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn other_version_is_refused_and_connection_kept() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        let (fake, task) = start(&path);
        blocking(move || {
            let mut s = StdStream::connect(&path).unwrap();
            // An envelope of the next version, whose body this agent could not decode anyway.
            let next = PROTOCOL_VERSION + 1;
            let mut body = next.to_le_bytes().to_vec();
            body.extend_from_slice(&[0xde, 0xad]);
            write_frame(&mut s, &body).unwrap();
            let env = read_response(&mut s);
            assert_eq!(env.version, PROTOCOL_VERSION);
            assert_eq!(
                env.body,
                Response::Error(format!(
                    "unsupported control protocol version {next}; this agent speaks {PROTOCOL_VERSION}"
                ))
            );
            let env = Envelope {
                version: PROTOCOL_VERSION,
                body: Request::Reload,
            };
            write_message(&mut s, &env).unwrap();
            assert_eq!(read_response(&mut s).body, Response::Ok);
        })
        .await;
        assert_eq!(*fake.seen.lock().unwrap(), vec![Request::Reload]);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn oversized_and_malformed_frames_are_refused_and_closed() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        let (fake, task) = start(&path);
        let p = path.clone();
        blocking(move || {
            let mut s = StdStream::connect(&p).unwrap();
            s.write_all(&(MAX_FRAME + 1).to_be_bytes()).unwrap();
            let env = read_response(&mut s);
            assert!(
                matches!(env.body, Response::Error(ref m) if m.contains("exceeds the limit")),
                "{env:?}"
            );
            assert!(is_closed(&mut s));

            let mut s = StdStream::connect(&p).unwrap();
            let mut body = encode(&Envelope {
                version: PROTOCOL_VERSION,
                body: Request::Reload,
            })
            .unwrap();
            body[4] = 0xff; // no such variant
            write_frame(&mut s, &body).unwrap();
            let env = read_response(&mut s);
            assert!(
                matches!(env.body, Response::Error(ref m) if m.starts_with("malformed message")),
                "{env:?}"
            );
            assert!(is_closed(&mut s));
        })
        .await;
        assert!(fake.seen.lock().unwrap().is_empty());
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stale_socket_is_replaced() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (_fake, task) = start(&path);
        let p = path.clone();
        let answer = blocking(move || client::request(&p, Request::Reload)).await;
        assert_eq!(answer.unwrap(), Response::Ok);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn live_socket_is_not_taken_over() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        let (_fake, task) = start(&path);
        let err = serve(path.clone(), Arc::new(Fake::default()))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("another agent is already serving {}", path.display())
        );
        // The first agent still answers.
        let p = path.clone();
        let answer = blocking(move || client::request(&p, Request::Reload)).await;
        assert_eq!(answer.unwrap(), Response::Ok);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn other_files_are_not_replaced() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        remove_socket(&path);
        assert!(path.exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn client_reports_missing_agent_and_remove_socket_cleans_up() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        let p = path.clone();
        let err = blocking(move || client::request(&p, Request::Reload))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "no agent is listening on {} (is `lb run` running?)",
                path.display()
            )
        );

        let (_fake, task) = start(&path);
        task.abort();
        let _ = task.await;
        // Listener closed, file left behind: refused, still "not running".
        let p = path.clone();
        let err = blocking(move || client::request(&p, Request::Reload))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
        remove_socket(&path);
        assert!(!path.exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn client_refuses_an_agent_of_another_version() {
        let dir = TempDir::new();
        let path = dir.0.join("lb.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let agent = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            read_frame(&mut s).unwrap();
            let env = Envelope {
                version: 7,
                body: Response::Ok,
            };
            write_message(&mut s, &env).unwrap();
        });
        let p = path.clone();
        let err = blocking(move || client::request(&p, Request::Reload))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::VersionMismatch { agent: 7 }),
            "{err:?}"
        );
        agent.join().unwrap();
    }
}
