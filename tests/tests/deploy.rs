//! The Helm chart in `deploy/helm/ztunnel`, rendered and linted by a real `helm` (found as
//! `cargo xtask setup` installs it; missing helm fails these tests, never skips them), and
//! checked object by object: the node DaemonSet (node agent + CNI agent: env, mounts,
//! privileges, probe, scrape annotations), the builtin controller and its read-only RBAC,
//! the istiod mode, and the plain manifests rendered from the chart. Every flag the chart
//! passes must be one the real binary accepts, and the node agent is run on the mini-cluster
//! with exactly the chart's capabilities (it works) and with each one taken away (it fails).
#[path = "../../xtask/src/helm.rs"]
mod helm;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mesh_tests::agent_process::{cluster_args, ztunnel_binary, AgentProcess};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, workload_yaml};
use mesh_tests::Cluster;
use serde::Deserialize;
use serde_yaml_ng::Value;

const NAMESPACE: &str = "istio-system";
const RELEASE: &str = "ztunnel";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    workspace().join("deploy").join(rel)
}

fn chart() -> PathBuf {
    deploy("helm/ztunnel")
}

fn istiod_values() -> PathBuf {
    deploy("helm/values-istiod.yaml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every non-empty document of a multi-document YAML text.
fn documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("parsing {origin}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The helm `cargo xtask setup` provides; a clear failure when there is none.
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| match helm::find_helm(&workspace()) {
        Ok((path, _version)) => path,
        Err(e) => panic!("the chart tests need helm: {e}"),
    })
}

/// Runs helm; its stdout on success, else its stderr as the error.
fn try_helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm_bin().display()));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm prints UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn helm(args: &[&str]) -> String {
    try_helm(args).unwrap_or_else(|e| panic!("helm {}: {e}", args.join(" ")))
}

/// `helm template` of the chart as release `ztunnel` in istio-system, plus `extra` flags.
fn render(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec!["template", RELEASE, chart.to_str().expect("UTF-8 path"), "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    documents(&helm(&args), &format!("helm {}", args.join(" ")))
}

fn default_render() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| render(&[]))
}

fn istiod_render() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| render(&["-f", istiod_values().to_str().expect("UTF-8 path")]))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn one_of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}, found {}", found.len());
    found[0]
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    let mut kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    kinds.sort_unstable();
    kinds
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    let containers = pod_spec["containers"].as_sequence().expect("containers");
    containers.iter().find(|c| c["name"].as_str() == Some(name)).unwrap_or_else(|| {
        panic!("container {name} in {:?}", containers.iter().map(|c| &c["name"]).collect::<Vec<_>>())
    })
}

fn node_agent(docs: &[Value]) -> &Value {
    container(pod_spec(one_of_kind(docs, "DaemonSet")), "istio-proxy")
}

fn cni_agent(docs: &[Value]) -> &Value {
    container(pod_spec(one_of_kind(docs, "DaemonSet")), "cni")
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

/// A container's env: name → the entry (`value` or `valueFrom`).
fn env(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("env name").to_string(), e.clone()))
        .collect()
}

fn env_value<'a>(env: &'a BTreeMap<String, Value>, name: &str) -> &'a str {
    env.get(name).and_then(|e| e["value"].as_str()).unwrap_or_else(|| panic!("env {name} with a value in {env:?}"))
}

/// The mount whose path holds `path` (the deepest one) and its volume.
fn mount_of<'a>(pod_spec: &'a Value, container: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let mount = container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .filter(|m| {
            let at = m["mountPath"].as_str().expect("mountPath");
            path == at || path.starts_with(&format!("{}/", at.trim_end_matches('/')))
        })
        .max_by_key(|m| m["mountPath"].as_str().map(str::len))
        .unwrap_or_else(|| panic!("no mount holds {path}"));
    let volume = pod_spec["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("volume {:?}", mount["name"]));
    (mount, volume)
}

