//! SPIFFE workload identities as Istio uses them: `spiffe://<td>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";

/// Why a string is not an Istio SPIFFE identity; each variant names the offending part so an
/// operator can fix the configuration or certificate that produced it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("identity {input:?} does not start with \"spiffe://\"")]
    MissingScheme {
        /// The rejected input.
        input: String,
    },
    /// The trust domain is empty or uses characters SPIFFE does not allow.
    #[error("identity {input:?} has an invalid trust domain {trust_domain:?} (allowed: a-z 0-9 . - _)")]
    InvalidTrustDomain {
        /// The rejected input.
        input: String,
        /// The trust domain part.
        trust_domain: String,
    },
    /// The path is not `/ns/<namespace>/sa/<service account>`.
    #[error("identity {input:?} has path {path:?}, expected /ns/<namespace>/sa/<service-account>")]
    BadPath {
        /// The rejected input.
        input: String,
        /// The path part after the trust domain.
        path: String,
    },
    /// A namespace or service-account segment is empty or has disallowed characters.
    #[error("identity {input:?} has an invalid {what} {segment:?} (allowed: A-Z a-z 0-9 . - _)")]
    InvalidSegment {
        /// The rejected input.
        input: String,
        /// "namespace" or "service account".
        what: &'static str,
        /// The offending segment.
        segment: String,
    },
}

/// The identity a workload proves with its certificate; the mesh authorizes and routes by it,
/// and it keys certificate caching and HBONE connection pooling.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    /// Builds an identity from its parts, validating them as [`FromStr`] would.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain: peers are only accepted from the same one (DESIGN §5).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace of the workload.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account of the workload.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The identity as the URI placed in a certificate's SAN.
    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let rest =
            input.strip_prefix(SCHEME).ok_or_else(|| IdentityError::MissingScheme { input: input.to_string() })?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_trust_domain(td) {
            return Err(IdentityError::InvalidTrustDomain { input: input.to_string(), trust_domain: td.to_string() });
        }
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_key, ns, sa_key, sa] = parts.as_slice() else {
            return Err(IdentityError::BadPath { input: input.to_string(), path: format!("/{path}") });
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(IdentityError::BadPath { input: input.to_string(), path: format!("/{path}") });
        }
        for (what, seg) in [("namespace", ns), ("service account", sa)] {
            if !valid_segment(seg) {
                return Err(IdentityError::InvalidSegment { input: input.to_string(), what, segment: seg.to_string() });
            }
        }
        Ok(Identity { trust_domain: td.to_string(), namespace: ns.to_string(), service_account: sa.to_string() })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

/// Debug shows the URI: identities appear inside rustls errors, which print with Debug.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        assert_eq!(Identity::new("cluster.local", "default", "bookinfo-productpage").unwrap(), id);
    }

    #[test]
    fn rejects_malformed() {
        let err = |s: &str| s.parse::<Identity>().unwrap_err();
        assert!(matches!(err("http://td/ns/a/sa/b"), IdentityError::MissingScheme { .. }));
        assert!(matches!(err("spiffe:///ns/a/sa/b"), IdentityError::InvalidTrustDomain { .. }));
        assert!(matches!(err("spiffe://TD/ns/a/sa/b"), IdentityError::InvalidTrustDomain { .. }));
        assert!(matches!(err("spiffe://td"), IdentityError::BadPath { .. }));
        assert!(matches!(err("spiffe://td/ns/a/sa"), IdentityError::BadPath { .. }));
        assert!(matches!(err("spiffe://td/ns/a/sa/b/c"), IdentityError::BadPath { .. }));
        assert!(matches!(err("spiffe://td/sa/a/ns/b"), IdentityError::BadPath { .. }));
        assert!(matches!(err("spiffe://td/ns//sa/b"), IdentityError::InvalidSegment { .. }));
        assert!(matches!(err("spiffe://td/ns/a/sa/b c"), IdentityError::InvalidSegment { .. }));
        assert!(err("spiffe://td/ns/a").to_string().contains("expected /ns/<namespace>/sa/"));
    }

    #[test]
    fn serde_as_string() {
        let id = Identity::new("td", "ns1", "sa1").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://td/ns/ns1/sa/sa1\"");
        let back: Identity = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<Identity>("\"nope\"").is_err());
    }
}
