//! Tests of the waypoint's load balancing: each algorithm's distribution against a stated
//! bound, consistent hashing's stickiness and disruption bound, locality failover and
//! weights, cookies, and the balancer cache. Seeded RNGs make every run the same.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::*;
use crate::routing::traffic_policy::{HashPolicy, LocalityLb};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1)), 8080)
}

fn eps(n: usize) -> Vec<LbEndpoint> {
    (0..n).map(|i| LbEndpoint::new(addr(i), Locality::new("r", "z", "s"))).collect()
}

fn policy(load_balancer: LbAlgorithm) -> EffectivePolicy {
    EffectivePolicy { load_balancer, ..Default::default() }
}

fn hashed(key: HashKey, table: HashTable) -> EffectivePolicy {
    policy(LbAlgorithm::ConsistentHash(HashPolicy { key, table }))
}

const RING: HashTable = HashTable::Ring { minimum_ring_size: 1024 };
const MAGLEV: HashTable = HashTable::Maglev { table_size: 65537 };

fn source() -> SocketAddr {
    "192.0.2.7:40000".parse().unwrap()
}

fn view<'a>(headers: &'a http::HeaderMap, path: &'a str) -> RequestView<'a> {
    RequestView { headers, path, source: source(), target: None }
}

/// Picks `n` times (guards dropped at once) and counts per endpoint.
fn counts(b: &Balancer, n: usize, usable: &[bool], rng: &mut fastrand::Rng) -> Vec<usize> {
    let h = http::HeaderMap::new();
    let mut c = vec![0; b.endpoints().len()];
    for _ in 0..n {
        c[b.pick(&view(&h, "/"), usable, rng).expect("an endpoint").index] += 1;
    }
    c
}

/// Five standard deviations of a binomial count.
fn five_sigma(n: usize, p: f64) -> f64 {
    5.0 * (n as f64 * p * (1.0 - p)).sqrt()
}

fn assert_near(count: usize, n: usize, p: f64) {
    let (want, bound) = (n as f64 * p, five_sigma(n, p));
    assert!((count as f64 - want).abs() <= bound, "{count} is not within {bound:.0} of {want:.0}");
}

fn header_key(b: &Balancer, key: &str) -> usize {
    let mut h = http::HeaderMap::new();
    h.insert("x-user", key.parse().unwrap());
    b.pick(&view(&h, "/"), &[], &mut fastrand::Rng::with_seed(0)).unwrap().index
}

#[test]
fn round_robin_is_exact() {
    let b = Balancer::new(&policy(LbAlgorithm::RoundRobin), eps(4), &Caller::default());
    assert_eq!(counts(&b, 1000, &[], &mut fastrand::Rng::with_seed(1)), vec![250; 4]);
}

#[test]
fn round_robin_skips_unusable_endpoints() {
    let b = Balancer::new(&policy(LbAlgorithm::RoundRobin), eps(4), &Caller::default());
    let c = counts(&b, 999, &[true, false, true, true], &mut fastrand::Rng::with_seed(1));
    assert_eq!(c, vec![333, 0, 333, 333]);
}

#[test]
fn random_is_uniform_within_five_sigma() {
    let b = Balancer::new(&policy(LbAlgorithm::Random), eps(4), &Caller::default());
    for c in counts(&b, 10_000, &[], &mut fastrand::Rng::with_seed(2)) {
        assert_near(c, 10_000, 0.25);
    }
}

#[test]
fn least_request_without_load_is_uniform_within_five_sigma() {
    let b = Balancer::new(&policy(LbAlgorithm::LeastRequest), eps(4), &Caller::default());
    for c in counts(&b, 10_000, &[], &mut fastrand::Rng::with_seed(3)) {
        assert_near(c, 10_000, 0.25);
    }
}

#[test]
fn least_request_picks_a_busy_endpoint_only_when_both_choices_are_it() {
    let b = Balancer::new(&policy(LbAlgorithm::LeastRequest), eps(4), &Caller::default());
    let mut rng = fastrand::Rng::with_seed(4);
    let h = http::HeaderMap::new();
    let mut held = Vec::new();
    while b.in_flight(0) < 100 {
        let p = b.pick(&view(&h, "/"), &[true, false, false, false], &mut rng).unwrap();
        held.push(p);
    }
    // Two independent uniform choices among 4 are both endpoint 0 with probability 1/16.
    assert_near(counts(&b, 10_000, &[], &mut rng)[0], 10_000, 1.0 / 16.0);
}

