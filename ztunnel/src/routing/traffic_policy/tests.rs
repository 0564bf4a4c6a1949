//! Tests of DestinationRule `trafficPolicy`: Istio's override rules (subset over top level,
//! port entries over both, no inheritance into port entries), the defaults, strict reading,
//! and one test per validation error, each checking the field the error names.
use std::time::Duration;

use super::*;
use crate::routing::objects;

/// Compiles a DestinationRule `spec` as `objects::load` does.
fn dr(spec: &str) -> Result<DrPolicy, String> {
    let spec: objects::DestinationRule = serde_yaml_ng::from_str(spec).map_err(|e| e.to_string())?;
    let subsets: Vec<_> = spec.subsets.iter().map(|s| (s.name.as_str(), s.traffic_policy.as_ref())).collect();
    DrPolicy::compile(spec.traffic_policy.as_ref(), &subsets).map_err(|e| e.to_string())
}

fn ok(spec: &str) -> DrPolicy {
    dr(spec).unwrap_or_else(|e| panic!("{e}"))
}

/// The error of a spec whose top-level `trafficPolicy` is `policy` (YAML flow mapping).
fn invalid(policy: &str) -> String {
    match dr(&format!("host: r\ntrafficPolicy: {policy}\n")) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e,
    }
}

const LAYERED: &str = r#"
host: reviews
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 100}}
  outlierDetection: {consecutive5xxErrors: 7}
  tls: {mode: ISTIO_MUTUAL}
  portLevelSettings:
  - port: {number: 9080}
    loadBalancer: {simple: RANDOM}
  - port: {number: 9080}
    loadBalancer: {simple: PASSTHROUGH}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 5}}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    portLevelSettings:
    - port: {number: 9443}
      outlierDetection: {consecutive5xxErrors: 2}
- name: v3
  labels: {version: v3}
"#;

#[test]
fn top_level_policy_applies_to_a_port_without_an_entry() {
    let p = ok(LAYERED).effective(None, 80);
    assert_eq!(p.load_balancer, LbAlgorithm::RoundRobin);
    assert_eq!(p.connection_pool.max_connections, 100);
    assert_eq!(p.outlier.unwrap().consecutive_5xx, Some(7));
    assert_eq!(p.tls, Some(TlsMode::IstioMutual));
}

#[test]
fn port_entry_replaces_all_four_components_and_the_rest_take_defaults() {
    let p = ok(LAYERED).effective(None, 9080);
    assert_eq!(p.load_balancer, LbAlgorithm::Random);
    assert_eq!(p.connection_pool, PoolLimits::default(), "not inherited from the top level");
    assert_eq!(p.outlier, None, "not inherited from the top level");
    assert_eq!(p.tls, None, "not inherited from the top level");
}

#[test]
fn first_port_entry_for_a_port_wins() {
    assert_eq!(ok(LAYERED).effective(None, 9080).load_balancer, LbAlgorithm::Random);
}

#[test]
fn subset_policy_overrides_only_the_components_it_sets() {
    let p = ok(LAYERED).effective(Some("v1"), 80);
    assert_eq!(p.connection_pool.max_connections, 5);
    assert_eq!(p.load_balancer, LbAlgorithm::RoundRobin, "from the top level");
    assert_eq!(p.outlier.unwrap().consecutive_5xx, Some(7), "from the top level");
    assert_eq!(p.tls, Some(TlsMode::IstioMutual), "from the top level");
}

#[test]
fn subset_policy_overrides_the_top_level_port_entry_component_by_component() {
    let p = ok(LAYERED).effective(Some("v1"), 9080);
    assert_eq!(p.connection_pool.max_connections, 5, "the subset's");
    assert_eq!(p.load_balancer, LbAlgorithm::Random, "the top-level port entry's");
    assert_eq!(p.tls, None, "the top-level port entry's (unset)");
}

