//! `cargo xtask demo`: a two-node mini-cluster with pods on both nodes, enrolled in their
//! node agents. Traffic is captured by eBPF and carried between the in-pod proxies in mTLS
//! HBONE; the demo prints the identities each side saw, the policy decisions, the eBPF
//! counters and the Istio metrics. Exits non-zero with a reason if anything is off, and
//! cleans up everything it created.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{sweep_leftovers, Cluster};
use ztunnel::proxy::Direction;
use ztunnel::redirect::{CounterSnapshot, Exclusions};

const WAIT: Duration = Duration::from_secs(5);

fn main() -> Result<()> {
    sweep_leftovers();
    sweep_pins();
    let mut cluster = Cluster::new(2).context("building the mini-cluster (needs root)")?;
    let client = cluster.add_pod(0, "client")?;
    let intruder = cluster.add_pod(0, "intruder")?;
    let server = cluster.add_pod(1, "server")?;
    println!("mini-cluster {}:", cluster.prefix());
    for p in [&client, &intruder, &server] {
        println!("  pod {:<9} node{}  {} / {}", p.name(), p.node(), p.ip4(), p.ip6());
    }

    let node0 = MeshNode::start(&cluster, 0, Exclusions::default()).context("node0 agent")?;
    let node1 = MeshNode::start(&cluster, 1, Exclusions::default()).context("node1 agent")?;
    let policy = "policies:\n- name: only-client\n  namespace: default\n  action: Allow\n  rules:\n  - clauses:\n    - matches:\n      - principals: [\"cluster.local/ns/default/sa/client\"]\n";
    let yaml = format!(
        "workloads:\n{}{}{}{policy}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&intruder, "default", "intruder", ""),
        workload_yaml(&server, "default", "server", ""),
    );
    write_mesh_config(&cluster, &yaml, &[&node0, &node1])?;
    node0.enroll(&client)?;
    node0.enroll(&intruder)?;
    node1.enroll(&server)?;
    println!("\nenrolled client and intruder on node0, server on node1; policy: ALLOW only sa/client into default");
    let _app = PeerServer::start(&server, 8080)?;

    for ip in [IpAddr::from(server.ip4()), IpAddr::from(server.ip6())] {
        let dst = SocketAddr::new(ip, 8080);
        let (mut ev0, mut ev1) = (node0.events(), node1.events());
        let reply = request(&client, dst, "hello over HBONE")?;
        ensure!(reply.got == "hello over HBONE", "server received {:?}", reply.got);
        println!("\nclient -> {dst}: server got {:?} (app saw peer {})", reply.got, reply.peer);
        let out = wait_record(&mut ev0, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst)
            .context("node0 recorded no outbound connection")?;
        println!(
            "  node0 outbound (15001): captured {} -> {}, sent in {} as {}",
            out.src,
            out.dst,
            out.protocol,
            out.src_identity.as_deref().unwrap_or("-")
        );
        println!("                          verified server identity {}", out.dst_identity.as_deref().unwrap_or("-"));
        let inb = wait_record(&mut ev1, WAIT, |r| r.direction == Direction::Inbound && r.dst == dst)
            .context("node1 recorded no inbound HBONE connection")?;
        println!(
            "  node1 inbound  (15008): mTLS peer {} from {}, policy ALLOW, {} bytes in / {} out",
            inb.src_identity.as_deref().unwrap_or("-"),
            inb.src,
            inb.bytes_sent,
            inb.bytes_received
        );
        ensure!(out.protocol == "HBONE" && inb.src_identity == out.src_identity, "identities do not match end to end");
        ensure!(inb.bytes_sent == out.bytes_sent, "bytes did not arrive end to end");
    }

    let dst = SocketAddr::new(server.ip4().into(), 8080);
    let mut ev1 = node1.events();
    let denied = request(&intruder, dst, "let me in");
    ensure!(denied.is_err(), "the intruder was let in: {denied:?}");
    let rec = wait_record(&mut ev1, WAIT, |r| r.error.is_some()).context("no denial recorded")?;
    println!(
        "\nintruder -> {dst}: refused (HBONE 401); node1 says: {} for {}",
        rec.error.as_deref().unwrap_or("-"),
        rec.src_identity.as_deref().unwrap_or("-")
    );

    print_counters("node0", &node0.counters());
    print_counters("node1", &node1.counters());
    println!("\nnode1 metrics (Istio names):");
    for line in node1.agent().metrics().encode().lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total") || l.starts_with("ztunnel_authorization_denied_total")
    }) {
        println!("  {}", shorten(line));
    }
    let c0 = node0.counters();
    ensure!(c0.connect4.captured > 0 && c0.connect6.captured > 0, "node0 captured nothing: {c0:?}");
    println!("\ndemo OK: eBPF capture -> HBONE (mTLS, SPIFFE) -> policy -> app; cleaning up");
    Ok(())
}

fn shorten(line: &str) -> String {
    let keep = ["reporter", "source_principal", "destination_workload", "connection_security_policy", "direction"];
    let Some((name, rest)) = line.split_once('{') else { return line.to_string() };
    let Some((labels, value)) = rest.rsplit_once('}') else { return line.to_string() };
    let labels: Vec<&str> =
        labels.split(',').filter(|l| keep.iter().any(|k| l.starts_with(&format!("{k}=")))).collect();
    format!("{name}{{{}}}{value}", labels.join(","))
}

fn print_counters(node: &str, c: &CounterSnapshot) {
    println!("\n{node} eBPF counters (captured / bypassed / errors):");
    for (name, o) in
        [("connect4", c.connect4), ("connect6", c.connect6), ("sock_ops", c.sock_ops), ("sk_lookup", c.sk_lookup)]
    {
        println!("  {name:<10} {:>4} / {:>4} / {:>4}", o.captured, o.bypassed, o.errors);
    }
}
