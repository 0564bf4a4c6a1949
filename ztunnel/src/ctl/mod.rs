//! `ztunnel ctl`: the operator's view of a running node agent, shaped like
//! `istioctl ztunnel-config`. It reads the agent's admin endpoint (`/config_dump`,
//! `/logging`) and prints one kind of state as a table, or as JSON / YAML for scripts.
//! An agent that cannot be reached, or whose dump is of another version than this binary
//! reads, is a clear error, never an empty table.
mod table;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// The `/config_dump` layout this binary reads (the agent writes it as `dumpVersion`).
/// Version 2 added `connections`, `connectionsOverflow`, `ebpfLinks` and the certificates'
/// `chain`: a version 1 agent would show none, which must not pass for "there are none".
pub const DUMP_VERSION: u64 = 2;

/// What to show (each is a `ztunnel ctl` subcommand).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Resource {
    /// Workloads the agent knows (from local config or xDS).
    Workloads,
    /// Services with their VIPs, ports and waypoint.
    Services,
    /// Authorization policies in force, and the rejected ones.
    Policies,
    /// Certificates per identity: state, serial, validity, trust chain.
    Certificates,
    /// Pods enrolled on this node.
    Pods,
    /// The outbound HBONE connection pool.
    Pool,
    /// eBPF state: program counters (captured / bypassed / errors), attached links, enrolled pods.
    Ebpf,
    /// The xDS client's state.
    Xds,
    /// Proxied connections open now (inbound and outbound).
    Connections,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Why `ztunnel ctl` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach the agent's admin endpoint at {addr}: {source} (is `ztunnel node` running there? \
         use --admin <addr>, default 127.0.0.1:15000)"
    )]
    Unreachable { addr: SocketAddr, source: std::io::Error },
    #[error("the agent at {addr} answered {status} for {path}: {body}")]
    Status { addr: SocketAddr, path: String, status: u16, body: String },
    #[error("the agent at {0} sent a config dump that is not JSON: {1}")]
    NotJson(SocketAddr, String),
    #[error(
        "the agent at {addr} writes config dump version {found}, this ztunnel ctl reads version {DUMP_VERSION}: \
         use the ctl of the agent's release"
    )]
    Version { addr: SocketAddr, found: String },
    #[error("cannot format the output: {0}")]
    Format(String),
}

/// One HTTP/1.0 request to the admin endpoint: the body of a 200 answer.
fn request(addr: SocketAddr, method: &str, path: &str) -> Result<String, CtlError> {
    let unreachable = |source| CtlError::Unreachable { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(unreachable)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(unreachable)?;
    // One write: the request arrives whole.
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    s.write_all(head.as_bytes()).map_err(unreachable)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if status != 200 {
        return Err(CtlError::Status { addr, path: path.into(), status, body: body.trim().into() });
    }
    Ok(body.to_string())
}

/// The agent's config dump, checked to be of the version this binary reads.
pub fn fetch_dump(addr: SocketAddr) -> Result<Value, CtlError> {
    let body = request(addr, "GET", "/config_dump")?;
    let dump: Value = serde_json::from_str(&body).map_err(|e| CtlError::NotJson(addr, e.to_string()))?;
    match dump.get("dumpVersion").and_then(Value::as_u64) {
        Some(DUMP_VERSION) => Ok(dump),
        other => Err(CtlError::Version { addr, found: other.map(|v| v.to_string()).unwrap_or_else(|| "none".into()) }),
    }
}

/// The part of the dump a resource is.
pub fn select(dump: &Value, r: Resource) -> Value {
    let key = match r {
        Resource::Workloads => "workloads",
        Resource::Services => "services",
        Resource::Policies => {
            return serde_json::json!({"policies": dump["policies"], "invalidPolicies": dump["invalidPolicies"]})
        }
        Resource::Certificates => "certificates",
        Resource::Pods => "enrolledPods",
        Resource::Pool => "hbonePool",
        Resource::Ebpf => {
            return serde_json::json!({
                "counters": dump["ebpfCounters"], "links": dump["ebpfLinks"], "enrolledPods": dump["enrolledPods"],
            })
        }
        Resource::Xds => "xds",
        Resource::Connections => {
            return serde_json::json!({"connections": dump["connections"], "overflow": dump["connectionsOverflow"]})
        }
    };
    dump.get(key).cloned().unwrap_or(Value::Null)
}

/// Renders `value` (the selection for `r`) in `out`.
pub fn render(value: &Value, r: Resource, out: Output) -> Result<String, CtlError> {
    match out {
        Output::Json => {
            serde_json::to_string_pretty(value).map(|s| s + "\n").map_err(|e| CtlError::Format(e.to_string()))
        }
        Output::Yaml => serde_yaml_ng::to_string(value).map_err(|e| CtlError::Format(e.to_string())),
        Output::Table => Ok(table::render(value, r)),
    }
}

/// Renders the agent's `/logging` answer (see [`log_level`]) in `out`: the text as the agent
/// wrote it, or `{"level": ..., "note": ...}` (the note being whatever the agent added
/// after the filter, e.g. that it only records the level) for scripts.
pub fn render_log_level(answer: &str, out: Output) -> Result<String, CtlError> {
    let mut lines = answer.lines();
    let level = lines.next().unwrap_or("").trim();
    let note = lines.map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    let mut v = serde_json::json!({ "level": level });
    if !note.is_empty() {
        v["note"] = Value::String(note);
    }
    match out {
        Output::Table => Ok(answer.to_string()),
        Output::Json => serde_json::to_string_pretty(&v).map(|s| s + "\n").map_err(|e| CtlError::Format(e.to_string())),
        Output::Yaml => serde_yaml_ng::to_string(&v).map_err(|e| CtlError::Format(e.to_string())),
    }
}

/// `ztunnel ctl log-level [LEVEL]`: the agent's log filter, set first when `level` is given.
pub fn log_level(addr: SocketAddr, level: Option<&str>) -> Result<String, CtlError> {
    match level {
        Some(l) => {
            let q: String = l
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"=_-.,:".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            request(addr, "POST", &format!("/logging?level={q}"))
        }
        None => request(addr, "GET", "/logging"),
    }
}

#[cfg(test)]
mod tests;
