//! fortio's JSON result shape (`fortio load -json`), so runs of the built-in generator
//! and of a real fortio are read, compared and charted by the same code (DESIGN §10).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize};

/// Percentiles reported by default, as fortio's `-p "50,75,90,99,99.9"`.
pub const DEFAULT_PERCENTILES: &[f64] = &[50.0, 75.0, 90.0, 99.0, 99.9];

/// One load run in fortio's `RunnerResults` JSON shape. Deserializes real fortio output
/// too (unknown fields are ignored, missing optional ones default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FortioResult {
    /// `"TCP"` for the framed protocol, `"HTTP"` for HTTP/1.1 (fortio's run types).
    #[serde(rename = "RunType", default)]
    pub run_type: String,
    /// Free-form description of the run (fortio `-labels`).
    #[serde(rename = "Labels", default)]
    pub labels: String,
    /// RFC 3339 UTC start time.
    #[serde(rename = "StartTime", default)]
    pub start_time: String,
    /// Requested rate: a number, or `"max"` for as-fast-as-possible (a string, as fortio).
    #[serde(rename = "RequestedQPS", default, deserialize_with = "string_or_number")]
    pub requested_qps: String,
    /// Requested duration as a Go duration string, e.g. `"10s"`.
    #[serde(rename = "RequestedDuration", default)]
    pub requested_duration: String,
    /// Completed requests (successes and errors) per second of actual duration.
    #[serde(rename = "ActualQPS")]
    pub actual_qps: f64,
    /// Actual duration in nanoseconds (Go's `time.Duration`).
    #[serde(rename = "ActualDuration", default)]
    pub actual_duration: u64,
    /// Number of client connections (fortio's `-c`).
    #[serde(rename = "NumThreads", default)]
    pub num_threads: u64,
    /// Generator that produced the result.
    #[serde(rename = "Version", default)]
    pub version: String,
    /// Per-request latency distribution, in seconds.
    #[serde(rename = "DurationHistogram")]
    pub duration_histogram: Histogram,
    /// Result counts: HTTP status (`"200"`), `"OK"` for the framed protocol, `"-1"` for
    /// socket errors (fortio's code for them).
    #[serde(rename = "RetCodes", default)]
    pub ret_codes: BTreeMap<String, u64>,
    /// Target of the run (`http://addr/` or `tcp://addr`).
    #[serde(rename = "URL", default)]
    pub url: String,
    /// TCP connections opened, including reconnects after errors (1 per thread is
    /// perfect keep-alive).
    #[serde(rename = "SocketCount", default)]
    pub socket_count: u64,
}

/// fortio's `HistogramData`: summary statistics, buckets and percentiles, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Number of samples (successful requests).
    #[serde(rename = "Count")]
    pub count: u64,
    /// Fastest request.
    #[serde(rename = "Min", default)]
    pub min: f64,
    /// Slowest request.
    #[serde(rename = "Max", default)]
    pub max: f64,
    /// Sum of all durations.
    #[serde(rename = "Sum", default)]
    pub sum: f64,
    /// Mean duration.
    #[serde(rename = "Avg")]
    pub avg: f64,
    /// Standard deviation of durations.
    #[serde(rename = "StdDev", default)]
    pub std_dev: f64,
    /// Histogram buckets, for charts.
    #[serde(rename = "Data", default)]
    pub data: Vec<Bucket>,
    /// Requested percentiles.
    #[serde(rename = "Percentiles", default)]
    pub percentiles: Vec<Percentile>,
}

/// One histogram bucket: `[start, end)` seconds, `count` samples, `percent` cumulative.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Bucket lower bound (seconds).
    #[serde(rename = "Start")]
    pub start: f64,
    /// Bucket upper bound (seconds).
    #[serde(rename = "End")]
    pub end: f64,
    /// Cumulative percentage of samples up to `end`.
    #[serde(rename = "Percent")]
    pub percent: f64,
    /// Samples in this bucket.
    #[serde(rename = "Count")]
    pub count: u64,
}

/// One percentile: `percentile` (e.g. 99.9) → `value` (seconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentile {
    /// Which percentile, 0–100.
    #[serde(rename = "Percentile")]
    pub percentile: f64,
    /// Duration at that percentile, in seconds.
    #[serde(rename = "Value")]
    pub value: f64,
}

impl FortioResult {
    /// The value (seconds) of percentile `p` (e.g. 99.0), if it was computed.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        self.duration_histogram.percentiles.iter().find(|x| (x.percentile - p).abs() < 1e-9).map(|x| x.value)
    }

    /// Requests that failed at the socket level (fortio's `-1` code).
    pub fn errors(&self) -> u64 {
        self.ret_codes.get("-1").copied().unwrap_or(0)
    }

    /// Pretty JSON, as `fortio load -json` writes it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("FortioResult always serializes")
    }

    /// Parses the JSON of a real fortio run or of ours.
    pub fn from_json(s: &str) -> serde_json::Result<Self> {
        serde_json::from_str(s)
    }
}

impl Histogram {
    /// Builds the histogram from per-request durations in nanoseconds (sorts them).
    pub fn from_nanos(samples: &mut [u64], percentiles: &[f64]) -> Self {
        samples.sort_unstable();
        let n = samples.len();
        if n == 0 {
            return Histogram::default();
        }
        let secs = |ns: u64| ns as f64 / 1e9;
        let sum: f64 = samples.iter().map(|&x| secs(x)).sum();
        let avg = sum / n as f64;
        let var = samples.iter().map(|&x| (secs(x) - avg).powi(2)).sum::<f64>() / n as f64;
        let (min, max) = (secs(samples[0]), secs(samples[n - 1]));
        let percentiles = percentiles
            .iter()
            .map(|&p| {
                // Nearest rank: the smallest sample with at least p% of samples at or below it.
                // (less a hair, so 99.9% of 1000 is rank 999 despite float rounding).
                let rank = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
                Percentile { percentile: p, value: secs(samples[rank.clamp(1, n) - 1]) }
            })
            .collect();
        Histogram { count: n as u64, min, max, sum, avg, std_dev: var.sqrt(), data: buckets(samples), percentiles }
    }
}

/// Up to 20 equal-width buckets between min and max (fortio charts need some `Data`).
fn buckets(sorted: &[u64]) -> Vec<Bucket> {
    const N: u64 = 20;
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    let width = ((hi - lo) / N).max(1);
    let mut out: Vec<Bucket> = Vec::new();
    let mut i = 0;
    let mut start = lo;
    while i < sorted.len() {
        let end = if start + width > hi { hi + 1 } else { start + width };
        let first = i;
        while i < sorted.len() && sorted[i] < end {
            i += 1;
        }
        if i > first {
            out.push(Bucket {
                start: start as f64 / 1e9,
                end: end as f64 / 1e9,
                percent: 100.0 * i as f64 / sorted.len() as f64,
                count: (i - first) as u64,
            });
        }
        start = end;
    }
    out
}

/// RFC 3339 UTC timestamp (`2024-05-01T12:34:56.789Z`), as the waypoint's access log writes it.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    ztunnel::waypoint::access_log::rfc3339_millis(t)
}

/// Go duration string for whole or fractional seconds (`"10s"`, `"500ms"`).
pub(crate) fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// fortio writes `RequestedQPS` as a string; other tools write a number. Accept both.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    })
}
