//! The server: negotiation, then the transmission phase of one connection, and the
//! listeners that run a connection per client.
//!
//! A connection's reader parses requests continuously and hands each to a blocking
//! thread (bounded by [`ServerConfig::max_in_flight`] requests and
//! [`ServerConfig::max_in_flight_bytes`] of payload); replies go through one writer task,
//! in completion order, as NBD allows.

use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

use super::payload::{Payload, Pool};
use super::proto::*;
use super::{BlockDevice, DeviceError, Export, ExportError, Exports, Intent, ZeroFlags};

/// Limits that keep one client from making the server allocate without bound.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest read or write payload (also the advertised maximum block size).
    pub max_payload: u32,
    /// Largest option payload accepted during negotiation; longer ones are skipped and
    /// answered `NBD_REP_ERR_TOO_BIG`.
    pub max_option_len: u32,
    /// Requests of one connection being served at once.
    pub max_in_flight: usize,
    /// Read and write payload bytes of one connection held at once.
    pub max_in_flight_bytes: usize,
    /// A client that has not finished negotiating after this long is disconnected.
    pub handshake_timeout: Duration,
    /// Writes without FUA up to this many bytes are served on the connection's task
    /// rather than handed to a blocking thread (0: never). The device's `write` must be
    /// quick for them (memory and an unsynced log append).
    pub inline_write_max: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 << 20,
            max_option_len: 64 << 10,
            max_in_flight: 32,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(30),
            inline_write_max: 64 << 10,
        }
    }
}

/// Why a connection ended other than by the client's orderly `NBD_CMD_DISC` or EOF.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket failed (includes a client vanishing mid-message).
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol in a way that cannot be answered.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// Negotiation took longer than the configured timeout.
    #[error("negotiation timed out")]
    Timeout,
}

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A non-loopback address was given without allowing remote clients.
    #[error("{0} is not a loopback address; remote clients must be allowed explicitly")]
    NotLoopback(SocketAddr),
    /// Binding failed. (The OS error is the source, not repeated in the message.)
    #[error("bind {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What a connection did, for the server's owner to log ([`Server::on_event`]). Its
/// `Display` is one line that starts with the peer.
#[derive(Debug)]
pub enum Event<'a> {
    /// Negotiation ended with `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`): `export` is
    /// served until the connection ends.
    Serving {
        /// Who the client is (as given to [`Exports::open`]).
        peer: &'a str,
        /// The export.
        export: &'a str,
        /// Whether the device refuses writes.
        read_only: bool,
    },
    /// An export could not be opened; the client was told why (the option reply's
    /// message is `error`'s text).
    Refused {
        /// Who the client is.
        peer: &'a str,
        /// The export asked for.
        export: &'a str,
        /// Why.
        error: &'a ExportError,
    },
    /// The device failed a request (the client got the NBD error for it): a read of a
    /// corrupt or missing chunk, a backend error. Client mistakes (a read past the end,
    /// a write to a read-only export) are not events.
    Failed {
        /// Who the client is.
        peer: &'a str,
        /// The export.
        export: &'a str,
        /// `read`, `write`, `flush`, ...
        command: &'static str,
        /// The request's range.
        offset: u64,
        /// Its length.
        len: u32,
        /// What the device said.
        error: &'a DeviceError,
    },
    /// The connection ended, after serving `export` (None: it only negotiated), cleanly
    /// or with `error`.
    Closed {
        /// Who the client was.
        peer: &'a str,
        /// The export it was served, if any.
        export: Option<&'a str>,
        /// Why it ended, when not by the client's orderly goodbye.
        error: Option<&'a ConnectionError>,
    },
}

