//! Built-in load generator and target server for the benchmarks (DESIGN §10), used when
//! fortio is not on `PATH`. It knows nothing about the mesh: it takes `SocketAddr`s.
//!
//! Wire protocol of [`echo_server`]: the first byte of a connection picks the mode.
//! - `R` + u32 (big-endian) size N (0 → [`DEFAULT_PAYLOAD`]): read N bytes, write N
//!   bytes, repeat until EOF (keep-alive request/response).
//! - `C` + u32 size N: one such exchange, then the *server* closes, so the client side
//!   keeps no TIME_WAIT and a connection-rate run does not exhaust ephemeral ports.
//! - `S`: sink; read and discard until EOF, then reply with the byte count (u64 BE).
//! - `E`: plain echo until EOF.
//! - anything else: HTTP/1.1 keep-alive (so fortio and L7 waypoints work too).
//!
//! Network namespaces are per thread: a socket belongs to the netns of the thread that
//! created it. The [`blocking`] functions run a current-thread runtime on the calling
//! thread (and, for `threads > 1`, on threads it spawns, which inherit its netns), so call
//! them from a thread inside the right netns. The async functions create sockets on
//! whatever thread polls them: use them only on a runtime whose threads are all in the
//! right netns.

pub mod blocking;
mod conn;
mod fortio;
mod server;
#[cfg(test)]
mod tests;
mod timer;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use conn::Conn;
pub use fortio::{Bucket, FortioResult, Histogram, Percentile, DEFAULT_PERCENTILES};
pub use server::{echo_server, EchoServer};

/// Request and response size used by Istio's perf method (1 KiB).
pub const DEFAULT_PAYLOAD: usize = 1024;
/// Largest payload the server accepts (guards against garbage size fields).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Write size of the throughput test (iperf-like).
pub const THROUGHPUT_CHUNK: usize = 64 * 1024;

/// Which request/response protocol the latency generators speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// The `R` framing: fixed-size raw TCP request/response (L4 path, no parsing cost).
    #[default]
    Framed,
    /// HTTP/1.1 `POST` with a payload-sized body (what fortio does; needed through an L7
    /// waypoint).
    Http,
}

/// When, within each `connections / qps` interval, the connections send (fortio's three
/// schedules; Istio's perf configs use `-uniform` for latency and `-jitter` for CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pacing {
    /// fortio `-uniform`: connection i starts i/c of an interval late, so requests arrive
    /// evenly spread and every one finds the proxies idle (the harshest case for CPU per
    /// request, the fairest for latency).
    #[default]
    Uniform,
    /// fortio's default: every connection follows the same schedule, so each interval's
    /// requests leave together.
    Aligned,
    /// fortio `-jitter`: the aligned schedule with each sleep moved by up to ±10%
    /// (Istio's `cpu_mem` runs).
    Jitter,
    /// Not a fortio mode: each connection's gaps drawn from an exponential distribution
    /// with the interval as mean, so the arrivals over all connections are close to a
    /// Poisson process (many independent clients).
    Poisson,
}

/// Everything that defines a fortio-style request/response run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Target.
    pub addr: SocketAddr,
    /// Keep-alive connections, each a closed loop (fortio `-c`).
    pub connections: usize,
    /// Total requests per second over all connections; `None` = as fast as possible.
    pub qps: Option<f64>,
    /// How long to send after warm-up.
    pub duration: Duration,
    /// Request and response size in bytes.
    pub payload: usize,
    /// Wire protocol.
    pub protocol: Protocol,
    /// Copied into the result's `Labels`.
    pub labels: String,
    /// OS threads (each with its own current-thread runtime) for [`blocking::run_load`];
    /// connections are spread over them. The async [`run_load`] ignores it.
    pub threads: usize,
    /// Schedule of a paced run (ignored at max rate).
    pub pacing: Pacing,
}

impl LoadSpec {
    /// fortio's usual set-up: 16 connections, 1000 qps, 1 KiB, framed, one thread.
    pub fn new(addr: SocketAddr, duration: Duration) -> Self {
        LoadSpec {
            addr,
            connections: 16,
            qps: Some(1000.0),
            duration,
            payload: DEFAULT_PAYLOAD,
            protocol: Protocol::Framed,
            labels: String::new(),
            threads: 1,
            pacing: Pacing::Uniform,
        }
    }
}

/// Whether a `fortio` executable is on `PATH`; the benches prefer it when present.
pub fn fortio_available() -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join("fortio"))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Single-stream throughput in bytes per second *delivered to the server*: 64 KiB writes
/// for `duration`, half-close, then wait for the server's byte count.
pub async fn throughput(addr: SocketAddr, duration: Duration) -> io::Result<f64> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"S").await?;
    let chunk = vec![0x5a_u8; THROUGHPUT_CHUNK];
    let start = Instant::now();
    while start.elapsed() < duration {
        stream.write_all(&chunk).await?;
    }
    stream.shutdown().await?;
    let delivered = stream.read_u64().await?;
    Ok(delivered as f64 / start.elapsed().as_secs_f64())
}

