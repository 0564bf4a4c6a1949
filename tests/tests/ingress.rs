//! `ztunnel gateway`, the ingress gateway, in the mini-cluster: a client in a network
//! namespace outside the mesh (the "outside world": a pod nobody enrolled) calls the
//! gateway's pod; the gateway serves the Istio Gateway its labels select and sends each
//! request by the bound VirtualService into the mesh in HBONE, to pods enrolled on two
//! nodes. HTTP, HTTPS (`SIMPLE`, checked with curl against the served certificate), TLS
//! passed through by SNI, and an unknown host (404).
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_tests::bookinfo::{get, App, Role};
use mesh_tests::mesh::{sweep_pins, write_mesh_config, MeshNode, RUN_DIR};
use mesh_tests::waypoint::{app_workload, service, write_atomically, WaypointProcess};
use mesh_tests::{Cluster, InNetns, Pod};
use ztunnel::redirect::Exclusions;

const PRODUCTPAGE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const SECURE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
const WAIT: Duration = Duration::from_secs(10);

/// The scenario: two nodes, the gateway's pod, productpage (node 1), a TLS server `secure`
/// (node 0) and the outside client; all torn down on drop.
struct Edge {
    gateway: WaypointProcess,
    _apps: Vec<App>,
    outside: Pod,
    gateway_pod: Pod,
    secure: Pod,
    dir: PathBuf,
    _nodes: Vec<MeshNode>,
    _c: Cluster,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn edge(routes: &[(&str, String)]) -> Edge {
    edge_with(routes, |_| vec![])
}

/// [`edge`], with more gateway arguments, chosen once the gateway's pod exists.
fn edge_with(routes: &[(&str, String)], gateway_args: impl FnOnce(&Pod) -> Vec<String>) -> Edge {
    sweep_pins();
    let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
    let outside = c.add_pod(0, "outside").unwrap();
    let gw = c.add_pod(0, "ingress").unwrap();
    let page = c.add_pod(1, "productpage").unwrap();
    let secure = c.add_pod(0, "secure").unwrap();
    let nodes = vec![
        MeshNode::start(&c, 0, Exclusions::default()).unwrap(),
        MeshNode::start(&c, 1, Exclusions::default()).unwrap(),
    ];
    let mut yaml = String::from("workloads:\n");
    yaml += &app_workload(&page, "productpage", 9080, "productpage", "v1");
    yaml += &app_workload(&secure, "secure", 8443, "secure", "v1");
    yaml += "services:\n";
    yaml += &service("productpage", PRODUCTPAGE_VIP, 9080, None);
    yaml += &service("secure", SECURE_VIP, 8443, None);
    write_mesh_config(&c, &yaml, &[&nodes[0], &nodes[1]]).unwrap();
    nodes[1].enroll_as(&page, "default", "productpage").unwrap();
    nodes[0].enroll_as(&secure, "default", "secure").unwrap();
    let apps = vec![App::start(&page, 9080, Role::Echo { name: "productpage".into() }).unwrap()];
    let dir = PathBuf::from(RUN_DIR).join(format!("{}-ingress", c.prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in routes {
        write_atomically(&dir.join(file), text).unwrap();
    }
    let gateway = WaypointProcess::start_gateway(&c, &gw, &dir, &gateway_args(&gw)).expect("ztunnel gateway");
    Edge { gateway, _apps: apps, outside, gateway_pod: gw, secure, dir, _nodes: nodes, _c: c }
}

fn ours() -> (&'static str, String) {
    let yaml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ingress/bookinfo-gateway.yaml");
    ("bookinfo-gateway.yaml", std::fs::read_to_string(yaml).unwrap())
}

fn at(e: &Edge, port: u16) -> SocketAddr {
    SocketAddr::new(e.gateway_pod.ip4().into(), port)
}

/// Waits until the gateway listens on `port` (it follows its Gateways).
fn wait_listening(e: &Edge, port: u16) {
    let addr = at(e, port);
    let deadline = std::time::Instant::now() + WAIT;
    while e.outside.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))).is_err() {
        assert!(std::time::Instant::now() < deadline, "the gateway never listened on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_request_from_outside_the_mesh_reaches_productpage_through_the_gateway() {
    let e = edge(&[ours()]);
    wait_listening(&e, 8080);
    let (status, body, _) = get(&e.outside, at(&e, 8080), "/productpage", "bookinfo.example.com", &[], WAIT).unwrap();
    assert_eq!((status, body.trim()), (200, "productpage"));
    let seen = &e._apps[0].received()[0];
    assert_eq!(seen.header("host"), Some("bookinfo.example.com"), "the client's Host is kept");
    // Into the mesh in HBONE, as the gateway's identity: the destination reports it.
    let m = e.gateway.wait_metric(
        "istio_requests_total",
        &[("reporter", "source"), ("destination_service_name", "productpage"), ("response_code", "200")],
        1.0,
    );
    assert!(m.is_ok(), "{m:?}");
    let text = e.gateway.metrics().unwrap();
    assert!(text.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/istio-ingressgateway\""), "{text}");
}

#[test]
fn a_path_no_route_names_gets_404_from_the_gateway() {
    let e = edge(&[ours()]);
    wait_listening(&e, 8080);
    let (status, _, _) = get(&e.outside, at(&e, 8080), "/admin", "bookinfo.example.com", &[], WAIT).unwrap();
    assert_eq!(status, 404);
    assert!(e._apps[0].received().is_empty(), "nothing reached productpage");
}

#[test]
fn an_unknown_host_gets_404() {
    let vs = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ['*']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop}
spec:
  hosts: [shop.example.com]
  gateways: [shop]
  http:
  - route:
    - destination: {host: productpage, port: {number: 9080}}
";
    let e = edge(&[("shop.yaml", vs.into())]);
    wait_listening(&e, 8080);
    let (ok, _, _) = get(&e.outside, at(&e, 8080), "/", "shop.example.com", &[], WAIT).unwrap();
    assert_eq!(ok, 200);
    let (status, _, _) = get(&e.outside, at(&e, 8080), "/", "other.example.com", &[], WAIT).unwrap();
    assert_eq!(status, 404);
    assert_eq!(e._apps[0].received().len(), 1, "only the known host reached productpage");
}

