//! Authorization policies: read from local-config YAML (`parse_local_config`) and evaluated with
//! `ztunnel::policy::evaluate` against fuzzer-chosen connection facts. Two kinds of input:
//! - structured: policies generated as values of the policy model, written out as YAML in any of
//!   the accepted shapes (Istio's nested lists with `!Exact` tags, ours with `clauses`/`matches`
//!   and plain `*` patterns, config_dump's `{Exact: x}` maps, bare IPs, `ns/sa` strings);
//! - raw: a fuzzer-written YAML document (first byte odd; the next 32 bytes choose the connection).
//!
//! Properties:
//! - parsing and evaluating never panic;
//! - a generated policy parses back to exactly the generated value, or is rejected exactly when
//!   it breaks a documented rule (empty name/namespace, bad service account, bad CIDR), and a
//!   rejected one is kept as an `InvalidPolicy` with the name/namespace/scope that were readable;
//! - the decision equals an independent reference written from the documented semantics
//!   (Istio rbac: invalid policy selecting the workload denies; a matching enforced DENY denies;
//!   no enforced ALLOW allows; otherwise some ALLOW must match);
//! - dry-run policies never change the decision, and policies survive a YAML round trip with the
//!   same decision.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_yaml_ng::{Mapping, Value};
use ztunnel::identity::Identity;
use ztunnel::policy::{
    evaluate, Authorization, Cidr, ConnectionFacts, Decision, InvalidPolicy, Match, PolicyAction, PolicyScope,
    ServiceAccountMatch, StringMatch,
};
use ztunnel::state::{parse_local_config, Workload, WorkloadProtocol};

// ---------------------------------------------------------------------------------------------
// Generation. Strings mostly come from small pools so that policies and facts meet.

const NAMESPACES: &[&str] = &["default", "ns1", "istio-system", "", "a/b"];
const NAMES: &[&str] = &["p1", "p2", "allow-all", ""];
const ACCOUNTS: &[&str] = &["default", "sa1", "sa2", "", "x/y"];
const DOMAINS: &[&str] = &["cluster.local", "td2"];

fn pick(u: &mut Unstructured, pool: &[&str]) -> arbitrary::Result<String> {
    if u.ratio(7, 8)? {
        Ok(u.choose(pool)?.to_string())
    } else {
        u.arbitrary()
    }
}

fn ip(u: &mut Unstructured, seen: &[IpAddr]) -> arbitrary::Result<IpAddr> {
    Ok(match u.int_in_range(0..=5)? {
        0 if !seen.is_empty() => *u.choose(seen)?,
        1 => IpAddr::V4(Ipv4Addr::new(10, 0, 0, u.int_in_range(0..=3)?)),
        2 => IpAddr::V6(Ipv4Addr::new(10, 0, 0, u.int_in_range(0..=3)?).to_ipv6_mapped()),
        3 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u.int_in_range(0..=3)?)),
        4 => IpAddr::V4(u.arbitrary::<[u8; 4]>()?.into()),
        _ => IpAddr::V6(u.arbitrary::<[u8; 16]>()?.into()),
    })
}

fn string_match(u: &mut Unstructured) -> arbitrary::Result<StringMatch> {
    let s = if u.ratio(3, 4)? {
        let pool = [
            NAMESPACES,
            ACCOUNTS,
            DOMAINS,
            &["*", "cluster.local/ns/ns1/sa/sa1", "spiffe://cluster.local/ns/default/sa/default", "*x", "x*"],
        ]
        .concat();
        pick(u, &pool)?
    } else {
        u.arbitrary()?
    };
    Ok(match u.int_in_range(0..=3)? {
        0 => StringMatch::Exact(s),
        1 => StringMatch::Prefix(s),
        2 => StringMatch::Suffix(s),
        _ => StringMatch::Presence,
    })
}

fn cidr(u: &mut Unstructured, ips: &mut Vec<IpAddr>) -> arbitrary::Result<Cidr> {
    let addr = ip(u, ips)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = if u.ratio(1, 16)? { u.arbitrary()? } else { u.int_in_range(0..=max)? };
    ips.push(addr);
    Ok(Cidr { addr, prefix_len })
}