#[test]
fn least_request_keeps_requests_in_flight_within_8_of_each_other() {
    let b = Balancer::new(&policy(LbAlgorithm::LeastRequest), eps(4), &Caller::default());
    let mut rng = fastrand::Rng::with_seed(5);
    let h = http::HeaderMap::new();
    let held: Vec<Pick> = (0..1000).map(|_| b.pick(&view(&h, "/"), &[], &mut rng).unwrap()).collect();
    let load: Vec<u32> = (0..4).map(|i| b.in_flight(i)).collect();
    let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
    assert!(max - min <= 8, "{load:?}");
    drop(held);
}

#[test]
fn in_flight_guard_ends_the_request_when_dropped() {
    let b = Balancer::new(&policy(LbAlgorithm::RoundRobin), eps(1), &Caller::default());
    let h = http::HeaderMap::new();
    let p = b.pick(&view(&h, "/"), &[], &mut fastrand::Rng::with_seed(0)).unwrap();
    assert_eq!(b.in_flight(0), 1);
    drop(p);
    assert_eq!(b.in_flight(0), 0);
}

#[test]
fn no_usable_endpoint_gives_no_pick() {
    let b = Balancer::new(&policy(LbAlgorithm::Random), eps(2), &Caller::default());
    let h = http::HeaderMap::new();
    assert!(b.pick(&view(&h, "/"), &[false, false], &mut fastrand::Rng::with_seed(0)).is_none());
}

#[test]
fn passthrough_uses_the_endpoint_the_client_named() {
    let b = Balancer::new(&policy(LbAlgorithm::Passthrough), eps(3), &Caller::default());
    let h = http::HeaderMap::new();
    let req = RequestView { target: Some(addr(2)), ..view(&h, "/") };
    assert_eq!(b.pick(&req, &[], &mut fastrand::Rng::with_seed(0)).unwrap().index, 2);
}

#[test]
fn passthrough_without_a_named_endpoint_takes_the_first_usable() {
    let b = Balancer::new(&policy(LbAlgorithm::Passthrough), eps(3), &Caller::default());
    let h = http::HeaderMap::new();
    assert_eq!(b.pick(&view(&h, "/"), &[false, true, true], &mut fastrand::Rng::with_seed(0)).unwrap().index, 1);
}

#[test]
fn ring_hash_keeps_a_key_on_one_endpoint() {
    let b = Balancer::new(&hashed(HashKey::Header("x-user".into()), RING), eps(10), &Caller::default());
    for k in 0..1000 {
        let key = format!("user-{k}");
        assert_eq!(header_key(&b, &key), header_key(&b, &key));
    }
}

#[test]
fn maglev_keeps_a_key_on_one_endpoint() {
    let b = Balancer::new(&hashed(HashKey::Header("x-user".into()), MAGLEV), eps(10), &Caller::default());
    for k in 0..1000 {
        let key = format!("user-{k}");
        assert_eq!(header_key(&b, &key), header_key(&b, &key));
    }
}

/// Of 10000 keys, the fraction whose endpoint changes when an 11th endpoint joins 10, and
/// whether every moved key went to the new endpoint.
fn moved_when_one_joins(table: HashTable) -> (f64, bool) {
    let p = hashed(HashKey::Header("x-user".into()), table);
    let before = Balancer::new(&p, eps(10), &Caller::default());
    let after = Balancer::new(&p, eps(11), &Caller::default());
    let (mut moved, mut only_to_new) = (0, true);
    for k in 0..10_000 {
        let key = format!("user-{k}");
        let (a, b) = (header_key(&before, &key), header_key(&after, &key));
        if a != b {
            moved += 1;
            only_to_new &= b == 10;
        }
    }
    let moved = moved as f64 / 10_000.0;
    println!("{table:?}: {moved} of the keys moved (ideal 1/11 = 0.091)");
    (moved, only_to_new)
}

#[test]
fn ring_hash_moves_at_most_one_and_a_half_over_n_of_keys_when_an_endpoint_joins() {
    let (moved, only_to_new) = moved_when_one_joins(RING);
    assert!(moved <= 1.5 / 10.0, "{moved}");
    assert!(only_to_new, "the ring's other points stay, so keys move only to the new endpoint");
}

#[test]
fn maglev_moves_at_most_one_and_a_half_over_n_of_keys_when_an_endpoint_joins() {
    let (moved, _) = moved_when_one_joins(MAGLEV);
    assert!(moved <= 1.5 / 10.0, "{moved}");
}

#[test]
fn hash_tables_give_each_endpoint_between_half_and_one_and_a_half_of_an_even_share() {
    for table in [RING, MAGLEV] {
        let b = Balancer::new(&hashed(HashKey::Header("x-user".into()), table), eps(10), &Caller::default());
        let mut c = [0usize; 10];
        for k in 0..10_000 {
            c[header_key(&b, &format!("user-{k}"))] += 1;
        }
        assert!(c.iter().all(|&n| (500..=1500).contains(&n)), "{table:?}: {c:?}");
    }
}

