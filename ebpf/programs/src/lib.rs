//! Library target so `ztunnel` can list this crate as a build-dependency (edits to the
//! kernel programs then rebuild the embedded object). The programs are in the binary.
#![no_std]
