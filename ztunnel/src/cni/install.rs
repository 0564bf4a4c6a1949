//! Installing the chained CNI plugin on the node, as istio-cni's install container does:
//! the `ztunnel` binary copied into the runtime's plugin directory as `ztunnel-cni`, and an
//! entry `{"type": "ztunnel-cni", "daemonSocket": ...}` appended to the node's network
//! configuration list, so the runtime calls the plugin for every new pod sandbox after the
//! main network plugin. Both writes are atomic (temporary file + rename) and idempotent.
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::plugin::PLUGIN_NAME;

/// Where to install, from the CNI agent's flags.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The runtime's plugin binaries (`/opt/cni/bin` on the host).
    pub bin_dir: PathBuf,
    /// The runtime's network configurations (`/etc/cni/net.d` on the host).
    pub conf_dir: PathBuf,
    /// The conflist to chain into; the first `*.conflist` / `*.conf` by name when `None`.
    pub conf_name: Option<String>,
    /// The daemon socket written into the plugin's config.
    pub daemon_socket: PathBuf,
}

/// Why the plugin could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("no network configuration (*.conflist or *.conf) in {0}: the main CNI plugin is not installed yet")]
    NoConfig(PathBuf),
    #[error("network configuration {path} is not usable: {reason}")]
    BadConfig { path: PathBuf, reason: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// the runtime never sees a half-written plugin or config.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming onto", path))
}

/// The conflist to chain into.
fn find_config(cfg: &InstallConfig) -> Result<PathBuf, InstallError> {
    if let Some(name) = &cfg.conf_name {
        return Ok(cfg.conf_dir.join(name));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&cfg.conf_dir)
        .map_err(io("reading", &cfg.conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("conflist" | "conf")))
        .filter(|p| !p.file_name().and_then(|n| n.to_str()).unwrap_or(".").starts_with('.'))
        .collect();
    found.sort();
    found.into_iter().next().ok_or_else(|| InstallError::NoConfig(cfg.conf_dir.clone()))
}

/// The config with our plugin appended to its chain (a single-plugin `.conf` becomes a
/// list); `None` when it is already there with the same socket.
pub fn chained(conf: &Value, daemon_socket: &Path) -> Result<Option<Value>, String> {
    let obj = conf.as_object().ok_or("not a JSON object")?;
    let mut list = if obj.contains_key("plugins") {
        conf.clone()
    } else {
        // A `.conf`: one plugin. Its name and version move to the list.
        let mut plugin = conf.clone();
        let p = plugin.as_object_mut().expect("checked");
        let name = p.remove("name").unwrap_or(json!("k8s-pod-network"));
        let version = p.get("cniVersion").cloned().unwrap_or(json!("1.0.0"));
        json!({ "cniVersion": version, "name": name, "plugins": [plugin] })
    };
    let plugins = list.get_mut("plugins").and_then(Value::as_array_mut).ok_or("`plugins` is not a list")?;
    let ours = json!({ "type": PLUGIN_NAME, "daemonSocket": daemon_socket });
    match plugins.iter().position(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_NAME)) {
        Some(i) if plugins[i] == ours => return Ok(None),
        Some(i) => plugins[i] = ours,
        None => plugins.push(ours),
    }
    Ok(Some(list))
}