/// Flags `ztunnel <subcommand> --help` lists.
fn help_flags(subcommand: &str) -> BTreeSet<String> {
    let out =
        Command::new(ztunnel_binary()).args([subcommand, "--help"]).output().expect("running ztunnel <cmd> --help");
    assert!(out.status.success(), "ztunnel {subcommand} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8(out.stdout).expect("utf-8 help");
    let flags: BTreeSet<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|t| t.starts_with("--") && t.len() > 2)
        .map(|t| t.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).to_string())
        .collect();
    assert!(flags.contains("--help"), "unexpected help output:\n{help}");
    flags
}

fn assert_flags_accepted(container: &Value, origin: &str) {
    let args = args(container);
    let subcommand = args.first().unwrap_or_else(|| panic!("{origin} runs a subcommand"));
    let accepted = help_flags(subcommand);
    let unknown: Vec<String> = flag_names(&args).into_iter().filter(|f| !accepted.contains(f)).collect();
    assert!(
        unknown.is_empty(),
        "{origin} passes flags `ztunnel {subcommand}` does not accept: {unknown:?} (accepted: {accepted:?})"
    );
}

/// The capabilities a container adds, after dropping ALL.
fn added_capabilities(container: &Value) -> BTreeSet<String> {
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(strs(&caps["drop"]), ["ALL"], "{:?} drops every capability first", container["name"]);
    strs(&caps["add"]).into_iter().map(String::from).collect()
}

#[test]
fn helm_lint_passes_with_the_default_values() {
    let out = helm(&["lint", "--strict", chart().to_str().unwrap()]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn helm_lint_passes_with_the_istiod_values() {
    let out = helm(&["lint", "--strict", chart().to_str().unwrap(), "-f", istiod_values().to_str().unwrap()]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn an_unknown_control_plane_mode_is_refused() {
    let chart = chart();
    let err = try_helm(&["template", RELEASE, chart.to_str().unwrap(), "--set", "controlPlane.mode=pilot"])
        .expect_err("mode pilot must not render");
    assert!(err.contains("controlPlane.mode must be builtin or istiod"), "{err}");
}

#[test]
fn default_render_holds_the_node_and_controller_objects() {
    let docs = default_render();
    assert_eq!(
        kinds(docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            // The controller's config dir, the Prometheus config + rules, the dashboards.
            "ConfigMap",
            "ConfigMap",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ServiceAccount"
        ]
    );
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let ns = d["metadata"]["namespace"].as_str();
        if kind.starts_with("Cluster") {
            assert_eq!(ns, None, "{kind} is cluster-scoped");
        } else {
            assert_eq!(ns, Some(NAMESPACE), "{kind} belongs in the release namespace");
        }
    }
}

#[test]
fn daemonset_runs_the_node_agent_and_the_cni_agent() {
    let ds = one_of_kind(default_render(), "DaemonSet");
    let spec = pod_spec(ds);
    let names: Vec<&str> =
        spec["containers"].as_sequence().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["istio-proxy", "cni"], "node agent (Istio's container name) and CNI agent");
    assert_eq!(args(node_agent(default_render()))[0], "node");
    assert_eq!(args(cni_agent(default_render()))[0], "cni");
    assert!(!args(node_agent(default_render())).iter().any(|a| a == "--uninstall"), "the DaemonSet never uninstalls");
    assert!(node_agent(default_render())["lifecycle"]["preStop"].is_null(), "no preStop: capture survives restarts");

    assert_eq!(spec["hostNetwork"].as_bool(), Some(false));
    assert_eq!(spec["hostPID"].as_bool(), Some(false));
    assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(false), "no agent calls the API server");
    let sa = of_kind(default_render(), "ServiceAccount")
        .into_iter()
        .find(|s| s["metadata"]["name"] == spec["serviceAccountName"])
        .expect("the DaemonSet's ServiceAccount is rendered");
    assert_eq!(sa["metadata"]["name"].as_str(), Some("ztunnel"), "istiod trusts istio-system/ztunnel");

    let tmpl = &ds["spec"]["template"];
    assert_eq!(ds["spec"]["selector"]["matchLabels"]["app"].as_str(), Some("ztunnel"));
    assert_eq!(tmpl["metadata"]["labels"]["app"].as_str(), Some("ztunnel"));
    assert_eq!(tmpl["metadata"]["labels"]["istio.io/dataplane-mode"].as_str(), Some("none"), "never capture itself");
    assert_eq!(tmpl["metadata"]["annotations"]["sidecar.istio.io/inject"].as_str(), Some("false"));
    let tolerations = spec["tolerations"].as_sequence().expect("tolerations");
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations.iter().any(|t| t["effect"].as_str() == Some(effect) && t["key"].is_null()),
            "tolerates every {effect} taint"
        );
    }
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"].as_u64(), Some(0), "never two per node");
}

