//! `ztunnel cni plugin` (or the binary installed as `ztunnel-cni` in the runtime's CNI
//! directory): a chained CNI plugin as the CNI spec defines it. The container runtime runs
//! it once per sandbox with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS` (Kubernetes puts `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` there) and
//! `CNI_PATH` in the environment and the network config JSON on stdin. It tells the
//! `ztunnel cni` daemon about the pod and waits for its answer, so an ambient pod is
//! enrolled before ADD returns, i.e. before its containers start.
//!
//! - ADD passes `prevResult` through unchanged (a chained plugin adds no interface); if the
//!   daemon cannot be reached or cannot enroll a pod that is in the mesh, ADD fails, as
//!   istio-cni's does, and the runtime retries: the pod never runs unprotected.
//! - DEL always succeeds for a pod the daemon does not know, and when the daemon is down
//!   (a restarted daemon forgets pods whose netns is gone).
//! - CHECK fails unless the daemon knows the pod (and has it enrolled if it should be).
//! - VERSION lists the supported spec versions.
//!
//! Errors are the spec's error JSON on stdout and a non-zero exit; nothing here panics
//! (and a panic would still be turned into an error result).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::api::{self, ApiError, PluginRequest};
use super::records::PodRecord;

/// The name the binary answers to as a plugin (the `type` in the network config).
pub const PLUGIN_NAME: &str = "ztunnel-cni";
/// Spec versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long the plugin waits for the daemon's answer.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// Error codes: the spec's well-known ones, and ours from 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The daemon refused: the pod could not be enrolled, or is unknown (CHECK).
    pub const ENROLLMENT: u32 = 100;
    /// The plugin itself failed unexpectedly.
    pub const INTERNAL: u32 = 101;
}

/// A failed command, as the spec's error result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg} ({details})")]
pub struct CniFailure {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniFailure {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }
}

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// The parts of the network config the plugin reads (the rest is ignored, as chained
/// plugins must tolerate other plugins' keys).
#[derive(Debug)]
struct NetConf {
    cni_version: String,
    prev_result: Option<Value>,
    daemon_socket: PathBuf,
}

/// Runs one command from its environment (`env`) and stdin. Pure apart from the daemon call.
pub fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    // The version to report errors in: the config's, when it can be read.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_string());
    match command(env, stdin) {
        Ok(stdout) => Outcome { stdout, exit_code: 0 },
        Err(f) => Outcome { stdout: error_json(&version, &f), exit_code: 1 },
    }
}

/// The spec's error result.
pub fn error_json(version: &str, f: &CniFailure) -> String {
    json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details}).to_string()
}