/// Copies `binary` in as the plugin and chains it into the network configuration. Returns
/// the configuration file it wrote (or found already chained).
pub fn install(cfg: &InstallConfig, binary: &Path) -> Result<PathBuf, InstallError> {
    let bytes = std::fs::read(binary).map_err(io("reading", binary))?;
    std::fs::create_dir_all(&cfg.bin_dir).map_err(io("creating", &cfg.bin_dir))?;
    write_atomic(&cfg.bin_dir.join(PLUGIN_NAME), &bytes, 0o755)?;
    let path = find_config(cfg)?;
    let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
    let bad = |reason: String| InstallError::BadConfig { path: path.clone(), reason };
    let conf: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(list) = chained(&conf, &cfg.daemon_socket).map_err(|e| bad(e.to_string()))? {
        let out = serde_json::to_vec_pretty(&list).expect("JSON value serializes");
        // A `.conf` becomes a `.conflist` of the same name; the old file goes so the runtime
        // does not pick the unchained one.
        let target =
            if path.extension().is_some_and(|e| e == "conf") { path.with_extension("conflist") } else { path.clone() };
        write_atomic(&target, &out, 0o644)?;
        if target != path {
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
        }
        return Ok(target);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(tag: &str) -> (PathBuf, InstallConfig) {
        let root = std::env::temp_dir().join(format!("cni-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        let cfg = InstallConfig {
            bin_dir: root.join("bin"),
            conf_dir: root.join("net.d"),
            conf_name: None,
            daemon_socket: "/var/run/ztunnel/cni-plugin.sock".into(),
        };
        (root, cfg)
    }

    fn binary(root: &Path) -> PathBuf {
        let b = root.join("ztunnel");
        std::fs::write(&b, b"#!binary").unwrap();
        b
    }

    #[test]
    fn the_plugin_is_appended_to_the_first_conflist_once() {
        let (root, cfg) = dirs("append");
        let main = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}, {"type": "portmap"}]});
        std::fs::write(cfg.conf_dir.join("10-main.conflist"), main.to_string()).unwrap();
        std::fs::write(cfg.conf_dir.join("20-other.conflist"), main.to_string()).unwrap();
        let bin = binary(&root);
        let path = install(&cfg, &bin).unwrap();
        assert_eq!(path, cfg.conf_dir.join("10-main.conflist"));
        install(&cfg, &bin).unwrap();
        let got: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let types: Vec<&str> = got["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, vec!["bridge", "portmap", "ztunnel-cni"], "appended once, others kept");
        assert_eq!(got["plugins"][2]["daemonSocket"], "/var/run/ztunnel/cni-plugin.sock");
        let other: Value =
            serde_json::from_str(&std::fs::read_to_string(cfg.conf_dir.join("20-other.conflist")).unwrap()).unwrap();
        assert_eq!(other, main, "only the first configuration is chained");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_binary_is_installed_executable_under_the_plugin_name() {
        use std::os::unix::fs::PermissionsExt;
        let (root, cfg) = dirs("binary");
        std::fs::write(cfg.conf_dir.join("10-main.conflist"), r#"{"name":"k8s","plugins":[]}"#).unwrap();
        install(&cfg, &binary(&root)).unwrap();
        let installed = cfg.bin_dir.join(PLUGIN_NAME);
        assert_eq!(std::fs::read(&installed).unwrap(), b"#!binary");
        assert_eq!(std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777, 0o755);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_chained_conflist() {
        let (root, cfg) = dirs("conf");
        let conf = json!({"cniVersion": "0.4.0", "name": "k8s", "type": "bridge", "bridge": "cni0"});
        std::fs::write(cfg.conf_dir.join("10-bridge.conf"), conf.to_string()).unwrap();
        let path = install(&cfg, &binary(&root)).unwrap();
        assert_eq!(path, cfg.conf_dir.join("10-bridge.conflist"));
        assert!(!cfg.conf_dir.join("10-bridge.conf").exists(), "the unchained .conf is gone");
        let got: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!((got["name"].as_str(), got["cniVersion"].as_str()), (Some("k8s"), Some("0.4.0")));
        assert_eq!(got["plugins"][0]["bridge"], "cni0");
        assert_eq!(got["plugins"][1]["type"], "ztunnel-cni");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn no_network_configuration_is_a_clear_error() {
        let (root, cfg) = dirs("none");
        let err = install(&cfg, &binary(&root)).unwrap_err();
        assert!(matches!(err, InstallError::NoConfig(_)), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_malformed_configuration_is_refused_and_left_untouched() {
        let (root, cfg) = dirs("bad");
        std::fs::write(cfg.conf_dir.join("10-main.conflist"), "{not json").unwrap();
        let err = install(&cfg, &binary(&root)).unwrap_err();
        assert!(matches!(err, InstallError::BadConfig { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(cfg.conf_dir.join("10-main.conflist")).unwrap(), "{not json");
        std::fs::remove_dir_all(root).unwrap();
    }
}
