//! One client connection of the request/response generators.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::Protocol;

/// One client connection with its reusable request and buffers.
pub(super) struct Conn {
    pub(super) rd: BufReader<TcpStream>,
    pub(super) addr: SocketAddr,
    pub(super) protocol: Protocol,
    pub(super) payload: usize,
    request: Vec<u8>,
    body: Vec<u8>,
    line: String,
    /// The server asked to close (HTTP `Connection: close`).
    pub(super) must_reconnect: bool,
}

impl Conn {
    pub(super) fn new(stream: TcpStream, addr: SocketAddr, protocol: Protocol, payload: usize, close: bool) -> Self {
        let _ = stream.set_nodelay(true);
        let request = match protocol {
            Protocol::Framed => vec![b'q'; payload.max(1)],
            Protocol::Http => {
                let conn = if close { "Connection: close\r\n" } else { "" };
                let mut r = format!(
                    "POST /?size={payload} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {payload}\r\n{conn}\r\n"
                )
                .into_bytes();
                r.resize(r.len() + payload, b'q');
                r
            }
        };
        Conn {
            rd: BufReader::new(stream),
            addr,
            protocol,
            payload,
            request,
            body: Vec::new(),
            line: String::new(),
            must_reconnect: false,
        }
    }

    /// Sends the mode header of the framed protocol.
    pub(super) async fn start(&mut self) -> io::Result<()> {
        if self.protocol == Protocol::Framed {
            let mut hdr = [b'R', 0, 0, 0, 0];
            hdr[1..].copy_from_slice(&(self.request.len() as u32).to_be_bytes());
            self.rd.get_mut().write_all(&hdr).await?;
        }
        Ok(())
    }

    /// One request and its full response; returns the result code for `RetCodes`.
    pub(super) async fn request(&mut self) -> io::Result<String> {
        self.rd.get_mut().write_all(&self.request).await?;
        match self.protocol {
            Protocol::Framed => {
                self.body.resize(self.request.len(), 0);
                self.rd.read_exact(&mut self.body).await?;
                Ok("OK".into())
            }
            Protocol::Http => self.http_response().await,
        }
    }

    async fn http_response(&mut self) -> io::Result<String> {
        let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-response");
        self.line.clear();
        if self.rd.read_line(&mut self.line).await? == 0 {
            return Err(eof());
        }
        let code = self.line.split_whitespace().nth(1).unwrap_or("-1").to_string();
        let mut length = 0u64;
        loop {
            self.line.clear();
            if self.rd.read_line(&mut self.line).await? == 0 {
                return Err(eof());
            }
            let h = self.line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length =
                        value.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
                } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
                    self.must_reconnect = true;
                }
            }
        }
        let got = tokio::io::copy(&mut (&mut self.rd).take(length), &mut tokio::io::sink()).await?;
        if got < length {
            return Err(eof());
        }
        Ok(code)
    }
}
