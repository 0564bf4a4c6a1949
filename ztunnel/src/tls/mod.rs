//! TLS for HBONE (DESIGN §5): rustls configs with mutual SPIFFE authentication, the verifiers
//! behind them, and helpers to read the peer's identity and classify failures.

mod config;
mod verify;

pub use config::{client_config, crypto_provider, server_config, server_name, TlsError, ALPN_H2};
pub use verify::{cert_identities, peer_identity, RejectReason, VerifyError};

#[cfg(test)]
mod tests;
