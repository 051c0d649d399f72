//! STOMP 1.2 frame codec: pure encoding and decoding, no I/O.
//!
//! Vocabulary (as in the STOMP 1.2 specification):
//!
//! * **frame**: one protocol unit: a command line, header lines, an empty line, a body and a
//!   terminating NUL octet.
//! * **command**: the first line of a frame (`SEND`, `MESSAGE`, ...), see [`Command`].
//! * **header**: a `name:value` line. Names and values are UTF-8; in every frame except
//!   CONNECT, STOMP and CONNECTED they are escaped (`\\` `\n` `:` `\r` become `\\\\` `\\n`
//!   `\\c` `\\r`). Repeated headers are kept in order; the first occurrence wins.
//! * **body**: arbitrary octets (NULs included when a `content-length` header says how many).
//! * **heart-beat EOL**: a bare `\n` (or `\r\n`) between frames, used as a keep-alive.
//!
//! [`encode`] appends a frame to a caller's buffer (so many frames can be pipelined into one
//! write); [`Decoder`] turns arbitrarily chunked input into [`Decoded`] items.

use std::fmt;
use std::str::FromStr;

/// A STOMP 1.2 command (the first line of a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Connect,
    Stomp,
    Connected,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
    Message,
    Receipt,
    Error,
}

impl Command {
    /// Every command, in declaration order.
    pub const ALL: [Command; 15] = [
        Command::Connect,
        Command::Stomp,
        Command::Connected,
        Command::Send,
        Command::Subscribe,
        Command::Unsubscribe,
        Command::Ack,
        Command::Nack,
        Command::Begin,
        Command::Commit,
        Command::Abort,
        Command::Disconnect,
        Command::Message,
        Command::Receipt,
        Command::Error,
    ];

    /// The command as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Connected => "CONNECTED",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    /// Parses a command line (exact, case-sensitive, without EOL).
    pub fn from_bytes(line: &[u8]) -> Option<Command> {
        Command::ALL
            .iter()
            .copied()
            .find(|c| c.as_str().as_bytes() == line)
    }

    /// Whether header names and values of this command are escaped. STOMP 1.2: CONNECT,
    /// STOMP and CONNECTED frames do not escape (for compatibility with STOMP 1.0).
    pub fn escapes_headers(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Command::from_bytes(s.as_bytes()).ok_or_else(|| FrameError::UnknownCommand(s.into()))
    }
}

/// Errors of the frame codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown stomp command {0:?}")]
    UnknownCommand(String),
    #[error("stomp frame larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("stomp header is not valid utf-8")]
    InvalidUtf8,
    #[error("malformed stomp header line {0:?}")]
    MalformedHeader(String),
    #[error("undefined escape sequence in stomp header {0:?}")]
    BadEscape(String),
    #[error("invalid content-length {0:?}")]
    BadContentLength(String),
    #[error("stomp frame body not terminated by a nul octet")]
    MissingNul,
    #[error("stray carriage return between stomp frames")]
    StrayCr,
    #[error("{command} header {what} cannot contain {bad} (no escaping in this frame)")]
    Unencodable {
        command: Command,
        what: &'static str,
        bad: &'static str,
    },
}

