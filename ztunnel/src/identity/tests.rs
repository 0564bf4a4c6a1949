//! Unit tests of the CA and the certificate manager.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, UnixTime};

use super::*;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ztunnel-identity-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Chain verification the way TLS will do it, to prove issued chains are valid.
fn verify_chain(cert: &WorkloadCertificate, roots: &TrustBundle) -> Result<(), rustls::Error> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots.roots() {
        store.add(r.clone()).unwrap();
    }
    let parsed = rustls::server::ParsedCertificate::try_from(cert.leaf())?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        &cert.chain()[1..],
        UnixTime::now(),
        algs.all,
    )
}

#[test]
fn ca_issues_p256_leaf_with_spiffe_san() {
    let ca = InProcessCa::new(CaConfig::new("cluster.local")).unwrap();
    assert_eq!(ca.source(), &CaSource::Memory);
    let cert = ca.issue(&id("default", "web")).unwrap();
    assert_eq!(cert.identity(), &id("default", "web"));
    assert_eq!(cert.chain().len(), 2);
    let ttl = cert.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(ttl > Duration::from_secs(23 * 3600) && ttl <= DEFAULT_LEAF_TTL);
    let (_, leaf) = x509_parser::parse_x509_certificate(cert.leaf()).unwrap();
    assert_eq!(leaf.public_key().algorithm.algorithm.to_id_string(), "1.2.840.10045.2.1");
    verify_chain(&cert, ca.trust_bundle()).unwrap();
    // Serials are random per certificate.
    assert_ne!(ca.issue(&id("default", "web")).unwrap().serial(), cert.serial());
}

#[test]
fn ca_refuses_other_trust_domain_and_empty_validity() {
    let ca = InProcessCa::new(CaConfig::new("cluster.local")).unwrap();
    let other = Identity::new("evil.local", "default", "web").unwrap();
    assert!(matches!(ca.issue(&other), Err(CaError::WrongTrustDomain { .. })));
    let now = SystemTime::now();
    assert!(matches!(ca.issue_with_validity(&id("a", "b"), now, now), Err(CaError::EmptyValidity { .. })));
}

