//! One HBONE tunnel (an HTTP/2 CONNECT stream) as an ordinary byte stream, so proxying code
//! can treat it like a TCP socket.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::CopyIo;

/// Largest chunk handed to h2 per write; matches the max frame size so one write is one frame.
const MAX_WRITE: usize = 1 << 20;

/// An established CONNECT tunnel: `AsyncRead + AsyncWrite` over an h2 stream, returning
/// receive-window credit as data is consumed and ending the stream on `shutdown`.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    write_closed: bool,
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl HboneStream {
    /// Wraps the two halves of an h2 stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        HboneStream { send, recv, pending: Bytes::new(), write_closed: false, on_drop: None }
    }

    /// Runs `f` when the stream is dropped (the pool uses it to free the stream slot).
    pub(crate) fn with_on_drop(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_drop = Some(Box::new(f));
        self
    }

    /// The h2 stream id, for logs.
    pub fn stream_id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }
}

impl Drop for HboneStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream").field("stream_id", &self.stream_id()).finish_non_exhaustive()
    }
}

/// Maps an h2 error to I/O: a peer reset becomes `ConnectionReset`, transport errors keep
/// their kind.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => io::ErrorKind::BrokenPipe,
        Some(_) if e.is_reset() => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl HboneStream {
    /// The next received DATA frame (empty at EOF), returning its flow-control credit at once:
    /// at most one frame is held here.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.pending)));
        }
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                None => Poll::Ready(Ok(Bytes::new())),
                // An empty frame is not EOF: wait for the next one.
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    Poll::Ready(Ok(data))
                }
                // The peer ended the stream with a graceful reset after its data: EOF.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(Ok(Bytes::new())),
                Some(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
            };
        }
    }

    /// Sends a prefix of `data` as DATA once the peer's window allows, built by `frame` from
    /// the length allowed (a slice of a chunk, or a copy of a borrowed buffer).
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        frame: impl FnOnce(usize) -> Bytes,
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        let want = len.min(MAX_WRITE);
        self.send.reserve_capacity(want);
        loop {
            let available = self.send.capacity();
            if available > 0 {
                let n = available.min(want);
                self.send.send_data(frame(n), false).map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                // The stream can no longer send: report why if the peer reset it.
                None => {
                    return Poll::Ready(Err(match ready!(self.send.poll_reset(cx)) {
                        Ok(reason) => io::Error::new(io::ErrorKind::BrokenPipe, format!("stream reset: {reason}")),
                        Err(e) => h2_to_io(e),
                    }))
                }
            }
        }
    }
}

/// The copy loop takes received frames as they are and sends its chunks as frames, so the
/// tunnel adds no copy of its own between the socket and TLS.
impl CopyIo for HboneStream {
    fn reads_chunks(&self) -> bool {
        true
    }

    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        self.poll_frame(cx)
    }

    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &Bytes) -> Poll<io::Result<usize>> {
        self.poll_send(cx, chunk.len(), |n| chunk.slice(..n))
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut data = ready!(self.poll_frame(cx))?;
        let n = data.len().min(out.remaining());
        out.put_slice(&data.split_to(n));
        self.pending = data;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_send(cx, buf.len(), |n| Bytes::copy_from_slice(&buf[..n]))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 buffers written data and the connection task sends it.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
