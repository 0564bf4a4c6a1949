//! Reads the SNI of a TLS connection without consuming it: the ClientHello is peeked from
//! the socket and parsed by rustls, so the bytes are still there for whoever handles the
//! connection next (a TLS handshake here, or a relay that passes TLS through untouched).
use std::time::Duration;

use tokio::net::TcpStream;

/// Largest ClientHello read (TLS records are at most 16 KiB plus a header).
const MAX_HELLO: usize = 16 * 1024 + 5;

/// What the start of a connection showed.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A TLS ClientHello, with its server name if it sent one.
    Tls(Option<String>),
    /// Not TLS.
    NotTls,
}

/// Peeks until a whole ClientHello is in (or `timeout` passes, or the peer sends something
/// that is not one).
pub async fn peek_client_hello(stream: &TcpStream, timeout: Duration) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; MAX_HELLO];
    let read = async {
        let mut last = 0;
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Ok(Hello::NotTls);
            }
            // A TLS handshake record starts with 0x16 0x03.
            if buf[0] != 0x16 || (n > 1 && buf[1] != 0x03) {
                return Ok(Hello::NotTls);
            }
            let mut acceptor = rustls::server::Acceptor::default();
            let mut slice = &buf[..n];
            if acceptor.read_tls(&mut slice).is_err() {
                return Ok(Hello::NotTls);
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => return Ok(Hello::Tls(accepted.client_hello().server_name().map(str::to_string))),
                Ok(None) if n < MAX_HELLO => {}
                Ok(None) | Err(_) => return Ok(Hello::NotTls),
            }
            if n == last {
                // Nothing new arrived: wait a little before peeking again.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last = n;
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no ClientHello in time")),
    }
}
