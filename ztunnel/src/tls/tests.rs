//! Real TLS handshakes on 127.0.0.1 exercising every acceptance and rejection rule.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::verify::ExpectedIdentityServerVerifier;
use super::*;
use crate::identity::{CaConfig, Identity, InProcessCa, TrustBundle, WorkloadCertificate};

fn ca(td: &str) -> InProcessCa {
    InProcessCa::new(CaConfig::new(td)).unwrap()
}

fn id(td: &str, sa: &str) -> Identity {
    Identity::new(td, "default", sa).unwrap()
}

struct Outcome {
    server: io::Result<server::TlsStream<TcpStream>>,
    client: io::Result<client::TlsStream<TcpStream>>,
}

async fn handshake(server_cfg: ServerConfig, client_cfg: ClientConfig) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await?;
        // Echo one message so the client observes a post-handshake rejection too.
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok(tls)
    });
    let connector = TlsConnector::from(Arc::new(client_cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = async {
        let mut tls = connector.connect(server_name(addr.ip()), tcp).await?;
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok(tls)
    }
    .await;
    let server = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    Outcome { server, client }
}

fn server_reason(o: &Outcome) -> RejectReason {
    RejectReason::from_io(o.server.as_ref().expect_err("server should reject"))
}

fn client_reason(o: &Outcome) -> RejectReason {
    RejectReason::from_io(o.client.as_ref().expect_err("client should reject"))
}

fn pair(ca: &InProcessCa, td: &str) -> (WorkloadCertificate, WorkloadCertificate) {
    (ca.issue(&id(td, "server")).unwrap(), ca.issue(&id(td, "client")).unwrap())
}

#[tokio::test]
async fn mutual_tls_succeeds_and_exposes_identities() {
    let ca = ca("cluster.local");
    let (srv, cli) = pair(&ca, "cluster.local");
    let trust = ca.trust_bundle();
    let o = handshake(
        server_config(&srv, trust).unwrap(),
        client_config(&cli, trust, vec![id("cluster.local", "other"), srv.identity().clone()]).unwrap(),
    )
    .await;
    let server = o.server.unwrap();
    let client = o.client.unwrap();
    let (_, sconn) = server.get_ref();
    assert_eq!(peer_identity(sconn).unwrap(), *cli.identity());
    assert_eq!(peer_identity(client.get_ref().1).unwrap(), *srv.identity());
    assert_eq!(sconn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(sconn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(sconn.server_name().is_none(), "client must not send SNI");
    let suite = sconn.negotiated_cipher_suite().unwrap().suite();
    assert!(matches!(
        suite,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    ));
    assert_eq!(crypto_provider().cipher_suites.len(), 2);
}

#[tokio::test]
async fn client_rejects_server_with_unexpected_san() {
    let ca = ca("cluster.local");
    let (srv, cli) = pair(&ca, "cluster.local");
    let trust = ca.trust_bundle();
    let o = handshake(
        server_config(&srv, trust).unwrap(),
        client_config(&cli, trust, vec![id("cluster.local", "someone-else")]).unwrap(),
    )
    .await;
    assert_eq!(client_reason(&o), RejectReason::SanMismatch);
    let msg = o.client.as_ref().unwrap_err().to_string();
    assert!(msg.contains("someone-else") && msg.contains("sa/server"), "{msg}");
    assert_eq!(server_reason(&o), RejectReason::PeerAlert);
}

#[tokio::test]
async fn server_rejects_client_of_another_trust_domain() {
    let ours = ca("cluster.local");
    let theirs = ca("evil.local");
    let srv = ours.issue(&id("cluster.local", "server")).unwrap();
    let cli = theirs.issue(&id("evil.local", "client")).unwrap();
    // Both roots trusted, so only the trust-domain rule can reject.
    let mut trust = ours.trust_bundle().clone();
    trust.merge(theirs.trust_bundle());
    let o = handshake(
        server_config(&srv, &trust).unwrap(),
        client_config(&cli, &trust, vec![srv.identity().clone()]).unwrap(),
    )
    .await;
    assert_eq!(server_reason(&o), RejectReason::WrongTrustDomain);
    assert!(o.server.as_ref().unwrap_err().to_string().contains("evil.local"));
    assert_eq!(client_reason(&o), RejectReason::PeerAlert);
}

#[tokio::test]
async fn server_rejects_missing_client_cert() {
    let ca = ca("cluster.local");
    let (srv, _) = pair(&ca, "cluster.local");
    let trust = ca.trust_bundle();
    let verifier = ExpectedIdentityServerVerifier {
        roots: Arc::new(trust.roots().iter().fold(rustls::RootCertStore::empty(), |mut s, r| {
            s.add(r.clone()).unwrap();
            s
        })),
        expected: vec![srv.identity().clone()],
        provider: crypto_provider(),
    };
    let mut anonymous = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
    let o = handshake(server_config(&srv, trust).unwrap(), anonymous).await;
    assert_eq!(server_reason(&o), RejectReason::MissingClientCert);
}

#[tokio::test]
async fn server_rejects_expired_client_cert() {
    let ca = ca("cluster.local");
    let (srv, _) = pair(&ca, "cluster.local");
    let day = Duration::from_secs(86400);
    let now = SystemTime::now();
    let expired = ca.issue_with_validity(&id("cluster.local", "client"), now - 2 * day, now - day).unwrap();
    let trust = ca.trust_bundle();
    let o = handshake(
        server_config(&srv, trust).unwrap(),
        client_config(&expired, trust, vec![srv.identity().clone()]).unwrap(),
    )
    .await;
    assert_eq!(server_reason(&o), RejectReason::Expired);
}

#[tokio::test]
async fn server_rejects_untrusted_root_and_accepts_rotated_root() {
    let ours = ca("cluster.local");
    let stranger = ca("cluster.local");
    let srv = ours.issue(&id("cluster.local", "server")).unwrap();
    let cli = stranger.issue(&id("cluster.local", "client")).unwrap();
    // The client trusts both; the server only its own root.
    let mut both = ours.trust_bundle().clone();
    both.merge(stranger.trust_bundle());
    let o = handshake(
        server_config(&srv, ours.trust_bundle()).unwrap(),
        client_config(&cli, &both, vec![srv.identity().clone()]).unwrap(),
    )
    .await;
    assert_eq!(server_reason(&o), RejectReason::UntrustedIssuer);

    // During a root rotation the server trusts both roots and accepts the client.
    let o = handshake(
        server_config(&srv, &both).unwrap(),
        client_config(&cli, &both, vec![srv.identity().clone()]).unwrap(),
    )
    .await;
    assert!(o.server.is_ok() && o.client.is_ok());
}

#[tokio::test]
async fn client_rejects_untrusted_server() {
    let ours = ca("cluster.local");
    let stranger = ca("cluster.local");
    let srv = stranger.issue(&id("cluster.local", "server")).unwrap();
    let cli = ours.issue(&id("cluster.local", "client")).unwrap();
    let o = handshake(
        server_config(&srv, ours.trust_bundle()).unwrap(),
        client_config(&cli, ours.trust_bundle(), vec![srv.identity().clone()]).unwrap(),
    )
    .await;
    assert_eq!(client_reason(&o), RejectReason::UntrustedIssuer);
}

#[test]
fn config_errors_are_specific() {
    let ca = ca("cluster.local");
    let (srv, _) = pair(&ca, "cluster.local");
    assert!(matches!(server_config(&srv, &TrustBundle::default()), Err(TlsError::EmptyTrustBundle)));
    assert!(matches!(client_config(&srv, ca.trust_bundle(), vec![]), Err(TlsError::NoExpectedIdentity)));
    assert_eq!(RejectReason::SanMismatch.as_str(), "san_mismatch");
}
