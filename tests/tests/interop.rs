//! HBONE interop with Istio's own ztunnel (issue 9, DESIGN §11), both ways, on the
//! mini-cluster: our agent serves a pod on node 0 with eBPF capture; Istio's ztunnel
//! (dedicated mode, `FAKE_CA`) serves a pod on node 1 behind istio-cni's real in-pod
//! iptables rules. Both read the same Istio-shaped local config, and our agent signs from
//! Istio's `FAKE_CA` root loaded as plug-in CA files, so each side verifies the other's
//! SPIFFE certificate. Without the peer binary the tests print one line and return.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::istio::{
    install_istio_cni_rules, metric_sum, peer_or_skip, write_fake_ca_plugin_dir, IstioZtunnel, TempDir,
};
use mesh_tests::loadgen::EchoServer;
use mesh_tests::mesh::{sweep_pins, wait_record, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns, Pod};
use serde_json::Value;
use ztunnel::proxy::{ConnectionRecord, Direction};

const WAIT: Duration = Duration::from_secs(5);
/// The port both apps listen on, and the service port mapped to it.
const APP_PORT: u16 = 8080;
const SVC_PORT: u16 = 80;
/// The port of the load generator's echo server in both pods.
const ECHO_PORT: u16 = 9000;
/// Service VIPs: `ours` fronts our pod, `istio` fronts Istio's.
const OURS_VIPS: [&str; 2] = ["10.96.0.20", "fd00:96::20"];
const ISTIO_VIPS: [&str; 2] = ["10.96.0.30", "fd00:96::30"];

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// A DENY (Istio's local-config shape) on every workload of namespace `default` for
/// connections from service account `sa`.
fn deny_from(sa: &str) -> String {
    format!(
        "- name: deny-{sa}\n  namespace: default\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules:\n  - - - principals:\n        - !Exact cluster.local/ns/default/sa/{sa}\n"
    )
}

/// One local config in Istio's shape, read by both proxies: both pods as HBONE workloads
/// with their trust domain (Istio's ztunnel needs it to build their SPIFFE ids), each
/// behind a service with a v4 and a v6 VIP, and `policies` as given.
fn local_config(ours: &Pod, theirs: &Pod, policies: &str) -> String {
    let workload = |pod: &Pod| {
        format!(
            "- uid: {uid}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip4}\", \"{ip6}\"]\n  protocol: HBONE\n  services:\n    default/{name}.default.svc.cluster.local:\n      {SVC_PORT}: {APP_PORT}\n",
            uid = pod.uid(),
            name = pod.name(),
            ip4 = pod.ip4(),
            ip6 = pod.ip6(),
        )
    };
    let service = |name: &str, vips: [&str; 2]| {
        format!(
            "- name: {name}\n  namespace: default\n  hostname: {name}.default.svc.cluster.local\n  vips: [\"/{}\", \"/{}\"]\n  ports:\n    {SVC_PORT}: {APP_PORT}\n",
            vips[0], vips[1]
        )
    };
    let policies = if policies.is_empty() { "policies: []\n".to_string() } else { format!("policies:\n{policies}") };
    format!(
        "workloads:\n{}{}services:\n{}{}{policies}",
        workload(ours),
        workload(theirs),
        service(ours.name(), OURS_VIPS),
        service(theirs.name(), ISTIO_VIPS)
    )
}

/// The two meshes side by side. Fields drop in order: Istio's ztunnel, the apps, our
/// agent, the cluster, then the CA files.
struct Interop {
    istio: IstioZtunnel,
    _apps: [PeerServer; 2],
    _echo: [EchoServer; 2],
    agent: MeshNode,
    /// On node 0, served by our agent (service account `ours`).
    ours: Pod,
    /// On node 1, served by Istio's ztunnel (service account `istio`).
    theirs: Pod,
    _cluster: Cluster,
    _ca: TempDir,
}