#[test]
fn an_unusable_endpoints_keys_move_and_the_others_stay() {
    for table in [RING, MAGLEV] {
        let b = Balancer::new(&hashed(HashKey::Header("x-user".into()), table), eps(5), &Caller::default());
        let usable = [true, true, false, true, true];
        for k in 0..2000 {
            let mut h = http::HeaderMap::new();
            h.insert("x-user", format!("user-{k}").parse().unwrap());
            let all = b.pick(&view(&h, "/"), &[], &mut fastrand::Rng::with_seed(0)).unwrap().index;
            let some = b.pick(&view(&h, "/"), &usable, &mut fastrand::Rng::with_seed(0)).unwrap().index;
            assert_ne!(some, 2);
            if all != 2 {
                assert_eq!(all, some, "{table:?}: key {k} moved");
            }
        }
    }
}

#[test]
fn missing_hash_header_picks_at_random() {
    let b = Balancer::new(&hashed(HashKey::Header("x-user".into()), RING), eps(4), &Caller::default());
    for c in counts(&b, 10_000, &[], &mut fastrand::Rng::with_seed(6)) {
        assert_near(c, 10_000, 0.25);
    }
}

#[test]
fn source_ip_key_keeps_a_client_on_one_endpoint() {
    let b = Balancer::new(&hashed(HashKey::SourceIp, MAGLEV), eps(10), &Caller::default());
    let h = http::HeaderMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..200u8 {
        let mut rng = fastrand::Rng::with_seed(u64::from(i));
        let at = |port| RequestView { source: SocketAddr::new([198, 51, 100, i].into(), port), ..view(&h, "/") };
        let a = b.pick(&at(1000), &[], &mut rng).unwrap().index;
        assert_eq!(a, b.pick(&at(2000), &[], &mut rng).unwrap().index, "the port does not matter");
        seen.insert(a);
    }
    assert_eq!(seen.len(), 10, "clients spread over all endpoints");
}

#[test]
fn query_parameter_key_keeps_a_value_on_one_endpoint() {
    let b = Balancer::new(&hashed(HashKey::QueryParameter("u".into()), RING), eps(10), &Caller::default());
    let h = http::HeaderMap::new();
    for k in 0..200 {
        let (p1, p2) = (format!("/a?x=1&u={k}"), format!("/b?u={k}"));
        let a = b.pick(&view(&h, &p1), &[], &mut fastrand::Rng::with_seed(1)).unwrap().index;
        assert_eq!(a, b.pick(&view(&h, &p2), &[], &mut fastrand::Rng::with_seed(2)).unwrap().index);
    }
}

fn cookie_policy(ttl: Option<Duration>) -> EffectivePolicy {
    let spec = CookieSpec {
        name: "session".into(),
        path: Some("/app".into()),
        ttl,
        attributes: vec![("SameSite".into(), Some("Strict".into())), ("Secure".into(), None)],
    };
    hashed(HashKey::Cookie(spec), RING)
}

#[test]
fn cookie_is_generated_with_path_and_max_age_when_the_request_has_none() {
    let b = Balancer::new(&cookie_policy(Some(Duration::from_secs(3600))), eps(10), &Caller::default());
    let h = http::HeaderMap::new();
    let set = b.pick(&view(&h, "/"), &[], &mut fastrand::Rng::with_seed(0)).unwrap().set_cookie.unwrap();
    let value = format!("{:016x}", hash64(source().to_string().as_bytes(), COOKIE_SEED));
    assert_eq!(set, format!("session=\"{value}\"; Max-Age=3600; Path=/app; SameSite=Strict; Secure; HttpOnly"));
}

#[test]
fn generated_cookie_brings_the_next_request_to_the_same_endpoint() {
    let b = Balancer::new(&cookie_policy(Some(Duration::from_secs(60))), eps(10), &Caller::default());
    let h = http::HeaderMap::new();
    let first = b.pick(&view(&h, "/"), &[], &mut fastrand::Rng::with_seed(0)).unwrap();
    let value = first.set_cookie.as_deref().unwrap().split(';').next().unwrap().to_string();
    let mut again = http::HeaderMap::new();
    again.insert(http::header::COOKIE, format!("a=b; {value}").parse().unwrap());
    let from_elsewhere = RequestView { source: "203.0.113.9:1".parse().unwrap(), ..view(&again, "/") };
    for seed in 0..20 {
        let p = b.pick(&from_elsewhere, &[], &mut fastrand::Rng::with_seed(seed)).unwrap();
        assert_eq!(p.index, first.index);
        assert!(p.set_cookie.is_none(), "the request has the cookie");
    }
}