#[test]
fn subset_port_entry_replaces_everything_for_its_port() {
    let p = ok(LAYERED).effective(Some("v2"), 9443);
    assert_eq!(p.outlier.unwrap().consecutive_5xx, Some(2));
    assert_eq!(p.load_balancer, LbAlgorithm::LeastRequest, "default, not the subset's own loadBalancer");
    assert_eq!(p.connection_pool, PoolLimits::default());
    assert_eq!(p.tls, None);
}

#[test]
fn subset_without_a_port_entry_for_the_port_uses_its_own_components() {
    let p = ok(LAYERED).effective(Some("v2"), 80);
    assert_eq!(p.load_balancer, LbAlgorithm::LeastRequest);
    assert_eq!(p.connection_pool.max_connections, 100, "from the top level");
}

#[test]
fn subset_without_a_policy_gets_the_top_level_one() {
    assert_eq!(ok(LAYERED).effective(Some("v3"), 80), ok(LAYERED).effective(None, 80));
}

#[test]
fn unknown_subset_gets_the_top_level_policy() {
    assert_eq!(ok(LAYERED).effective(Some("v9"), 9080), ok(LAYERED).effective(None, 9080));
}

#[test]
fn subset_policy_applies_when_the_top_level_has_none() {
    let p = ok("host: r\nsubsets: [{name: a, trafficPolicy: {loadBalancer: {simple: RANDOM}}}]\n");
    assert_eq!(p.effective(Some("a"), 80).load_balancer, LbAlgorithm::Random);
    assert_eq!(p.effective(None, 80), EffectivePolicy::default());
}

#[test]
fn no_policy_means_istio_defaults() {
    let p = EffectivePolicy::default();
    assert_eq!(p.load_balancer, LbAlgorithm::LeastRequest);
    assert_eq!(p.outlier, None);
    assert_eq!(p.tls, None);
    assert!(p.locality.enabled && !p.locality.failover_active);
    let c = p.connection_pool;
    assert_eq!(
        (c.max_connections, c.max_pending_requests, c.max_requests, c.max_retries),
        (u32::MAX, u32::MAX, u32::MAX, u32::MAX)
    );
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(c.max_requests_per_connection, None);
}

#[test]
fn empty_outlier_detection_takes_envoy_defaults() {
    let p = ok("host: r\ntrafficPolicy: {outlierDetection: {}}\n").effective(None, 80);
    let o = p.outlier.unwrap();
    assert_eq!(o.consecutive_5xx, Some(5));
    assert_eq!(o.consecutive_gateway, None);
    assert_eq!(o.interval, Duration::from_secs(10));
    assert_eq!(o.base_ejection_time, Duration::from_secs(30));
    assert_eq!(o.max_ejection_time, Duration::from_secs(300));
    assert_eq!(o.max_ejection_percent, 10);
    assert_eq!(o.min_health_percent, 0);
}