fn vec_of<T>(
    u: &mut Unstructured,
    max: usize,
    mut f: impl FnMut(&mut Unstructured) -> arbitrary::Result<T>,
) -> arbitrary::Result<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    (0..n).map(|_| f(u)).collect()
}

struct Pools {
    ips: Vec<IpAddr>,
    ports: Vec<u16>,
}

fn a_match(u: &mut Unstructured, p: &mut Pools) -> arbitrary::Result<Match> {
    let mut m = Match::default();
    let fields = u.int_in_range(0u8..=3)?;
    for _ in 0..fields {
        match u.int_in_range(0..=11)? {
            0 => m.namespaces = vec_of(u, 2, string_match)?,
            1 => m.not_namespaces = vec_of(u, 2, string_match)?,
            2 => m.principals = vec_of(u, 2, string_match)?,
            3 => m.not_principals = vec_of(u, 2, string_match)?,
            4 => m.service_accounts = vec_of(u, 2, account)?,
            5 => m.not_service_accounts = vec_of(u, 2, account)?,
            6 => m.source_ips = vec_of(u, 2, |u| cidr(u, &mut p.ips))?,
            7 => m.not_source_ips = vec_of(u, 2, |u| cidr(u, &mut p.ips))?,
            8 => m.destination_ips = vec_of(u, 2, |u| cidr(u, &mut p.ips))?,
            9 => m.not_destination_ips = vec_of(u, 2, |u| cidr(u, &mut p.ips))?,
            10 => m.destination_ports = vec_of(u, 2, |u| port(u, &mut p.ports))?,
            _ => m.not_destination_ports = vec_of(u, 2, |u| port(u, &mut p.ports))?,
        }
    }
    Ok(m)
}

fn account(u: &mut Unstructured) -> arbitrary::Result<ServiceAccountMatch> {
    Ok(ServiceAccountMatch { namespace: pick(u, NAMESPACES)?, service_account: pick(u, ACCOUNTS)? })
}

fn port(u: &mut Unstructured, seen: &mut Vec<u16>) -> arbitrary::Result<u16> {
    let p = if u.ratio(3, 4)? { *u.choose(&[80, 443, 8080, 0])? } else { u.arbitrary()? };
    seen.push(p);
    Ok(p)
}

fn policy(u: &mut Unstructured, p: &mut Pools) -> arbitrary::Result<Authorization> {
    Ok(Authorization {
        name: pick(u, NAMES)?,
        namespace: pick(u, NAMESPACES)?,
        scope: *u.choose(&[PolicyScope::Global, PolicyScope::Namespace, PolicyScope::WorkloadSelector])?,
        action: if u.arbitrary()? { PolicyAction::Allow } else { PolicyAction::Deny },
        rules: vec_of(u, 2, |u| vec_of(u, 2, |u| vec_of(u, 2, |u| a_match(u, p))))?,
        dry_run: u.ratio(1, 4)?,
    })
}

/// How one policy is written out.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Style {
    /// `rules: [{clauses: [{matches: [...]}]}]` instead of nested lists.
    ours: bool,
    /// Plain patterns (`*`, `x*`, `*x`, bare IPs, `ns/sa`) where they mean the same.
    plain: bool,
    /// `{Exact: x}` maps instead of `!Exact x` tags.
    maps: bool,
    /// Leave out `scope: Namespace` and `dryRun: false`.
    omit_defaults: bool,
}

// ---------------------------------------------------------------------------------------------
// Writing a generated policy as YAML, and the outcome the documentation promises for it.

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// The plain pattern that means `m`, if there is one (`*` presence, `*x` suffix, `x*` prefix,
/// anything else exact; principals are compared without a leading `spiffe://`).
fn plain_pattern(m: &StringMatch, principal: bool) -> Option<String> {
    let out = match m {
        StringMatch::Presence => "*".to_string(),
        StringMatch::Exact(x) if x.starts_with('*') || x.ends_with('*') => return None,
        StringMatch::Exact(x) => x.clone(),
        StringMatch::Prefix(p) if p.is_empty() || p.starts_with('*') => return None,
        StringMatch::Prefix(p) => format!("{p}*"),
        StringMatch::Suffix(x) if x.is_empty() => return None,
        StringMatch::Suffix(x) => format!("*{x}"),
    };
    if principal && out.starts_with("spiffe://") {
        return None;
    }
    Some(out)
}

