//! Accepting client connections, and registering their sockets with tokio's
//! reactor only once they would block.
//!
//! tokio registers every accepted socket with epoll (`EPOLL_CTL_ADD`) and
//! deregisters it when dropped (`EPOLL_CTL_DEL`, and a wake-up of its driver
//! every 16 releases). A client that sends its request right behind the
//! handshake and is answered at once never makes the proxy wait on its
//! socket, so for it those calls are pure cost: with a new connection per
//! request they were two of the syscalls of every request. HAProxy reads
//! first and subscribes to epoll only when a read would block; so does this.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A listening socket whose accepted connections start unregistered.
pub(crate) struct Listener {
    fd: AsyncFd<std::net::TcpListener>,
}

impl Listener {
    /// Takes a non-blocking listening socket.
    pub(crate) fn from_std(listener: std::net::TcpListener) -> io::Result<Listener> {
        // SAFETY: the std listener owns its descriptor, which stays open and
        // the same until the AsyncFd (its owner from here on) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Listener { fd })
    }

    /// The address the socket is bound to.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.fd.get_ref().local_addr()
    }

    /// The next connection, non-blocking and not registered with the reactor.
    pub(crate) fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(ClientStream, SocketAddr)>> {
        loop {
            let mut ready = ready!(self.fd.poll_read_ready(cx))?;
            if let Ok(r) = ready.try_io(|l| accept4(l.get_ref())) {
                return Poll::Ready(r);
            }
        }
    }

    /// `poll_accept` as a future.
    #[cfg(test)]
    async fn accept(&self) -> io::Result<(ClientStream, SocketAddr)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }
}

/// `accept4` with `SOCK_NONBLOCK`, so no second call sets it.
fn accept4(listener: &std::net::TcpListener) -> io::Result<(ClientStream, SocketAddr)> {
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: try_init hands accept4 storage and length that fit each other.
    let (fd, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(listener.as_raw_fd(), storage.cast(), len, flags);
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })
    }?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection without an IP peer"))?;
    Ok((ClientStream::new(stream), peer))
}

/// An accepted client connection: read and written directly until an
/// operation would block, then a registered tokio stream.
pub(crate) struct ClientStream {
    state: State,
    /// Writes may be held for the FIN that follows them (`HoldForFin`).
    hold: bool,
    /// The last write waited for room the client did not make.
    blocked: bool,
}

/// A stream whose last bytes may wait for the FIN that follows them, to
/// leave with it in one segment: the client then gets the answer and the
/// close in one packet, and acknowledges both with one (HAProxy sends the
/// FIN on its own). Streams that cannot do it ignore the hint.
pub(crate) trait HoldForFin {
    /// What is written from now on comes right before the shutdown.
    fn hold_for_fin(&mut self) {}
}

impl HoldForFin for ClientStream {
    fn hold_for_fin(&mut self) {
        self.hold = true;
    }
}

impl<T: HoldForFin> HoldForFin for tokio_rustls::server::TlsStream<T> {
    fn hold_for_fin(&mut self) {
        // The close_notify alert then leaves with the last record and the FIN.
        self.get_mut().0.hold_for_fin();
    }
}

enum State {
    /// Not known to the reactor: nothing has waited on it yet.
    Direct(std::net::TcpStream),
    Registered(TcpStream),
    /// Registration failed; the socket is closed.
    Lost,
}

impl ClientStream {
    /// Takes an accepted, non-blocking stream.
    pub(crate) fn new(stream: std::net::TcpStream) -> ClientStream {
        ClientStream {
            state: State::Direct(stream),
            hold: false,
            blocked: false,
        }
    }

