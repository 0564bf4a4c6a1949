//! Each generator against the server on 127.0.0.1 for about half a second.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, UNIX_EPOCH};

use super::*;

const RUN: Duration = Duration::from_millis(500);

fn server() -> EchoServer {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    EchoServer::spawn(listener).unwrap()
}

fn assert_sane(r: &FortioResult, code: &str) {
    let h = &r.duration_histogram;
    assert!(h.count > 0, "no samples: {r:?}");
    assert_eq!(r.ret_codes.get(code).copied(), Some(h.count), "codes {:?}", r.ret_codes);
    assert_eq!(r.errors(), 0);
    assert!(r.actual_qps > 0.0);
    assert!(h.min > 0.0 && h.min <= h.avg && h.avg <= h.max, "{h:?}");
    let values: Vec<f64> = h.percentiles.iter().map(|p| p.value).collect();
    assert_eq!(values.len(), DEFAULT_PERCENTILES.len());
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "percentiles not ordered: {values:?}");
    assert!(h.min <= values[0] && values[values.len() - 1] <= h.max);
    assert_eq!(h.data.iter().map(|b| b.count).sum::<u64>(), h.count);
    assert!((h.data.last().unwrap().percent - 100.0).abs() < 1e-9);

    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    for key in ["ActualQPS", "RequestedQPS", "NumThreads", "RetCodes", "DurationHistogram", "StartTime"] {
        assert!(json.get(key).is_some(), "JSON lacks {key}");
    }
    let dh = &json["DurationHistogram"];
    for key in ["Count", "Avg", "Min", "Max", "Percentiles"] {
        assert!(dh.get(key).is_some(), "JSON DurationHistogram lacks {key}");
    }
    assert_eq!(dh["Percentiles"][0]["Percentile"], 50.0);
    assert!(dh["Percentiles"][0]["Value"].as_f64().unwrap() > 0.0);
    let back = FortioResult::from_json(&r.to_json()).unwrap();
    assert_eq!(
        (back.duration_histogram.count, &back.ret_codes, &back.requested_qps),
        (h.count, &r.ret_codes, &r.requested_qps)
    );
    assert!((back.actual_qps - r.actual_qps).abs() < 1e-6 * r.actual_qps);
}

#[test]
fn throughput_counts_delivered_bytes() {
    let s = server();
    let bps = blocking::throughput(s.addr, RUN).unwrap();
    assert!(bps > 1e6, "loopback throughput only {bps} B/s");
}

#[test]
fn latency_is_paced_and_well_formed() {
    let s = server();
    let r = blocking::latency(s.addr, 4, 200.0, RUN, DEFAULT_PAYLOAD).unwrap();
    assert_sane(&r, "OK");
    // 200 qps for 0.5 s is ~100 requests; allow slack for a busy machine.
    assert!((60..=110).contains(&r.duration_histogram.count), "count {}", r.duration_histogram.count);
    assert_eq!(r.requested_qps, "200");
    assert_eq!(r.num_threads, 4);
    assert_eq!(r.socket_count, 4);
    assert_eq!(r.run_type, "TCP");
}

#[test]
fn max_rate_runs_unpaced_over_keepalive() {
    let s = server();
    let r = blocking::max_rate(s.addr, 4, RUN).unwrap();
    assert_sane(&r, "OK");
    assert!(r.duration_histogram.count > 200, "only {} requests", r.duration_histogram.count);
    assert_eq!(r.requested_qps, "max");
    assert_eq!(r.socket_count, 4, "keep-alive must not reconnect");
}

#[test]
fn connection_rate_opens_new_connections() {
    let s = server();
    let cps = blocking::connection_rate(s.addr, RUN, 4).unwrap();
    assert!(cps > 50.0, "only {cps} connections/s");
    let cps = blocking::connection_rate_with(s.addr, RUN, 2, Protocol::Http).unwrap();
    assert!(cps > 50.0, "only {cps} HTTP connections/s");
}

#[test]
fn http_load_and_threads() {
    let s = server();
    let spec = LoadSpec {
        connections: 4,
        qps: None,
        protocol: Protocol::Http,
        threads: 2,
        labels: "http test".into(),
        ..LoadSpec::new(s.addr, RUN)
    };
    let r = blocking::run_load(&spec).unwrap();
    assert_sane(&r, "200");
    assert_eq!((r.run_type.as_str(), r.labels.as_str(), r.socket_count), ("HTTP", "http test", 4));
}

