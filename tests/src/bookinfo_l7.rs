//! Istio's Bookinfo traffic-management tasks on the standalone mesh: the YAML in
//! `deploy/demo-l7/cluster` (Bookinfo, tcp-echo, a `sleep` client and a waypoint the whole
//! namespace uses), the Bookinfo stand-ins in their pods, and `ztunnel waypoint` in its pod
//! getting state over xDS and its certificate from the controller, reading the
//! VirtualServices of the task applied (`deploy/demo-l7/tasks`). Each task is shown by
//! counting what the productpage stand-in answers. `cargo xtask demo` and the tests use it.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::ambient::Ambient;
use crate::bookinfo::{get, App, Role};
use crate::forward::PortForward;
use crate::waypoint::WaypointProcess;
use crate::InNetns;

/// Where the YAML lives in the repository.
pub fn yaml_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo-l7")
}

/// The port the waypoint reaches the control plane on, inside its pod.
const CONTROL_PLANE_PORT: u16 = 15012;

/// The running scenario (dropped in field order: waypoint and apps before the mesh).
pub struct BookinfoL7 {
    pub waypoint: WaypointProcess,
    apps: Vec<(String, App)>,
    _forward: PortForward,
    pub mesh: Ambient,
}

/// What one productpage request showed.
#[derive(Debug, Clone)]
pub struct PageView {
    pub status: u16,
    /// The reviews version that served it (None: reviews unavailable).
    pub reviews: Option<u8>,
    pub body: String,
    pub took: Duration,
}

impl BookinfoL7 {
    /// Starts everything under `work`.
    pub fn start(work: &Path) -> Result<Self> {
        let mesh = Ambient::start(&yaml_dir().join("cluster"), work, |name| name.starts_with("waypoint"))?;
        let vip = |n: &str, p| mesh.vip(n, p);
        let mut apps = Vec::new();
        let mut app = |name: &str, port: u16, role: Role| -> Result<()> {
            apps.push((name.to_string(), App::start(mesh.pod(name)?, port, role)?));
            Ok(())
        };
        app("productpage", 9080, Role::ProductPage { details: vip("details", 9080)?, reviews: vip("reviews", 9080)? })?;
        app("details", 9080, Role::Details)?;
        for v in 1..=3u8 {
            app(&format!("reviews-v{v}"), 9080, Role::Reviews { version: v, ratings: vip("ratings", 9080)? })?;
        }
        app("ratings", 9080, Role::Ratings)?;
        app("tcp-echo-v1", 9000, Role::TcpEcho { prefix: "one".into() })?;
        app("tcp-echo-v2", 9000, Role::TcpEcho { prefix: "two".into() })?;
        let wp = mesh.pod("waypoint")?.clone();
        let forward =
            PortForward::start(&wp, SocketAddr::from(([127, 0, 0, 1], CONTROL_PLANE_PORT)), mesh.access.address)?;
        let root = work.join("root.pem");
        std::fs::write(&root, &mesh.access.root_pem)?;
        let address = format!("https://127.0.0.1:{CONTROL_PLANE_PORT}");
        let token = mesh.access.tokens_dir.join(crate::ambient::NODES[wp.node()]);
        let args: Vec<String> = [
            "--xds-address",
            &address,
            "--xds-root-ca",
            &root.display().to_string(),
            "--ca-address",
            &address,
            "--ca-root-ca",
            &root.display().to_string(),
            "--auth-token",
            &token.display().to_string(),
            "--control-plane-server-name",
            "localhost",
            "--node-name",
            crate::ambient::NODES[wp.node()],
            "--namespace",
            "bookinfo",
            "--service-account",
            "waypoint",
            "--gateway-name",
            "waypoint",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let waypoint = WaypointProcess::spawn(&wp, &mesh.config, &args).context("starting the waypoint")?;
        Ok(BookinfoL7 { waypoint, apps, _forward: forward, mesh })
    }

    /// Applies `deploy/demo-l7/tasks/<task>.yaml` (its VirtualServices replace the last task's).
    pub fn apply(&self, task: &str) -> Result<()> {
        let text = std::fs::read_to_string(yaml_dir().join("tasks").join(format!("{task}.yaml")))
            .with_context(|| format!("task {task}"))?;
        self.waypoint.write_routes("task.yaml", &text)
    }

    /// `n` productpage views from the `sleep` pod, as `user` (the `end-user` header) if given.
    pub fn views(&self, n: usize, user: Option<&str>) -> Result<Vec<PageView>> {
        let sleep = self.mesh.pod("sleep")?;
        let page = self.mesh.vip("productpage", 9080)?;
        let headers: Vec<(&str, &str)> = user.map(|u| vec![("end-user", u)]).unwrap_or_default();
        (0..n)
            .map(|_| {
                let start = Instant::now();
                let (status, body, _) =
                    get(sleep, page, "/productpage", "productpage:9080", &headers, Duration::from_secs(20))?;
                Ok(PageView { status, reviews: crate::bookinfo::reviews_version(&body), body, took: start.elapsed() })
            })
            .collect()
    }

    /// `n` tcp-echo connections from `sleep`: how many v1 ("one") and v2 ("two") answered.
    pub fn tcp_echo(&self, n: usize) -> Result<(usize, usize)> {
        let dst = self.mesh.vip("tcp-echo", 9000)?;
        let answers: Vec<String> = self.mesh.pod("sleep")?.run(move || {
            use std::io::{Read, Write};
            (0..n)
                .map(|_| {
                    let Ok(mut s) = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5)) else {
                        return String::new();
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.write_all(b"hello\n");
                    let mut buf = [0u8; 64];
                    let k = s.read(&mut buf).unwrap_or(0);
                    String::from_utf8_lossy(&buf[..k]).into_owned()
                })
                .collect()
        });
        Ok((
            answers.iter().filter(|a| a.starts_with("one")).count(),
            answers.iter().filter(|a| a.starts_with("two")).count(),
        ))
    }

