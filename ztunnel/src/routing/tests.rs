//! The routing engine as tables: request → expected decision, for every field of Istio's
//! `HTTPMatchRequest` and `HTTPRoute` the engine implements, with the tricky parts called
//! out; and validation cases, each rejected with its reason. Istio's own Bookinfo samples
//! load when `../shared` is present.
use std::collections::{BTreeMap, BTreeSet};

use super::spec::VirtualService;
use super::*;

fn subsets() -> BTreeMap<String, BTreeSet<String>> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>();
    BTreeMap::from([("reviews".to_string(), s(&["v1", "v2", "v3"])), ("ratings".to_string(), s(&["v1"]))])
}

fn router(yaml: &str) -> Router {
    let vs: VirtualService = serde_yaml_ng::from_str(yaml).unwrap();
    compile("test", &vs, &subsets()).unwrap()
}

fn invalid(yaml: &str) -> String {
    let vs: VirtualService = serde_yaml_ng::from_str(yaml).unwrap();
    compile("bad-vs", &vs, &subsets()).unwrap_err().to_string()
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<'static> {
    Request {
        method: method.to_string().into(),
        scheme: "http".into(),
        authority: "reviews:9080".into(),
        path: path.to_string().into(),
        headers: headers.iter().map(|(k, v)| (k.to_string().into(), v.to_string().into())).collect(),
        port: 9080,
    }
}

/// The subset a request is forwarded to, or "none" when no rule matched.
fn subset(r: &Router, q: &Request) -> String {
    match r.decide(q, 0) {
        Some(Decision::Forward { destination, .. }) => destination.subset.unwrap_or_else(|| "-".into()),
        Some(other) => format!("{other:?}"),
        None => "none".into(),
    }
}

#[test]
fn match_fields_route_as_istio_does() {
    let r = router(
        r#"
hosts: [reviews]
http:
- match: [{uri: {regex: "/api/v[0-9]+"}}]
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{uri: {prefix: "/pre"}}]
  route: [{destination: {host: reviews, subset: v2}}]
- match: [{uri: {exact: "/Exact"}, ignoreUriCase: true}]
  route: [{destination: {host: reviews, subset: v3}}]
- match: [{headers: {end-user: {exact: jason}}}]
  route: [{destination: {host: reviews, subset: v2}}]
- match: [{queryParams: {debug: {exact: ""}}}]
  route: [{destination: {host: reviews, subset: v3}}]
- match: [{method: {exact: POST}, port: 9080}]
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{authority: {prefix: "ratings"}}, {scheme: {exact: https}}]
  route: [{destination: {host: ratings, subset: v1}}]
- match: [{withoutHeaders: {x-canary: {}}, uri: {prefix: "/stable"}}]
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{sourceLabels: {app: productpage}}]
  route: [{destination: {host: reviews, subset: v3}}]
- route: [{destination: {host: reviews}}]
"#,
    );
    let cases: Vec<(Request, &str, &str)> = vec![
        (req("GET", "/api/v2", &[]), "v1", "a regex matches the whole path"),
        (req("GET", "/api/v2/x", &[]), "-", "a regex must match the whole string, not a part"),
        (req("GET", "/prefix", &[]), "v2", "prefix is a raw string prefix (no segment rule)"),
        (req("GET", "/pre", &[]), "v2", "prefix matches itself"),
        (req("GET", "/EXACT", &[]), "v3", "ignoreUriCase"),
        (req("GET", "/exact?x=1", &[]), "v3", "the query string is not part of the uri"),
        (req("GET", "/", &[("end-user", "jason")]), "v2", "header exact"),
        (req("GET", "/", &[("end-user", "Jason")]), "-", "header exact is case-sensitive in the value"),
        (req("GET", "/?debug", &[]), "v3", "exact \"\" on a query parameter means present"),
        (req("GET", "/?debug=1", &[]), "v3", "exact \"\" on a query parameter matches any value"),
        (req("POST", "/", &[]), "v1", "method and port AND together"),
        (req("GET", "/", &[]), "-", "a rule without match catches all"),
        (req("GET", "/stable", &[]), "v1", "withoutHeaders: absent header"),
        (req("GET", "/stable", &[("x-canary", "1")]), "-", "withoutHeaders: present header excludes"),
    ];
    for (q, want, why) in cases {
        assert_eq!(subset(&r, &q), want, "{why}: {} {} {:?}", q.method, q.path, q.headers);
    }
    let mut https = req("GET", "/", &[]);
    https.scheme = "https".into();
    assert_eq!(subset(&r, &https), "v1", "blocks OR: scheme block matches");
    let mut auth = req("GET", "/", &[]);
    auth.authority = "ratings.default:9080".into();
    assert_eq!(subset(&r, &auth), "v1", "blocks OR: authority block matches");
}

#[test]
fn a_sourcelabels_block_is_ignored_by_a_waypoint() {
    let r = router(
        "hosts: [reviews]\nhttp:\n- match: [{sourceLabels: {app: productpage}}]\n  route: [{destination: {host: reviews, subset: v3}}]\n- route: [{destination: {host: reviews, subset: v1}}]\n",
    );
    assert_eq!(subset(&r, &req("GET", "/", &[])), "v1");
}