#[test]
fn every_flag_the_chart_passes_is_accepted_by_the_binary() {
    let docs = default_render();
    assert_flags_accepted(node_agent(docs), "the node agent container");
    assert_flags_accepted(cni_agent(docs), "the CNI agent container");
    let controller = container(pod_spec(one_of_kind(docs, "Deployment")), "controller");
    assert_flags_accepted(controller, "the controller container");
    let job = render(&["--set", "uninstallJob.enabled=true", "--set", "uninstallJob.nodes={node-a}"]);
    assert_flags_accepted(container(pod_spec(one_of_kind(&job, "Job")), "uninstall"), "the uninstall Job");
}

#[test]
fn both_agents_reach_the_builtin_controller_with_istio_env_names() {
    let docs = default_render();
    let spec = pod_spec(one_of_kind(docs, "DaemonSet"));
    let service = one_of_kind(docs, "Service");
    let expected = format!(
        "https://{}.{}.svc:15012",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    assert_eq!(expected, "https://ztunnel-controller.istio-system.svc:15012");
    for c in [node_agent(docs), cni_agent(docs)] {
        let name = c["name"].as_str().unwrap();
        let env = env(c);
        assert_eq!(env_value(&env, "XDS_ADDRESS"), expected, "{name}");
        assert_eq!(env_value(&env, "CLUSTER_ID"), "Kubernetes", "{name}");
        assert_eq!(env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"), "{name}");
        // The controller's serving certificate is issued for istiod's name.
        assert_eq!(env_value(&env, "ZTUNNEL_CONTROL_PLANE_SERVER_NAME"), "istiod.istio-system.svc", "{name}");

        // The root: root-cert.pem of the controller's CA Secret, never its key.
        let root = env_value(&env, "XDS_ROOT_CA");
        let (mount, volume) = mount_of(spec, c, root);
        assert_eq!(mount["readOnly"].as_bool(), Some(true));
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("cacerts"), "{name}");
        let items: Vec<&str> =
            volume["secret"]["items"].as_sequence().expect("items").iter().filter_map(|i| i["key"].as_str()).collect();
        assert_eq!(items, ["root-cert.pem"], "{name}: only the root certificate of the CA Secret");
        assert!(root.ends_with("/root-cert.pem"));

        // The token: projected, bound to the pod, audience istio-ca.
        let token = env_value(&env, "AUTH_TOKEN");
        let (_, volume) = mount_of(spec, c, token);
        let sources = volume["projected"]["sources"].as_sequence().expect("projected token");
        let sat =
            &sources.iter().find(|s| !s["serviceAccountToken"].is_null()).expect("a token")["serviceAccountToken"];
        assert_eq!(sat["audience"].as_str(), Some("istio-ca"), "{name}");
        assert!(token.ends_with(&format!("/{}", sat["path"].as_str().unwrap())), "{name}: {token}");
    }
    let env = env(node_agent(docs));
    assert_eq!(env_value(&env, "CA_ADDRESS"), expected, "the controller serves the CA on the xDS port");
    assert_eq!(env_value(&env, "CA_ROOT_CA"), env_value(&env, "XDS_ROOT_CA"));
    assert_eq!(env_value(&env, "TRUST_DOMAIN"), "cluster.local");
}

#[test]
fn node_agent_mounts_host_paths_and_holds_only_net_admin_and_sys_admin() {
    let docs = default_render();
    let spec = pod_spec(one_of_kind(docs, "DaemonSet"));
    let c = node_agent(docs);
    let args = args(c);

    let pin_dir = flag_value(&args, "--pin-dir").expect("--pin-dir");
    let (bpf, bpf_vol) = mount_of(spec, c, pin_dir);
    assert_eq!(bpf["mountPath"].as_str(), Some("/sys/fs/bpf"));
    assert_eq!(bpf_vol["hostPath"]["path"].as_str(), Some("/sys/fs/bpf"), "pins land on the host's bpffs");
    assert_eq!(bpf["mountPropagation"].as_str(), Some("HostToContainer"), "Bidirectional would need privileged");

    let cgroup = flag_value(&args, "--cgroup").expect("--cgroup: the container's own cgroup is namespaced");
    let (cg, cg_vol) = mount_of(spec, c, cgroup);
    assert_eq!(cg["mountPath"].as_str(), Some(cgroup), "--cgroup is the mount itself");
    assert_eq!(cg_vol["hostPath"]["path"].as_str(), Some("/sys/fs/cgroup"), "the host's cgroup2 root");
    assert_eq!(cg["readOnly"].as_bool(), Some(true));

    for flag in ["--inpod-uds", "--state-dir", "--handoff-socket"] {
        let path = flag_value(&args, flag).unwrap_or_else(|| panic!("{flag} given"));
        let (_, vol) = mount_of(spec, c, path);
        assert_eq!(vol["hostPath"]["path"].as_str(), Some("/var/run/ztunnel"), "{flag}={path} is on the host run dir");
    }
    assert_eq!(flag_value(&args, "--inpod-uds"), Some("/var/run/ztunnel/ztunnel.sock"), "Istio's ZDS socket");

    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["runAsUser"].as_u64(), Some(0));
    assert_eq!(added_capabilities(c), BTreeSet::from(["NET_ADMIN".to_string(), "SYS_ADMIN".to_string()]));
}