fn write_string_match(m: &StringMatch, principal: bool, st: Style) -> Value {
    if st.plain {
        if let Some(p) = plain_pattern(m, principal) {
            return Value::String(p);
        }
    }
    let tagged = serde_yaml_ng::to_value(m).expect("StringMatch serializes");
    match (st.maps, tagged) {
        (true, Value::Tagged(t)) => {
            let mut map = Mapping::new();
            map.insert(s(&t.tag.to_string().trim_start_matches('!').to_string()), t.value);
            Value::Mapping(map)
        }
        (_, v) => v,
    }
}

fn write_match(m: &Match, policy_ns: &str, st: Style) -> Value {
    let mut map = Mapping::new();
    let mut strings = |key: &str, v: &[StringMatch], principal: bool| {
        if !v.is_empty() {
            let items = v.iter().map(|m| write_string_match(m, principal, st)).collect();
            map.insert(s(key), Value::Sequence(items));
        }
    };
    strings("namespaces", &m.namespaces, false);
    strings("notNamespaces", &m.not_namespaces, false);
    strings("principals", &m.principals, true);
    strings("notPrincipals", &m.not_principals, true);
    let accounts = |v: &[ServiceAccountMatch]| -> Value {
        Value::Sequence(
            v.iter()
                .map(|a| {
                    if st.plain && !a.namespace.contains('/') {
                        if a.namespace == policy_ns && !a.service_account.is_empty() && !a.service_account.contains('/')
                        {
                            return s(&a.service_account);
                        }
                        return s(&format!("{}/{}", a.namespace, a.service_account));
                    }
                    serde_yaml_ng::to_value(a).expect("serializes")
                })
                .collect(),
        )
    };
    if !m.service_accounts.is_empty() {
        map.insert(s("serviceAccounts"), accounts(&m.service_accounts));
    }
    if !m.not_service_accounts.is_empty() {
        map.insert(s("notServiceAccounts"), accounts(&m.not_service_accounts));
    }
    let cidrs = |v: &[Cidr]| -> Value {
        Value::Sequence(
            v.iter()
                .map(|c| {
                    let full = if c.addr.is_ipv4() { 32 } else { 128 };
                    if st.plain && c.prefix_len == full {
                        s(&c.addr.to_string())
                    } else {
                        s(&c.to_string())
                    }
                })
                .collect(),
        )
    };
    for (key, v) in [
        ("sourceIps", &m.source_ips),
        ("notSourceIps", &m.not_source_ips),
        ("destinationIps", &m.destination_ips),
        ("notDestinationIps", &m.not_destination_ips),
    ] {
        if !v.is_empty() {
            map.insert(s(key), cidrs(v));
        }
    }
    for (key, v) in [("destinationPorts", &m.destination_ports), ("notDestinationPorts", &m.not_destination_ports)] {
        if !v.is_empty() {
            map.insert(s(key), Value::Sequence(v.iter().map(|p| Value::Number((*p).into())).collect()));
        }
    }
    Value::Mapping(map)
}

fn write_policy(p: &Authorization, st: Style) -> Value {
    let mut map = Mapping::new();
    map.insert(s("name"), s(&p.name));
    map.insert(s("namespace"), s(&p.namespace));
    if !(st.omit_defaults && p.scope == PolicyScope::Namespace) {
        map.insert(s("scope"), serde_yaml_ng::to_value(p.scope).unwrap());
    }
    map.insert(s("action"), serde_yaml_ng::to_value(p.action).unwrap());
    if !(st.omit_defaults && !p.dry_run) {
        map.insert(s("dryRun"), Value::Bool(p.dry_run));
    }
    let wrap = |key: &str, items: Vec<Value>| {
        if st.ours {
            let mut m = Mapping::new();
            m.insert(s(key), Value::Sequence(items));
            Value::Mapping(m)
        } else {
            Value::Sequence(items)
        }
    };
    let rules = p
        .rules
        .iter()
        .map(|r| {
            wrap(
                "clauses",
                r.iter()
                    .map(|c| wrap("matches", c.iter().map(|m| write_match(m, &p.namespace, st)).collect()))
                    .collect(),
            )
        })
        .collect();
    map.insert(s("rules"), Value::Sequence(rules));
    Value::Mapping(map)
}

