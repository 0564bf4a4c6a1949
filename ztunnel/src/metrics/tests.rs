use super::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn labels() -> ConnectionLabels {
    ConnectionLabels {
        reporter: Reporter::Destination,
        source_workload: "sleep".into(),
        source_canonical_service: "sleep".into(),
        source_canonical_revision: "v1".into(),
        source_workload_namespace: "default".into(),
        source_principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
        source_app: "sleep".into(),
        source_version: "v1".into(),
        source_cluster: "Kubernetes".into(),
        destination_workload: "httpbin".into(),
        destination_canonical_service: "httpbin".into(),
        destination_canonical_revision: "v2".into(),
        destination_workload_namespace: "apps".into(),
        destination_principal: "spiffe://cluster.local/ns/apps/sa/httpbin".into(),
        destination_app: "httpbin".into(),
        destination_version: "v2".into(),
        destination_cluster: "Kubernetes".into(),
        destination_service: "httpbin.apps.svc.cluster.local".into(),
        destination_service_namespace: "apps".into(),
        destination_service_name: "httpbin".into(),
        connection_security_policy: "mutual_tls".into(),
        ..Default::default()
    }
}

const LABELS_TEXT: &str = concat!(
    r#"{reporter="destination",source_workload="sleep",source_canonical_service="sleep","#,
    r#"source_canonical_revision="v1",source_workload_namespace="default","#,
    r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep",source_app="sleep","#,
    r#"source_version="v1",source_cluster="Kubernetes",destination_workload="httpbin","#,
    r#"destination_canonical_service="httpbin",destination_canonical_revision="v2","#,
    r#"destination_workload_namespace="apps","#,
    r#"destination_principal="spiffe://cluster.local/ns/apps/sa/httpbin","#,
    r#"destination_app="httpbin",destination_version="v2",destination_cluster="Kubernetes","#,
    r#"destination_service="httpbin.apps.svc.cluster.local","#,
    r#"destination_service_namespace="apps",destination_service_name="httpbin","#,
    r#"request_protocol="tcp",response_flags="-",connection_security_policy="mutual_tls"}"#
);

fn assert_line(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "missing line {line:?} in:\n{text}");
}

#[test]
fn tcp_series_have_istio_names_labels_and_values() {
    let m = Metrics::new();
    let l = labels();
    let first = m.open_connection(&l);
    let _second = m.open_connection(&l);
    first.close(100, 40);
    first.transferred(5, 0);
    let text = m.encode();
    for family in [
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
    ] {
        assert_line(&text, &format!("# TYPE {family} counter"));
        assert_eq!(text.matches(&format!("# TYPE {family} ")).count(), 1);
    }
    assert_line(&text, &format!("istio_tcp_connections_opened_total{LABELS_TEXT} 2"));
    assert_line(&text, &format!("istio_tcp_connections_closed_total{LABELS_TEXT} 1"));
    assert_line(&text, &format!("istio_tcp_sent_bytes_total{LABELS_TEXT} 105"));
    assert_line(&text, &format!("istio_tcp_received_bytes_total{LABELS_TEXT} 40"));
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn default_labels_are_istio_unknowns() {
    let m = Metrics::new();
    m.open_connection(&ConnectionLabels::default());
    let text = m.encode();
    let line = text.lines().find(|l| l.starts_with("istio_tcp_connections_opened_total{")).expect("series present");
    assert!(line.starts_with(r#"istio_tcp_connections_opened_total{reporter="source",source_workload="unknown","#));
    assert!(line.ends_with(r#"request_protocol="tcp",response_flags="-",connection_security_policy="unknown"} 1"#));
}

#[test]
fn ztunnel_counters() {
    let m = Metrics::new();
    m.tls_handshake_failed("bad_certificate");
    m.tls_handshake_failed("bad_certificate");
    m.policy_denied("inbound");
    m.config_rejected("workload");
    m.enrollment_rejected();
    let text = m.encode();
    assert_line(&text, r#"ztunnel_tls_handshake_failures_total{reason="bad_certificate"} 2"#);
    assert_line(&text, r#"ztunnel_authorization_denied_total{direction="inbound"} 1"#);
    assert_line(&text, r#"ztunnel_config_rejected_total{kind="workload"} 1"#);
    assert_line(&text, "ztunnel_enrollment_rejected_total 1");
}

#[test]
fn label_values_are_escaped() {
    let m = Metrics::new();
    m.config_rejected("a\"b\nc");
    assert_line(&m.encode(), r#"ztunnel_config_rejected_total{kind="a\"b\nc"} 1"#);
}

#[test]
fn collectors_are_read_at_scrape_time() {
    let m = Metrics::new();
    let redirected = Arc::new(AtomicU64::new(7));
    let r = redirected.clone();
    m.add_collector(
        "ztunnel_ebpf_program_events_total",
        "Events counted by the eBPF programs",
        Box::new(move || {
            vec![
                (
                    vec![("program".into(), "connect4".into()), ("outcome".into(), "redirected".into())],
                    r.load(Ordering::Relaxed),
                ),
                (vec![("program".into(), "connect4".into()), ("outcome".into(), "bypassed".into())], 3),
            ]
        }),
    );
    m.add_collector("ztunnel_hbone_pool_connections_opened", "HBONE pool connections", Box::new(|| vec![(vec![], 4)]));
    let text = m.encode();
    assert_line(&text, "# HELP ztunnel_ebpf_program_events Events counted by the eBPF programs.");
    assert_line(&text, "# TYPE ztunnel_ebpf_program_events counter");
    assert_eq!(text.matches("# TYPE ztunnel_ebpf_program_events ").count(), 1);
    assert_line(&text, r#"ztunnel_ebpf_program_events_total{program="connect4",outcome="redirected"} 7"#);
    assert_line(&text, r#"ztunnel_ebpf_program_events_total{program="connect4",outcome="bypassed"} 3"#);
    assert_line(&text, "ztunnel_hbone_pool_connections_opened_total 4");
    redirected.store(9, Ordering::Relaxed);
    assert_line(&m.encode(), r#"ztunnel_ebpf_program_events_total{program="connect4",outcome="redirected"} 9"#);
    assert!(m.encode().ends_with("# EOF\n"));
}

#[test]
fn metrics_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Metrics>();
}