#[test]
fn outlier_values_are_read() {
    let p = ok(r#"
host: r
trafficPolicy:
  outlierDetection:
    consecutive5xxErrors: 3
    consecutiveGatewayErrors: 2
    interval: 500ms
    baseEjectionTime: 10m
    maxEjectionPercent: 50
    minHealthPercent: 30
"#)
    .effective(None, 80);
    let o = p.outlier.unwrap();
    assert_eq!((o.consecutive_5xx, o.consecutive_gateway), (Some(3), Some(2)));
    assert_eq!(o.interval, Duration::from_millis(500));
    assert_eq!(o.base_ejection_time, Duration::from_secs(600));
    assert_eq!(o.max_ejection_time, Duration::from_secs(600), "max(300s, base)");
    assert_eq!((o.max_ejection_percent, o.min_health_percent), (50, 30));
}

#[test]
fn max_ejection_percent_zero_means_envoys_ten() {
    let p = ok("host: r\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 0}}\n").effective(None, 80);
    assert_eq!(p.outlier.unwrap().max_ejection_percent, 10);
}

#[test]
fn consecutive_5xx_zero_disables_it() {
    let p = ok("host: r\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 0}}\n").effective(None, 80);
    assert_eq!(p.outlier.unwrap().consecutive_5xx, None);
}

#[test]
fn deprecated_consecutive_errors_is_accepted_and_ignored() {
    let p = ok("host: r\ntrafficPolicy: {outlierDetection: {consecutiveErrors: 2}}\n").effective(None, 80);
    assert_eq!(p.outlier.unwrap(), OutlierPolicy::default());
}

#[test]
fn locality_failover_is_active_only_with_outlier_detection() {
    let without = ok("host: r\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}\n").effective(None, 80);
    assert!(!without.locality.failover_active);
    let with = ok("host: r\ntrafficPolicy: {outlierDetection: {}}\n").effective(None, 80);
    assert!(with.locality.failover_active, "mesh default locality LB is on");
}

#[test]
fn locality_disabled_turns_failover_off() {
    let p = ok("host: r\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {enabled: false}}}\n")
        .effective(None, 80);
    assert!(!p.locality.enabled && !p.locality.failover_active);
}

#[test]
fn locality_settings_are_read() {
    let p = ok(r#"
host: r
trafficPolicy:
  outlierDetection: {}
  loadBalancer:
    localityLbSetting:
      failover: [{from: us-east, to: us-west}]
      failoverPriority: [app]
"#)
    .effective(None, 80);
    assert_eq!(p.locality.failover, vec![("us-east".to_string(), "us-west".to_string())]);
    assert_eq!(p.locality.failover_priority, vec!["app".to_string()]);
    let d = ok("host: r\ntrafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {a/*: 80, b/*: 20}}]}}}\n")
        .effective(None, 80);
    assert_eq!(d.locality.distribute, vec![("a/*".into(), vec![("a/*".into(), 80), ("b/*".into(), 20)])]);
}

#[test]
fn simple_aliases_resolve_to_least_request() {
    for s in ["UNSPECIFIED", "LEAST_CONN", "LEAST_REQUEST"] {
        let p = ok(&format!("host: r\ntrafficPolicy: {{loadBalancer: {{simple: {s}}}}}\n")).effective(None, 80);
        assert_eq!(p.load_balancer, LbAlgorithm::LeastRequest, "{s}");
    }
}

#[test]
fn consistent_hash_defaults_to_a_ring_of_1024() {
    let p =
        ok("host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}\n").effective(None, 80);
    let want = HashPolicy { key: HashKey::Header("x-user".into()), table: HashTable::Ring { minimum_ring_size: 1024 } };
    assert_eq!(p.load_balancer, LbAlgorithm::ConsistentHash(want));
}

#[test]
fn deprecated_minimum_ring_size_sizes_the_ring() {
    let p = ok("host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 42}}}\n")
        .effective(None, 80);
    let want = HashPolicy { key: HashKey::SourceIp, table: HashTable::Ring { minimum_ring_size: 42 } };
    assert_eq!(p.load_balancer, LbAlgorithm::ConsistentHash(want));
}

#[test]
fn maglev_and_query_parameter_are_read() {
    let p = ok("host: r\ntrafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: u, maglev: {tableSize: 65537}}}}\n")
        .effective(None, 80);
    let want = HashPolicy { key: HashKey::QueryParameter("u".into()), table: HashTable::Maglev { table_size: 65537 } };
    assert_eq!(p.load_balancer, LbAlgorithm::ConsistentHash(want));
}

#[test]
fn cookie_key_keeps_path_ttl_and_attributes() {
    let p = ok(r#"
host: r
trafficPolicy:
  loadBalancer:
    consistentHash:
      httpCookie: {name: session, path: /app, ttl: 1h, attributes: [{name: SameSite, value: Strict}, {name: Secure}]}
"#)
    .effective(None, 80);
    let LbAlgorithm::ConsistentHash(HashPolicy { key: HashKey::Cookie(c), .. }) = p.load_balancer else { panic!() };
    assert_eq!(c.name, "session");
    assert_eq!(c.path.as_deref(), Some("/app"));
    assert_eq!(c.ttl, Some(Duration::from_secs(3600)));
    assert_eq!(c.attributes, vec![("SameSite".into(), Some("Strict".into())), ("Secure".into(), None)]);
}

#[test]
fn cookie_ttl_zero_is_a_session_cookie_and_no_ttl_generates_none() {
    let cookie = |ttl: &str| {
        let p = ok(&format!(
            "host: r\ntrafficPolicy: {{loadBalancer: {{consistentHash: {{httpCookie: {{name: s{ttl}}}}}}}}}\n"
        ))
        .effective(None, 80);
        let LbAlgorithm::ConsistentHash(HashPolicy { key: HashKey::Cookie(c), .. }) = p.load_balancer else { panic!() };
        c.ttl
    };
    assert_eq!(cookie(", ttl: 0s"), Some(Duration::ZERO));
    assert_eq!(cookie(""), None);
}

#[test]
fn connection_pool_values_are_read() {
    let p = ok(r#"
host: r
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 99, connectTimeout: 6s, tcpKeepalive: {time: 7200s, interval: 75s}}
    http: {http1MaxPendingRequests: 14, http2MaxRequests: 33, maxRequestsPerConnection: 65, maxRetries: 4,
           idleTimeout: 30s, h2UpgradePolicy: UPGRADE}
"#)
    .effective(None, 80);
    let c = p.connection_pool;
    assert_eq!((c.max_connections, c.max_pending_requests, c.max_requests, c.max_retries), (99, 14, 33, 4));
    assert_eq!(c.max_requests_per_connection, Some(65));
    assert_eq!(c.connect_timeout, Duration::from_secs(6));
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(30)));
    assert_eq!(c.h2_upgrade_policy, H2UpgradePolicy::Upgrade);
}

#[test]
fn zero_limits_mean_the_defaults() {
    let p = ok("host: r\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 0}, http: {maxRetries: 0}}}\n")
        .effective(None, 80);
    assert_eq!((p.connection_pool.max_connections, p.connection_pool.max_retries), (u32::MAX, u32::MAX));
}

#[test]
fn tcp_idle_timeout_applies_without_an_http_one_and_zero_disables_it() {
    let idle = |pool: &str| {
        ok(&format!("host: r\ntrafficPolicy: {{connectionPool: {pool}}}\n"))
            .effective(None, 80)
            .connection_pool
            .idle_timeout
    };
    assert_eq!(idle("{tcp: {idleTimeout: 5m}}"), Some(Duration::from_secs(300)));
    assert_eq!(idle("{tcp: {idleTimeout: 5m}, http: {idleTimeout: 10s}}"), Some(Duration::from_secs(10)));
    assert_eq!(idle("{tcp: {idleTimeout: 0s}}"), None);
}

#[test]
fn tls_mode_is_exposed_and_defaults_to_disable_when_tls_is_set() {
    let mode = |tls: &str| ok(&format!("host: r\ntrafficPolicy: {{tls: {tls}}}\n")).effective(None, 80).tls;
    assert_eq!(mode("{mode: ISTIO_MUTUAL}"), Some(TlsMode::IstioMutual));
    assert_eq!(mode("{mode: SIMPLE, sni: r.example, subjectAltNames: [r]}"), Some(TlsMode::Simple));
    assert_eq!(mode("{mode: MUTUAL, credentialName: r-cred}"), Some(TlsMode::Mutual));
    assert_eq!(mode("{sni: x}"), Some(TlsMode::Disable));
}

#[test]
fn accepted_but_unapplied_fields_do_not_reject() {
    ok(r#"
host: r
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 300s, minimumPercent: 5.0}}
  connectionPool:
    tcp: {maxConnectionDuration: 1h}
    http: {maxConcurrentStreams: 10, http2KeepAlive: {interval: 15s, timeout: 5s}, useClientProtocol: true}
  outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3, outlierDetectionHttpErrorCodes: [503]}
  tunnel: {protocol: CONNECT, targetHost: example.com, targetPort: 443}
  retryBudget: {percent: 20}
