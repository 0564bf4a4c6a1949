//! Istio `Gateway` resources (`networking.istio.io` v1, v1beta1, v1alpha3) for the ingress
//! gateway, and the `kubernetes.io/tls` Secrets their servers name, read from Kubernetes
//! YAML. Pure: which ports to listen on, which server a connection (port, SNI) belongs to,
//! and what certificate it presents are decided here; the listening is `crate::gateway`'s.
//! Each object is taken or rejected with its name and reason, as the other routing objects.
use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use serde::Deserialize;

use super::compile::Invalid;
use super::matching::host_matches;
use super::objects::API_VERSIONS;

/// `spec` of a Gateway as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewaySpec {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    servers: Vec<ServerSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerSpec {
    port: Option<PortSpec>,
    #[serde(default)]
    hosts: Vec<String>,
    tls: Option<TlsSpec>,
    name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortSpec {
    number: u32,
    #[serde(default)]
    protocol: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TlsSpec {
    #[serde(default)]
    mode: String,
    credential_name: Option<String>,
    server_certificate: Option<String>,
    private_key: Option<String>,
    #[serde(default)]
    https_redirect: bool,
}

/// What a server speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 in clear (`HTTP`, `HTTP2`, `GRPC`).
    Http,
    /// HTTP in TLS terminated here (`HTTPS`).
    Https,
    /// TLS: terminated (`SIMPLE`) then HTTP, or passed through by SNI (`PASSTHROUGH`).
    Tls,
}

/// How a server handles TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Terminated with this certificate.
    Simple(Credential),
    /// Forwarded untouched, routed by SNI (`tls` rules of the VirtualServices).
    Passthrough,
}

/// Where a server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A `kubernetes.io/tls` Secret, `namespace/name`.
    Secret(String),
    /// PEM files (`serverCertificate`, `privateKey`).
    Files { cert: PathBuf, key: PathBuf },
}

/// One server of a Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub port: u16,
    pub protocol: Protocol,
    /// Hostnames it serves (`*`, `*.example.com`, a name; a `namespace/` prefix dropped).
    pub hosts: Vec<String>,
    pub tls: Option<TlsMode>,
    /// `tls.httpsRedirect`: answer HTTP with a 301 to https.
    pub https_redirect: bool,
}

impl Server {
    /// Whether `host` (an SNI or Host name, no port) is one of its hosts.
    pub fn serves(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| host_matches(h, host))
    }
}

/// A Gateway: where it applies (`selector`) and its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressGateway {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
}

impl IngressGateway {
    /// Whether a gateway proxy with `labels` implements it (every selector label matches).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A certificate and key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSecret(..)") // never the key
    }
}

/// What a set of documents holds for ingress.
#[derive(Debug, Clone, Default)]
pub struct IngressObjects {
    /// `namespace/name` → Gateway.
    pub gateways: BTreeMap<String, IngressGateway>,
    /// `namespace/name` → TLS Secret.
    pub secrets: BTreeMap<String, TlsSecret>,
    pub rejected: Vec<Invalid>,
}

impl IngressObjects {
    /// The Gateways a proxy with `labels` implements.
    pub fn selected<'a>(&'a self, labels: &'a BTreeMap<String, String>) -> impl Iterator<Item = &'a IngressGateway> {
        self.gateways.values().filter(move |g| g.selects(labels))
    }
}

