//! The waypoint's L7 configuration: arbitrary UTF-8 read as YAML documents (VirtualServices,
//! DestinationRules, AuthorizationPolicies) and compiled into a route table, twice (the second
//! time with the first as the last good version), then every router asked for a decision.
//!
//! Properties: nothing panics or loops; every object is either in force or rejected with a
//! reason; a decision names a rule that exists; the same input compiles to the same routers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::routing::Request;
use ztunnel::waypoint::routes::RouteTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text).take(16) {
        match <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc) {
            Ok(v) => docs.push(v),
            Err(_) => break,
        }
    }
    let first = RouteTable::load(&docs, &RouteTable::default());
    for bad in &first.rejected {
        assert!(!bad.reason.is_empty(), "{} rejected without a reason", bad.name);
    }
    let again = RouteTable::load(&docs, &first);
    assert_eq!(
        first.routers.keys().collect::<Vec<_>>(),
        again.routers.keys().collect::<Vec<_>>(),
        "the same input compiled to other routers"
    );
    let req = Request {
        method: "GET".into(),
        scheme: "http".into(),
        authority: "reviews:9080".into(),
        path: "/reviews/0?u=jason".into(),
        headers: vec![("end-user".into(), "jason".into())],
        port: 9080,
    };
    for router in first.routers.values() {
        for roll in [0u32, 1, 49, 50, u32::MAX] {
            let Some(rule) = router.decide(&req, roll).map(|d| d.rule()) else { continue };
            assert!(router.rule(rule).is_some(), "decision names rule {rule}, which does not exist");
        }
        let _ = router.tcp_targets(9000);
    }
});
