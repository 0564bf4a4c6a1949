//! The HBONE server against malformed and abusive clients, over real mTLS + h2 on 127.0.0.1:
//! a bad request fails only its own stream, a bad connection fails only itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::tests::{
    certs, echo_upstream, h2_connect, server_and_echo, start_server_reporting, start_server_with, tls_connect,
};
use super::*;
use crate::identity::CertManager;

/// Fails the test instead of hanging when the server does not react.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An accepted CONNECT tunnel, kept open across [`Tunnel::echo`] calls.
struct Tunnel {
    tx: h2::SendStream<Bytes>,
    rx: h2::RecvStream,
}

impl Tunnel {
    async fn open(send: &h2::client::SendRequest<Bytes>, target: SocketAddr) -> Tunnel {
        let req = http::Request::builder().method("CONNECT").uri(target.to_string()).body(()).unwrap();
        let mut send = send.clone().ready().await.unwrap();
        let (resp, tx) = send.send_request(req, false).unwrap();
        let resp = within("tunnel response", resp).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        Tunnel { tx, rx: resp.into_body() }
    }

    /// Sends `msg` (without ending the stream) and expects it back from the echo upstream.
    async fn echo(&mut self, msg: &[u8]) {
        self.tx.send_data(Bytes::copy_from_slice(msg), false).unwrap();
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let chunk = within("echo", self.rx.data()).await.expect("tunnel ended").unwrap();
            let _ = self.rx.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, msg);
    }
}

/// A new h2 connection to `server` (and its task, as [`h2_connect`]) with a tunnel open to
/// `target`.
async fn connect_with_tunnel(
    certs: &CertManager,
    server: SocketAddr,
    target: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>, Tunnel) {
    let (send, conn) = h2_connect(certs, server).await;
    let tunnel = Tunnel::open(&send, target).await;
    (send, conn, tunnel)
}

/// Sends `req` with an empty body on a new stream and returns the response status.
async fn status_of(send: &h2::client::SendRequest<Bytes>, req: http::Request<()>) -> Result<StatusCode, h2::Error> {
    let mut send = send.clone().ready().await?;
    let (resp, _) = send.send_request(req, true)?;
    Ok(within("response", resp).await?.status())
}

fn connect_to(authority: &str) -> http::Request<()> {
    http::Request::builder().method("CONNECT").uri(authority).body(()).unwrap()
}

#[tokio::test]
async fn bad_authority_or_method_gets_400_and_earlier_tunnel_keeps_echoing() {
    let (certs, seen, server, echo) = server_and_echo().await;
    let (send, _conn, mut tunnel) = connect_with_tunnel(&certs, server, echo).await;
    tunnel.echo(b"before").await;

    // `:authority` present but not `ip:port` (GET and a host name are covered elsewhere).
    for authority in ["no-port", "300.1.1.1:80", "127.0.0.1", "[::1]", "127.0.0.1:99999"] {
        let status = status_of(&send, connect_to(authority)).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{authority}");
        tunnel.echo(authority.as_bytes()).await;
    }

    // POST with a body the server never reads: 400, and the unread body does not stall
    // the connection.
    let mut s = send.clone().ready().await.unwrap();
    let post = http::Request::post("https://example.com/upload").body(()).unwrap();
    let (resp, mut body) = s.send_request(post, false).unwrap();
    body.send_data(Bytes::from(vec![7u8; 64 * 1024]), true).unwrap();
    assert_eq!(within("POST response", resp).await.unwrap().status(), StatusCode::BAD_REQUEST);

    // A CONNECT without `:authority` as h2's client sends it (it adds `:scheme` to a
    // request without authority): h2 itself refuses the stream as malformed before our
    // handler sees it. The raw-frame test below covers a bare CONNECT reaching our parser.
    let no_authority = http::Request::builder()
        .method("CONNECT")
        .uri(http::Uri::from_parts(Default::default()).unwrap())
        .body(())
        .unwrap();
    let err = status_of(&send, no_authority).await.unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{err}");
    assert!(err.is_reset() && err.is_remote(), "{err}");

    tunnel.echo(b"after").await;
    assert_eq!(seen.requests.lock().unwrap().len(), 1, "the handler saw a malformed request");
}

