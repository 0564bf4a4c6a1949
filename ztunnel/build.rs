//! Builds the kernel programs (`ebpf/programs`) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, so `cargo build` of the userspace binary embeds a fresh object.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/programs");
    let root = root.canonicalize().context("ebpf/programs")?;
    let root = root.to_str().ok_or_else(|| anyhow!("non-utf8 path"))?;
    aya_build::build_ebpf(
        [Package { name: "ztunnel-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::Custom("nightly"),
    )
}