/// One STOMP frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub command: Command,
    /// Headers in wire order; repeated names are kept (the first occurrence wins).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Frame {
    /// A frame without headers and with an empty body.
    pub fn new(command: Command) -> Frame {
        Frame {
            command,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Appends a header (builder style).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body (builder style).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The value of the first header called `name` (STOMP 1.2: the first occurrence wins).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy), e.g. for ERROR frames.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Appends `s` escaped as a header (STOMP 1.2); runs of bytes that need
/// no escape are copied whole.
fn push_escaped(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b':' => b"\\c",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        out.extend_from_slice(escaped);
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

fn check_unescaped(command: Command, name: &str, value: &str) -> Result<(), FrameError> {
    let bad = |what, bad| FrameError::Unencodable { command, what, bad };
    if name.contains('\n') {
        return Err(bad("name", "a line feed"));
    }
    if name.contains('\r') {
        return Err(bad("name", "a carriage return"));
    }
    if name.contains(':') {
        return Err(bad("name", "a colon"));
    }
    if value.contains('\n') {
        return Err(bad("value", "a line feed"));
    }
    if value.contains('\r') {
        return Err(bad("value", "a carriage return"));
    }
    Ok(())
}

/// Appends the wire form of `frame` to `out`.
///
/// * Headers are escaped, except in CONNECT/STOMP/CONNECTED frames where the specification
///   forbids escaping: there a name containing `\n`, `\r` or `:` or a value containing `\n` or
///   `\r` is rejected (nothing is appended to `out` on error).
/// * Any `content-length` header given by the caller is dropped; a correct one is emitted
///   for every non-empty body (which may then contain NULs).
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let escape = frame.command.escapes_headers();
    if !escape {
        for (n, v) in &frame.headers {
            check_unescaped(frame.command, n, v)?;
        }
    }
    out.reserve(
        frame.command.as_str().len()
            + frame
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 2)
                .sum::<usize>()
            + frame.body.len()
            + 32,
    );
    out.extend_from_slice(frame.command.as_str().as_bytes());
    out.push(b'\n');
    for (n, v) in &frame.headers {
        if n == "content-length" {
            continue;
        }
        if escape {
            push_escaped(out, n);
            out.push(b':');
            push_escaped(out, v);
        } else {
            out.extend_from_slice(n.as_bytes());
            out.push(b':');
            out.extend_from_slice(v.as_bytes());
        }
        out.push(b'\n');
    }
    if !frame.body.is_empty() {
        out.extend_from_slice(b"content-length:");
        out.extend_from_slice(frame.body.len().to_string().as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(&frame.body);
    out.push(0);
    Ok(())
}

/// One item produced by the [`Decoder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// A heart-beat EOL (`\n` or `\r\n`) between frames.
    Heartbeat,
}

/// Where the decoder is within the current frame.
#[derive(Debug)]
enum State {
    /// Between frames (heart-beat EOLs allowed).
    Idle,
    /// Reading the command line.
    Command,
    /// Reading header lines.
    Headers(Frame),
    /// Reading the body, which starts at `start` (relative to the frame start).
    Body {
        frame: Frame,
        start: usize,
        len: Option<usize>,
    },
}

/// Incremental STOMP 1.2 decoder.
///
/// Feed it bytes as they arrive ([`Decoder::feed`]) and pull items with [`Decoder::next`] until
/// it returns `Ok(None)` (more input needed). The result does not depend on how the input was
/// split. After an error the decoder is poisoned and keeps returning that error (a stream
/// cannot be resynchronised reliably).
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of the current frame (or of unconsumed input when idle) in `buf`.
    pos: usize,
    /// How far (relative to `pos`) the current line / body has been searched already.
    scan: usize,
    /// Start (relative to `pos`) of the line being read.
    line_start: usize,
    state: State,
    max_frame_bytes: usize,
    failed: Option<FrameError>,
}