/// A CA and a leaf for `host`, PEM: (ca, cert, key).
fn certificate(host: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("test ingress CA for {host}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// curl from the outside pod, resolving `host` to the gateway: (exit ok, body, stderr).
fn curl(e: &Edge, host: &str, port: u16, ca: &Path, path: &str) -> (bool, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:{}", e.gateway_pod.ip4()))
        .arg(format!("https://{host}:{port}{path}"));
    let out = e.outside.run(move || cmd.output()).expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn https_simple_serves_the_secrets_certificate_to_curl() {
    let (ca, cert, key) = certificate("bookinfo.example.com");
    let routes = format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bookinfo-https}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 8443, name: https, protocol: HTTPS}}
    hosts: [bookinfo.example.com]
    tls: {{mode: SIMPLE, credentialName: bookinfo-cert}}
---
apiVersion: v1
kind: Secret
metadata: {{name: bookinfo-cert}}
type: kubernetes.io/tls
data:
  tls.crt: {}
  tls.key: {}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bookinfo}}
spec:
  hosts: [bookinfo.example.com]
  gateways: [bookinfo-https]
  http:
  - route:
    - destination: {{host: productpage, port: {{number: 9080}}}}
",
        b64(&cert),
        b64(&key)
    );
    let e = edge(&[("https.yaml", routes)]);
    let ca_file = e.dir.join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    wait_listening(&e, 8443);
    let (ok, body, err) = curl(&e, "bookinfo.example.com", 8443, &ca_file, "/productpage");
    assert!(ok, "curl failed: {err}");
    assert_eq!(body.trim(), "productpage");
    // A client that does not trust that CA refuses the gateway's certificate.
    let other = e.dir.join("other-ca.pem");
    std::fs::write(&other, certificate("x").0).unwrap();
    let (ok, _, err) = curl(&e, "bookinfo.example.com", 8443, &other, "/productpage");
    assert!(!ok, "curl accepted a certificate from another CA");
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn tls_passthrough_is_routed_by_sni_to_the_backend_that_terminates_it() {
    // The backend terminates TLS itself (openssl s_server): the gateway only reads the SNI.
    let (ca, cert, key) = certificate("secure.example.com");
    let routes = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 9443, name: tls, protocol: TLS}
    hosts: [secure.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure}
spec:
  hosts: [secure.example.com]
  gateways: [secure]
  tls:
  - match:
    - port: 9443
      sniHosts: [secure.example.com]
    route:
    - destination: {host: secure, port: {number: 8443}}
";
    let e = edge(&[("passthrough.yaml", routes.into())]);
    for (name, pem) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
        std::fs::write(e.dir.join(name), pem).unwrap();
    }
    let mut server = Command::new("openssl");
    server
        .args(["s_server", "-quiet", "-accept", "8443", "-www", "-cert"])
        .arg(e.dir.join("cert.pem"))
        .arg("-key")
        .arg(e.dir.join("key.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = e.secure.spawn(server).expect("openssl s_server");
    std::thread::sleep(Duration::from_millis(500));
    wait_listening(&e, 9443);
    let (ok, body, err) = curl(&e, "secure.example.com", 9443, &e.dir.join("ca.pem"), "/");
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "curl failed: {err}");
    assert!(body.contains("s_server"), "the backend's own page: {body}");
}

#[test]
fn istios_bookinfo_gateway_sample_works_unchanged() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/istio-samples/bookinfo/networking/bookinfo-gateway.yaml");
    let Ok(text) = std::fs::read_to_string(&fixture) else {
        return println!("not run: {} is absent (Istio's samples are only beside CI)", fixture.display());
    };
    let e = edge(&[("bookinfo-gateway.yaml", text)]);
    wait_listening(&e, 8080);
    let (status, body, _) = get(&e.outside, at(&e, 8080), "/productpage", "", &[], WAIT).unwrap();
    assert_eq!((status, body.trim()), (200, "productpage"));
}

