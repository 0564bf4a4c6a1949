//! Refuses HTTP/1.1 requests whose message framing is ambiguous, before the HTTP server
//! parses them: both `Content-Length` and `Transfer-Encoding`, or more than one
//! `Content-Length`. hyper tolerates both as RFC 9112 allows (chunked wins and the
//! connection closes; equal lengths merge), but a proxy that reads a request one way while
//! the next hop reads it another is the root of request smuggling, so the waypoint answers
//! 400 and closes instead.
//!
//! [`FramingGuard`] follows the byte stream: it holds each request head back until it is
//! complete, checks it, and skips the body by its framing (length or chunks) to find the
//! next head. A bad head is replaced by a request line the server rejects with 400 (and
//! closes); the rest of that connection is never read. Upgrades are not performed (the
//! `Upgrade` header is hop-by-hop and dropped, CONNECT is refused), so framing goes on
//! after them. HTTP/2 (its preface) and what the guard cannot follow (a head larger than
//! the server accepts, a bad chunk size) pass unchecked: the server refuses those itself.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the server is given in place of a rejected head: it is not a request line, so the
/// server answers 400 and closes.
const POISON: &[u8] = b"INVALID-FRAMING\r\n\r\n";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";
/// How much one read asks for.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug)]
enum State {
    /// Collecting a request head.
    Head,
    /// Skipping `n` more body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping `n` chunk bytes and then the CRLF after them.
    ChunkData(u64),
    /// Reading trailer lines up to the empty one.
    Trailers,
    /// No longer following (HTTP/2, upgrade, rejected): bytes pass as they are.
    Passthrough,
    /// A head was rejected: nothing more is read.
    Rejected,
}

/// An IO that checks HTTP/1.1 request framing on its way in (see the module doc).
pub struct FramingGuard<IO> {
    inner: IO,
    state: State,
    /// Bytes not yet processed (a partial head or line).
    pending: Vec<u8>,
    /// Bytes checked and ready for the server.
    ready: Vec<u8>,
    ready_at: usize,
    max_head: usize,
    /// How much of `pending` the head search has covered.
    scanned: usize,
}

impl<IO> FramingGuard<IO> {
    /// Guards `inner`; heads longer than `max_head` are left to the server to refuse.
    pub fn new(inner: IO, max_head: usize) -> Self {
        FramingGuard {
            inner,
            state: State::Head,
            pending: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            max_head,
            scanned: 0,
        }
    }

