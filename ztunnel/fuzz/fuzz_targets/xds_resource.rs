//! xDS resources as a control plane (or anyone who reaches `XDS_ADDRESS`) sends them:
//! `istio.workload.Address` and `istio.security.Authorization` bytes through the agent's
//! conversion (`xds::convert`).
//!
//! Properties:
//! - no input panics; each is accepted or rejected with a reason;
//! - an accepted workload has a uid and only 4- or 16-byte addresses made it through; an
//!   accepted policy has a name and ports that fit in 16 bits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::xds::convert::{address, authorization, AddressResource};

fuzz_target!(|data: &[u8]| {
    match address(data) {
        Ok(AddressResource::Workload(w)) => assert!(!w.uid.is_empty()),
        Ok(AddressResource::Service(s)) => {
            assert!(!s.hostname.is_empty());
            assert!(s.vip_addrs().is_ok(), "accepted service VIPs must parse back");
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
    match authorization(data) {
        Ok(p) => assert!(!p.name.is_empty()),
        Err(reason) => assert!(!reason.is_empty()),
    }
});