/// Builds both meshes, our agent applying `our_policies` and Istio's ztunnel
/// `istio_policies`; `None` (after one printed line) when Istio's ztunnel is not available.
fn interop(our_policies: &str, istio_policies: &str) -> Option<Interop> {
    let binary: PathBuf = peer_or_skip()?;
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let ours = c.add_pod(0, "ours").unwrap();
    let theirs = c.add_pod(1, "istio").unwrap();
    let ca = TempDir::new(&format!("{}-istio-fake-ca", c.prefix())).unwrap();
    write_fake_ca_plugin_dir(ca.path()).unwrap();
    let agent = MeshNode::start_with_plugin_ca(&c, 0, ca.path()).unwrap();
    write_mesh_config(&c, &local_config(&ours, &theirs, our_policies), &[&agent]).unwrap();
    agent.enroll_as(&ours, "default", ours.name()).unwrap();
    install_istio_cni_rules(&theirs).unwrap();
    let apps = [PeerServer::start(&ours, APP_PORT).unwrap(), PeerServer::start(&theirs, APP_PORT).unwrap()];
    let echo = |pod: &Pod| {
        let listener = pod.run(|| std::net::TcpListener::bind(("::", ECHO_PORT))).unwrap();
        EchoServer::spawn(listener).unwrap()
    };
    let echo = [echo(&ours), echo(&theirs)];
    let istio_config = local_config(&ours, &theirs, istio_policies);
    let dir = format!("{}-istio-ztunnel", c.prefix());
    let istio = IstioZtunnel::start(&binary, &theirs, "default", theirs.name(), &istio_config, &dir).unwrap();
    Some(Interop { istio, _apps: apps, _echo: echo, agent, ours, theirs, _cluster: c, _ca: ca })
}

fn app(pod: &Pod, v6: bool) -> SocketAddr {
    let ip: IpAddr = if v6 { pod.ip6().into() } else { pod.ip4().into() };
    SocketAddr::new(ip, APP_PORT)
}

fn outbound_to(dst: SocketAddr) -> impl Fn(&ConnectionRecord) -> bool {
    move |r| r.direction == Direction::Outbound && r.dst == dst
}

fn inbound_to(dst: SocketAddr) -> impl Fn(&ConnectionRecord) -> bool {
    move |r| r.direction == Direction::Inbound && r.dst == dst
}

/// An access-log entry of Istio's ztunnel for a finished connection in `direction`.
fn completed(entry: &Value, direction: &str) -> bool {
    entry["message"] == "connection complete" && entry["direction"] == direction
}

/// Our pod → Istio's pod at `dst` (its app at `app`): the reply comes back, our record shows
/// HBONE with Istio's workload certificate verified, and Istio's inbound log shows our
/// identity, a tunnel from our pod and the app address it connected to.
fn assert_ours_reaches_istio(m: &Interop, dst: SocketAddr, app: SocketAddr) {
    let (mut events, seen) = (m.agent.events(), m.istio.access_log().len());
    let reply = request(&m.ours, dst, "hello-istio").expect("our pod reaches Istio's pod");
    assert_eq!(reply.got, "hello-istio");
    let out = wait_record(&mut events, WAIT, outbound_to(dst)).expect("our outbound record");
    assert_eq!((out.protocol, out.error.as_deref()), ("HBONE", None), "{out:?}");
    assert_eq!(out.dst_identity.as_deref(), Some(id("istio").as_str()), "we verified Istio's certificate");
    let entry = m
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "inbound") && e["src.identity"] == id("ours"))
        .expect("Istio's ztunnel logged our client's verified identity");
    assert_eq!(entry["dst.identity"], id("istio"), "{entry}");
    assert_eq!(entry["dst.hbone_addr"], app.to_string(), "{entry}");
    let client_ip = if app.is_ipv6() { m.ours.ip6().to_string() } else { m.ours.ip4().to_string() };
    let src = entry["src.addr"].as_str().unwrap_or_default();
    assert!(src.starts_with(&client_ip) || src.starts_with(&format!("[{client_ip}]")), "not from our pod: {entry}");
    assert!(entry.get("error").is_none(), "{entry}");
}