#[test]
fn cni_agent_shares_the_zds_socket_and_holds_no_capability() {
    let docs = default_render();
    let spec = pod_spec(one_of_kind(docs, "DaemonSet"));
    let (node, cni) = (node_agent(docs), cni_agent(docs));
    let (node_args, cni_args) = (args(node), args(cni));
    let socket = flag_value(&cni_args, "--inpod-uds").expect("--inpod-uds");
    assert_eq!(Some(socket), flag_value(&node_args, "--inpod-uds"), "the node agent dials the socket the CNI serves");
    assert_eq!(mount_of(spec, cni, socket).1, mount_of(spec, node, socket).1, "one run dir, shared");
    for flag in ["--plugin-socket", "--state-dir"] {
        let path = flag_value(&cni_args, flag).unwrap_or_else(|| panic!("{flag} given"));
        let (_, vol) = mount_of(spec, cni, path);
        assert_eq!(vol["hostPath"]["path"].as_str(), Some("/var/run/ztunnel"), "{flag}: the host's run dir");
    }

    // CNI_NETNS paths are host paths, re-opened later: same path inside, new mounts visible.
    let (netns, netns_vol) = mount_of(spec, cni, "/var/run/netns/cni-1234");
    assert_eq!(netns["mountPath"].as_str(), Some("/var/run/netns"));
    assert_eq!(netns_vol["hostPath"]["path"].as_str(), Some("/var/run/netns"));
    assert_eq!(netns["mountPropagation"].as_str(), Some("HostToContainer"));
    assert_eq!(netns["readOnly"].as_bool(), Some(true));
    for (inside, host) in [("/host/opt/cni/bin", "/opt/cni/bin"), ("/host/etc/cni/net.d", "/etc/cni/net.d")] {
        let (m, vol) = mount_of(spec, cni, inside);
        assert_eq!(m["mountPath"].as_str(), Some(inside));
        assert_eq!(vol["hostPath"]["path"].as_str(), Some(host), "the runtime's CNI directory");
        assert_ne!(m["readOnly"].as_bool(), Some(true), "the plugin and its config are written there");
    }

    let sc = &cni["securityContext"];
    assert!(added_capabilities(cni).is_empty(), "the CNI agent needs no capability");
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
}

