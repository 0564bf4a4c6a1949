//! Compiles the `.proto` files with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["protos/enrollment.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["protos"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