impl std::fmt::Display for Event<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Serving {
                peer,
                export,
                read_only,
            } => {
                let mode = if *read_only {
                    "read-only"
                } else {
                    "read-write"
                };
                write!(f, "{peer}: serving export {export:?} ({mode})")
            }
            Event::Refused {
                peer,
                export,
                error,
            } => write!(f, "{peer}: refused export {export:?}: {error}"),
            Event::Failed {
                peer,
                export,
                command,
                offset,
                len,
                error,
            } => write!(
                f,
                "{peer}: {command} of {len} bytes at {offset} of export {export:?} failed: {error}"
            ),
            Event::Closed {
                peer,
                export,
                error,
            } => {
                match export {
                    Some(e) => write!(f, "{peer}: disconnected from export {e:?}")?,
                    None => write!(f, "{peer}: disconnected (no export served)")?,
                }
                match error {
                    Some(e) => write!(f, ": {e}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Where a server reports its [`Event`]s.
type EventSink = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// An NBD server over some [`Exports`]. Cheap to clone; clones serve the same exports.
#[derive(Clone)]
pub struct Server {
    exports: Arc<dyn Exports>,
    config: Arc<ServerConfig>,
    events: Option<EventSink>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `pid 1234 (qemu-io)` for the process at the other end of a Unix socket, from its
/// credentials (None when the kernel gives no pid). Also volumed's name for its RPC
/// clients.
pub fn unix_peer_process(stream: &tokio::net::UnixStream) -> Option<String> {
    let pid = stream.peer_cred().ok().and_then(|c| c.pid())?;
    Some(match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!("pid {pid} ({})", comm.trim_end()),
        Err(_) => format!("pid {pid}"),
    })
}

/// `nbd client pid 1234 (qemu-io)` for a Unix-socket client.
fn unix_peer(stream: &tokio::net::UnixStream) -> String {
    match unix_peer_process(stream) {
        Some(p) => format!("nbd client {p}"),
        None => "nbd client on the unix socket".to_string(),
    }
}

/// Reads up to this long may be answered on the connection's task
/// ([`BlockDevice::read_in_memory`]): a copy of this size costs less than a thread
/// hand-off, and the task is not held long.
const FAST_READ_MAX: u32 = 256 << 10;

/// A command's name for messages.
fn command_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        _ => "command",
    }
}

/// The only mapping from device errors to NBD error values.
fn errno(e: &DeviceError) -> u32 {
    match e {
        DeviceError::ReadOnly => EPERM,
        DeviceError::NoSpace => ENOSPC,
        DeviceError::NotFast => ENOTSUP,
        DeviceError::Invalid(_) => EINVAL,
        DeviceError::Backend(_) => EIO,
        DeviceError::Io(e) => match e.raw_os_error() {
            Some(libc::EPERM | libc::EROFS | libc::EACCES) => EPERM,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            Some(libc::ENOMEM) => ENOMEM,
            Some(libc::EINVAL) => EINVAL,
            Some(libc::EOVERFLOW) => EOVERFLOW,
            Some(libc::EOPNOTSUPP) => ENOTSUP,
            Some(libc::ESHUTDOWN) => ESHUTDOWN,
            _ => EIO,
        },
    }
}

/// The only mapping from export errors to NBD option replies.
fn rep_err(e: &ExportError) -> u32 {
    match e {
        ExportError::NotFound(_) | ExportError::Failed(_) => REP_ERR_UNKNOWN,
        ExportError::InUse { .. } | ExportError::Denied(_) => REP_ERR_POLICY,
        ExportError::ShuttingDown => REP_ERR_SHUTDOWN,
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What negotiation settled for the transmission phase.
struct Session {
    export: Export,
    structured: bool,
    base_allocation: bool,
}

/// Negotiation state: what the client has asked for so far.
#[derive(Default)]
struct Negotiation {
    /// Who the client is, for [`Exports::open`].
    peer: String,
    structured: bool,
    /// The export `NBD_OPT_SET_META_CONTEXT` named and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
}

/// A parsed option payload cursor; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// One reply on its way to the writer, holding the permits its request took until
/// its bytes are written.
struct Reply {
    bytes: Vec<u8>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

async fn write_opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    typ: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}

fn simple_reply(cookie: u64, error: u32, data_len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data_len);
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk_header(b: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, len: usize) {
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(len as u32).to_be_bytes());
}

/// An error reply to `req`, simple or structured as negotiated.
fn error_reply(structured: bool, cookie: u64, error: u32, message: &str) -> Vec<u8> {
    if !structured {
        return simple_reply(cookie, error, 0);
    }
    let msg = truncate(message, 4096).as_bytes();
    let mut b = Vec::with_capacity(20 + 6 + msg.len());
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len(),
    );
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

fn ok_reply(structured: bool, cookie: u64) -> Vec<u8> {
    if !structured {
        return simple_reply(cookie, 0, 0);
    }
    let mut b = Vec::with_capacity(20);
    chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    b
}

impl Server {
    /// A server offering `exports`.
    pub fn new(exports: Arc<dyn Exports>, config: ServerConfig) -> Self {
        Server {
            exports,
            config: Arc::new(config),
            events: None,
        }
    }

    /// Reports every connection's [`Event`]s to `f` (called on the connection's task;
    /// it should be quick, e.g. one log line).
    pub fn on_event(mut self, f: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.events = Some(Arc::new(f));
        self
    }

    fn event(&self, e: Event<'_>) {
        if let Some(f) = &self.events {
            f(&e);
        }
    }

    /// Binds a TCP listener. Only loopback addresses are accepted unless
    /// `allow_remote`: NBD has no authentication here, so exposing it is a decision.
    pub async fn bind_tcp(
        addr: SocketAddr,
        allow_remote: bool,
    ) -> Result<TcpListener, ListenError> {
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(ListenError::NotLoopback(addr));
        }
        TcpListener::bind(addr)
            .await
            .map_err(|source| ListenError::Bind {
                addr: addr.to_string(),
                source,
            })
    }

    /// Serves every client of `listener`, each on its own task, until an accept fails
    /// with an error that is not about one client (then it returns that error).
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let peer = unix_peer(&stream);
                    let (r, w) = stream.into_split();
                    self.spawn(peer, r, w);
                }
                Err(e) => Self::accept_failed(e).await?,
            }
        }
    }

    /// As [`Server::serve_unix`], for TCP.
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    self.spawn(format!("nbd client {addr}"), r, w);
                }
                Err(e) => Self::accept_failed(e).await?,
            }
        }
    }

    /// Out of descriptors or a client gone before accept: wait a little and go on.
    async fn accept_failed(e: io::Error) -> io::Result<()> {
        let transient = matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if transient {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(())
        } else {
            Err(e)
        }
    }

    fn spawn<R, W>(&self, peer: String, r: R, w: W)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            // A connection's failure is the client's business; it never reaches others.
            let _ = me.serve_connection(peer, r, w).await;
        });
    }

    /// Serves one connection (already accepted) to its end. `peer` describes the client
    /// to [`Exports::open`] (who holds an export, in error messages).
    pub async fn serve_connection<R, W>(
        &self,
        peer: String,
        r: R,
        w: W,
    ) -> Result<(), ConnectionError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut r = BufReader::with_capacity(64 << 10, r);
        let mut w = BufWriter::with_capacity(64 << 10, w);
        let session = tokio::time::timeout(
            self.config.handshake_timeout,
            self.negotiate(peer.clone(), &mut r, &mut w),
        )
        .await
        .map_err(|_| ConnectionError::Timeout)
        .and_then(|r| r);
        let (export, r) = match session {
            // Negotiation flushed its last reply; the reply writer buffers on its own.
            Ok(Some((session, name))) => {
                self.event(Event::Serving {
                    peer: &peer,
                    export: &name,
                    read_only: session.export.device.read_only(),
                });
                (
                    Some(name.clone()),
                    self.transmit(session, &peer, &name, r, w.into_inner())
                        .await,
                )
            }
            Ok(None) => (None, Ok(())),
            Err(e) => (None, Err(e)),
        };
        self.event(Event::Closed {
            peer: &peer,
            export: export.as_deref(),
            error: r.as_ref().err(),
        });
        r
    }

    /// Opens an export for the client (on a blocking thread), reporting a refusal.
    async fn open_for(
        &self,
        state: &Negotiation,
        name: &str,
        intent: Intent,
    ) -> Result<Export, ExportError> {
        let r = self.open(name, intent, &state.peer).await;
        if let Err(error) = &r {
            self.event(Event::Refused {
                peer: &state.peer,
                export: name,
                error,
            });
        }
        r
    }

    async fn negotiate<R, W>(
        &self,
        peer: String,
        r: &mut R,
        w: &mut W,
    ) -> Result<Option<(Session, String)>, ConnectionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        w.write_all(&NBDMAGIC.to_be_bytes()).await?;
        w.write_all(&IHAVEOPT.to_be_bytes()).await?;
        w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .await?;
        w.flush().await?;
        let client_flags = r.read_u32().await?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ConnectionError::Protocol("unknown client flags"));
        }
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            // Plain newstyle clients cannot be told about unknown options; we only
            // speak fixed newstyle.
            return Err(ConnectionError::Protocol("client is not fixed newstyle"));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        let mut state = Negotiation {
            peer,
            ..Negotiation::default()
        };
        loop {
            if r.read_u64().await? != IHAVEOPT {
                return Err(ConnectionError::Protocol("bad option magic"));
            }
            let opt = r.read_u32().await?;
            let len = r.read_u32().await?;
            if len > self.config.max_option_len {
                if opt == OPT_EXPORT_NAME {
                    return Err(ConnectionError::Protocol("export name too long"));
                }
                // Skip it without holding it; the reader's buffer bounds memory.
                let skipped =
                    tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink())
                        .await?;
                if skipped != len as u64 {
                    return Err(ConnectionError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                write_opt_reply(w, opt, REP_ERR_TOO_BIG, b"option too long").await?;
                w.flush().await?;
                continue;
            }
            let mut data = vec![0; len as usize];
            r.read_exact(&mut data).await?;
            let done = self.option(w, &mut state, opt, &data, no_zeroes).await?;
            w.flush().await?;
            match done {
                OptionOutcome::Continue => {}
                OptionOutcome::Abort => return Ok(None),
                OptionOutcome::Serve(export, name) => {
                    let base_allocation =
                        state.structured && matches!(&state.meta, Some((n, true)) if *n == name);
                    let session = Session {
                        export,
                        structured: state.structured,
                        base_allocation,
                    };
                    return Ok(Some((session, name)));
                }
            }
        }
    }

    /// Opens an export on a blocking thread.
    async fn open(&self, name: &str, intent: Intent, peer: &str) -> Result<Export, ExportError> {
        let exports = self.exports.clone();
        let (name, peer) = (name.to_owned(), peer.to_owned());
        match tokio::task::spawn_blocking(move || exports.open(&name, intent, &peer)).await {
            Ok(r) => r,
            Err(e) => Err(ExportError::Failed(Box::new(e))),
        }
    }

    /// The transmission flags for `device`.
    fn transmission_flags(device: &dyn BlockDevice, structured: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_CACHE;
        if structured {
            // Reads always come back as one chunk, so "don't fragment" is free.
            f |= TF_SEND_DF;
        }
        if device.read_only() {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES;
            if device.can_trim() {
                f |= TF_SEND_TRIM;
            }
            if device.can_fast_zero() {
                f |= TF_SEND_FAST_ZERO;
            }
        }
        if device.can_multi_conn() {
            f |= TF_CAN_MULTI_CONN;
        }
        f
    }

    async fn option<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        state: &mut Negotiation,
        opt: u32,
        data: &[u8],
        no_zeroes: bool,
    ) -> Result<OptionOutcome, ConnectionError> {
        let invalid = |msg: &'static str| (REP_ERR_INVALID, msg.to_string());
        let result: Result<OptionOutcome, (u32, String)> = match opt {
            OPT_EXPORT_NAME => {
                // No error reply exists for this option: failure closes the connection.
                let name = std::str::from_utf8(data)
                    .map_err(|_| ConnectionError::Protocol("export name not UTF-8"))?;
                let export = self
                    .open_for(state, name, Intent::Serve)
                    .await
                    .map_err(|_| ConnectionError::Protocol("export refused"))?;
                let dev = &export.device;
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&dev.size().to_be_bytes());
                b.extend_from_slice(
                    &Self::transmission_flags(dev.as_ref(), state.structured).to_be_bytes(),
                );
                if !no_zeroes {
                    b.extend_from_slice(&[0; 124]);
                }
                w.write_all(&b).await?;
                return Ok(OptionOutcome::Serve(export, name.to_owned()));
            }
            OPT_ABORT => {
                // The client may already be gone; the reply is a courtesy.
                let _ = write_opt_reply(w, opt, REP_ACK, &[]).await;
                return Ok(OptionOutcome::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    Err(invalid("NBD_OPT_LIST takes no data"))
                } else {
                    let exports = self.exports.clone();
                    match tokio::task::spawn_blocking(move || exports.list()).await {
                        Ok(Ok(list)) => {
                            for (name, description) in list {
                                let mut b = Vec::new();
                                b.extend_from_slice(&(name.len() as u32).to_be_bytes());
                                b.extend_from_slice(name.as_bytes());
                                if let Some(d) = description {
                                    b.extend_from_slice(d.as_bytes());
                                }
                                write_opt_reply(w, opt, REP_SERVER, &b).await?;
                            }
                            Ok(OptionOutcome::Continue)
                        }
                        Ok(Err(e)) => Err((rep_err(&e), e.to_string())),
                        Err(_) => Err((REP_ERR_UNKNOWN, "listing failed".into())),
                    }
                }
            }
            OPT_INFO | OPT_GO => self.info_or_go(w, state, opt, data).await?,
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    state.structured = true;
                    Ok(OptionOutcome::Continue)
                } else {
                    Err(invalid("NBD_OPT_STRUCTURED_REPLY takes no data"))
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(w, state, opt, data).await?
            }
            _ => Err((REP_ERR_UNSUP, format!("option {opt} not supported"))),
        };
        match result {
            Ok(OptionOutcome::Continue) => {
                write_opt_reply(w, opt, REP_ACK, &[]).await?;
                Ok(OptionOutcome::Continue)
            }
            Ok(done) => Ok(done),
            Err((code, msg)) => {
                write_opt_reply(w, opt, code, truncate(&msg, 4096).as_bytes()).await?;
                Ok(OptionOutcome::Continue)
            }
        }
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`; the final ACK of GO is sent here.
    async fn info_or_go<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        state: &Negotiation,
        opt: u32,
        data: &[u8],
    ) -> Result<Result<OptionOutcome, (u32, String)>, ConnectionError> {
        let mut c = Cursor(data);
        let Some(name) = c.string() else {
            return Ok(Err((REP_ERR_INVALID, "bad export name".into())));
        };
        let Some(n) = c.u16() else {
            return Ok(Err((REP_ERR_INVALID, "missing information count".into())));
        };
        let mut wanted = Vec::new();
        for _ in 0..n {
            match c.u16() {
                Some(i) => wanted.push(i),
                None => return Ok(Err((REP_ERR_INVALID, "short information list".into()))),
            }
        }
        if !c.0.is_empty() {
            return Ok(Err((REP_ERR_INVALID, "trailing data".into())));
        }
        let intent = if opt == OPT_GO {
            Intent::Serve
        } else {
            Intent::Query
        };
        let export = match self.open_for(state, name, intent).await {
            Ok(e) => e,
            Err(e) => return Ok(Err((rep_err(&e), e.to_string()))),
        };
        let dev = export.device.as_ref();
        let mut info = Vec::new();
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&dev.size().to_be_bytes());
        info.extend_from_slice(&Self::transmission_flags(dev, state.structured).to_be_bytes());
        write_opt_reply(w, opt, REP_INFO, &info).await?;
        if wanted.contains(&INFO_NAME) {
            let mut b = INFO_NAME.to_be_bytes().to_vec();
            b.extend_from_slice(name.as_bytes());
            write_opt_reply(w, opt, REP_INFO, &b).await?;
        }
        if let (true, Some(d)) = (wanted.contains(&INFO_DESCRIPTION), &export.description) {
            let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
            b.extend_from_slice(truncate(d, 4096).as_bytes());
            write_opt_reply(w, opt, REP_INFO, &b).await?;
        }
        // Always sent: the client learns our limits whether it asked or not.
        let sizes = self.block_sizes(dev);
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        b.extend_from_slice(&sizes.min.to_be_bytes());
        b.extend_from_slice(&sizes.preferred.to_be_bytes());
        b.extend_from_slice(&sizes.max.to_be_bytes());
        write_opt_reply(w, opt, REP_INFO, &b).await?;
        if opt == OPT_GO {
            write_opt_reply(w, opt, REP_ACK, &[]).await?;
            Ok(Ok(OptionOutcome::Serve(export, name.to_owned())))
        } else {
            Ok(Ok(OptionOutcome::Continue))
        }
    }

    /// The device's block sizes, clamped to what this server accepts.
    fn block_sizes(&self, dev: &dyn BlockDevice) -> super::BlockSizes {
        let mut s = dev.block_sizes();
        s.min = s.min.clamp(1, 1 << 16);
        s.max = s.max.min(self.config.max_payload).max(s.min);
        s.preferred = s.preferred.clamp(s.min, s.max);
        s
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: only
    /// `base:allocation` exists.
    async fn meta_context<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        state: &mut Negotiation,
        opt: u32,
        data: &[u8],
    ) -> Result<Result<OptionOutcome, (u32, String)>, ConnectionError> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set && !state.structured {
            return Ok(Err((
                REP_ERR_INVALID,
                "structured replies must be negotiated first".into(),
            )));
        }
        let mut c = Cursor(data);
        let Some(name) = c.string() else {
            return Ok(Err((REP_ERR_INVALID, "bad export name".into())));
        };
        let Some(n) = c.u32() else {
            return Ok(Err((REP_ERR_INVALID, "missing query count".into())));
        };
        let mut selected = false;
        for _ in 0..n {
            let Some(q) = c.string() else {
                return Ok(Err((REP_ERR_INVALID, "bad query".into())));
            };
            selected |= q == META_BASE_ALLOCATION || (!set && q == "base:");
        }
        if !c.0.is_empty() {
            return Ok(Err((REP_ERR_INVALID, "trailing data".into())));
        }
        if !set && n == 0 {
            selected = true;
        }
        if let Err(e) = self.open_for(state, name, Intent::Query).await {
            return Ok(Err((rep_err(&e), e.to_string())));
        }
        if selected {
            // A list reply carries no id the client could use; 0 says so.
            let id = if set { META_ID_BASE_ALLOCATION } else { 0 };
            let mut b = id.to_be_bytes().to_vec();
            b.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            write_opt_reply(w, opt, REP_META_CONTEXT, &b).await?;
        }
        if set {
            state.meta = Some((name.to_owned(), selected));
        }
        Ok(Ok(OptionOutcome::Continue))
    }

    async fn transmit<R, W>(
        &self,
        session: Session,
        peer: &str,
        export: &str,
        mut r: BufReader<R>,
        w: W,
    ) -> Result<(), ConnectionError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.config;
        let (tx, rx) = mpsc::channel::<Reply>(cfg.max_in_flight + 1);
        let writer = tokio::spawn(write_replies(rx, w));
        let count = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
        let page_budget = (cfg.max_in_flight_bytes / 4096).max(cfg.max_payload as usize / 4096 + 1);
        let bytes = Arc::new(Semaphore::new(page_budget));
        let dev = session.export.device.clone();
        let ctx = Arc::new(Context {
            dev: dev.clone(),
            structured: session.structured,
            base_allocation: session.base_allocation,
            size: dev.size(),
            sizes: self.block_sizes(dev.as_ref()),
            read_only: dev.read_only(),
            fast_zero: dev.can_fast_zero(),
            trim: dev.can_trim(),
            max_payload: cfg.max_payload,
            failed: self.events.clone().map(|sink| FailureSink {
                sink,
                peer: peer.to_string(),
                export: export.to_string(),
            }),
        });
        let mut tasks = JoinSet::new();
        // Write buffers are recycled: a fresh large allocation per request faults in and
        // zeroes every page. Idle ones are bounded like the bytes in flight.
        let payloads = Pool::new(cfg.max_in_flight_bytes);
        // Requests that arrived together run together on one blocking thread: handing
        // each small request to its own thread costs more in wake-ups than serving it.
        let mut batch: Vec<Job> = Vec::new();
        let result = loop {
            while tasks.try_join_next().is_some() {}
            if !batch.is_empty() && r.buffer().len() < 28 {
                dispatch(&mut tasks, &mut batch, &ctx, &tx);
            }
            let mut h = [0u8; 28];
            match r.read_exact(&mut h).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            let magic = u32::from_be_bytes(h[0..4].try_into().unwrap_or_default());
            if magic != REQUEST_MAGIC {
                break Err(ConnectionError::Protocol("bad request magic"));
            }
            let req = Request {
                flags: u16::from_be_bytes([h[4], h[5]]),
                typ: u16::from_be_bytes([h[6], h[7]]),
                cookie: u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
                offset: u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()),
                len: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
            };
            if req.typ == CMD_DISC {
                break Ok(());
            }
            if req.typ == CMD_WRITE && req.len > cfg.max_payload {
                // We will not hold the payload and cannot find the next request
                // without reading it: the protocol allows closing here.
                break Err(ConnectionError::Protocol("write payload too large"));
            }
            let data_len = match req.typ {
                CMD_READ => req.len.min(cfg.max_payload),
                CMD_WRITE => req.len,
                _ => 0,
            } as usize;
            // The batch holds permits: start it before waiting for more.
            let p1 = match count.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    dispatch(&mut tasks, &mut batch, &ctx, &tx);
                    match count.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break Ok(()),
                    }
                }
            };
            let p2 = if data_len > 0 {
                let pages = (data_len / 4096 + 1) as u32;
                match bytes.clone().try_acquire_many_owned(pages) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        dispatch(&mut tasks, &mut batch, &ctx, &tx);
                        match bytes.clone().acquire_many_owned(pages).await {
                            Ok(p) => Some(p),
                            Err(_) => break Ok(()),
                        }
                    }
                }
            } else {
                None
            };
            let permits = (p1, p2);
            let mut payload = Payload::empty();
            if req.typ == CMD_WRITE {
                payload = payloads.take(req.len as usize);
                if let Err(e) = r.read_exact(&mut payload).await {
                    break Err(e.into());
                }
            }
            if let Err(error) = ctx.check(&req) {
                let bytes = error_reply(ctx.structured, req.cookie, error, "");
                if !send(&tx, bytes, permits).await {
                    break Ok(());
                }
                continue;
            }
            if req.typ == CMD_READ
                && batch.is_empty()
                && let Some(bytes) = ctx.read_in_memory(&req)
            {
                // Served from memory without a thread hand-off (the batch is empty, so
                // this does not overtake anything queued before it; NBD allows any reply
                // order anyway).
                if !send(&tx, bytes, permits).await {
                    break Ok(());
                }
                continue;
            }
            if req.typ == CMD_WRITE
                && req.flags & CMD_FLAG_FUA == 0
                && req.len <= cfg.inline_write_max
                && batch.is_empty()
                && ctx.dev.write_is_quick(req.offset, req.len)
            {
                // A small write without FUA is a memory update and an unsynced WAL
                // append: serving it here costs half the CPU of a thread hand-off and its
                // wake-ups (measured with fio's 4 KiB random writes). It holds this
                // connection's reads of further requests only as long as the write.
                let bytes = ctx.execute_guarded(&req, &payload);
                if !send(&tx, bytes, permits).await {
                    break Ok(());
                }
                continue;
            }
            batch.push((req, payload, permits));
            if batch.len() >= 8 || data_len > 64 << 10 {
                dispatch(&mut tasks, &mut batch, &ctx, &tx);
            }
        };
        dispatch(&mut tasks, &mut batch, &ctx, &tx);
        // Finish what was asked, make it durable, then let the writer drain and stop.
        while tasks.join_next().await.is_some() {}
        if result.is_ok() {
            let dev = dev.clone();
            let _ = tokio::task::spawn_blocking(move || dev.flush()).await;
        }
        drop(tx);
        let _ = writer.await;
        result
    }
}

/// Queues a reply for the writer; false when the writer has gone (the connection died).
async fn send(
    tx: &mpsc::Sender<Reply>,
    bytes: Vec<u8>,
    permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
) -> bool {
    tx.send(Reply {
        bytes,
        _permits: permits,
    })
    .await
    .is_ok()
}

/// A checked request, its write payload and the permits it holds.
type Job = (
    Request,
    Payload,
    (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
);

/// Serves `batch` (emptying it) in order on one blocking thread, each reply sent as
/// soon as it is ready.
fn dispatch(
    tasks: &mut JoinSet<()>,
    batch: &mut Vec<Job>,
    ctx: &Arc<Context>,
    tx: &mpsc::Sender<Reply>,
) {
    if batch.is_empty() {
        return;
    }
    let jobs = std::mem::take(batch);
    let ctx = ctx.clone();
    let tx = tx.clone();
    tasks.spawn_blocking(move || {
        for (req, payload, permits) in jobs {
            let bytes = ctx.execute_guarded(&req, &payload);
            let _ = tx.blocking_send(Reply {
                bytes,
                _permits: permits,
            });
        }
    });
}

enum OptionOutcome {
    Continue,
    Abort,
    Serve(Export, String),
}

/// Writes replies as they come, flushing when no more are waiting.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Reply>,
    w: W,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some(reply) = rx.recv().await {
        w.write_all(&reply.bytes).await?;
        drop(reply);
        while let Ok(reply) = rx.try_recv() {
            w.write_all(&reply.bytes).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// What a connection's requests are served against.
struct Context {
    dev: Arc<dyn BlockDevice>,
    structured: bool,
    base_allocation: bool,
    size: u64,
    sizes: super::BlockSizes,
    read_only: bool,
    fast_zero: bool,
    trim: bool,
    max_payload: u32,
    /// Where failed device requests are reported ([`Event::Failed`]).
    failed: Option<FailureSink>,
}

/// A connection's way to report a device error as an [`Event::Failed`].
struct FailureSink {
    sink: EventSink,
    peer: String,
    export: String,
}

impl Context {
    /// The error reply for a request the device failed, reported as an event first.
    fn failed(&self, req: &Request, e: &DeviceError) -> Vec<u8> {
        if let Some(f) = &self.failed {
            (f.sink)(&Event::Failed {
                peer: &f.peer,
                export: &f.export,
                command: command_name(req.typ),
                offset: req.offset,
                len: req.len,
                error: e,
            });
        }
        error_reply(self.structured, req.cookie, errno(e), &e.to_string())
    }

    /// Validates a request against the negotiated session; the error is the NBD
    /// error value to reply with.
    fn check(&self, req: &Request) -> Result<(), u32> {
        let allowed = match req.typ {
            CMD_READ if self.structured => CMD_FLAG_DF,
            CMD_READ | CMD_FLUSH | CMD_CACHE => 0,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => return Err(EINVAL),
        };
        if req.flags & !allowed != 0 {
            return Err(EINVAL);
        }
        let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.read_only {
            return Err(EPERM);
        }
        if req.typ == CMD_FLUSH {
            return Ok(());
        }
        if req.len == 0 {
            return Err(EINVAL);
        }
        match req.offset.checked_add(req.len as u64) {
            Some(end) if end <= self.size => {}
            _ if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) => return Err(ENOSPC),
            _ => return Err(EINVAL),
        }
        let min = self.sizes.min as u64;
        if req.typ != CMD_BLOCK_STATUS
            && (!req.offset.is_multiple_of(min) || !(req.len as u64).is_multiple_of(min))
        {
            return Err(EINVAL);
        }
        match req.typ {
            CMD_READ if req.len > self.max_payload => Err(EOVERFLOW),
            CMD_READ | CMD_WRITE if req.len > self.sizes.max => Err(EINVAL),
            // Features not advertised may not be used.
            CMD_WRITE_ZEROES if req.flags & CMD_FLAG_FAST_ZERO != 0 && !self.fast_zero => {
                Err(EINVAL)
            }
            CMD_TRIM if !self.trim => Err(EINVAL),
            CMD_BLOCK_STATUS if !self.base_allocation => Err(EINVAL),
            _ => Ok(()),
        }
    }

    /// [`Context::execute`], answering `EIO` if the device panics.
    fn execute_guarded(&self, req: &Request, payload: &[u8]) -> Vec<u8> {
        std::panic::catch_unwind(AssertUnwindSafe(|| self.execute(req, payload)))
            .unwrap_or_else(|_| error_reply(self.structured, req.cookie, EIO, "backend panicked"))
    }

    /// Runs a checked request on the device and encodes its reply.
    fn execute(&self, req: &Request, payload: &[u8]) -> Vec<u8> {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (off, len) = (req.offset, req.len as u64);
        let done = |r: Result<(), DeviceError>| match r {
            Ok(()) => ok_reply(self.structured, req.cookie),
            Err(e) => self.failed(req, &e),
        };
        match req.typ {
            CMD_READ => self.read(req),
            CMD_WRITE => done(self.dev.write(off, payload, fua)),
            CMD_FLUSH => done(self.dev.flush()),
            CMD_TRIM => done(self.dev.trim(off, len, fua)),
            CMD_CACHE => done(self.dev.cache(off, len)),
            CMD_WRITE_ZEROES => done(self.dev.write_zeroes(
                off,
                len,
                ZeroFlags {
                    no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                    fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                },
            )),
            CMD_BLOCK_STATUS => self.block_status(req),
            _ => error_reply(self.structured, req.cookie, EINVAL, ""),
        }
    }

    /// A read's reply is built around the buffer the device fills, so the data is
    /// copied once.
    fn read(&self, req: &Request) -> Vec<u8> {
        self.read_with(req, |off, buf| Some(self.dev.read(off, buf)))
            .expect("a blocking read always answers")
    }

    /// A read answered on the connection's task, when the device can serve it from
    /// memory ([`BlockDevice::read_in_memory`]); None sends it to a blocking thread.
    fn read_in_memory(&self, req: &Request) -> Option<Vec<u8>> {
        if req.len > FAST_READ_MAX {
            return None;
        }
        self.read_with(req, |off, buf| self.dev.read_in_memory(off, buf))
    }

    fn read_with(
        &self,
        req: &Request,
        read: impl FnOnce(u64, &mut [u8]) -> Option<Result<(), DeviceError>>,
    ) -> Option<Vec<u8>> {
        let len = req.len as usize;
        let mut b;
        if self.structured {
            b = Vec::with_capacity(28 + len);
            chunk_header(
                &mut b,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + len,
            );
            b.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            b = simple_reply(req.cookie, 0, len);
        }
        let start = b.len();
        b.resize(start + len, 0);
        Some(match read(req.offset, &mut b[start..])? {
            Ok(()) => b,
            Err(e) => self.failed(req, &e),
        })
    }

    fn block_status(&self, req: &Request) -> Vec<u8> {
        let len = req.len as u64;
        let extents = match self.dev.block_status(req.offset, len) {
            Ok(e) => e,
            Err(e) => {
                return self.failed(req, &e);
            }
        };
        // Merge neighbours with equal flags and cut at the requested length, so a
        // device answering loosely still yields a valid reply.
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0u64;
        for e in extents {
            if covered >= len || e.len == 0 {
                break;
            }
            let n = e.len.min(len - covered);
            covered += n;
            let flags =
                (if e.hole { STATE_HOLE } else { 0 }) | (if e.zero { STATE_ZERO } else { 0 });
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += n as u32,
                _ => out.push((n as u32, flags)),
            }
        }
        if out.is_empty() {
            return error_reply(
                self.structured,
                req.cookie,
                EIO,
                "device described no extent",
            );
        }
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            out.truncate(1);
        }
        let mut b = Vec::with_capacity(24 + 8 * out.len());
        chunk_header(
            &mut b,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            4 + 8 * out.len(),
        );
        b.extend_from_slice(&META_ID_BASE_ALLOCATION.to_be_bytes());
        for (l, f) in out {
            b.extend_from_slice(&l.to_be_bytes());
            b.extend_from_slice(&f.to_be_bytes());
        }
        b
    }
}
