//! The chart's monitoring files, checked offline: the Prometheus scrape config, rules and rule
//! unit tests with a real promtool (and the scrape config's relabelling with a real
//! Prometheus fed synthetic pods), every alert covered by a firing and a quiet test case, the
//! Grafana dashboards' and Kiali's queries valid PromQL over labels the agents really write,
//! and the chart rendering both ConfigMaps. Needs no root. A missing promtool / prometheus
//! (Debian's `prometheus` package, installed by `cargo xtask setup`) fails, never skips.
#[path = "../../xtask/src/helm.rs"]
mod helm;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::observability::{
    chart_file, dashboard_files, dashboard_queries, kiali_graph_queries, promtool, queries_of_dashboard,
    substitute_variables, KialiQuery, KIALI_REQUIRED_LABELS_REQUESTS, KIALI_REQUIRED_LABELS_TCP,
};
use serde::Deserialize;
use serde_yaml_ng::Value;

/// The alerts the rules must hold, one per failure the agents can have.
const REQUIRED_ALERTS: &[&str] = &[
    "ZtunnelAgentNotReady",
    "ZtunnelCaptureErrors",
    "ZtunnelCertificateExpiringSoon",
    "ZtunnelXdsNacks",
    "ZtunnelPolicyDenialsSpiking",
    "ZtunnelHboneHandshakeFailures",
];

/// Every series the agents (node and waypoint) expose that the rules or dashboards may read;
/// `up` is Prometheus's own.
const EXPOSED_METRICS: &[&str] = &[
    "up",
    "istio_build",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_connections_failed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_sum",
    "istio_request_duration_milliseconds_count",
    "istio_request_bytes_bucket",
    "istio_request_bytes_sum",
    "istio_request_bytes_count",
    "istio_response_bytes_bucket",
    "istio_response_bytes_sum",
    "istio_response_bytes_count",
    "ztunnel_tls_handshake_failures_total",
    "ztunnel_authorization_denied_total",
    "ztunnel_config_rejected_total",
    "ztunnel_ebpf_program_events_total",
    "ztunnel_xds_nacks_total",
    "ztunnel_xds_messages_total",
    "ztunnel_xds_rejected_resources_total",
    "ztunnel_xds_disconnects_total",
    "ztunnel_hbone_pool_connections_opened_total",
    "ztunnel_connections_limited_total",
    "ztunnel_waypoint_retries_total",
    "ztunnel_ready",
    "ztunnel_certificate_expiration_timestamp_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prometheus-rules-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

fn promtool_bin() -> PathBuf {
    promtool().unwrap_or_else(|e| panic!("these tests need promtool: {e}"))
}

/// Runs promtool in `dir`; success and its stdout + stderr.
fn run_promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let bin = promtool_bin();
    let out = Command::new(&bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Debian's Prometheus and promtool are built without Kubernetes discovery. This is the
/// config with each job's `kubernetes_sd_configs` (which must be exactly one `role: pod`)
/// replaced by a file_sd reading `pods_file`, so everything else (relabelling, rule_files)
/// is still checked by the real thing.
fn with_file_sd(config: &Value, pods_file: &str) -> Value {
    let mut config = config.clone();
    let jobs = config["scrape_configs"].as_sequence_mut().expect("scrape_configs");
    for job in jobs {
        let name = job["job_name"].as_str().unwrap_or_default().to_string();
        let job = job.as_mapping_mut().expect("a scrape config is a mapping");
        let sd = job.remove("kubernetes_sd_configs").unwrap_or_else(|| panic!("job {name}: no kubernetes_sd_configs"));
        let expected: Value = serde_yaml_ng::from_str("[{role: pod}]").unwrap();
        assert_eq!(sd, expected, "job {name}: discovery must be kubernetes_sd_configs role pod");
        let file_sd: Value = serde_yaml_ng::from_str(&format!("[{{files: [{pods_file}]}}]")).unwrap();
        job.insert(Value::from("file_sd_configs"), file_sd);
    }
    config
}

/// The rules' alerts, by name.
fn alerts() -> Vec<String> {
    let rules = yaml(&chart_file("prometheus/rules.yaml"));
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            if let Some(alert) = rule["alert"].as_str() {
                names.push(alert.to_string());
            }
        }
    }
    names
}