#[test]
fn weights_split_by_roll_and_need_not_sum_to_100() {
    let r = router(
        "hosts: [reviews]\nhttp:\n- route:\n  - {destination: {host: reviews, subset: v1}, weight: 1}\n  - {destination: {host: reviews, subset: v3}, weight: 3}\n",
    );
    let mut counts = BTreeMap::new();
    for roll in 0..400u32 {
        let s = match r.decide(&req("GET", "/", &[]), roll) {
            Some(Decision::Forward { destination, .. }) => destination.subset.unwrap(),
            other => panic!("{other:?}"),
        };
        *counts.entry(s).or_insert(0) += 1;
    }
    assert_eq!(counts["v1"], 100);
    assert_eq!(counts["v3"], 300);
}

#[test]
fn redirect_rewrite_and_direct_response_decide_as_configured() {
    let r = router(
        r#"
hosts: [reviews]
http:
- match: [{uri: {prefix: /old}}]
  redirect: {uri: /new, authority: example.com, port: 8443, scheme: https, redirectCode: 308}
- match: [{uri: {prefix: /v1/api}}]
  rewrite: {uri: /api, authority: reviews-internal}
  route: [{destination: {host: reviews, subset: v1}}]
- match: [{uri: {prefix: /rx}}]
  rewrite: {uriRegexRewrite: {match: "^/rx/([a-z]+)", rewrite: "/x/\\1"}}
  route: [{destination: {host: reviews, subset: v2}}]
- match: [{uri: {exact: /health}}]
  directResponse: {status: 503, body: {string: down}}
"#,
    );
    assert_eq!(
        r.decide(&req("GET", "/old/x", &[]), 0),
        Some(Decision::Redirect { rule: 0, code: 308, location: "https://example.com:8443/new".into() })
    );
    match r.decide(&req("GET", "/v1/api/items?x=1", &[]), 0) {
        Some(Decision::Forward { path, authority, .. }) => {
            assert_eq!(path, "/api/items?x=1", "rewrite.uri replaces the matched prefix only");
            assert_eq!(authority, "reviews-internal");
        }
        other => panic!("{other:?}"),
    }
    match r.decide(&req("GET", "/rx/abc", &[]), 0) {
        Some(Decision::Forward { path, .. }) => assert_eq!(path, "/x/abc"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.decide(&req("GET", "/health", &[]), 0),
        Some(Decision::Respond { rule: 3, status: 503, body: "down".into() })
    );
    assert_eq!(r.decide(&req("GET", "/other", &[]), 0), None, "no rule matches");
}

#[test]
fn timeouts_retries_faults_and_mirrors_compile_with_istio_defaults() {
    let r = router(
        r#"
hosts: [ratings]
http:
- match: [{headers: {end-user: {exact: jason}}}]
  fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}, abort: {httpStatus: 500, percentage: {value: 10}}}
  timeout: 0.5s
  retries: {attempts: 3, perTryTimeout: 100ms, retryOn: 5xx}
  mirror: {host: reviews, subset: v2}
  mirrorPercentage: {value: 50}
  route: [{destination: {host: ratings, subset: v1}}]
- route: [{destination: {host: ratings}}]
"#,
    );
    let (_, first, _) = r.find(&req("GET", "/", &[("end-user", "jason")])).unwrap();
    assert_eq!(first.timeout, Some(std::time::Duration::from_millis(500)));
    assert_eq!(first.retries.attempts, 3);
    assert_eq!(first.retries.per_try_timeout, Some(std::time::Duration::from_millis(100)));
    assert_eq!(first.retries.retry_on, "5xx");
    assert_eq!(first.mirrors.len(), 1);
    assert_eq!(first.mirrors[0].1, 50.0);
    let (_, second, _) = r.find(&req("GET", "/", &[])).unwrap();
    assert_eq!(second.timeout, None, "no timeout unless set");
    assert_eq!(second.retries.attempts, 2, "Istio's default attempts");
    assert_eq!(second.retries.retry_on, compile::DEFAULT_RETRY_ON);
}

#[test]
fn tcp_routes_match_ports_and_keep_weights() {
    let r = router(
        "hosts: [tcp-echo]\ntcp:\n- match: [{port: 9000}]\n  route:\n  - {destination: {host: reviews, subset: v1}, weight: 80}\n  - {destination: {host: reviews, subset: v2}, weight: 20}\n",
    );
    let t = r.tcp_targets(9000).unwrap();
    assert_eq!(t.iter().map(|(_, w)| *w).collect::<Vec<_>>(), vec![80, 20]);
    assert!(r.tcp_targets(9001).is_none());
}

