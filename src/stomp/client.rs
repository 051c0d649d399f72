//! Synchronous STOMP 1.2 client over `std::net::TcpStream`, optionally inside TLS (rustls),
//! with no threads.
//!
//! Vocabulary: see [`super::frame`]. A [`Connection`] is one CONNECTed TCP session with
//! negotiated heart-beats; [`send_batch`] pipelines SEND frames that carry `receipt` headers
//! and collects the RECEIPTs.
//!
//! # TLS
//!
//! With [`Config::tls`] set, the TCP stream is wrapped in a rustls client session that
//! trusts only the CA certificates of [`TlsConfig::ca_certs`] and checks the server's
//! certificate chain and name (the host part of the `host:port` entry: a DNS name or an IP
//! address). The rustls configuration is built anew by each [`Connection::open`] (a few file
//! reads), so renewed certificate files are picked up at the next reconnect. Everything else
//! works the same over TLS; incoming records are decrypted and decoded eagerly, so no
//! plaintext is ever left inside rustls between calls (see [`Connection::has_buffered`]).
//!
//! # Observed broker behaviour (RabbitMQ 3.10 STOMP plugin, measured by the tests below)
//!
//! * CONNECTED: `server:RabbitMQ/3.10.8`, `session:session-...`, `heart-beat:<sx>,<sy>`,
//!   `version:1.2`, followed at once by an EOL (decoded as a heart-beat).
//! * Heart-beats: RabbitMQ works in whole seconds with a 1000 ms floor: asking `500,500`
//!   gets `heart-beat:1000,1000`; asking `1500,3000` gets `3000,1000`; `0,0` gets `0,0`.
//!   A client that stops sending is dropped (plain TCP close, no ERROR) after about three
//!   of RabbitMQ's intervals (3 s at 1000 ms). We send at half the negotiated interval.
//! * Bad passcode: `ERROR` with `message:Bad CONNECT`, body `Access refused for user
//!   'guest'`, then close, within a few ms ([`StompError::Refused`]). Unknown vhost: same
//!   with `Virtual host '...' access denied`. The passcode is never echoed.
//! * SEND to an invalid destination type (`/nonsense/x`): `ERROR` `message:Unknown
//!   destination` (body lists the valid types) WITHOUT `receipt-id`, even though the SEND
//!   carried a `receipt`. It is sent as soon as the frame is parsed, i.e. BEFORE the
//!   receipts of earlier pipelined SENDs. The connection stays open and usable: every other
//!   frame of the batch (before and after) is receipted, in order, and delivered. So
//!   [`send_batch`] can only identify the failed frame by elimination (the receipt that
//!   never comes), and waits [`ERROR_GRACE`] for it.
//! * SEND to a missing exchange (`/exchange/<nope>`): `ERROR` `message:not_found`, body
//!   `NOT_FOUND - no exchange '<nope>' in vhost '/'`, no `receipt-id`, then the connection
//!   is closed. Receipts still owed for EARLIER frames are lost too, although those
//!   messages were enqueued (observed: the frame before the bad one was in the queue but
//!   not receipted), and later frames are dropped. An unreceipted frame therefore has an
//!   unknown fate: resend it (at-least-once, duplicates possible).
//! * RECEIPT frames carry only `receipt-id`; a 1000-frame pipelined batch is receipted in
//!   order in about 50 ms (debug build, loopback).
//! * MESSAGE frames carry `subscription`, `destination`, `message-id`, `redelivered`,
//!   `ack` (with `ack:client`/`client-individual`; equal to `message-id`), then every
//!   other header of the SEND, including its `receipt` header and user headers (observed in
//!   reverse order), then `content-length`. A header value containing `\n`, `:`, `\r`, `\\` or NUL, and a
//!   header name containing `:` and `\n`, come back byte-exact; nothing is injected.
//! * A MESSAGE for a subscription on the same connection may arrive before the RECEIPT of
//!   the SEND that produced it ([`send_batch`] keeps such frames for `read_frame`).
//! * `/queue/<name>` destinations create durable queues; the tests add `x-expires` (a queue
//!   argument RabbitMQ takes from SEND/SUBSCRIBE headers) so theirs disappear afterwards.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::frame::{Command, Decoded, Decoder, Frame, FrameError, encode};

/// Largest frame accepted from the broker unless changed with
/// [`Connection::set_max_frame_bytes`].
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Extra tolerance on top of twice the broker's heart-beat interval before it is declared gone.
const HEARTBEAT_SLACK: Duration = Duration::from_millis(1000);

/// A write that makes no progress for this long fails with `Timeout("write")` (at least; the
/// connect timeout is used when it is longer).
const MIN_WRITE_STALL: Duration = Duration::from_secs(10);

/// After the first ERROR in [`send_batch`], how long to keep collecting receipts (bounded by
/// the caller's timeout).
pub const ERROR_GRACE: Duration = Duration::from_millis(1000);

const READ_CHUNK: usize = 64 * 1024;

/// Socket write timeout; a blocked write is retried after draining incoming data.
const WRITE_SLICE: Duration = Duration::from_millis(100);

/// Connection settings.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// `host:port` entries (tried in order by [`Connection::open_any`]).
    pub hosts: Vec<String>,
    pub login: String,
    /// Never logged nor put into error messages (`Debug` redacts it).
    pub passcode: String,
    /// Sent as the CONNECT `host` header (RabbitMQ: the virtual host, e.g. `/`).
    pub vhost: String,
    /// Heart-beat wishes in milliseconds: (we can send every, we want to receive every);
    /// 0 disables that direction.
    pub heartbeat: (u32, u32),
    /// Bound on TCP connect, the TLS handshake and the CONNECTED answer together.
    pub connect_timeout: Duration,
    /// TLS settings; `None` = plain TCP.
    pub tls: Option<TlsConfig>,
    /// How the connection waits for its socket; `None` = in the kernel (blocking calls with
    /// timeouts).
    pub hooks: Option<Hooks>,
}

/// Waiting supplied by the host program. A PostgreSQL backend must not sleep in a blocking
/// call it cannot interrupt: with hooks, every wait of a [`Connection`] (TCP connect, TLS
/// handshake, reads, stalled writes) goes through them, so the host can wake for its own
/// events (a latch, a signal) and abort the wait by unwinding.
#[derive(Clone, Copy)]
pub struct Hooks {
    /// Connects within `timeout`, waiting through `wait`.
    pub connect: fn(&SocketAddr, Duration) -> io::Result<TcpStream>,
    /// Waits until `fd` is readable (`writable`: writable) or `timeout` passes; true when
    /// the socket is ready. It may return early with false (a spurious wake-up).
    pub wait: fn(RawFd, bool, Duration) -> io::Result<bool>,
}

impl PartialEq for Hooks {
    /// Hooks are part of how a program runs, not of what it connects to.
    fn eq(&self, _: &Hooks) -> bool {
        true
    }
}

impl Eq for Hooks {}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hooks")
    }
}

/// TLS settings of a [`Config`]: PEM file paths (only paths are kept, never key material).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TlsConfig {
    /// CA certificate(s) that may sign the broker's certificate (PEM, one or more
    /// `CERTIFICATE` sections). Required: these are the only trusted roots.
    pub ca_certs: String,
    /// Client certificate chain (PEM) for brokers that require one; `""` = none.
    pub cert_file: String,
    /// Private key of `cert_file` (PEM: PKCS#8, PKCS#1 or SEC1); `""` = none. Give both or
    /// neither.
    pub key_file: String,
}

impl TlsConfig {
    /// Reads the PEM files and builds the rustls client configuration (ring provider, TLS 1.3
    /// and 1.2, roots from `ca_certs` only, client authentication when a certificate and key
    /// are given). Problems are [`StompError::Config`] naming the file, never its contents.
    /// [`Connection::open`] calls this on every connect; callers may call it up front to
    /// validate settings.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, StompError> {
        if self.ca_certs.is_empty() {
            return Err(StompError::Config(
                "tls ca_certs (CA certificate file) is required".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        for (i, cert) in read_certs("tls ca_certs", &self.ca_certs)?
            .into_iter()
            .enumerate()
        {
            roots.add(cert).map_err(|e| {
                StompError::Config(format!(
                    "tls ca_certs {:?}: certificate #{} is not usable as a trust anchor: {e}",
                    self.ca_certs,
                    i + 1
                ))
            })?;
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| StompError::Config(format!("tls: {e}")))?
                .with_root_certificates(roots);
        let config = match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (true, true) => builder.with_no_client_auth(),
            (false, false) => {
                let certs = read_certs("tls cert_file", &self.cert_file)?;
                let key = PrivateKeyDer::from_pem_file(&self.key_file).map_err(|e| {
                    StompError::Config(format!(
                        "tls key_file {:?}: {}",
                        self.key_file,
                        pem_problem(&e, "PRIVATE KEY")
                    ))
                })?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    StompError::Config(format!(
                        "tls cert_file {:?} / key_file {:?} unusable: {e}",
                        self.cert_file, self.key_file
                    ))
                })?
            }
            _ => {
                return Err(StompError::Config(
                    "tls cert_file and key_file must be given together".into(),
                ));
            }
        };
        Ok(Arc::new(config))
    }
}

