//! Certificate checks end to end against a pod's real HBONE listener: every bad client
//! certificate is refused and counted by reason; a client refuses a server whose SAN is
//! not the expected identity.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{ca_dir, sweep_pins, wait_record, workload_yaml, write_mesh_config, MeshNode};
use mesh_tests::{Cluster, InNetns};
use rustls::client::ResolvesClientCert;
use ztunnel::identity::{CaConfig, Identity, InProcessCa, TrustBundle, WorkloadCertificate};
use ztunnel::redirect::Exclusions;

const WAIT: Duration = Duration::from_secs(5);

/// Sends no client certificate at all.
#[derive(Debug)]
struct NoClientCert;

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

/// A leaf for `uri` signed by the cluster's own CA key (bypassing the CA's trust-domain check).
fn leaf_signed_by_cluster_ca(dir: &std::path::Path, uri: &str, roots: &TrustBundle) -> WorkloadCertificate {
    let ca_pem = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(uri).unwrap())];
    let cert = params.signed_by(&key, &issuer).unwrap();
    WorkloadCertificate::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), roots.to_pem().as_bytes())
        .unwrap()
}

/// Handshakes with the pod's 15008 and waits for the server's verdict: `Ok` when the
/// server keeps the connection open (waiting for HTTP/2), `Err` with what ended it.
fn try_hbone(addr: SocketAddr, cfg: rustls::ClientConfig) -> Result<(), String> {
    let tcp = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), ztunnel::tls::server_name(addr.ip()))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.flush().map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(()), // the server's SETTINGS: accepted
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn bad_client_certificates_are_refused_and_counted_and_bad_server_sans_rejected() {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let n0 = MeshNode::start(&c, 0, Exclusions::default()).unwrap();
    let n1 = MeshNode::start(&c, 1, Exclusions::default()).unwrap();
    n0.enroll(&client).unwrap();
    n1.enroll(&server).unwrap();

    let mut cfg = CaConfig::new("cluster.local");
    cfg.state_dir = Some(ca_dir(&c));
    let cluster_ca = InProcessCa::new(cfg).unwrap();
    let trust = cluster_ca.trust_bundle().clone();
    let me: Identity = "spiffe://cluster.local/ns/default/sa/client".parse().unwrap();
    let server_id: Identity = "spiffe://cluster.local/ns/default/sa/server".parse().unwrap();
    let config_for =
        |cert: &WorkloadCertificate| ztunnel::tls::client_config(cert, &trust, vec![server_id.clone()]).unwrap();

    let good = cluster_ca.issue(&me).unwrap();
    let past = SystemTime::now() - Duration::from_secs(7200);
    let expired = cluster_ca.issue_with_validity(&me, past, past + Duration::from_secs(3600)).unwrap();
    let stranger = InProcessCa::new(CaConfig::new("cluster.local")).unwrap().issue(&me).unwrap();
    let other_td = leaf_signed_by_cluster_ca(&ca_dir(&c), "spiffe://evil.local/ns/default/sa/client", &trust);
    let mut anonymous = config_for(&good);
    anonymous.client_auth_cert_resolver = Arc::new(NoClientCert);

    let addr = SocketAddr::new(server.ip4().into(), 15008);
    let cases = vec![
        ("valid", config_for(&good), None),
        ("expired", config_for(&expired), Some("expired")),
        ("untrusted root", config_for(&stranger), Some("untrusted_issuer")),
        ("wrong trust domain", config_for(&other_td), Some("wrong_trust_domain")),
        ("no client certificate", anonymous, Some("missing_client_cert")),
    ];
    for (name, cfg, reason) in cases {
        let outcome = c.node(1).run(move || try_hbone(addr, cfg));
        match reason {
            None => assert_eq!(outcome, Ok(()), "{name}"),
            Some(r) => {
                assert!(outcome.is_err(), "{name}: server accepted it");
                std::thread::sleep(Duration::from_millis(100));
                let m = n1.agent().metrics().encode();
                let line = format!("ztunnel_tls_handshake_failures_total{{reason=\"{r}\"}} 1");
                assert!(m.contains(&line), "{name}: missing `{line}` in\n{m}");
            }
        }
    }

    // The client side: the config says the server runs as `impostor`; the pod presents
    // `server`, so the source proxy refuses the handshake.
    // The same endpoint behind a service whose subjectAltNames list the pod's real identity.
    let svc = "  services:\n    default/web.default.svc.cluster.local:\n      80: 8080\n";
    let yaml = format!(
        "workloads:\n{}{}services:\n- name: web\n  namespace: default\n  hostname: web.default.svc.cluster.local\n  vips: [\"10.96.0.20\"]\n  ports:\n    80: 8080\n  subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/server\"]\n",
        workload_yaml(&client, "default", "client", ""),
        workload_yaml(&server, "default", "impostor", svc)
    );
    write_mesh_config(&c, &yaml, &[&n0, &n1]).unwrap();
    let _app = PeerServer::start(&server, 8080).unwrap();
    let mut ev0 = n0.events();
    let dst = SocketAddr::new(server.ip4().into(), 8080);
    assert!(request(&client, dst, "should not arrive").is_err());
    let rec = wait_record(&mut ev0, WAIT, |r| r.dst == dst).expect("outbound record");
    assert!(rec.error.as_deref().unwrap_or("").contains("san_mismatch"), "{rec:?}");
    let m = n0.agent().metrics().encode();
    assert!(m.contains("ztunnel_tls_handshake_failures_total{reason=\"san_mismatch\"} 1"), "{m}");
    // Through the service the pod's identity is one the service vouches for: accepted.
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let r = request(&client, vip, "via the service").expect("service SAN accepted");
    assert_eq!(r.got, "via the service");
    let rec = wait_record(&mut ev0, WAIT, |r| r.dst == vip).expect("vip record");
    assert_eq!((rec.protocol, rec.error), ("HBONE", None));
}