/// Whether the documentation says the parser must refuse `p`.
fn must_reject(p: &Authorization) -> bool {
    let bad_account = |a: &ServiceAccountMatch| {
        a.namespace.is_empty() || a.service_account.is_empty() || a.service_account.contains('/')
    };
    let bad_cidr = |c: &Cidr| c.prefix_len > if c.addr.is_ipv4() { 32 } else { 128 };
    p.name.is_empty()
        || p.namespace.is_empty()
        || p.rules.iter().flatten().flatten().any(|m| {
            m.service_accounts.iter().chain(&m.not_service_accounts).any(bad_account)
                || [&m.source_ips, &m.not_source_ips, &m.destination_ips, &m.not_destination_ips]
                    .into_iter()
                    .flatten()
                    .any(bad_cidr)
        })
}

// ---------------------------------------------------------------------------------------------
// The reference decision, written from the documented semantics (policy/mod.rs, matcher.rs).

fn listed(w: &Workload, ns: &str, name: &str) -> bool {
    w.authorization_policies.iter().any(|k| k.split_once('/') == Some((ns, name)))
}

fn ref_applies(p: &Authorization, w: &Workload) -> bool {
    listed(w, &p.namespace, &p.name)
        || match p.scope {
            PolicyScope::Global => true,
            PolicyScope::Namespace => p.namespace == w.namespace,
            PolicyScope::WorkloadSelector => false,
        }
}

fn ref_invalid_applies(p: &InvalidPolicy, w: &Workload) -> bool {
    let Some(ns) = &p.namespace else { return true };
    if let Some(name) = &p.name {
        if listed(w, ns, name) {
            return true;
        }
    }
    match p.scope {
        Some(PolicyScope::Global) => true,
        Some(PolicyScope::WorkloadSelector) if p.name.is_some() => false,
        _ => *ns == w.namespace,
    }
}

fn ref_string(m: &StringMatch, v: &str) -> bool {
    match m {
        StringMatch::Exact(x) => v == x,
        StringMatch::Prefix(x) => v.starts_with(x.as_str()),
        StringMatch::Suffix(x) => v.ends_with(x.as_str()),
        StringMatch::Presence => !v.is_empty(),
    }
}

/// IPv4 addresses (and IPv4-mapped IPv6 ones) as 32 bits, others as 128; a mapped network
/// covers the IPv4 addresses its last 32 bits cover.
fn ref_cidr(c: &Cidr, ip: IpAddr) -> bool {
    fn bits(ip: IpAddr) -> Vec<bool> {
        let bytes: Vec<u8> = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.octets().to_vec(),
                None => v6.octets().to_vec(),
            },
        };
        bytes.iter().flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1)).collect()
    }
    let mapped_net = matches!(c.addr, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    let len = if mapped_net { usize::from(c.prefix_len).saturating_sub(96) } else { usize::from(c.prefix_len) };
    let (net, addr) = (bits(c.addr), bits(ip));
    net.len() == addr.len() && net[..len.min(net.len())] == addr[..len.min(addr.len())]
}

fn either<T>(pos: &[T], neg: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&hit)) && !neg.iter().any(&hit)
}