"#);
}

#[test]
fn a_rule_using_most_fields_at_every_level_compiles() {
    let p = ok(r#"
host: all.ns.svc.cluster.local
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN, localityLbSetting: {enabled: true, failover: [{from: r1, to: r2}]}}
  connectionPool:
    tcp: {maxConnections: 99, connectTimeout: 6s}
    http: {http2MaxRequests: 33, maxRequestsPerConnection: 65, maxRetries: 4, http1MaxPendingRequests: 14}
  outlierDetection: {interval: 8ms, baseEjectionTime: 1m, maxEjectionPercent: 11}
  tls: {mode: DISABLE}
  portLevelSettings:
  - port: {number: 8443}
    tls: {mode: SIMPLE, sni: all.example, insecureSkipVerify: true}
subsets:
- name: v1
  labels: {version: v1}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: Cookie, ttl: 30s}, minimumRingSize: 42}}
    portLevelSettings:
    - port: {number: 9000}
      connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE, useClientProtocol: true}}
"#);
    let v2 = p.effective(Some("v2"), 80);
    assert!(matches!(v2.load_balancer, LbAlgorithm::ConsistentHash(_)));
    assert_eq!(v2.outlier.unwrap().interval, Duration::from_millis(8));
    assert_eq!(p.effective(None, 8443).tls, Some(TlsMode::Simple));
    assert!(p.effective(Some("v2"), 9000).connection_pool.use_client_protocol);
}

