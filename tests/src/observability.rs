//! The Prometheus / Grafana / Kiali side of the mesh's telemetry, as facts tests can use:
//! where the chart's monitoring files are, every query the shipped Grafana dashboards run
//! (with their template variables replaced so a plain Prometheus can answer them), the PromQL
//! Kiali's graph issues for a namespace, and the labels Kiali needs on the agents' series.
//! It exists so the offline checks (tests/tests/prometheus_rules.rs) and the checks against a
//! live Prometheus scraping real agents read the same facts from one place.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `rel` under the chart's `files/` directory (deploy/helm/ztunnel/files), e.g.
/// `prometheus/rules.yaml` or `dashboards/ztunnel.json`.
pub fn chart_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy/helm/ztunnel/files")
        .join(rel)
}

/// The promtool to run: `$PROMTOOL` if set, else `promtool` on PATH (Debian's `prometheus`
/// package, which `cargo xtask setup` installs, puts it at /usr/bin/promtool). Each candidate
/// must answer `promtool --version`; the error says what was tried and how to get one.
pub fn promtool() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("PROMTOOL").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from("promtool"));
    let mut tried = Vec::new();
    for candidate in candidates {
        match Command::new(&candidate).arg("--version").output() {
            Ok(out) if out.status.success() => return Ok(candidate),
            Ok(out) => tried.push(format!("{}: exit {}", candidate.display(), out.status)),
            Err(e) => tried.push(format!("{}: {e}", candidate.display())),
        }
    }
    Err(format!(
        "no working promtool (tried {}); run `cargo xtask setup`, which installs Debian's `prometheus` \
         package (it ships promtool), or point $PROMTOOL at one",
        tried.join("; ")
    ))
}

/// One Prometheus query of a shipped Grafana dashboard, ready for a plain Prometheus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardQuery {
    /// The dashboard's file name under `files/dashboards`, e.g. `ztunnel.json`.
    pub dashboard: String,
    /// The panel's title (`#<id>` for an untitled one).
    pub panel: String,
    /// The target's `expr`, template variables substituted (see [`DASHBOARD_VARIABLES`]).
    pub expr: String,
}

/// Every template variable the shipped dashboards' queries use, and its stand-in for a plain
/// Prometheus. `namespace`, `workload`, `service` and `qrep` are regexes and may only appear
/// right inside a regex matcher (`label=~"$var"`), where `.*` (or every reporter) means
/// "all"; `$__rate_interval` is Grafana's built-in range and may only appear as `[$__rate_interval]`.
/// The dashboards' other variable, `datasource`, only picks the data source, never a query.
pub const DASHBOARD_VARIABLES: &[(&str, &str)] = &[
    // Grafana: max(4 x scrape interval, step + scrape interval); 1m covers a 15s scrape.
    ("__rate_interval", "1m"),
    // workload.json and waypoint.json: the namespace picked.
    ("namespace", ".*"),
    // workload.json: the workload picked.
    ("workload", ".*"),
    // waypoint.json: destination services (multi-select).
    ("service", ".*"),
    // workload.json: which reporters' series the inbound panels read.
    ("qrep", "destination|source|waypoint"),
];

