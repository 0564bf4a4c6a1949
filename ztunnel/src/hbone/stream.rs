//! One HBONE tunnel (an HTTP/2 CONNECT stream) as an ordinary byte stream, so proxying code
//! can treat it like a TCP socket.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

impl AsyncRead for HboneStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(out.remaining());
                out.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // At most one frame is buffered here, so credit can be returned at once.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                // The peer ended the stream with a graceful reset after its data: EOF.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        self.send.reserve_capacity(want);
        loop {
            let available = self.send.capacity();
            if available > 0 {
                let n = available.min(want);
                self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
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
