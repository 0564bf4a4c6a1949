//! What every bench scenario shares: one measured sample (throughput, latency percentiles,
//! max rate, connection rate and the proxies' CPU for them), medians across rounds, the echo
//! server the clients talk to, and a process's CPU and memory from `/proc`.
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agent_process::Usage;
use crate::loadgen::{blocking, EchoServer, FortioResult, LoadSpec, Pacing};
use crate::{InNetns, Pod};

/// The port every bench server listens on.
pub const PORT: u16 = 9000;

/// One scenario in one round.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sample {
    pub throughput_mbps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_qps: f64,
    /// Max keep-alive rate over 64 connections.
    pub max_qps_c64: f64,
    pub conns_per_sec: f64,
    /// HTTP requests each on its own connection (`Connection: close`), 8 at a time.
    pub churn_per_sec: f64,
    /// Proxy CPU seconds per 1000 requests during the max-rate run (mesh only).
    pub cpu_s_per_1k: f64,
    /// Proxy cores used while the latency run holds 1000 req/s (mesh only): Istio publishes
    /// its proxies' CPU at this load, so this row sets our numbers beside theirs.
    pub cores_at_1000qps: f64,
    /// The same with fortio `-jitter` pacing (the schedule of most of Istio's perf harness's
    /// CPU runs), where each round's requests leave within a tenth of an interval of each
    /// other instead of evenly spread.
    pub cores_at_1000qps_jitter: f64,
    /// Proxy CPU seconds per GB during the throughput run (mesh only).
    pub cpu_s_per_gb: f64,
}

/// Measures `client` → `dst` for `secs` per measurement: one-stream throughput, latency at
/// 1000 qps over 16 connections with 1 KiB payloads, max keep-alive rate over 16 and over 64
/// connections, new connections per second over 8, and HTTP connection churn (a connection
/// per request, `Connection: close`) over 8; `cpu` reads the CPU seconds used so far
/// by the proxies that carry this traffic (none for the baseline).
pub fn measure(client: &Pod, dst: SocketAddr, secs: f64, cpu: Option<&dyn Fn() -> CpuSnapshot>) -> Result<Sample> {
    let d = Duration::from_secs_f64(secs);
    let now = || cpu.map(|f| f()).unwrap_or_default();
    let cpu0 = now();
    let tput = client.run(move || blocking::throughput(dst, d)).context("throughput")?;
    let tput_cpu = now().since(&cpu0);
    let lat_cpu0 = now();
    let lat = client.run(move || blocking::latency(dst, 16, 1000.0, d, 1024)).context("latency")?;
    let lat_cpu = now().since(&lat_cpu0);
    let jitter_cores = match cpu {
        Some(cpu) => {
            let spec = LoadSpec { payload: 1024, pacing: Pacing::Jitter, ..LoadSpec::new(dst, d) };
            paced_cores(client, spec, cpu)?.1
        }
        None => 0.0,
    };
    let cpu_before = now();
    let max = client.run(move || blocking::max_rate(dst, 16, d)).context("max rate")?;
    let cpu_after = now();
    let conns = client.run(move || blocking::connection_rate(dst, d, 8)).context("connection rate")?;
    let c64 = client.run(move || blocking::max_rate(dst, 64, d)).context("max rate c64")?;
    let churn = client
        .run(move || blocking::connection_rate_with(dst, d, 8, crate::loadgen::Protocol::Http))
        .context("connection churn")?;
    let reqs = max.duration_histogram.count as f64;
    let ms = |p: f64| lat.percentile(p).unwrap_or(f64::NAN) * 1000.0;
    Ok(Sample {
        throughput_mbps: tput * 8.0 / 1e6,
        p50_ms: ms(50.0),
        p90_ms: ms(90.0),
        p99_ms: ms(99.0),
        max_qps: max.actual_qps,
        max_qps_c64: c64.actual_qps,
        conns_per_sec: conns,
        churn_per_sec: churn,
        cpu_s_per_1k: if cpu.is_none() || reqs == 0.0 { 0.0 } else { cpu_after.since(&cpu_before) / reqs * 1000.0 },
        cpu_s_per_gb: if cpu.is_none() { 0.0 } else { tput_cpu / (tput * secs / 1e9) },
        // Per 1000 req/s actually delivered, as the waypoint bench reads it.
        cores_at_1000qps: cores_per_1000(lat_cpu, secs, lat.actual_qps),
        cores_at_1000qps_jitter: jitter_cores,
    })
}