#[test]
fn node_agent_is_probed_on_15021_and_scraped_on_15020() {
    let docs = default_render();
    let ds = one_of_kind(docs, "DaemonSet");
    let c = node_agent(docs);
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
    assert_eq!(probe["port"].as_u64(), Some(15021));

    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("15020"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/stats/prometheus"));

    // The listeners the agent opens are the ones declared.
    let args = args(c);
    for (flag, port) in [("--metrics-addr", 15020), ("--readiness-addr", 15021)] {
        let addr: SocketAddr =
            flag_value(&args, flag).unwrap_or_else(|| panic!("{flag} given")).parse().expect("socket address");
        assert_eq!(addr.port(), port, "{flag}");
        assert!(addr.ip().is_unspecified(), "{flag} listens on every address (kubelet probes the pod IP)");
    }
    let admin: SocketAddr = flag_value(&args, "--admin-addr").expect("--admin-addr").parse().expect("admin addr");
    assert!(admin.ip().is_loopback() && admin.port() == 15000, "admin on localhost:15000");
}

#[test]
fn controller_deployment_serves_15012_behind_its_service() {
    let docs = default_render();
    let deployment = one_of_kind(docs, "Deployment");
    let spec = pod_spec(deployment);
    let c = container(spec, "controller");
    let args = args(c);
    assert_eq!(args[0], "controller");
    assert_eq!(flag_value(&args, "--listen"), Some("0.0.0.0:15012"));

    // Config dir: the rendered ConfigMap.
    let config_dir = flag_value(&args, "--config-dir").expect("--config-dir");
    let (mount, volume) = mount_of(spec, c, config_dir);
    assert_eq!(mount["mountPath"].as_str(), Some(config_dir));
    let configmap = of_kind(docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"].as_str() == Some("ztunnel-controller-config"))
        .expect("ConfigMap ztunnel-controller-config");
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
    // The CA: the whole plug-in Secret, here only.
    let ca_dir = flag_value(&args, "--ca-dir").expect("--ca-dir");
    assert_eq!(mount_of(spec, c, ca_dir).1["secret"]["secretName"].as_str(), Some("cacerts"));
    // Tokens are written: a writable volume, not the read-only root filesystem.
    let tokens = flag_value(&args, "--tokens-dir").expect("--tokens-dir");
    assert!(!mount_of(spec, c, tokens).1["emptyDir"].is_null(), "--tokens-dir on a writable emptyDir");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert!(added_capabilities(c).is_empty(), "the controller needs no capability");
    assert_eq!(spec["securityContext"]["runAsNonRoot"].as_bool(), Some(true));

    let service = one_of_kind(docs, "Service");
    assert_eq!(service["metadata"]["name"].as_str(), Some("ztunnel-controller"));
    let pod_labels = deployment["spec"]["template"]["metadata"]["labels"].as_mapping().expect("pod labels");
    for (k, v) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(pod_labels.get(k), Some(v), "the Service selects the controller's pods ({k:?})");
    }
    let port = &service["spec"]["ports"][0];
    assert_eq!(port["port"].as_u64(), Some(15012));
    assert_eq!(port["targetPort"].as_u64(), Some(15012));
    assert!(c["ports"].as_sequence().unwrap().iter().any(|p| p["containerPort"].as_u64() == Some(15012)));

    let sa = of_kind(docs, "ServiceAccount")
        .into_iter()
        .find(|s| s["metadata"]["name"] == spec["serviceAccountName"])
        .expect("the controller's ServiceAccount is rendered");
    assert_eq!(sa["metadata"]["name"].as_str(), Some("ztunnel-controller"));
}

#[test]
fn controller_rbac_reads_exactly_the_kinds_it_watches() {
    let docs = default_render();
    let role = one_of_kind(docs, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let mut verbs = strs(&rule["verbs"]);
        verbs.sort_unstable();
        assert_eq!(verbs, ["get", "list", "watch"], "read-only: {rule:?}");
        assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                assert_ne!(resource, "*", "no wildcard resources");
                granted.insert((group.to_string(), resource.to_string()));
            }
        }
    }
    // Exactly the kinds the live source watches: one it may not read never finishes its first
    // list, and the controller publishes nothing until every kind has been listed.
    let expected: BTreeSet<(String, String)> = ztunnel::controller::watched::WATCHED_KINDS
        .iter()
        .map(|k| (k.group.to_string(), k.plural.to_string()))
        .collect();
    assert_eq!(granted, expected);

    let binding = one_of_kind(docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subjects = binding["subjects"].as_sequence().expect("subjects");
    assert_eq!(subjects.len(), 1);
    let deployment = one_of_kind(docs, "Deployment");
    assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
    assert_eq!(subjects[0]["name"], pod_spec(deployment)["serviceAccountName"], "bound to the controller only");
    assert_eq!(subjects[0]["namespace"].as_str(), Some(NAMESPACE));
}

