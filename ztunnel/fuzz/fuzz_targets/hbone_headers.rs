//! The HBONE CONNECT request as the server reads it (`hbone::parse_request`: method,
//! `:authority` → `SocketAddr`, `forwarded` via `hbone::parse_forwarded_for`, `baggage`,
//! `traceparent`). Requests reach the parser through a real h2 server on an in-memory stream, the
//! way they arrive from a peer, in three ways:
//! - a `Forwarded` value alone, straight into `parse_forwarded_for`;
//! - a request built by the client side (`hbone::build_request`) from fuzzer-chosen target and
//!   headers, sent through an h2 client;
//! - raw bytes after the h2 preface, read as frames by the h2 server (anything a peer can send).
//!
//! Properties:
//! - nothing panics or hangs;
//! - `parse_forwarded_for` reads back what it returns once that is written as `for="…"`, ignores
//!   later elements and earlier parameters, and the key is case-insensitive;
//! - `build_request` fails only for header values HTTP forbids, and what it builds the server
//!   parses back to the same target, original source, baggage and traceparent (the source only
//!   while the `forwarded` value is ASCII, see the report in ztunnel/fuzz/README.md);
//! - a request the server accepts is a CONNECT whose `:authority` is that `ip:port`.
#![no_main]

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use ztunnel::hbone::{build_request, parse_forwarded_for, parse_request, ConnectHeaders, ForwardedFor, H2Config};
use ztunnel::identity::Identity;

fn peer() -> Identity {
    Identity::new("cluster.local", "ns1", "client").unwrap()
}

// --- Forwarded -------------------------------------------------------------------------------

fn check_forwarded(value: &str) {
    let parsed = parse_forwarded_for(value);
    if let Some(f) = parsed {
        let written = match (f.ip, f.port) {
            (ip, Some(port)) => format!("for=\"{}\"", SocketAddr::new(ip, port)),
            (IpAddr::V4(ip), None) => format!("for={ip}"),
            (IpAddr::V6(ip), None) => format!("for=\"[{ip}]\""),
        };
        assert_eq!(parse_forwarded_for(&written), Some(f), "{written:?} does not read back");
        assert_eq!(parse_forwarded_for(&written.to_uppercase().replacen("FOR", "For", 1)), Some(f));
    }
    assert_eq!(parse_forwarded_for(&format!("proto=https;{value}")), parsed, "a parameter before for= changed it");
    assert_eq!(parse_forwarded_for(&format!("{value},for=192.0.2.1")), parsed, "a later element changed it");
}

// --- An h2 client and server joined in memory ------------------------------------------------

struct Pair {
    send: h2::client::SendRequest<Bytes>,
    server: h2::server::Connection<DuplexStream, Bytes>,
}

fn server_builder() -> h2::server::Builder {
    // As `serve_connection` configures it.
    let cfg = H2Config::default();
    let mut b = h2::server::Builder::new();
    b.initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .max_frame_size(cfg.max_frame_size)
        .max_header_list_size(cfg.max_header_list_size)
        .max_concurrent_streams(cfg.max_concurrent_streams);
    b
}

async fn connect() -> Pair {
    let (c, s) = tokio::io::duplex(1 << 16);
    let server = async move { server_builder().handshake::<_, Bytes>(s).await.expect("server handshake") };
    let client = async move { h2::client::Builder::new().handshake::<_, Bytes>(c).await.expect("client handshake") };
    let (server, (send, conn)) = tokio::join!(server, client);
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Pair { send, server }
}

thread_local! {
    static RT: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    static PAIR: RefCell<Option<Pair>> = const { RefCell::new(None) };
}

/// What happened to one request sent by the client.
enum Exchange {
    /// The client refused to send it.
    NotSent,
    /// The server received it (and answered 400).
    Received(Request<h2::RecvStream>),
    /// The server reset it or the connection broke.
    Refused,
}

async fn exchange(pair: &mut Pair, req: Request<()>) -> Result<Exchange, ()> {
    let mut send = pair.send.clone().ready().await.map_err(drop)?;
    let response = match send.send_request(req, true) {
        Ok((response, _)) => response,
        Err(e) if e.is_io() || e.is_go_away() => return Err(()),
        // Refused by the client (malformed or connection-specific headers).
        Err(_) => return Ok(Exchange::NotSent),
    };
    tokio::select! {
        accepted = pair.server.accept() => match accepted {
            Some(Ok((req, mut respond))) => {
                let _ = respond.send_response(Response::builder().status(StatusCode::BAD_REQUEST).body(()).unwrap(), true);
                Ok(Exchange::Received(req))
            }
            _ => Err(()),
        },
        // The server reset the stream (malformed request) and the client saw it first.
        _ = response => Ok(Exchange::Refused),
    }
}