    /// Moves what can be decided in `pending` to `ready`.
    fn process(&mut self) {
        loop {
            match self.state {
                State::Passthrough => {
                    self.ready.append(&mut self.pending);
                    return;
                }
                State::Rejected => {
                    self.pending.clear();
                    return;
                }
                State::Head => {
                    let n = self.pending.len().min(H2_PREFACE.len());
                    if self.pending[..n] == H2_PREFACE[..n] {
                        if n < H2_PREFACE.len() {
                            return;
                        }
                        self.state = State::Passthrough;
                        continue;
                    }
                    // Resume where the last search stopped (a slow sender must not make each
                    // byte rescan the whole head).
                    let from = self.scanned.saturating_sub(2);
                    let Some(end) = head_end(&self.pending[from..]).map(|e| e + from) else {
                        self.scanned = self.pending.len();
                        if self.pending.len() > self.max_head {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    self.scanned = 0;
                    let head: Vec<u8> = self.pending.drain(..end).collect();
                    match check_head(&head) {
                        Ok(next) => {
                            self.ready.extend_from_slice(&head);
                            self.state = next;
                        }
                        Err(()) => {
                            self.ready.extend_from_slice(POISON);
                            self.state = State::Rejected;
                        }
                    }
                }
                State::Body(0) => self.state = State::Head,
                State::Body(n) => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let take = (n as usize).min(self.pending.len());
                    self.ready.extend(self.pending.drain(..take));
                    self.state = State::Body(n - take as u64);
                }
                State::ChunkSize => {
                    let Some(end) = find(&self.pending, b"\r\n").map(|i| i + 2) else {
                        if self.pending.len() > 4096 {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    let line: Vec<u8> = self.pending.drain(..end).collect();
                    self.ready.extend_from_slice(&line);
                    let text = String::from_utf8_lossy(&line[..line.len() - 2]);
                    let size = text.split(';').next().unwrap_or("").trim();
                    match u64::from_str_radix(size, 16) {
                        Ok(0) => self.state = State::Trailers,
                        Ok(n) => self.state = State::ChunkData(n.saturating_add(2)),
                        // The server rejects a bad chunk itself.
                        Err(_) => self.state = State::Passthrough,
                    }
                }
                State::ChunkData(0) => self.state = State::ChunkSize,
                State::ChunkData(n) => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let take = (n as usize).min(self.pending.len());
                    self.ready.extend(self.pending.drain(..take));
                    self.state = State::ChunkData(n - take as u64);
                }
                State::Trailers => {
                    let Some(end) = find(&self.pending, b"\r\n").map(|i| i + 2) else {
                        if self.pending.len() > self.max_head {
                            self.state = State::Passthrough;
                            continue;
                        }
                        return;
                    };
                    let line: Vec<u8> = self.pending.drain(..end).collect();
                    self.ready.extend_from_slice(&line);
                    if line.len() == 2 {
                        self.state = State::Head;
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The end of a request head: the first empty line, ended by CRLF or a bare LF (which
/// HTTP parsers also accept, so the guard must see such a head as one too).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(nl) = buf[i..].iter().position(|b| *b == b'\n') {
        let next = i + nl + 1;
        match buf.get(next..) {
            Some([b'\n', ..]) => return Some(next + 1),
            Some([b'\r', b'\n', ..]) => return Some(next + 2),
            _ => i = next,
        }
    }
    None
}

/// The state after a well-framed head, or `Err` for an ambiguous one. A head that does not
/// parse is passed on for the server to refuse.
fn check_head(head: &[u8]) -> Result<State, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Ok(State::Passthrough),
    }
    let lengths: Vec<&[u8]> =
        req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("content-length")).map(|h| h.value).collect();
    let te: Vec<&[u8]> =
        req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding")).map(|h| h.value).collect();
    if lengths.len() > 1 || (!lengths.is_empty() && !te.is_empty()) {
        return Err(());
    }
    if !te.is_empty() {
        let chunked =
            te.last().is_some_and(|v| String::from_utf8_lossy(v).trim().to_ascii_lowercase().ends_with("chunked"));
        return Ok(if chunked { State::ChunkSize } else { State::Passthrough });
    }
    match lengths.first() {
        Some(v) => match String::from_utf8_lossy(v).trim().parse::<u64>() {
            Ok(n) => Ok(State::Body(n)),
            Err(_) => Ok(State::Passthrough),
        },
        None => Ok(State::Body(0)),
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_at < this.ready.len() {
                let n = (this.ready.len() - this.ready_at).min(buf.remaining());
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if matches!(this.state, State::Rejected) {
                return Poll::Ready(Ok(()));
            }
            // Read straight into `pending`'s spare capacity (no zeroed scratch buffer per read).
            this.pending.reserve(READ_CHUNK);
            let spare = this.pending.spare_capacity_mut();
            let mut rb = ReadBuf::uninit(&mut spare[..READ_CHUNK]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // EOF: whatever was held back goes to the server as it is.
                    this.ready.append(&mut this.pending);
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    // SAFETY: the first `n` bytes of the spare capacity were initialized by the read.
                    unsafe { this.pending.set_len(this.pending.len() + n) };
                    this.process();
                }
                other => return other,
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn through(input: &[u8]) -> Vec<u8> {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut a, input).await.unwrap();
        drop(a);
        let mut g = FramingGuard::new(b, 16 * 1024);
        let mut out = Vec::new();
        g.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn well_framed_pipelined_requests_pass_unchanged() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(through(input).await, input.to_vec());
    }

    #[tokio::test]
    async fn content_length_with_transfer_encoding_is_poisoned() {
        let out = through(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
        assert_eq!(out, POISON);
    }

    #[tokio::test]
    async fn duplicate_content_length_in_a_later_request_is_poisoned() {
        let out =
            through(b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\nContent-Length: 1\r\n\r\nx").await;
        assert_eq!(out, [b"GET / HTTP/1.1\r\n\r\n".as_slice(), POISON].concat());
    }

    #[tokio::test]
    async fn a_head_hidden_in_a_body_is_not_read_as_a_request() {
        let body = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        let input = [format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(), body].concat();
        assert_eq!(through(&input).await, input);
    }

    #[tokio::test]
    async fn an_upgrade_does_not_switch_the_guard_off() {
        let input = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let out = through(input).await;
        assert!(out.ends_with(POISON), "{}", String::from_utf8_lossy(&out));
    }

    #[tokio::test]
    async fn a_bare_lf_head_is_checked_too() {
        let out = through(b"POST / HTTP/1.1\nContent-Length: 1\nContent-Length: 1\n\nx").await;
        assert_eq!(out, POISON);
    }

    #[tokio::test]
    async fn http2_passes_through() {
        let input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        assert_eq!(through(input).await, input.to_vec());
    }
}