/// Reads every Istio Gateway and every TLS Secret in `docs`.
pub fn load(docs: &[serde_yaml_ng::Value]) -> IngressObjects {
    let mut out = IngressObjects::default();
    for d in docs {
        let ns = d["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let name = d["metadata"]["name"].as_str().unwrap_or("?").to_string();
        let key = format!("{ns}/{name}");
        let api = d["apiVersion"].as_str().unwrap_or_default();
        let result = match d["kind"].as_str() {
            Some("Gateway") if API_VERSIONS.contains(&api) => gateway(d, &ns, &name).map(|g| {
                out.gateways.insert(key.clone(), g);
            }),
            Some("Secret") if api == "v1" => match secret(d) {
                Ok(Some(s)) => {
                    out.secrets.insert(key.clone(), s);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        if let Err(reason) = result {
            out.rejected.push(Invalid { name: key, reason });
        }
    }
    out
}

fn gateway(d: &serde_yaml_ng::Value, ns: &str, name: &str) -> Result<IngressGateway, String> {
    let spec: GatewaySpec = serde_yaml_ng::from_value(d["spec"].clone()).map_err(|e| format!("spec: {e}"))?;
    if spec.servers.is_empty() {
        return Err("servers is empty".into());
    }
    let servers = spec
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            server(s, ns).map_err(|e| {
                format!("servers[{i}]{}: {e}", s.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(IngressGateway { namespace: ns.into(), name: name.into(), selector: spec.selector, servers })
}

fn server(s: &ServerSpec, ns: &str) -> Result<Server, String> {
    let p = s.port.as_ref().ok_or("port is required")?;
    let port = u16::try_from(p.number).ok().filter(|n| *n > 0).ok_or(format!("port {} is out of range", p.number))?;
    let protocol = match p.protocol.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTP2" | "GRPC" => Protocol::Http,
        "HTTPS" => Protocol::Https,
        "TLS" => Protocol::Tls,
        other => return Err(format!("protocol {other:?} is not served (HTTP, HTTP2, GRPC, HTTPS, TLS)")),
    };
    if s.hosts.is_empty() {
        return Err("hosts is empty".into());
    }
    let hosts = s.hosts.iter().map(|h| h.split_once('/').map_or(h.as_str(), |(_, host)| host).to_string()).collect();
    let tls = match (&s.tls, protocol) {
        (None, Protocol::Http) => None,
        (None, _) => return Err(format!("protocol {} needs tls", p.protocol)),
        (Some(t), _) if t.https_redirect && t.mode.is_empty() => None,
        (Some(t), _) => Some(match t.mode.to_ascii_uppercase().as_str() {
            "SIMPLE" => Simple(credential(t, ns)?),
            "PASSTHROUGH" if protocol == Protocol::Tls => TlsMode::Passthrough,
            "PASSTHROUGH" => return Err("PASSTHROUGH needs protocol TLS".into()),
            other => return Err(format!("tls mode {other:?} is not supported (SIMPLE, PASSTHROUGH)")),
        }),
    };
    if protocol != Protocol::Http && tls.is_none() {
        return Err(format!("protocol {} needs a tls mode", p.protocol));
    }
    let https_redirect = s.tls.as_ref().is_some_and(|t| t.https_redirect);
    Ok(Server { port, protocol, hosts, tls, https_redirect })
}

use TlsMode::Simple;

fn credential(t: &TlsSpec, ns: &str) -> Result<Credential, String> {
    match (&t.credential_name, &t.server_certificate, &t.private_key) {
        (Some(c), _, _) if !c.is_empty() => {
            Ok(Credential::Secret(if c.contains('/') { c.clone() } else { format!("{ns}/{c}") }))
        }
        (_, Some(cert), Some(key)) => Ok(Credential::Files { cert: cert.into(), key: key.into() }),
        _ => Err("SIMPLE needs credentialName, or serverCertificate and privateKey".into()),
    }
}

/// A `kubernetes.io/tls` Secret (or any Secret with `tls.crt` and `tls.key`); `None` for
/// other Secrets.
fn secret(d: &serde_yaml_ng::Value) -> Result<Option<TlsSecret>, String> {
    let field = |k: &str| -> Result<Option<Vec<u8>>, String> {
        if let Some(v) = d["stringData"][k].as_str() {
            return Ok(Some(v.as_bytes().to_vec()));
        }
        match d["data"][k].as_str() {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64.split_whitespace().collect::<String>())
                .map(Some)
                .map_err(|e| format!("data.{k}: not base64: {e}")),
            None => Ok(None),
        }
    };
    let tls_type = d["type"].as_str() == Some("kubernetes.io/tls");
    match (field("tls.crt")?, field("tls.key")?) {
        (Some(cert_pem), Some(key_pem)) => Ok(Some(TlsSecret { cert_pem, key_pem })),
        _ if tls_type => Err("a kubernetes.io/tls Secret needs tls.crt and tls.key".into()),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<serde_yaml_ng::Value> {
        serde_yaml_ng::Deserializer::from_str(yaml).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
    }

    const BOOKINFO: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ['*']
";

    #[test]
    fn bookinfo_gateway_is_one_http_server_on_8080_for_every_host() {
        let o = load(&docs(BOOKINFO));
        assert!(o.rejected.is_empty(), "{:?}", o.rejected);
        let g = &o.gateways["default/bookinfo-gateway"];
        assert_eq!(
            g.servers,
            vec![Server {
                port: 8080,
                protocol: Protocol::Http,
                hosts: vec!["*".into()],
                tls: None,
                https_redirect: false
            }]
        );
        let labels = BTreeMap::from([("istio".to_string(), "ingressgateway".to_string())]);
        assert_eq!(o.selected(&labels).count(), 1);
        assert_eq!(o.selected(&BTreeMap::new()).count(), 0);
    }

    #[test]
    fn https_simple_takes_a_secret_in_the_gateways_namespace() {
        let yaml = "apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: gw, namespace: web}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [web/shop.example.com]
    tls: {mode: SIMPLE, credentialName: shop-cert}
---
apiVersion: v1
kind: Secret
metadata: {name: shop-cert, namespace: web}
type: kubernetes.io/tls
data:
  tls.crt: Y2VydA==
  tls.key: a2V5
";
        let o = load(&docs(yaml));
        assert!(o.rejected.is_empty(), "{:?}", o.rejected);
        let s = &o.gateways["web/gw"].servers[0];
        assert_eq!(s.tls, Some(TlsMode::Simple(Credential::Secret("web/shop-cert".into()))));
        assert!(s.serves("shop.example.com") && !s.serves("other.example.com"));
        assert_eq!(o.secrets["web/shop-cert"], TlsSecret { cert_pem: b"cert".to_vec(), key_pem: b"key".to_vec() });
    }

    #[test]
    fn invalid_servers_reject_their_gateway_with_the_reason() {
        for (spec, reason) in [
            ("- port: {number: 0, protocol: HTTP}\n    hosts: ['*']", "out of range"),
            ("- port: {number: 443, protocol: HTTPS}\n    hosts: ['*']", "needs tls"),
            (
                "- port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: MUTUAL, credentialName: x}",
                "not supported",
            ),
            ("- port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: SIMPLE}", "credentialName"),
            ("- port: {number: 80, protocol: MONGO}\n    hosts: ['*']", "not served"),
            ("- port: {number: 80, protocol: HTTP}\n    hosts: []", "hosts is empty"),
        ] {
            let yaml = format!("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec:\n  servers:\n  {spec}\n");
            let o = load(&docs(&yaml));
            assert_eq!(o.rejected.len(), 1, "{spec}");
            assert!(o.rejected[0].reason.contains(reason), "{spec}: {}", o.rejected[0].reason);
            assert_eq!(o.rejected[0].name, "default/g");
        }
    }

    #[test]
    fn a_tls_secret_without_its_key_is_rejected() {
        let yaml =
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: Y2VydA==\n";
        let o = load(&docs(yaml));
        assert!(o.rejected[0].reason.contains("tls.key"), "{:?}", o.rejected);
    }
}
