//! The pod-enrollment protocol (ZDS-shaped): one protobuf message per `SOCK_SEQPACKET`
//! datagram, the pod's netns fd attached with `SCM_RIGHTS`. Used by the node agent
//! (server side, in `node`) and by whoever hands pods over: the CNI plugin, the
//! mini-cluster in tests.
mod client;
mod wire;

pub use client::EnrollmentClient;
pub use wire::{recv_datagram, send_datagram, Datagram, WireError, MAX_DATAGRAM};
pub use ztunnel_proto::zds::{
    workload_request, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo,
    WorkloadRequest, WorkloadResponse,
};