fn ref_match(m: &Match, f: &ConnectionFacts) -> bool {
    let id = f.source_identity.as_ref();
    let principal = id.map(|i| format!("{}/ns/{}/sa/{}", i.trust_domain(), i.namespace(), i.service_account()));
    either(&m.namespaces, &m.not_namespaces, |s| id.is_some_and(|i| ref_string(s, i.namespace())))
        && either(&m.principals, &m.not_principals, |s| principal.as_deref().is_some_and(|p| ref_string(s, p)))
        && either(&m.service_accounts, &m.not_service_accounts, |a| {
            id.is_some_and(|i| a.namespace == i.namespace() && a.service_account == i.service_account())
        })
        && either(&m.source_ips, &m.not_source_ips, |c| ref_cidr(c, f.source_ip))
        && either(&m.destination_ips, &m.not_destination_ips, |c| ref_cidr(c, f.destination.ip()))
        && either(&m.destination_ports, &m.not_destination_ports, |p| *p == f.destination.port())
}

fn ref_policy_matches(p: &Authorization, f: &ConnectionFacts) -> bool {
    p.rules.iter().any(|rule| {
        rule.iter().all(|clause| clause.is_empty() || clause.iter().any(|m| !m.is_empty() && ref_match(m, f)))
    })
}

fn ref_allowed(valid: &[Authorization], invalid: &[InvalidPolicy], w: &Workload, f: &ConnectionFacts) -> bool {
    if invalid.iter().any(|p| ref_invalid_applies(p, w)) {
        return false;
    }
    let enforced: Vec<&Authorization> = valid.iter().filter(|p| !p.dry_run && ref_applies(p, w)).collect();
    if enforced.iter().any(|p| p.action == PolicyAction::Deny && ref_policy_matches(p, f)) {
        return false;
    }
    let mut allows = enforced.iter().filter(|p| p.action == PolicyAction::Allow).peekable();
    allows.peek().is_none() || allows.any(|p| ref_policy_matches(p, f))
}

// ---------------------------------------------------------------------------------------------

fn facts(u: &mut Unstructured, pools: &Pools) -> arbitrary::Result<ConnectionFacts> {
    let source_identity = if u.ratio(3, 4)? {
        Identity::new(&pick(u, DOMAINS)?, &pick(u, NAMESPACES)?, &pick(u, ACCOUNTS)?).ok()
    } else {
        None
    };
    let dst_port = if !pools.ports.is_empty() && u.arbitrary()? { *u.choose(&pools.ports)? } else { u.arbitrary()? };
    Ok(ConnectionFacts {
        source_identity,
        source_ip: ip(u, &pools.ips)?,
        destination: SocketAddr::new(ip(u, &pools.ips)?, dst_port),
    })
}

fn workload(u: &mut Unstructured, policies: &[Authorization]) -> arbitrary::Result<Workload> {
    let listed = vec_of(u, 2, |u| {
        if !policies.is_empty() && u.ratio(3, 4)? {
            Ok(u.choose(policies)?.key())
        } else {
            Ok(format!("{}/{}", pick(u, NAMESPACES)?, pick(u, NAMES)?))
        }
    })?;
    Ok(Workload {
        uid: "w1".into(),
        name: "w1".into(),
        namespace: pick(u, NAMESPACES)?,
        service_account: pick(u, ACCOUNTS)?,
        workload_ips: vec!["10.0.0.1".parse().unwrap()],
        protocol: WorkloadProtocol::Hbone,
        node: String::new(),
        trust_domain: String::new(),
        services: Default::default(),
        authorization_policies: listed,
        canonical_name: String::new(),
        canonical_revision: String::new(),
        cluster_id: String::new(),
        workload_name: String::new(),
        workload_type: String::new(),
        labels: Default::default(),
        locality: Default::default(),
    })
}

fn check_decisions(valid: &[Authorization], invalid: &[InvalidPolicy], w: &Workload, f: &ConnectionFacts) {
    let policies = ztunnel::policy::Policies { valid, invalid };
    let target = w.policy_target();
    let d = evaluate(policies, &target, f);
    assert_eq!(evaluate(policies, &target, f), d, "evaluate is not deterministic");
    if let Decision::Deny(reason) = &d {
        assert!(!reason.is_empty(), "a denial names its reason");
    }
    let expected = ref_allowed(valid, invalid, w, f);
    assert_eq!(
        d.allowed(),
        expected,
        "decision {d:?} differs from the documented semantics\nworkload: {w:?}\nfacts: {f:?}\nvalid: {valid:#?}\ninvalid: {invalid:#?}"
    );
    let enforced: Vec<Authorization> = valid.iter().filter(|p| !p.dry_run).cloned().collect();
    let without_dry_run = ztunnel::policy::Policies { valid: &enforced, invalid };
    assert_eq!(evaluate(without_dry_run, &target, f), d, "dry-run policies changed the decision");
}