/// Runs the paced `spec` from `client`, which must see no errors, and returns its result with
/// the cores the processes behind `cpu` used per 1000 req/s delivered.
pub fn paced_cores(client: &Pod, spec: LoadSpec, cpu: &dyn Fn() -> CpuSnapshot) -> Result<(FortioResult, f64)> {
    let (dst, pacing, secs) = (spec.addr, spec.pacing, spec.duration.as_secs_f64());
    let c0 = cpu();
    let r = client.run(move || blocking::run_load(&spec)).with_context(|| format!("paced run, {pacing:?}"))?;
    anyhow::ensure!(r.errors() == 0, "{dst}: errors in the paced run ({pacing:?})");
    let cores = cores_per_1000(cpu().since(&c0), secs, r.actual_qps);
    Ok((r, cores))
}

/// CPU seconds over a run of `secs` as cores per 1000 req/s at the rate the run delivered.
fn cores_per_1000(cpu_s: f64, secs: f64, qps: f64) -> f64 {
    cpu_s / secs * 1000.0 / qps.max(1.0)
}

/// The median (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// An echo server on [`PORT`] inside `pod`.
pub fn start_server(pod: &Pod) -> Result<EchoServer> {
    let l = pod.run(|| TcpListener::bind(("::", PORT)))?;
    Ok(EchoServer::spawn(l)?)
}

/// CPU seconds used so far and resident memory of process `pid`.
pub fn process_usage(pid: u32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Usage { cpu_seconds: ticks / hz, rss_bytes: rss_kb * 1024 })
}

/// CPU time of a set of processes, per thread in nanoseconds (`/proc/<pid>/task/*/schedstat`)
/// and per process in clock ticks (`/proc/<pid>/stat`). Ticks are 10 ms, 0.005 cores over a
/// 2 s run, too coarse for a target of 0.1 cores; the per-thread counters are exact but lose
/// a thread that ends between two readings, so [`CpuSnapshot::since`] checks one against the
/// other.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    threads: HashMap<(u32, u32), u64>,
    ticks_s: f64,
}

/// Reads [`CpuSnapshot`] for `pids` (a process that cannot be read counts as none).
pub fn cpu_snapshot(pids: &[u32]) -> CpuSnapshot {
    let mut snap = CpuSnapshot::default();
    for &pid in pids {
        snap.ticks_s += process_usage(pid).map(|u| u.cpu_seconds).unwrap_or(0.0);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let ns = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()));
            if let Some(ns) = ns {
                snap.threads.insert((pid, tid), ns);
            }
        }
    }
    snap
}

impl CpuSnapshot {
    /// CPU seconds used between `earlier` and this reading: the threads' nanoseconds, unless
    /// the tick count shows more than two ticks' worth beyond them (a thread ended in
    /// between and took its time with it), then the tick count.
    pub fn since(&self, earlier: &CpuSnapshot) -> f64 {
        let ns: u64 =
            self.threads.iter().map(|(k, now)| now.saturating_sub(earlier.threads.get(k).copied().unwrap_or(0))).sum();
        let exact = ns as f64 / 1e9;
        let ticks = self.ticks_s - earlier.ticks_s;
        if ticks > exact + 0.02 {
            ticks
        } else {
            exact
        }
    }
}

/// One bar group of a chart: a row's label and its values (one per series).
pub struct BarGroup {
    pub label: String,
    pub values: Vec<f64>,
}

/// A grouped bar chart as SVG: `series` names the bars of each group (legend), `unit` the
/// y axis. Plain SVG, so the bench needs no plotting dependency.
pub fn svg_bar_chart(title: &str, unit: &str, series: &[&str], groups: &[BarGroup], x: f64, y: f64) -> String {
    const W: f64 = 560.0;
    const H: f64 = 260.0;
    const COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2"];
    let max = groups.iter().flat_map(|g| g.values.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let max = if max > 0.0 { max * 1.15 } else { 1.0 };
    let (left, bottom, top) = (x + 60.0, y + H - 60.0, y + 30.0);
    let plot_h = bottom - top;
    let group_w = (W - 80.0) / groups.len().max(1) as f64;
    let bar_w = (group_w - 16.0) / series.len().max(1) as f64;
    let mut out = format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        x + 10.0,
        y + 18.0,
        escape(title)
    );
    out += &format!(
        "<line x1=\"{left}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"#333\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"#333\"/>\n",
        x + W - 10.0
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let yy = bottom - plot_h * i as f64 / 4.0;
        out += &format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{v:.2}</text><line x1=\"{left}\" y1=\"{yy}\" x2=\"{}\" y2=\"{yy}\" stroke=\"#ddd\"/>\n",
            left - 4.0,
            yy + 3.0,
            x + W - 10.0
        );
    }
    out += &format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"10\" transform=\"rotate(-90 {} {})\">{}</text>\n",
        x + 12.0,
        (top + bottom) / 2.0,
        x + 12.0,
        (top + bottom) / 2.0,
        escape(unit)
    );
    for (gi, g) in groups.iter().enumerate() {
        let gx = left + 8.0 + gi as f64 * group_w;
        for (si, v) in g.values.iter().enumerate() {
            let v = if v.is_finite() { *v } else { 0.0 };
            let h = plot_h * v / max;
            out += &format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {}: {v:.3}</title></rect>\n",
                gx + si as f64 * bar_w,
                bottom - h,
                bar_w - 2.0,
                COLORS[si % COLORS.len()],
                escape(&g.label),
                escape(series.get(si).copied().unwrap_or("")),
            );
        }
        out += &format!(
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>\n",
            gx + (group_w - 16.0) / 2.0,
            bottom + 14.0,
            escape(&g.label)
        );
    }
    for (si, s) in series.iter().enumerate() {
        let lx = left + si as f64 * 120.0;
        out += &format!(
            "<rect x=\"{lx}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"10\">{}</text>\n",
            bottom + 26.0,
            COLORS[si % COLORS.len()],
            lx + 14.0,
            bottom + 35.0,
            escape(s)
        );
    }
    out
}

