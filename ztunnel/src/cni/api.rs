//! The plugin-to-daemon protocol: the CNI plugin, a short-lived process the container
//! runtime runs per pod, tells the long-running `ztunnel cni` daemon about the pod and waits
//! for its answer, so a pod that must be enrolled is enrolled before ADD returns. One JSON
//! request and one JSON response, each a single datagram on the daemon's owner-only
//! `SOCK_SEQPACKET` socket.
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use super::records::PodRecord;
use crate::enrollment::{recv_datagram, send_datagram, socket, WireError};

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum PluginRequest {
    /// A pod's sandbox was created: record it and enroll it if the control plane puts it in
    /// the mesh; answer once that is done (or refused).
    Add { pod: PodRecord },
    /// A sandbox was torn down: forget the pod and release it. Unknown pods are fine.
    Del { container_id: String, uid: Option<String> },
    /// Whether the daemon knows the pod, and has it enrolled if it should be.
    Check { container_id: String, uid: Option<String> },
}

/// The daemon's answer: `error` empty means success.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginResponse {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl PluginResponse {
    /// Success.
    pub fn ok() -> Self {
        Self::default()
    }

    /// Failure with a reason.
    pub fn err(reason: impl Into<String>) -> Self {
        Self { error: reason.into() }
    }

    /// `Ok(())`, or the reason.
    pub fn into_result(self) -> Result<(), String> {
        if self.error.is_empty() {
            Ok(())
        } else {
            Err(self.error)
        }
    }
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("daemon unreachable at {path}: {source}")]
    Unreachable { path: String, source: socket::ConnectError },
    #[error("talking to the daemon: {0}")]
    Wire(#[from] WireError),
    #[error("bad message: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request to the daemon at `path` and waits (at most `timeout` per step) for
/// its answer. Blocking: the plugin is a one-shot process.
pub fn call(path: &Path, req: &PluginRequest, timeout: Duration) -> Result<PluginResponse, ApiError> {
    use nix::sys::socket::{setsockopt, sockopt};
    let fd = socket::connect(path, false)
        .map_err(|source| ApiError::Unreachable { path: path.display().to_string(), source })?;
    let t = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
    setsockopt(&fd, sockopt::ReceiveTimeout, &t).map_err(WireError::Io)?;
    setsockopt(&fd, sockopt::SendTimeout, &t).map_err(WireError::Io)?;
    send_datagram(fd.as_raw_fd(), &serde_json::to_vec(req)?, &[])?;
    let reply = recv_datagram(fd.as_raw_fd())?;
    Ok(serde_json::from_slice(&reply.bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_by_command() {
        let req = PluginRequest::Del { container_id: "c1".into(), uid: None };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json, serde_json::json!({"command": "del", "container_id": "c1", "uid": null}));
        assert_eq!(serde_json::from_value::<PluginRequest>(json).unwrap(), req);
    }

    #[test]
    fn a_success_response_is_an_empty_object() {
        assert_eq!(serde_json::to_string(&PluginResponse::ok()).unwrap(), "{}");
        assert_eq!(serde_json::from_str::<PluginResponse>("{}").unwrap().into_result(), Ok(()));
    }
}