    /// The socket, for its options.
    fn sock(&self) -> io::Result<socket2::SockRef<'_>> {
        match &self.state {
            State::Direct(s) => Ok(socket2::SockRef::from(s)),
            State::Registered(s) => Ok(socket2::SockRef::from(s)),
            State::Lost => Err(lost()),
        }
    }

    /// TCP_NODELAY and TCP_QUICKACK (for tests: they come from the listener).
    #[cfg(test)]
    fn nodelay_and_quickack(&self) -> io::Result<(bool, bool)> {
        let sock = self.sock()?;
        Ok((sock.tcp_nodelay()?, sock.tcp_quickack()?))
    }

    /// Sets SO_SNDBUF, which turns the kernel's autotuning off: what a
    /// client that reads slowly holds in kernel memory stays that small,
    /// and a response larger waits on the client, within `timeout_client`.
    pub(crate) fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        self.sock()?.set_send_buffer_size(bytes)
    }

    /// The local address of the connection.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.state {
            State::Direct(s) => s.local_addr(),
            State::Registered(s) => s.local_addr(),
            State::Lost => Err(lost()),
        }
    }

    /// Whether the reactor knows the socket (for tests).
    #[cfg(test)]
    fn is_registered(&self) -> bool {
        matches!(self.state, State::Registered(_))
    }

    /// The registered stream, registering the socket first if needed.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let State::Direct(_) = self.state {
            let State::Direct(s) = std::mem::replace(&mut self.state, State::Lost) else {
                unreachable!("checked above")
            };
            self.state = State::Registered(TcpStream::from_std(s)?);
        }
        match &mut self.state {
            State::Registered(s) => Ok(s),
            _ => Err(lost()),
        }
    }
}

fn lost() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client socket lost")
}