fn command(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<String, CniFailure> {
    let cmd =
        env("CNI_COMMAND").ok_or_else(|| CniFailure::new(code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set", ""))?;
    match cmd.as_str() {
        "VERSION" => Ok(version(stdin)),
        "ADD" => add(env, &parse_conf(stdin)?),
        "DEL" => del(env, &parse_conf(stdin)?),
        "CHECK" => check(env, &parse_conf(stdin)?),
        other => Err(CniFailure::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "supported: ADD, DEL, CHECK, VERSION",
        )),
    }
}

fn version(stdin: &[u8]) -> String {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_string());
    json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniFailure> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniFailure::new(code::DECODE, "cannot decode the network config", e.to_string()))?;
    let Some(obj) = v.as_object() else {
        return Err(CniFailure::new(code::INVALID_CONFIG, "the network config is not a JSON object", ""));
    };
    let cni_version = match obj.get("cniVersion") {
        Some(Value::String(s)) if SUPPORTED_VERSIONS.contains(&s.as_str()) => s.clone(),
        Some(Value::String(s)) => {
            return Err(CniFailure::new(
                code::INCOMPATIBLE_VERSION,
                format!("CNI version {s:?} is not supported"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ))
        }
        Some(_) => return Err(CniFailure::new(code::INVALID_CONFIG, "cniVersion is not a string", "")),
        None => return Err(CniFailure::new(code::INVALID_CONFIG, "cniVersion is missing", "")),
    };
    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => return Err(CniFailure::new(code::INVALID_CONFIG, "prevResult is not an object", "")),
    };
    let daemon_socket = match obj.get("daemonSocket") {
        None | Some(Value::Null) => PathBuf::from(super::DEFAULT_PLUGIN_SOCKET),
        Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
        Some(_) => return Err(CniFailure::new(code::INVALID_CONFIG, "daemonSocket is not a non-empty string", "")),
    };
    Ok(NetConf { cni_version, prev_result, daemon_socket })
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn cni_args(env: &dyn Fn(&str) -> Option<String>) -> Result<BTreeMap<String, String>, CniFailure> {
    let mut out = BTreeMap::new();
    for pair in env("CNI_ARGS").unwrap_or_default().split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniFailure::new(code::INVALID_ENVIRONMENT, "CNI_ARGS is malformed", format!("{pair:?} is not KEY=VALUE"))
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn required(env: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<String, CniFailure> {
    env(key)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniFailure::new(code::INVALID_ENVIRONMENT, format!("{key} is not set"), ""))
}

/// The pod uid: Kubernetes' own, or one derived from the sandbox id (stable, so DEL and
/// CHECK find the same pod).
fn pod_uid(args: &BTreeMap<String, String>, container_id: &str) -> String {
    match args.get("K8S_POD_UID").filter(|u| !u.is_empty()) {
        Some(uid) => uid.clone(),
        None => {
            let clean: String =
                container_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(64).collect();
            format!("ctr-{clean}")
        }
    }
}

fn ask(conf: &NetConf, req: &PluginRequest) -> Result<Result<(), String>, ApiError> {
    api::call(&conf.daemon_socket, req, DAEMON_TIMEOUT).map(|r| r.into_result())
}

fn unreachable(conf: &NetConf, e: &ApiError) -> CniFailure {
    CniFailure::new(
        code::TRY_AGAIN_LATER,
        format!("the ztunnel cni daemon did not answer on {}", conf.daemon_socket.display()),
        e.to_string(),
    )
}

fn add(env: &dyn Fn(&str) -> Option<String>, conf: &NetConf) -> Result<String, CniFailure> {
    let container_id = required(env, "CNI_CONTAINERID")?;
    let netns = required(env, "CNI_NETNS")?;
    if !Path::new(&netns).exists() {
        return Err(CniFailure::new(code::INVALID_ENVIRONMENT, "CNI_NETNS does not exist", netns));
    }
    let args = cni_args(env)?;
    let result = match &conf.prev_result {
        Some(prev) => {
            let mut prev = prev.clone();
            if let Some(obj) = prev.as_object_mut() {
                obj.entry("cniVersion").or_insert_with(|| Value::String(conf.cni_version.clone()));
            }
            prev.to_string()
        }
        None => json!({"cniVersion": conf.cni_version}).to_string(),
    };
    let (Some(name), Some(namespace)) = (args.get("K8S_POD_NAME"), args.get("K8S_POD_NAMESPACE")) else {
        // Not a Kubernetes pod: the control plane cannot know it, so it is never in the mesh.
        eprintln!(
            "{PLUGIN_NAME}: no K8S_POD_NAME/K8S_POD_NAMESPACE in CNI_ARGS; not a Kubernetes pod, passing through"
        );
        return Ok(result);
    };
    let pod = PodRecord {
        uid: pod_uid(&args, &container_id),
        name: name.clone(),
        namespace: namespace.clone(),
        netns: PathBuf::from(netns),
        container_id,
    };
    match ask(conf, &PluginRequest::Add { pod }) {
        Ok(Ok(())) => Ok(result),
        Ok(Err(why)) => Err(CniFailure::new(code::ENROLLMENT, "ambient enrollment failed", why)),
        Err(e) => Err(unreachable(conf, &e)),
    }
}

fn del(env: &dyn Fn(&str) -> Option<String>, conf: &NetConf) -> Result<String, CniFailure> {
    let container_id = required(env, "CNI_CONTAINERID")?;
    let args = cni_args(env)?;
    let uid = args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned();
    match ask(conf, &PluginRequest::Del { container_id, uid }) {
        Ok(Ok(())) => Ok(String::new()),
        Ok(Err(why)) => Err(CniFailure::new(code::ENROLLMENT, "releasing the pod failed", why)),
        // Nobody to tell: a restarted daemon forgets pods whose netns is gone, and the node
        // agent releases them at the snapshot it then receives.
        Err(ApiError::Unreachable { .. }) => Ok(String::new()),
        Err(e) => Err(unreachable(conf, &e)),
    }
}

fn check(env: &dyn Fn(&str) -> Option<String>, conf: &NetConf) -> Result<String, CniFailure> {
    let container_id = required(env, "CNI_CONTAINERID")?;
    let args = cni_args(env)?;
    let uid = args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned();
    match ask(conf, &PluginRequest::Check { container_id, uid }) {
        Ok(Ok(())) => Ok(String::new()),
        Ok(Err(why)) => Err(CniFailure::new(code::ENROLLMENT, "the pod is not as expected", why)),
        Err(e) => Err(unreachable(conf, &e)),
    }
}

/// Whether this process was started under the plugin's name (as a runtime runs it).
pub fn invoked_as_plugin() -> bool {
    std::env::args_os().next().and_then(|a| Path::new(&a).file_name().map(|n| n == PLUGIN_NAME)).unwrap_or(false)
}

/// The plugin process: reads stdin and the environment, prints the result or error, exits.
pub fn main_process() -> ! {
    use std::io::{Read, Write};
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let outcome = match read {
        Err(e) => Outcome {
            stdout: error_json(
                SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
                &CniFailure::new(code::DECODE, "cannot read stdin", e.to_string()),
            ),
            exit_code: 1,
        },
        Ok(_) => std::panic::catch_unwind(|| run(&|k| std::env::var(k).ok(), &stdin)).unwrap_or_else(|_| Outcome {
            stdout: error_json(
                SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
                &CniFailure::new(code::INTERNAL, "internal error in the plugin", "it panicked; see stderr"),
            ),
            exit_code: 1,
        }),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    fn error_of(out: &Outcome) -> Value {
        assert_eq!(out.exit_code, 1, "{}", out.stdout);
        serde_json::from_str(&out.stdout).unwrap()
    }

    #[test]
    fn version_lists_the_supported_versions_in_the_asked_version() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(out.exit_code, 0);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }

    #[test]
    fn a_config_that_is_not_json_is_a_decode_error() {
        let e = error_of(&run(&env(&[("CNI_COMMAND", "ADD")]), b"{not json"));
        assert_eq!(e["code"], code::DECODE);
        assert_eq!(e["msg"], "cannot decode the network config");
    }

    #[test]
    fn an_unsupported_cni_version_is_an_incompatible_version_error() {
        let e = error_of(&run(&env(&[("CNI_COMMAND", "ADD")]), br#"{"cniVersion":"9.9.9"}"#));
        assert_eq!(e["code"], code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn add_without_cni_netns_is_an_environment_error() {
        let e = error_of(&run(
            &env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1")]),
            br#"{"cniVersion":"1.0.0","name":"n"}"#,
        ));
        assert_eq!(e["code"], code::INVALID_ENVIRONMENT);
        assert_eq!(e["msg"], "CNI_NETNS is not set");
        assert_eq!(e["cniVersion"], "1.0.0");
    }

    #[test]
    fn an_unknown_command_is_an_environment_error() {
        let e = error_of(&run(&env(&[("CNI_COMMAND", "FROB")]), br#"{"cniVersion":"1.0.0"}"#));
        assert_eq!(e["code"], code::INVALID_ENVIRONMENT);
    }

    #[test]
    fn malformed_cni_args_are_an_environment_error() {
        let e = error_of(&run(
            &env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1"), ("CNI_ARGS", "K8S_POD_NAME")]),
            br#"{"cniVersion":"1.0.0"}"#,
        ));
        assert_eq!(e["code"], code::INVALID_ENVIRONMENT);
        assert_eq!(e["msg"], "CNI_ARGS is malformed");
    }

    #[test]
    fn add_for_a_non_kubernetes_container_passes_prev_result_through_without_the_daemon() {
        let conf = br#"{"cniVersion":"1.0.0","daemonSocket":"/nonexistent/sock","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.5/24"}]}}"#;
        let out =
            run(&env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/proc/self/ns/net")]), conf);
        assert_eq!(out.exit_code, 0, "{}", out.stdout);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v, json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.5/24"}]}));
    }

    #[test]
    fn a_uid_derived_from_the_container_id_keeps_only_safe_characters() {
        assert_eq!(pod_uid(&BTreeMap::new(), "ab/c..d-9"), "ctr-abcd-9");
    }
}