#[test]
fn ca_persists_root_across_instances() {
    let dir = temp_dir("persist");
    let mut cfg = CaConfig::new("cluster.local");
    cfg.state_dir = Some(dir.clone());
    let first = InProcessCa::new(cfg.clone()).unwrap();
    assert_eq!(first.source(), &CaSource::Generated(dir.clone()));
    let second = InProcessCa::new(cfg).unwrap();
    assert_eq!(second.source(), &CaSource::Reloaded(dir.clone()));
    assert_eq!(first.trust_bundle(), second.trust_bundle());
    // A certificate from the restarted CA verifies against the original root.
    verify_chain(&second.issue(&id("a", "b")).unwrap(), first.trust_bundle()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(ca_files::CA_KEY)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Writes an Istio plug-in layout: a root, and an intermediate that signs.
fn write_plugin_dir(dir: &PathBuf, key_as_sec1: bool) -> (CertificateDer<'static>, CertificateDer<'static>) {
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("plugin root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate().unwrap();
    let int = ca_params("plugin intermediate").signed_by(&int_key, &root_issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let key_pem = if key_as_sec1 {
        // Re-encode as "EC PRIVATE KEY" (SEC1), as openssl-made plug-in keys often are.
        let pkcs8 = int_key.serialize_der();
        let sec1 = &pkcs8[pkcs8.len() - 0x6d..]; // ring's P-256 PKCS#8 ends with the SEC1 blob
        assert_eq!(sec1[0], 0x30);
        pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1.to_vec()))
    } else {
        int_key.serialize_pem()
    };
    std::fs::write(dir.join(ca_files::CA_KEY), key_pem).unwrap();
    std::fs::write(dir.join(ca_files::CA_CERT), int.pem()).unwrap();
    std::fs::write(dir.join(ca_files::ROOT_CERT), root.pem()).unwrap();
    std::fs::write(dir.join(ca_files::CERT_CHAIN), format!("{}{}", int.pem(), root.pem())).unwrap();
    (root.der().clone(), int.der().clone())
}

#[test]
fn plugin_ca_files_are_honored() {
    for sec1 in [false, true] {
        let dir = temp_dir(&format!("plugin-{sec1}"));
        let (root, int) = write_plugin_dir(&dir, sec1);
        let mut cfg = CaConfig::new("cluster.local");
        cfg.plugin_dir = Some(dir.clone());
        cfg.state_dir = Some(temp_dir("unused-state"));
        let ca = InProcessCa::new(cfg).unwrap();
        assert_eq!(ca.source(), &CaSource::Plugin(dir.clone()));
        assert_eq!(ca.trust_bundle().roots(), std::slice::from_ref(&root));
        let cert = ca.issue(&id("ns1", "sa1")).unwrap();
        assert_eq!(cert.chain()[1], int);
        assert_eq!(cert.chain()[2], root);
        verify_chain(&cert, ca.trust_bundle()).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn plugin_ca_errors_are_specific() {
    let dir = temp_dir("plugin-bad");
    write_plugin_dir(&dir, false);
    let mut cfg = CaConfig::new("cluster.local");
    cfg.plugin_dir = Some(dir.clone());
    std::fs::remove_file(dir.join(ca_files::ROOT_CERT)).unwrap();
    let err = InProcessCa::new(cfg.clone()).err().unwrap();
    assert!(matches!(err, CaError::Incomplete { file: "root-cert.pem", .. }), "{err}");
    write_plugin_dir(&dir, false);
    std::fs::write(dir.join(ca_files::CA_KEY), KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let err = InProcessCa::new(cfg).err().unwrap();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ca_signs_csr_with_requested_identity() {
    let ca = InProcessCa::new(CaConfig::new("cluster.local")).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://cluster.local/ns/x/sa/y".try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = ca.sign_csr(&csr, &id("ns1", "sa1"), Duration::from_secs(3600)).unwrap();
    let info = x509::parse_cert(&chain[0]).unwrap();
    assert_eq!(info.identities, vec![id("ns1", "sa1")]);
    assert!(matches!(ca.sign_csr("garbage", &id("a", "b"), Duration::from_secs(1)), Err(CaError::Csr { .. })));
}

/// A provider that counts fetches, waits a little, and fails on chosen attempts.
struct TestProvider {
    ca: InProcessCa,
    calls: AtomicUsize,
    fail: Box<dyn Fn(usize) -> bool + Send + Sync>,
    ttl: Duration,
}

impl CertificateProvider for TestProvider {
    fn fetch<'a>(&'a self, id: &'a Identity) -> FetchFuture<'a> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if (self.fail)(n) {
                return Err(ProviderError::Backend {
                    identity: id.clone(),
                    source: format!("attempt {n} refused").into(),
                });
            }
            let now = SystemTime::now();
            Ok(self.ca.issue_with_validity(id, now, now + self.ttl)?)
        })
    }
}

fn provider(fail: impl Fn(usize) -> bool + Send + Sync + 'static, ttl: Duration) -> Arc<TestProvider> {
    Arc::new(TestProvider {
        ca: InProcessCa::new(CaConfig::new("cluster.local")).unwrap(),
        calls: AtomicUsize::new(0),
        fail: Box::new(fail),
        ttl,
    })
}

#[tokio::test]
async fn concurrent_first_fetches_share_one_request() {
    let p = provider(|_| false, DEFAULT_LEAF_TTL);
    let mgr = CertManager::new(p.clone(), CertManagerConfig::default());
    let who = id("default", "web");
    let fetches = (0..20).map(|_| {
        let (mgr, who) = (mgr.clone(), who.clone());
        tokio::spawn(async move { mgr.fetch(&who).await.unwrap().serial().to_string() })
    });
    let serials: Vec<String> = futures_join(fetches).await;
    assert_eq!(p.calls.load(Ordering::SeqCst), 1);
    assert!(serials.iter().all(|s| s == &serials[0]));
    let snap = mgr.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].state, CertState::Available);
    assert_eq!(snap[0].serial.as_deref(), Some(serials[0].as_str()));
}

async fn futures_join<T: Send + 'static>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn initial_failure_is_reported_and_retried_on_next_request() {
    let p = provider(|n| n == 0, DEFAULT_LEAF_TTL);
    let mgr = CertManager::new(p.clone(), CertManagerConfig::default());
    let err = mgr.fetch(&id("a", "b")).await.unwrap_err();
    assert!(matches!(err, CertError::Fetch { .. }), "{err}");
    assert!(err.to_string().contains("attempt 0 refused"));
    mgr.fetch(&id("a", "b")).await.unwrap();
    assert_eq!(p.calls.load(Ordering::SeqCst), 2);
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn renews_at_half_life_and_keeps_old_cert_while_failing() {
    // Attempt 0 succeeds, renewals 1..=3 fail, attempt 4 succeeds. Certificates live 4 s
    // (second granularity), so renewal starts 1-2 s after issue.
    let p = provider(|n| (1..=3).contains(&n), Duration::from_secs(4));
    let cfg =
        CertManagerConfig { initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(200) };
    let mgr = CertManager::new(p.clone(), cfg);
    let who = id("a", "b");
    let first = mgr.fetch(&who).await.unwrap();
    assert_eq!(mgr.snapshot()[0].state, CertState::Available);
    assert_eq!(p.calls.load(Ordering::SeqCst), 1);

    wait_for("a failed renewal", || mgr.snapshot()[0].state == CertState::RenewalFailing).await;
    let snap = &mgr.snapshot()[0];
    assert!(snap.failures >= 1, "{snap:?}");
    assert!(snap.last_error.as_deref().unwrap().contains("refused"));
    assert!(snap.next_attempt_unix.is_some());
    // The old certificate is still served.
    assert_eq!(mgr.fetch(&who).await.unwrap().serial(), first.serial());

    wait_for("a successful renewal", || {
        let s = &mgr.snapshot()[0];
        s.state == CertState::Available && s.serial.as_deref() != Some(first.serial())
    })
    .await;
    assert_eq!(p.calls.load(Ordering::SeqCst), 5);
    assert_eq!(mgr.snapshot()[0].failures, 0);
    assert_ne!(mgr.fetch(&who).await.unwrap().serial(), first.serial());
    mgr.forget(&who);
    assert!(mgr.snapshot().is_empty());
}