#[test]
fn istiod_values_render_no_controller_and_point_both_agents_at_istiod() {
    let docs = istiod_render();
    // The two ConfigMaps are the Prometheus config + rules and the Grafana dashboards.
    assert_eq!(kinds(docs), ["ConfigMap", "ConfigMap", "DaemonSet", "ServiceAccount"], "no controller, no RBAC");
    let spec = pod_spec(one_of_kind(docs, "DaemonSet"));
    for c in [node_agent(docs), cni_agent(docs)] {
        let name = c["name"].as_str().unwrap();
        let env = env(c);
        assert_eq!(env_value(&env, "XDS_ADDRESS"), "https://istiod.istio-system.svc:15012", "{name}");
        assert!(!env.contains_key("ZTUNNEL_CONTROL_PLANE_SERVER_NAME"), "{name}: istiod's certificate names its host");
        let (_, volume) = mount_of(spec, c, env_value(&env, "XDS_ROOT_CA"));
        assert_eq!(volume["configMap"]["name"].as_str(), Some("istio-ca-root-cert"), "{name}: istiod's published root");
        let (_, volume) = mount_of(spec, c, env_value(&env, "AUTH_TOKEN"));
        assert_eq!(volume["projected"]["sources"][0]["serviceAccountToken"]["audience"].as_str(), Some("istio-ca"));
    }
    let env = env(node_agent(docs));
    assert_eq!(env_value(&env, "CA_ADDRESS"), "https://istiod.istio-system.svc:15012");
    assert_eq!(spec["serviceAccountName"].as_str(), Some("ztunnel"), "istiod trusts istio-system/ztunnel");
}

#[test]
fn plain_manifests_are_the_chart_rendered() {
    let plain = read(&deploy("ztunnel-node.yaml"));
    assert_eq!(
        documents(&plain, "deploy/ztunnel-node.yaml"),
        default_render(),
        "deploy/ztunnel-node.yaml is not `helm template ztunnel deploy/helm/ztunnel -n istio-system`: re-render it"
    );
    let job = render(&[
        "--set",
        "uninstallJob.enabled=true",
        "--set",
        "uninstallJob.nodes={__NODE__}",
        "--show-only",
        "templates/uninstall-job.yaml",
    ]);
    let plain = read(&deploy("uninstall/ztunnel-uninstall-job.yaml"));
    assert_eq!(documents(&plain, "deploy/uninstall/ztunnel-uninstall-job.yaml"), job, "re-render the uninstall Job");
}

