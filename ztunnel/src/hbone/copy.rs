//! Bidirectional copy between a tunnel and a socket with correct half-close: EOF on one side
//! shuts down writing on the other while the opposite direction keeps flowing.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer size of each direction; small so idle connections cost little memory.
const INITIAL_BUF: usize = 16 * 1024;
/// Largest buffer a busy direction grows to.
const MAX_BUF: usize = 256 * 1024;

/// Bytes moved by [`copy_bidirectional`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyStats {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// One direction of the copy: a buffer that doubles whenever a read fills it.
struct Direction {
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    total: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: vec![0; INITIAL_BUF],
            pos: 0,
            filled: 0,
            read_done: false,
            need_flush: false,
            done: false,
            total: 0,
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
            if self.pos == self.filled && !self.read_done {
                let mut rb = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.filled = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written so far.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.filled {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.total += n as u64;
                self.need_flush = true;
            }
            if self.filled == self.buf.len() && self.buf.len() < MAX_BUF {
                let grown = (self.buf.len() * 2).min(MAX_BUF);
                self.buf.resize(grown, 0);
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
            Poll::Ready(Ok(CopyStats {
                a_to_b: ab.total,
                b_to_a: ba.total,
            }))
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
        let copier =
            tokio::spawn(async move { copy_bidirectional(&mut a_inner, &mut b_inner).await });

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
        assert_eq!(
            stats,
            CopyStats {
                a_to_b: 1 << 20,
                b_to_a: 15
            }
        );
    }
}
