//! `cargo xtask demo`: the standalone mesh on one machine. `ztunnel controller` serves the
//! Bookinfo-shaped topology in `deploy/demo/` (Kubernetes YAML written for this project) over
//! delta ADS and signs the pods' certificates. Each of two mini-cluster nodes runs a
//! `ztunnel cni` agent and a node agent that starts empty: the node agent connects to the
//! CNI agent's ZDS socket (Istio's direction), the demo plays the container runtime and runs
//! the real CNI plugin binary for each pod, and the CNI agent enrolls the pods the
//! controller says are ambient. The demo shows eBPF capture, HBONE between nodes with the
//! controller's identities, the demo's AuthorizationPolicy at work, and a namespace label
//! flip taking the pods out of the mesh and back without restarting anything. Exits non-zero
//! with a reason if anything is off, and cleans up after itself.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::cni::CniNode;
use mesh_tests::mesh::{sweep_pins, wait_record, ControlPlaneAccess, MeshNode};
use mesh_tests::{sweep_leftovers, Cluster, Pod};
use ztunnel::controller::{Controller, ControllerConfig, Model, Options, Source};
use ztunnel::identity::{CaConfig, InProcessCa};
use ztunnel::proxy::Direction;
use ztunnel::redirect::CounterSnapshot;

const WAIT: Duration = Duration::from_secs(5);
const NODES: [&str; 2] = ["node-a", "node-b"];
const PORT: u16 = 9080;

/// The demo's YAML, copied so the label flip never edits the repository.
fn copy_config(work: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo");
    let dst = work.join("config");
    std::fs::create_dir_all(&dst)?;
    for e in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&path, dst.join(path.file_name().context("file name")?))?;
        }
    }
    Ok(dst)
}

fn set_ambient(config: &Path, on: bool) -> Result<()> {
    let path = config.join("namespace.yaml");
    let text = std::fs::read_to_string(&path)?;
    let (from, to) = if on {
        ("istio.io/dataplane-mode: none", "istio.io/dataplane-mode: ambient")
    } else {
        ("istio.io/dataplane-mode: ambient", "istio.io/dataplane-mode: none")
    };
    ensure!(text.contains(from), "namespace.yaml has no {from:?}");
    let tmp = config.join(".namespace.yaml.tmp");
    std::fs::write(&tmp, text.replace(from, to))?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// One mini-cluster pod per workload of the model, on the node the YAML names, with the
/// address the YAML gives it (the mini-cluster allocates them in the same order).
fn create_pods(cluster: &mut Cluster, model: &Model) -> Result<Vec<(Pod, String)>> {
    let mut pods = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let mut ws: Vec<_> = model.workloads.values().filter(|w| w.node == *node).collect();
        ws.sort_by_key(|w| w.addresses.first().copied());
        for w in ws {
            let pod = cluster.add_pod(i, &w.name)?;
            ensure!(
                w.addresses.contains(&pod.ip4().into()),
                "pod {} got {} but the YAML gives it {:?}",
                w.name,
                pod.ip4(),
                w.addresses
            );
            pods.push((pod, w.service_account.clone()));
        }
    }
    Ok(pods)
}

fn find<'a>(pods: &'a [(Pod, String)], prefix: &str) -> Result<&'a Pod> {
    pods.iter().map(|(p, _)| p).find(|p| p.name().starts_with(prefix)).with_context(|| format!("no pod {prefix}*"))
}

fn vip(model: &Model, name: &str) -> Result<SocketAddr> {
    let s = model.services.values().find(|s| s.name == name).with_context(|| format!("no service {name}"))?;
    Ok(SocketAddr::new(*s.vips.first().context("service without a VIP")?, PORT))
}

