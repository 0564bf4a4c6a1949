//! `cargo xtask demo`: the standalone mesh on one machine, in two parts (L4 here, then the
//! Bookinfo traffic-management tasks through a waypoint in `l7`). `ztunnel controller` serves the
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
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
mod l7;

use mesh_tests::ambient::{Ambient, NODES};
use mesh_tests::apps::{request, PeerServer};
use mesh_tests::mesh::{sweep_pins, wait_record, MeshNode};
use mesh_tests::{sweep_leftovers, Pod};
use ztunnel::controller::Model;
use ztunnel::proxy::Direction;
use ztunnel::redirect::CounterSnapshot;

const WAIT: Duration = Duration::from_secs(5);
const PORT: u16 = 9080;

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

fn vip(model: &Model, name: &str) -> Result<SocketAddr> {
    let s = model.services.values().find(|s| s.name == name).with_context(|| format!("no service {name}"))?;
    Ok(SocketAddr::new(*s.vips.first().context("service without a VIP")?, PORT))
}

fn main() -> Result<()> {
    sweep_leftovers();
    sweep_pins();
    let work = PathBuf::from(mesh_tests::mesh::RUN_DIR).join(format!("demo-{}", std::process::id()));
    let observe = std::env::args().any(|a| a == "--observe");
    let result = run(&work, observe);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run(work: &Path, observe: bool) -> Result<()> {
    let yaml = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo");
    let mesh = Ambient::start(&yaml, &work.join("l4"), |_| false)?;
    let (controller, model, pods, agents, cnis) =
        (mesh.controller(), &mesh.model, &mesh.pods, &mesh.agents, &mesh.cnis);
    let config = mesh.config.clone();
    println!(
        "controller on {}: {} workloads, {} services, {} policies from deploy/demo/",
        controller.addr(),
        model.workloads.len(),
        model.services.len(),
        model.authorizations.len()
    );
    for (p, sa) in pods {
        println!("  pod {:<36} {}  {:<12} sa {sa}", p.name(), NODES[p.node()], p.ip4().to_string());
    }
    println!("\nper node: `ztunnel cni` (serves ZDS) and a node agent that started empty and connected to it");
    for cni in cnis {
        println!("  {} pods enrolled by the CNI agent", cni.status().enrolled.len());
    }
    let _apps: Vec<PeerServer> = pods.iter().map(|(p, _)| PeerServer::start(p, PORT)).collect::<Result<_>>()?;
    println!("state, certificates and ambient membership all come from the controller");

    let productpage = mesh.pod("productpage")?;
    let details = mesh.pod("details")?;
    let reviews = vip(model, "reviews")?;
    let ratings = vip(model, "ratings")?;
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
    let direct = SocketAddr::new(mesh.pod("ratings")?.ip4().into(), PORT);
    set_ambient(&config, false)?;
    let start = Instant::now();
    for cni in cnis {
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
    for cni in cnis {
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
    println!("\nL4 part OK: controller -> xDS + CA -> eBPF capture -> HBONE -> policy -> app");
    drop(_apps);
    drop(mesh);
    l7::run(&work.join("l7"), observe)?;
    println!("\ndemo OK; cleaning up");
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