/// All `CERTIFICATE` sections of a PEM file (at least one).
fn read_certs(what: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, StompError> {
    let bad = |e: pem::Error| {
        StompError::Config(format!(
            "{what} {path:?}: {}",
            pem_problem(&e, "CERTIFICATE")
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(bad)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    if certs.is_empty() {
        return Err(bad(pem::Error::NoItemsFound));
    }
    Ok(certs)
}

/// Describes a PEM problem without quoting the file (it may hold a private key).
fn pem_problem(e: &pem::Error, wanted: &str) -> String {
    match e {
        pem::Error::Io(e) => format!("cannot read: {e}"),
        pem::Error::NoItemsFound => format!("no {wanted} section found"),
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "malformed PEM BEGIN line".into(),
        pem::Error::Base64Decode(_) => "invalid base64 in a PEM section".into(),
        pem::Error::SectionTooLarge => "PEM section too large".into(),
        _ => "invalid PEM".into(),
    }
}

/// The TLS server name of a `host:port` entry: its host part (`[...]` IPv6 brackets removed).
fn server_name(host: &str) -> Result<ServerName<'static>, StompError> {
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(name.to_string()).map_err(|_| {
        StompError::Config(format!(
            "broker address {host:?}: {name:?} is not a valid tls server name"
        ))
    })
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("hosts", &self.hosts)
            .field("login", &self.login)
            .field("passcode", &"<redacted>")
            .field("vhost", &self.vhost)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("hooks", &self.hooks)
            .finish()
    }
}

/// Errors of the STOMP client. None of them ever contains the passcode.
#[derive(Debug, thiserror::Error)]
pub enum StompError {
    #[error("broker i/o: {0}")]
    Io(#[from] io::Error),
    /// What timed out: "connect", "tls handshake", "connected", "write", "heart-beat",
    /// "receipts", "receipt".
    #[error("stomp timeout waiting for {0}")]
    Timeout(&'static str),
    /// ERROR frame answering CONNECT (e.g. bad login): its message header and body.
    #[error("broker refused the connection: {0}")]
    Refused(String),
    /// ERROR frame received after the connection was established.
    #[error("broker error: {message}{}{}", receipt_id.as_ref().map(|r| format!(" (receipt-id {r})")).unwrap_or_default(), if body.is_empty() { String::new() } else { format!(": {}", body.trim_end()) })]
    Broker {
        message: String,
        receipt_id: Option<String>,
        body: String,
    },
    /// The broker closed the connection.
    #[error("broker closed the connection")]
    Closed,
    #[error("stomp protocol violation: {0}")]
    Protocol(String),
    #[error("stomp frame: {0}")]
    Frame(#[from] FrameError),
    #[error("stomp configuration: {0}")]
    Config(String),
    /// TLS failure: handshake (certificate not trusted, name mismatch, client certificate
    /// rejected, peer not speaking TLS) or a later TLS protocol error / alert. The text
    /// starts with `tls`, e.g. `tls handshake with 127.0.0.1:61614 failed: invalid peer
    /// certificate: UnknownIssuer`.
    #[error("{0}")]
    Tls(String),
}

impl StompError {
    /// The error reported for an ERROR frame received on an established connection.
    pub fn from_error_frame(frame: &Frame) -> StompError {
        StompError::Broker {
            message: frame.get("message").unwrap_or("").to_string(),
            receipt_id: frame.get("receipt-id").map(str::to_string),
            body: frame.body_text(),
        }
    }

    /// True for errors that mean the connection can no longer be used (everything but
    /// `Broker`; `Tls` included).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, StompError::Broker { .. })
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Removes the passcode from broker-provided text (defence in depth; brokers do not echo it).
fn scrub(text: String, cfg: &Config) -> String {
    if cfg.passcode.len() >= 4 && cfg.passcode != cfg.login && text.contains(&cfg.passcode) {
        text.replace(&cfg.passcode, "<redacted>")
    } else {
        text
    }
}

fn parse_heartbeat(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Spec negotiation: 0 on either side disables, otherwise the larger of the two values.
fn negotiate(ours: u32, theirs: u32) -> Option<Duration> {
    if ours == 0 || theirs == 0 {
        None
    } else {
        Some(Duration::from_millis(u64::from(ours.max(theirs))))
    }
}

/// The byte stream under STOMP: plain TCP or a rustls client session over TCP.
///
/// Writing is split in two so that [`Connection::flush`] can account for progress and drain
/// reads while the socket is full: `write_plain` hands plaintext over (plain: one socket
/// write; TLS: encrypted into rustls' bounded buffer, no syscall) and `write_pending` writes
/// TLS records not yet sent (one socket write).
enum Transport {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Transport {
    fn sock(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s) => &s.sock,
        }
    }

    /// TLS records are waiting to be written.
    fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(s) => s.conn.wants_write(),
        }
    }

    /// One write of pending TLS records; returns the bytes written (0: nothing pending).
    fn write_pending(&mut self) -> io::Result<usize> {
        match self {
            Transport::Plain(_) => Ok(0),
            Transport::Tls(s) => s.conn.write_tls(&mut s.sock),
        }
    }

    /// Hands plaintext to the transport; returns how much was taken.
    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.conn.writer().write(buf),
        }
    }

    /// Plaintext decrypted by rustls and not yet read out (always false between
    /// [`Connection`] calls: reads drain it eagerly). Also true once the peer's close_notify
    /// came in.
    fn holds_plaintext(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(s) => !s.conn.is_handshaking() && !s.conn.wants_read(),
        }
    }

    /// Reads plaintext. TLS: returns what rustls already holds, otherwise reads the socket
    /// (honouring its timeout / non-blocking mode, `WouldBlock`/`TimedOut` as for plain TCP)
    /// until at least one complete record is decrypted. `Ok(0)` is end of stream; a TCP EOF
    /// without close_notify is `UnexpectedEof`; TLS errors are `InvalidData` wrapping the
    /// `rustls::Error` (after a best-effort attempt to send rustls' alert).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = match self {
            Transport::Plain(s) => return s.read(buf),
            Transport::Tls(s) => s,
        };
        loop {
            match s.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            s.conn.read_tls(&mut s.sock)?;
            if let Err(e) = s.conn.process_new_packets() {
                let _ = s.conn.write_tls(&mut s.sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }
}

/// Runs the TLS handshake on a connected socket (whose write timeout is set), within
/// `deadline`.
fn tls_handshake(
    mut sock: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    host: &str,
    deadline: Instant,
    hooks: Option<Hooks>,
) -> Result<StreamOwned<ClientConnection, TcpStream>, StompError> {
    let failed = |why: &dyn fmt::Display| {
        StompError::Tls(format!("tls handshake with {host} failed: {why}"))
    };
    let mut conn = ClientConnection::new(config, name).map_err(|e| failed(&e))?;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StompError::Timeout("tls handshake"));
        }
        let res = if conn.wants_write() {
            conn.write_tls(&mut sock)
        } else {
            if let Some(h) = hooks
                && !(h.wait)(sock.as_raw_fd(), false, left)?
            {
                continue;
            }
            sock.set_read_timeout(Some(left))?;
            match conn.read_tls(&mut sock) {
                Ok(0) => return Err(failed(&"the server closed the connection")),
                Ok(n) => match conn.process_new_packets() {
                    Ok(_) => Ok(n),
                    Err(e) => {
                        // Tell the server why (the alert rustls queued), best effort.
                        let _ = conn.write_tls(&mut sock);
                        return Err(failed(&e));
                    }
                },
                Err(e) => Err(e),
            }
        };
        match res {
            Ok(_) => {}
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_closed(&e) => return Err(failed(&"the server closed the connection")),
            Err(e) => return Err(StompError::Io(e)),
        }
    }
    Ok(StreamOwned::new(conn, sock))
}

/// One CONNECTed STOMP 1.2 session.
pub struct Connection {
    transport: Transport,
    host: String,
    /// CONNECTED was received (TLS errors before that are reported as handshake failures).
    established: bool,
    server: Option<String>,
    session: Option<String>,
    decoder: Decoder,
    /// Encoded frames not yet written.
    wbuf: Vec<u8>,
    /// Decoded frames not yet returned by `read_frame`.
    inbox: VecDeque<Frame>,
    rbuf: Vec<u8>,
    /// We must send something at least this often.
    send_every: Option<Duration>,
    /// The broker promised to send something at least this often.
    recv_every: Option<Duration>,
    last_write: Instant,
    last_read: Instant,
    /// The broker closed its side (frames may still be in `inbox`).
    eof: bool,
    write_stall: Duration,
    /// Read timeout currently set on the socket (avoids redundant syscalls).
    read_timeout: Option<Duration>,
    receipt_seq: u64,
    hooks: Option<Hooks>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("host", &self.host)
            .field("tls", &self.is_tls())
            .field("server", &self.server)
            .field("session", &self.session)
            .field("send_every", &self.send_every)
            .field("recv_every", &self.recv_every)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.transport.sock().as_raw_fd()
    }
}

