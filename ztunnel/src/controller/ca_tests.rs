//! CA service behaviour over real tonic + TLS on loopback, one behaviour per test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost_types::{Struct, Value};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::sync::watch;
use tonic::{Code, Request};
use ztunnel_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;

use super::*;
use crate::controller::ads::{AdsServer, ResourceSnapshot};
use crate::controller::grpc::testing::{authenticator, test_ca, with_token, TestServer};

const REVIEWS: &str = "spiffe://cluster.local/ns/bookinfo/sa/reviews";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/productpage";

/// node-a runs reviews and productpage; node-b runs productpage only.
fn authorizer() -> NodeAuthorizer {
    Arc::new(|node: &str, id: &Identity| {
        let allowed: &[&str] = match node {
            "node-a" => &[REVIEWS, PRODUCTPAGE],
            "node-b" => &[PRODUCTPAGE],
            _ => &[],
        };
        if allowed.contains(&id.to_uri().as_str()) {
            Ok(())
        } else {
            Err("no pod with that service account is scheduled on it".into())
        }
    })
}

fn csr_with_sans(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn csr(san: &str) -> String {
    csr_with_sans(vec![SanType::URI(san.try_into().unwrap())])
}

fn request(csr: String, validity_secs: i64, impersonate: Option<&str>) -> IstioCertificateRequest {
    let metadata = impersonate.map(|id| Struct {
        fields: BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_string(),
            Value { kind: Some(Kind::StringValue(id.to_string())) },
        )]),
    });
    IstioCertificateRequest { csr, validity_duration: validity_secs, metadata }
}

struct Harness {
    issuer: Arc<InProcessCa>,
    ca: CaServer,
    server: TestServer,
}

impl Harness {
    async fn start() -> Harness {
        let issuer = test_ca();
        let ca = CaServer::new(issuer.clone(), authenticator(), authorizer());
        let (_tx, snapshots) = watch::channel(Arc::new(ResourceSnapshot::new(0)));
        let server = TestServer::start(&issuer, AdsServer::new(snapshots), ca.clone()).await;
        Harness { issuer, ca, server }
    }

    async fn create(&self, token: Option<&str>, req: IstioCertificateRequest) -> Result<Vec<String>, Status> {
        let mut client = IstioCertificateServiceClient::new(self.server.channel().await);
        let resp = client.create_certificate(with_token(Request::new(req), token)).await?;
        Ok(resp.into_inner().cert_chain)
    }
}

#[tokio::test]
async fn permitted_csr_gets_a_chain_that_verifies_with_the_requested_san_and_validity() {
    let h = Harness::start().await;
    let before = SystemTime::now();
    let chain = h.create(Some("token-node-a"), request(csr(REVIEWS), 3600, Some(REVIEWS))).await.unwrap();

    let certs: Vec<CertificateDer<'static>> =
        chain.iter().map(|pem| x509::certs_from_pem(pem.as_bytes()).unwrap().remove(0)).collect();
    assert!(certs.len() >= 2, "leaf and root expected, got {}", certs.len());
    let root = certs.last().unwrap();
    assert_eq!(root, &h.issuer.trust_bundle().roots()[0], "root must come last");

    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.into(), crate::tls::crypto_provider()).build().unwrap();
    verifier.verify_client_cert(&certs[0], &certs[1..certs.len() - 1], UnixTime::now()).expect("chain verifies");

    let leaf = x509::parse_cert(&certs[0]).unwrap();
    assert_eq!(leaf.identities, [REVIEWS.parse::<Identity>().unwrap()]);
    let lifetime = leaf.not_after.duration_since(before).unwrap();
    assert!(lifetime > Duration::from_secs(3590) && lifetime <= Duration::from_secs(3601), "{lifetime:?}");
    assert_eq!(h.ca.issued_total(), 1);
    assert_eq!(h.ca.refusals_total(), 0);
}

#[tokio::test]
async fn node_asking_for_an_identity_not_scheduled_on_it_is_denied_and_counted() {
    let h = Harness::start().await;
    let err = h.create(Some("token-node-b"), request(csr(REVIEWS), 3600, Some(REVIEWS))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "node node-b may not hold spiffe://cluster.local/ns/bookinfo/sa/reviews: \
         no pod with that service account is scheduled on it"
    );
    assert_eq!(h.ca.refusals(RefusalReason::NodeNotAuthorized), 1);
    assert_eq!(h.ca.issued_total(), 0);
}

#[tokio::test]
async fn csr_san_differing_from_impersonated_identity_is_invalid_and_counted() {
    let h = Harness::start().await;
    let err = h.create(Some("token-node-a"), request(csr(REVIEWS), 3600, Some(PRODUCTPAGE))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not match the CSR SAN"), "{}", err.message());
    assert_eq!(h.ca.refusals(RefusalReason::ImpersonationMismatch), 1);
}

#[tokio::test]
async fn csr_outside_the_trust_domain_is_invalid_and_counted() {
    let h = Harness::start().await;
    let foreign = "spiffe://other.domain/ns/bookinfo/sa/reviews";
    let err = h.create(Some("token-node-a"), request(csr(foreign), 3600, Some(foreign))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("outside trust domain \"cluster.local\""), "{}", err.message());
    assert_eq!(h.ca.refusals(RefusalReason::WrongTrustDomain), 1);
}

#[tokio::test]
async fn malformed_csr_is_refused_with_a_clear_message() {
    let h = Harness::start().await;
    let err = h.create(Some("token-node-a"), request("not a CSR".into(), 3600, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("malformed CSR"), "{}", err.message());
    assert_eq!(h.ca.refusals(RefusalReason::MalformedCsr), 1);
}

#[tokio::test]
async fn request_without_a_valid_token_is_unauthenticated_and_counted() {
    let h = Harness::start().await;
    let err = h.create(None, request(csr(REVIEWS), 3600, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(h.ca.refusals(RefusalReason::Unauthenticated), 1);
}

#[test]
fn csr_with_extra_sans_is_invalid() {
    let ca = CaServer::new(test_ca(), authenticator(), authorizer());
    let two = csr_with_sans(vec![
        SanType::URI(REVIEWS.try_into().unwrap()),
        SanType::DnsName("reviews.bookinfo.svc".try_into().unwrap()),
    ]);
    let err = ca.sign("node-a", &request(two, 0, None)).unwrap_err();
    assert_eq!(err.reason(), RefusalReason::InvalidSan);
    assert!(err.to_string().contains("DNS reviews.bookinfo.svc"), "{err}");
}

#[test]
fn requested_validity_is_capped_and_defaulted() {
    let ca = CaServer::new(test_ca(), authenticator(), authorizer())
        .with_ttls(Duration::from_secs(1800), Duration::from_secs(7200));
    for (asked, granted) in [(0, 1800), (-5, 1800), (3600, 3600), (90 * 86400, 7200)] {
        let chain = ca.sign("node-a", &request(csr(REVIEWS), asked, None)).unwrap();
        let leaf = x509::parse_cert(&x509::certs_from_pem(chain[0].as_bytes()).unwrap()[0]).unwrap();
        // Leaves are backdated 60 s against clock skew.
        let lifetime = leaf.not_after.duration_since(leaf.not_before).unwrap().as_secs() - 60;
        assert!(lifetime.abs_diff(granted) <= 1, "asked {asked}: got {lifetime}, want {granted}");
    }
}
