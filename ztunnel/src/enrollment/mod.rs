//! The pod-enrollment protocol, Istio's ZDS (`istio.workload.zds`): one protobuf message per
//! `SOCK_SEQPACKET` datagram, the pod's netns fd attached with `SCM_RIGHTS`. In Istio's
//! direction the CNI side (`ztunnel cni`, or istio-cni) serves the socket and the node agent
//! connects and says `ZdsHello` first; the agent can also serve it (for tests, handover and
//! use without a CNI daemon). Both ends share the datagram I/O and socket guards here.
mod client;
pub mod socket;
mod wire;

pub use client::EnrollmentClient;
pub use wire::{hello, recv_async, recv_datagram, send_async, send_datagram, Datagram, WireError, MAX_DATAGRAM};
pub use ztunnel_proto::zds::{
    workload_request, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version,
    WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};