impl Decoder {
    /// A decoder rejecting frames larger than `max_frame_bytes` (all octets from the command
    /// to the terminating NUL included).
    pub fn new(max_frame_bytes: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            scan: 0,
            line_start: 0,
            state: State::Idle,
            max_frame_bytes,
            failed: None,
        }
    }

    /// The frame size limit.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Appends input.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            // Compact; all other offsets are relative to `pos`.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Number of input bytes buffered but not yet returned as items.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True when part of a frame has been received but not all of it.
    pub fn in_frame(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// The next decoded item, `Ok(None)` when more input is needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Decoded>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.step() {
            Ok(item) => Ok(item),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn too_large(&self) -> FrameError {
        FrameError::TooLarge {
            max: self.max_frame_bytes,
        }
    }

    /// Finds the next complete line of the current frame: returns its bytes range (relative
    /// to `pos`, EOL excluded) and the offset just after its EOL.
    fn next_line(&mut self) -> Result<Option<(usize, usize, usize)>, FrameError> {
        let avail = &self.buf[self.pos..];
        let limit = avail.len().min(self.max_frame_bytes);
        let from = self.scan.min(limit);
        match avail[from..limit].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let nl = from + i;
                let start = self.line_start;
                let mut end = nl;
                if end > start && avail[end - 1] == b'\r' {
                    end -= 1;
                }
                self.line_start = nl + 1;
                self.scan = nl + 1;
                Ok(Some((start, end, nl + 1)))
            }
            None => {
                self.scan = limit;
                if avail.len() >= self.max_frame_bytes {
                    Err(self.too_large())
                } else {
                    Ok(None)
                }
            }
        }
    }

    fn step(&mut self) -> Result<Option<Decoded>, FrameError> {
        loop {
            match std::mem::replace(&mut self.state, State::Idle) {
                State::Idle => {
                    let avail = &self.buf[self.pos..];
                    match avail.first() {
                        None => return Ok(None),
                        Some(b'\n') => {
                            self.pos += 1;
                            return Ok(Some(Decoded::Heartbeat));
                        }
                        Some(b'\r') => match avail.get(1) {
                            None => return Ok(None),
                            Some(b'\n') => {
                                self.pos += 2;
                                return Ok(Some(Decoded::Heartbeat));
                            }
                            Some(_) => return Err(FrameError::StrayCr),
                        },
                        Some(_) => {
                            self.scan = 0;
                            self.line_start = 0;
                            self.state = State::Command;
                        }
                    }
                }
                State::Command => {
                    let Some((s, e, _)) = self.next_line()? else {
                        self.state = State::Command;
                        return Ok(None);
                    };
                    let line = &self.buf[self.pos + s..self.pos + e];
                    let command = Command::from_bytes(line).ok_or_else(|| {
                        FrameError::UnknownCommand(String::from_utf8_lossy(line).into_owned())
                    })?;
                    self.state = State::Headers(Frame::new(command));
                }
                State::Headers(mut frame) => {
                    let Some((s, e, after)) = self.next_line()? else {
                        self.state = State::Headers(frame);
                        return Ok(None);
                    };
                    if s == e {
                        // Empty line: end of headers.
                        let len = match frame.get("content-length") {
                            None => None,
                            Some(v) => {
                                let t = v.trim_matches(|c| c == ' ' || c == '\t');
                                let n = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                                    t.parse::<usize>().ok()
                                } else {
                                    None
                                };
                                let n =
                                    n.ok_or_else(|| FrameError::BadContentLength(v.to_string()))?;
                                // Body, then NUL, must fit in the limit.
                                if n >= self.max_frame_bytes || after + n >= self.max_frame_bytes {
                                    return Err(self.too_large());
                                }
                                Some(n)
                            }
                        };
                        self.scan = after;
                        self.state = State::Body {
                            frame,
                            start: after,
                            len,
                        };
                        continue;
                    }
                    let line = &self.buf[self.pos + s..self.pos + e];
                    let text = std::str::from_utf8(line).map_err(|_| FrameError::InvalidUtf8)?;
                    let Some((name, value)) = text.split_once(':') else {
                        return Err(FrameError::MalformedHeader(text.to_string()));
                    };
                    let (name, value) = if frame.command.escapes_headers() {
                        (unescape(name, text)?, unescape(value, text)?)
                    } else {
                        (name.to_string(), value.to_string())
                    };
                    frame.headers.push((name, value));
                    self.state = State::Headers(frame);
                }
                State::Body {
                    mut frame,
                    start,
                    len,
                } => {
                    let avail = &self.buf[self.pos..];
                    let end = match len {
                        Some(n) => {
                            if avail.len() < start + n + 1 {
                                self.state = State::Body { frame, start, len };
                                return Ok(None);
                            }
                            if avail[start + n] != 0 {
                                return Err(FrameError::MissingNul);
                            }
                            start + n
                        }
                        None => {
                            let limit = avail.len().min(self.max_frame_bytes);
                            let from = self.scan.min(limit);
                            match avail[from..limit].iter().position(|&b| b == 0) {
                                Some(i) => from + i,
                                None => {
                                    self.scan = limit;
                                    if avail.len() >= self.max_frame_bytes {
                                        return Err(self.too_large());
                                    }
                                    self.state = State::Body { frame, start, len };
                                    return Ok(None);
                                }
                            }
                        }
                    };
                    frame.body = avail[start..end].to_vec();
                    self.pos += end + 1;
                    self.scan = 0;
                    self.line_start = 0;
                    if self.pos == self.buf.len() {
                        self.buf.clear();
                        self.pos = 0;
                    }
                    return Ok(Some(Decoded::Frame(frame)));
                }
            }
        }
    }
}

