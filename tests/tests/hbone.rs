//! HBONE end to end on the mini-cluster: captured traffic carried in mTLS HTTP/2 CONNECT
//! between in-pod proxies, identities checked on both sides, on-the-wire assertions,
//! pooling, metrics and config dump over HTTP.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::wire::sniff;
use mesh_tests::{Cluster, InNetns, Pod};
use ztunnel::proxy::Direction;
use ztunnel::redirect::Exclusions;

const WAIT: Duration = Duration::from_secs(5);
const VIP: &str = "10.96.0.10";

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

struct Mesh {
    c: Cluster,
    n0: MeshNode,
    n1: MeshNode,
    client: Pod,
    local: Pod,
    server: Pod,
}

fn mesh() -> Mesh {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let local = c.add_pod(0, "local").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let n1 = MeshNode::start(&c, 1, Exclusions::default()).unwrap();
    let svc = "  services:\n    default/server.default.svc.cluster.local:\n      80: 8080\n";
    let yaml = format!(
        "workloads:\n{}{}{}services:\n- name: server\n  namespace: default\n  hostname: server.default.svc.cluster.local\n  vips: [\"/{VIP}\"]\n  ports:\n    80: 8080\n",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&local, "default", "local", svc),
        workload_yaml(&server, "default", "server", svc),
    );
    write_mesh_config(&c, &yaml, &[&n0, &n1]).unwrap();
    n0.enroll(&client).unwrap();
    n0.enroll(&local).unwrap();
    n1.enroll(&server).unwrap();
    Mesh { c, n0, n1, client, local, server }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn pod_and_service_traffic_is_carried_in_mtls_hbone() {
    let m = mesh();
    let _app = PeerServer::start(&m.server, 8080).unwrap();
    let _local_app = PeerServer::start(&m.local, 8080).unwrap();
    let dst = SocketAddr::new(m.server.ip4().into(), 8080);
    let (mut ev0, mut ev1) = (m.n0.events(), m.n1.events());

    // Cross-node, watched on node 1's wire: TLS records to 15008, never the plaintext.
    let marker = "PLAINTEXT-MARKER-7f3a";
    let client = m.client.clone();
    let (cap, reply) = sniff(m.c.node(1), move || request(&client, dst, marker)).unwrap();
    let reply = reply.unwrap();
    assert_eq!(reply.got, marker);
    assert!(!cap.contains(marker.as_bytes()), "plaintext crossed the wire");
    let tls = cap.tcp_payloads(15008);
    assert!(tls.iter().any(|p| p.len() > 5 && p[0] == 0x16 && p[1] == 0x03), "no TLS handshake record to 15008");
    assert!(tls.iter().any(|p| p.len() > 5 && p[0] == 0x17 && p[1] == 0x03 && p[2] == 0x03), "no TLS application data");

    let out =
        wait_record(&mut ev0, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst).expect("outbound record");
    assert_eq!(out.protocol, "HBONE");
    assert_eq!(out.dst_identity.as_deref(), Some(id("server").as_str()), "client checked the server's SAN");
    let inb =
        wait_record(&mut ev1, WAIT, |r| r.direction == Direction::Inbound && r.dst == dst).expect("inbound record");
    assert_eq!(inb.src_identity.as_deref(), Some(id("client").as_str()), "server saw the client's certificate");
    assert_eq!(inb.src.ip(), IpAddr::from(m.client.ip4()), "the TCP peer is the client pod (dialled from its netns)");
    assert_eq!(inb.bytes_sent, (marker.len() + 1) as u64);

    // Same node, and IPv6.
    for dst in [SocketAddr::new(m.local.ip4().into(), 8080), SocketAddr::new(m.server.ip6().into(), 8080)] {
        assert!(request(&m.client, dst, "x").is_ok());
        let r = wait_record(&mut ev0, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst).expect("record");
        assert_eq!((r.protocol, r.error.clone()), ("HBONE", None), "{dst}");
    }

    // Service VIP: resolved to an endpoint, port 80 -> 8080, carried in HBONE.
    let vip = SocketAddr::new(VIP.parse().unwrap(), 80);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = request(&m.client, vip, "via-vip").unwrap();
        assert_eq!(r.got, "via-vip");
        let rec = wait_record(&mut ev0, WAIT, |r| r.dst == vip).expect("vip record");
        assert_eq!(rec.protocol, "HBONE");
        seen.insert(rec.dst_identity.unwrap());
    }
    assert_eq!(seen.len(), 2, "round robin over both endpoints: {seen:?}");

    // A plaintext client on 15008 gets no HTTP answer: the TLS handshake fails, and is counted.
    let hbone = SocketAddr::new(m.server.ip4().into(), 15008);
    let answer = m.c.node(1).run(move || {
        let mut s = TcpStream::connect_timeout(&hbone, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.write_all(b"CONNECT 10.244.1.10:8080 HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    });
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"), "plaintext CONNECT was served");
    std::thread::sleep(Duration::from_millis(100));
    let metrics = m.n1.agent().metrics().encode();
    assert!(
        metrics.lines().any(|l| l.starts_with("ztunnel_tls_handshake_failures_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[test]
fn connections_share_pooled_hbone_and_metrics_and_config_dump_are_served() {
    let m = mesh();
    let _app = PeerServer::start(&m.server, 8080).unwrap();
    let dst = SocketAddr::new(m.server.ip4().into(), 8080);
    for i in 0..20 {
        request(&m.client, dst, &format!("req-{i}")).unwrap();
    }
    let stats = m.n0.agent().pool_stats();
    assert_eq!(stats.connections_opened, 1, "20 requests shared one HBONE connection: {stats:?}");
    assert!(stats.streams_opened >= 20, "{stats:?}");

    let admin = m.n1.agent().admin().expect("admin server");
    let (status, body) = http_get(admin.metrics_addr, "/stats/prometheus");
    assert_eq!(status, 200);
    let opened = body
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{}\"", id("client")))
                && l.contains(&format!("destination_principal=\"{}\"", id("server")))
                && l.contains("destination_workload=\"server\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        })
        .unwrap_or_else(|| panic!("no destination-reported series:\n{body}"));
    assert!(opened.ends_with(" 20"), "{opened}");
    assert!(body.contains("istio_tcp_received_bytes_total{"), "{body}");
    assert!(body.contains("istio_tcp_sent_bytes_total{"));
    assert!(body.contains("istio_tcp_connections_closed_total{"));
    assert!(
        body.lines().any(|l| l.starts_with("ztunnel_ebpf_program_events_total{") && l.contains("sk_lookup")),
        "{body}"
    );
    let (_, client_metrics) = http_get(m.n0.agent().admin().unwrap().metrics_addr, "/metrics");
    assert!(
        client_metrics
            .lines()
            .any(|l| l.starts_with("ztunnel_hbone_pool_connections_opened_total") && l.ends_with(" 1")),
        "{client_metrics}"
    );

    let (status, dump) = http_get(admin.admin_addr, "/config_dump");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&dump).expect("config_dump is JSON");
    assert_eq!(v["workloads"].as_array().map(|a| a.len()), Some(3));
    assert_eq!(v["enrolledPods"][0]["uid"], m.server.uid());
    assert!(v["certificates"].as_array().is_some_and(|c| !c.is_empty()), "{v}");
    let (status, _) = http_get(admin.readiness_addr, "/healthz/ready");
    assert_eq!(status, 200);
}

#[test]
fn workloads_without_a_trust_domain_use_the_agents_own() {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let td = "example.org";
    let n0 = MeshNode::start_in(&c, 0, Exclusions::default(), td).unwrap();
    let n1 = MeshNode::start_in(&c, 1, Exclusions::default(), td).unwrap();
    // workload_yaml sets no trustDomain: the agents' --trust-domain must apply.
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", "")
    );
    write_mesh_config(&c, &yaml, &[&n0, &n1]).unwrap();
    n0.enroll_as(&client, "default", "client").unwrap();
    n1.enroll_as(&server, "default", "server").unwrap();
    let _app = PeerServer::start(&server, 8080).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), 8080);
    let mut ev1 = n1.events();
    assert_eq!(request(&client, dst, "custom-td").expect("HBONE in example.org").got, "custom-td");
    let inb =
        wait_record(&mut ev1, WAIT, |r| r.direction == Direction::Inbound && r.dst == dst).expect("inbound record");
    assert_eq!(inb.src_identity.as_deref(), Some("spiffe://example.org/ns/default/sa/client"));
    assert_eq!(inb.dst_identity.as_deref(), Some("spiffe://example.org/ns/default/sa/server"));
}