#[test]
fn the_gateway_exports_a_span_per_request_parented_on_the_callers_traceparent() {
    let receiver = std::cell::RefCell::new(None);
    let e = edge_with(&[ours()], |gw| {
        let r = mesh_tests::otlp::OtlpReceiver::start(gw, 4318).expect("OTLP receiver");
        let args = r.proxy_args();
        *receiver.borrow_mut() = Some(r);
        args
    });
    let receiver = receiver.into_inner().unwrap();
    wait_listening(&e, 8080);
    let parent = "00-8bf92f3577b34da6a3ce929d0e0e4736-40f067aa0ba902b7-01";
    let (status, _, _) =
        get(&e.outside, at(&e, 8080), "/productpage", "bookinfo.example.com", &[("traceparent", parent)], WAIT)
            .unwrap();
    assert_eq!(status, 200);
    let span = receiver.wait_for("from the gateway", |s| s.trace_id.starts_with("8bf9"), WAIT).unwrap();
    assert_eq!(span.parent_span_id, "40f067aa0ba902b7");
    assert_eq!(span.service, "istio-ingressgateway.default");
    let seen = e._apps[0].received()[0].header("traceparent").unwrap().to_string();
    assert!(seen.contains(&span.span_id), "productpage's parent is the gateway's span: {seen}");
}

/// A Kubernetes Gateway of Istio's ingress class with one listener, and an HTTPRoute on it
/// sending `/productpage` to productpage.
fn kubernetes_gateway(listener: &str) -> (&'static str, String) {
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: bookinfo-k8s}}
spec:
  gatewayClassName: istio
  listeners:
  - {listener}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bookinfo}}
spec:
  parentRefs: [{{name: bookinfo-k8s}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /productpage}}}}]
    backendRefs: [{{name: productpage, port: 9080}}]
"
    );
    ("k8s-gateway.yaml", yaml)
}

const HTTP_LISTENER: &str = "{name: http, port: 8081, protocol: HTTP, hostname: bookinfo.example.com}";

#[test]
fn an_httproute_on_a_kubernetes_gateway_listener_reaches_productpage_from_outside() {
    let e = edge(&[kubernetes_gateway(HTTP_LISTENER)]);
    wait_listening(&e, 8081);
    let (status, body, _) = get(&e.outside, at(&e, 8081), "/productpage", "bookinfo.example.com", &[], WAIT).unwrap();
    assert_eq!((status, body.trim()), (200, "productpage"));
    let seen = &e._apps[0].received()[0];
    assert_eq!((seen.path.as_str(), seen.header("host")), ("/productpage", Some("bookinfo.example.com")));
    let m = e.gateway.wait_metric(
        "istio_requests_total",
        &[("reporter", "source"), ("destination_service_name", "productpage"), ("response_code", "200")],
        1.0,
    );
    assert!(m.is_ok(), "{m:?}");
}

#[test]
fn a_host_the_kubernetes_gateway_listener_does_not_accept_gets_404() {
    let e = edge(&[kubernetes_gateway(HTTP_LISTENER)]);
    wait_listening(&e, 8081);
    let (status, _, _) = get(&e.outside, at(&e, 8081), "/productpage", "other.example.com", &[], WAIT).unwrap();
    assert_eq!(status, 404);
    let (status, _, _) = get(&e.outside, at(&e, 8081), "/admin", "bookinfo.example.com", &[], WAIT).unwrap();
    assert_eq!(status, 404, "a path no rule matches");
    assert!(e._apps[0].received().is_empty(), "nothing reached productpage");
}

#[test]
fn istio_and_kubernetes_gateways_are_served_side_by_side() {
    let e = edge(&[ours(), kubernetes_gateway(HTTP_LISTENER)]);
    wait_listening(&e, 8080);
    wait_listening(&e, 8081);
    for port in [8080, 8081] {
        let (status, body, _) =
            get(&e.outside, at(&e, port), "/productpage", "bookinfo.example.com", &[], WAIT).unwrap();
        assert_eq!((status, body.trim()), (200, "productpage"), "port {port}");
    }
}

#[test]
fn an_https_kubernetes_gateway_listener_terminates_with_its_certificate_ref() {
    let (ca, cert, key) = certificate("bookinfo.example.com");
    let (file, mut yaml) = kubernetes_gateway(
        "{name: https, port: 8444, protocol: HTTPS, hostname: bookinfo.example.com, tls: {mode: Terminate, certificateRefs: [{kind: Secret, name: bookinfo-cert}]}}",
    );
    yaml += &format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bookinfo-cert}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64(&cert),
        b64(&key)
    );
    let e = edge(&[(file, yaml)]);
    let ca_file = e.dir.join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    wait_listening(&e, 8444);
    let (ok, body, err) = curl(&e, "bookinfo.example.com", 8444, &ca_file, "/productpage");
    assert!(ok, "curl failed: {err}");
    assert_eq!(body.trim(), "productpage");
}