/// Fixed-rate latency run (fortio `-c connections -qps qps`), framed protocol.
pub async fn latency(
    addr: SocketAddr,
    connections: usize,
    qps: f64,
    duration: Duration,
    payload: usize,
) -> io::Result<FortioResult> {
    let spec = LoadSpec { connections, qps: Some(qps), payload, ..LoadSpec::new(addr, duration) };
    run_load(&spec).await
}

/// Maximum keep-alive request rate (fortio `-qps 0`), 1 KiB framed requests.
pub async fn max_rate(addr: SocketAddr, connections: usize, duration: Duration) -> io::Result<FortioResult> {
    let spec = LoadSpec { connections, qps: None, ..LoadSpec::new(addr, duration) };
    run_load(&spec).await
}

/// New connections per second: each connection carries one 1 KiB framed request and
/// response; `concurrency` loops run in parallel.
pub async fn connection_rate(addr: SocketAddr, duration: Duration, concurrency: usize) -> io::Result<f64> {
    connection_rate_with(addr, duration, concurrency, Protocol::Framed).await
}

/// [`connection_rate`] with a choice of protocol (HTTP sends `Connection: close`). Fails
/// if any connection failed, since a benchmark must not hide errors.
pub async fn connection_rate_with(
    addr: SocketAddr,
    duration: Duration,
    concurrency: usize,
    protocol: Protocol,
) -> io::Result<f64> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        set.spawn(async move {
            let (mut ok, mut errs, mut first_err) = (0u64, 0u64, None);
            while Instant::now() < deadline {
                match one_shot(addr, protocol).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errs += 1;
                        first_err.get_or_insert(e);
                    }
                }
            }
            (ok, errs, first_err)
        });
    }
    let (mut ok, mut errs, mut first_err) = (0u64, 0u64, None);
    while let Some(r) = set.join_next().await {
        let (o, e, f) = r.map_err(io::Error::other)?;
        ok += o;
        errs += e;
        first_err = first_err.or(f);
    }
    if let Some(e) = first_err {
        return Err(io::Error::new(e.kind(), format!("{errs} of {} connections failed; first: {e}", ok + errs)));
    }
    Ok(ok as f64 / start.elapsed().as_secs_f64())
}

async fn one_shot(addr: SocketAddr, protocol: Protocol) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(DEFAULT_PAYLOAD + 64);
    match protocol {
        Protocol::Framed => {
            buf.push(b'C');
            buf.extend_from_slice(&(DEFAULT_PAYLOAD as u32).to_be_bytes());
            buf.resize(buf.len() + DEFAULT_PAYLOAD, b'q');
            stream.write_all(&buf).await?;
            let mut resp = vec![0u8; DEFAULT_PAYLOAD];
            stream.read_exact(&mut resp).await?;
        }
        Protocol::Http => {
            let mut conn = Conn::new(stream, addr, Protocol::Http, DEFAULT_PAYLOAD, true);
            conn.request().await?;
            stream = conn.rd.into_inner();
        }
    }
    // Wait for the server's FIN so it, not us, ends up in TIME_WAIT.
    let mut rest = [0u8; 64];
    while stream.read(&mut rest).await? != 0 {}
    Ok(())
}

/// A fortio-style run: connect and warm up every connection (one untimed request each),
/// then run each connection as a closed loop paced at `qps / connections`.
pub async fn run_load(spec: &LoadSpec) -> io::Result<FortioResult> {
    let wall = SystemTime::now();
    let raw = drive(spec, spec.connections, spec.qps).await?;
    Ok(finish(spec, wall, vec![raw]))
}

/// What one runtime measured; merged across threads by [`finish`].
struct Raw {
    samples: Vec<u64>,
    codes: BTreeMap<String, u64>,
    sockets: u64,
    elapsed: Duration,
}

