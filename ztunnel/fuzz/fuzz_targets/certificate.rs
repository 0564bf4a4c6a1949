//! Certificates and identities as peers and the CA hand them to us: DER and PEM certificates
//! (`identity::x509::parse_cert`, `certs_from_pem`, `TrustBundle::from_pem`), private keys
//! (`pkcs8_key_from_pem`, with its own DER re-wrapping), SPIFFE ids (`Identity::from_str`) and the
//! TLS verifiers' identity extraction (`tls::cert_identities`).
//!
//! Properties:
//! - `Identity::from_str` accepts exactly what an independent check of the documented grammar
//!   accepts, and an accepted id prints back to the same string and rebuilds from its parts;
//! - a certificate generated with fuzzer-chosen URI SANs, validity, serial and CA flag parses to
//!   exactly those facts: the SPIFFE SANs as identities in order, the others as `other_uris`;
//!   `cert_identities` and `WorkloadCertificate::new` agree with `parse_cert`;
//! - PEM written by `certs_to_pem` / `TrustBundle::to_pem` reads back to the same DER;
//! - a PKCS#1 or SEC1 key is re-wrapped as PKCS#8 holding the original key bytes unchanged, and a
//!   PKCS#8 key is returned as it was;
//! - none of it panics on arbitrary bytes.
#![no_main]

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType, SerialNumber};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use ztunnel::identity::x509::{certs_from_pem, certs_to_pem, parse_cert, pkcs8_key_from_pem};
use ztunnel::identity::{Identity, TrustBundle, WorkloadCertError, WorkloadCertificate};
use ztunnel::tls::{cert_identities, VerifyError};

/// The documented grammar, checked independently of the parser:
/// `spiffe://<td>/ns/<ns>/sa/<sa>`, td in `[a-z0-9._-]{1,255}`, ns and sa in `[A-Za-z0-9._-]+`
/// other than `.` and `..`.
fn reference_identity(s: &str) -> Option<(String, String, String)> {
    let rest = s.strip_prefix("spiffe://")?;
    let slash = rest.find('/').unwrap_or(rest.len());
    let (td, path) = rest.split_at(slash);
    let td_ok = (1..=255).contains(&td.len())
        && td.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c));
    if !td_ok {
        return None;
    }
    let segs: Vec<&str> = path.split('/').collect();
    if segs.len() != 5 || !segs[0].is_empty() || segs[1] != "ns" || segs[3] != "sa" {
        return None;
    }
    let seg_ok = |x: &str| {
        !x.is_empty() && x != "." && x != ".." && x.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
    };
    (seg_ok(segs[2]) && seg_ok(segs[4])).then(|| (td.to_string(), segs[2].to_string(), segs[4].to_string()))
}

fn check_identity(s: &str) {
    let parsed = Identity::from_str(s);
    match (&parsed, reference_identity(s)) {
        (Ok(id), Some((td, ns, sa))) => {
            assert_eq!(
                (id.trust_domain(), id.namespace(), id.service_account()),
                (td.as_str(), ns.as_str(), sa.as_str())
            );
            assert_eq!(id.to_string(), s, "an identity prints as it was written");
            assert_eq!(id.to_uri(), s);
            assert_eq!(Identity::new(&td, &ns, &sa).as_ref(), Ok(id), "rebuilding from parts");
            let json = serde_json::to_string(id).unwrap();
            assert_eq!(&serde_json::from_str::<Identity>(&json).unwrap(), id, "JSON round trip");
        }
        (Err(_), None) => {}
        (got, want) => panic!("Identity::from_str({s:?}) = {got:?}, the grammar says {want:?}"),
    }
}

fn signing_key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key"))
}

#[derive(Arbitrary, Debug)]
enum San {
    /// A SPIFFE id built from parts (valid or not).
    Spiffe {
        td: String,
        ns: String,
        sa: String,
    },
    Uri(String),
    Dns(String),
}

#[derive(Arbitrary, Debug)]
struct CertSpec {
    sans: Vec<San>,
    serial: Option<Vec<u8>>,
    not_before: (u16, u8, u8),
    not_after: (u16, u8, u8),
    ca: bool,
}