fn structured(u: &mut Unstructured) -> arbitrary::Result<()> {
    let mut pools = Pools { ips: vec![], ports: vec![] };
    let generated = vec_of(u, 4, |u| policy(u, &mut pools))?;
    let styles: Vec<Style> = generated.iter().map(|_| u.arbitrary()).collect::<arbitrary::Result<_>>()?;
    let w = workload(u, &generated)?;
    let entries: Vec<Value> = generated.iter().zip(&styles).map(|(p, st)| write_policy(p, *st)).collect();
    let mut doc = Mapping::new();
    doc.insert(s("policies"), Value::Sequence(entries));
    let yaml = serde_yaml_ng::to_string(&doc).expect("document serializes");
    let (cfg, errors) = parse_local_config(&yaml);
    assert!(cfg.workloads.is_empty() && cfg.services.is_empty());

    let (mut valid, mut invalid) = (cfg.policies.iter(), cfg.invalid_policies.iter());
    for p in &generated {
        if must_reject(p) {
            let bad =
                invalid.next().unwrap_or_else(|| panic!("accepted a policy that breaks the rules: {p:?}\n{yaml}"));
            assert_eq!(bad.namespace.as_deref(), Some(p.namespace.as_str()).filter(|n| !n.is_empty()));
            assert_eq!(bad.name.as_deref(), Some(p.name.as_str()).filter(|n| !n.is_empty()));
            assert!(bad.scope.is_none() || bad.scope == Some(p.scope), "scope misread: {bad:?} for {p:?}");
        } else {
            let got = valid.next().unwrap_or_else(|| panic!("rejected a valid policy {p:?}: {errors:?}\n{yaml}"));
            assert_eq!(got, p, "parse of the written policy differs\n{yaml}");
        }
    }
    assert!(valid.next().is_none() && invalid.next().is_none(), "more policies than written");

    for _ in 0..u.int_in_range(1..=4)? {
        let f = facts(u, &pools)?;
        check_decisions(&cfg.policies, &cfg.invalid_policies, &w, &f);
    }
    Ok(())
}

/// The first `FACTS` bytes choose the connection, the rest is the YAML document.
const FACTS: usize = 32;

fn raw(data: &[u8]) -> arbitrary::Result<()> {
    if data.len() < FACTS {
        return Ok(());
    }
    let (head, text) = data.split_at(FACTS);
    let f = facts(&mut Unstructured::new(head), &Pools { ips: vec![], ports: vec![] })?;
    let text = match std::str::from_utf8(text) {
        Ok(t) => t,
        Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap(),
    };
    let (cfg, _) = parse_local_config(text);
    for w in &cfg.workloads {
        check_decisions(&cfg.policies, &cfg.invalid_policies, w, &f);
    }
    // Valid policies written back as YAML decide the same way.
    let yaml = serde_yaml_ng::to_string(&serde_yaml_ng::to_value(&cfg.policies).unwrap()).unwrap();
    let entries: Vec<Value> = serde_yaml_ng::from_str(&yaml).unwrap();
    let again: Vec<Authorization> = entries
        .iter()
        .map(|v| ztunnel::policy::parse_policy(v).unwrap_or_else(|e| panic!("written policy rejected: {e:?}\n{yaml}")))
        .collect();
    assert_eq!(again, cfg.policies, "policies differ after a YAML round trip");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    // First byte odd: a raw document (see `raw`); even: generated policies.
    let Some((&mode, rest)) = data.split_first() else { return };
    let _ = if mode & 1 == 1 { raw(rest) } else { structured(&mut Unstructured::new(rest)) };
});
