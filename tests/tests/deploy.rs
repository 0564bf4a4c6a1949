//! The Kubernetes manifests in `deploy/` against the real binary: every flag they pass is
//! one `ztunnel node --help` lists, and the DaemonSet declares Istio's ports, probe,
//! mounts and privileges. The Helm templates are checked to carry the same flags as the
//! plain manifest rendered from them.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_yaml_ng::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    workspace().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every non-empty document of a multi-document YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn plain_manifest() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| documents(&deploy("ztunnel-node.yaml")))
}

fn one_of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}, found {}", found.len());
    found[0]
}

fn daemonset() -> &'static Value {
    one_of_kind(plain_manifest(), "DaemonSet")
}

/// The container running `ztunnel node`.
fn node_container(pod_spec: &Value) -> &Value {
    let containers = pod_spec["containers"].as_sequence().expect("containers");
    let found: Vec<&Value> =
        containers.iter().filter(|c| args(c).first().map(String::as_str) == Some("node")).collect();
    assert_eq!(found.len(), 1, "exactly one container runs `ztunnel node`");
    found[0]
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_sequence()
        .map(|s| s.iter().map(|a| a.as_str().expect("args are strings").to_string()).collect())
        .unwrap_or_default()
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_sequence().map(|s| s.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// `--name` of every flag argument (`--name=value` or `--name`).
fn flag_names(args: &[String]) -> BTreeSet<String> {
    args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or(a).to_string()).collect()
}

/// The value of `--name=value` (each checked flag is given once).
fn flag_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(prefix.as_str()))
}

/// `--flag` tokens in a template's text (after `- ` or inside a quoted arg).
fn template_flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let item = line.trim_start();
        let Some(item) = item.strip_prefix("- ") else { continue };
        let item = item.trim_start_matches('"');
        if let Some(rest) = item.strip_prefix("--") {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if !name.is_empty() {
                out.insert(format!("--{name}"));
            }
        }
    }
    out
}

fn ztunnel_binary() -> &'static Path {
    mesh_tests::agent_process::ztunnel_binary()
}

/// Flags `ztunnel node --help` lists.
fn node_help_flags() -> &'static BTreeSet<String> {
    static FLAGS: OnceLock<BTreeSet<String>> = OnceLock::new();
    FLAGS.get_or_init(|| {
        let out =
            Command::new(ztunnel_binary()).args(["node", "--help"]).output().expect("running ztunnel node --help");
        assert!(out.status.success(), "ztunnel node --help failed: {}", String::from_utf8_lossy(&out.stderr));
        let help = String::from_utf8(out.stdout).expect("utf-8 help");
        let flags: BTreeSet<String> = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
            .filter(|t| t.starts_with("--") && t.len() > 2)
            .map(|t| t.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).to_string())
            .collect();
        assert!(flags.contains("--pin-dir") && flags.contains("--help"), "unexpected help output:\n{help}");
        flags
    })
}

fn assert_flags_accepted(flags: &BTreeSet<String>, origin: &str) {
    let help = node_help_flags();
    let unknown: Vec<&String> = flags.iter().filter(|f| !help.contains(*f)).collect();
    assert!(unknown.is_empty(), "{origin} uses flags `ztunnel node` does not accept: {unknown:?} (accepted: {help:?})");
}

#[test]
fn plain_manifest_holds_the_expected_objects() {
    let docs = plain_manifest();
    let mut kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]);
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let ns = d["metadata"]["namespace"].as_str();
        if kind.starts_with("Cluster") {
            assert_eq!(ns, None, "{kind} is cluster-scoped");
        } else {
            assert_eq!(ns, Some("istio-system"), "{kind} belongs in istio-system");
        }
    }
}

#[test]
fn daemonset_args_are_flags_the_binary_accepts() {
    let c = node_container(&daemonset()["spec"]["template"]["spec"]);
    let args = args(c);
    assert_eq!(args.first().map(String::as_str), Some("node"), "runs the `node` subcommand");
    assert!(!args.iter().any(|a| a == "--uninstall"), "the DaemonSet must never uninstall capture");
    let flags = flag_names(&args);
    for required in
        ["--enrollment-socket", "--pin-dir", "--state-dir", "--cgroup", "--metrics-addr", "--readiness-addr"]
    {
        assert!(flags.contains(required), "DaemonSet passes {required}");
    }
    assert_flags_accepted(&flags, "deploy/ztunnel-node.yaml");
}