/// Repeats `op` while interrupted by a signal.
fn retry<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// One `send`; MSG_MORE with `hold` (the segment waits for more, or the FIN).
fn send(fd: RawFd, buf: &[u8], hold: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if hold { libc::MSG_MORE } else { 0 };
    retry(|| {
        // SAFETY: the pointer and length describe `buf`.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// `send` of several buffers in one `sendmsg`.
fn send_vectored(fd: RawFd, bufs: &[io::IoSlice<'_>], hold: bool) -> io::Result<usize> {
    /// Linux's IOV_MAX: more buffers are left for the next call.
    const IOV_MAX: usize = 1024;
    let flags = libc::MSG_NOSIGNAL | if hold { libc::MSG_MORE } else { 0 };
    retry(|| {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on Unix; sendmsg only reads them.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(IOV_MAX) as _;
        // SAFETY: msg points at `bufs`, valid for the call.
        let n = unsafe { libc::sendmsg(fd, &msg, flags) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// One `recv` into the unfilled part of `buf`.
fn recv(stream: &std::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: recv only writes into the memory, so uninitialised bytes are fine.
    let unfilled: &mut [MaybeUninit<u8>] = unsafe { buf.unfilled_mut() };
    let n = retry(|| {
        // SAFETY: the pointer and length describe `unfilled`.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                unfilled.as_mut_ptr().cast(),
                unfilled.len(),
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })?;
    // SAFETY: recv initialised the first n bytes.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let State::Direct(s) = &self.state {
            match recv(s, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
        Pin::new(self.registered()?).poll_read(cx, buf)
    }
}

impl ClientStream {
    /// Runs `op` (a send on the descriptor, with the hold flag) directly, or
    /// once registered, whenever the socket is writable.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        op: impl Fn(RawFd, bool) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let r = self.poll_send_now(cx, op);
        self.blocked = r.is_pending();
        r
    }

    fn poll_send_now(
        &mut self,
        cx: &mut Context<'_>,
        op: impl Fn(RawFd, bool) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let hold = self.hold;
        if let State::Direct(s) = &self.state {
            match op(s.as_raw_fd(), hold) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
        let s = self.registered()?;
        loop {
            ready!(s.poll_write_ready(cx))?;
            match s.try_io(Interest::WRITABLE, || op(s.as_raw_fd(), hold)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

/// A connection dropped while a write waits for the client to make room
/// (it ends for `timeout_client`, a shutdown or an error) is reset, as
/// nginx's `reset_timedout_connection`: closed gracefully, the kernel would
/// keep the unsent answer (up to the send buffer) and go on sending it for
/// as long as the client reads a little now and then, after the proxy let
/// go: memory a slow reader could pin per connection.
impl Drop for ClientStream {
    fn drop(&mut self) {
        if self.blocked
            && let Ok(sock) = self.sock()
        {
            // Linger 0: close() discards what is unsent and sends RST.
            let _ = sock.set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, |fd, hold| send(fd, buf, hold))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // TLS streams write their records this way: the hold applies here too.
        self.poll_send(cx, |fd, hold| send_vectored(fd, bufs, hold))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Direct(s) => Poll::Ready(s.shutdown(Shutdown::Write)),
            State::Registered(s) => Pin::new(s).poll_shutdown(cx),
            State::Lost => Poll::Ready(Err(lost())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::model::MIN_SEND_BUFFER;

    fn listener() -> Listener {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        Listener::from_std(l).unwrap()
    }

    #[tokio::test]
    async fn a_ready_exchange_never_registers_and_a_wait_does() {
        let l = listener();
        let addr = l.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let (mut s, peer) = l.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        // The bytes may trail the handshake by a moment: poll for them
        // directly, as a registration would change what is under test.
        let mut buf = [0u8; 4];
        let mut got = 0;
        for _ in 0..200 {
            if got == 4 {
                break;
            }
            if let State::Direct(d) = &s.state {
                let mut rb = ReadBuf::new(&mut buf[got..]);
                match recv(d, &mut rb) {
                    Ok(()) => got += rb.filled().len(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").await.unwrap();
        assert!(!s.is_registered(), "nothing waited, nothing registered");
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"pong");
        // Now the client is silent: the read waits, registered, and is woken.
        let reader = tokio::spawn(async move {
            let mut more = [0u8; 5];
            s.read_exact(&mut more)
                .await
                .map(|_| (more, s.is_registered()))
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        client.write_all(b"later").await.unwrap();
        let (more, registered) = reader.await.unwrap().unwrap();
        assert_eq!(&more, b"later");
        assert!(registered);
    }

    #[tokio::test]
    async fn held_bytes_leave_with_the_fin() {
        let l = listener();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        client.set_nonblocking(true).unwrap();
        s.hold_for_fin();
        s.write_all(b"b").await.unwrap();
        // As TLS streams write: vectored.
        let parts = [io::IoSlice::new(b"y"), io::IoSlice::new(b"e")];
        assert_eq!(s.write_vectored(&parts).await.unwrap(), 2);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut got = [0u8; 8];
        let early = (&client).read(&mut got);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "held until the shutdown: {early:?}"
        );
        s.shutdown().await.unwrap();
        client.set_nonblocking(false).unwrap();
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut &client, &mut all).unwrap();
        assert_eq!(all, b"bye");
    }

    /// Writes to `s` until one waits (the client reads nothing), within
    /// 2 s; returns how much went.
    async fn fill(s: &mut ClientStream) -> usize {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.write(&chunk)).await {
            sent += n;
        }
        sent
    }

    /// What a client that finally reads gets: its bytes, and how it ended.
    fn drain(client: std::net::TcpStream) -> (usize, io::Result<()>) {
        client.set_nonblocking(false).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match (&client).read(&mut buf) {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got += n,
                Err(e) => return (got, Err(e)),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_dropped_while_its_client_takes_nothing_is_reset() {
        let l = listener();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        s.set_send_buffer(MIN_SEND_BUFFER).unwrap();
        let sent = fill(&mut s).await;
        assert!(sent > 0);
        drop(s);
        let (_, end) = drain(client);
        let e = end.expect_err("a reset, not an orderly end");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    #[tokio::test]
    async fn a_connection_dropped_after_its_writes_went_out_ends_in_order() {
        let l = listener();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&[1u8; 1000]).await.unwrap();
        drop(s);
        let (got, end) = drain(client);
        assert_eq!((got, end.map_err(|e| e.kind())), (1000, Ok(())));
    }

    #[tokio::test]
    async fn send_buffer_caps_what_the_kernel_takes_for_a_client() {
        let l = listener();
        let _a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _b = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut capped, _) = l.accept().await.unwrap();
        let (mut tuned, _) = l.accept().await.unwrap();
        capped.set_send_buffer(MIN_SEND_BUFFER).unwrap();
        let (capped, tuned) = (fill(&mut capped).await, fill(&mut tuned).await);
        assert!(
            capped * 4 < tuned,
            "capped {capped} bytes, autotuned {tuned}"
        );
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_delayed_acks() {
        let l = crate::reuseport_listener("127.0.0.1:0".parse().unwrap())
            .and_then(Listener::from_std)
            .unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        // Quick ACKs off only holds when set after listen(), which resets it.
        assert_eq!(s.nodelay_and_quickack().unwrap(), (true, false));
    }

    #[tokio::test]
    async fn a_clean_close_reads_as_the_end() {
        let l = listener();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        drop(client);
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
    }
}