#[test]
fn cookie_with_zero_ttl_is_a_session_cookie() {
    let b = Balancer::new(&cookie_policy(Some(Duration::ZERO)), eps(3), &Caller::default());
    let h = http::HeaderMap::new();
    let set = b.pick(&view(&h, "/"), &[], &mut fastrand::Rng::with_seed(0)).unwrap().set_cookie.unwrap();
    assert!(!set.contains("Max-Age") && set.contains("; Path=/app"), "{set}");
}

#[test]
fn cookie_without_ttl_is_not_generated() {
    let b = Balancer::new(&cookie_policy(None), eps(3), &Caller::default());
    let h = http::HeaderMap::new();
    assert!(b.pick(&view(&h, "/"), &[], &mut fastrand::Rng::with_seed(0)).unwrap().set_cookie.is_none());
}

// --- locality -------------------------------------------------------------------------------

fn failover(rules: &[(&str, &str)]) -> LocalityLb {
    LocalityLb {
        failover: rules.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        failover_active: true,
        ..Default::default()
    }
}

fn with_locality(algorithm: LbAlgorithm, locality: LocalityLb) -> EffectivePolicy {
    EffectivePolicy { locality, ..policy(algorithm) }
}

/// 0,1: caller's subzone; 2: its zone; 3: its region; 4: us-west; 5: eu.
fn spread() -> Vec<LbEndpoint> {
    let l = |i, r, z, s| LbEndpoint::new(addr(i), Locality::new(r, z, s));
    vec![
        l(0, "us-east", "a", "1"),
        l(1, "us-east", "a", "1"),
        l(2, "us-east", "a", "2"),
        l(3, "us-east", "b", "1"),
        l(4, "us-west", "a", "1"),
        l(5, "eu", "a", "1"),
    ]
}

fn caller() -> Caller {
    Caller { locality: Locality::new("us-east", "a", "1"), labels: BTreeMap::new() }
}

#[test]
fn endpoints_fall_in_priorities_by_subzone_zone_and_region() {
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, failover(&[])), spread(), &caller());
    let p: Vec<_> = (0..6).map(|i| b.priority(i).unwrap()).collect();
    assert_eq!(p, vec![0, 0, 1, 2, 3, 3]);
}

#[test]
fn traffic_stays_in_the_callers_locality_while_it_is_usable() {
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, failover(&[])), spread(), &caller());
    let c = counts(&b, 1000, &[], &mut fastrand::Rng::with_seed(7));
    assert_eq!(c[0] + c[1], 1000, "{c:?}");
}

#[test]
fn traffic_fails_over_to_the_same_zone_when_the_local_endpoints_are_ejected() {
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, failover(&[])), spread(), &caller());
    let c = counts(&b, 1000, &[false, false, true, true, true, true], &mut fastrand::Rng::with_seed(8));
    assert_eq!(c[2], 1000, "{c:?}");
}

#[test]
fn traffic_fails_over_region_by_region_until_only_remote_endpoints_are_left() {
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, failover(&[])), spread(), &caller());
    let c = counts(&b, 1000, &[false, false, false, true, true, true], &mut fastrand::Rng::with_seed(9));
    assert_eq!(c[3], 1000, "{c:?}");
    let c = counts(&b, 10_000, &[false, false, false, false, true, true], &mut fastrand::Rng::with_seed(9));
    assert_near(c[4], 10_000, 0.5);
    assert_eq!(c[4] + c[5], 10_000);
}

#[test]
fn half_the_local_endpoints_ejected_keeps_seventy_percent_local() {
    // Envoy's overprovisioning: min(100, 1.4 x 50%) = 70% stays, 30% spills to the next priority.
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, failover(&[])), spread(), &caller());
    let c = counts(&b, 10_000, &[false, true, true, true, true, true], &mut fastrand::Rng::with_seed(10));
    assert_near(c[1], 10_000, 0.7);
    assert_near(c[2], 10_000, 0.3);
}

#[test]
fn failover_rule_sends_traffic_to_its_region_before_others() {
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, failover(&[("us-east", "eu")])), spread(), &caller());
    assert_eq!((b.priority(4), b.priority(5)), (Some(4), Some(3)));
    let c = counts(&b, 1000, &[false, false, false, false, true, true], &mut fastrand::Rng::with_seed(11));
    assert_eq!(c[5], 1000, "{c:?}");
}