#[test]
fn invalid_virtual_services_are_rejected_with_their_name_and_reason() {
    let cases = [
        ("http:\n- route:\n  - {destination: {host: reviews, subset: v1}, weight: -1}\n  - {destination: {host: reviews, subset: v2}, weight: 101}\n", "negative"),
        ("http:\n- redirect: {uri: /x}\n  route: [{destination: {host: reviews}}]\n", "both redirect and route"),
        ("http:\n- match: [{uri: {regex: \"(\"}}]\n  route: [{destination: {host: reviews}}]\n", "does not compile"),
        ("http:\n- fault: {abort: {httpStatus: 500, percentage: {value: 101}}}\n  route: [{destination: {host: reviews}}]\n", "outside 0-100"),
        ("http:\n- route: [{destination: {host: reviews, subset: v9}}]\n", "subset v9"),
        ("http:\n- match: [{uri: {exact: /a, prefix: /b}}]\n  route: [{destination: {host: reviews}}]\n", "only one of"),
        ("http:\n- timeout: 5x\n  route: [{destination: {host: reviews}}]\n", "unknown unit"),
        ("http:\n- name: empty\n", "needs one of"),
        ("http:\n- route:\n  - {destination: {host: reviews, subset: v1}}\n  - {destination: {host: reviews, subset: v2}}\n", "need weights"),
    ];
    for (yaml, reason) in cases {
        let e = invalid(yaml);
        assert!(e.starts_with("VirtualService bad-vs: ") && e.contains(reason), "{yaml}: {e}");
    }
}

fn yaml_docs(text: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

#[test]
fn objects_of_all_three_api_versions_load_and_a_bad_one_costs_only_itself() {
    let docs = yaml_docs(
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v2}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: bookinfo}
spec: {hosts: [ratings], http: [{route: [{destination: {host: reviews, subset: v7}}]}]}
---
apiVersion: networking.istio.io/v2
kind: VirtualService
metadata: {name: future, namespace: bookinfo}
spec: {hosts: [details]}
"#,
    );
    let o = objects::load(&docs);
    assert_eq!(o.subsets["reviews"]["v2"]["version"], "v2");
    assert_eq!(o.routers.keys().collect::<Vec<_>>(), vec!["bookinfo/reviews"]);
    let rejected: Vec<String> = o.rejected.iter().map(|e| e.to_string()).collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected[0].contains("bookinfo/broken") && rejected[0].contains("subset v7"), "{rejected:?}");
    assert!(rejected[1].contains("bookinfo/future") && rejected[1].contains("apiVersion"), "{rejected:?}");
}

#[test]
fn every_bookinfo_networking_sample_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/istio-samples/bookinfo/networking");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("bookinfo samples did NOT run: {} not found", dir.display());
        return;
    };
    let mut docs = vec![];
    let mut files = 0;
    for e in entries.flatten() {
        docs.extend(yaml_docs(&std::fs::read_to_string(e.path()).unwrap()));
        files += 1;
    }
    // The samples hold several versions of the same objects (one file per task): load each
    // file's VirtualServices against all the samples' DestinationRules.
    let rules: Vec<_> = docs.iter().filter(|d| d["kind"] == "DestinationRule").cloned().collect();
    let mut loaded = 0;
    for vs in docs.iter().filter(|d| d["kind"] == "VirtualService") {
        let mut set = rules.clone();
        set.push(vs.clone());
        let o = objects::load(&set);
        assert!(o.rejected.is_empty(), "{:?}", o.rejected);
        loaded += o.routers.len();
    }
    assert!(files >= 10 && loaded >= 10, "only {loaded} VirtualServices in {files} files of {}", dir.display());
}

#[test]
fn header_changes_and_cors_ride_with_the_decision() {
    let r = router(
        r#"
hosts: [reviews]
http:
- headers:
    request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
    response: {set: {x-d: "3"}}
  corsPolicy:
    allowOrigins: [{exact: "https://a.example"}, {regex: "https://.*\\.b\\.example"}]
    allowMethods: [GET]
    maxAge: 24h
  route:
  - destination: {host: reviews, subset: v1}
    headers: {request: {set: {x-dest: v1}}}
"#,
    );
    match r.decide(&req("GET", "/", &[]), 0) {
        Some(Decision::Forward { headers: Some(h), .. }) => {
            assert_eq!(h.request.unwrap().set.get("x-dest").map(String::as_str), Some("v1"))
        }
        other => panic!("{other:?}"),
    }
    let rule = r.rule(0).unwrap();
    assert_eq!(rule.headers.as_ref().unwrap().response.as_ref().unwrap().set["x-d"], "3");
    let cors = rule.cors.as_ref().unwrap();
    assert!(cors.allows_origin("https://a.example"));
    assert!(cors.allows_origin("https://x.b.example"));
    assert!(!cors.allows_origin("https://a.example.evil"), "exact is exact, regex is whole-string");
    assert!(invalid(
        "http:\n- headers: {request: {set: {\"bad name\": x}}}\n  route: [{destination: {host: reviews}}]\n"
    )
    .contains("header name"));
    assert!(invalid("http:\n- corsPolicy: {maxAge: soon}\n  route: [{destination: {host: reviews}}]\n")
        .contains("duration"));
}