#[test]
fn daemonset_ports_and_readiness_match_istio() {
    let spec = &daemonset()["spec"]["template"]["spec"];
    let c = node_container(spec);
    let ports: Vec<(u64, &str)> = c["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .map(|p| (p["containerPort"].as_u64().expect("containerPort"), p["name"].as_str().unwrap_or("")))
        .collect();
    for port in [15008, 15020, 15021] {
        assert!(ports.iter().any(|(p, _)| *p == port), "port {port} declared: {ports:?}");
    }
    assert!(ports.contains(&(15020, "ztunnel-stats")), "15020 is named ztunnel-stats like Istio's: {ports:?}");

    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"].as_str(), Some("/healthz/ready"));
    let port = match &probe["port"] {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => ports.iter().find(|(_, n)| n == name).map(|(p, _)| *p),
        other => panic!("probe port {other:?}"),
    };
    assert_eq!(port, Some(15021), "readiness probe on 15021");

    // The listeners the agent opens are the ones declared.
    let args = args(c);
    for (flag, port) in [("--metrics-addr", 15020), ("--readiness-addr", 15021)] {
        let addr: std::net::SocketAddr =
            flag_value(&args, flag).unwrap_or_else(|| panic!("{flag} given")).parse().expect("socket address");
        assert_eq!(addr.port(), port, "{flag}");
        assert!(addr.ip().is_unspecified(), "{flag} listens on every address (kubelet probes the pod IP)");
    }
    let admin: std::net::SocketAddr =
        flag_value(&args, "--admin-addr").expect("--admin-addr").parse().expect("admin addr");
    assert!(admin.ip().is_loopback() && admin.port() == 15000, "admin on localhost:15000");
    assert_eq!(spec["hostNetwork"].as_bool(), Some(false));
    assert_ne!(spec["hostPID"].as_bool(), Some(true));
}

#[test]
fn daemonset_mounts_and_privileges() {
    let spec = &daemonset()["spec"]["template"]["spec"];
    let c = node_container(spec);
    let mounts = c["volumeMounts"].as_sequence().expect("volumeMounts");
    let volumes = spec["volumes"].as_sequence().expect("volumes");
    let host_path_of = |mount_path: &str| -> (&Value, &Value) {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(mount_path))
            .unwrap_or_else(|| panic!("mount at {mount_path}"));
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap_or_else(|| panic!("volume {:?}", m["name"]));
        (m, &v["hostPath"])
    };

    let (bpf, bpf_host) = host_path_of("/sys/fs/bpf");
    assert_eq!(bpf["mountPropagation"].as_str(), Some("Bidirectional"), "pins must reach the host bpffs");
    assert_eq!(bpf_host["path"].as_str(), Some("/sys/fs/bpf"));
    assert_eq!(bpf_host["type"].as_str(), Some("DirectoryOrCreate"));

    let args = args(c);
    let cgroup = flag_value(&args, "--cgroup").expect("--cgroup given: the container's own cgroup is namespaced");
    let (cg, cg_host) = host_path_of(cgroup);
    assert_eq!(cg_host["path"].as_str(), Some("/sys/fs/cgroup"), "--cgroup is the host's cgroup2 root");
    assert_eq!(cg["readOnly"].as_bool(), Some(true));

    let (_, run_host) = host_path_of("/var/run/ztunnel");
    assert_eq!(run_host["path"].as_str(), Some("/var/run/ztunnel"), "the CNI plugin finds the socket on the host");
    for (flag, under) in [
        ("--enrollment-socket", "/var/run/ztunnel/"),
        ("--state-dir", "/var/run/ztunnel/"),
        ("--ca-state-dir", "/var/run/ztunnel/"),
        ("--pin-dir", "/sys/fs/bpf/"),
    ] {
        let v = flag_value(&args, flag).unwrap_or_else(|| panic!("{flag} given"));
        assert!(v.starts_with(under), "{flag}={v} lives on the host mount {under}");
    }
    assert_eq!(flag_value(&args, "--enrollment-socket"), Some("/var/run/ztunnel/ztunnel.sock"), "Istio's socket path");

    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(true), "Bidirectional propagation needs privileged");
    let caps = strs(&sc["capabilities"]["add"]);
    for cap in ["NET_ADMIN", "SYS_ADMIN", "BPF", "SYS_RESOURCE", "NET_RAW"] {
        assert!(caps.contains(&cap), "capability {cap} in {caps:?}");
    }

    let env: Vec<&str> = c["env"].as_sequence().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    for name in ["TRUST_DOMAIN", "LOG_FORMAT"] {
        assert!(env.contains(&name), "env {name} in {env:?}");
    }
    assert!(c["lifecycle"]["preStop"].is_null(), "no preStop: capture survives restarts");
}

