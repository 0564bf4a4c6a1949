//! The load generator's target: one TCP server that speaks every mode the generators
//! (and a real fortio) need, selected by the first byte of each connection.

use std::io;
use std::net::SocketAddr;
use std::thread::JoinHandle;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{DEFAULT_PAYLOAD, MAX_PAYLOAD};

/// Accepts connections forever, serving each according to its first byte (see the
/// module docs of [`crate::loadgen`] for the modes). Sockets made by `accept` belong to
/// the listener's network namespace, so this may run on any thread.
pub async fn echo_server(listener: TcpListener) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = serve(stream).await;
        });
    }
}

/// An echo server running on its own thread; stops when dropped. Exists so tests and
/// benches can start a target in one line from a thread already inside a pod's netns.
pub struct EchoServer {
    /// Where the server listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Serves `listener` (already bound, e.g. inside a pod netns) on a new thread with a
    /// current-thread runtime.
    pub fn spawn(listener: std::net::TcpListener) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name(format!("echo-{addr}")).spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                tokio::select! {
                    _ = echo_server(listener) => {}
                    _ = rx => {}
                }
            });
        })?;
        Ok(EchoServer { addr, stop: Some(tx), thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Ok(());
    }
    match first[0] {
        b'R' | b'C' => {
            stream.read_exact(&mut first).await?;
            let size = read_size(&mut stream).await?;
            req_resp(stream, size, first[0] == b'C').await
        }
        b'S' => {
            stream.read_exact(&mut first).await?;
            sink(stream).await
        }
        b'E' => {
            stream.read_exact(&mut first).await?;
            let (mut r, mut w) = stream.split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await
        }
        _ => http(stream).await,
    }
}

async fn read_size(stream: &mut TcpStream) -> io::Result<usize> {
    let size = stream.read_u32().await? as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "payload too large"));
    }
    Ok(if size == 0 { DEFAULT_PAYLOAD } else { size })
}

/// Fixed-size request/response; keep-alive until the client's EOF, or one exchange and
/// a server-side close (`once`, so the server, not the client, holds TIME_WAIT).
async fn req_resp(mut stream: TcpStream, size: usize, once: bool) -> io::Result<()> {
    let mut req = vec![0u8; size];
    let resp = vec![b'x'; size];
    loop {
        match stream.read_exact(&mut req).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        stream.write_all(&resp).await?;
        if once {
            return stream.shutdown().await;
        }
    }
}

/// Reads and discards until EOF, then answers with the byte count (u64, big-endian) so
/// the client measures delivered bytes, not bytes buffered in its socket.
async fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    stream.write_u64(total).await?;
    stream.shutdown().await
}

/// Minimal HTTP/1.1 keep-alive server, so fortio (and L7 waypoints) can be used with the
/// same target. The response body is `?size=N` bytes if given, else as long as the
/// request body (fortio's POST echo), else [`DEFAULT_PAYLOAD`].
async fn http(stream: TcpStream) -> io::Result<()> {
    let mut rd = BufReader::new(stream);
    let mut line = String::new();
    let mut out = Vec::new();
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("/").to_string();
        let mut close = parts.next() == Some("HTTP/1.0");
        let mut content_length = 0usize;
        loop {
            line.clear();
            if rd.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().map_err(|_| bad("bad content-length"))?;
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        if content_length > MAX_PAYLOAD {
            return Err(bad("request body too large"));
        }
        let got = tokio::io::copy(&mut (&mut rd).take(content_length as u64), &mut tokio::io::sink()).await?;
        if got < content_length as u64 {
            return Ok(());
        }
        let size = query_size(&target)
            .unwrap_or(if content_length > 0 { content_length } else { DEFAULT_PAYLOAD })
            .min(MAX_PAYLOAD);
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n");
        out.extend_from_slice(format!("Content-Length: {size}\r\n").as_bytes());
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if method != "HEAD" {
            out.resize(out.len() + size, b'x');
        }
        rd.get_mut().write_all(&out).await?;
        if close {
            return rd.get_mut().shutdown().await;
        }
    }
}

fn query_size(target: &str) -> Option<usize> {
    let (_, query) = target.split_once('?')?;
    query.split('&').find_map(|kv| kv.strip_prefix("size=")?.parse().ok())
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}
