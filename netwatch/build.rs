use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Builds the eBPF crate for the BPF target; the object lands in `OUT_DIR/netwatch`.
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata failed")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name == "netwatch-ebpf")
        .ok_or_else(|| anyhow!("netwatch-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("netwatch-ebpf manifest has no parent directory"))?;
    let package = Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}