#[test]
fn daemonset_labels_tolerations_and_rbac() {
    let ds = daemonset();
    let tmpl = &ds["spec"]["template"];
    assert_eq!(tmpl["metadata"]["labels"]["app"].as_str(), Some("ztunnel"));
    assert_eq!(ds["spec"]["selector"]["matchLabels"]["app"].as_str(), Some("ztunnel"));
    assert_eq!(tmpl["metadata"]["annotations"]["sidecar.istio.io/inject"].as_str(), Some("false"));
    assert_eq!(tmpl["metadata"]["labels"]["istio.io/dataplane-mode"].as_str(), Some("none"), "never capture itself");
    let tolerations = tmpl["spec"]["tolerations"].as_sequence().expect("tolerations");
    assert!(!tolerations.is_empty() && tolerations.iter().all(|t| t["operator"].as_str() == Some("Exists")));
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations.iter().any(|t| t["effect"].as_str() == Some(effect) && t["key"].is_null()),
            "tolerates every {effect} taint"
        );
    }

    let docs = plain_manifest();
    let sa = one_of_kind(docs, "ServiceAccount");
    let sa_name = sa["metadata"]["name"].as_str().expect("sa name");
    assert_eq!(tmpl["spec"]["serviceAccountName"].as_str(), Some(sa_name));
    let role = one_of_kind(docs, "ClusterRole");
    let binding = one_of_kind(docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subject = &binding["subjects"][0];
    assert_eq!(subject["kind"].as_str(), Some("ServiceAccount"));
    assert_eq!(subject["name"].as_str(), Some(sa_name));
    assert_eq!(subject["namespace"], sa["metadata"]["namespace"]);
    let rules = role["rules"].as_sequence().expect("rules");
    for resource in ["pods", "namespaces", "services"] {
        let rule = rules
            .iter()
            .find(|r| strs(&r["apiGroups"]).contains(&"") && strs(&r["resources"]).contains(&resource))
            .unwrap_or_else(|| panic!("a rule for {resource}"));
        let verbs = strs(&rule["verbs"]);
        for verb in ["get", "list", "watch"] {
            assert!(verbs.contains(&verb), "{verb} {resource}");
        }
        assert!(!verbs.iter().any(|v| ["create", "update", "patch", "delete", "*"].contains(v)), "read-only");
    }
}

#[test]
fn helm_templates_carry_the_plain_manifest_flags() {
    let plain = flag_names(&args(node_container(&daemonset()["spec"]["template"]["spec"])));
    let chart = deploy("helm/ztunnel");
    for f in ["Chart.yaml", "values.yaml", "templates/_helpers.tpl", "templates/NOTES.txt"] {
        assert!(chart.join(f).is_file(), "chart has {f}");
    }
    let values: Value = serde_yaml_ng::from_str(&read(&chart.join("values.yaml"))).expect("values.yaml parses");
    assert_eq!(values["uninstallJob"]["enabled"].as_bool(), Some(false), "uninstall is opt-in");

    let ds_template = read(&chart.join("templates/daemonset.yaml"));
    let ds_flags = template_flags(&ds_template);
    let missing: Vec<&String> = plain.difference(&ds_flags).collect();
    assert!(missing.is_empty(), "templates/daemonset.yaml lacks flags of ztunnel-node.yaml: {missing:?}");
    assert_flags_accepted(&ds_flags, "templates/daemonset.yaml");

    let job_template = read(&chart.join("templates/uninstall-job.yaml"));
    let job_flags = template_flags(&job_template);
    assert!(job_flags.contains("--uninstall"), "uninstall Job runs --uninstall");
    let missing: Vec<&String> = ds_flags.difference(&job_flags).collect();
    assert!(missing.is_empty(), "uninstall Job lacks DaemonSet flags {missing:?}");
    assert_flags_accepted(&job_flags, "templates/uninstall-job.yaml");
    assert!(job_template.contains("uninstallJob.enabled"), "Job guarded by uninstallJob.enabled");
    assert!(!ds_flags.contains("--uninstall"), "the DaemonSet template never uninstalls");
}

#[test]
fn plain_uninstall_job_mirrors_the_daemonset() {
    let docs = documents(&deploy("uninstall/ztunnel-uninstall-job.yaml"));
    let job = one_of_kind(&docs, "Job");
    let spec = &job["spec"]["template"]["spec"];
    let c = node_container(spec);
    let job_args = args(c);
    let ds_c = node_container(&daemonset()["spec"]["template"]["spec"]);
    let ds_args = args(ds_c);
    let mut expected = ds_args.clone();
    expected.insert(1, "--uninstall".into());
    assert_eq!(job_args, expected, "same flags and values as the DaemonSet, plus --uninstall");
    assert_flags_accepted(&flag_names(&job_args), "deploy/uninstall/ztunnel-uninstall-job.yaml");
    assert_eq!(c["volumeMounts"], ds_c["volumeMounts"], "same mounts");
    assert_eq!(spec["volumes"], daemonset()["spec"]["template"]["spec"]["volumes"], "same host paths");
    assert_eq!(c["securityContext"], ds_c["securityContext"]);
    assert_eq!(spec["restartPolicy"].as_str(), Some("Never"));
}
