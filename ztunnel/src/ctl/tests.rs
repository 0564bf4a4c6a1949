//! `ztunnel ctl` against canned admin answers and dumps: tables, versions and errors.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use serde_json::json;

use super::*;

/// Serves one connection with `answer`; the address to ask.
fn canned(answer: String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            // The whole request first: answering and closing with unread bytes would reset
            // the connection under the client's read.
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer.as_bytes());
        }
    });
    addr
}

fn ok(body: &str) -> String {
    format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn table(dump: &serde_json::Value, r: Resource) -> String {
    render(&select(dump, r), r, Output::Table).unwrap()
}

/// The table's row whose cells include `needle`.
fn row<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no row with {needle}: {out}"))
}

#[test]
fn workloads_print_as_a_table_with_their_identity_columns() {
    let dump = json!({"dumpVersion": 1, "workloads": [
        {"name": "productpage", "namespace": "bookinfo", "workloadIps": ["10.244.0.10"], "node": "node-a",
         "protocol": "HBONE", "serviceAccount": "bookinfo-productpage"}
    ]});
    let out = render(&select(&dump, Resource::Workloads), Resource::Workloads, Output::Table).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE  NAME"), "{out}");
    assert!(
        lines[1].contains("productpage") && lines[1].contains("10.244.0.10") && lines[1].contains("HBONE"),
        "{out}"
    );
}

#[test]
fn json_and_yaml_carry_the_whole_selection() {
    let dump = json!({"dumpVersion": 1, "services": [{"name": "reviews", "vips": ["10.96.0.12"]}]});
    let sel = select(&dump, Resource::Services);
    let j: serde_json::Value = serde_json::from_str(&render(&sel, Resource::Services, Output::Json).unwrap()).unwrap();
    assert_eq!(j, sel);
    assert!(render(&sel, Resource::Services, Output::Yaml).unwrap().contains("- name: reviews"));
}