#[test]
fn a_misspelt_field_is_a_rejection() {
    let e = invalid("{outlierDetection: {maxEjectionPercentage: 50}}");
    assert!(e.contains("maxEjectionPercentage"), "{e}");
    let e = invalid("{loadBalancer: {simple: ROUND_ROBBIN}}");
    assert!(e.contains("ROUND_ROBBIN"), "{e}");
}

#[test]
fn later_destination_rules_add_subsets_but_not_a_second_top_level_policy() {
    let mut map = BTreeMap::new();
    insert(&mut map, "r", ok("host: r\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}\n"));
    insert(
        &mut map,
        "r",
        ok("host: r\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\nsubsets: [{name: a, trafficPolicy: {tls: {}}}]\n"),
    );
    let p = &map["r"];
    assert_eq!(p.effective(None, 80).load_balancer, LbAlgorithm::Random);
    assert_eq!(p.effective(Some("a"), 80).tls, Some(TlsMode::Disable));
}

#[test]
fn a_rule_without_any_policy_is_not_stored() {
    let mut map = BTreeMap::new();
    insert(&mut map, "r", ok("host: r\nsubsets: [{name: a}]\n"));
    assert!(map.is_empty());
}

#[test]
fn load_keeps_policies_by_host_and_rejects_an_invalid_one_with_its_name() {
    let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: good, namespace: ns}
spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bad, namespace: ns}
spec: {host: ratings, trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}, subsets: [{name: v1}]}
"#,
    )
    .map(|d| <serde_yaml_ng::Value as serde::Deserialize>::deserialize(d).unwrap())
    .collect();
    let o = objects::load(&docs);
    assert_eq!(o.policies["reviews"].effective(None, 80).load_balancer, LbAlgorithm::Random);
    assert!(!o.policies.contains_key("ratings") && !o.subsets.contains_key("ratings"));
    assert_eq!(o.rejected.len(), 1);
    let r = o.rejected[0].to_string();
    assert!(
        r.contains("ns/bad") && r.contains("trafficPolicy.outlierDetection.maxEjectionPercent: 150 is over 100"),
        "{r}"
    );
}

// --- validation errors, one per test, each naming its field ---------------------------------

#[test]
fn max_ejection_percent_over_100_is_rejected() {
    assert_eq!(
        invalid("{outlierDetection: {maxEjectionPercent: 150}}"),
        "trafficPolicy.outlierDetection.maxEjectionPercent: 150 is over 100"
    );
}

#[test]
fn negative_min_health_percent_is_rejected() {
    assert_eq!(
        invalid("{outlierDetection: {minHealthPercent: -1}}"),
        "trafficPolicy.outlierDetection.minHealthPercent: -1 is negative"
    );
}