// ---- Raw HTTP/2 framing, for requests h2's client will not produce. ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK "literal header field without indexing" with the name from the static table
/// (1 = `:authority`, 2 = `:method`) and a short, non-Huffman value.
fn literal(static_name: u8, value: &str) -> Vec<u8> {
    assert!(static_name < 15 && value.len() < 127);
    let mut f = vec![static_name, value.len() as u8];
    f.extend_from_slice(value.as_bytes());
    f
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Reads the next frame, answering SETTINGS and PING along the way.
async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Frame {
    loop {
        let mut head = [0u8; 9];
        within("frame", io.read_exact(&mut head)).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        within("frame payload", io.read_exact(&mut payload)).await.unwrap();
        let f = Frame { kind: head[3], flags: head[4], stream, payload };
        match f.kind {
            SETTINGS if f.flags & ACK == 0 => io.write_all(&frame(SETTINGS, ACK, 0, &[])).await,
            PING if f.flags & ACK == 0 => io.write_all(&frame(PING, ACK, 0, &f.payload)).await,
            SETTINGS | PING | 8 /* WINDOW_UPDATE */ => Ok(()),
            _ => return f,
        }
        .unwrap();
    }
}

/// The `:status` of a response header block, as h2's encoder writes it (static-table index).
fn status(block: &[u8]) -> u16 {
    match block.first().map(|b| b ^ 0x80) {
        Some(i @ 8..=14) => [200, 204, 206, 304, 400, 404, 500][usize::from(i - 8)],
        _ => panic!("unexpected response header block {block:02x?}"),
    }
}

#[tokio::test]
async fn connect_without_authority_pseudo_header_gets_400() {
    let (certs, seen, server, echo) = server_and_echo().await;
    let mut io = tls_connect(&certs, server).await;
    io.write_all(PREFACE).await.unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // Stream 1: a valid tunnel. Stream 3: `:method CONNECT` and nothing else.
    let mut tunnel = literal(2, "CONNECT");
    tunnel.extend(literal(1, &echo.to_string()));
    io.write_all(&frame(HEADERS, END_HEADERS, 1, &tunnel)).await.unwrap();
    io.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &literal(2, "CONNECT"))).await.unwrap();

    let (mut tunnel_status, mut bare_status) = (None, None);
    while tunnel_status.is_none() || bare_status.is_none() {
        let f = next_frame(&mut io).await;
        match (f.kind, f.stream) {
            (HEADERS, 1) => tunnel_status = Some(status(&f.payload)),
            (HEADERS, 3) => {
                assert_ne!(f.flags & END_STREAM, 0, "400 must end the stream");
                bare_status = Some(status(&f.payload));
            }
            (kind, stream) => panic!("unexpected frame type {kind} on stream {stream}"),
        }
    }
    assert_eq!((tunnel_status, bare_status), (Some(200), Some(400)));

    // The tunnel opened first still carries bytes.
    io.write_all(&frame(DATA, 0, 1, b"still alive")).await.unwrap();
    let mut got = Vec::new();
    while got.len() < b"still alive".len() {
        let f = next_frame(&mut io).await;
        match (f.kind, f.stream) {
            (DATA, 1) => got.extend_from_slice(&f.payload),
            (RST_STREAM, 3) => {} // h2 may tidy up the already-answered stream
            (kind, stream) => panic!("unexpected frame type {kind} on stream {stream}"),
        }
    }
    assert_eq!(got, b"still alive");
    assert_eq!(seen.requests.lock().unwrap().len(), 1);
}

/// A CONNECT to `target` carrying one `x-big` header of `size` bytes.
fn connect_with_big_header(target: SocketAddr, size: usize) -> http::Request<()> {
    let mut req = connect_to(&target.to_string());
    let value = http::HeaderValue::from_str(&"a".repeat(size)).unwrap();
    req.headers_mut().insert("x-big", value);
    req
}