/// `expr` with every `$var` / `${var}` of [`DASHBOARD_VARIABLES`] replaced. An error names any
/// variable that is unknown, has a `${var:format}`, or stands where its stand-in would not
/// mean "everything" (a regex variable outside `=~"` / `!~"`, the rate interval outside `[`).
pub fn substitute_variables(expr: &str) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| format!("unterminated `${{` in {expr:?}"))?;
            (&braced[..end], end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        if name.is_empty() {
            return Err(format!("a `$` that names no variable in {expr:?}"));
        }
        if name.contains(':') {
            return Err(format!("`${{{name}}}`: variable formats are not supported, in {expr:?}"));
        }
        let Some((_, value)) = DASHBOARD_VARIABLES.iter().find(|(n, _)| *n == name) else {
            let known: Vec<String> = DASHBOARD_VARIABLES.iter().map(|(n, _)| format!("${n}")).collect();
            return Err(format!("unknown variable `${name}` in {expr:?} (known: {})", known.join(", ")));
        };
        let in_place =
            if name == "__rate_interval" { out.ends_with('[') } else { out.ends_with("=~\"") || out.ends_with("!~\"") };
        if !in_place {
            return Err(format!(
                "`${name}` at byte {at} of {expr:?} is not where `{value}` means every value \
                 (regex variables go right after =~\", the rate interval inside [ ])"
            ));
        }
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The queries of one dashboard document, named `dashboard`: every `targets[].expr` of every
/// panel, including panels nested in (collapsed) rows and the old `rows[].panels` layout,
/// substituted with [`substitute_variables`]. Errors name the panel.
pub fn queries_of_dashboard(dashboard: &str, json: &serde_json::Value) -> Result<Vec<DashboardQuery>, String> {
    fn walk(dashboard: &str, panels: &serde_json::Value, out: &mut Vec<DashboardQuery>, errors: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = match panel["title"].as_str() {
                Some(t) if !t.is_empty() => t.to_string(),
                _ => format!("#{}", panel["id"]),
            };
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(expr) = target["expr"].as_str() else { continue };
                match substitute_variables(expr) {
                    Ok(expr) => {
                        out.push(DashboardQuery { dashboard: dashboard.to_string(), panel: title.clone(), expr })
                    }
                    Err(e) => errors.push(format!("{dashboard}, panel {title:?}: {e}")),
                }
            }
            walk(dashboard, &panel["panels"], out, errors);
        }
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    walk(dashboard, &json["panels"], &mut out, &mut errors);
    for row in json["rows"].as_array().into_iter().flatten() {
        walk(dashboard, &row["panels"], &mut out, &mut errors);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}

/// The chart's dashboard files (`files/dashboards/*.json`), sorted.
pub fn dashboard_files() -> Vec<PathBuf> {
    let dir = chart_file("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// Every query of every shipped dashboard, in file then panel order, variables substituted.
/// Panics naming the dashboard, panel and variable if any query keeps a `$` it cannot
/// substitute, so a new variable cannot slip into a dashboard unnoticed.
pub fn dashboard_queries() -> Vec<DashboardQuery> {
    let mut all = Vec::new();
    for path in dashboard_files() {
        let name = path.file_name().expect("file name").to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        match queries_of_dashboard(&name, &json) {
            Ok(q) => all.extend(q),
            Err(e) => panic!("dashboard queries with variables left over:\n{e}"),
        }
    }
    all
}

// Kiali's graph queries.
//
// Source: kiali/kiali master at commit d733a096e02eea357a274edcbbde8314e80786f4 (2026-08-20;
// its Makefile says VERSION v2.31.0-SNAPSHOT):
//  - graph/telemetry/istio/istio.go, buildNamespaceTrafficMap: the traffic queries and their
//    groupBy strings (requests; TCP, whose groupBy adds the target label `app`);
//  - graph/telemetry/istio/util/util.go, GetReporter / GetApp: with the default ambient rate
//    `total` the reporter matcher is reporter=~"waypoint|<reporter>" and there is no app filter;
//  - graph/telemetry/istio/appender/security_policy.go: the securityPolicy appender's two
//    queries (groupBy with the principals and connection_security_policy), including the
//    ztunnel-only TCP ones keyed on app="ztunnel";
//  - graph/telemetry/istio/appender/response_time.go: the responseTime appender's quantile
//    queries (default quantile 0.95, appender.go);
//  - graph/options.go: defaults (ambient total, http/grpc requests; tcp defaults to `sent`).
// The graph type (workload, app, versionedApp, service) only changes how nodes are built from
// the answers, never the PromQL: one set of queries serves the workload and the app graph.

/// Kiali's groupBy for `istio_requests_total` traffic (istio.go).
pub const KIALI_GROUP_BY_REQUESTS: &str = "source_cluster,source_workload_namespace,source_workload,\
source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,\
destination_service,destination_service_name,destination_workload_namespace,destination_workload,\
destination_canonical_service,destination_canonical_revision,request_protocol,response_code,\
grpc_response_status,response_flags";

/// Kiali's groupBy for `istio_tcp_*_bytes_total` traffic (istio.go): `app` is the scraped pod's
/// label (app="ztunnel" marks node-agent telemetry), not a label the agent writes.
pub const KIALI_GROUP_BY_TCP: &str = "app,source_cluster,source_workload_namespace,source_workload,\
source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,\
destination_service,destination_service_name,destination_workload_namespace,destination_workload,\
destination_canonical_service,destination_canonical_revision,response_flags";

/// The securityPolicy appender's groupBy (security_policy.go).
pub const KIALI_GROUP_BY_SECURITY: &str = "source_cluster,source_workload_namespace,source_workload,\
source_canonical_service,source_canonical_revision,source_principal,destination_cluster,\
destination_service_namespace,destination_service_name,destination_workload_namespace,destination_workload,\
destination_canonical_service,destination_canonical_revision,destination_principal,connection_security_policy";

/// The responseTime appender's groupBy for its histogram quantile (response_time.go).
pub const KIALI_GROUP_BY_RESPONSE_TIME: &str = "le,source_cluster,source_workload_namespace,source_workload,\
source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,\
destination_service,destination_service_name,destination_workload_namespace,destination_workload,\
destination_canonical_service,destination_canonical_revision,request_protocol";

/// Every label Kiali's graph reads from `istio_requests_total` (and the request histograms):
/// the selectors (reporter), the groupBy labels of the traffic, securityPolicy and
/// responseTime queries, i.e. what populateTrafficMap / populateSecurityPolicyMap look up.
pub const KIALI_REQUIRED_LABELS_REQUESTS: &[&str] = &[
    "reporter",
    "source_cluster",
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_principal",
    "destination_cluster",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_principal",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Every label Kiali's graph reads from `istio_tcp_sent_bytes_total` /
/// `istio_tcp_received_bytes_total`. `app` is a target label (the scraped pod's `app`, which
/// the chart's prometheus.yml copies); the others the agent writes itself.
pub const KIALI_REQUIRED_LABELS_TCP: &[&str] = &[
    "reporter",
    "app",
    "source_cluster",
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_principal",
    "destination_cluster",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_principal",
    "response_flags",
    "connection_security_policy",
];

/// One PromQL query Kiali's graph generator issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KialiQuery {
    /// Which step of Kiali's graph generation issues it (and for what).
    pub purpose: &'static str,
    pub promql: String,
}

/// The PromQL Kiali issues to build the graph of `namespace` (an ambient namespace) over
/// `duration`, in the order it issues them, with Kiali's default options for an ambient mesh
/// except TCP rate `total` (both byte counters instead of only `sent`): requests and TCP
/// traffic from both reporters (`reporter=~"waypoint|source"` / `"waypoint|destination"`),
/// then the securityPolicy and responseTime (p95) appenders. Kiali passes `duration` as whole
/// seconds (e.g. `600s`); any Prometheus duration works here. The same queries serve the
/// workload graph and the app graph (see the source notes above this function's consts).
pub fn kiali_graph_queries(namespace: &str, duration: &str) -> Vec<KialiQuery> {
    let ns = namespace;
    let d = duration;
    let src = r#"reporter=~"waypoint|source""#;
    let dst = r#"reporter=~"waypoint|destination""#;
    let mut q = Vec::new();

    // buildNamespaceTrafficMap, HTTP/gRPC request traffic. The unserviced-service regex is Go
    // source `^.+\\.%s\\..+$`: PromQL string escapes, i.e. the regex ^.+\.<ns>\..+$.
    let m = "istio_requests_total";
    let g = KIALI_GROUP_BY_REQUESTS;
    q.push(KialiQuery {
        purpose: "requests 0: incoming to unserviced namespace services (source telemetry)",
        promql: format!(
            r#"sum(rate({m}{{{src},source_workload_namespace!="{ns}",destination_workload_namespace="unknown",destination_workload="unknown",destination_service=~"^.+\\.{ns}\\..+$"}} [{d}])) by ({g}) > 0"#
        ),
    });
    q.push(KialiQuery {
        purpose: "requests 1: incoming from outside, source telemetry (ambient namespaces)",
        promql: format!(
            r#"sum(rate({m}{{reporter="source",source_workload_namespace!="{ns}",destination_workload_namespace="{ns}"}} [{d}])) by ({g}) > 0"#
        ),
    });
    q.push(KialiQuery {
        purpose: "requests 2: incoming, destination and waypoint telemetry",
        promql: format!(r#"sum(rate({m}{{{dst},destination_workload_namespace="{ns}"}} [{d}])) by ({g}) > 0"#),
    });
    q.push(KialiQuery {
        purpose: "requests 3: outgoing, source and waypoint telemetry",
        promql: format!(r#"sum(rate({m}{{{src},source_workload_namespace="{ns}"}} [{d}])) by ({g}) > 0"#),
    });

    // buildNamespaceTrafficMap, TCP bytes: rate `total` reads both counters, received first.
    let g = KIALI_GROUP_BY_TCP;
    for (m, unserviced, incoming, outgoing) in [
        (
            "istio_tcp_received_bytes_total",
            "tcp received 0: incoming to unserviced namespace services (source telemetry)",
            "tcp received 1: incoming, destination and waypoint telemetry",
            "tcp received 2: outgoing, source and waypoint telemetry",
        ),
        (
            "istio_tcp_sent_bytes_total",
            "tcp sent 0: incoming to unserviced namespace services (source telemetry)",
            "tcp sent 1: incoming, destination and waypoint telemetry",
            "tcp sent 2: outgoing, source and waypoint telemetry",
        ),
    ] {
        q.push(KialiQuery {
            purpose: unserviced,
            promql: format!(
                r#"sum(rate({m}{{{src},source_workload_namespace!="{ns}",destination_workload_namespace="unknown",destination_workload="unknown",destination_service=~"^.+\\.{ns}\\..+$"}} [{d}])) by ({g}) > 0"#
            ),
        });
        q.push(KialiQuery {
            purpose: incoming,
            promql: format!(r#"sum(rate({m}{{{dst},destination_workload_namespace="{ns}"}} [{d}])) by ({g}) > 0"#),
        });
        q.push(KialiQuery {
            purpose: outgoing,
            promql: format!(r#"sum(rate({m}{{{src},source_workload_namespace="{ns}"}} [{d}])) by ({g}) > 0"#),
        });
    }

    // securityPolicy appender: destination (and waypoint) telemetry, which carries the
    // connection_security_policy, for traffic from outside then from inside the namespace.
    let g = KIALI_GROUP_BY_SECURITY;
    let part = |m: &str, sel: &str| format!("(sum(rate({m}{{{sel}}}[{d}])) by ({g}) > 0)");
    let from_outside = format!(r#"{dst},source_workload_namespace!="{ns}",destination_service_namespace="{ns}""#);
    q.push(KialiQuery {
        purpose: "security policy 1: traffic into the namespace from outside",
        promql: [
            part("istio_requests_total", &from_outside),
            part("istio_tcp_sent_bytes_total", &from_outside),
            part("istio_tcp_received_bytes_total", &from_outside),
        ]
        .join(" OR "),
    });
    let from_inside = format!(r#"{dst},source_workload_namespace="{ns}""#);
    let ztunnel_source = format!(r#"app="ztunnel",reporter="source",source_workload_namespace="{ns}""#);
    q.push(KialiQuery {
        purpose: "security policy 2: traffic from the namespace (plus ztunnel source telemetry)",
        promql: [
            part("istio_requests_total", &from_inside),
            part("istio_tcp_sent_bytes_total", &from_inside),
            part("istio_tcp_received_bytes_total", &from_inside),
            part("istio_tcp_sent_bytes_total", &ztunnel_source),
            part("istio_tcp_received_bytes_total", &ztunnel_source),
        ]
        .join(" OR "),
    });

    // responseTime appender, default quantile 0.95.
    let g = KIALI_GROUP_BY_RESPONSE_TIME;
    let m = "istio_request_duration_milliseconds_bucket";
    q.push(KialiQuery {
        purpose: "response time 0: p95 incoming from outside, source telemetry (ambient namespaces)",
        promql: format!(
            r#"histogram_quantile(0.95, sum(rate({m}{{reporter="source",source_workload_namespace!="{ns}",destination_service_namespace="{ns}"}}[{d}])) by ({g})) > 0"#
        ),
    });
    q.push(KialiQuery {
        purpose: "response time 1: p95 incoming, destination and waypoint telemetry",
        promql: format!(
            r#"histogram_quantile(0.95, sum(rate({m}{{{dst},destination_service_namespace="{ns}"}}[{d}])) by ({g})) > 0"#
        ),
    });
    q.push(KialiQuery {
        purpose: "response time 2: p95 outgoing, source and waypoint telemetry",
        promql: format!(
            r#"histogram_quantile(0.95, sum(rate({m}{{{src},source_workload_namespace="{ns}"}}[{d}])) by ({g})) > 0"#
        ),
    });
    q
}