/// Istio's pod → our pod at `dst` (captured by istio-cni's iptables into Istio's 15001):
/// the reply comes back, our inbound record shows Istio's client identity over mTLS from
/// Istio's pod, and Istio's outbound log shows our pod's identity.
fn assert_istio_reaches_ours(m: &Interop, dst: SocketAddr, app: SocketAddr) {
    let (mut events, seen) = (m.agent.events(), m.istio.access_log().len());
    let reply = request(&m.theirs, dst, "hello-ours").expect("Istio's pod reaches our pod");
    assert_eq!(reply.got, "hello-ours", "our app got the bytes");
    let inb = wait_record(&mut events, WAIT, inbound_to(app)).expect("our inbound record");
    assert_eq!((inb.protocol, inb.error.as_deref()), ("HBONE", None), "{inb:?}");
    assert_eq!(inb.src_identity.as_deref(), Some(id("istio").as_str()), "we verified Istio's client certificate");
    assert_eq!(inb.dst_identity.as_deref(), Some(id("ours").as_str()));
    let client_ip: IpAddr = if app.is_ipv6() { m.theirs.ip6().into() } else { m.theirs.ip4().into() };
    assert_eq!(inb.src.ip(), client_ip, "the tunnel came from Istio's pod");
    let entry = m
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "outbound") && e["dst.identity"] == id("ours"))
        .expect("Istio's ztunnel logged our pod's verified identity");
    assert_eq!(entry["src.identity"], id("istio"), "{entry}");
    assert_eq!(entry["dst.hbone_addr"], app.to_string(), "{entry}");
    assert!(entry.get("error").is_none(), "{entry}");
}

#[test]
fn our_pod_reaches_a_pod_served_by_istios_ztunnel_over_hbone() {
    let Some(m) = interop("", "") else { return };
    let dst = app(&m.theirs, false);
    assert_ours_reaches_istio(&m, dst, dst);
}

#[test]
fn a_pod_behind_istios_ztunnel_reaches_our_pod_over_hbone() {
    let Some(m) = interop("", "") else { return };
    let dst = app(&m.ours, false);
    assert_istio_reaches_ours(&m, dst, dst);
}

#[test]
fn our_pod_reaches_a_pod_served_by_istios_ztunnel_over_ipv6() {
    let Some(m) = interop("", "") else { return };
    let dst = app(&m.theirs, true);
    assert_ours_reaches_istio(&m, dst, dst);
}

#[test]
fn a_pod_behind_istios_ztunnel_reaches_our_pod_over_ipv6() {
    let Some(m) = interop("", "") else { return };
    let dst = app(&m.ours, true);
    assert_istio_reaches_ours(&m, dst, dst);
}

#[test]
fn our_pod_reaches_istios_pod_through_a_service_vip_on_both_families() {
    let Some(m) = interop("", "") else { return };
    for (vip, v6) in [(ISTIO_VIPS[0], false), (ISTIO_VIPS[1], true)] {
        let dst = SocketAddr::new(vip.parse().unwrap(), SVC_PORT);
        assert_ours_reaches_istio(&m, dst, app(&m.theirs, v6));
    }
}

#[test]
fn istios_pod_reaches_our_pod_through_a_service_vip_on_both_families() {
    let Some(m) = interop("", "") else { return };
    for (vip, v6) in [(OURS_VIPS[0], false), (OURS_VIPS[1], true)] {
        let dst = SocketAddr::new(vip.parse().unwrap(), SVC_PORT);
        assert_istio_reaches_ours(&m, dst, app(&m.ours, v6));
    }
}

#[test]
fn our_deny_policy_refuses_istios_client_and_istio_sees_401() {
    let Some(m) = interop(&deny_from("istio"), "") else { return };
    let dst = app(&m.ours, false);
    let (mut events, seen) = (m.agent.events(), m.istio.access_log().len());
    let refused = request(&m.theirs, dst, "denied");
    assert!(refused.is_err(), "a denied client got an answer: {refused:?}");
    let inb = wait_record(&mut events, WAIT, inbound_to(dst)).expect("our inbound record");
    assert_eq!(inb.src_identity.as_deref(), Some(id("istio").as_str()), "{inb:?}");
    let denial = inb.error.clone().unwrap_or_default();
    assert!(denial.contains("deny-istio"), "our agent did not record the denial: {inb:?}");
    let entry = m
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "outbound") && e["dst.identity"] == id("ours"))
        .expect("Istio's ztunnel logged the refused connection");
    let error = entry["error"].as_str().unwrap_or_default();
    assert!(error.contains("401"), "Istio's ztunnel did not see a 401: {entry}");
}