    /// A real Prometheus in the waypoint's pod scraping both node agents (job `ztunnel`,
    /// `app="ztunnel"`, as the chart's scrape config labels them) and the waypoint (job
    /// `kubernetes-pods`), with the chart's recording and alerting rules loaded.
    pub fn prometheus(&self, dir: &Path) -> Result<crate::prometheus::Prometheus> {
        use crate::prometheus::{Prometheus, Target};
        let mut targets = Vec::new();
        for (i, a) in self.mesh.agents.iter().enumerate() {
            let admin = a.agent().admin().context("node agent without an admin server")?;
            targets.push(Target {
                job: "ztunnel".into(),
                addr: admin.metrics_addr,
                labels: vec![
                    ("app".into(), "ztunnel".into()),
                    ("namespace".into(), "istio-system".into()),
                    ("pod".into(), format!("ztunnel-{}", crate::ambient::NODES[i])),
                    ("node".into(), crate::ambient::NODES[i].into()),
                ],
                in_pod: false,
            });
        }
        targets.push(Target {
            job: "kubernetes-pods".into(),
            addr: crate::waypoint::METRICS_ADDR.parse()?,
            labels: vec![
                ("app".into(), "waypoint".into()),
                ("namespace".into(), "bookinfo".into()),
                ("pod".into(), "waypoint".into()),
            ],
            in_pod: true,
        });
        let rules = crate::observability::chart_file("prometheus/rules.yaml");
        Prometheus::start(self.mesh.pod("waypoint")?, dir, &targets, Some(&rules))
    }

    /// The stand-in app of pod `name`.
    pub fn app(&self, name: &str) -> Result<&App> {
        self.apps.iter().find(|(n, _)| n == name).map(|(_, a)| a).with_context(|| format!("no app {name}"))
    }
}

/// Views per reviews version: `[unavailable, v1, v2, v3]`.
pub fn count(views: &[PageView]) -> [usize; 4] {
    let mut n = [0; 4];
    for v in views {
        n[v.reviews.map(usize::from).unwrap_or(0)] += 1;
    }
    n
}
