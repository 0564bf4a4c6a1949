//! The process's own vitals (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_start_time_seconds`) and `istio_build`, exposed by every ztunnel role. Istio's
//! ztunnel dashboard draws CPU, memory and versions from these; outside Kubernetes there is no
//! cAdvisor to provide them, so the process reports itself, read from `/proc` at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Reads `/proc/self` on each scrape; a read failure leaves the series out of that scrape
/// (an absent series alerts as such) rather than reporting a made-up zero.
#[derive(Debug, Default)]
pub(super) struct ProcessCollector;

/// CPU seconds (user + system) and resident bytes of this process, from `/proc/self/stat`.
fn cpu_and_rss() -> Option<(f64, i64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After `)`: state(0) ... utime(11) stime(12) ... starttime(19) vsize(20) rss(21).
    let ticks = clock_ticks()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let start_ticks: u64 = f.get(19)?.parse().ok()?;
    let rss_pages: i64 = f.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(((utime + stime) / ticks, rss_pages * page as i64, start_ticks / ticks as u64))
}

fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (t > 0).then_some(t as f64)
}

/// Boot time in unix seconds (`btime` in `/proc/stat`), to turn the start tick into a time.
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some((cpu, rss, start)) = cpu_and_rss() {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss).encode(m)?;
            if let Some(boot) = boot_time() {
                let m = encoder.encode_descriptor(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    None,
                    MetricType::Gauge,
                )?;
                ConstGauge::new((boot + start) as i64).encode(m)?;
            }
        }
        let mut m = encoder.encode_descriptor("istio_build", "Istio component build info.", None, MetricType::Gauge)?;
        let labels = [("component", "ztunnel"), ("tag", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        Ok(())
    }
}
