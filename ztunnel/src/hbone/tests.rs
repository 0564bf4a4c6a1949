//! End-to-end HBONE tests on 127.0.0.1 with real mTLS: pool → server → TCP upstream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::server::parse_forwarded_for;
use super::*;
use crate::identity::{CaConfig, CertManager, CertManagerConfig, Identity, InProcessCa};
use crate::tls;

pub(super) fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).unwrap()
}

pub(super) fn certs() -> CertManager {
    let ca = InProcessCa::new(CaConfig::new("cluster.local")).unwrap();
    CertManager::new(Arc::new(ca), CertManagerConfig::default())
}

/// Records what the server's handler saw.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) requests: Mutex<Vec<ConnectRequest>>,
}

/// An HBONE server for `server` identity: denies port 1, otherwise connects to the authority.
pub(super) async fn start_server(certs: &CertManager, seen: Arc<Seen>) -> SocketAddr {
    start_server_reporting(certs, seen).await.0
}

/// Like [`start_server`], also reporting how `serve_connection` ended for each connection
/// that completed the TLS handshake.
pub(super) async fn start_server_reporting(
    certs: &CertManager,
    seen: Arc<Seen>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<(), ServeError>>) {
    start_server_with(certs, seen, H2Config::default()).await
}

/// Like [`start_server_reporting`], with chosen h2 settings.
pub(super) async fn start_server_with(
    certs: &CertManager,
    seen: Arc<Seen>,
    h2: H2Config,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<(), ServeError>>) {
    let (ended_tx, ended_rx) = mpsc::unbounded_channel();
    let cert = certs.fetch(&id("server")).await.unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(&cert, cert.roots()).unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(move |req: ConnectRequest| {
        let seen = seen.clone();
        async move {
            let target = req.authority;
            seen.requests.lock().unwrap().push(req);
            if target.port() == 1 {
                return Err(ConnectRejection::Denied("port 1 is forbidden".into()));
            }
            TcpStream::connect(target).await.map_err(|e| ConnectRejection::UpstreamFailed(e.to_string()))
        }
    });
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            let (ended_tx, h2) = (ended_tx.clone(), h2.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let result = serve_connection(tls, handler, &h2).await;
                    let _ = ended_tx.send(result);
                }
            });
        }
    });
    (addr, ended_rx)
}

/// What most tests start from: certificates, an HBONE server (see [`start_server`]) recording
/// into the returned [`Seen`], and an echo upstream. Returns `(certs, seen, server, echo)`.
pub(super) async fn server_and_echo() -> (CertManager, Arc<Seen>, SocketAddr, SocketAddr) {
    let certs = certs();
    let seen = Arc::new(Seen::default());
    let server = start_server(&certs, seen.clone()).await;
    let echo = echo_upstream().await;
    (certs, seen, server, echo)
}

/// A client-authenticated TLS connection to the server, nothing sent yet.
pub(super) async fn tls_connect(certs: &CertManager, server: SocketAddr) -> TlsStream<TcpStream> {
    let cert = certs.fetch(&id("client")).await.unwrap();
    let cfg = tls::client_config(&cert, cert.roots(), vec![id("server")]).unwrap();
    let tcp = TcpStream::connect(server).await.unwrap();
    TlsConnector::from(Arc::new(cfg)).connect(tls::server_name(server.ip()), tcp).await.unwrap()
}

/// An h2 connection to the server; the task resolves when the connection ends.
pub(super) async fn h2_connect(
    certs: &CertManager,
    server: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let (send, conn) = h2::client::handshake(tls_connect(certs, server).await).await.unwrap();
    (send, tokio::spawn(conn))
}

/// A TCP upstream echoing everything, then closing after the client's EOF.
pub(super) async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP upstream that reads until EOF and only then answers.
async fn reply_after_eof_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap();
        tcp.write_all(format!("got {} bytes", got.len()).as_bytes()).await.unwrap();
        tcp.shutdown().await.unwrap();
    });
    addr
}

fn counting_dialer(dials: Arc<AtomicUsize>) -> Arc<dyn Dialer> {
    Arc::new(move |key: PoolKey| {
        let dials = dials.clone();
        async move {
            dials.fetch_add(1, Ordering::SeqCst);
            TcpStream::connect(key.dst).await
        }
    })
}

fn pool(certs: &CertManager, dials: Arc<AtomicUsize>, cfg: PoolConfig) -> ConnectionPool {
    ConnectionPool::new(cfg, counting_dialer(dials), Arc::new(CertManagerTls { certs: certs.clone() }))
}