fn main() -> Result<()> {
    sweep_leftovers();
    sweep_pins();
    let work = PathBuf::from(mesh_tests::mesh::RUN_DIR).join(format!("demo-{}", std::process::id()));
    let result = run(&work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run(work: &Path) -> Result<()> {
    let config = copy_config(work)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let ca = Arc::new(InProcessCa::new(CaConfig::new("cluster.local"))?);
    let cfg = ControllerConfig {
        source: Source::Directory(config.clone()),
        listen: "127.0.0.1:0".parse()?,
        options: Options::default(),
        ca,
        tokens_dir: work.join("tokens"),
        poll_interval: Duration::from_millis(200),
    };
    let controller = rt.block_on(Controller::start(cfg)).context("starting the controller")?;
    let model = controller.model();
    let errors: Vec<String> =
        controller.status().iter().filter(|e| e.outcome.is_error()).map(|e| e.to_string()).collect();
    ensure!(errors.is_empty(), "deploy/demo has rejected objects: {errors:?}");
    println!(
        "controller on {}: {} workloads, {} services, {} policies from deploy/demo/",
        controller.addr(),
        model.workloads.len(),
        model.services.len(),
        model.authorizations.len()
    );

    let mut cluster = Cluster::new(2).context("building the mini-cluster (needs root)")?;
    let pods = create_pods(&mut cluster, &model)?;
    for (p, sa) in &pods {
        println!("  pod {:<36} {}  {:<12} sa {sa}", p.name(), NODES[p.node()], p.ip4().to_string());
    }
    let access = ControlPlaneAccess {
        address: controller.addr(),
        root_pem: controller.root_pem().into(),
        tokens_dir: work.join("tokens"),
        node_names: NODES.iter().map(|s| s.to_string()).collect(),
    };
    let cnis = [CniNode::start(&cluster, 0, &access)?, CniNode::start(&cluster, 1, &access)?];
    let agents = [
        MeshNode::start_connecting(&cluster, 0, cnis[0].zds_socket(), Some(&access))?,
        MeshNode::start_connecting(&cluster, 1, cnis[1].zds_socket(), Some(&access))?,
    ];
    println!("\nper node: `ztunnel cni` (serves ZDS) and a node agent that started empty and connected to it");
    // The demo plays the container runtime: the chained CNI plugin runs for each new pod,
    // and returns once the pod is enrolled (before its app would start).
    for (p, _) in &pods {
        let run = cnis[p.node()].plugin_in("ADD", p, "bookinfo");
        ensure!(run.code == Some(0), "CNI ADD for {} failed: {} {}", p.name(), run.stdout, run.stderr);
    }
    for cni in &cnis {
        let s = cni.wait(WAIT, |s| s.enrolled.len() == 3)?;
        println!("  {} pods enrolled by the CNI agent", s.enrolled.len());
    }
    let _apps: Vec<PeerServer> = pods.iter().map(|(p, _)| PeerServer::start(p, PORT)).collect::<Result<_>>()?;
    println!("state, certificates and ambient membership all come from the controller");

    let productpage = find(&pods, "productpage")?;
    let details = find(&pods, "details")?;
    let reviews = vip(&model, "reviews")?;
    let ratings = vip(&model, "ratings")?;
    let mut ev = agents[0].events();
    let deadline = Instant::now() + WAIT;
    while request(productpage, reviews, "x").is_err() {
        ensure!(Instant::now() < deadline, "productpage never reached reviews");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let r = request(productpage, reviews, "GET /reviews/0")?;
        ensure!(r.got == "GET /reviews/0", "reviews got {:?}", r.got);
        let rec =
            wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == reviews && r.error.is_none())
                .context("no outbound record for reviews")?;
        ensure!(rec.protocol == "HBONE", "productpage -> reviews went {}", rec.protocol);
        seen.insert(rec.dst.to_string() + " as " + rec.dst_identity.as_deref().unwrap_or("-"));
    }
    println!("\nproductpage -> reviews {reviews}: 6 requests in HBONE (mTLS), server identity verified:");
    for endpoint in &seen {
        println!("  {endpoint}");
    }
    let denied = request(details, reviews, "GET /reviews/0");
    ensure!(denied.is_err(), "details reached reviews despite the ALLOW-only-productpage policy");
    println!("details -> reviews: refused by AuthorizationPolicy reviews-from-productpage (only productpage may call)");
    let r = request(productpage, ratings, "GET /ratings/0")?;
    ensure!(r.got == "GET /ratings/0", "ratings got {:?}", r.got);
    println!("productpage -> ratings {ratings}: allowed (no policy on ratings)");

    // Out of the mesh and back, by editing one label: the CNI agents release the running
    // pods (their traffic then bypasses the mesh) and enroll them again.
    let direct = SocketAddr::new(find(&pods, "ratings")?.ip4().into(), PORT);
    set_ambient(&config, false)?;
    let start = Instant::now();
    for cni in &cnis {
        cni.wait(WAIT, |s| s.enrolled.is_empty())?;
    }
    let released = start.elapsed();
    let before = agents[0].counters().connect4.captured;
    let r = request(productpage, direct, "outside the mesh")?;
    ensure!(r.got == "outside the mesh", "ratings got {:?}", r.got);
    ensure!(agents[0].counters().connect4.captured == before, "a released pod's connect was still captured");
    println!("\nnamespace bookinfo labelled dataplane-mode=none: all 6 pods released after {released:?}, traffic not captured");
    set_ambient(&config, true)?;
    let start = Instant::now();
    for cni in &cnis {
        cni.wait(WAIT, |s| s.enrolled.len() == 3)?;
    }
    let took = protocol_becomes(productpage, direct, &agents[0], "HBONE")?;
    println!(
        "label back to ambient: pods enrolled again, productpage -> ratings in HBONE after {:?}",
        start.elapsed().max(took)
    );

    print_counters("node-a", &agents[0].counters());
    print_counters("node-b", &agents[1].counters());
    println!(
        "\ncontroller: {} certificates issued, {} refused; {} ADS clients, {} pushes, {} NACKs",
        controller.ca().issued_total(),
        controller.ca().refusals_total(),
        controller.ads().connected_clients(),
        controller.ads().pushes_total(),
        controller.ads().nacks_total()
    );
    let c = agents[0].counters();
    ensure!(c.connect4.captured > 0, "node-a captured nothing: {c:?}");
    println!("\ndemo OK: controller -> xDS + CA -> eBPF capture -> HBONE -> policy -> app; cleaning up");
    drop(agents);
    drop(cnis);
    rt.block_on(controller.stop());
    Ok(())
}

/// Sends requests until the node agent reports them carried as `protocol`; how long it took.
fn protocol_becomes(client: &Pod, dst: SocketAddr, agent: &MeshNode, protocol: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut ev = agent.events();
    while start.elapsed() < Duration::from_secs(5) {
        if request(client, dst, "x").is_ok() {
            if let Some(r) = wait_record(&mut ev, WAIT, |r| r.direction == Direction::Outbound && r.dst == dst) {
                if r.protocol == protocol {
                    return Ok(start.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{dst} was not reached in {protocol} within 5 s")
}

fn print_counters(node: &str, c: &CounterSnapshot) {
    println!("\n{node} eBPF counters (captured / bypassed / errors):");
    for (name, o) in c.by_program() {
        println!("  {name:<10} {:>4} / {:>4} / {:>4}", o.captured, o.bypassed, o.errors);
    }
}
