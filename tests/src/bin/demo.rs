//! `cargo xtask demo`: a two-node mini-cluster, a client pod and a server pod enrolled in
//! their node agents, a few requests, and what the mesh saw. Exits non-zero with a reason
//! if anything is off; cleans up everything it created.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, wait_record, MeshNode};
use mesh_tests::{sweep_leftovers, Cluster};
use ztunnel::proxy::Direction;
use ztunnel::redirect::{CounterSnapshot, Exclusions};

fn main() -> Result<()> {
    sweep_leftovers();
    sweep_pins();
    let mut cluster = Cluster::new(2).context("building the mini-cluster (needs root)")?;
    let client = cluster.add_pod(0, "client")?;
    let server = cluster.add_pod(1, "server")?;
    println!("mini-cluster {}: client {} / {} on node0, server {} / {} on node1",
        cluster.prefix(), client.ip4(), client.ip6(), server.ip4(), server.ip6());

    let node0 = MeshNode::start(&cluster, 0, Exclusions::default()).context("node0 agent")?;
    let node1 = MeshNode::start(&cluster, 1, Exclusions::default()).context("node1 agent")?;
    node0.enroll(&client)?;
    node1.enroll(&server)?;
    println!("enrolled {} on node0 and {} on node1 (netns fd over the enrollment socket)", client.uid(), server.uid());
    let _app = PeerServer::start(&server, 8080)?;

    for ip in [IpAddr::from(server.ip4()), IpAddr::from(server.ip6())] {
        let dst = SocketAddr::new(ip, 8080);
        let (mut ev0, mut ev1) = (node0.events(), node1.events());
        let reply = request(&client, dst, "hello from the demo")?;
        ensure!(reply.got == "hello from the demo", "server received {:?}", reply.got);
        println!("\nclient -> {dst}: server got {:?}, saw peer {}", reply.got, reply.peer);
        let out = wait_record(&mut ev0, Duration::from_secs(5), |r| r.direction == Direction::Outbound && r.dst == dst)
            .context("node0 proxy recorded no outbound connection")?;
        println!("  node0 outbound (15001): {} -> original destination {} ({} bytes sent, {} received)",
            out.src, out.dst, out.bytes_sent, out.bytes_received);
        let inb = wait_record(&mut ev1, Duration::from_secs(5), |r| r.direction == Direction::InboundPassthrough && r.dst == dst)
            .context("node1 proxy recorded no inbound connection")?;
        println!("  node1 inbound  (15006): {} -> {} ({} bytes sent, {} received)",
            inb.src, inb.dst, inb.bytes_sent, inb.bytes_received);
        ensure!(out.bytes_sent > 0 && inb.bytes_sent == out.bytes_sent, "bytes did not arrive end to end");
    }
    print_counters("node0", &node0.counters());
    print_counters("node1", &node1.counters());
    let c0 = node0.counters();
    ensure!(c0.connect4.captured > 0 && c0.connect6.captured > 0, "node0 captured nothing: {c0:?}");
    ensure!(node1.counters().sk_lookup.captured >= 2, "node1 inbound steering did not count");
    println!("\ndemo OK: traffic captured by eBPF on both nodes and delivered; cleaning up");
    Ok(())
}

fn print_counters(node: &str, c: &CounterSnapshot) {
    println!("\n{node} eBPF counters (captured / bypassed / errors):");
    for (name, o) in [("connect4", c.connect4), ("connect6", c.connect6), ("sock_ops", c.sock_ops), ("sk_lookup", c.sk_lookup)] {
        println!("  {name:<10} {:>4} / {:>4} / {:>4}", o.captured, o.bypassed, o.errors);
    }
}