#[test]
fn uninstall_job_mirrors_the_daemonset() {
    let job_docs = render(&["--set", "uninstallJob.enabled=true", "--set", "uninstallJob.nodes={node-a,node-b}"]);
    let jobs = of_kind(&job_docs, "Job");
    assert_eq!(jobs.len(), 2, "one Job per node");
    let ds_spec = pod_spec(one_of_kind(default_render(), "DaemonSet"));
    let ds = node_agent(default_render());
    for job in jobs {
        let spec = pod_spec(job);
        assert!(spec["nodeName"].as_str().is_some_and(|n| n.starts_with("node-")));
        assert_eq!(spec["restartPolicy"].as_str(), Some("Never"));
        let c = container(spec, "uninstall");
        let mut expected = args(ds);
        expected.push("--uninstall".into());
        assert_eq!(args(c), expected, "the DaemonSet's flags and values, plus --uninstall");
        assert_eq!(c["securityContext"], ds["securityContext"], "the same privileges");
        for path in ["/sys/fs/bpf", "/host/sys/fs/cgroup", "/var/run/ztunnel"] {
            assert_eq!(mount_of(spec, c, path), mount_of(ds_spec, ds, path), "same mount and host path for {path}");
        }
    }
    assert!(of_kind(default_render(), "Job").is_empty(), "uninstall is opt-in");
}

