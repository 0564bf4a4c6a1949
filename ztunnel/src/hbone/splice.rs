//! Copying between a tunnel and a byte stream without the intermediate copies of a
//! generic `AsyncRead`/`AsyncWrite` copy: bytes read from the stream are handed to h2 as
//! they are (`Bytes`, no copy), and DATA frames from h2 are written straight to the stream.
//! Half-close is kept: EOF on the stream ends the tunnel's send side (END_STREAM), the end
//! of the tunnel's data shuts down the stream's write side.
use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use h2::Reason;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::copy::CopyStats;
use super::stream::{h2_to_io, HboneStream};

const INITIAL_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

impl HboneStream {
    /// Splices this tunnel with `io` until both directions end. In the stats, `a_to_b` is
    /// tunnel → `io` and `b_to_a` is `io` → tunnel.
    pub async fn splice<T: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut T) -> io::Result<CopyStats> {
        let (send, recv, pending) = self.parts();
        let (mut rd, mut wr) = tokio::io::split(io);
        let up = async {
            let mut total = 0u64;
            let mut size = INITIAL_READ;
            let mut buf = BytesMut::with_capacity(size);
            loop {
                buf.reserve(size);
                let n = rd.read_buf(&mut buf).await?;
                if n == 0 {
                    send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                    return Ok::<u64, io::Error>(total);
                }
                total += n as u64;
                if n == size && size < MAX_READ {
                    size *= 2;
                }
                let mut chunk = buf.split().freeze();
                while !chunk.is_empty() {
                    send.reserve_capacity(chunk.len());
                    let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(c)) if c > 0 => c,
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(h2_to_io(e)),
                        None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed")),
                    };
                    let part = chunk.split_to(cap.min(chunk.len()));
                    send.send_data(part, false).map_err(h2_to_io)?;
                }
            }
        };
        let down = async {
            let mut total = 0u64;
            if !pending.is_empty() {
                wr.write_all(pending).await?;
                total += pending.len() as u64;
                *pending = Bytes::new();
            }
            loop {
                match poll_fn(|cx| recv.poll_data(cx)).await {
                    Some(Ok(data)) => {
                        wr.write_all(&data).await?;
                        total += data.len() as u64;
                        let _ = recv.flow_control().release_capacity(data.len());
                    }
                    None => break,
                    Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => break,
                    Some(Err(e)) => return Err(h2_to_io(e)),
                }
            }
            wr.shutdown().await?;
            Ok::<u64, io::Error>(total)
        };
        let (down, up) = tokio::try_join!(down, up)?;
        Ok(CopyStats { a_to_b: down, b_to_a: up })
    }
}