fn key(dst: SocketAddr, dst_identity: Identity) -> PoolKey {
    PoolKey {
        src_identity: id("client"),
        dst_identity,
        dst_alt_identities: vec![],
        dst,
        src_ip: "127.0.0.1".parse().unwrap(),
    }
}

async fn roundtrip(stream: &mut HboneStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

#[tokio::test]
async fn connect_reaches_upstream_and_server_sees_client_identity() {
    let (certs, seen, server, echo) = server_and_echo().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let pool = pool(&certs, dials.clone(), PoolConfig::default());
    let headers = ConnectHeaders {
        forwarded_for: Some("10.0.0.7:4242".parse().unwrap()),
        forwarded_host: None,
        baggage: Some("k8s.namespace.name=default,k8s.deployment.name=client".into()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        extra: Default::default(),
    };
    let mut stream = pool.connect(key(server, id("server")), echo, headers).await.unwrap();
    roundtrip(&mut stream, b"hello through hbone").await;
    {
        let reqs = seen.requests.lock().unwrap();
        let req = &reqs[0];
        assert_eq!(req.peer, id("client"));
        assert_eq!(req.authority, echo);
        assert_eq!(req.forwarded_for, Some(ForwardedFor { ip: "10.0.0.7".parse().unwrap(), port: Some(4242) }));
        assert!(req.baggage.as_deref().unwrap().contains("k8s.deployment.name=client"));
        assert!(req.traceparent.as_deref().unwrap().starts_with("00-0af7"));
    }
    let stats = pool.stats();
    assert_eq!((stats.connections_opened, stats.live_connections, stats.active_streams), (1, 1, 1));
    drop(stream);
    assert_eq!(pool.stats().active_streams, 0);
    assert_eq!(dials.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn large_transfer_both_ways_respects_flow_control() {
    let (certs, _, server, echo) = server_and_echo().await;
    let pool = pool(&certs, Arc::default(), PoolConfig::default());
    let stream = pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let payload: Vec<u8> = (0..(24 << 20)).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), expected.len());
    assert!(back == expected);
}

/// The outbound side's copy: socket reads become DATA frames and received frames go to the
/// socket as they are (`copy_chunks` with the tunnel's chunk methods), byte-exact both ways
/// through a real h2 + TLS tunnel to an echo server, with the app's half-close forwarded.
#[tokio::test]
async fn chunked_copy_between_socket_and_tunnel_is_byte_exact() {
    let (certs, _, server, echo) = server_and_echo().await;
    let pool = pool(&certs, Arc::default(), PoolConfig::default());
    let mut tunnel = pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut proxied, _) = listener.accept().await.unwrap();
    let copier = tokio::spawn(async move { crate::hbone::copy_chunks(&mut proxied, &mut tunnel).await });
    let payload: Vec<u8> = (0..(9 << 20) + 77).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let expected = payload.clone();
    let (mut r, mut w) = app.into_split();
    let writer = tokio::spawn(async move {
        for piece in payload.chunks(100_003) {
            w.write_all(piece).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "echoed bytes differ");
    let stats = copier.await.unwrap().unwrap();
    assert_eq!((stats.a_to_b, stats.b_to_a), (expected.len() as u64, expected.len() as u64));
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let certs = certs();
    let server = start_server(&certs, Arc::default()).await;
    let upstream = reply_after_eof_upstream().await;
    let pool = pool(&certs, Arc::default(), PoolConfig::default());
    let mut stream = pool.connect(key(server, id("server")), upstream, ConnectHeaders::default()).await.unwrap();
    stream.write_all(b"12345").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 5 bytes");
}

#[tokio::test]
async fn statuses_map_to_errors() {
    let certs = certs();
    let server = start_server(&certs, Arc::default()).await;
    let pool = pool(&certs, Arc::default(), PoolConfig::default());
    let k = key(server, id("server"));
    let denied = pool.connect(k.clone(), "127.0.0.1:1".parse().unwrap(), ConnectHeaders::default()).await;
    assert!(matches!(denied, Err(HboneError::Denied { .. })), "{denied:?}");
    // Nothing listens on this port: the server's upstream connect fails.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let failed = pool.connect(k, closed, ConnectHeaders::default()).await;
    assert!(matches!(failed, Err(HboneError::UpstreamFailed { .. })), "{failed:?}");
    assert_eq!(pool.stats().connections_opened, 1);
}

#[tokio::test]
async fn client_rejects_server_with_unexpected_identity() {
    let (certs, _, server, echo) = server_and_echo().await;
    let pool = pool(&certs, Arc::default(), PoolConfig::default());
    let err = pool.connect(key(server, id("not-the-server")), echo, ConnectHeaders::default()).await.unwrap_err();
    match &err {
        HboneError::Dial(d) => {
            assert!(matches!(**d, DialError::Tls { reason: tls::RejectReason::SanMismatch, .. }), "{err}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(pool.stats().dial_failures, 1);
}

#[tokio::test]
async fn concurrent_connects_share_one_dial_and_connection() {
    let (certs, _, server, echo) = server_and_echo().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let pool = pool(&certs, dials.clone(), PoolConfig::default());
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut s = pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap();
                roundtrip(&mut s, format!("stream {i}").as_bytes()).await;
                s
            })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    let stats = pool.stats();
    assert_eq!((stats.connections_opened, stats.active_streams, stats.streams_opened), (1, 50, 50));
}

#[tokio::test]
async fn full_connection_opens_another_and_failed_dials_are_shared() {
    let (certs, _, server, echo) = server_and_echo().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let cfg = PoolConfig { max_streams_per_conn: 2, ..Default::default() };
    let pool = pool(&certs, dials.clone(), cfg);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap());
    }
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().live_connections, 2);

    // Ten concurrent requests to a dead endpoint: one dial, one failure, ten errors.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let before = dials.load(Ordering::SeqCst);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.connect(key(dead, id("server")), echo, ConnectHeaders::default()).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Err(HboneError::Dial(_))));
    }
    assert_eq!(dials.load(Ordering::SeqCst) - before, 1);
    assert_eq!(pool.stats().dial_failures, 1);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (certs, _, server, echo) = server_and_echo().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let cfg = PoolConfig { idle_timeout: Duration::from_millis(200), ..Default::default() };
    let pool = pool(&certs, dials.clone(), cfg);
    let mut s = pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap();
    roundtrip(&mut s, b"x").await;
    // Not idle while a stream is open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.stats().live_connections, 1);
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pool.stats().live_connections != 0 {
        assert!(tokio::time::Instant::now() < deadline, "idle connection never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap();
    roundtrip(&mut s, b"y").await;
    assert_eq!(dials.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_bursts_surplus_connections_close_soon_and_one_stays_warm() {
    let (certs, _, server, echo) = server_and_echo().await;
    let dials = Arc::new(AtomicUsize::new(0));
    let cfg = PoolConfig {
        max_streams_per_conn: 2,
        idle_timeout: Duration::from_secs(60),
        surplus_idle_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let pool = pool(&certs, dials.clone(), cfg);
    let mut burst = Vec::new();
    for _ in 0..6 {
        burst.push(pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap());
    }
    assert_eq!(pool.stats().live_connections, 3);
    drop(burst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pool.stats().live_connections != 1 {
        assert!(tokio::time::Instant::now() < deadline, "surplus idle connections never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The warm one outlives the surplus timeout and serves the next tunnel without a dial.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pool.stats().live_connections, 1);
    let mut s = pool.connect(key(server, id("server")), echo, ConnectHeaders::default()).await.unwrap();
    roundtrip(&mut s, b"warm").await;
    assert_eq!(dials.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn malformed_request_gets_400_without_disturbing_other_streams() {
    let (certs, _, server, echo) = server_and_echo().await;
    let (send, _conn) = h2_connect(&certs, server).await;
    let mut send = send.ready().await.unwrap();

    // A good tunnel first.
    let connect = http::Request::builder().method("CONNECT").uri(echo.to_string()).body(()).unwrap();
    let (resp, mut tx) = send.send_request(connect, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut rx = resp.into_body();

    // Then a GET and a CONNECT to a host name on the same connection: both 400.
    for req in [
        http::Request::get("https://example.com/").body(()).unwrap(),
        http::Request::builder().method("CONNECT").uri("example.com:80").body(()).unwrap(),
    ] {
        let mut send = send.clone().ready().await.unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), 400);
    }

    // The first tunnel still works.
    tx.send_data(Bytes::from_static(b"still alive"), true).unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.unwrap();
        let _ = rx.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"still alive");
}

#[test]
fn forwarded_for_forms() {
    let f = |s| parse_forwarded_for(s);
    assert_eq!(f("for=10.1.2.3"), Some(ForwardedFor { ip: "10.1.2.3".parse().unwrap(), port: None }));
    assert_eq!(f("for=\"10.1.2.3:80\""), Some(ForwardedFor { ip: "10.1.2.3".parse().unwrap(), port: Some(80) }));
    assert_eq!(f("For=\"[::1]:80\";proto=https"), Some(ForwardedFor { ip: "::1".parse().unwrap(), port: Some(80) }));
    assert_eq!(f("by=x;for=\"[fd00::1]\""), Some(ForwardedFor { ip: "fd00::1".parse().unwrap(), port: None }));
    assert_eq!(f("for=unknown"), None);
}