#[tokio::test]
async fn async_api_on_a_runtime() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(echo_server(listener));
    let r = latency(addr, 2, 100.0, Duration::from_millis(300), 64).await.unwrap_or_else(|e| panic!("{e}"));
    assert_sane(&r, "OK");
}

#[test]
fn echo_and_http_modes_speak_the_documented_protocol() {
    let s = server();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"Ehello").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"R\0\0\0\x03abc").unwrap();
    let mut buf = [0u8; 3];
    c.read_exact(&mut buf).unwrap();

    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"GET /?size=10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nxxxxxxxxxx"), "{resp}");
}

#[test]
fn parses_real_fortio_json() {
    let json = r#"{"RunType":"HTTP","Labels":"x","StartTime":"2024-01-02T03:04:05.6Z",
      "RequestedQPS":"1000","RequestedDuration":"10s","ActualQPS":999.5,"ActualDuration":10000412345,
      "NumThreads":16,"Version":"1.63.0","Exactly":0,"Jitter":false,"RunID":0,
      "DurationHistogram":{"Count":9995,"Min":0.0001,"Max":0.01,"Sum":5.0,"Avg":0.0005,"StdDev":0.0001,
        "Data":[{"Start":0.0001,"End":0.01,"Percent":100,"Count":9995}],
        "Percentiles":[{"Percentile":50,"Value":0.00045},{"Percentile":99,"Value":0.002}]},
      "ErrorsDurationHistogram":{"Count":0,"Avg":0},
      "RetCodes":{"200":9995},"Sizes":{"Count":9995},"URL":"http://10.0.0.2:8080/","SocketCount":16}"#;
    let r = FortioResult::from_json(json).unwrap();
    assert_eq!(r.requested_qps, "1000");
    assert_eq!(r.percentile(99.0), Some(0.002));
    assert_eq!(r.ret_codes["200"], 9995);
    let numeric =
        FortioResult::from_json(r#"{"RequestedQPS":1000,"ActualQPS":1,"DurationHistogram":{"Count":0,"Avg":0}}"#);
    assert_eq!(numeric.unwrap().requested_qps, "1000");
}

#[test]
fn histogram_uses_nearest_rank() {
    let mut ns: Vec<u64> = (1..=1000).rev().collect();
    let h = Histogram::from_nanos(&mut ns, DEFAULT_PERCENTILES);
    let got: Vec<f64> = h.percentiles.iter().map(|p| (p.value * 1e9).round()).collect();
    assert_eq!(got, vec![500.0, 750.0, 900.0, 990.0, 999.0]);
    assert_eq!((h.count, h.min, h.max), (1000, 1e-9, 1e-6));
    assert_eq!(Histogram::from_nanos(&mut [], DEFAULT_PERCENTILES).count, 0);
}

#[test]
fn formats_times_like_go() {
    assert_eq!(fortio::rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    assert_eq!(fortio::rfc3339(UNIX_EPOCH + Duration::from_millis(1_709_210_096_123)), "2024-02-29T12:34:56.123Z");
    assert_eq!(fortio::go_duration(Duration::from_secs(10)), "10s");
    assert_eq!(fortio::go_duration(Duration::from_millis(500)), "500ms");
    let _ = fortio_available(); // must not panic whatever PATH holds
    let _: SocketAddr = "127.0.0.1:1".parse().unwrap();
}

/// A framed server that records when each request arrived, per connection.
fn arrival_recorder(payload: usize) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Vec<std::time::Instant>>>>) {
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Arc<Mutex<Vec<Vec<std::time::Instant>>>> = Arc::default();
    let shared = log.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let log = shared.clone();
            let slot = {
                let mut l = log.lock().unwrap();
                l.push(Vec::new());
                l.len() - 1
            };
            std::thread::spawn(move || {
                let mut hdr = [0u8; 5];
                s.read_exact(&mut hdr)?;
                let mut buf = vec![0u8; payload];
                loop {
                    s.read_exact(&mut buf)?;
                    log.lock().unwrap()[slot].push(std::time::Instant::now());
                    s.write_all(&buf)?;
                }
                #[allow(unreachable_code)]
                std::io::Result::Ok(())
            });
        }
    });
    (addr, log)
}

