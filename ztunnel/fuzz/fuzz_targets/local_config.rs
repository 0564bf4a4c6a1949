//! The local-config YAML (`{workloads, services, policies}`): `parse_local_config` on arbitrary
//! UTF-8, then the same text applied to a `StateStore` and destinations resolved against the
//! snapshot, so the indexes are built and used.
//!
//! Properties:
//! - a document error comes alone and leaves the config empty; every rejected policy is both an
//!   error and an `InvalidPolicy`; every kept entry passes the documented validation;
//! - the accepted entries, written back as YAML, parse again to exactly the same entries with no
//!   error (parse of a serialization is the identity);
//! - `StateStore::apply_yaml` reports the same errors and holds the same config;
//! - resolving a workload's own IP finds a workload that owns that IP, resolving a VIP finds a
//!   service with that VIP and an endpoint of it, with the documented target port, or, for a
//!   service with a waypoint, that waypoint (and nothing when the waypoint cannot be found).
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use ztunnel::policy::{evaluate, ConnectionFacts};
use ztunnel::state::{parse_local_config, ConfigError, LocalConfig, StateStore};

#[derive(serde::Serialize)]
struct Doc<'a> {
    workloads: &'a [std::sync::Arc<ztunnel::state::Workload>],
    services: &'a [std::sync::Arc<ztunnel::state::Service>],
    policies: &'a [ztunnel::policy::Authorization],
}

fn text_of(data: &[u8]) -> &str {
    match std::str::from_utf8(data) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&data[..e.valid_up_to()]).expect("valid prefix"),
    }
}

fn check_parse(text: &str) -> (LocalConfig, Vec<ConfigError>) {
    let (cfg, errors) = parse_local_config(text);
    if errors.iter().any(|e| e.kind == "document") {
        assert_eq!(errors.len(), 1, "a document error comes alone: {errors:?}");
        assert_eq!(cfg, LocalConfig::default(), "a document error keeps nothing");
    }
    let policy_errors = errors.iter().filter(|e| e.kind == "policy").count();
    assert_eq!(policy_errors, cfg.invalid_policies.len(), "each rejected policy is an error and an InvalidPolicy");
    for w in &cfg.workloads {
        assert!(!w.uid.is_empty() && !w.workload_ips.is_empty(), "kept an invalid workload: {w:?}");
    }
    for s in &cfg.services {
        assert!(!s.hostname.is_empty() && s.vip_addrs().is_ok(), "kept an invalid service: {s:?}");
    }
    for p in &cfg.policies {
        assert!(!p.name.is_empty() && !p.namespace.is_empty(), "kept a policy without name: {p:?}");
    }
    // The config dump serializes the whole config as JSON; that must never fail.
    serde_json::to_string(&cfg).expect("config serializes as JSON");
    (cfg, errors)
}

fn check_round_trip(cfg: &LocalConfig) {
    if cfg.workloads.is_empty() && cfg.services.is_empty() && cfg.policies.is_empty() {
        return;
    }
    let doc = Doc { workloads: &cfg.workloads, services: &cfg.services, policies: &cfg.policies };
    let yaml = serde_yaml_ng::to_string(&doc).expect("config serializes as YAML");
    let (again, errors) = parse_local_config(&yaml);
    assert!(errors.is_empty(), "re-parse of a serialized config failed: {errors:?}\n{yaml}");
    assert_eq!(again.workloads, cfg.workloads, "workloads differ after a round trip\n{yaml}");
    assert_eq!(again.services, cfg.services, "services differ after a round trip\n{yaml}");
    assert_eq!(again.policies, cfg.policies, "policies differ after a round trip\n{yaml}");
}