#[test]
fn a_dump_of_another_version_is_refused_by_name() {
    let addr = canned(ok(r#"{"dumpVersion": 7}"#));
    let e = fetch_dump(addr).unwrap_err().to_string();
    assert!(e.contains("version 7") && e.contains(&format!("reads version {DUMP_VERSION}")), "{e}");
}

#[test]
fn a_dump_from_before_connections_were_listed_is_refused() {
    // Version 1 had no `connections` or `ebpfLinks`: its empty tables would be lies.
    let addr = canned(ok(r#"{"dumpVersion": 1, "workloads": []}"#));
    let e = fetch_dump(addr).unwrap_err().to_string();
    assert!(e.contains("version 1"), "{e}");
}

#[test]
fn an_agent_that_is_not_there_is_a_clear_error() {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = fetch_dump(addr).unwrap_err().to_string();
    assert!(e.contains("cannot reach the agent's admin endpoint"), "{e}");
}

#[test]
fn an_error_status_is_shown_with_its_body() {
    let addr = canned("HTTP/1.0 400 Bad Request\r\n\r\nunknown level\n".into());
    let e = log_level(addr, Some("nonsense")).unwrap_err().to_string();
    assert!(e.contains("400") && e.contains("unknown level"), "{e}");
}

#[test]
fn connections_print_direction_endpoints_identities_protocol_and_age() {
    let dump = json!({"dumpVersion": DUMP_VERSION, "connections": [
        {"direction": "outbound", "src": "10.244.0.7:40312", "dst": "10.244.0.9:8080", "protocol": "HBONE",
         "srcIdentity": "spiffe://cluster.local/ns/default/sa/client",
         "dstIdentity": "spiffe://cluster.local/ns/default/sa/shop", "ageMs": 125_000}
    ], "connectionsOverflow": {"capacity": 10000, "open": 0, "total": 0}});
    let out = table(&dump, Resource::Connections);
    assert!(out.lines().next().unwrap().starts_with("DIRECTION  SOURCE"), "{out}");
    let r = row(&out, "10.244.0.7:40312");
    for cell in ["outbound", "10.244.0.9:8080", "sa/client", "sa/shop", "HBONE", "2m05s"] {
        assert!(r.contains(cell), "{cell} missing: {out}");
    }
    assert!(!out.contains("not listed"), "{out}");
}

#[test]
fn a_connection_without_identities_shows_its_workloads() {
    let dump = json!({"dumpVersion": DUMP_VERSION, "connections": [
        {"direction": "inbound_passthrough", "src": "10.244.1.3:5000", "dst": "10.244.0.9:8080", "protocol": "TCP",
         "srcIdentity": null, "srcWorkload": "legacy/batch", "dstIdentity": null, "dstWorkload": "default/shop",
         "ageMs": 900}
    ]});
    let r = row(&table(&dump, Resource::Connections), "inbound_passthrough").to_string();
    assert!(r.contains("legacy/batch") && r.contains("default/shop") && r.contains(" 0s"), "{r}");
}

#[test]
fn unlisted_connections_are_counted_under_the_connections_table() {
    let dump = json!({"dumpVersion": DUMP_VERSION, "connections": [],
        "connectionsOverflow": {"capacity": 10000, "open": 17, "total": 40}});
    let out = table(&dump, Resource::Connections);
    assert!(out.contains("17 more open connections are not listed (the agent lists at most 10000)"), "{out}");
}

#[test]
fn connections_as_json_carry_the_list_and_the_overflow() {
    let dump = json!({"dumpVersion": DUMP_VERSION, "connections": [{"src": "10.0.0.1:1"}],
        "connectionsOverflow": {"capacity": 5, "open": 1, "total": 1}});
    let sel = select(&dump, Resource::Connections);
    let j: serde_json::Value =
        serde_json::from_str(&render(&sel, Resource::Connections, Output::Json).unwrap()).unwrap();
    assert_eq!(j["connections"][0]["src"], "10.0.0.1:1");
    assert_eq!(j["overflow"]["open"], 1);
}

#[test]
fn certificates_show_validity_and_the_issuer_chain_up_to_the_root() {
    let now = now_unix();
    let dump = json!({"dumpVersion": DUMP_VERSION, "certificates": [
        {"identity": "spiffe://cluster.local/ns/default/sa/shop", "state": "available", "serial": "5a1f",
         "not_before_unix": now - 600, "not_after_unix": now + 23 * 3600 + 1800, "failures": 0,
         "chain": [
            {"subject": "", "issuer": "CN=mesh intermediate", "serial": "5a1f", "root": false},
            {"subject": "CN=mesh intermediate", "issuer": "O=cluster.local", "serial": "02", "root": false},
            {"subject": "O=cluster.local", "issuer": "O=cluster.local", "serial": "01", "root": true}
         ]}
    ]});
    let out = table(&dump, Resource::Certificates);
    let header = out.lines().next().unwrap();
    assert!(["VALID SINCE", "EXPIRES", "ISSUED BY"].iter().all(|h| header.contains(h)), "{out}");
    let r = row(&out, "sa/shop");
    assert!(r.contains("5a1f") && r.contains("available"), "{out}");
    assert!(r.contains("10m00s ago") && r.contains("in 23h"), "{out}");
    assert!(r.contains("CN=mesh intermediate > O=cluster.local (root)"), "{out}");
}

#[test]
fn a_chain_that_reaches_no_root_of_the_bundle_says_so() {
    let dump = json!({"dumpVersion": DUMP_VERSION, "certificates": [
        {"identity": "spiffe://cluster.local/ns/default/sa/shop", "state": "available",
         "chain": [{"subject": "", "issuer": "CN=old root", "serial": "5a1f", "root": false}]}
    ]});
    let r = table(&dump, Resource::Certificates);
    assert!(r.contains("CN=old root (not in the trust bundle)"), "{r}");
}

#[test]
fn ebpf_shows_program_counters_links_and_enrolled_pods() {
    let dump = json!({"dumpVersion": DUMP_VERSION,
        "ebpfCounters": {"connect4": {"captured": 12, "bypassed": 3, "errors": 0}},
        "ebpfLinks": [
            {"program": "capture_connect4", "hook": "cgroup/connect4", "attachPoint": "/sys/fs/cgroup/kubepods",
             "linkId": 41, "programId": 97},
            {"program": "steer_inbound", "hook": "sk_lookup", "attachPoint": "netns of pod shop-1", "pod": "shop-1",
             "linkId": 44, "programId": 101}
        ],
        "enrolledPods": [{"uid": "shop-1", "name": "shop", "namespace": "default", "netnsCookie": 4099}]});
    let out = table(&dump, Resource::Ebpf);
    let counters = row(&out, "connect4 ");
    assert!(counters.contains("12") && counters.contains("3"), "{out}");
    let link = row(&out, "capture_connect4");
    assert!(
        link.contains("cgroup/connect4") && link.contains("/sys/fs/cgroup/kubepods") && link.contains("41"),
        "{out}"
    );
    assert!(row(&out, "steer_inbound").contains("netns of pod shop-1"), "{out}");
    let pod = row(&out, "4099");
    assert!(pod.contains("default") && pod.contains("shop-1"), "{out}");
}

#[test]
fn ebpf_as_json_carries_counters_links_and_pods() {
    let dump = json!({"dumpVersion": DUMP_VERSION, "ebpfCounters": {"connect4": {"captured": 1}},
        "ebpfLinks": [{"program": "record_origdst"}], "enrolledPods": [{"uid": "p"}]});
    let j: serde_json::Value =
        serde_json::from_str(&render(&select(&dump, Resource::Ebpf), Resource::Ebpf, Output::Json).unwrap()).unwrap();
    assert_eq!(
        (&j["counters"]["connect4"]["captured"], &j["links"][0]["program"], &j["enrolledPods"][0]["uid"]),
        (&json!(1), &json!("record_origdst"), &json!("p"))
    );
}

#[test]
fn log_level_as_json_has_the_level_and_the_agents_note() {
    let answer = "debug\n(recorded only: no reloadable log filter is installed)\n";
    let j: serde_json::Value = serde_json::from_str(&render_log_level(answer, Output::Json).unwrap()).unwrap();
    assert_eq!(j["level"], "debug");
    assert_eq!(j["note"], "(recorded only: no reloadable log filter is installed)");
}

#[test]
fn log_level_as_a_table_is_the_agents_answer() {
    assert_eq!(render_log_level("info,ztunnel::proxy=debug\n", Output::Table).unwrap(), "info,ztunnel::proxy=debug\n");
}
