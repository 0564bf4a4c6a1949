use super::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicUsize;

use crate::metrics::ConnectionLabels;

/// A minimal HTTP/1.1 client: one request per connection, returns (status, head, body).
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("complete response");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn local() -> AdminConfig {
    let a: SocketAddr = "127.0.0.1:0".parse().unwrap();
    AdminConfig { admin_addr: a, metrics_addr: a, readiness_addr: a }
}

struct Fixture {
    server: AdminServer,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    quits: Arc<AtomicUsize>,
}

fn fixture() -> Fixture {
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let quits = Arc::new(AtomicUsize::new(0));
    let q = quits.clone();
    let server = start(
        local(),
        metrics.clone(),
        Arc::new(|| serde_json::json!({"workloads": [{"name": "sleep", "uid": "u1"}]})),
        ready.clone(),
        Arc::new(move || {
            q.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .expect("start");
    Fixture { server, metrics, ready, quits }
}

#[test]
fn metrics_endpoints_serve_istio_exposition() {
    let f = fixture();
    f.metrics.open_connection(&ConnectionLabels::default()).close(10, 20);
    for path in ["/metrics", "/stats/prometheus"] {
        let (status, head, body) = http(f.server.metrics_addr, "GET", path);
        assert_eq!(status, 200, "{path}");
        assert!(head.contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"));
        assert!(body.contains("# TYPE istio_tcp_connections_opened counter"));
        assert!(body.contains("istio_tcp_connections_opened_total{reporter=\"source\""));
        assert!(body.contains("# TYPE istio_tcp_sent_bytes counter"));
        assert!(body.contains("# TYPE istio_tcp_received_bytes counter"));
        assert!(body.contains("# TYPE istio_tcp_connections_closed counter"));
        assert!(body.ends_with("# EOF\n"));
    }
    assert_eq!(http(f.server.metrics_addr, "POST", "/metrics").0, 405);
    assert_eq!(http(f.server.metrics_addr, "GET", "/config_dump").0, 404);
}

#[test]
fn config_dump_is_json() {
    let f = fixture();
    let (status, head, body) = http(f.server.admin_addr, "GET", "/config_dump");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/json"));
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["workloads"][0]["name"], "sleep");
}

#[test]
fn readiness_flips() {
    let f = fixture();
    let (status, _, body) = http(f.server.readiness_addr, "GET", "/healthz/ready");
    assert_eq!((status, body.as_str()), (503, "not ready\n"));
    f.ready.store(true, Ordering::Release);
    let (status, _, body) = http(f.server.readiness_addr, "GET", "/healthz/ready");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(http(f.server.readiness_addr, "GET", "/metrics").0, 404);
}

#[test]
fn quitquitquit_calls_back() {
    let f = fixture();
    assert_eq!(http(f.server.admin_addr, "GET", "/quitquitquit").0, 405);
    assert_eq!(f.quits.load(Ordering::SeqCst), 0);
    let (status, _, body) = http(f.server.admin_addr, "POST", "/quitquitquit");
    assert_eq!((status, body.as_str()), (200, "OK\n"));
    assert_eq!(f.quits.load(Ordering::SeqCst), 1);
}

#[test]
fn unknown_paths_are_404() {
    let f = fixture();
    assert_eq!(http(f.server.admin_addr, "GET", "/nope").0, 404);
    assert_eq!(http(f.server.admin_addr, "GET", "/metrics").0, 404);
    assert_eq!(http(f.server.readiness_addr, "GET", "/").0, 404);
}

#[test]
fn logging_get_and_set() {
    let f = fixture();
    let (status, _, _) = http(f.server.admin_addr, "GET", "/logging");
    assert_eq!(status, 200);
    let (status, _, body) = http(f.server.admin_addr, "POST", "/logging?level=DEBUG");
    assert_eq!(status, 200);
    assert!(body.starts_with("debug\n"), "{body}");
    assert_eq!(http(f.server.admin_addr, "GET", "/logging").2, "debug\n");
    let (status, _, body) = http(f.server.admin_addr, "POST", "/logging?level=info%2Cztunnel%3A%3Aproxy%3Dtrace");
    assert_eq!(status, 200);
    assert!(body.starts_with("info,ztunnel::proxy=trace\n"), "{body}");
    let (status, _, body) = http(f.server.admin_addr, "POST", "/logging?level=loud");
    assert_eq!(status, 400);
    assert!(body.contains("invalid level"), "{body}");
    assert_eq!(http(f.server.admin_addr, "POST", "/logging").0, 400);
    assert_eq!(http(f.server.admin_addr, "GET", "/logging").2, "info,ztunnel::proxy=trace\n");
}

#[test]
fn live_log_control_is_used() {
    let applied = Arc::new(std::sync::Mutex::new(String::new()));
    let a = applied.clone();
    let log = Arc::new(LogControl::new("info", move |d| {
        *a.lock().unwrap() = d.to_string();
        Ok(())
    }));
    let server = start_with_logging(
        local(),
        Arc::new(Metrics::new()),
        Arc::new(|| serde_json::Value::Null),
        Arc::new(AtomicBool::new(true)),
        Arc::new(|| {}),
        log,
    )
    .unwrap();
    assert_eq!(http(server.admin_addr, "POST", "/logging?level=warn").2, "warn\n");
    assert_eq!(*applied.lock().unwrap(), "warn");
}

#[test]
fn bind_errors_are_synchronous_and_drop_stops_serving() {
    let f = fixture();
    let taken = AdminConfig { admin_addr: f.server.admin_addr, ..local() };
    let err = start(
        taken,
        Arc::new(Metrics::new()),
        Arc::new(|| serde_json::Value::Null),
        Arc::new(AtomicBool::new(true)),
        Arc::new(|| {}),
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

    let addr = f.server.readiness_addr;
    assert_eq!(http(addr, "GET", "/healthz/ready").0, 503);
    drop(f);
    assert!(TcpStream::connect(addr).is_err(), "listener closed after drop");
}

#[test]
fn keep_alive_serves_several_requests() {
    let f = fixture();
    let mut s = TcpStream::connect(f.server.metrics_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.ends_with(b"# EOF\n") {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed early");
            buf.extend_from_slice(&chunk[..n]);
        }
        assert!(buf.starts_with(b"HTTP/1.1 200"));
    }
}

#[test]
fn query_params_decode() {
    assert_eq!(query_param("a=1&level=debug", "level").as_deref(), Some("debug"));
    assert_eq!(query_param("level=a%3Db+c%", "level").as_deref(), Some("a=b c%"));
    assert_eq!(query_param("x=1", "level"), None);
    assert_eq!(query_param("level", "level").as_deref(), Some(""));
}

#[test]
fn default_ports_are_istio() {
    let c = AdminConfig::default();
    assert_eq!(c.admin_addr, "127.0.0.1:15000".parse().unwrap());
    assert_eq!(c.metrics_addr.port(), 15020);
    assert_eq!(c.readiness_addr.port(), 15021);
}