/// For each timed round (the warm-up request excluded), how far apart in ms the
/// connections' k-th requests arrived: the spread of one round of the schedule.
fn round_spreads(pacing: Pacing) -> Vec<f64> {
    let (addr, log) = arrival_recorder(16);
    let spec = LoadSpec {
        connections: 4,
        qps: Some(40.0), // 100 ms between one connection's requests
        payload: 16,
        pacing,
        ..LoadSpec::new(addr, Duration::from_millis(1000))
    };
    let r = blocking::run_load(&spec).unwrap();
    assert_eq!(r.errors(), 0);
    let log = log.lock().unwrap();
    let rounds = log.iter().map(Vec::len).min().unwrap();
    (1..rounds)
        .map(|k| {
            let times: Vec<_> = log.iter().map(|c| c[k]).collect();
            let (lo, hi) = (times.iter().min().unwrap(), times.iter().max().unwrap());
            hi.duration_since(*lo).as_secs_f64() * 1000.0
        })
        .collect()
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn uniform_pacing_spreads_the_connections_over_the_interval() {
    // Connections start 0, 25, 50 and 75 ms into each 100 ms round.
    let spread = median_of(round_spreads(Pacing::Uniform));
    assert!((60.0..90.0).contains(&spread), "spread {spread} ms, expected about 75");
}

#[test]
fn aligned_pacing_sends_each_round_together() {
    let spread = median_of(round_spreads(Pacing::Aligned));
    assert!(spread < 10.0, "spread {spread} ms, expected about 0");
}

#[test]
fn jitter_pacing_moves_each_sleep_by_at_most_a_tenth() {
    // Each sleep of about 100 ms moves by up to ±10 ms, independently per connection.
    // The range of four draws from ±10 ms is about 12 ms on average.
    let spreads = round_spreads(Pacing::Jitter);
    let spread = median_of(spreads.clone());
    assert!(spread > 3.0 && spread < 22.0, "spreads {spreads:?} ms, expected about 12");
}

#[test]
fn poisson_pacing_holds_the_rate_with_irregular_gaps() {
    let (addr, log) = arrival_recorder(16);
    let spec = LoadSpec {
        connections: 4,
        qps: Some(400.0), // mean gap 10 ms per connection
        payload: 16,
        pacing: Pacing::Poisson,
        ..LoadSpec::new(addr, Duration::from_millis(1500))
    };
    let r = blocking::run_load(&spec).unwrap();
    assert!((300.0..500.0).contains(&r.actual_qps), "{} req/s, expected about 400", r.actual_qps);
    let log = log.lock().unwrap();
    let gaps: Vec<f64> = log
        .iter()
        .flat_map(|c| c.windows(2).skip(1).map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1000.0))
        .collect();
    // Exponential gaps: about 63% under the mean, with some far above it.
    let under = gaps.iter().filter(|g| **g < 10.0).count() as f64 / gaps.len() as f64;
    assert!((0.5..0.75).contains(&under), "{under} of the gaps under the mean, expected about 0.63");
    assert!(gaps.iter().any(|g| *g > 25.0), "no gap over 2.5× the mean in {} gaps", gaps.len());
}

#[test]
fn jittered_stays_within_a_tenth_of_the_sleep() {
    let mut seed = 7u64;
    for _ in 0..1000 {
        let now = std::time::Instant::now();
        let due = now + Duration::from_millis(100);
        let d = jittered(due, &mut seed).duration_since(now).as_secs_f64() * 1000.0;
        assert!((89.9..110.1).contains(&d), "{d} ms");
    }
}

#[test]
fn poisson_pacing_is_not_bunched_into_timer_ticks() {
    // At the bench's rate, 1000 req/s over 16 connections. True Poisson arrivals have about
    // 10% of their gaps under 0.1 ms; deadlines rounded up to 1 ms ticks would put about a
    // third of the requests right behind another.
    let (addr, log) = arrival_recorder(16);
    let spec = LoadSpec {
        qps: Some(1000.0),
        payload: 16,
        pacing: Pacing::Poisson,
        ..LoadSpec::new(addr, Duration::from_millis(1500))
    };
    let r = blocking::run_load(&spec).unwrap();
    assert_eq!(r.errors(), 0);
    let log = log.lock().unwrap();
    let mut all: Vec<std::time::Instant> = log.iter().flat_map(|c| c.iter().skip(1).copied()).collect();
    all.sort();
    let gaps: Vec<f64> = all.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3).collect();
    let close = gaps.iter().filter(|g| **g < 0.1).count() as f64 / gaps.len() as f64;
    assert!(close < 0.25, "{close} of {} gaps under 0.1 ms, expected about 0.1", gaps.len());
}