#[test]
fn without_outlier_detection_all_localities_share_one_priority() {
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, LocalityLb::default()), spread(), &caller());
    assert!((0..6).all(|i| b.priority(i) == Some(0)));
}

#[test]
fn hashed_traffic_fails_over_like_the_rest() {
    let b = Balancer::new(
        &EffectivePolicy { locality: failover(&[]), ..hashed(HashKey::Header("x-user".into()), RING) },
        spread(),
        &caller(),
    );
    for k in 0..500 {
        let idx = header_key(&b, &format!("user-{k}"));
        assert!(idx < 2, "key {k} left the caller's locality: {idx}");
    }
}

#[test]
fn failover_priority_labels_order_endpoints_by_leading_matches() {
    let mut e = eps(3);
    e[0].labels = [("app".to_string(), "a".to_string()), ("v".to_string(), "1".to_string())].into();
    e[1].labels = [("app".to_string(), "a".to_string()), ("v".to_string(), "2".to_string())].into();
    e[2].labels = [("app".to_string(), "b".to_string()), ("v".to_string(), "1".to_string())].into();
    let caller = Caller { labels: e[0].labels.clone(), ..Caller::default() };
    let l =
        LocalityLb { failover_priority: vec!["app".into(), "v".into()], failover_active: true, ..Default::default() };
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, l), e, &caller);
    assert_eq!((0..3).map(|i| b.priority(i).unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn distribute_splits_traffic_by_weight_within_five_sigma() {
    let l = LocalityLb {
        distribute: vec![("us-east/*".into(), vec![("us-east/a/*".into(), 80), ("us-west/*".into(), 20)])],
        ..Default::default()
    };
    let b = Balancer::new(&with_locality(LbAlgorithm::RoundRobin, l), spread(), &caller());
    let c = counts(&b, 10_000, &[], &mut fastrand::Rng::with_seed(12));
    assert_near(c[0] + c[1] + c[2], 10_000, 0.8);
    assert_near(c[4], 10_000, 0.2);
    assert_eq!(c[3] + c[5], 0, "localities no pattern matches get nothing: {c:?}");
}

#[test]
fn distribute_for_other_callers_does_not_apply() {
    let l = LocalityLb { distribute: vec![("eu/*".into(), vec![("eu/*".into(), 100)])], ..Default::default() };
    let b = Balancer::new(&with_locality(LbAlgorithm::RoundRobin, l), spread(), &caller());
    assert_eq!(counts(&b, 600, &[], &mut fastrand::Rng::with_seed(13)), vec![100; 6]);
}

#[test]
fn distribute_that_does_not_match_the_caller_turns_failover_off_too() {
    let l = LocalityLb {
        distribute: vec![("eu/*".into(), vec![("eu/*".into(), 100)])],
        failover_active: true,
        ..Default::default()
    };
    let b = Balancer::new(&with_locality(LbAlgorithm::Random, l), spread(), &caller());
    assert!((0..6).all(|i| b.priority(i) == Some(0)));
}

// --- cache ----------------------------------------------------------------------------------

fn key() -> ClusterKey {
    ClusterKey { service: "reviews.ns.svc.cluster.local".into(), subset: Some("v1".into()), port: 9080 }
}

#[test]
fn cache_reuses_the_balancer_for_the_same_endpoints() {
    let cache = Balancers::default();
    let p = policy(LbAlgorithm::RoundRobin);
    let a = cache.get(&key(), &p, &eps(3), &Caller::default());
    let b = cache.get(&key(), &p, &eps(3), &Caller::default());
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn cache_rebuilds_when_the_endpoints_change() {
    let cache = Balancers::default();
    let p = policy(LbAlgorithm::RoundRobin);
    let a = cache.get(&key(), &p, &eps(3), &Caller::default());
    let b = cache.get(&key(), &p, &eps(4), &Caller::default());
    assert!(!Arc::ptr_eq(&a, &b));
    assert_eq!(b.endpoints().len(), 4);
}

#[test]
fn cache_rebuilds_when_the_policy_changes() {
    let cache = Balancers::default();
    let a = cache.get(&key(), &policy(LbAlgorithm::RoundRobin), &eps(3), &Caller::default());
    let b = cache.get(&key(), &policy(LbAlgorithm::Random), &eps(3), &Caller::default());
    assert!(!Arc::ptr_eq(&a, &b));
}

#[test]
fn cache_drops_clusters_it_is_told_to() {
    let cache = Balancers::default();
    cache.get(&key(), &policy(LbAlgorithm::RoundRobin), &eps(3), &Caller::default());
    cache.retain(|k| k.port != 9080);
    assert!(cache.is_empty());
}