/// Wraps chart fragments (each [`svg_bar_chart`] at its own offset) into one SVG document.
pub fn svg_document(width: f64, height: f64, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Kernel functions that say which part of a proxied request the kernel's time is spent on,
/// each with its callees (a sender's system call includes the receiver's softirq, which the
/// kernel runs in the sender's context on loopback and veth). A path sums its system calls;
/// each call is named by the alternatives a kernel build may show for it (the largest counts).
const KERNEL_PATHS: [(&str, &[&[&str]]); 7] = [
    (
        "sending (writev, write, sendto, sendmsg)",
        &[
            &["do_writev"],
            &["ksys_write"],
            &["__sys_sendto", "__x64_sys_sendto"],
            &["__sys_sendmsg", "__x64_sys_sendmsg"],
        ],
    ),
    ("  of it, the receiver's network stack", &[&["net_rx_action"]]),
    ("  of it, waking the receiver", &[&["sock_def_readable"]]),
    (
        "receiving (recvfrom, read, recvmsg)",
        &[
            &["__sys_recvfrom", "__x64_sys_recvfrom"],
            &["ksys_read"],
            &["__sys_recvmsg", "__x64_sys_recvmsg"],
            &["do_readv"],
        ],
    ),
    ("waiting in epoll_wait (and the switch back in)", &[&["do_epoll_wait"]]),
    ("context switches (finish_task_switch)", &[&["finish_task_switch.isra.0", "finish_task_switch"]]),
    ("connections (accept, connect, close)", &[&["__sys_accept4"], &["__sys_connect"], &["__x64_sys_close"]]),
];

/// The share of `data`'s samples under each of `KERNEL_PATHS`, one line each.
fn kernel_paths(data: &std::path::Path) -> Result<String> {
    let o = std::process::Command::new("perf")
        .args(["report", "-q", "--stdio", "--children", "--sort", "sym", "-g", "none", "--percent-limit", "0.05", "-i"])
        .arg(data)
        .output()?;
    let mut children: HashMap<String, f64> = HashMap::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        // "    44.00%     0.25%  [k] do_syscall_64"
        let mut f = line.split_whitespace();
        let (Some(c), Some(_), Some("[k]"), Some(sym)) = (f.next(), f.next(), f.next(), f.next()) else { continue };
        if let Ok(v) = c.trim_end_matches('%').parse::<f64>() {
            *children.entry(sym.to_string()).or_default() += v;
        }
    }
    let share = |names: &[&str]| names.iter().filter_map(|n| children.get(*n)).fold(0.0_f64, |a, b| a.max(*b));
    Ok(KERNEL_PATHS
        .iter()
        .map(|(what, calls)| format!("{:>6.1}%  {what}", calls.iter().map(|c| share(c)).fold(0.0, |a, b| a + b)))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Profiles `pids` with `perf record -g` for the 4 s that `load` runs (it should drive
/// traffic for about that long and describe what it did), and prints (and keeps in
/// `out/perf-<row>.txt`) where their CPU went: by object (kernel, binary, libc) and the top
/// symbols.
pub fn profile(row: &str, pids: &[u32], out: &std::path::Path, load: impl FnOnce() -> Result<String>) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let data = out.join(format!("perf-{row}.data"));
    let pid_list = pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    // BENCH_PERF_CALL_GRAPH=dwarf: whole stacks from binaries built without frame pointers.
    let call_graph = std::env::var("BENCH_PERF_CALL_GRAPH").unwrap_or_else(|_| "fp".into());
    // BENCH_PERF_FREQ: samples per second (499 unless set; more for a short, light run).
    let freq = std::env::var("BENCH_PERF_FREQ").unwrap_or_else(|_| "499".into());
    // BENCH_PERF_PERIOD: one sample every N events instead (`1` records every call of a probe).
    let rate = match std::env::var("BENCH_PERF_PERIOD") {
        Ok(n) => ["-c".to_string(), n],
        Err(_) => ["-F".to_string(), freq],
    };
    let mut rec = std::process::Command::new("perf")
        .args(["record", "-q", "--call-graph", &call_graph])
        .args(&rate)
        .args(["-p", &pid_list])
        // BENCH_PERF_RECORD: record this event instead of CPU time, e.g. `probe_libc:malloc`
        // (after `perf probe -x <libc> malloc`) to see who allocates.
        .args(std::env::var("BENCH_PERF_RECORD").map(|e| vec!["-e".to_string(), e]).unwrap_or_default())
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running perf (is it installed?)")?;
    // Counted beside the samples: system calls and context switches say how many wake-ups
    // and socket operations the load cost, which a sampled profile only shows as time.
    // BENCH_PERF_EVENTS: other events to count, e.g. single system calls' tracepoints.
    let events = std::env::var("BENCH_PERF_EVENTS")
        .unwrap_or_else(|_| "raw_syscalls:sys_enter,context-switches,cpu-migrations,task-clock".into());
    let stat = std::process::Command::new("perf")
        .args(["stat", "-x", ",", "-e", &events, "-p"])
        .arg(&pid_list)
        .args(["--", "sleep", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running perf stat")?;
    let load = load();
    rec.wait()?;
    let counts = stat.wait_with_output()?;
    let load = load?;
    let counts: Vec<String> = String::from_utf8_lossy(&counts.stderr)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.len() > 2 && !f[0].is_empty()).then(|| format!("{} {}", f[2], f[0]))
        })
        .collect();
    let report = |sort: &str| -> Result<String> {
        let o = std::process::Command::new("perf")
            .args([
                "report",
                "-q",
                "--stdio",
                "--no-children",
                "--percent-limit",
                "1.5",
                "--sort",
                sort,
                "-g",
                "none",
                "-i",
            ])
            .arg(&data)
            .output()?;
        if o.stdout.iter().all(u8::is_ascii_whitespace) {
            anyhow::bail!("perf report printed nothing for {row}: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(20)
            .collect::<Vec<_>>()
            .join("\n"))
    };
    let text = format!(
        "{row}: proxies {pid_list}, {load}\n-- counted over 4 s --\n{}\n-- by object --\n{}\n-- top symbols --\n{}\n-- by kernel path (share of all samples; a path's callees included) --\n{}\n",
        counts.join("\n"),
        report("dso")?,
        report("dso,sym")?,
        kernel_paths(&data)?
    );
    println!("\n{text}");
    std::fs::write(out.join(format!("perf-{row}.txt")), &text)?;
    // BENCH_KEEP_PERF=1 keeps the recording for `perf report -i` by hand.
    if std::env::var_os("BENCH_KEEP_PERF").is_none() {
        let _ = std::fs::remove_file(&data);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's own CPU time, so a busy machine cannot shorten a spin.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid timespec for the calling thread's CPU clock.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Burns `d` of this thread's CPU time.
    fn spin(d: Duration) {
        let start = thread_cpu();
        while thread_cpu() - start < d {
            std::hint::black_box(0u64);
        }
    }

    #[test]
    fn cpu_snapshot_counts_a_running_thread_below_a_tick() {
        let pid = std::process::id();
        let before = cpu_snapshot(&[pid]);
        spin(Duration::from_millis(3)); // under one 10 ms tick
        let used = cpu_snapshot(&[pid]).since(&before);
        assert!(used >= 0.0029, "{used} s counted for a 3 ms spin");
    }

    #[test]
    fn cpu_snapshot_keeps_the_time_of_a_thread_that_ended() {
        let pid = std::process::id();
        let before = cpu_snapshot(&[pid]);
        std::thread::spawn(|| spin(Duration::from_millis(150))).join().unwrap();
        let used = cpu_snapshot(&[pid]).since(&before);
        // The tick count moves in 10 ms steps: at least 140 ms of the 150 show.
        assert!(used >= 0.14, "{used} s counted for a 150 ms spin on a thread that has ended");
    }
}