/// Every PromQL expression of the rules (recording and alerting).
fn rule_exprs() -> Vec<String> {
    let rules = yaml(&chart_file("prometheus/rules.yaml"));
    let groups = rules["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules"))
        .map(|r| r["expr"].as_str().expect("expr").to_string())
        .collect()
}

/// `promtool check rules` over `exprs` as recording rules: they all parse as PromQL.
fn assert_parse_as_promql(what: &str, exprs: &[(String, String)]) {
    let dir = scratch(what);
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({"record": format!("check:query:{i}"), "expr": e}))
        .collect();
    let doc = serde_json::json!({"groups": [{"name": what, "rules": rules}]});
    // JSON is YAML: promtool reads it as a rules file.
    std::fs::write(dir.join("queries.yaml"), doc.to_string()).expect("writing queries.yaml");
    let (ok, out) = run_promtool(&["check", "rules", "queries.yaml"], &dir);
    if !ok {
        let listing: Vec<String> =
            exprs.iter().enumerate().map(|(i, (origin, e))| format!("check:query:{i} ({origin}): {e}")).collect();
        panic!("promtool refuses some {what}:\n{out}\n{}", listing.join("\n"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Identifiers outside quoted strings that name a series (istio_*, ztunnel_*, process_*, up).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            // Skip the string, honouring escapes.
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let word = &expr[i..end];
            if ["istio_", "ztunnel_", "process_"].iter().any(|p| word.starts_with(p)) || word == "up" {
                names.insert(word.to_string());
            }
        }
    }
    names
}