#[test]
fn ejection_interval_under_a_millisecond_is_rejected() {
    assert_eq!(
        invalid("{outlierDetection: {interval: 0s}}"),
        "trafficPolicy.outlierDetection.interval: \"0s\" is under 1ms"
    );
}

#[test]
fn base_ejection_time_finer_than_a_millisecond_is_rejected() {
    assert_eq!(
        invalid("{outlierDetection: {baseEjectionTime: 1.0005s}}"),
        "trafficPolicy.outlierDetection.baseEjectionTime: \"1.0005s\" is not in whole milliseconds"
    );
}

#[test]
fn unparseable_duration_is_rejected() {
    let e = invalid("{connectionPool: {tcp: {connectTimeout: soon}}}");
    assert!(e.starts_with("trafficPolicy.connectionPool.tcp.connectTimeout: duration \"soon\""), "{e}");
}

#[test]
fn consistent_hash_without_a_key_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 10}}}}"),
        "trafficPolicy.loadBalancer.consistentHash: exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName"
    );
}

#[test]
fn consistent_hash_with_two_keys_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {httpHeaderName: x, useSourceIp: true}}}"),
        "trafficPolicy.loadBalancer.consistentHash: exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName"
    );
}

#[test]
fn simple_with_consistent_hash_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}"),
        "trafficPolicy.loadBalancer: only one of simple, consistentHash"
    );
}

#[test]
fn ring_hash_with_maglev_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {}, maglev: {tableSize: 7}}}}"),
        "trafficPolicy.loadBalancer.consistentHash: only one of ringHash, maglev"
    );
}

#[test]
fn deprecated_ring_size_with_maglev_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 8, maglev: {tableSize: 7}}}}"),
        "trafficPolicy.loadBalancer.consistentHash.minimumRingSize: minimumRingSize (deprecated) cannot be set with ringHash or maglev"
    );
}

#[test]
fn maglev_table_size_that_is_not_prime_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65536}}}}"),
        "trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: 65536 is not a prime"
    );
}

#[test]
fn maglev_without_table_size_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {}}}}"),
        "trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: is required"
    );
}

#[test]
fn maglev_table_of_5000011_or_more_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 5000011}}}}"),
        "trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: 5000011 is over 5000010"
    );
}

#[test]
fn ring_size_over_envoys_maximum_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 8388609}}}}"),
        "trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize: 8388609 is over 8388608"
    );
}

#[test]
fn cookie_without_a_name_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {httpCookie: {ttl: 1s}}}}"),
        "trafficPolicy.loadBalancer.consistentHash.httpCookie.name: is required"
    );
}

#[test]
fn cookie_attribute_without_a_name_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {httpCookie: {name: s, attributes: [{value: x}]}}}}"),
        "trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[0].name: is required"
    );
}

#[test]
fn hash_header_that_is_not_a_header_name_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {httpHeaderName: \"bad name\"}}}"),
        "trafficPolicy.loadBalancer.consistentHash.httpHeaderName: \"bad name\" is not a header name"
    );
}

#[test]
fn empty_query_parameter_name_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {consistentHash: {httpQueryParameterName: \"\"}}}"),
        "trafficPolicy.loadBalancer.consistentHash.httpQueryParameterName: is required"
    );
}

#[test]
fn empty_traffic_policy_is_rejected() {
    assert_eq!(invalid("{}"), "trafficPolicy: must have at least one field");
}

#[test]
fn empty_port_entry_is_rejected() {
    assert_eq!(
        invalid("{portLevelSettings: [{port: {number: 80}}]}"),
        "trafficPolicy.portLevelSettings[0]: must have at least one field"
    );
}

#[test]
fn port_entry_without_a_port_is_rejected() {
    assert_eq!(invalid("{portLevelSettings: [{tls: {}}]}"), "trafficPolicy.portLevelSettings[0].port: is required");
}

