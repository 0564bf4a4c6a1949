//! The node agent's opt-in connection spans: with them on, a connection across two nodes
//! gives an outbound (client) span on the source node and an inbound (server) span on the
//! destination node, in one trace, the inbound one the child of the outbound one through the
//! HBONE CONNECT's `traceparent`, both received and decoded by a real OTLP/HTTP receiver.
use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::otlp::OtlpReceiver;
use mesh_tests::Cluster;

#[test]
fn connection_spans_link_the_outbound_and_inbound_sides_of_an_hbone_connection() {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    // The collector, where the agents (in the test's netns, as a DaemonSet's in the host's) reach it.
    let receiver = OtlpReceiver::start_local().unwrap();
    let nodes = [
        MeshNode::start_with_connection_spans(&c, 0, &receiver.endpoint()).unwrap(),
        MeshNode::start_with_connection_spans(&c, 1, &receiver.endpoint()).unwrap(),
    ];
    let yaml = format!(
        "workloads:\n{}{}",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "server", "")
    );
    write_mesh_config(&c, &yaml, &[&nodes[0], &nodes[1]]).unwrap();
    nodes[0].enroll_as(&client, "default", "client").unwrap();
    nodes[1].enroll_as(&server, "default", "server").unwrap();
    let _app = PeerServer::start(&server, 8080).unwrap();
    let dst = SocketAddr::new(server.ip4().into(), 8080);
    request(&client, dst, "traced").unwrap();

    let wait = Duration::from_secs(10);
    let out = receiver
        .wait_for(
            "outbound",
            |s| s.name.starts_with("outbound ") && s.attr("destination.address") == Some(&dst.to_string()),
            wait,
        )
        .unwrap();
    assert_eq!(out.kind, 3, "SPAN_KIND_CLIENT: {out:#?}");
    assert_eq!(out.service, "ztunnel");
    assert!(out.parent_span_id.is_empty(), "a connection starts its own trace: {out:#?}");
    assert_eq!(out.attr("istio.source_principal"), Some("spiffe://cluster.local/ns/default/sa/client"));
    assert_eq!(out.attr("istio.destination_principal"), Some("spiffe://cluster.local/ns/default/sa/server"));
    let inb =
        receiver.wait_for("inbound", |s| s.name.starts_with("inbound ") && s.trace_id == out.trace_id, wait).unwrap();
    assert_eq!(inb.kind, 2, "SPAN_KIND_SERVER: {inb:#?}");
    assert_eq!(inb.parent_span_id, out.span_id, "the inbound span is the outbound span's child");
    assert_eq!(inb.attr("istio.source_principal"), Some("spiffe://cluster.local/ns/default/sa/client"));
    assert!(inb.attr("istio.bytes_received").is_some_and(|b| b != "0"), "{inb:#?}");
}
