//! Bidirectional copy between a tunnel and a socket with correct half-close: EOF on one side
//! shuts down writing on the other while the opposite direction keeps flowing.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

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

/// One direction of the copy. An idle direction holds no heap buffer: it waits for data
/// with a small stack buffer and allocates only when bytes arrive, then gives the buffer
/// back when its reader goes quiet again (unless it has grown for bulk traffic). So an idle
/// proxied connection costs a few hundred bytes instead of two copy buffers.
struct Direction {
    /// Bytes read and not yet fully written are `buf[pos..]`; capacity 0 when idle.
    buf: Vec<u8>,
    pos: usize,
    /// Capacity to allocate next; doubles whenever a read fills the buffer.
    size: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    total: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: Vec::new(),
            pos: 0,
            size: INITIAL_BUF,
            read_done: false,
            need_flush: false,
            done: false,
            total: 0,
        }
    }

    /// Reads into the buffer (or, with none, into a stack probe first). `Ready(Ok(()))` once
    /// bytes or EOF arrived.
    fn poll_fill<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
    ) -> Poll<io::Result<()>> {
        self.pos = 0;
        self.buf.clear();
        if self.buf.capacity() == 0 {
            let mut probe = [0u8; PROBE];
            let mut rb = ReadBuf::new(&mut probe);
            ready!(reader.as_mut().poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                self.read_done = true;
            } else {
                self.buf.reserve_exact(self.size);
                self.buf.extend_from_slice(rb.filled());
            }
            return Poll::Ready(Ok(()));
        }
        let mut rb = ReadBuf::uninit(self.buf.spare_capacity_mut());
        match reader.as_mut().poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    self.read_done = true;
                } else {
                    // SAFETY: ReadBuf guarantees its first `n` bytes were initialised by the read.
                    unsafe { self.buf.set_len(n) };
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.size <= INITIAL_BUF {
                    self.buf = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            // Nothing more to read now: push out what was written so far.
            if self.pos == self.buf.len() && !self.read_done && self.poll_fill(cx, reader.as_mut())?.is_pending() {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                return Poll::Pending;
            }
            while self.pos < self.buf.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.total += n as u64;
                self.need_flush = true;
            }
            if !self.read_done && self.buf.len() == self.buf.capacity() && self.size < MAX_BUF {
                self.size = (self.size * 2).min(MAX_BUF);
                self.buf = Vec::with_capacity(self.size);
                self.pos = 0;
            }
            if self.read_done {
                // EOF: forward it as a write shutdown (which also flushes).
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.total));
            }
        }
    }
}

/// Copies `a`→`b` and `b`→`a` until both directions reach EOF, shutting down each writer when
/// its reader ends; returns the bytes moved each way. The first I/O error ends both.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<CopyStats>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Direction::new();
    let mut ba = Direction::new();
    poll_fn(|cx| {
        if !ab.done {
            if let Poll::Ready(r) = ab.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                r?;
                ab.done = true;
            }
        }
        if !ba.done {
            if let Poll::Ready(r) = ba.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
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