fn to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn generated_cert(spec: CertSpec) {
    let mut uris = Vec::new();
    let mut params = CertificateParams::default();
    for san in spec.sans.into_iter().take(8) {
        let (uri, is_uri) = match san {
            San::Spiffe { td, ns, sa } => (format!("spiffe://{td}/ns/{ns}/sa/{sa}"), true),
            San::Uri(u) => (u, true),
            San::Dns(d) => (d, false),
        };
        let Ok(ia5) = rcgen::string::Ia5String::try_from(uri.as_str()) else { continue };
        if is_uri {
            params.subject_alt_names.push(SanType::URI(ia5));
            uris.push(uri);
        } else {
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
    }
    let date = |(y, m, d): (u16, u8, u8)| rcgen::date_time_ymd(i32::from(y % 10000), m % 12 + 1, d % 28 + 1);
    params.serial_number = spec.serial.as_deref().map(SerialNumber::from_slice);
    params.not_before = date(spec.not_before);
    params.not_after = date(spec.not_after);
    params.is_ca = if spec.ca { IsCa::Ca(BasicConstraints::Unconstrained) } else { IsCa::ExplicitNoCa };
    let Ok(cert) = params.self_signed(signing_key()) else { return };
    let der = cert.der().clone();

    let info = parse_cert(&der).expect("a generated certificate parses");
    let (ids, others): (Vec<&String>, Vec<&String>) = uris.iter().partition(|u| reference_identity(u).is_some());
    let ids: Vec<String> = ids.into_iter().cloned().collect();
    let others: Vec<String> = others.into_iter().cloned().collect();
    assert_eq!(info.identities.iter().map(|i| i.to_string()).collect::<Vec<_>>(), ids, "SPIFFE SANs");
    assert_eq!(info.other_uris, others, "other URI SANs");
    assert_eq!(info.is_ca, spec.ca, "basicConstraints CA");
    assert_eq!(info.not_before, to_system_time(params.not_before.unix_timestamp()), "notBefore");
    assert_eq!(info.not_after, to_system_time(params.not_after.unix_timestamp()), "notAfter");
    assert!(
        info.serial.len() % 2 == 0 && info.serial.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    if let Some(serial) = &spec.serial {
        // DER INTEGERs are minimal and positive: leading zero bytes aside, the serial is what was set.
        let strip = |b: &[u8]| b.iter().skip_while(|x| **x == 0).copied().collect::<Vec<u8>>();
        let got: Vec<u8> = (0..info.serial.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&info.serial[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(strip(&got), strip(serial), "serial");
    }

    match cert_identities(&der) {
        Ok(got) => assert_eq!(got, info.identities),
        Err(VerifyError::NoSpiffeIdentity { uris }) => {
            assert!(info.identities.is_empty());
            assert_eq!(uris, info.other_uris);
        }
        Err(e) => panic!("cert_identities failed on a parseable certificate: {e}"),
    }

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key().serialize_der()));
    match WorkloadCertificate::new(vec![der.clone()], key, TrustBundle::new([der.clone()])) {
        Ok(wc) => {
            assert_eq!(Some(wc.identity()), info.identities.first(), "workload identity is the first SPIFFE SAN");
            assert_eq!((wc.not_before(), wc.not_after()), (info.not_before, info.not_after));
            assert_eq!(wc.serial(), info.serial);
            let _ = (wc.refresh_at(), wc.is_expired_at(SystemTime::now()));
            assert_eq!(certs_from_pem(wc.chain_pem().as_bytes()).unwrap(), vec![der.clone()]);
        }
        Err(WorkloadCertError::NoIdentity { uris }) => {
            assert!(info.identities.is_empty());
            assert_eq!(uris, info.other_uris);
        }
        Err(e) => panic!("WorkloadCertificate::new failed on a parseable certificate: {e}"),
    }

    let pem = certs_to_pem([&der, &der]);
    assert_eq!(certs_from_pem(pem.as_bytes()).unwrap(), vec![der.clone(), der.clone()], "PEM round trip");
    let bundle = TrustBundle::from_pem(pem.as_bytes()).unwrap();
    assert_eq!(bundle.roots(), [der.clone()], "a bundle drops duplicates");
    assert_eq!(TrustBundle::from_pem(bundle.to_pem().as_bytes()).unwrap(), bundle, "bundle PEM round trip");
}

/// Reads one DER TLV (definite lengths only), for checking the PKCS#8 wrapper.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        let (bytes, rest) = (rest.get(..n)?, rest.get(n..)?);
        (bytes.iter().try_fold(0usize, |acc, b| acc.checked_mul(256)?.checked_add(usize::from(*b)))?, rest)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

fn check_key(label: &str, body: &[u8]) {
    let pem_text = pem::encode(&pem::Pem::new(label, body.to_vec()));
    let Ok(pkcs8) = pkcs8_key_from_pem(pem_text.as_bytes()) else { return };
    let out = pkcs8.secret_pkcs8_der();
    match label {
        "PRIVATE KEY" => assert_eq!(out, body, "a PKCS#8 key is returned unchanged"),
        "RSA PRIVATE KEY" | "EC PRIVATE KEY" => {
            // SEQUENCE { INTEGER 0, AlgorithmIdentifier, OCTET STRING <the original key> }
            let (tag, seq, rest) = tlv(out).expect("PKCS#8 is one DER SEQUENCE");
            assert!(tag == 0x30 && rest.is_empty(), "PKCS#8 is one DER SEQUENCE");
            let (tag, version, seq) = tlv(seq).expect("version");
            assert_eq!((tag, version), (0x02, &[0u8][..]));
            let (tag, alg, seq) = tlv(seq).expect("algorithm");
            assert_eq!(tag, 0x30);
            let (tag, oid, params) = tlv(alg).expect("algorithm oid");
            assert_eq!(tag, 0x06);
            if label == "RSA PRIVATE KEY" {
                assert_eq!(oid, [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]);
                assert_eq!(params, [0x05, 0x00]);
            } else {
                assert_eq!(oid, [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
                let (tag, _curve, rest) = tlv(params).expect("curve");
                assert!(tag == 0x06 && rest.is_empty());
            }
            let (tag, inner, rest) = tlv(seq).expect("key octets");
            assert!(tag == 0x04 && rest.is_empty());
            assert_eq!(inner, body, "the wrapped key is the original");
        }
        _ => {}
    }
}

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Identity(&'a str),
    Der(&'a [u8]),
    Pem(&'a [u8]),
    /// Arbitrary bytes as the body of a PEM block with a key or certificate label.
    PemBody(u8, &'a [u8]),
    Generated(CertSpec),
}

fuzz_target!(|input: Input| {
    match input {
        Input::Identity(s) => check_identity(s),
        Input::Der(der) => {
            let parsed = parse_cert(der);
            let der = CertificateDer::from(der);
            match (parsed, cert_identities(&der)) {
                (Ok(info), Ok(ids)) => assert_eq!(ids, info.identities),
                (Ok(info), Err(VerifyError::NoSpiffeIdentity { uris })) => {
                    assert!(info.identities.is_empty());
                    assert_eq!(uris, info.other_uris);
                }
                (Err(_), Err(VerifyError::Unparseable(_))) => {}
                (p, c) => panic!("parse_cert and cert_identities disagree: {p:?} vs {c:?}"),
            }
            for id in parse_cert(&der).map(|i| i.identities).unwrap_or_default() {
                check_identity(&id.to_string());
            }
        }
        Input::Pem(pem) => {
            if let Ok(certs) = certs_from_pem(pem) {
                let again = certs_to_pem(&certs);
                assert_eq!(certs_from_pem(again.as_bytes()).unwrap(), certs, "PEM round trip");
                let bundle = TrustBundle::from_pem(pem).unwrap();
                let _ = format!("{bundle:?}");
            }
            let _ = pkcs8_key_from_pem(pem);
        }
        Input::PemBody(label, body) => {
            let label = ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "CERTIFICATE"][usize::from(label % 4)];
            if label == "CERTIFICATE" {
                let pem_text = pem::encode(&pem::Pem::new(label, body.to_vec()));
                assert_eq!(certs_from_pem(pem_text.as_bytes()).unwrap(), vec![CertificateDer::from(body.to_vec())]);
                let _ = parse_cert(body);
            } else {
                check_key(label, body);
            }
        }
        Input::Generated(spec) => generated_cert(spec),
    }
});