/// STOMP 1.2 header unescaping; `line` is only used in the error message.
fn unescape(s: &str, line: &str) -> Result<String, FrameError> {
    if !s.contains('\\') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('c') => out.push(':'),
            _ => return Err(FrameError::BadEscape(line.to_string())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    fn enc(f: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        encode(f, &mut out).unwrap();
        out
    }

    /// Decodes everything, stopping at the first error.
    fn decode_all(input: &[u8], max: usize) -> (Vec<Decoded>, Option<FrameError>) {
        let mut d = Decoder::new(max);
        d.feed(input);
        let mut items = Vec::new();
        loop {
            match d.next() {
                Ok(Some(i)) => items.push(i),
                Ok(None) => return (items, None),
                Err(e) => return (items, Some(e)),
            }
        }
    }

    fn decode_chunked(
        input: &[u8],
        cuts: &[usize],
        max: usize,
    ) -> (Vec<Decoded>, Option<FrameError>) {
        let mut d = Decoder::new(max);
        let mut items = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        points.push(input.len());
        points.sort_unstable();
        let mut prev = 0;
        for p in points {
            d.feed(&input[prev..p]);
            prev = p;
            loop {
                match d.next() {
                    Ok(Some(i)) => items.push(i),
                    Ok(None) => break,
                    Err(e) => return (items, Some(e)),
                }
            }
        }
        (items, None)
    }

    fn frames_only(items: Vec<Decoded>) -> Vec<Frame> {
        items
            .into_iter()
            .filter_map(|i| match i {
                Decoded::Frame(f) => Some(f),
                Decoded::Heartbeat => None,
            })
            .collect()
    }

    /// The frame as it should come back: caller content-length dropped, true one appended.
    fn expected(f: &Frame) -> Frame {
        let mut e = f.clone();
        e.headers.retain(|(n, _)| n != "content-length");
        if !e.body.is_empty() {
            e.headers
                .push(("content-length".into(), e.body.len().to_string()));
        }
        e
    }

    #[test]
    fn command_names_round_trip() {
        for c in Command::ALL {
            assert_eq!(Command::from_bytes(c.as_str().as_bytes()), Some(c));
            assert_eq!(c.as_str().parse::<Command>().unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
        }
        assert!("send".parse::<Command>().is_err());
        assert!(Command::from_bytes(b"").is_none());
    }

    #[test]
    fn every_command_round_trips() {
        for c in Command::ALL {
            for body in [&b""[..], b"hello", b"a\0b\0"] {
                let f = Frame::new(c)
                    .header("destination", "/queue/a")
                    .header("receipt", "r-1")
                    .header("x", "")
                    .body(body);
                let wire = enc(&f);
                let (items, err) = decode_all(&wire, MAX);
                assert_eq!(err, None, "{c}");
                assert_eq!(items, vec![Decoded::Frame(expected(&f))], "{c}");
            }
        }
    }

    #[test]
    fn exact_wire_format() {
        let f = Frame::new(Command::Send)
            .header("destination", "/queue/a")
            .header("content-length", "999")
            .body("hi");
        assert_eq!(
            enc(&f),
            b"SEND\ndestination:/queue/a\ncontent-length:2\n\nhi\0".to_vec()
        );
        let f = Frame::new(Command::Disconnect).header("content-length", "7");
        assert_eq!(enc(&f), b"DISCONNECT\n\n\0".to_vec());
        // Pipelining: appends.
        let mut out = b"X".to_vec();
        encode(&Frame::new(Command::Begin), &mut out).unwrap();
        encode(&Frame::new(Command::Commit), &mut out).unwrap();
        assert_eq!(out, b"XBEGIN\n\n\0COMMIT\n\n\0".to_vec());
    }

    #[test]
    fn escaping_both_ways() {
        let f = Frame::new(Command::Message).header("a:b\\c", "x\ny\rz:w\\");
        let wire = enc(&f);
        assert_eq!(
            wire,
            b"MESSAGE\na\\cb\\\\c:x\\ny\\rz\\cw\\\\\n\n\0".to_vec()
        );
        assert_eq!(frames_only(decode_all(&wire, MAX).0), vec![f]);
        // Decoding of all defined escapes.
        let (items, err) = decode_all(b"MESSAGE\nk\\c\\n:\\\\\\r\\c\\n\n\n\0", MAX);
        assert_eq!(err, None);
        assert_eq!(
            frames_only(items)[0].headers,
            vec![("k:\n".into(), "\\\r:\n".into())]
        );
    }

    #[test]
    fn undefined_escape_is_an_error() {
        let (_, err) = decode_all(b"MESSAGE\nk:a\\tb\n\n\0", MAX);
        assert!(matches!(err, Some(FrameError::BadEscape(_))));
        let (_, err) = decode_all(b"MESSAGE\nk:ab\\\n\n\0", MAX);
        assert!(matches!(err, Some(FrameError::BadEscape(_))));
        // Poisoned afterwards.
        let mut d = Decoder::new(MAX);
        d.feed(b"MESSAGE\nk:\\t\n\n\0SEND\n\n\0");
        assert!(d.next().is_err());
        assert!(d.next().is_err());
    }

    #[test]
    fn connected_is_not_unescaped() {
        let (items, err) = decode_all(b"CONNECTED\nversion:1.2\nserver:a\\cb:c\n\n\0", MAX);
        assert_eq!(err, None);
        let f = &frames_only(items)[0];
        assert_eq!(f.get("server"), Some("a\\cb:c"));
        assert_eq!(f.get("version"), Some("1.2"));
    }

    #[test]
    fn connect_rejects_unencodable_headers() {
        let mut out = b"keep".to_vec();
        for (n, v) in [
            ("login", "a\nb"),
            ("login", "a\rb"),
            ("log:in", "x"),
            ("log\nin", "x"),
            ("log\rin", "x"),
        ] {
            for c in [Command::Connect, Command::Stomp, Command::Connected] {
                let f = Frame::new(c).header("accept-version", "1.2").header(n, v);
                assert!(matches!(
                    encode(&f, &mut out),
                    Err(FrameError::Unencodable { .. })
                ));
                assert_eq!(out, b"keep".to_vec(), "nothing appended on error");
            }
        }
        // A colon in a value is fine and not escaped.
        let f = Frame::new(Command::Connect).header("passcode", "a:b\\c");
        let wire = enc(&f);
        assert_eq!(wire, b"CONNECT\npasscode:a:b\\c\n\n\0".to_vec());
        assert_eq!(frames_only(decode_all(&wire, MAX).0), vec![f]);
    }

    #[test]
    fn header_injection_is_impossible() {
        let evil = [
            "x\ndestination:/queue/evil",
            "a\n\nSEND\ndestination:/queue/evil\n\nboo\0",
            "a\0b",
            "\0",
            "\r\n\r\n",
            "\\c\\n\\\\",
            "x:y:z",
        ];
        for v in evil {
            let f = Frame::new(Command::Send)
                .header("destination", "/queue/good")
                .header("user", v)
                .header(v, "as-a-name");
            let wire = enc(&f);
            let (items, err) = decode_all(&wire, MAX);
            assert_eq!(err, None, "{v:?}");
            assert_eq!(items.len(), 1, "{v:?}");
            let got = &frames_only(items)[0];
            assert_eq!(got.headers.len(), 3, "{v:?}");
            assert_eq!(got.get("user"), Some(v));
            assert_eq!(got.get(v), Some("as-a-name"));
            assert_eq!(got.get("destination"), Some("/queue/good"));
        }
    }

    #[test]
    fn repeated_headers_first_wins() {
        let (items, _) = decode_all(b"MESSAGE\nfoo:1\nbar:x\nfoo:2\n\n\0", MAX);
        let f = &frames_only(items)[0];
        assert_eq!(f.get("foo"), Some("1"));
        assert_eq!(
            f.headers,
            vec![
                ("foo".into(), "1".into()),
                ("bar".into(), "x".into()),
                ("foo".into(), "2".into())
            ]
        );
        assert_eq!(f.get("nope"), None);
    }

    #[test]
    fn byte_by_byte() {
        let f1 = Frame::new(Command::Message)
            .header("destination", "/queue/a")
            .header("k", "v\n:")
            .body(&b"bo\0dy"[..]);
        let f2 = Frame::new(Command::Receipt).header("receipt-id", "7");
        let mut wire = b"\n\r\n".to_vec();
        wire.extend(enc(&f1));
        wire.extend_from_slice(b"\n\n");
        wire.extend(enc(&f2));
        wire.extend_from_slice(b"\r\n");
        let mut d = Decoder::new(MAX);
        let mut items = Vec::new();
        for b in &wire {
            d.feed(std::slice::from_ref(b));
            while let Some(i) = d.next().unwrap() {
                items.push(i);
            }
        }
        assert_eq!(
            items,
            vec![
                Decoded::Heartbeat,
                Decoded::Heartbeat,
                Decoded::Frame(expected(&f1)),
                Decoded::Heartbeat,
                Decoded::Heartbeat,
                Decoded::Frame(f2),
                Decoded::Heartbeat,
            ]
        );
        assert_eq!(d.buffered_len(), 0);
        assert!(!d.in_frame());
    }

    #[test]
    fn partial_frame_waits() {
        let mut d = Decoder::new(MAX);
        d.feed(b"MESSAGE\ncontent-length:3\n\na\0");
        assert_eq!(d.next(), Ok(None));
        assert!(d.in_frame());
        d.feed(b"b");
        assert_eq!(d.next(), Ok(None));
        d.feed(b"\0");
        let Some(Decoded::Frame(f)) = d.next().unwrap() else {
            panic!()
        };
        assert_eq!(f.body, b"a\0b".to_vec());
        // Lone CR between frames waits for its LF.
        d.feed(b"\r");
        assert_eq!(d.next(), Ok(None));
        d.feed(b"\n");
        assert_eq!(d.next(), Ok(Some(Decoded::Heartbeat)));
        d.feed(b"\rX");
        assert_eq!(d.next(), Err(FrameError::StrayCr));
    }

    #[test]
    fn content_length_and_nul_bodies() {
        let (items, err) = decode_all(
            b"MESSAGE\ncontent-length:5\n\n\0\0x\0\0\0MESSAGE\n\nplain\0",
            MAX,
        );
        assert_eq!(err, None);
        let fs = frames_only(items);
        assert_eq!(fs[0].body, b"\0\0x\0\0".to_vec());
        assert_eq!(fs[1].body, b"plain".to_vec());
        // Wrong content-length: no NUL where expected.
        let (_, err) = decode_all(b"MESSAGE\ncontent-length:2\n\nabc\0", MAX);
        assert_eq!(err, Some(FrameError::MissingNul));
        for bad in ["x", "-1", "", "1 2", "99999999999999999999999999"] {
            let wire = format!("MESSAGE\ncontent-length:{bad}\n\n\0");
            let (_, err) = decode_all(wire.as_bytes(), MAX);
            assert!(
                matches!(err, Some(FrameError::BadContentLength(_))),
                "{bad:?}: {err:?}"
            );
        }
        // First content-length wins.
        let (items, err) = decode_all(b"MESSAGE\ncontent-length:1\ncontent-length:9\n\nx\0", MAX);
        assert_eq!(err, None);
        assert_eq!(frames_only(items)[0].body, b"x".to_vec());
    }

    #[test]
    fn crlf_line_endings() {
        let (items, err) = decode_all(
            b"\r\nRECEIPT\r\nreceipt-id:42\r\nk:a\\rb\r\n\r\n\0\r\nERROR\r\nmessage:m\r\ncontent-length:2\r\n\r\nxy\0",
            MAX,
        );
        assert_eq!(err, None);
        assert_eq!(items[0], Decoded::Heartbeat);
        let fs = frames_only(items);
        assert_eq!(fs[0].command, Command::Receipt);
        assert_eq!(fs[0].get("receipt-id"), Some("42"));
        assert_eq!(fs[0].get("k"), Some("a\rb"));
        assert_eq!(fs[1].command, Command::Error);
        assert_eq!(fs[1].body, b"xy".to_vec());
    }

    #[test]
    fn size_limit() {
        let f = Frame::new(Command::Message).body(vec![b'x'; 100]);
        let wire = enc(&f);
        let (items, err) = decode_all(&wire, wire.len());
        assert_eq!(err, None);
        assert_eq!(items.len(), 1);
        let (_, err) = decode_all(&wire, wire.len() - 1);
        assert!(matches!(err, Some(FrameError::TooLarge { .. })));
        // Announced content-length over the limit fails before the body arrives.
        let mut d = Decoder::new(1000);
        d.feed(b"MESSAGE\ncontent-length:5000\n\n");
        assert!(matches!(d.next(), Err(FrameError::TooLarge { .. })));
        // Endless header line / NUL-less body.
        let mut d = Decoder::new(1000);
        d.feed(b"MESSAGE\nk:");
        for _ in 0..100 {
            d.feed(&[b'v'; 100]);
        }
        assert!(matches!(d.next(), Err(FrameError::TooLarge { .. })));
        let mut d = Decoder::new(1000);
        d.feed(b"MESSAGE\n\n");
        let mut res = Ok(None);
        for _ in 0..100 {
            d.feed(&[b'v'; 100]);
            res = d.next();
            if res.is_err() {
                break;
            }
        }
        assert!(matches!(res, Err(FrameError::TooLarge { .. })));
        // Without a content-length, a NUL-terminated body over the limit.
        let wire = b"MESSAGE\n\n0123456789\0";
        assert!(decode_all(wire, wire.len()).1.is_none());
        assert!(decode_all(wire, wire.len() - 1).1.is_some());
    }

    #[test]
    fn malformed_input_errors() {
        type Check = fn(&FrameError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"FOO\n\n\0", |e| matches!(e, FrameError::UnknownCommand(_))),
            (b"send\n\n\0", |e| {
                matches!(e, FrameError::UnknownCommand(_))
            }),
            (b"\xff\n\n\0", |e| {
                matches!(e, FrameError::UnknownCommand(_))
            }),
            (b"SEND\nnocolon\n\n\0", |e| {
                matches!(e, FrameError::MalformedHeader(_))
            }),
            (b"SEND\nk:\xff\xfe\n\n\0", |e| *e == FrameError::InvalidUtf8),
            (b"\rSEND", |e| *e == FrameError::StrayCr),
        ];
        for (input, ok) in cases {
            let (items, err) = decode_all(input, MAX);
            assert!(items.is_empty());
            let err = err.unwrap_or_else(|| panic!("{input:?} accepted"));
            assert!(ok(&err), "{input:?}: {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn many_frames_in_one_buffer_is_linear() {
        let mut wire = Vec::new();
        for i in 0..20_000 {
            encode(
                &Frame::new(Command::Receipt).header("receipt-id", i.to_string()),
                &mut wire,
            )
            .unwrap();
        }
        let (items, err) = decode_all(&wire, MAX);
        assert_eq!(err, None);
        assert_eq!(items.len(), 20_000);
        // One big body fed in small chunks.
        let big = Frame::new(Command::Message).body(vec![7u8; 2_000_000]);
        let wire = enc(&big);
        let mut d = Decoder::new(4_000_000);
        let mut got = None;
        for c in wire.chunks(1000) {
            d.feed(c);
            if let Some(i) = d.next().unwrap() {
                got = Some(i);
            }
        }
        assert_eq!(got, Some(Decoded::Frame(expected(&big))));
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        (0..Command::ALL.len()).prop_map(|i| Command::ALL[i])
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z:\\\\\r\n\0 -]{0,12}",
            "[\\\\:\r\nc]{0,6}",
        ]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            arb_command(),
            prop::collection::vec((arb_text(), arb_text()), 0..6),
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(command, headers, body)| {
                let mut f = Frame::new(command).body(body);
                for (n, v) in headers {
                    let (n, v) = if command.escapes_headers() {
                        (n, v)
                    } else {
                        (
                            n.replace([':', '\n', '\r'], "_"),
                            v.replace(['\n', '\r'], "_"),
                        )
                    };
                    f = f.header(n, v);
                }
                f
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_frames_round_trip(frames in prop::collection::vec(arb_frame(), 1..5),
                                  cuts in prop::collection::vec(any::<usize>(), 0..8)) {
            let mut wire = Vec::new();
            for f in &frames {
                encode(f, &mut wire).unwrap();
                wire.extend_from_slice(b"\r\n");
            }
            let cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            let (items, err) = decode_chunked(&wire, &cuts, MAX);
            prop_assert_eq!(err, None);
            let want: Vec<Frame> = frames.iter().map(expected).collect();
            prop_assert_eq!(frames_only(items), want);
        }

        #[test]
        fn prop_connect_unencodable_is_rejected(name in arb_text(), value in arb_text()) {
            let f = Frame::new(Command::Connect).header(name.clone(), value.clone());
            let mut out = Vec::new();
            let bad = name.contains([':', '\n', '\r']) || value.contains(['\n', '\r']);
            match encode(&f, &mut out) {
                Ok(()) => {
                    prop_assert!(!bad);
                    let (items, err) = decode_all(&out, MAX);
                    prop_assert_eq!(err, None);
                    prop_assert_eq!(frames_only(items), vec![f]);
                }
                Err(_) => {
                    prop_assert!(bad);
                    prop_assert!(out.is_empty());
                }
            }
        }

        #[test]
        fn prop_arbitrary_input_split_anywhere(
            input in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                prop::collection::vec(
                    prop::sample::select(b"SENDMESAGRCIPTOR\n\r\0:\\cntlgh0123456789-".to_vec()), 0..300),
                prop::collection::vec(
                    prop::sample::select(vec![
                        &b"MESSAGE\n"[..], b"RECEIPT\r\n", b"SEND\n", b"\n", b"\r\n", b"\0",
                        b"content-length:", b"3", b"0", b"k:v\n", b"k\\c:\\n\n", b"\\t", b"\xff",
                        b"abc", b":", b"\r",
                    ]), 0..40).prop_map(|v| v.concat()),
            ],
            cuts in prop::collection::vec(any::<usize>(), 0..10),
            max in prop_oneof![Just(MAX), 1usize..64],
        ) {
            let cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
            let whole = decode_all(&input, max);
            let split = decode_chunked(&input, &cuts, max);
            prop_assert_eq!(whole, split);
        }
    }
}
