//! Reading the few X.509 facts the mesh needs (SPIFFE URI SANs, validity, serial, subject
//! and issuer) and PEM encoding, kept in one place so TLS verification and certificate caching agree on them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;

use super::spiffe::Identity;

/// Why certificate or key material could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertParseError {
    /// The DER is not a parseable X.509 certificate.
    #[error("certificate is not valid X.509 DER: {0}")]
    Der(String),
    /// PEM input had no (or unreadable) blocks of the expected kind.
    #[error("no valid {what} found in PEM input: {detail}")]
    Pem {
        /// "certificate" or "private key".
        what: &'static str,
        /// What the PEM reader said.
        detail: String,
    },
    /// The private key is in a format this build cannot convert to PKCS#8.
    #[error("unsupported private key format: {0}")]
    KeyFormat(String),
}

/// The facts about one certificate that identity and TLS code act on.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// URI SANs that parse as SPIFFE identities, in certificate order.
    pub identities: Vec<Identity>,
    /// URI SANs present but not valid identities (for error messages).
    pub other_uris: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number as lowercase hex.
    pub serial: String,
    /// Whether basicConstraints says CA.
    pub is_ca: bool,
    /// The subject DN as text (RFC 4514 style, e.g. `O=cluster.local`; empty for the usual
    /// SPIFFE leaf), to show a chain to an operator.
    pub subject: String,
    /// The issuer DN as text, to find which root anchors a chain.
    pub issuer: String,
}

fn unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Parses the SANs, validity and serial of a DER certificate.
pub fn parse_cert(der: &[u8]) -> Result<CertInfo, CertParseError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertParseError::Der(e.to_string()))?;
    let mut identities = Vec::new();
    let mut other_uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                match uri.parse::<Identity>() {
                    Ok(id) => identities.push(id),
                    Err(_) => other_uris.push(uri.to_string()),
                }
            }
        }
    }
    let serial = cert.tbs_certificate.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    Ok(CertInfo {
        identities,
        other_uris,
        not_before: unix(cert.validity().not_before.timestamp()),
        not_after: unix(cert.validity().not_after.timestamp()),
        serial,
        is_ca,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
    })
}

/// Reads every `CERTIFICATE` block of a PEM document (a chain or a bundle of roots).
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertParseError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertParseError::Pem { what: "certificate", detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(CertParseError::Pem { what: "certificate", detail: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

/// Encodes certificates as a PEM document.
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    let blocks: Vec<pem::Pem> = certs.into_iter().map(|c| pem::Pem::new("CERTIFICATE", c.as_ref().to_vec())).collect();
    pem::encode_many(&blocks)
}

/// Reads a private key (PKCS#8, SEC1 `EC PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`) and returns
/// it as PKCS#8, the only form the `ring` backend signs with; Istio plug-in CA keys are often
/// PKCS#1 or SEC1.
pub fn pkcs8_key_from_pem(pem: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, CertParseError> {
    let key = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| CertParseError::Pem { what: "private key", detail: e.to_string() })?;
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k),
        PrivateKeyDer::Pkcs1(k) => {
            // AlgorithmIdentifier { rsaEncryption, NULL }
            let alg = der_tlv(
                0x30,
                &[&der_tlv(0x06, &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01])[..], &[0x05, 0x00]].concat(),
            );
            Ok(wrap_pkcs8(&alg, k.secret_pkcs1_der()))
        }
        PrivateKeyDer::Sec1(k) => {
            let curve = sec1_curve_oid(k.secret_sec1_der())
                .ok_or_else(|| CertParseError::KeyFormat("EC PRIVATE KEY without named-curve parameters".into()))?;
            // AlgorithmIdentifier { id-ecPublicKey, namedCurve }
            let ec_public_key = der_tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
            let alg = der_tlv(0x30, &[&ec_public_key[..], &der_tlv(0x06, &curve)].concat());
            Ok(wrap_pkcs8(&alg, k.secret_sec1_der()))
        }
        other => Err(CertParseError::KeyFormat(format!("{other:?}"))),
    }
}

fn wrap_pkcs8(alg: &[u8], inner: &[u8]) -> PrivatePkcs8KeyDer<'static> {
    let body = [&[0x02, 0x01, 0x00][..], alg, &der_tlv(0x04, inner)].concat();
    PrivatePkcs8KeyDer::from(der_tlv(0x30, &body))
}

fn der_tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

/// Finds the named-curve OID of a SEC1 ECPrivateKey: its `[0] parameters`, or when absent,
/// inferred from the private scalar's length (P-256 or P-384).
fn sec1_curve_oid(der: &[u8]) -> Option<Vec<u8>> {
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    let (tag, body, _) = read_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = body;
    let mut scalar_len = 0;
    while !rest.is_empty() {
        let (tag, value, next) = read_tlv(rest)?;
        match tag {
            0x04 => scalar_len = value.len(),
            0xa0 => {
                let (inner_tag, oid, _) = read_tlv(value)?;
                return (inner_tag == 0x06).then(|| oid.to_vec());
            }
            _ => {}
        }
        rest = next;
    }
    match scalar_len {
        32 => Some(P256.to_vec()),
        48 => Some(P384.to_vec()),
        _ => None,
    }
}

fn read_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        rest = &rest[n..];
        len
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec1_key_is_converted_to_pkcs8() {
        // A P-256 key generated as PKCS#8, re-expressed as SEC1 by stripping the wrapper.
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (_, body, _) = read_tlv(kp.serialized_der()).unwrap();
        let (_, _version, rest) = read_tlv(body).unwrap();
        let (_, _alg, rest) = read_tlv(rest).unwrap();
        let (_, sec1, _) = read_tlv(rest).unwrap();
        let pem = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1.to_vec()));
        let pkcs8 = pkcs8_key_from_pem(pem.as_bytes()).unwrap();
        let back = rcgen::KeyPair::try_from(pkcs8.secret_pkcs8_der()).unwrap();
        assert_eq!(back.public_key_raw(), kp.public_key_raw());
    }
}