#[test]
fn empty_connection_pool_is_rejected() {
    assert_eq!(invalid("{connectionPool: {}}"), "trafficPolicy.connectionPool: must have at least one field");
}

#[test]
fn negative_max_connections_is_rejected() {
    assert_eq!(
        invalid("{connectionPool: {tcp: {maxConnections: -1}}}"),
        "trafficPolicy.connectionPool.tcp.maxConnections: -1 is negative"
    );
}

#[test]
fn limit_beyond_int32_is_rejected() {
    assert_eq!(
        invalid("{connectionPool: {http: {http2MaxRequests: 2147483648}}}"),
        "trafficPolicy.connectionPool.http.http2MaxRequests: 2147483648 is out of the int32 range"
    );
}

#[test]
fn client_protocol_with_h2_upgrade_is_rejected() {
    assert_eq!(
        invalid("{connectionPool: {http: {useClientProtocol: true, h2UpgradePolicy: UPGRADE}}}"),
        "trafficPolicy.connectionPool.http.useClientProtocol: useClientProtocol cannot be true with h2UpgradePolicy UPGRADE"
    );
}

#[test]
fn distribute_with_failover_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {a/*: 100}}], failover: [{from: a, to: b}]}}}"),
        "trafficPolicy.loadBalancer.localityLbSetting: distribute and failover cannot both be set"
    );
}

#[test]
fn distribute_weights_not_totalling_100_are_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {a/*: 60, b/*: 30}}]}}}"),
        "trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: weights total 90, not 100"
    );
}

#[test]
fn distribute_weight_of_zero_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {a/*: 100, b/*: 0}}]}}}"),
        "trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to[b/*]: weight 0 is not in 1..=100"
    );
}

#[test]
fn locality_with_a_wildcard_not_last_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {localityLbSetting: {distribute: [{from: \"*/z\", to: {a/*: 100}}]}}}"),
        "trafficPolicy.loadBalancer.localityLbSetting.distribute[0].from: \"*/z\": '*' may appear once, last, and no part may be empty"
    );
}

#[test]
fn failover_to_the_same_region_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {localityLbSetting: {failover: [{from: a, to: a}]}}}"),
        "trafficPolicy.loadBalancer.localityLbSetting.failover[0]: from and to are both \"a\""
    );
}

#[test]
fn failover_naming_a_zone_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {localityLbSetting: {failover: [{from: a/z, to: b}]}}}"),
        "trafficPolicy.loadBalancer.localityLbSetting.failover[0].from: \"a/z\" is not a region (no '/' or '*')"
    );
}

#[test]
fn failover_with_a_topology_failover_priority_is_rejected() {
    assert_eq!(
        invalid("{loadBalancer: {localityLbSetting: {failover: [{from: a, to: b}], failoverPriority: [topology.kubernetes.io/zone]}}}"),
        "trafficPolicy.loadBalancer.localityLbSetting.failoverPriority: failover cannot be set with topology label topology.kubernetes.io/zone in failoverPriority"
    );
}

#[test]
fn mutual_tls_without_a_certificate_is_rejected() {
    assert_eq!(
        invalid("{tls: {mode: MUTUAL, clientCertificate: /c.pem}}"),
        "trafficPolicy.tls: MUTUAL without credentialName needs clientCertificate and privateKey"
    );
}

#[test]
fn errors_in_a_port_entry_name_the_entry() {
    assert_eq!(
        invalid("{portLevelSettings: [{port: {number: 80}, outlierDetection: {maxEjectionPercent: 101}}]}"),
        "trafficPolicy.portLevelSettings[0].outlierDetection.maxEjectionPercent: 101 is over 100"
    );
}

#[test]
fn errors_in_a_subset_policy_name_the_subset() {
    let e =
        dr("host: r\nsubsets: [{name: v1, trafficPolicy: {connectionPool: {http: {maxRetries: -2}}}}]\n").unwrap_err();
    assert_eq!(e, "subsets[v1].trafficPolicy.connectionPool.http.maxRetries: -2 is negative");
}