fn check_store(text: &str, cfg: &LocalConfig, expected_errors: &[ConfigError]) {
    let store = StateStore::default();
    assert_eq!(store.apply_yaml(text), expected_errors, "apply_yaml reports what parse_local_config does");
    let snap = store.snapshot();
    assert_eq!(&snap.config, cfg, "the store holds the parsed config");
    assert_eq!(store.rejected_total(), expected_errors.len() as u64);

    let vips: Vec<IpAddr> = cfg.services.iter().flat_map(|s| s.vip_addrs().unwrap_or_default()).collect();
    let mut addrs: Vec<IpAddr> = cfg.workloads.iter().flat_map(|w| w.workload_ips.iter().copied()).collect();
    addrs.extend(&vips);
    addrs.extend(["10.0.0.1".parse::<IpAddr>().unwrap(), "::".parse().unwrap(), "::ffff:10.0.0.1".parse().unwrap()]);
    for ip in addrs {
        for port in [0u16, 80, 8080, 15008, u16::MAX] {
            let dst = SocketAddr::new(ip, port);
            let up = snap.resolve(dst);
            if !vips.contains(&ip) {
                let up = up.expect("a non-VIP destination always resolves (passthrough at worst)");
                assert_eq!(up.addr, dst, "a non-VIP destination is not rewritten");
                assert!(up.service.is_none());
                match &up.workload {
                    Some(w) => assert!(w.workload_ips.contains(&ip), "resolved {ip} to a workload without it: {w:?}"),
                    None => assert!(
                        !cfg.workloads.iter().any(|w| w.workload_ips.contains(&ip)),
                        "{ip} belongs to a workload but did not resolve to one"
                    ),
                }
                continue;
            }
            match up {
                // Through a waypoint: the CONNECT keeps the VIP, the tunnel goes to a waypoint pod.
                Some(up) if up.hbone_dst.is_some() => {
                    let svc = up.service.as_ref().expect("a VIP resolves to its service");
                    assert!(svc.waypoint.is_some(), "a waypoint route for {svc:?}, which has none");
                    assert_eq!(up.addr, dst, "the waypoint gets the VIP and port the client dialled");
                    let wp = up.workload.as_ref().expect("a waypoint route names the waypoint's workload");
                    assert!(
                        wp.workload_ips.contains(&up.hbone_dst.unwrap().ip()),
                        "HBONE to an address not the waypoint's"
                    );
                }
                Some(up) => {
                    let svc = up.service.as_ref().expect("a VIP resolves to its service");
                    assert!(svc.waypoint.is_none(), "{svc:?} has a waypoint but was resolved past it");
                    assert!(svc.vip_addrs().unwrap().contains(&ip), "service {svc:?} does not have VIP {ip}");
                    let ep = up.workload.as_ref().expect("a VIP resolves to an endpoint");
                    let key = svc.key();
                    assert!(ep.services.contains_key(&key), "endpoint {ep:?} is not in {key}");
                    assert!(ep.workload_ips.contains(&up.addr.ip()), "endpoint address is not the endpoint's");
                    let expected_port = match svc.ports.get(&port) {
                        Some(0) | None => ep.services[&key].get(&port).copied().unwrap_or(port),
                        Some(t) => *t,
                    };
                    assert_eq!(up.addr.port(), expected_port, "wrong target port for {dst} via {key}");
                }
                None => assert!(
                    cfg.services.iter().any(|s| s.vip_addrs().unwrap().contains(&ip)
                        && (s.waypoint.is_some() || !cfg.workloads.iter().any(|w| w.services.contains_key(&s.key())))),
                    "VIP {ip} has endpoints but did not resolve"
                ),
            }
        }
    }
    for w in &cfg.workloads {
        let by_uid = snap.workload_by_uid(&w.uid).expect("every workload is indexed by uid");
        assert_eq!(by_uid.uid, w.uid);
        // Policies are evaluated for every workload; the policy target checks the decisions.
        let facts = ConnectionFacts {
            source_identity: None,
            source_ip: w.workload_ips[0],
            destination: SocketAddr::new(w.workload_ips[0], 80),
        };
        let _ = evaluate(snap.policies(), &w.policy_target(), &facts);
    }
}

fuzz_target!(|data: &[u8]| {
    let text = text_of(data);
    let (cfg, errors) = check_parse(text);
    check_round_trip(&cfg);
    check_store(text, &cfg, &errors);
});
