//! HBONE (DESIGN §5): HTTP/2 CONNECT tunnels over mutual-TLS connections between mesh nodes.
//!
//! [`serve_connection`] is the inbound side; [`ConnectionPool`] the outbound side, sharing
//! h2 connections per (source identity, destination identity, destination, source IP);
//! [`copy_bidirectional`] splices a tunnel to a socket.

mod client;
mod copy;
mod pool;
mod server;
mod stream;

use std::time::Duration;

pub use client::{
    build_request, CertManagerTls, ClientTlsProvider, ConnectHeaders, DialError, DialFuture, Dialer, HboneError,
    PoolKey, TcpDialer, TlsConfigFuture,
};
pub use copy::{copy_bidirectional, copy_chunks, CopyIo, CopyStats, Plain};
pub use pool::{ConnectionPool, PoolConfig, PoolStats};
pub use server::{
    parse_forwarded_for, parse_request, serve_connection, serve_connection_until, ConnectHandler, ConnectRejection,
    ConnectRequest, ForwardedFor, ServeError, Spliced, StreamSummary, TunnelHandler,
};
pub use stream::HboneStream;

/// HTTP/2 settings of HBONE connections; the defaults are Istio's choices.
#[derive(Debug, Clone)]
pub struct H2Config {
    /// Per-stream receive window (Istio: 4 MiB).
    pub stream_window: u32,
    /// Per-connection receive window (Istio: 16 MiB).
    pub connection_window: u32,
    /// Largest frame we accept (Istio: 1 MiB).
    pub max_frame_size: u32,
    /// Bound on request/response header size, against memory abuse.
    pub max_header_list_size: u32,
    /// Streams a server accepts concurrently on one connection.
    pub max_concurrent_streams: u32,
    /// How often to PING an otherwise quiet peer (Istio: 10 s).
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// How long a client has, once TLS is up, to send the h2 preface and SETTINGS (a
    /// client that stalls there would otherwise hold a connection forever).
    pub handshake_timeout: Duration,
    /// A server connection with no stream in flight for this long is closed (GOAWAY), so
    /// idle tunnels from peers do not pile up (clients' pools close theirs sooner).
    pub idle_timeout: Duration,
}

impl Default for H2Config {
    fn default() -> Self {
        H2Config {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_header_list_size: 16 * 1024,
            max_concurrent_streams: 1000,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10 * 60),
        }
    }
}

/// The peer stopped answering keepalive PINGs, or PINGs could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// No PONG within the timeout.
    #[error("no PING response within {0:?}")]
    Timeout(Duration),
    /// Sending the PING failed (connection broken).
    #[error("PING failed: {0}")]
    H2(#[from] h2::Error),
}

/// PINGs the peer every `interval`; resolves only when the peer fails to answer.
pub(crate) async fn keepalive(mut pings: h2::PingPong, interval: Duration, timeout: Duration) -> KeepaliveError {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => continue,
            Ok(Err(e)) => return e.into(),
            Err(_) => return KeepaliveError::Timeout(timeout),
        }
    }
}

#[cfg(test)]
mod malformed_tests;
#[cfg(test)]
mod tests;
