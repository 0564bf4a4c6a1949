//! The chart's observability against live data: Bookinfo on the standalone mesh (controller,
//! CNI, two node agents, the waypoint), traffic through it, and a real Prometheus scraping the
//! real agents and waypoint with the chart's rules loaded. Then Kiali's graph queries, every
//! Grafana dashboard query and the rules are run there, and the series Kiali needs are checked
//! label by label on each reporter.
use std::path::PathBuf;
use std::time::Duration;

use mesh_tests::bookinfo_l7::BookinfoL7;
use mesh_tests::mesh::{sweep_pins, RUN_DIR};
use mesh_tests::observability::{
    dashboard_queries, kiali_graph_queries, KIALI_REQUIRED_LABELS_REQUESTS, KIALI_REQUIRED_LABELS_TCP,
};
use mesh_tests::prometheus::Prometheus;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Bookinfo scraped by Prometheus, with traffic once the scrapes run (rates need two
/// samples): tcp-echo connections (TCP through the waypoint) and productpage views (HTTP),
/// then a wait until the waypoint's request series are in.
fn observed(name: &str) -> (Prometheus, BookinfoL7, PathBuf) {
    sweep_pins();
    let work = PathBuf::from(RUN_DIR).join(format!("{name}-{}", std::process::id()));
    let b = BookinfoL7::start(&work).expect("the Bookinfo L7 mesh (needs root)");
    let p = b.prometheus(&work.join("prometheus")).expect("prometheus");
    p.wait_nonempty(r#"up{job="ztunnel"} == 1"#, WAIT).unwrap();
    b.apply("07-tcp-80-20").unwrap();
    for _ in 0..3 {
        let (one, two) = b.tcp_echo(3).unwrap();
        assert_eq!(one + two, 3);
        let views = b.views(5, None).unwrap();
        assert!(views.iter().all(|v| v.status == 200), "{views:?}");
        std::thread::sleep(Duration::from_millis(1500));
    }
    p.wait_nonempty(r#"rate(istio_requests_total{reporter="waypoint"}[1m]) > 0"#, WAIT).unwrap();
    p.wait_nonempty(r#"rate(istio_tcp_sent_bytes_total{reporter="destination"}[1m]) > 0"#, WAIT).unwrap();
    (p, b, work)
}

fn label<'a>(sample: &'a Value, name: &str) -> &'a str {
    sample["metric"][name].as_str().unwrap_or("")
}

fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

#[test]
fn request_and_tcp_series_carry_every_label_kiali_needs_on_each_reporter() {
    let (p, _b, _) = observed("obs-labels");
    let requests = p.query(r#"istio_requests_total{reporter="waypoint"} > 0"#).unwrap();
    let page = requests
        .iter()
        .find(|s| label(s, "destination_service_name") == "productpage")
        .unwrap_or_else(|| panic!("no waypoint series for productpage: {requests:#?}"));
    for l in KIALI_REQUIRED_LABELS_REQUESTS {
        assert!(page["metric"].get(*l).is_some(), "istio_requests_total lacks {l}: {page}");
    }
    assert_eq!(label(page, "source_workload"), "sleep");
    assert_eq!(label(page, "source_workload_namespace"), "bookinfo");
    assert_eq!(label(page, "destination_workload"), "productpage-v1");
    assert_eq!(label(page, "response_code"), "200");
    assert_eq!(label(page, "request_protocol"), "http");
    assert_eq!(label(page, "connection_security_policy"), "mutual_tls");
    assert_eq!(label(page, "response_flags"), "-");
    assert_eq!(label(page, "source_principal"), "spiffe://cluster.local/ns/bookinfo/sa/sleep");
    for reporter in ["source", "destination"] {
        let tcp = p.query(&format!(r#"istio_tcp_sent_bytes_total{{reporter="{reporter}"}} > 0"#)).unwrap();
        let s = tcp.first().unwrap_or_else(|| panic!("no {reporter} TCP series"));
        for l in KIALI_REQUIRED_LABELS_TCP {
            assert!(s["metric"].get(*l).is_some(), "{reporter} istio_tcp_sent_bytes_total lacks {l}: {s}");
        }
        assert_eq!(label(s, "app"), "ztunnel");
        assert_eq!(label(s, "connection_security_policy"), "mutual_tls", "{s}");
    }
    let opened = p.query("sum(istio_tcp_connections_opened_total)").unwrap();
    assert!(value(&opened[0]) > 0.0);
}

#[test]
fn kiali_graph_queries_return_the_bookinfo_edges() {
    let (p, _b, _) = observed("obs-kiali");
    let mut edges = Vec::new();
    for q in kiali_graph_queries("bookinfo", "60s") {
        let result = p.query(&q.promql).unwrap_or_else(|e| panic!("{}: {e}\n{}", q.purpose, q.promql));
        for s in &result {
            edges.push((
                q.purpose,
                label(s, "source_workload").to_string(),
                label(s, "destination_service_name").to_string(),
            ));
        }
    }
    let has = |purpose: &str, src: &str, dst: &str| {
        edges.iter().any(|(p, s, d)| p.starts_with(purpose) && s == src && d == dst)
    };
    assert!(has("requests 3", "sleep", "productpage"), "sleep -> productpage (HTTP): {edges:#?}");
    assert!(has("requests 3", "productpage-v1", "reviews"), "productpage -> reviews (HTTP): {edges:#?}");
    assert!(
        has("requests 2", "reviews-v1", "")
            || edges.iter().any(|(p, s, _)| p.starts_with("requests 2") && s == "productpage-v1"),
        "incoming requests: {edges:#?}"
    );
    assert!(edges.iter().any(|(p, s, _)| p.starts_with("tcp sent 2") && s == "sleep"), "sleep's TCP: {edges:#?}");
    assert!(edges.iter().any(|(p, _, _)| p.starts_with("security policy 2")), "security policy: {edges:#?}");
    assert!(edges.iter().any(|(p, _, _)| p.starts_with("response time 2")), "response times: {edges:#?}");
}

#[test]
fn every_dashboard_query_runs_against_the_real_prometheus() {
    let (p, _b, _) = observed("obs-dashboards");
    let queries = dashboard_queries();
    assert!(queries.len() > 20, "{} queries", queries.len());
    let mut with_data = 0;
    for q in &queries {
        let r = p.query(&q.expr).unwrap_or_else(|e| panic!("{} / {}: {e}\n{}", q.dashboard, q.panel, q.expr));
        with_data += usize::from(!r.is_empty());
    }
    // Not every panel has data in a short run (e.g. retries, NACKs), but most must.
    assert!(with_data * 2 > queries.len(), "only {with_data} of {} dashboard queries returned data", queries.len());
}

#[test]
fn the_charts_rules_evaluate_and_stay_quiet_on_a_healthy_mesh() {
    let (p, _b, _) = observed("obs-rules");
    // Give the rules a few evaluations.
    std::thread::sleep(Duration::from_secs(3));
    let rules = p.rules().unwrap();
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let mut alerts = 0;
    for g in groups {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(r["health"], "ok", "rule {} is unhealthy: {}", r["name"], r["lastError"]);
            if r["type"] == "alerting" {
                alerts += 1;
                assert_eq!(r["state"], "inactive", "{} fires on a healthy mesh: {r}", r["name"]);
            }
        }
    }
    assert!(alerts >= 6, "{alerts} alerts loaded");
    let ready = p.query(r#"min(ztunnel_ready{job="ztunnel"})"#).unwrap();
    assert_eq!(value(&ready[0]), 1.0);
    let expiry = p.query("min(ztunnel:certificate_expiry:seconds)").unwrap();
    assert!(value(&expiry[0]) > 2.0 * 3600.0, "{expiry:?}");
}
