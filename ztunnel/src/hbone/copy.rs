//! Bidirectional copy between a tunnel and a socket with correct half-close: EOF on one side
//! shuts down writing on the other while the opposite direction keeps flowing. Data moves as
//! owned `Bytes` chunks, so an HBONE tunnel's received DATA frames go to the socket and a
//! socket's reads go into DATA frames without another copy (see [`CopyIo`]).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffer size of a direction once data flows; small so busy small connections cost little.
const INITIAL_BUF: usize = 16 * 1024;
/// Largest buffer a busy direction grows to.
const MAX_BUF: usize = 256 * 1024;
/// Stack space used to wait for data while a direction holds no heap buffer.
const PROBE: usize = 2 * 1024;

/// Bytes moved by [`copy_bidirectional`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyStats {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// A byte stream as the copy loop sees it. A stream that already holds its data as owned
/// `Bytes` (an HBONE tunnel: h2 hands out received DATA frames and sends `Bytes` as frames)
/// overrides the chunk methods, so the loop passes those buffers on instead of copying them
/// through one of its own; plain sockets keep the defaults (read into the loop's buffer,
/// write from a slice). Wrappers (metering, policy guards) forward both.
pub trait CopyIo: AsyncRead + AsyncWrite + Unpin {
    /// Whether [`CopyIo::poll_read_chunk`] hands out the stream's own buffers.
    fn reads_chunks(&self) -> bool {
        false
    }

    /// The next received chunk, empty at EOF. Called only when `reads_chunks` is true.
    fn poll_read_chunk(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        Poll::Ready(Err(io::Error::other("this stream does not hand out chunks")))
    }

    /// Writes a prefix of `chunk` and returns its length; the default copies it through
    /// `poll_write`, a tunnel sends a slice of the same buffer.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &Bytes) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, chunk)
    }
}

impl CopyIo for tokio::net::TcpStream {}
impl CopyIo for tokio::io::DuplexStream {}

/// Any byte stream, copied the plain way (for callers whose stream types are generic).
pub struct Plain<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Plain<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Plain<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> CopyIo for Plain<T> {}

/// One direction of the copy. An idle direction holds no heap buffer: it waits for data
/// with a small stack buffer and allocates only when bytes arrive, then gives the buffer
/// back when its reader goes quiet again (unless it has grown for bulk traffic). So an idle
/// proxied connection costs a few hundred bytes instead of two copy buffers.
struct Direction {
    /// Where a plain reader's bytes land; a chunk is split off it for each write. Capacity 0
    /// when idle.
    buf: BytesMut,
    /// The chunk being written (its unwritten rest).
    out: Bytes,
    /// Capacity to read into next; doubles whenever a read fills it.
    size: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    total: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: BytesMut::new(),
            out: Bytes::new(),
            size: INITIAL_BUF,
            read_done: false,
            need_flush: false,
            done: false,
            total: 0,
        }
    }

    /// Fills `out` with the reader's next chunk, or marks EOF. `Ready(Ok(()))` once bytes or
    /// EOF arrived.
    fn poll_fill<R: CopyIo + ?Sized>(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<()>> {
        if reader.reads_chunks() {
            let chunk = ready!(reader.poll_read_chunk(cx))?;
            self.read_done = chunk.is_empty();
            self.out = chunk;
            return Poll::Ready(Ok(()));
        }
        if self.buf.capacity() == 0 {
            let mut probe = [0u8; PROBE];
            let mut rb = ReadBuf::new(&mut probe);
            ready!(Pin::new(&mut *reader).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                self.read_done = true;
            } else {
                self.buf.reserve(self.size);
                self.buf.extend_from_slice(rb.filled());
                self.out = self.buf.split().freeze();
            }
            return Poll::Ready(Ok(()));
        }
        // Reclaims the whole allocation when the last chunk has been dropped (a socket
        // writer), or starts a new one while a tunnel still holds it.
        self.buf.reserve(self.size);
        let spare = self.buf.spare_capacity_mut();
        let room = spare.len();
        let mut rb = ReadBuf::uninit(spare);
        match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    self.read_done = true;
                } else {
                    // SAFETY: ReadBuf guarantees its first `n` bytes were initialised by the read.
                    unsafe { self.buf.set_len(n) };
                    self.out = self.buf.split().freeze();
                    if n == room && self.size < MAX_BUF {
                        self.size = (self.size * 2).min(MAX_BUF);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.size <= INITIAL_BUF {
                    self.buf = BytesMut::new();
                }
                Poll::Pending
            }
        }
    }

    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<u64>>
    where
        R: CopyIo + ?Sized,
        W: CopyIo + ?Sized,
    {
        loop {
            // Nothing more to read now: push out what was written so far.
            if self.out.is_empty() && !self.read_done && self.poll_fill(cx, reader)?.is_pending() {
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.need_flush = false;
                }
                return Poll::Pending;
            }
            while !self.out.is_empty() {
                let n = ready!(writer.poll_write_chunk(cx, &self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.out.advance(n);
                self.total += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                // EOF: forward it as a write shutdown (which also flushes).
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.total));
            }
        }
    }
}

/// Copies `a`→`b` and `b`→`a` until both directions reach EOF, shutting down each writer when
/// its reader ends; returns the bytes moved each way. The first I/O error ends both. Chunks
/// pass between [`CopyIo`] streams without copies where either side supports it.
pub async fn copy_chunks<A, B>(a: &mut A, b: &mut B) -> io::Result<CopyStats>
where
    A: CopyIo + ?Sized,
    B: CopyIo + ?Sized,
{
    let mut ab = Direction::new();
    let mut ba = Direction::new();
    poll_fn(|cx| {
        if !ab.done {
            if let Poll::Ready(r) = ab.poll_copy(cx, a, b) {
                r?;
                ab.done = true;
            }
        }
        if !ba.done {
            if let Poll::Ready(r) = ba.poll_copy(cx, b, a) {
                r?;
                ba.done = true;
            }
        }
        if ab.done && ba.done {
            Poll::Ready(Ok(CopyStats { a_to_b: ab.total, b_to_a: ba.total }))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// [`copy_chunks`] for any two byte streams, copied the plain way.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<CopyStats>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_chunks(&mut Plain(a), &mut Plain(b)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_grows_buffer() {
        let (mut a_outer, mut a_inner) = tokio::io::duplex(64 * 1024);
        let (mut b_inner, mut b_outer) = tokio::io::duplex(64 * 1024);
        let copier = tokio::spawn(async move { copy_bidirectional(&mut a_inner, &mut b_inner).await });

        let big = vec![7u8; 1 << 20];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                a_outer.write_all(&big).await.unwrap();
                a_outer.shutdown().await.unwrap(); // half-close a→b
                let mut back = Vec::new();
                a_outer.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        // b sees all data then EOF, and can still answer afterwards.
        let mut got = Vec::new();
        b_outer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        b_outer.write_all(b"reply after eof").await.unwrap();
        b_outer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after eof");
        let stats = copier.await.unwrap().unwrap();
        assert_eq!(stats, CopyStats { a_to_b: 1 << 20, b_to_a: 15 });
    }
}