#[test]
fn istios_deny_policy_refuses_our_client_and_we_see_401() {
    let Some(m) = interop("", &deny_from("ours")) else { return };
    let dst = app(&m.theirs, false);
    let (mut events, seen) = (m.agent.events(), m.istio.access_log().len());
    let refused = request(&m.ours, dst, "denied");
    assert!(refused.is_err(), "a denied client got an answer: {refused:?}");
    let out = wait_record(&mut events, WAIT, outbound_to(dst)).expect("our outbound record");
    let error = out.error.clone().unwrap_or_default();
    assert!(error.contains("401"), "we did not see a 401 from Istio's ztunnel: {out:?}");
    let entry = m
        .istio
        .wait_access_log(seen, WAIT, |e| completed(e, "inbound") && e["src.identity"] == id("ours"))
        .expect("Istio's ztunnel logged the denial with our identity");
    let denial = entry["error"].as_str().unwrap_or_default();
    assert!(denial.contains("policy rejection") && denial.contains("deny-ours"), "{entry}");
}

/// Istio's metric families for one direction of traffic, as (family, our sample, Istio's).
fn metric_pairs(ours: &str, istio: &str, our_reporter: &str, src: &str, dst: &str) -> Vec<(String, u64, u64)> {
    let istio_reporter = if our_reporter == "source" { "destination" } else { "source" };
    let (src, dst) = (id(src), id(dst));
    [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ]
    .into_iter()
    .map(|family| {
        let labels = |reporter| {
            [("reporter", reporter), ("source_principal", src.as_str()), ("destination_principal", dst.as_str())]
        };
        (
            family.to_string(),
            metric_sum(ours, family, &labels(our_reporter)),
            metric_sum(istio, family, &labels(istio_reporter)),
        )
    })
    .collect()
}

#[test]
fn our_and_istios_connection_and_byte_metrics_agree_for_the_same_traffic() {
    let Some(m) = interop("", "") else { return };
    const N: usize = 3;
    for i in 0..N {
        request(&m.ours, app(&m.theirs, false), &format!("to-istio-{i}")).unwrap();
        request(&m.theirs, app(&m.ours, false), &format!("to-ours-{i}-longer")).unwrap();
    }
    // Both sides record closes and byte totals when the connection ends: poll until they settle.
    let deadline = Instant::now() + WAIT;
    loop {
        let ours = m.agent.agent().metrics().encode();
        let istio = m.istio.metrics().unwrap();
        let pairs: Vec<_> = [("source", "ours", "istio"), ("destination", "istio", "ours")]
            .into_iter()
            .flat_map(|(reporter, src, dst)| {
                metric_pairs(&ours, &istio, reporter, src, dst).into_iter().map(move |p| (reporter, p))
            })
            .collect();
        let settled = pairs.iter().all(|(_, (family, a, b))| {
            a == b && *a > 0 && (!family.starts_with("istio_tcp_connections") || *a == N as u64)
        });
        if settled {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "metrics disagree (our reporter, family, ours, Istio's): {pairs:?}\nours:\n{ours}\nIstio's:\n{istio}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// From inside `pod`, streams `size` patterned bytes to the echo server at `dst` while
/// reading the echo back, then half-closes and reads to the server's EOF: the number of
/// bytes that came back intact and in order.
fn echo_bulk(pod: &Pod, dst: SocketAddr, size: usize) -> std::io::Result<usize> {
    use std::io::{Read, Write};
    pod.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&dst, WAIT)?;
        s.set_read_timeout(Some(WAIT))?;
        let mut w = s.try_clone()?;
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(b"E")?;
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len());
                w.write_all(&chunk[..n])?;
                left -= n;
            }
            w.shutdown(std::net::Shutdown::Write)
        });
        let (mut got, mut buf) = (0usize, vec![0u8; 64 * 1024]);
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != ((got + i) % (64 * 1024) % 251) as u8 {
                    return Err(std::io::Error::other(format!("byte {} corrupted", got + i)));
                }
            }
            got += n;
        }
        writer.join().expect("writer thread")?;
        Ok(got)
    })
}

#[test]
fn bulk_data_and_half_close_cross_intact_both_ways() {
    let Some(m) = interop("", "") else { return };
    // Larger than either side's HTTP/2 stream window (4 MiB) and connection window (16 MiB).
    const SIZE: usize = 24 << 20;
    let to_istio = echo_bulk(&m.ours, SocketAddr::new(m.theirs.ip4().into(), ECHO_PORT), SIZE);
    assert_eq!(to_istio.expect("our pod -> Istio's pod"), SIZE);
    let to_ours = echo_bulk(&m.theirs, SocketAddr::new(m.ours.ip4().into(), ECHO_PORT), SIZE);
    assert_eq!(to_ours.expect("Istio's pod -> our pod"), SIZE);
}
