//! Compiles the `.proto` files with protox (pure Rust, so no system `protoc` is needed) and
//! generates prost messages plus tonic client/server code for the services (ADS, Istio CA).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "protos/workload.proto",
        "protos/authorization.proto",
        "protos/zds.proto",
        "protos/citadel.proto",
        "protos/google/rpc/status.proto",
        "protos/envoy/config/core/v3/base.proto",
        "protos/envoy/service/discovery/v3/discovery.proto",
        "protos/envoy/service/discovery/v3/ads.proto",
    ];
    println!("cargo:rerun-if-changed=protos");
    // protox ships the google/protobuf/*.proto descriptors; prost maps them to prost-types.
    let fds = protox::compile(files, ["protos"])?;
    // Only ads.proto and citadel.proto declare services, so only they get gRPC code.
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