#[tokio::test]
async fn oversized_headers_get_431_on_that_stream_only() {
    let (certs, seen, server, echo) = server_and_echo().await;
    let (send, _conn, mut tunnel) = connect_with_tunnel(&certs, server, echo).await;
    tunnel.echo(b"before").await;

    // Over max_header_list_size (16 KiB) but under h2's abuse limit (4x): h2 answers 431
    // itself and resets only this stream.
    let big = H2Config::default().max_header_list_size as usize + 4096;
    let status = status_of(&send, connect_with_big_header(echo, big)).await;
    match status {
        Ok(s) => assert_eq!(s, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => panic!("expected 431, got {e}"),
    }

    tunnel.echo(b"after").await;
    // The connection still takes new tunnels.
    Tunnel::open(&send, echo).await.echo(b"new").await;
    assert_eq!(seen.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn header_flood_closes_only_that_connection() {
    let certs = certs();
    let (server, mut ended) = start_server_reporting(&certs, Arc::default()).await;
    let echo = echo_upstream().await;
    let (good_send, good_conn, mut good) = connect_with_tunnel(&certs, server, echo).await;
    good.echo(b"before").await;
    let (bad_send, bad_conn, mut doomed) = connect_with_tunnel(&certs, server, echo).await;
    doomed.echo(b"doomed").await;

    // 64 KiB is over h2's abuse limit (4 x 16 KiB): a connection error, GOAWAY
    // ENHANCE_YOUR_CALM, tearing down that connection's tunnels too.
    let err = status_of(&bad_send, connect_with_big_header(echo, 64 * 1024)).await.unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err}");
    assert!(err.is_go_away() && err.is_remote(), "{err}");
    let conn_err = within("bad connection end", bad_conn).await.unwrap().unwrap_err();
    assert_eq!(conn_err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM));
    let tail = within("doomed tunnel end", doomed.rx.data()).await;
    assert!(!matches!(tail, Some(Ok(_))), "{tail:?}");
    // The server reports it as an error, not a clean close.
    let served = within("serve_connection result", ended.recv()).await.unwrap();
    match served {
        Err(ServeError::H2(e)) => assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM)),
        other => panic!("expected an h2 error, got {other:?}"),
    }

    // The other connection is untouched.
    good.echo(b"after").await;
    Tunnel::open(&good_send, echo).await.echo(b"new").await;
    assert!(!good_conn.is_finished());
}

#[tokio::test]
async fn garbage_instead_of_h2_preface_closes_only_that_connection() {
    let certs = certs();
    let (server, mut ended) = start_server_reporting(&certs, Arc::default()).await;
    let echo = echo_upstream().await;
    let (good_send, good_conn, mut good) = connect_with_tunnel(&certs, server, echo).await;
    good.echo(b"before").await;

    let mut bad = tls_connect(&certs, server).await;
    // The server may close before reading all of it; a failed write is fine.
    let _ = bad.write_all(&[0xAB; 4096]).await;
    let _ = bad.flush().await;
    // The server's SETTINGS may arrive first; then EOF or a reset.
    let mut sink = Vec::new();
    let _ = within("garbage connection close", bad.read_to_end(&mut sink)).await;
    match within("serve_connection result", ended.recv()).await.unwrap() {
        Err(ServeError::H2(e)) => assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR)),
        other => panic!("expected an h2 error, got {other:?}"),
    }

    good.echo(b"after").await;
    Tunnel::open(&good_send, echo).await.echo(b"new").await;
    assert!(!good_conn.is_finished());
}

#[tokio::test]
async fn a_client_that_stalls_after_tls_is_cut_at_the_handshake_timeout() {
    let certs = certs();
    let h2 = H2Config { handshake_timeout: Duration::from_millis(300), ..H2Config::default() };
    let (server, mut ended) = start_server_with(&certs, Default::default(), h2).await;
    // TLS completes, then nothing: no preface, no SETTINGS (a slowloris on 15008).
    let mut tls = tls_connect(&certs, server).await;
    let result = within("server gives up on the stalled client", ended.recv()).await.expect("server result");
    assert!(matches!(result, Err(ServeError::HandshakeTimeout(_))), "{result:?}");
    let mut buf = [0u8; 64];
    let n = within("connection closed", async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(_) => continue, // the server's own SETTINGS
            }
        }
    })
    .await;
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_connection_without_streams_is_closed_after_the_idle_timeout() {
    let certs = certs();
    let h2 = H2Config { idle_timeout: Duration::from_millis(300), ..H2Config::default() };
    let (server, mut ended) = start_server_with(&certs, Default::default(), h2).await;
    let (_send, conn) = h2_connect(&certs, server).await;
    // The server sends GOAWAY; the client, with nothing in flight, hangs up (the server may
    // then see a broken pipe on its final frames: either way the connection is gone).
    let result = within("server closes the idle connection", ended.recv()).await.expect("server result");
    assert!(!matches!(result, Err(ServeError::HandshakeTimeout(_))), "{result:?}");
    let _ = within("client sees the close", conn).await.unwrap();
}

#[tokio::test]
async fn a_connection_with_an_open_tunnel_is_not_idle() {
    let (certs, _seen, _server, echo) = server_and_echo().await;
    let h2 = H2Config { idle_timeout: Duration::from_millis(200), ..H2Config::default() };
    let (server, _ended) = start_server_with(&certs, Default::default(), h2).await;
    let (send, _conn, mut tunnel) = connect_with_tunnel(&certs, server, echo).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    tunnel.echo(b"still open").await;
    drop(send);
}