async fn drive(spec: &LoadSpec, connections: usize, qps: Option<f64>) -> io::Result<Raw> {
    let connections = connections.max(1);
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = TcpStream::connect(spec.addr).await?;
        let mut conn = Conn::new(stream, spec.addr, spec.protocol, spec.payload, false);
        conn.start().await?;
        conn.request().await?; // warm-up, untimed (fortio does the same)
        conns.push(conn);
    }
    let interval = qps.filter(|q| *q > 0.0).map(|q| Duration::from_secs_f64(connections as f64 / q));
    let start = Instant::now();
    let end = start + spec.duration;
    let mut set = JoinSet::new();
    let pacing = spec.pacing;
    let run_seed = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let offset = match pacing {
            Pacing::Uniform => interval.map(|iv| iv.mul_f64(i as f64 / connections as f64)).unwrap_or_default(),
            Pacing::Aligned | Pacing::Jitter | Pacing::Poisson => Duration::ZERO,
        };
        // A per-connection xorshift for the jitter and Poisson gaps, seeded afresh each run
        // so rounds are independent samples.
        let mut seed = (run_seed ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9)) | 1;
        let timer = timer::PreciseTimer::new()?;
        set.spawn(async move {
            let mut raw = Raw { samples: Vec::new(), codes: BTreeMap::new(), sockets: 1, elapsed: Duration::ZERO };
            let mut k: u32 = 0;
            let mut poisson_due = start;
            loop {
                if let Some(iv) = interval {
                    let mut due = start + offset + iv * k;
                    if pacing == Pacing::Poisson {
                        poisson_due += iv.mul_f64(-(1.0 - unit(&mut seed)).ln());
                        due = poisson_due;
                    }
                    if due >= end {
                        break;
                    }
                    if pacing == Pacing::Jitter {
                        due = jittered(due, &mut seed);
                    }
                    if timer.sleep_until(due).await.is_err() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                k += 1;
                match conn.request().await {
                    Ok(code) => {
                        raw.samples.push(t0.elapsed().as_nanos() as u64);
                        *raw.codes.entry(code).or_default() += 1;
                        if conn.must_reconnect && reconnect(&mut conn, &mut raw).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    Err(_) => {
                        *raw.codes.entry("-1".into()).or_default() += 1;
                        if reconnect(&mut conn, &mut raw).await.is_err() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            raw
        });
    }
    let mut total = Raw { samples: Vec::new(), codes: BTreeMap::new(), sockets: 0, elapsed: Duration::ZERO };
    while let Some(r) = set.join_next().await {
        let r = r.map_err(io::Error::other)?;
        total.samples.extend(r.samples);
        total.sockets += r.sockets;
        for (c, n) in r.codes {
            *total.codes.entry(c).or_default() += n;
        }
    }
    // A paced run lasts the whole requested duration even if its last request ended early.
    total.elapsed = start.elapsed().max(spec.duration);
    Ok(total)
}

/// fortio's `-jitter`: the sleep until `due` lengthened or shortened by a uniform ±10%.
fn jittered(due: Instant, seed: &mut u64) -> Instant {
    let now = Instant::now();
    let sleep = due.saturating_duration_since(now);
    now + sleep.mul_f64(0.9 + 0.2 * unit(seed))
}

/// A uniform draw from [0, 1) (xorshift64).
fn unit(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 11) as f64 / (1u64 << 53) as f64
}

async fn reconnect(conn: &mut Conn, raw: &mut Raw) -> io::Result<()> {
    let stream = TcpStream::connect(conn.addr).await?;
    raw.sockets += 1;
    *conn = Conn::new(stream, conn.addr, conn.protocol, conn.payload, false);
    conn.start().await
}

fn finish(spec: &LoadSpec, wall: SystemTime, raws: Vec<Raw>) -> FortioResult {
    let mut samples = Vec::new();
    let mut codes = BTreeMap::new();
    let (mut sockets, mut elapsed) = (0, Duration::ZERO);
    for r in raws {
        samples.extend(r.samples);
        sockets += r.sockets;
        elapsed = elapsed.max(r.elapsed);
        for (c, n) in r.codes {
            *codes.entry(c).or_default() += n;
        }
    }
    let done: u64 = codes.values().sum();
    let (run_type, url) = match spec.protocol {
        Protocol::Framed => ("TCP", format!("tcp://{}", spec.addr)),
        Protocol::Http => ("HTTP", format!("http://{}/", spec.addr)),
    };
    FortioResult {
        run_type: run_type.into(),
        labels: spec.labels.clone(),
        start_time: fortio::rfc3339(wall),
        requested_qps: spec.qps.filter(|q| *q > 0.0).map_or("max".into(), |q| format!("{q}")),
        requested_duration: fortio::go_duration(spec.duration),
        actual_qps: done as f64 / elapsed.as_secs_f64().max(1e-9),
        actual_duration: elapsed.as_nanos() as u64,
        num_threads: spec.connections.max(1) as u64,
        version: concat!("mesh-tests-loadgen ", env!("CARGO_PKG_VERSION")).into(),
        duration_histogram: Histogram::from_nanos(&mut samples, DEFAULT_PERCENTILES),
        ret_codes: codes,
        url,
        socket_count: sockets,
    }
}
