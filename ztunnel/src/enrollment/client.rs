//! Blocking sender of enrollment requests: what the test cluster uses to hand pods to a
//! node agent, either on the agent's own socket or on a connection the agent opened to it.
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use prost::Message;

use super::wire::{recv_datagram, send_datagram, WireError};
use super::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo,
    WorkloadRequest, WorkloadResponse,
};

/// One enrollment connection to a node agent, requests one at a time.
#[derive(Debug)]
pub struct EnrollmentClient {
    sock: OwnedFd,
}

/// Result of one request: `Ok` when the agent acked without error, `Err(reason)` otherwise.
pub type AckResult = Result<(), String>;

impl EnrollmentClient {
    /// Connects to the agent's `SOCK_SEQPACKET` socket.
    pub fn connect(path: &Path) -> Result<Self, WireError> {
        let sock = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
        connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(Self { sock })
    }

    /// Wraps a connection the node agent opened (Istio's direction), once its hello was
    /// read; the fd must be blocking.
    pub fn from_fd(sock: OwnedFd) -> Self {
        Self { sock }
    }

    /// Enrolls a pod, passing its network namespace.
    pub fn add(&self, uid: &str, info: WorkloadInfo, netns: &impl AsRawFd) -> Result<AckResult, WireError> {
        let req =
            WorkloadRequest { payload: Some(Payload::Add(AddWorkload { uid: uid.into(), workload_info: Some(info) })) };
        self.request(&req.encode_to_vec(), &[netns.as_raw_fd()])
    }

    /// Removes a pod.
    pub fn del(&self, uid: &str) -> Result<AckResult, WireError> {
        let req = WorkloadRequest { payload: Some(Payload::Del(DelWorkload { uid: uid.into() })) };
        self.request(&req.encode_to_vec(), &[])
    }

    /// Tells the agent a pod it already serves still exists (snapshot after a CNI restart).
    pub fn keep(&self, uid: &str) -> Result<AckResult, WireError> {
        let req = WorkloadRequest { payload: Some(Payload::Keep(KeepWorkload { uid: uid.into() })) };
        self.request(&req.encode_to_vec(), &[])
    }

    /// Tells the agent every existing pod has been sent.
    pub fn snapshot_sent(&self) -> Result<AckResult, WireError> {
        let req = WorkloadRequest { payload: Some(Payload::SnapshotSent(SnapshotSent {})) };
        self.request(&req.encode_to_vec(), &[])
    }

    /// Sends arbitrary bytes and fds and waits for the ack (for robustness tests).
    pub fn request(&self, bytes: &[u8], fds: &[RawFd]) -> Result<AckResult, WireError> {
        send_datagram(self.sock.as_raw_fd(), bytes, fds)?;
        let reply = recv_datagram(self.sock.as_raw_fd())?;
        let resp = WorkloadResponse::decode(reply.bytes.as_slice()).map_err(|_| WireError::Io(nix::Error::EBADMSG))?;
        match resp.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
            Some(workload_response::Payload::Ack(ack)) => Ok(Err(ack.error)),
            None => Ok(Err("empty response".into())),
        }
    }
}