impl Connection {
    /// Connects to `host` (one `host:port` entry, normally from `cfg.hosts`) within
    /// `cfg.connect_timeout` (TCP connect, TLS handshake and the CONNECTED answer together),
    /// sending CONNECT with `accept-version:1.2`, `host:<vhost>`, `login`, `passcode` and
    /// `heart-beat`, and negotiates heart-beats as the specification says. An ERROR answer is
    /// [`StompError::Refused`]. With `cfg.tls`, a failed handshake (untrusted certificate,
    /// name mismatch, client certificate refused) is [`StompError::Tls`]; bad TLS settings
    /// are [`StompError::Config`], found before any network traffic.
    pub fn open(cfg: &Config, host: &str) -> Result<Connection, StompError> {
        let start = Instant::now();
        let deadline = start + cfg.connect_timeout;
        if cfg.connect_timeout.is_zero() {
            return Err(StompError::Config(
                "connect_timeout must not be zero".into(),
            ));
        }
        let tls = match &cfg.tls {
            None => None,
            Some(t) => Some((t.client_config()?, server_name(host)?)),
        };
        let addrs: Vec<SocketAddr> = host
            .to_socket_addrs()
            .map_err(|e| StompError::Config(format!("bad broker address {host:?}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(StompError::Config(format!(
                "broker address {host:?} resolves to nothing"
            )));
        }
        let mut last_err = None;
        let mut stream = None;
        for addr in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let connected = match cfg.hooks {
                Some(h) => (h.connect)(addr, left),
                None => TcpStream::connect_timeout(addr, left),
            };
            match connected {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let stream = match (stream, last_err) {
            (Some(s), _) => s,
            (None, Some(e)) if !is_timeout(&e) => return Err(StompError::Io(e)),
            (None, _) => return Err(StompError::Timeout("connect")),
        };
        stream.set_nodelay(true)?;
        // Short write timeout: writes that would block are retried while incoming data is
        // drained (see `flush`), so a broker that stops reading cannot deadlock us.
        stream.set_write_timeout(Some(WRITE_SLICE))?;
        let transport = match tls {
            None => Transport::Plain(stream),
            Some((config, name)) => Transport::Tls(Box::new(tls_handshake(
                stream, config, name, host, deadline, cfg.hooks,
            )?)),
        };
        let now = Instant::now();
        let mut conn = Connection {
            transport,
            host: host.to_string(),
            established: false,
            server: None,
            session: None,
            decoder: Decoder::new(DEFAULT_MAX_FRAME_BYTES),
            wbuf: Vec::with_capacity(4096),
            inbox: VecDeque::new(),
            rbuf: vec![0; READ_CHUNK],
            send_every: None,
            recv_every: None,
            last_write: now,
            last_read: now,
            eof: false,
            write_stall: cfg.connect_timeout.max(MIN_WRITE_STALL),
            read_timeout: None,
            receipt_seq: 0,
            hooks: cfg.hooks,
        };
        let mut connect = Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("host", cfg.vhost.as_str());
        if !cfg.login.is_empty() {
            connect = connect.header("login", cfg.login.as_str());
        }
        if !cfg.passcode.is_empty() {
            connect = connect.header("passcode", cfg.passcode.as_str());
        }
        connect = connect.header(
            "heart-beat",
            format!("{},{}", cfg.heartbeat.0, cfg.heartbeat.1),
        );
        // Never let the passcode reach an error message through the encoder's error.
        conn.queue(&connect).map_err(|_| {
            StompError::Config(
                "login, passcode, vhost must not contain line breaks (no escaping in CONNECT)"
                    .into(),
            )
        })?;
        let write_stall = conn.write_stall;
        conn.write_stall = cfg.connect_timeout;
        conn.flush().map_err(|e| match e {
            StompError::Timeout(_) => StompError::Timeout("connected"),
            e => e,
        })?;
        conn.write_stall = write_stall;

        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StompError::Timeout("connected"));
        }
        let connected = match conn.read_raw(left)? {
            None => return Err(StompError::Timeout("connected")),
            Some(f) if f.command == Command::Connected => f,
            Some(f) if f.command == Command::Error => {
                let mut text = f.get("message").unwrap_or("").trim().to_string();
                let body = f.body_text();
                let body = body.trim();
                if !body.is_empty() {
                    if !text.is_empty() {
                        text.push_str(": ");
                    }
                    text.push_str(body);
                }
                return Err(StompError::Refused(scrub(text, cfg)));
            }
            Some(f) => {
                return Err(StompError::Protocol(format!(
                    "expected CONNECTED, got {}",
                    f.command
                )));
            }
        };
        match connected.get("version") {
            Some("1.2") => {}
            v => {
                return Err(StompError::Protocol(format!(
                    "broker does not speak stomp 1.2 (version {})",
                    v.unwrap_or("1.0")
                )));
            }
        }
        let (sx, sy) = match connected.get("heart-beat") {
            None => (0, 0),
            Some(v) => parse_heartbeat(v)
                .ok_or_else(|| StompError::Protocol(format!("bad heart-beat header {v:?}")))?,
        };
        conn.send_every = negotiate(cfg.heartbeat.0, sy);
        conn.recv_every = negotiate(cfg.heartbeat.1, sx);
        conn.server = connected.get("server").map(str::to_string);
        conn.session = connected.get("session").map(str::to_string);
        let now = Instant::now();
        conn.last_read = now;
        conn.established = true;
        Ok(conn)
    }

    /// Tries [`Connection::open`] on each entry of `cfg.hosts` in order; returns the first
    /// success, or the last error (a `Refused` stops immediately: credentials are shared).
    pub fn open_any(cfg: &Config) -> Result<Connection, StompError> {
        let mut last = StompError::Config("no broker hosts configured".into());
        for host in &cfg.hosts {
            match Connection::open(cfg, host) {
                Ok(c) => return Ok(c),
                Err(e @ StompError::Refused(_)) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The `host:port` this connection was opened to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// CONNECTED's `server` header.
    pub fn server(&self) -> Option<&str> {
        self.server.as_deref()
    }

    /// CONNECTED's `session` header.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// Negotiated heart-beat intervals: (we send every, broker sends every); None = off.
    pub fn heartbeats(&self) -> (Option<Duration>, Option<Duration>) {
        (self.send_every, self.recv_every)
    }

    /// Changes the largest frame accepted from the broker (default
    /// [`DEFAULT_MAX_FRAME_BYTES`]). Only possible while no partial frame is buffered;
    /// returns whether it was applied.
    pub fn set_max_frame_bytes(&mut self, max: usize) -> bool {
        if self.decoder.in_frame() || self.decoder.buffered_len() != 0 {
            return false;
        }
        self.decoder = Decoder::new(max);
        true
    }

    /// Changes how the connection waits (see [`Hooks`]); returns the hooks it had. A thread
    /// that borrows the connection from a host whose hooks only its main thread may run
    /// takes them out first.
    pub fn set_hooks(&mut self, hooks: Option<Hooks>) -> Option<Hooks> {
        std::mem::replace(&mut self.hooks, hooks)
    }

    /// A fresh receipt id unique within this connection (`r-<n>`), for callers that need one.
    pub fn next_receipt_id(&mut self) -> String {
        self.receipt_seq += 1;
        format!("r-{}", self.receipt_seq)
    }

    /// Encodes a frame into the write buffer (no syscall yet); used to pipeline many SENDs.
    pub fn queue(&mut self, frame: &Frame) -> Result<(), StompError> {
        encode(frame, &mut self.wbuf)?;
        Ok(())
    }

    /// Bytes queued but not yet written.
    pub fn queued_len(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes everything queued (normally one write syscall; over TLS one per 64 KiB or so),
    /// including TLS records still pending from earlier heart-beats. While the broker does
    /// not read, incoming data is drained into the read buffers so that neither side can
    /// deadlock.
    pub fn flush(&mut self) -> Result<(), StompError> {
        if self.wbuf.is_empty() && !self.transport.wants_write() {
            return Ok(());
        }
        let mut written = 0;
        let mut progress_at = Instant::now();
        let res = loop {
            // TLS records first (they may hold earlier plaintext), then more plaintext.
            let step = if self.transport.wants_write() {
                self.transport.write_pending().map(|n| (n, 0))
            } else if written < self.wbuf.len() {
                self.transport
                    .write_plain(&self.wbuf[written..])
                    .map(|n| (n, n))
            } else {
                break Ok(());
            };
            match step {
                Ok((0, _)) => break Err(StompError::Closed),
                Ok((_, taken)) => {
                    written += taken;
                    progress_at = Instant::now();
                    self.last_write = progress_at;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    // The host may have been asked to stop meanwhile.
                    if let Some(h) = self.hooks
                        && let Err(e) = (h.wait)(self.as_raw_fd(), true, Duration::ZERO)
                    {
                        break Err(StompError::Io(e));
                    }
                    if let Err(e) = self.read_nonblocking() {
                        break Err(e);
                    }
                    if progress_at.elapsed() >= self.write_stall {
                        break Err(StompError::Timeout("write"));
                    }
                }
                Err(e) if is_closed(&e) => break Err(StompError::Closed),
                Err(e) => break Err(self.io_error(e)),
            }
        };
        // Keep whatever was not written (the connection is unusable after an error anyway).
        self.wbuf.drain(..written);
        res
    }

    /// Reads the next frame, waiting at most `timeout`; heart-beat EOLs are consumed silently
    /// (and count as liveness). Returns `Ok(None)` on timeout. While waiting it sends our
    /// heart-beat EOL when due.
    ///
    /// An ERROR frame is returned as `Err(StompError::Broker{..})`; the connection object
    /// stays readable afterwards (to collect frames the broker sent before closing).
    /// `Err(Closed)` on EOF (after all buffered frames were returned),
    /// `Err(Timeout("heart-beat"))` when the broker has been silent for longer than twice the
    /// negotiated interval plus one second.
    pub fn read_frame(&mut self, timeout: Duration) -> Result<Option<Frame>, StompError> {
        match self.read_raw(timeout)? {
            Some(f) if f.command == Command::Error => Err(StompError::from_error_frame(&f)),
            other => Ok(other),
        }
    }

    fn read_raw(&mut self, timeout: Duration) -> Result<Option<Frame>, StompError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.inbox.pop_front() {
                return Ok(Some(f));
            }
            if self.eof {
                return Err(StompError::Closed);
            }
            self.heartbeat_if_due()?;
            if self.check_broker_alive().is_err() {
                // The caller may not have read for a while: look at what is already there.
                self.read_nonblocking()?;
                if !self.inbox.is_empty() || self.eof {
                    continue;
                }
                self.check_broker_alive()?;
            }
            let now = Instant::now();
            if now >= deadline {
                // One last non-blocking look, so a zero timeout still polls.
                self.read_nonblocking()?;
                if let Some(f) = self.inbox.pop_front() {
                    return Ok(Some(f));
                }
                return if self.eof {
                    Err(StompError::Closed)
                } else {
                    Ok(None)
                };
            }
            let mut wake = deadline;
            if let Some(t) = self.send_due_at() {
                wake = wake.min(t);
            }
            if let Some(t) = self.broker_deadline() {
                wake = wake.min(t);
            }
            let wait = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            self.read_blocking(wait)?;
        }
    }

    /// For idle connections: sends a heart-beat EOL if due, reads whatever is available
    /// without blocking (frames are buffered for [`Connection::read_frame`]), and reports the
    /// broker gone (`Closed` on EOF, `Timeout("heart-beat")` when its heart-beats stopped).
    /// Cheap: a few syscalls.
    pub fn keepalive(&mut self) -> Result<(), StompError> {
        if self.eof {
            return Err(StompError::Closed);
        }
        self.heartbeat_if_due()?;
        self.read_nonblocking()?;
        if self.eof {
            return Err(StompError::Closed);
        }
        self.check_broker_alive()
    }

    /// How long the caller may sleep before it must call [`Connection::keepalive`] again
    /// (`None` = heart-beats off in both directions).
    pub fn keepalive_due_in(&self) -> Option<Duration> {
        let due = match (self.send_due_at(), self.broker_deadline()) {
            (None, None) => return None,
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => a.min(b),
        };
        Some(due.saturating_duration_since(Instant::now()))
    }

    /// Puts a frame back in front of the buffered ones (a caller that read
    /// a frame it is not ready to handle yet).
    pub fn push_back(&mut self, frame: Frame) {
        self.inbox.push_front(frame);
    }

    /// True when decoded frames are already buffered (so waiting on the socket would be
    /// wrong). Over TLS this also covers plaintext held inside rustls, although reads drain
    /// rustls eagerly into the decoder so that never happens between calls: whatever is not
    /// in the inbox is either a partial frame (needs more bytes) or still in the socket (the
    /// fd polls readable).
    pub fn has_buffered(&self) -> bool {
        !self.inbox.is_empty() || (!self.eof && self.transport.holds_plaintext())
    }

    /// The TCP socket's file descriptor (for poll/select-style waiting; also with TLS).
    pub fn as_raw_fd(&self) -> RawFd {
        self.transport.sock().as_raw_fd()
    }

    /// Sends DISCONNECT with a receipt and waits at most `timeout` for it, then closes.
    pub fn disconnect(mut self, timeout: Duration) -> Result<(), StompError> {
        let deadline = Instant::now() + timeout;
        let id = format!("disconnect-{}", self.next_receipt_id());
        self.queue(&Frame::new(Command::Disconnect).header("receipt", id.as_str()))?;
        self.flush()?;
        let res = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_raw(left) {
                Ok(Some(f))
                    if f.command == Command::Receipt && f.get("receipt-id") == Some(&id) =>
                {
                    break Ok(());
                }
                Ok(Some(f)) if f.command == Command::Error => {
                    break Err(StompError::from_error_frame(&f));
                }
                Ok(Some(_)) => {}
                Ok(None) => break Err(StompError::Timeout("receipt")),
                Err(e) => break Err(e),
            }
        };
        if let Transport::Tls(s) = &mut self.transport {
            // close_notify, best effort (each write is bounded by the socket write timeout).
            s.conn.send_close_notify();
            for _ in 0..4 {
                if !s.conn.wants_write() || s.conn.write_tls(&mut s.sock).is_err() {
                    break;
                }
            }
        }
        let _ = self.transport.sock().shutdown(std::net::Shutdown::Both);
        res
    }

    // ---- internals ----

    /// An i/o error as a [`StompError`]: TLS errors (alerts, bad records) become `Tls`.
    fn io_error(&self, e: io::Error) -> StompError {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t) if self.established => {
                StompError::Tls(format!("tls error on connection to {}: {t}", self.host))
            }
            Some(t) => StompError::Tls(format!("tls handshake with {} failed: {t}", self.host)),
            None => StompError::Io(e),
        }
    }

    /// Puts frames back in front of the inbox (in their original order).
    fn unread(&mut self, frames: Vec<Frame>) {
        for f in frames.into_iter().rev() {
            self.inbox.push_front(f);
        }
    }

    fn send_due_at(&self) -> Option<Instant> {
        // Send at half the interval so network jitter never makes us late.
        self.send_every.map(|d| self.last_write + d / 2)
    }

    fn broker_deadline(&self) -> Option<Instant> {
        self.recv_every
            .map(|d| self.last_read + d * 2 + HEARTBEAT_SLACK)
    }

    fn check_broker_alive(&self) -> Result<(), StompError> {
        match self.broker_deadline() {
            Some(t) if Instant::now() > t => Err(StompError::Timeout("heart-beat")),
            _ => Ok(()),
        }
    }

    fn heartbeat_if_due(&mut self) -> Result<(), StompError> {
        match self.send_due_at() {
            Some(t) if Instant::now() >= t => {}
            _ => return Ok(()),
        }
        if !self.wbuf.is_empty() {
            // Queued frames count as heart-beats; they must not be split by an EOL.
            return self.flush();
        }
        let res = if self.transport.wants_write() {
            // TLS records left by an earlier heart-beat: sending them is the heart-beat.
            self.transport.write_pending()
        } else {
            match self.transport.write_plain(b"\n") {
                Ok(_) if self.transport.wants_write() => self.transport.write_pending(),
                other => other,
            }
        };
        match res {
            Ok(0) => Ok(()),
            Ok(_) => {
                self.last_write = Instant::now();
                Ok(())
            }
            // Send buffer full: the broker is not reading; try again next time.
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(()),
            // The read that follows drains what the broker sent (an ERROR?) and reports EOF.
            Err(e) if is_closed(&e) => Ok(()),
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Feeds received bytes to the decoder and moves complete frames to the inbox; over TLS
    /// then also whatever plaintext rustls still holds (no syscall), so none is left there.
    fn absorb(&mut self, mut n: usize) -> Result<(), StompError> {
        self.last_read = Instant::now();
        loop {
            self.decoder.feed(&self.rbuf[..n]);
            while let Some(item) = self.decoder.next()? {
                if let Decoded::Frame(f) = item {
                    self.inbox.push_back(f);
                }
            }
            if !self.transport.holds_plaintext() {
                return Ok(());
            }
            n = match self.transport.read(&mut self.rbuf) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if is_closed(&e) => {
                    self.eof = true;
                    return Ok(());
                }
                Err(e) => return Err(self.io_error(e)),
            };
        }
    }

    /// One read waiting at most `wait` (> 0).
    fn read_blocking(&mut self, wait: Duration) -> Result<(), StompError> {
        if let Some(h) = self.hooks {
            return if (h.wait)(self.as_raw_fd(), false, wait)? {
                self.read_nonblocking()
            } else {
                Ok(())
            };
        }
        if self.read_timeout != Some(wait) {
            self.transport.sock().set_read_timeout(Some(wait))?;
            self.read_timeout = Some(wait);
        }
        match self.transport.read(&mut self.rbuf) {
            Ok(0) => {
                self.eof = true;
                Ok(())
            }
            Ok(n) => self.absorb(n),
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if is_closed(&e) => {
                self.eof = true;
                Ok(())
            }
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Reads everything available right now without blocking.
    fn read_nonblocking(&mut self) -> Result<(), StompError> {
        if self.eof {
            return Ok(());
        }
        self.transport.sock().set_nonblocking(true)?;
        // Plain TCP: a short read means the socket is drained. TLS reads return at most a
        // few records at a time, so read until `WouldBlock`.
        let short_read_drains = !self.is_tls();
        let res = loop {
            match self.transport.read(&mut self.rbuf) {
                Ok(0) => {
                    self.eof = true;
                    break Ok(());
                }
                Ok(n) => {
                    if let Err(e) = self.absorb(n) {
                        break Err(e);
                    }
                    if short_read_drains && n < self.rbuf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => break Ok(()),
                Err(e) if is_closed(&e) => {
                    self.eof = true;
                    break Ok(());
                }
                Err(e) => break Err(self.io_error(e)),
            }
        };
        self.transport.sock().set_nonblocking(false)?;
        res
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// Result of [`send_batch`].
#[derive(Debug, Default)]
pub struct SendOutcome {
    /// Receipt ids that came back, in arrival order.
    pub receipted: Vec<String>,
    /// Every problem seen, in order: `Frame` errors of frames that could not be encoded (not
    /// sent), each ERROR frame received (`Broker`), then at most one terminal condition
    /// (`Closed`, i/o, protocol/frame error, or `Timeout("receipts")` — the latter only when
    /// no ERROR was seen: after an ERROR the end of the grace period is not reported again).
    /// Empty when every frame was receipted. Frames whose receipt id is neither in
    /// `receipted` nor named by a `Broker` error's `receipt_id` have an unknown fate (RabbitMQ
    /// does not put `receipt-id` on ERROR frames for SENDs).
    pub errors: Vec<StompError>,
}

impl SendOutcome {
    /// True when every frame carrying a receipt header was receipted and nothing went wrong.
    pub fn all_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Pipelined SEND helper: queues every frame (each should carry a `receipt` header; frames
/// without one are sent but not waited for), flushes once, then collects RECEIPTs until all
/// are in, the connection closes, or `timeout` passes. After an ERROR frame it keeps
/// collecting receipts for at most [`ERROR_GRACE`] more (within `timeout`), because the broker
/// may still receipt the other frames before closing. Other frames that arrive meanwhile (e.g.
/// MESSAGEs on a connection that also subscribes, or receipts not belonging to this batch) are
/// kept, in order, for later [`Connection::read_frame`] calls.
pub fn send_batch(conn: &mut Connection, frames: &[Frame], timeout: Duration) -> SendOutcome {
    let mut out = SendOutcome::default();
    let mut deadline = Instant::now() + timeout;
    let mut pending: HashSet<&str> = HashSet::with_capacity(frames.len());
    for f in frames {
        match conn.queue(f) {
            Ok(()) => {
                if let Some(r) = f.get("receipt") {
                    pending.insert(r);
                }
            }
            Err(e) => out.errors.push(e),
        }
    }
    if let Err(e) = conn.flush() {
        out.errors.push(e);
        return out;
    }
    let mut saw_error = false;
    let mut other = Vec::new();
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.read_frame(left) {
            Ok(Some(f)) => {
                if f.command == Command::Receipt
                    && let Some(id) = f.get("receipt-id")
                    && pending.remove(id)
                {
                    out.receipted.push(id.to_string());
                } else {
                    other.push(f);
                }
            }
            Ok(None) => {
                if !saw_error {
                    out.errors.push(StompError::Timeout("receipts"));
                }
                break;
            }
            Err(e @ StompError::Broker { .. }) => {
                if let StompError::Broker {
                    receipt_id: Some(id),
                    ..
                } = &e
                {
                    pending.remove(id.as_str());
                }
                out.errors.push(e);
                if !saw_error {
                    saw_error = true;
                    deadline = deadline.min(Instant::now() + ERROR_GRACE);
                }
            }
            Err(e) => {
                out.errors.push(e);
                break;
            }
        }
    }
    conn.unread(other);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKER: &str = "127.0.0.1:61613";

    fn broker_up() -> bool {
        match TcpStream::connect_timeout(&BROKER.parse().unwrap(), Duration::from_secs(2)) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("NOTE: skipping broker test, {BROKER} unreachable: {e}");
                false
            }
        }
    }

    fn cfg() -> Config {
        Config {
            hosts: vec![BROKER.into()],
            login: "guest".into(),
            passcode: "guest".into(),
            vhost: "/".into(),
            heartbeat: (0, 0),
            connect_timeout: Duration::from_secs(5),
            tls: None,
            hooks: None,
        }
    }

    fn unique(prefix: &str) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!(
            "/queue/stompdev-{prefix}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Queues these tests create expire 60 s after their last use (no leftovers on the
    /// broker). Every SEND/SUBSCRIBE to them must carry the same declaration header.
    const EXPIRES: (&str, &str) = ("x-expires", "60000");

    fn send(dest: &str, receipt: &str) -> Frame {
        Frame::new(Command::Send)
            .header("destination", dest)
            .header(EXPIRES.0, EXPIRES.1)
            .header("receipt", receipt)
            .body(format!("body of {receipt}"))
    }

    fn subscribe(dest: &str, id: &str, ack: &str) -> Frame {
        Frame::new(Command::Subscribe)
            .header("id", id)
            .header("destination", dest)
            .header(EXPIRES.0, EXPIRES.1)
            .header("ack", ack)
    }

    #[test]
    fn config_debug_redacts_passcode() {
        let mut c = cfg();
        c.passcode = "s3cret-pass".into();
        let d = format!("{c:?}");
        assert!(!d.contains("s3cret-pass"), "{d}");
    }

    #[test]
    fn heartbeat_negotiation_rules() {
        assert_eq!(negotiate(0, 5), None);
        assert_eq!(negotiate(5, 0), None);
        assert_eq!(negotiate(1000, 5000), Some(Duration::from_millis(5000)));
        assert_eq!(negotiate(7000, 5000), Some(Duration::from_millis(7000)));
        assert_eq!(parse_heartbeat("10, 20"), Some((10, 20)));
        assert_eq!(parse_heartbeat("x,1"), None);
    }

    #[test]
    fn connect_disconnect() {
        if !broker_up() {
            return;
        }
        let t = Instant::now();
        let conn = Connection::open(&cfg(), BROKER).unwrap();
        eprintln!(
            "connected in {:?}: server={:?} session={:?}",
            t.elapsed(),
            conn.server(),
            conn.session()
        );
        assert_eq!(conn.host(), BROKER);
        assert!(conn.server().unwrap_or("").starts_with("RabbitMQ"));
        assert_eq!(conn.heartbeats(), (None, None));
        assert_eq!(conn.keepalive_due_in(), None);
        assert!(conn.as_raw_fd() >= 0);
        conn.disconnect(Duration::from_secs(5)).unwrap();
        // open_any
        let mut c = cfg();
        c.hosts = vec!["127.0.0.1:1".into(), BROKER.into()];
        let conn = Connection::open_any(&c).unwrap();
        assert_eq!(conn.host(), BROKER);
        conn.disconnect(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn bad_passcode_is_refused_quickly() {
        if !broker_up() {
            return;
        }
        let mut c = cfg();
        c.passcode = "definitely-wrong-pw".into();
        let t = Instant::now();
        let err = Connection::open(&c, BROKER).unwrap_err();
        eprintln!("bad login after {:?}: {err}", t.elapsed());
        assert!(matches!(err, StompError::Refused(_)), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(!err.to_string().contains("definitely-wrong-pw"));
        assert!(!format!("{err:?}").contains("definitely-wrong-pw"));
        // Bad vhost too.
        let mut c = cfg();
        c.vhost = "no-such-vhost-stompdev".into();
        let err = Connection::open(&c, BROKER).unwrap_err();
        eprintln!("bad vhost: {err}");
        assert!(matches!(err, StompError::Refused(_)), "{err:?}");
    }

    #[test]
    fn connect_errors() {
        // Closed port: refused immediately, well within the timeout.
        let mut c = cfg();
        c.connect_timeout = Duration::from_secs(2);
        let t = Instant::now();
        let err = Connection::open(&c, "127.0.0.1:1").unwrap_err();
        assert!(t.elapsed() <= Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(matches!(err, StompError::Io(_)), "{err:?}");
        // A listener that never answers CONNECT: timeout within connect_timeout.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        c.connect_timeout = Duration::from_millis(500);
        let t = Instant::now();
        let err = Connection::open(&c, &addr).unwrap_err();
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert!(matches!(err, StompError::Timeout(_)), "{err:?}");
        // A listener that closes at once.
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr2 = l2.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || drop(l2.accept()));
        let err = Connection::open(&c, &addr2).unwrap_err();
        h.join().unwrap();
        assert!(
            matches!(err, StompError::Closed | StompError::Io(_)),
            "{err:?}"
        );
        // Bad addresses.
        assert!(matches!(
            Connection::open(&c, "no-port"),
            Err(StompError::Config(_))
        ));
        let mut c = cfg();
        c.hosts.clear();
        assert!(matches!(
            Connection::open_any(&c),
            Err(StompError::Config(_))
        ));
        drop(l);
    }

    #[test]
    fn connect_rejects_line_breaks_in_credentials() {
        let mut c = cfg();
        c.passcode = "pw\nx:y".into();
        // Fails before any network traffic matters; the passcode is not in the message.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let err = Connection::open(&c, &addr).unwrap_err();
        assert!(matches!(err, StompError::Config(_)), "{err:?}");
        assert!(!err.to_string().contains("pw\nx"));
    }

    #[test]
    fn pipelined_batch_of_1000() {
        if !broker_up() {
            return;
        }
        let dest = unique("batch");
        let mut conn = Connection::open(&cfg(), BROKER).unwrap();
        let frames: Vec<Frame> = (0..1000).map(|i| send(&dest, &format!("b-{i}"))).collect();
        let t = Instant::now();
        let out = send_batch(&mut conn, &frames, Duration::from_secs(30));
        eprintln!("1000 pipelined sends receipted in {:?}", t.elapsed());
        assert!(out.all_ok(), "{:?}", out.errors);
        // RabbitMQ receipts in order.
        let want: Vec<String> = (0..1000).map(|i| format!("b-{i}")).collect();
        assert_eq!(out.receipted, want);
        // All delivered, in order, bodies intact.
        conn.queue(&subscribe(&dest, "0", "auto")).unwrap();
        conn.flush().unwrap();
        for i in 0..1000 {
            let f = conn.read_frame(Duration::from_secs(10)).unwrap().unwrap();
            assert_eq!(f.command, Command::Message);
            assert_eq!(f.body, format!("body of b-{i}").into_bytes());
        }
        conn.disconnect(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn batch_with_unroutable_frame() {
        if !broker_up() {
            return;
        }
        let dest = unique("mixed");
        let mut conn = Connection::open(&cfg(), BROKER).unwrap();
        let mut frames: Vec<Frame> = (0..10).map(|i| send(&dest, &format!("m-{i}"))).collect();
        frames[5] = send("/nonsense/x", "m-5");
        let t = Instant::now();
        let out = send_batch(&mut conn, &frames, Duration::from_secs(10));
        let took = t.elapsed();
        eprintln!(
            "mixed batch after {took:?}: receipted={:?} errors={:#?}",
            out.receipted, out.errors
        );
        // RabbitMQ 3.10: one ERROR without receipt-id, every other frame receipted.
        let want: Vec<String> = [0, 1, 2, 3, 4, 6, 7, 8, 9]
            .iter()
            .map(|i| format!("m-{i}"))
            .collect();
        assert_eq!(out.receipted, want);
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        match &out.errors[0] {
            StompError::Broker {
                message,
                receipt_id,
                body,
            } => {
                assert_eq!(message, "Unknown destination");
                assert_eq!(receipt_id, &None);
                assert!(body.contains("/nonsense/x"), "{body}");
            }
            e => panic!("{e:?}"),
        }
        // The grace period bounded the wait for the missing receipt.
        assert!(took < ERROR_GRACE + Duration::from_secs(1), "{took:?}");
        // The connection survives and stays usable.
        let out = send_batch(&mut conn, &[send(&dest, "after")], Duration::from_secs(5));
        assert!(out.all_ok(), "{:?}", out.errors);
        assert_eq!(out.receipted, vec!["after".to_string()]);
        conn.disconnect(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn batch_to_missing_exchange_closes_connection() {
        if !broker_up() {
            return;
        }
        let dest = unique("exch");
        let mut conn = Connection::open(&cfg(), BROKER).unwrap();
        let frames = vec![
            send(&dest, "x-0"),
            Frame::new(Command::Send)
                .header("destination", "/exchange/stompdev-no-such-exchange")
                .header("receipt", "x-1")
                .body("x"),
            send(&dest, "x-2"),
        ];
        let out = send_batch(&mut conn, &frames, Duration::from_secs(5));
        eprintln!(
            "missing exchange: receipted={:?} errors={:#?}",
            out.receipted, out.errors
        );
        // RabbitMQ 3.10: ERROR "not_found" (no receipt-id), then it closes the connection;
        // the frame after the bad one is not receipted.
        assert!(!out.receipted.contains(&"x-1".to_string()));
        assert!(matches!(
            &out.errors[0],
            StompError::Broker { message, receipt_id: None, .. } if message == "not_found"
        ));
        assert!(
            matches!(out.errors.last(), Some(StompError::Closed)),
            "{:?}",
            out.errors
        );
        assert!(matches!(conn.keepalive(), Err(StompError::Closed)));
        assert!(matches!(
            conn.read_frame(Duration::from_millis(10)),
            Err(StompError::Closed)
        ));
    }

    #[test]
    fn header_injection_round_trip_through_broker() {
        if !broker_up() {
            return;
        }
        let dest = unique("inject");
        let mut conn = Connection::open(&cfg(), BROKER).unwrap();
        let evil = "x\ndestination:/queue/evil\n\nSEND\ndestination:/queue/evil2\n\nboom\0\\c:\r";
        conn.queue(&subscribe(&dest, "sub-0", "client-individual").header("receipt", "sub"))
            .unwrap();
        conn.flush().unwrap();
        let r = conn.read_frame(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(r.get("receipt-id"), Some("sub"));
        let body = b"binary\0body\nwith NUL".to_vec();
        let frames = vec![
            send(&dest, "s-1")
                .header("x-evil", evil)
                .header("x:colon\nname", "v")
                .body(body.clone()),
        ];
        // The MESSAGE may arrive before the RECEIPT: send_batch keeps it for read_frame.
        let out = send_batch(&mut conn, &frames, Duration::from_secs(5));
        assert!(out.all_ok(), "{:?}", out.errors);
        let m = conn.read_frame(Duration::from_secs(5)).unwrap().unwrap();
        eprintln!("message headers from broker: {:?}", m.headers);
        assert_eq!(m.command, Command::Message);
        assert_eq!(m.get("x-evil"), Some(evil));
        assert_eq!(m.get("x:colon\nname"), Some("v"));
        assert_eq!(m.get("destination"), Some(dest.as_str()));
        assert_eq!(m.body, body);
        // client-individual ack: the `ack` header equals message-id on RabbitMQ.
        let ack = m.get("ack").expect("ack header").to_string();
        assert_eq!(Some(ack.as_str()), m.get("message-id"));
        conn.queue(
            &Frame::new(Command::Ack)
                .header("id", ack.as_str())
                .header("receipt", "ack-1"),
        )
        .unwrap();
        conn.flush().unwrap();
        let r = conn.read_frame(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(r.command, Command::Receipt);
        assert_eq!(r.get("receipt-id"), Some("ack-1"));
        // Nothing else (no injected frame) arrives.
        assert!(
            conn.read_frame(Duration::from_millis(300))
                .unwrap()
                .is_none()
        );
        conn.disconnect(Duration::from_secs(5)).unwrap();
        // The ACKed message is gone: a new subscriber gets nothing.
        let mut c2 = Connection::open(&cfg(), BROKER).unwrap();
        c2.queue(&subscribe(&dest, "0", "auto")).unwrap();
        c2.flush().unwrap();
        assert!(c2.read_frame(Duration::from_millis(500)).unwrap().is_none());
        c2.disconnect(Duration::from_secs(5)).unwrap();
        // Nothing was created under the injected names.
        let mut c3 = Connection::open(&cfg(), BROKER).unwrap();
        c3.queue(
            &Frame::new(Command::Subscribe)
                .header("id", "0")
                .header("destination", "/amq/queue/evil")
                .header("receipt", "probe"),
        )
        .unwrap();
        c3.flush().unwrap();
        let probe = c3.read_frame(Duration::from_secs(5));
        assert!(
            matches!(&probe, Err(StompError::Broker { message, .. }) if message == "not_found"),
            "{probe:?}"
        );
    }

    #[test]
    fn nack_redelivers() {
        if !broker_up() {
            return;
        }
        let dest = unique("nack");
        let mut conn = Connection::open(&cfg(), BROKER).unwrap();
        conn.queue(&subscribe(&dest, "s", "client-individual"))
            .unwrap();
        let out = send_batch(&mut conn, &[send(&dest, "n-1")], Duration::from_secs(5));
        assert!(out.all_ok(), "{:?}", out.errors);
        let m = conn.read_frame(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(m.get("redelivered"), Some("false"));
        let ack = m.get("ack").unwrap().to_string();
        conn.queue(&Frame::new(Command::Nack).header("id", ack))
            .unwrap();
        conn.flush().unwrap();
        let m = conn.read_frame(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(m.get("redelivered"), Some("true"));
        conn.queue(&Frame::new(Command::Ack).header("id", m.get("ack").unwrap()))
            .unwrap();
        conn.flush().unwrap();
        conn.disconnect(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn heartbeats_keep_idle_connection_alive() {
        if !broker_up() {
            return;
        }
        let mut c = cfg();
        c.heartbeat = (1000, 1000);
        let mut conn = Connection::open(&c, BROKER).unwrap();
        eprintln!("negotiated heart-beats: {:?}", conn.heartbeats());
        let one = Some(Duration::from_millis(1000));
        assert_eq!(conn.heartbeats(), (one, one));
        let start = Instant::now();
        let mut calls = 0;
        while start.elapsed() < Duration::from_secs(3) {
            let due = conn.keepalive_due_in().expect("heart-beats on");
            assert!(due <= Duration::from_millis(500), "{due:?}");
            std::thread::sleep(due);
            conn.keepalive().unwrap();
            calls += 1;
        }
        assert!(!conn.has_buffered());
        eprintln!("{calls} keepalive calls in 3 s");
        // Still usable.
        let dest = unique("hb");
        let out = send_batch(&mut conn, &[send(&dest, "hb-1")], Duration::from_secs(5));
        assert!(out.all_ok(), "{:?}", out.errors);
        // read_frame alone also keeps it alive (it sends heart-beats while waiting).
        assert!(conn.read_frame(Duration::from_secs(3)).unwrap().is_none());
        conn.disconnect(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn heartbeats_waiting_in_socket_buffer_count_as_liveness() {
        if !broker_up() {
            return;
        }
        // Only the broker sends heart-beats (we send none, so it does not drop us). A caller
        // that slept past our broker deadline without reading must not be fooled: the
        // broker's heart-beats are waiting in the socket buffer.
        let mut c = cfg();
        c.heartbeat = (0, 1000);
        let mut conn = Connection::open(&c, BROKER).unwrap();
        assert_eq!(conn.heartbeats(), (None, Some(Duration::from_millis(1000))));
        std::thread::sleep(Duration::from_millis(3500));
        assert!(
            conn.read_frame(Duration::from_millis(100))
                .unwrap()
                .is_none()
        );
        std::thread::sleep(Duration::from_millis(3500));
        conn.keepalive().unwrap();
        conn.disconnect(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn rabbitmq_heartbeat_floor() {
        if !broker_up() {
            return;
        }
        let mut c = cfg();
        c.heartbeat = (300, 300);
        let conn = Connection::open(&c, BROKER).unwrap();
        let one = Some(Duration::from_millis(1000));
        assert_eq!(conn.heartbeats(), (one, one));
        conn.disconnect(Duration::from_secs(5)).unwrap();
    }

    /// Starts a fake broker on 127.0.0.1 that answers CONNECT with `connected`, then runs
    /// `then` on the socket.
    fn fake_broker(
        connected: &'static [u8],
        then: impl FnOnce(&mut TcpStream) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<()>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(connected).unwrap();
            then(&mut s);
        });
        (addr, h)
    }

    #[test]
    fn flush_does_not_deadlock_when_both_sides_write() {
        // The broker writes 24 MiB before reading anything while we write 24 MiB: without
        // draining reads during flush both sides would block forever.
        const MIB: usize = 1 << 20;
        let (addr, h) = fake_broker(b"CONNECTED\nversion:1.2\n\n\0", |s| {
            let mut out = Vec::new();
            for i in 0..24 {
                let f = Frame::new(Command::Message)
                    .header("n", i.to_string())
                    .body(vec![b'm'; MIB]);
                encode(&f, &mut out).unwrap();
            }
            s.write_all(&out).unwrap();
            let mut total = 0;
            let mut buf = vec![0u8; MIB];
            while total < 24 * MIB {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            s.write_all(b"RECEIPT\nreceipt-id:done\n\n\0").unwrap();
            let _ = s.read(&mut buf);
        });
        let mut conn = Connection::open(&cfg(), &addr).unwrap();
        for i in 0..24 {
            conn.queue(
                &Frame::new(Command::Send)
                    .header("destination", "/queue/x")
                    .header("n", i.to_string())
                    .body(vec![b's'; MIB]),
            )
            .unwrap();
        }
        let t = Instant::now();
        conn.flush().unwrap();
        assert_eq!(conn.queued_len(), 0);
        eprintln!("24 MiB each way in {:?}", t.elapsed());
        for i in 0..24 {
            let f = conn.read_frame(Duration::from_secs(10)).unwrap().unwrap();
            assert_eq!(f.get("n"), Some(i.to_string().as_str()));
            assert_eq!(f.body.len(), MIB);
        }
        let r = conn.read_frame(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(r.get("receipt-id"), Some("done"));
        drop(conn);
        h.join().unwrap();
    }

    #[test]
    fn oversized_frame_from_broker_is_an_error() {
        let (addr, h) = fake_broker(b"CONNECTED\nversion:1.2\n\n\0", |s| {
            let mut out = Vec::new();
            encode(
                &Frame::new(Command::Message).body(vec![0u8; 5000]),
                &mut out,
            )
            .unwrap();
            // Not in the same read as CONNECTED (set_max_frame_bytes comes after open).
            std::thread::sleep(Duration::from_millis(200));
            let _ = s.write_all(&out);
            std::thread::sleep(Duration::from_millis(300));
        });
        let mut conn = Connection::open(&cfg(), &addr).unwrap();
        assert!(conn.set_max_frame_bytes(1000));
        let err = conn.read_frame(Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(err, StompError::Frame(FrameError::TooLarge { .. })),
            "{err:?}"
        );
        drop(conn);
        h.join().unwrap();
    }

    #[test]
    fn wrong_version_and_unexpected_answers() {
        let (addr, h) = fake_broker(b"CONNECTED\nversion:1.1\n\n\0", |_| {});
        let err = Connection::open(&cfg(), &addr).unwrap_err();
        assert!(matches!(err, StompError::Protocol(_)), "{err:?}");
        h.join().unwrap();
        let (addr, h) = fake_broker(b"RECEIPT\nreceipt-id:1\n\n\0", |_| {});
        let err = Connection::open(&cfg(), &addr).unwrap_err();
        assert!(matches!(err, StompError::Protocol(_)), "{err:?}");
        h.join().unwrap();
        let (addr, h) = fake_broker(b"GARBAGE\n\n\0", |_| {});
        let err = Connection::open(&cfg(), &addr).unwrap_err();
        assert!(matches!(err, StompError::Frame(_)), "{err:?}");
        h.join().unwrap();
    }

    #[test]
    fn silent_broker_is_detected() {
        // A fake broker that answers CONNECT with heart-beats on, then goes silent.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(b"CONNECTED\nversion:1.2\nheart-beat:200,200\nserver:fake/1\n\n\0")
                .unwrap();
            std::thread::sleep(Duration::from_secs(3));
        });
        let mut c = cfg();
        c.heartbeat = (200, 200);
        let mut conn = Connection::open(&c, &addr).unwrap();
        assert_eq!(conn.server(), Some("fake/1"));
        let t = Instant::now();
        let err = conn.read_frame(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, StompError::Timeout("heart-beat")), "{err:?}");
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(1300) && e < Duration::from_millis(2500),
            "{e:?}"
        );
        assert!(matches!(
            conn.keepalive(),
            Err(StompError::Timeout("heart-beat"))
        ));
        drop(conn);
        h.join().unwrap();
    }

    /// TLS tests: RabbitMQ's plain STOMP port behind `socat OPENSSL-LISTEN` (the TLS
    /// terminator), with throw-away certificates made by the `openssl` CLI.
    mod tls {
        use super::*;
        use std::path::{Path, PathBuf};
        use std::process::{Child, Command as Cmd, Stdio};

        /// A temporary directory, removed on drop.
        struct TempDir(PathBuf);

        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        /// A `socat` child process, killed on drop (also when the test panics).
        struct Socat {
            child: Child,
            port: u16,
        }

        impl Drop for Socat {
            fn drop(&mut self) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }

        impl Socat {
            fn addr(&self) -> String {
                format!("127.0.0.1:{}", self.port)
            }
        }

        fn tools_present() -> bool {
            for (tool, arg) in [("socat", "-V"), ("openssl", "version")] {
                let ok = Cmd::new(tool)
                    .arg(arg)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    eprintln!("NOTE: skipping tls test, `{tool}` is not installed");
                    return false;
                }
            }
            true
        }

        fn openssl(dir: &Path, args: &[&str]) {
            let out = Cmd::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

        /// Throw-away PKI in a temp dir: `ca` and `ca2` (two unrelated CAs), and, signed by
        /// `ca`: `server` (IP 127.0.0.1 + DNS localhost), `other` (DNS other.example only)
        /// and `client` (client auth). Files are `<name>.pem` / `<name>.key`.
        struct Pki {
            dir: TempDir,
        }

        impl Pki {
            fn new() -> Pki {
                use std::sync::atomic::{AtomicU64, Ordering};
                static N: AtomicU64 = AtomicU64::new(0);
                let dir = std::env::temp_dir().join(format!(
                    "stompdev-tls-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let pki = Pki { dir: TempDir(dir) };
                let d = pki.dir();
                std::fs::write(
                    d.join("ca.cnf"),
                    "[req]\ndistinguished_name = dn\n[dn]\n[v3_ca]\n\
                     basicConstraints = critical,CA:TRUE\n\
                     keyUsage = critical,keyCertSign,cRLSign\n\
                     subjectKeyIdentifier = hash\n",
                )
                .unwrap();
                for ca in ["ca", "ca2"] {
                    let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
                    args.extend(EC);
                    let (key, pem, subj) = (
                        format!("{ca}.key"),
                        format!("{ca}.pem"),
                        format!("/CN=stompdev {ca}"),
                    );
                    args.extend([
                        "-keyout",
                        &key,
                        "-out",
                        &pem,
                        "-subj",
                        &subj,
                        "-config",
                        "ca.cnf",
                        "-extensions",
                        "v3_ca",
                    ]);
                    openssl(d, &args);
                }
                pki.leaf(
                    "server",
                    "serverAuth",
                    "subjectAltName = IP:127.0.0.1,DNS:localhost\n",
                );
                pki.leaf(
                    "other",
                    "serverAuth",
                    "subjectAltName = DNS:other.example\n",
                );
                pki.leaf("client", "clientAuth", "");
                pki
            }

            fn leaf(&self, name: &str, eku: &str, san: &str) {
                let d = self.dir();
                let ext = format!("{name}.ext");
                std::fs::write(
                    d.join(&ext),
                    format!(
                        "basicConstraints = critical,CA:FALSE\n\
                         keyUsage = critical,digitalSignature\n\
                         extendedKeyUsage = {eku}\n\
                         authorityKeyIdentifier = keyid\n{san}"
                    ),
                )
                .unwrap();
                let (key, csr, pem, subj) = (
                    format!("{name}.key"),
                    format!("{name}.csr"),
                    format!("{name}.pem"),
                    format!("/CN=stompdev {name}"),
                );
                let mut args = vec!["req", "-new", "-nodes"];
                args.extend(EC);
                args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
                openssl(d, &args);
                openssl(
                    d,
                    &[
                        "x509",
                        "-req",
                        "-in",
                        &csr,
                        "-CA",
                        "ca.pem",
                        "-CAkey",
                        "ca.key",
                        "-CAcreateserial",
                        "-days",
                        "2",
                        "-out",
                        &pem,
                        "-extfile",
                        &ext,
                    ],
                );
            }

            fn dir(&self) -> &Path {
                &self.dir.0
            }

            fn path(&self, file: &str) -> String {
                self.dir().join(file).to_str().unwrap().to_string()
            }

            fn tls(&self, ca: &str) -> TlsConfig {
                TlsConfig {
                    ca_certs: self.path(&format!("{ca}.pem")),
                    cert_file: String::new(),
                    key_file: String::new(),
                }
            }

            /// Starts `socat` terminating TLS with certificate `name` in front of `target`
            /// (`verify=1`: a client certificate signed by `ca` is required) and waits until
            /// it accepts connections.
            fn socat(&self, name: &str, verify: bool, target: &str) -> Socat {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                let listen = format!(
                    "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},\
                     cafile={},verify={}",
                    self.path(&format!("{name}.pem")),
                    self.path(&format!("{name}.key")),
                    self.path("ca.pem"),
                    u8::from(verify)
                );
                let log =
                    std::fs::File::create(self.dir().join(format!("socat-{port}.log"))).unwrap();
                let child = Cmd::new("socat")
                    .args([listen.as_str(), &format!("TCP:{target}")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start socat");
                let socat = Socat { child, port };
                let t = Instant::now();
                while TcpStream::connect(socat.addr()).is_err() {
                    assert!(t.elapsed() < Duration::from_secs(5), "socat did not start");
                    std::thread::sleep(Duration::from_millis(20));
                }
                socat
            }
        }

        fn tls_cfg(addr: &str, tls: TlsConfig) -> Config {
            let mut c = cfg();
            c.hosts = vec![addr.to_string()];
            c.tls = Some(tls);
            c
        }

        fn expect_tls_error(c: &Config, host: &str, wants: &[&str]) -> String {
            let t = Instant::now();
            let err = Connection::open(c, host).unwrap_err();
            let took = t.elapsed();
            eprintln!("tls failure after {took:?}: {err}");
            assert!(matches!(err, StompError::Tls(_)), "{err:?}");
            assert!(err.is_fatal());
            assert!(took < Duration::from_secs(2), "{took:?}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("tls handshake with {host} failed: ")),
                "{text}"
            );
            for w in wants {
                assert!(text.contains(w), "{text:?} lacks {w:?}");
            }
            text
        }

        #[test]
        fn tls_batch_subscribe_and_large_frames() {
            if !tools_present() || !broker_up() {
                return;
            }
            let pki = Pki::new();
            let socat = pki.socat("server", false, BROKER);
            let c = tls_cfg(&socat.addr(), pki.tls("ca"));
            let t = Instant::now();
            let mut conn = Connection::open(&c, &socat.addr()).unwrap();
            eprintln!("tls connected in {:?}: {conn:?}", t.elapsed());
            assert!(conn.is_tls());
            assert!(conn.server().unwrap_or("").starts_with("RabbitMQ"));
            assert!(conn.as_raw_fd() >= 0);
            assert!(!conn.has_buffered());
            let dest = unique("tls");
            let mut frames: Vec<Frame> = (0..300).map(|i| send(&dest, &format!("t-{i}"))).collect();
            // Frames much larger than a TLS record (16 KiB) in both directions.
            let big: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i % 251) as u8).collect();
            frames.push(send(&dest, "t-big").body(big.clone()));
            let t = Instant::now();
            let out = send_batch(&mut conn, &frames, Duration::from_secs(30));
            eprintln!(
                "301 pipelined sends over tls receipted in {:?}",
                t.elapsed()
            );
            assert!(out.all_ok(), "{:?}", out.errors);
            let mut want: Vec<String> = (0..300).map(|i| format!("t-{i}")).collect();
            want.push("t-big".into());
            assert_eq!(out.receipted, want);
            conn.queue(&subscribe(&dest, "0", "auto")).unwrap();
            conn.flush().unwrap();
            for i in 0..300 {
                let f = conn.read_frame(Duration::from_secs(10)).unwrap().unwrap();
                assert_eq!(f.command, Command::Message);
                assert_eq!(f.body, format!("body of t-{i}").into_bytes());
                // Eager decoding: nothing is ever left inside rustls between calls.
                assert!(!conn.transport.holds_plaintext());
            }
            let f = conn.read_frame(Duration::from_secs(10)).unwrap().unwrap();
            assert_eq!(f.get("receipt"), Some("t-big"));
            assert!(f.body == big, "big body differs");
            assert!(!conn.has_buffered());
            assert!(
                conn.read_frame(Duration::from_millis(200))
                    .unwrap()
                    .is_none()
            );
            conn.disconnect(Duration::from_secs(5)).unwrap();
            // The DNS name of the certificate works too.
            let host = format!("localhost:{}", socat.port);
            let conn = Connection::open(&c, &host).unwrap();
            conn.disconnect(Duration::from_secs(5)).unwrap();
        }

        #[test]
        fn tls_wrong_ca_is_rejected() {
            if !tools_present() || !broker_up() {
                return;
            }
            let pki = Pki::new();
            let socat = pki.socat("server", false, BROKER);
            let c = tls_cfg(&socat.addr(), pki.tls("ca2"));
            expect_tls_error(
                &c,
                &socat.addr(),
                &["invalid peer certificate", "UnknownIssuer"],
            );
            // open_any reports it too (and does not take it for a refusal).
            let err = Connection::open_any(&c).unwrap_err();
            assert!(matches!(err, StompError::Tls(_)), "{err:?}");
        }

        #[test]
        fn tls_wrong_host_name_is_rejected() {
            if !tools_present() || !broker_up() {
                return;
            }
            let pki = Pki::new();
            // A certificate for other.example only, signed by the trusted CA.
            let socat = pki.socat("other", false, BROKER);
            let c = tls_cfg(&socat.addr(), pki.tls("ca"));
            expect_tls_error(
                &c,
                &socat.addr(),
                &["invalid peer certificate", "not valid"],
            );
            let host = format!("localhost:{}", socat.port);
            expect_tls_error(&c, &host, &["invalid peer certificate", "not valid"]);
        }

        #[test]
        fn tls_client_certificate() {
            if !tools_present() || !broker_up() {
                return;
            }
            let pki = Pki::new();
            let socat = pki.socat("server", true, BROKER);
            let mut tls = pki.tls("ca");
            tls.cert_file = pki.path("client.pem");
            tls.key_file = pki.path("client.key");
            let c = tls_cfg(&socat.addr(), tls);
            let mut conn = Connection::open(&c, &socat.addr()).unwrap();
            let dest = unique("tls-client");
            let out = send_batch(&mut conn, &[send(&dest, "c-1")], Duration::from_secs(5));
            assert!(out.all_ok(), "{:?}", out.errors);
            conn.disconnect(Duration::from_secs(5)).unwrap();
            // Without a client certificate the server refuses.
            let c = tls_cfg(&socat.addr(), pki.tls("ca"));
            expect_tls_error(&c, &socat.addr(), &[]);
        }

        #[test]
        fn tls_heartbeats_keep_connection_alive() {
            if !tools_present() || !broker_up() {
                return;
            }
            let pki = Pki::new();
            let socat = pki.socat("server", false, BROKER);
            let mut c = tls_cfg(&socat.addr(), pki.tls("ca"));
            // Two seconds: under a loaded machine (CI builds beside it) a
            // sleep may overshoot, and RabbitMQ drops a client silent for
            // three of its intervals.
            c.heartbeat = (2000, 2000);
            let mut conn = Connection::open(&c, &socat.addr()).unwrap();
            let two = Some(Duration::from_millis(2000));
            assert_eq!(conn.heartbeats(), (two, two));
            let start = Instant::now();
            let mut calls = 0;
            while start.elapsed() < Duration::from_secs(5) {
                let due = conn.keepalive_due_in().expect("heart-beats on");
                assert!(due <= Duration::from_millis(1000), "{due:?}");
                std::thread::sleep(due);
                conn.keepalive().unwrap();
                assert!(!conn.has_buffered());
                calls += 1;
            }
            eprintln!("{calls} keepalive calls in 5 s over tls");
            let dest = unique("tls-hb");
            let out = send_batch(&mut conn, &[send(&dest, "hb-1")], Duration::from_secs(5));
            assert!(out.all_ok(), "{:?}", out.errors);
            // read_frame alone also keeps it alive.
            assert!(conn.read_frame(Duration::from_secs(3)).unwrap().is_none());
            conn.disconnect(Duration::from_secs(5)).unwrap();
            // Heart-beats only from the broker, read late: still alive.
            c.heartbeat = (0, 1000);
            let mut conn = Connection::open(&c, &socat.addr()).unwrap();
            std::thread::sleep(Duration::from_millis(3500));
            conn.keepalive().unwrap();
            assert!(!conn.has_buffered());
            conn.disconnect(Duration::from_secs(5)).unwrap();
        }

        #[test]
        fn tls_to_a_plain_port_fails_clearly() {
            if !tools_present() || !broker_up() {
                return;
            }
            let pki = Pki::new();
            // RabbitMQ's plain STOMP port closes on a ClientHello.
            let c = tls_cfg(BROKER, pki.tls("ca"));
            expect_tls_error(&c, BROKER, &[]);
            // A server that never answers the ClientHello: the connect timeout covers the
            // handshake.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let mut c = tls_cfg(&addr, pki.tls("ca"));
            c.connect_timeout = Duration::from_millis(500);
            let t = Instant::now();
            let err = Connection::open(&c, &addr).unwrap_err();
            assert!(
                matches!(err, StompError::Timeout("tls handshake")),
                "{err:?}"
            );
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
                "{took:?}"
            );
            drop(l);
        }

        #[test]
        fn tls_flush_does_not_deadlock_when_both_sides_write() {
            if !tools_present() {
                return;
            }
            // Like the plain test, through socat: both sides write 24 MiB before reading.
            const MIB: usize = 1 << 20;
            const N: usize = 24;
            let (addr, h) = fake_broker(b"CONNECTED\nversion:1.2\n\n\0", |s| {
                let mut out = Vec::new();
                for i in 0..N {
                    let f = Frame::new(Command::Message)
                        .header("n", i.to_string())
                        .body(vec![b'm'; MIB]);
                    encode(&f, &mut out).unwrap();
                }
                s.write_all(&out).unwrap();
                let mut total = 0;
                let mut buf = vec![0u8; MIB];
                while total < N * MIB {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                s.write_all(b"RECEIPT\nreceipt-id:done\n\n\0").unwrap();
                let _ = s.read(&mut buf);
            });
            let pki = Pki::new();
            let socat = pki.socat("server", false, &addr);
            let c = tls_cfg(&socat.addr(), pki.tls("ca"));
            let mut conn = Connection::open(&c, &socat.addr()).unwrap();
            for i in 0..N {
                conn.queue(
                    &Frame::new(Command::Send)
                        .header("destination", "/queue/x")
                        .header("n", i.to_string())
                        .body(vec![b's'; MIB]),
                )
                .unwrap();
            }
            let t = Instant::now();
            conn.flush().unwrap();
            assert_eq!(conn.queued_len(), 0);
            assert!(!conn.transport.wants_write());
            eprintln!("{N} MiB each way over tls in {:?}", t.elapsed());
            for i in 0..N {
                let f = conn.read_frame(Duration::from_secs(10)).unwrap().unwrap();
                assert_eq!(f.get("n"), Some(i.to_string().as_str()));
                assert_eq!(f.body.len(), MIB);
            }
            let r = conn.read_frame(Duration::from_secs(10)).unwrap().unwrap();
            assert_eq!(r.get("receipt-id"), Some("done"));
            drop(conn);
            drop(socat);
            h.join().unwrap();
        }

        #[test]
        fn tls_config_errors_name_the_file_not_its_contents() {
            let dir = std::env::temp_dir().join(format!("stompdev-tlscfg-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let _guard = TempDir(dir.clone());
            let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
            let secret = "-----BEGIN PRIVATE KEY-----\nS3CRETS3CRET!!\n-----END PRIVATE KEY-----\n";
            std::fs::write(dir.join("garbage.pem"), secret).unwrap();
            std::fs::write(dir.join("empty.pem"), "").unwrap();
            let tls = |ca: &str, cert: &str, key: &str| TlsConfig {
                ca_certs: ca.to_string(),
                cert_file: cert.to_string(),
                key_file: key.to_string(),
            };
            let check = |t: TlsConfig, wants: &str| {
                let err = t.client_config().unwrap_err();
                eprintln!("{err}");
                assert!(matches!(err, StompError::Config(_)), "{err:?}");
                let text = err.to_string();
                assert!(text.contains(wants), "{text:?} lacks {wants:?}");
                assert!(!text.contains("S3CRET"), "{text}");
                // Open fails the same way, before any network traffic.
                let mut c = cfg();
                c.tls = Some(t);
                let err = Connection::open(&c, "127.0.0.1:1").unwrap_err();
                assert!(matches!(err, StompError::Config(_)), "{err:?}");
            };
            check(tls("", "", ""), "ca_certs");
            check(tls(&p("missing.pem"), "", ""), "missing.pem");
            check(tls(&p("empty.pem"), "", ""), "empty.pem");
            check(tls(&p("garbage.pem"), "", ""), "garbage.pem");
            if tools_present() {
                let pki = Pki::new();
                let ca = pki.path("ca.pem");
                assert!(pki.tls("ca").client_config().is_ok());
                check(tls(&ca, &pki.path("client.pem"), ""), "together");
                check(tls(&ca, "", &pki.path("client.key")), "together");
                check(
                    tls(&ca, &pki.path("client.pem"), &p("garbage.pem")),
                    "garbage.pem",
                );
                check(
                    tls(&ca, &pki.path("client.pem"), &p("missing.key")),
                    "missing.key",
                );
                // A key that does not belong to the certificate.
                check(
                    tls(&ca, &pki.path("client.pem"), &pki.path("server.key")),
                    "client.pem",
                );
                // A key file given as the CA file: no CERTIFICATE in it.
                check(tls(&pki.path("ca.key"), "", ""), "no CERTIFICATE");
                assert!(
                    tls(&ca, &pki.path("client.pem"), &pki.path("client.key"))
                        .client_config()
                        .is_ok()
                );
            }
            // Server names.
            assert!(server_name("127.0.0.1:61614").is_ok());
            assert!(server_name("[::1]:61614").is_ok());
            assert!(server_name("broker.example:61614").is_ok());
            assert!(matches!(
                server_name("bad name:1"),
                Err(StompError::Config(_))
            ));
            // Config stays comparable (the worker reconnects when it changes).
            let mut a = cfg();
            a.tls = Some(tls("a", "", ""));
            let mut b = a.clone();
            assert_eq!(a, b);
            b.tls = Some(tls("b", "", ""));
            assert_ne!(a, b);
            assert!(format!("{a:?}").contains("ca_certs"));
        }
    }
}