/// A script that runs the real `ztunnel` with only `caps` (Kubernetes names, e.g. NET_ADMIN)
/// in its bounding set, as a container started with `drop: [ALL], add: caps` gets them. With
/// `stderr_to`, `--uninstall` runs unrestricted (to clean up after a failure) and the agent's
/// stderr goes to that file instead of the test output.
fn capability_wrapper(caps: &BTreeSet<String>, tag: &str, stderr_to: Option<&Path>) -> PathBuf {
    let bounding: String = caps.iter().map(|c| format!(",+{}", c.to_ascii_lowercase())).collect();
    let bin = ztunnel_binary().display().to_string();
    let (bypass, redirect) = match stderr_to {
        Some(log) => (
            format!("for a in \"$@\"; do [ \"$a\" = --uninstall ] && exec {bin} \"$@\"; done\n"),
            format!(" 2>>{}", log.display()),
        ),
        None => (String::new(), String::new()),
    };
    let path = std::env::temp_dir().join(format!("ztunnel-caps-{}-{tag}", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n{bypass}exec setpriv --inh-caps=-all --bounding-set=-all{bounding} {bin} \"$@\"{redirect}\n"
        ),
    )
    .expect("writing the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    path
}

/// Two nodes, one pod each, described in the agents' local config.
struct CapsRig {
    c: Cluster,
    client: mesh_tests::Pod,
    server: mesh_tests::Pod,
    extra: Vec<String>,
}

impl CapsRig {
    fn new() -> Self {
        sweep_pins();
        let mut c = Cluster::new(2).expect("mini-cluster (needs root)");
        let client = c.add_pod(0, "client").unwrap();
        let server = c.add_pod(1, "server").unwrap();
        let yaml = format!(
            "workloads:\n{}{}",
            workload_yaml(&client, "default", client.name(), ""),
            workload_yaml(&server, "default", server.name(), "")
        );
        let extra = cluster_args(&c, Some(&yaml), &[]).unwrap();
        Self { c, client, server, extra }
    }
}

impl Drop for CapsRig {
    fn drop(&mut self) {
        for node in 0..2 {
            let name = format!("{}-node{node}", self.c.prefix());
            let _ = ztunnel::redirect::remove_pinned(&Path::new(mesh_tests::mesh::BPFFS).join(&name));
            let _ = std::fs::remove_dir_all(Path::new(mesh_tests::mesh::RUN_DIR).join(&name));
        }
        let _ = std::fs::remove_file(mesh_tests::mesh::mesh_config_path(&self.c));
        let _ = std::fs::remove_dir_all(mesh_tests::mesh::ca_dir(&self.c));
    }
}

#[test]
fn node_agent_carries_hbone_with_only_the_charts_capabilities() {
    let caps = added_capabilities(node_agent(default_render()));
    let wrapper = capability_wrapper(&caps, "exact", None);
    let rig = CapsRig::new();
    let a0 =
        AgentProcess::start(&wrapper, &rig.c, 0, &rig.extra).expect("agent 0 starts with the chart's capabilities");
    let a1 =
        AgentProcess::start(&wrapper, &rig.c, 1, &rig.extra).expect("agent 1 starts with the chart's capabilities");
    let status = read(Path::new(&format!("/proc/{}/status", a0.pid())));
    let bounding = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).expect("CapBnd").trim().to_string();
    assert_eq!(u64::from_str_radix(&bounding, 16).unwrap().count_ones() as usize, caps.len(), "{caps:?}: {bounding}");

    a0.enroll(&rig.client).expect("enrolling the client pod (setns, listeners with SO_MARK)");
    a1.enroll(&rig.server).expect("enrolling the server pod");
    let _server = PeerServer::start(&rig.server, 8080).unwrap();
    let reply = request(&rig.client, SocketAddr::new(rig.server.ip4().into(), 8080), "hello").expect("request");
    assert_eq!(reply.got, "hello");
    // The agent (default ENABLE_ORIG_SRC) prepared the server pod's reply routing with the
    // chart's capabilities, and the app sees the client pod's own address through it: a
    // direct connection is impossible for an enrolled pod (every inbound SYN is steered).
    let rules = mesh_tests::cmd::ip_in(rig.server.netns_name(), &["rule", "show"]).expect("ip rule in the server pod");
    assert!(rules.contains("lookup 1337"), "no reply rule in the server pod: {rules}");
    assert_eq!(reply.peer.ip(), std::net::IpAddr::from(rig.client.ip4()), "the app did not see the client's address");
    // The uninstall Job runs with the same privileges.
    a0.stop_and_uninstall().expect("uninstall with the chart's capabilities");
    a1.stop_and_uninstall().expect("uninstall with the chart's capabilities");
    let _ = std::fs::remove_file(wrapper);
}

#[test]
fn node_agent_cannot_capture_without_either_of_the_charts_capabilities() {
    let caps = added_capabilities(node_agent(default_render()));
    assert!(!caps.is_empty());
    for missing in &caps {
        let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let log = std::env::temp_dir().join(format!("ztunnel-caps-{}-without-{missing}.log", std::process::id()));
        let wrapper = capability_wrapper(&fewer, &format!("without-{missing}"), Some(&log));
        let rig = CapsRig::new();
        let outcome = AgentProcess::start(&wrapper, &rig.c, 0, &rig.extra)
            .map_err(|e| format!("start: {e:#}"))
            .and_then(|agent| agent.enroll(&rig.client).map_err(|e| format!("enroll: {e:#}")));
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(wrapper);
        let _ = std::fs::remove_file(log);
        let why = outcome.expect_err(&format!("the agent captured a pod without {missing}: the chart grants too much"));
        // The agent's own reason, when it exited: the line after "Caused by:".
        let cause = stderr.lines().skip_while(|l| !l.starts_with("Caused by")).nth(1).unwrap_or_default().trim();
        let cause: String = cause.chars().take(160).collect();
        println!("without {missing}: {} {cause}", why.lines().next().unwrap_or_default());
    }
}