/// The label names of every sample of `metric` in an exposition (OpenMetrics text).
fn series_labels(exposition: &str, metric: &str) -> Vec<BTreeSet<String>> {
    let mut out = Vec::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(metric) else { continue };
        let Some(rest) = rest.strip_prefix('{') else { continue };
        let mut labels = BTreeSet::new();
        let mut s = rest;
        while let Some(eq) = s.find("=\"") {
            labels.insert(s[..eq].trim_start_matches(',').to_string());
            let mut value = s[eq + 2..].char_indices();
            let mut close = None;
            while let Some((k, c)) = value.next() {
                match c {
                    '\\' => {
                        value.next();
                    }
                    '"' => {
                        close = Some(eq + 2 + k);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close.unwrap_or_else(|| panic!("unterminated label value in {line:?}"));
            s = &s[close + 1..];
            if s.starts_with('}') {
                break;
            }
        }
        out.push(labels);
    }
    out
}

/// The label names a Kiali query part reads: its `by (...)` list and its selector's matchers.
fn labels_read(part: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for by in part.split("by (").skip(1) {
        let list = &by[..by.find(')').expect("by list closes")];
        labels.extend(list.split(',').map(|l| l.trim().to_string()));
    }
    let open = part.find('{').expect("a selector");
    let close = part[open..].find('}').expect("selector closes") + open;
    let mut sel = &part[open + 1..close];
    while !sel.is_empty() {
        let name_end = sel.find(['=', '!']).expect("a matcher");
        labels.insert(sel[..name_end].trim().to_string());
        let quote = sel.find('"').expect("a quoted value");
        let mut end = quote + 1;
        let bytes = sel.as_bytes();
        while bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        sel = sel[end + 1..].trim_start_matches(',');
    }
    labels
}

/// The series metric of one part of a Kiali query.
fn kiali_metric(part: &str) -> &str {
    let open = part.find('{').expect("a selector");
    let start = part[..open].rfind('(').map_or(0, |p| p + 1);
    &part[start..open]
}

#[test]
fn promtool_accepts_the_scrape_config() {
    let config_path = chart_file("prometheus/prometheus.yml");
    let config = yaml(&config_path);
    // rule_files resolve next to the config, as they will inside the ConfigMap.
    let dir = scratch("check-config");
    std::fs::copy(chart_file("prometheus/rules.yaml"), dir.join("rules.yaml")).expect("copying rules.yaml");
    std::fs::write(dir.join("prometheus.yml"), read(&config_path)).expect("writing prometheus.yml");
    let (ok, out) = run_promtool(&["check", "config", "prometheus.yml"], &dir);
    if !ok && out.contains("field kubernetes_sd_configs not found") {
        eprintln!("this promtool has no Kubernetes discovery (Debian's build): checking with file_sd in its place");
        let swapped = with_file_sd(&config, "pods.json");
        std::fs::write(dir.join("pods.json"), "[]").expect("writing pods.json");
        std::fs::write(dir.join("prometheus.yml"), serde_yaml_ng::to_string(&swapped).expect("YAML"))
            .expect("writing prometheus.yml");
        let (ok, out) = run_promtool(&["check", "config", "prometheus.yml"], &dir);
        assert!(ok, "promtool check config (file_sd in place of kubernetes_sd) failed:\n{out}");
        assert!(out.contains("SUCCESS: 1 rule files found"), "the config loads rules.yaml:\n{out}");
    } else {
        assert!(ok, "promtool check config failed:\n{out}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn promtool_accepts_the_rules() {
    let dir = chart_file("prometheus");
    let (ok, out) = run_promtool(&["check", "rules", "rules.yaml"], &dir);
    assert!(ok, "promtool check rules failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_rule_tests_pass() {
    let dir = chart_file("prometheus");
    let (ok, out) = run_promtool(&["test", "rules", "rules_test.yaml"], &dir);
    assert!(ok, "promtool test rules failed:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_rules_hold_an_alert_for_each_agent_failure() {
    let alerts: BTreeSet<String> = alerts().into_iter().collect();
    let required: BTreeSet<String> = REQUIRED_ALERTS.iter().map(|a| a.to_string()).collect();
    assert_eq!(alerts, required);
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_test_case() {
    let tests = yaml(&chart_file("prometheus/rules_test.yaml"));
    let files: Vec<&str> =
        tests["rule_files"].as_sequence().expect("rule_files").iter().filter_map(Value::as_str).collect();
    assert_eq!(files, ["rules.yaml"], "the tests load the chart's rules");
    let alerts = alerts();
    // alertname -> (firing cases, quiet cases)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for group in tests["tests"].as_sequence().expect("tests") {
        for case in group["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            // A case for an alert that does not exist would pass vacuously.
            assert!(alerts.contains(&name), "test group {:?} checks unknown alert {name}", group["name"]);
            let fires = case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
            let entry = cases.entry(name).or_default();
            if fires {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }
    let mut missing = Vec::new();
    for alert in &alerts {
        let (firing, quiet) = cases.get(alert).copied().unwrap_or_default();
        if firing == 0 {
            missing.push(format!("{alert}: no case where it fires"));
        }
        if quiet == 0 {
            missing.push(format!("{alert}: no case where it stays quiet"));
        }
    }
    assert!(missing.is_empty(), "rules_test.yaml coverage:\n{}", missing.join("\n"));
}

#[test]
fn the_rules_select_the_agents_job_the_scrape_config_defines() {
    let config = yaml(&chart_file("prometheus/prometheus.yml"));
    let jobs: BTreeSet<&str> = config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .collect();
    let mut selected = BTreeSet::new();
    for expr in rule_exprs() {
        for part in expr.split("job=\"").skip(1) {
            selected.insert(part[..part.find('"').expect("closing quote")].to_string());
        }
    }
    assert_eq!(selected, BTreeSet::from(["ztunnel".to_string()]), "the rules pick the agents by job");
    assert!(jobs.contains("ztunnel"), "prometheus.yml defines job ztunnel: {jobs:?}");
    // And the target labels the rules group by are the ones the config attaches.
    for job in config["scrape_configs"].as_sequence().unwrap() {
        let targets: BTreeSet<&str> = job["relabel_configs"]
            .as_sequence()
            .expect("relabel_configs")
            .iter()
            .filter_map(|r| r["target_label"].as_str())
            .collect();
        for label in ["namespace", "pod", "node", "app"] {
            assert!(targets.contains(label), "job {:?} sets the {label} label", job["job_name"]);
        }
    }
}

#[test]
fn the_scrape_config_honours_the_pod_annotations_in_a_real_prometheus() {
    let prometheus = std::env::var_os("PROMETHEUS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("prometheus"));
    let dir = scratch("relabel");
    std::fs::copy(chart_file("prometheus/rules.yaml"), dir.join("rules.yaml")).expect("copying rules.yaml");
    let config = with_file_sd(&yaml(&chart_file("prometheus/prometheus.yml")), "pods.json");
    std::fs::write(dir.join("prometheus.yml"), serde_yaml_ng::to_string(&config).expect("YAML")).unwrap();
    // What Kubernetes pod discovery would yield (one target per container port, a port-less
    // one per container without ports), on loopback addresses: scrapes go nowhere else.
    let annotations = serde_json::json!({
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": "15020",
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/stats/prometheus",
    });
    let pod = |ns: &str, name: &str, ip: &str, app: Option<&str>, annotated: bool, phase: &str| {
        let mut l = serde_json::json!({
            "__meta_kubernetes_namespace": ns,
            "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_node_name": "node-a",
            "__meta_kubernetes_pod_phase": phase,
        });
        if let Some(app) = app {
            l["__meta_kubernetes_pod_label_app"] = app.into();
        }
        if annotated {
            for (k, v) in annotations.as_object().unwrap() {
                l[k] = v.clone();
            }
        }
        l
    };
    let group = |addr: String, mut labels: serde_json::Value, container: &str, port: Option<&str>| {
        labels["__meta_kubernetes_pod_container_name"] = container.into();
        if let Some(port) = port {
            labels["__meta_kubernetes_pod_container_port_name"] = port.into();
        }
        serde_json::json!({"targets": [addr], "labels": labels})
    };
    let ztunnel = pod("istio-system", "ztunnel-4f7xk", "127.0.0.2", Some("ztunnel"), true, "Running");
    let ztunnel6 = pod("istio-system", "ztunnel-9bq2m", "::1", Some("ztunnel"), true, "Running");
    let waypoint = pod("bookinfo", "waypoint-6d9f-x2", "127.0.0.3", None, true, "Running");
    let plain = pod("bookinfo", "reviews-v1-abc", "127.0.0.4", Some("reviews"), false, "Running");
    let pending = pod("bookinfo", "ratings-v1-def", "", Some("ratings"), true, "Pending");
    let groups = serde_json::json!([
        group("127.0.0.2:15008".into(), ztunnel.clone(), "istio-proxy", Some("hbone")),
        group("127.0.0.2:15020".into(), ztunnel.clone(), "istio-proxy", Some("ztunnel-stats")),
        group("127.0.0.2:15021".into(), ztunnel.clone(), "istio-proxy", Some("health")),
        group("127.0.0.2".into(), ztunnel, "cni", None),
        group("[::1]:15020".into(), ztunnel6, "istio-proxy", Some("ztunnel-stats")),
        group("127.0.0.3:15008".into(), waypoint.clone(), "istio-proxy", Some("mesh")),
        group("127.0.0.3:15020".into(), waypoint, "istio-proxy", Some("metrics")),
        group("127.0.0.4:9080".into(), plain, "reviews", Some("http")),
        group("ratings".into(), pending, "ratings", None),
    ]);
    std::fs::write(dir.join("pods.json"), groups.to_string()).unwrap();

    let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(&prometheus)
        .current_dir(&dir)
        .args(["--config.file=prometheus.yml", "--storage.tsdb.path=data", &format!("--web.listen-address={listen}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (Debian's `prometheus` package, which `cargo xtask setup` installs): {e}",
                prometheus.display()
            )
        });
    let get = |path: &str| -> Option<serde_json::Value> {
        let mut s = TcpStream::connect(&listen).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {listen}\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        serde_json::from_str(&body[body.find("\r\n\r\n")? + 4..]).ok()
    };
    // url -> final target labels, once both jobs' targets are discovered.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (active, dropped) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("prometheus exited ({status}):\n{}", read(&dir.join("prometheus.log")));
        }
        if let Some(v) = get("/api/v1/targets?state=any") {
            let active: BTreeMap<String, BTreeMap<String, String>> = v["data"]["activeTargets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let labels = serde_json::from_value(t["labels"].clone()).expect("labels");
                    (t["scrapeUrl"].as_str().unwrap_or_default().to_string(), labels)
                })
                .collect();
            let dropped = v["data"]["droppedTargets"].as_array().map_or(0, Vec::len);
            if active.values().any(|l| l["job"] == "ztunnel") && active.values().any(|l| l["job"] == "kubernetes-pods")
            {
                break (active, dropped);
            }
        }
        assert!(Instant::now() < deadline, "no targets after 60s:\n{}", read(&dir.join("prometheus.log")));
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let expected = BTreeMap::from([
        (
            "http://127.0.0.2:15020/stats/prometheus".to_string(),
            labels(&[
                ("job", "ztunnel"),
                ("instance", "127.0.0.2:15020"),
                ("namespace", "istio-system"),
                ("pod", "ztunnel-4f7xk"),
                ("node", "node-a"),
                ("app", "ztunnel"),
            ]),
        ),
        (
            "http://[::1]:15020/stats/prometheus".to_string(),
            labels(&[
                ("job", "ztunnel"),
                ("instance", "[::1]:15020"),
                ("namespace", "istio-system"),
                ("pod", "ztunnel-9bq2m"),
                ("node", "node-a"),
                ("app", "ztunnel"),
            ]),
        ),
        (
            "http://127.0.0.3:15020/stats/prometheus".to_string(),
            labels(&[
                ("job", "kubernetes-pods"),
                ("instance", "127.0.0.3:15020"),
                ("namespace", "bookinfo"),
                ("pod", "waypoint-6d9f-x2"),
                ("node", "node-a"),
            ]),
        ),
    ]);
    assert_eq!(active, expected, "one target per annotated pod, on its annotated port and path, in its job");
    assert!(dropped > 0, "the unannotated, pending and extra-port targets are dropped");
}

#[test]
fn every_dashboard_query_has_no_leftover_variables() {
    let queries = dashboard_queries();
    for file in dashboard_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(queries.iter().any(|q| q.dashboard == name), "{name} has queries");
    }
    let left: Vec<String> = queries
        .iter()
        .filter(|q| q.expr.contains('$'))
        .map(|q| format!("{} / {}: {}", q.dashboard, q.panel, q.expr))
        .collect();
    assert!(left.is_empty(), "variables left over:\n{}", left.join("\n"));
}

#[test]
fn the_shipped_dashboards_are_the_three_expected() {
    let names: Vec<String> =
        dashboard_files().iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["waypoint.json", "workload.json", "ztunnel.json"]);
    for file in dashboard_files() {
        let json: serde_json::Value = serde_json::from_str(&read(&file)).expect("dashboard JSON");
        assert!(json["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "{}: uid", file.display());
        assert!(json["title"].as_str().is_some_and(|t| !t.is_empty()), "{}: title", file.display());
    }
}

#[test]
fn every_dashboard_variable_a_query_uses_is_defined_by_its_dashboard() {
    for file in dashboard_files() {
        let json: serde_json::Value = serde_json::from_str(&read(&file)).expect("dashboard JSON");
        let defined: BTreeSet<&str> =
            json["templating"]["list"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
        let mut used = BTreeSet::new();
        fn walk<'a>(panels: &'a serde_json::Value, used: &mut BTreeSet<&'a str>) {
            for p in panels.as_array().into_iter().flatten() {
                for t in p["targets"].as_array().into_iter().flatten() {
                    let expr = t["expr"].as_str().unwrap_or_default();
                    for part in expr.split('$').skip(1) {
                        let part = part.trim_start_matches('{');
                        let end = part.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(part.len());
                        used.insert(&part[..end]);
                    }
                }
                walk(&p["panels"], used);
            }
        }
        walk(&json["panels"], &mut used);
        for var in used.iter().filter(|v| !v.starts_with("__")) {
            assert!(defined.contains(var), "{}: ${var} is used but not defined ({defined:?})", file.display());
        }
    }
}

#[test]
fn dashboard_queries_include_panels_nested_in_collapsed_rows() {
    let json = serde_json::json!({
        "panels": [
            {"type": "row", "title": "Open", "panels": []},
            {"type": "timeseries", "title": "Top", "targets": [{"expr": "sum(rate(a_total[$__rate_interval]))"}]},
            {"type": "row", "title": "Collapsed", "collapsed": true, "panels": [
                {"type": "timeseries", "title": "Inner", "targets": [
                    {"expr": "sum(b{namespace=~\"$namespace\"})", "refId": "A"},
                    {"refId": "B", "datasource": "no expr"}
                ]}
            ]}
        ],
        "rows": [{"panels": [{"title": "Old", "targets": [{"expr": "c{workload=~\"${workload}\"}"}]}]}]
    });
    let q = queries_of_dashboard("t.json", &json).expect("substitutes");
    let got: Vec<(&str, &str)> = q.iter().map(|q| (q.panel.as_str(), q.expr.as_str())).collect();
    assert_eq!(
        got,
        [("Top", "sum(rate(a_total[1m]))"), ("Inner", "sum(b{namespace=~\".*\"})"), ("Old", "c{workload=~\".*\"}")]
    );
}

#[test]
fn dashboard_variable_substitution_refuses_what_it_cannot_stand_in_for() {
    assert_eq!(
        substitute_variables(r#"x{reporter=~"$qrep"}"#).unwrap(),
        r#"x{reporter=~"destination|source|waypoint"}"#
    );
    for (expr, says) in [
        (r#"x{a=~"$unknown"}"#, "unknown variable `$unknown`"),
        (r#"x{namespace="$namespace"}"#, "`$namespace`"),
        (r#"rate(x[$namespace])"#, "`$namespace`"),
        (r#"rate(x[5m]) * $__rate_interval"#, "`$__rate_interval`"),
        (r#"x{a=~"${namespace:regex}"}"#, "formats are not supported"),
        (r#"x{a=~"$"}"#, "names no variable"),
    ] {
        let err = substitute_variables(expr).expect_err(expr);
        assert!(err.contains(says), "{expr}: {err}");
    }
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    let exprs: Vec<(String, String)> =
        dashboard_queries().into_iter().map(|q| (format!("{} / {}", q.dashboard, q.panel), q.expr)).collect();
    assert_parse_as_promql("dashboard-queries", &exprs);
}

#[test]
fn every_metric_the_rules_and_dashboards_read_is_one_the_agents_expose() {
    let mut unknown = Vec::new();
    let exprs = rule_exprs()
        .into_iter()
        .map(|e| ("rules.yaml".to_string(), e))
        .chain(dashboard_queries().into_iter().map(|q| (format!("{} / {}", q.dashboard, q.panel), q.expr)));
    for (origin, expr) in exprs {
        for name in metric_names(&expr) {
            if !EXPOSED_METRICS.contains(&name.as_str()) {
                unknown.push(format!("{origin}: {name}"));
            }
        }
    }
    assert!(unknown.is_empty(), "series no agent exposes:\n{}", unknown.join("\n"));
}

#[test]
fn every_kiali_query_parses_as_promql() {
    let exprs: Vec<(String, String)> =
        kiali_graph_queries("bookinfo", "600s").into_iter().map(|q| (q.purpose.to_string(), q.promql)).collect();
    assert_parse_as_promql("kiali-queries", &exprs);
}

#[test]
fn kiali_queries_cover_both_reporters_and_name_the_namespace_and_duration() {
    let queries = kiali_graph_queries("bookinfo", "600s");
    let purposes: BTreeSet<&str> = queries.iter().map(|q| q.purpose).collect();
    assert_eq!(purposes.len(), queries.len(), "purposes are unique");
    for KialiQuery { purpose, promql } in &queries {
        assert!(promql.contains("\"bookinfo\"") || promql.contains(r"\\.bookinfo\\."), "{purpose}: namespace");
        assert!(promql.contains("[600s]"), "{purpose}: duration");
    }
    let all: String = queries.iter().map(|q| q.promql.as_str()).collect();
    for needle in [
        r#"reporter=~"waypoint|source""#,
        r#"reporter=~"waypoint|destination""#,
        "istio_requests_total{",
        "istio_tcp_sent_bytes_total{",
        "istio_tcp_received_bytes_total{",
        "istio_request_duration_milliseconds_bucket{",
        "connection_security_policy",
    ] {
        assert!(all.contains(needle), "some query reads {needle}");
    }
}

#[test]
fn kiali_required_labels_are_exactly_what_its_queries_read() {
    let requests: BTreeSet<String> = KIALI_REQUIRED_LABELS_REQUESTS.iter().map(|s| s.to_string()).collect();
    let tcp: BTreeSet<String> = KIALI_REQUIRED_LABELS_TCP.iter().map(|s| s.to_string()).collect();
    let (mut read_requests, mut read_tcp) = (BTreeSet::new(), BTreeSet::new());
    for q in kiali_graph_queries("bookinfo", "600s") {
        for part in q.promql.split(" OR ") {
            let mut labels = labels_read(part);
            labels.remove("le"); // the histogram's bucket label, not one of the agent's
            match kiali_metric(part) {
                "istio_requests_total" | "istio_request_duration_milliseconds_bucket" => read_requests.extend(labels),
                "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => read_tcp.extend(labels),
                other => panic!("{}: unexpected metric {other:?} in {part}", q.purpose),
            }
        }
    }
    assert_eq!(read_requests, requests, "KIALI_REQUIRED_LABELS_REQUESTS");
    assert_eq!(read_tcp, tcp, "KIALI_REQUIRED_LABELS_TCP");
}

#[test]
fn the_agents_series_carry_every_label_kiali_requires() {
    use ztunnel::metrics::{ConnectionLabels, Metrics, Reporter};
    use ztunnel::waypoint::telemetry::{RequestLabels, RequestMetrics};

    let metrics = Metrics::new();
    let labels = ConnectionLabels { reporter: Reporter::Destination, ..ConnectionLabels::default() };
    metrics.open_connection(&labels).close(10, 20);
    let requests = RequestMetrics::register(&metrics);
    let request = RequestLabels {
        common: ConnectionLabels { reporter: Reporter::Waypoint, ..ConnectionLabels::default() },
        response_code: "200".to_string(),
        grpc_response_status: "-".to_string(),
    };
    requests.record(&request, Duration::from_millis(3), 100, 200);
    let exposition = metrics.encode();

    // `app` is the scraped pod's label, which prometheus.yml copies (checked above).
    let agent_written = |required: &[&str]| -> BTreeSet<String> {
        required.iter().filter(|l| **l != "app").map(|l| l.to_string()).collect()
    };
    for (metric, required) in [
        ("istio_tcp_sent_bytes_total", agent_written(KIALI_REQUIRED_LABELS_TCP)),
        ("istio_tcp_received_bytes_total", agent_written(KIALI_REQUIRED_LABELS_TCP)),
        ("istio_requests_total", agent_written(KIALI_REQUIRED_LABELS_REQUESTS)),
        ("istio_request_duration_milliseconds_bucket", agent_written(KIALI_REQUIRED_LABELS_REQUESTS)),
    ] {
        let series = series_labels(&exposition, metric);
        assert!(!series.is_empty(), "{metric} in the exposition:\n{exposition}");
        for labels in series {
            let missing: Vec<&String> = required.difference(&labels).collect();
            assert!(missing.is_empty(), "{metric} lacks {missing:?} (has {labels:?})");
        }
    }
}

/// `helm template` of the chart with `extra` flags, as YAML documents.
fn render(extra: &[&str]) -> Vec<Value> {
    let (helm, _) = helm::find_helm(&workspace()).unwrap_or_else(|e| panic!("the chart test needs helm: {e}"));
    let chart = workspace().join("deploy/helm/ztunnel");
    let out = Command::new(&helm)
        .args(["template", "ztunnel", chart.to_str().expect("UTF-8 path"), "--namespace", "istio-system"])
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()));
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("helm prints UTF-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn configmap<'a>(docs: &'a [Value], name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap") && d["metadata"]["name"].as_str() == Some(name))
}

#[test]
fn the_chart_renders_the_rules_and_dashboards_configmaps() {
    let docs = render(&[]);
    let prom = configmap(&docs, "ztunnel-prometheus").expect("ConfigMap ztunnel-prometheus");
    assert_eq!(prom["metadata"]["namespace"].as_str(), Some("istio-system"));
    let data = prom["data"].as_mapping().expect("data");
    let keys: BTreeSet<&str> = data.keys().filter_map(Value::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["prometheus.yml", "rules.yaml"]));
    for key in keys {
        assert_eq!(
            prom["data"][key].as_str(),
            Some(read(&chart_file(&format!("prometheus/{key}"))).as_str()),
            "{key} is the chart's file verbatim"
        );
    }

    let dash = configmap(&docs, "ztunnel-grafana-dashboards").expect("ConfigMap ztunnel-grafana-dashboards");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"].as_str(), Some("1"), "the Grafana sidecar's label");
    let data = dash["data"].as_mapping().expect("data");
    let keys: BTreeSet<String> = data.keys().filter_map(Value::as_str).map(str::to_string).collect();
    let files: BTreeSet<String> =
        dashboard_files().iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(keys, files, "one key per dashboard file");
    let mut size = 0;
    for file in dashboard_files() {
        let key = file.file_name().unwrap().to_string_lossy().into_owned();
        let rendered = dash["data"][key.as_str()].as_str().expect("a string");
        assert_eq!(rendered, read(&file), "{key} is the chart's file verbatim");
        size += rendered.len();
    }
    assert!(size < 1024 * 1024, "a ConfigMap holds at most 1 MiB ({size} bytes)");
}

#[test]
fn the_configmaps_are_left_out_when_disabled() {
    let docs = render(&["--set", "prometheus.rules.enabled=false", "--set", "grafana.dashboards.enabled=false"]);
    assert!(configmap(&docs, "ztunnel-prometheus").is_none());
    assert!(configmap(&docs, "ztunnel-grafana-dashboards").is_none());
    assert!(docs.iter().any(|d| d["kind"].as_str() == Some("DaemonSet")), "the rest still renders");
}
