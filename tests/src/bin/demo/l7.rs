//! The demo's L7 part: Istio's Bookinfo traffic-management tasks through `ztunnel waypoint`,
//! on a second standalone mesh whose namespace uses the waypoint (`deploy/demo-l7`). Each
//! task's VirtualServices are applied and shown by counting what productpage answers.
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::bookinfo::{reviews_unavailable, RATINGS_UNAVAILABLE};
use mesh_tests::bookinfo_l7::{count, BookinfoL7};
use mesh_tests::forward::PortForward;

const N: usize = 100;

fn show(label: &str, n: [usize; 4]) {
    println!("  {label:<34} v1 {:>3}  v2 {:>3}  v3 {:>3}  unavailable {:>3}", n[1], n[2], n[3], n[0]);
}

/// What `--observe` prints at the end: (what it shows, PromQL).
const OBSERVE: &[(&str, &str)] = &[
    (
        "waypoint requests per service and code, last 5 min",
        r#"sum by (destination_service_name, response_code) (increase(istio_requests_total{reporter="waypoint"}[5m]))"#,
    ),
    (
        "requests with response flags (faults, timeouts)",
        r#"sum by (destination_service_name, response_flags) (increase(istio_requests_total{reporter="waypoint",response_flags!="-"}[5m]))"#,
    ),
    (
        "p99 request duration through the waypoint (ms)",
        r#"histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{reporter="waypoint"}[5m])))"#,
    ),
    ("TCP bytes sent, per reporter", "sum by (reporter) (istio_tcp_sent_bytes_total)"),
    ("node agents ready", r#"ztunnel_ready{job="ztunnel"}"#),
    ("hours until the first workload certificate expires", "min(ztunnel:certificate_expiry:seconds) / 3600"),
    ("alerts firing", "count(ALERTS{alertstate=\"firing\"}) or vector(0)"),
];

/// Runs every task; fails when one does not show what Istio's task shows. With `observe`,
/// a real Prometheus scrapes the agents and the waypoint throughout and is queried at the end.
pub fn run(work: &Path, observe: bool) -> Result<()> {
    println!("\n== L7: Bookinfo traffic management through the waypoint (deploy/demo-l7) ==");
    let b = BookinfoL7::start(work)?;
    let prometheus = if observe {
        let p = b.prometheus(&work.join("prometheus"))?;
        let ui = PortForward::out_of(b.mesh.pod("waypoint")?, "127.0.0.1:9090".parse()?, "127.0.0.1:9090".parse()?)?;
        println!("prometheus: scraping both node agents and the waypoint every second, the chart's rules loaded");
        Some((p, ui))
    } else {
        None
    };
    println!(
        "namespace bookinfo uses waypoint `waypoint` ({}): state over xDS, certificate from the controller",
        b.mesh.pod("waypoint")?.ip4()
    );

    b.apply("01-all-v1")?;
    let n = count(&b.views(N, None)?);
    show("01 all to v1:", n);
    ensure!(n == [0, N, 0, 0], "all-v1 showed {n:?}");

    b.apply("02-jason-v2")?;
    let jason = count(&b.views(N, Some("jason"))?);
    let others = count(&b.views(N, None)?);
    show("02 jason to v2 (as jason):", jason);
    show("   (as anyone else):", others);
    ensure!(jason == [0, 0, N, 0] && others == [0, N, 0, 0], "jason-v2 showed {jason:?} / {others:?}");

    b.apply("03-50-50-v3")?;
    let n = count(&b.views(N, None)?);
    show("03 50% v1, 50% v3:", n);
    ensure!(n[1] + n[3] == N && (25..=75).contains(&n[3]), "50/50 showed {n:?}");

    b.apply("04-v3")?;
    let n = count(&b.views(N, None)?);
    show("04 all to v3:", n);
    ensure!(n == [0, 0, 0, N], "v3 showed {n:?}");

    b.apply("05-delay-timeout")?;
    let views = b.views(3, Some("jason"))?;
    let slowest = views.iter().map(|v| v.took).max().unwrap_or_default();
    println!(
        "  05 ratings delayed 7 s for jason, reviews timeout 0.5 s: {} of 3 views without reviews, slowest {:?}",
        views.iter().filter(|v| reviews_unavailable(&v.body)).count(),
        slowest
    );
    ensure!(views.iter().all(|v| reviews_unavailable(&v.body)), "the 0.5 s timeout did not fire");
    ensure!(slowest < Duration::from_secs(3), "productpage waited {slowest:?}: the timeout did not cut the 7 s delay");

    b.apply("06-abort-jason")?;
    let views = b.views(10, Some("jason"))?;
    let aborted = views.iter().filter(|v| v.body.contains(RATINGS_UNAVAILABLE)).count();
    println!("  06 ratings aborts 500 for jason: {aborted} of 10 views say \"{RATINGS_UNAVAILABLE}\"");
    ensure!(aborted == 10, "abort showed {aborted}/10");
    let fine = b.views(10, None)?;
    ensure!(fine.iter().all(|v| !v.body.contains(RATINGS_UNAVAILABLE)), "others were aborted too");

    b.apply("07-tcp-80-20")?;
    let (one, two) = b.tcp_echo(N)?;
    println!("  07 tcp-echo 80/20 over {N} connections: v1 {one}, v2 {two}");
    ensure!(one + two == N && (5..=40).contains(&two), "tcp 80/20 showed {one}/{two}");

    b.apply("08-mirror")?;
    let before = b.app("reviews-v2")?.received().len();
    let n = count(&b.views(20, None)?);
    std::thread::sleep(Duration::from_millis(300));
    let mirrored = b.app("reviews-v2")?.received().len() - before;
    println!("  08 mirror to v2: answers v1 {} v2 {}; reviews-v2 received {mirrored} shadow copies", n[1], n[2]);
    ensure!(n == [0, 20, 0, 0] && mirrored == 20, "mirror showed {n:?}, {mirrored} copies");

    let total = b.waypoint.metric_sum("istio_requests_total", &[("reporter", "waypoint")])?;
    println!("waypoint: istio_requests_total{{reporter=\"waypoint\"}} = {total}");
    if let Some((p, _ui)) = &prometheus {
        show_observations(p)?;
    }
    Ok(())
}

fn show_observations(p: &mesh_tests::prometheus::Prometheus) -> Result<()> {
    // Two more scrapes, so the last task's traffic is in.
    std::thread::sleep(Duration::from_secs(2));
    println!("\n== Prometheus (PromQL against the live agents and waypoint) ==");
    for (what, q) in OBSERVE {
        println!("  {what}:\n    {q}");
        let rows = p.query(q)?;
        if rows.is_empty() {
            println!("      (no data)");
        }
        for r in rows {
            let labels = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(" ")
                })
                .unwrap_or_default();
            let v: f64 = r["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
            println!("      {v:>10.2}  {labels}");
        }
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        println!("\nPrometheus UI: http://127.0.0.1:9090 (the mesh stays up); press Enter to tear down");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    Ok(())
}