/// Sends `req` through the shared connection, reconnecting when it broke.
fn send_through_h2(req: Request<()>, check: impl FnOnce(Option<Request<h2::RecvStream>>)) {
    RT.with(|rt| {
        PAIR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let result = rt.block_on(async {
                if slot.is_none() {
                    *slot = Some(connect().await);
                }
                let pair = slot.as_mut().unwrap();
                tokio::time::timeout(Duration::from_secs(5), exchange(pair, req)).await
            });
            match result {
                Ok(Ok(Exchange::Received(req))) => check(Some(req)),
                Ok(Ok(Exchange::NotSent | Exchange::Refused)) => check(None),
                Ok(Err(())) => *slot = None,
                Err(_) => panic!("h2 exchange hung"),
            }
        })
    })
}

// --- Client-built requests -------------------------------------------------------------------

#[derive(Arbitrary, Debug)]
struct Built {
    target: (IpAddr, u16),
    forwarded_for: Option<(IpAddr, u16)>,
    forwarded_host: Option<String>,
    baggage: Option<String>,
    traceparent: Option<String>,
    extra: Vec<(String, String)>,
}

/// What `HeaderValue::try_from(&str)` accepts: no control characters but tab.
fn valid_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// What the server can read back as text (`HeaderValue::to_str`): visible ASCII, space, tab.
fn text_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn check_built(b: Built) {
    let target = SocketAddr::new(b.target.0, b.target.1);
    let forwarded_for = b.forwarded_for.map(|(ip, port)| SocketAddr::new(ip, port));
    let mut extra = HeaderMap::new();
    for (name, value) in b.extra.iter().take(8) {
        let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) else {
            continue;
        };
        if ["forwarded", "baggage", "traceparent"].contains(&name.as_str()) {
            continue;
        }
        extra.append(name, value);
    }
    let headers = ConnectHeaders {
        forwarded_for,
        forwarded_host: b.forwarded_host.clone(),
        baggage: b.baggage.clone(),
        traceparent: b.traceparent.clone(),
        extra,
    };
    let forwarded = forwarded_for.map(|src| {
        let host = b.forwarded_host.as_ref().map(|h| format!(";host={h}")).unwrap_or_default();
        format!("for=\"{src}\"{host}")
    });
    let sent = [&forwarded, &b.baggage, &b.traceparent];
    let req = match build_request(target, &headers) {
        Ok(req) => {
            assert!(
                sent.iter().all(|v| v.as_deref().is_none_or(valid_value)),
                "built a request with a forbidden header value"
            );
            req
        }
        Err(e) => {
            assert!(
                !sent.iter().all(|v| v.as_deref().is_none_or(valid_value)),
                "build_request failed on valid headers: {e}"
            );
            return;
        }
    };
    assert_eq!(req.method(), Method::CONNECT);
    send_through_h2(req, |got| {
        let Some(got) = got else { return };
        let c = parse_request(&got, peer()).unwrap_or_else(|e| panic!("server refused a client-built request: {e}"));
        assert_eq!(c.authority, target, ":authority round trip");
        assert_eq!(c.peer, peer());
        let readable = |v: &Option<String>| v.clone().filter(|v| text_value(v));
        let expected_src =
            readable(&forwarded).and(forwarded_for).map(|s| ForwardedFor { ip: s.ip(), port: Some(s.port()) });
        assert_eq!(c.forwarded_for, expected_src, "forwarded round trip: sent {forwarded:?}");
        assert_eq!(c.baggage, readable(&b.baggage), "baggage round trip");
        assert_eq!(c.traceparent, readable(&b.traceparent), "traceparent round trip");
    });
}

// --- Raw frames from a peer ------------------------------------------------------------------

/// Reads the peer's bytes, discards what the server writes.
struct Wire<'a> {
    input: &'a [u8],
}

impl AsyncRead for Wire<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.input.len());
        buf.put_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn check_received(req: &Request<h2::RecvStream>) {
    match parse_request(req, peer()) {
        Ok(c) => {
            assert_eq!(req.method(), Method::CONNECT, "accepted a non-CONNECT request");
            let authority = req.uri().authority().expect("accepted a request without :authority");
            assert_eq!(authority.as_str().parse::<SocketAddr>().ok(), Some(c.authority));
            let fwd = req.headers().get("forwarded").and_then(|v| v.to_str().ok());
            assert_eq!(c.forwarded_for, fwd.and_then(parse_forwarded_for));
            if let Some(f) = fwd {
                check_forwarded(f);
            }
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
}

fn raw_frames(frames: &[u8]) {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let input = [PREFACE, frames].concat();
    let serve = async {
        let Ok(mut conn) = server_builder().handshake::<_, Bytes>(Wire { input: &input }).await else { return };
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            check_received(&req);
            let _ = respond.send_response(Response::builder().status(StatusCode::BAD_REQUEST).body(()).unwrap(), true);
        }
    };
    RT.with(|rt| rt.block_on(with_deadline(serve)));
}

async fn with_deadline(f: impl Future<Output = ()>) {
    if tokio::time::timeout(Duration::from_secs(5), f).await.is_err() {
        panic!("h2 server hung on finite input");
    }
}

// --- Entry -----------------------------------------------------------------------------------

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => check_forwarded(&String::from_utf8_lossy(rest)),
        1 | 2 => {
            if let Ok(b) = Built::arbitrary_take_rest(Unstructured::new(rest)) {
                check_built(b);
            }
        }
        _ => raw_frames(rest),
    }
});
