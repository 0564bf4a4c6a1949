//! Builds the kernel programs (`ebpf/programs`) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, so `cargo build` of the userspace binary embeds a fresh object.
//! The object's DWARF is then stripped: the kernel and aya need only its BTF (bpf-linker
//! made that from the DWARF), and the DWARF with its relocations was nine tenths of the
//! object, all of it read at every start and so resident in every agent.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/programs");
    let root = root.canonicalize().context("ebpf/programs")?;
    let root = root.to_str().ok_or_else(|| anyhow!("non-utf8 path"))?;
    aya_build::build_ebpf(
        [Package { name: "ztunnel-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::Custom("nightly"),
    )?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("ztunnel-ebpf");
    if !out.exists() {
        // `AYA_BUILD_SKIP=1` builds no object; the embedding then fails with its own error.
        return Ok(());
    }
    strip_dwarf(&out).with_context(|| format!("stripping DWARF from {}", out.display()))
}

/// Rewrites the ELF object at `path` without its `.debug*` sections and their relocation
/// sections (symbols and relocations that pointed into them go too). `.BTF` and `.BTF.ext`,
/// which carry the types, maps' layouts and the verifier's line info, stay.
fn strip_dwarf(path: &std::path::Path) -> anyhow::Result<()> {
    let data = std::fs::read(path)?;
    let mut elf = object::build::elf::Builder::read(&*data)?;
    for section in elf.sections.iter_mut() {
        let name = String::from_utf8_lossy(&section.name);
        let target = name.trim_start_matches(".rela").trim_start_matches(".rel");
        if target.starts_with(".debug") {
            section.delete = true;
        }
    }
    elf.delete_orphans();
    // bpf-linker names sections in the symbol string table; the writer wants a table of its own.
    if !elf.sections.iter().any(|s| matches!(s.data, object::build::elf::SectionData::SectionString)) {
        let names = elf.sections.add();
        names.name = (&b".shstrtab"[..]).into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.sh_addralign = 1;
        names.data = object::build::elf::SectionData::SectionString;
    }
    let mut stripped = Vec::new();
    elf.write(&mut stripped)?;
    std::fs::write(path, stripped)?;
    Ok(())
}
