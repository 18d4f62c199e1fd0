//! Compiles rim's .proto contracts with protox (pure Rust), so building rim
//! never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/rim/frame.proto",
        "proto/rim/comet.proto",
        "proto/rim/logic.proto",
        "proto/rim/queue.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // Bodies stay `Bytes` end to end: no copy between gRPC, queue and sockets.
        .bytes(".")
        // Clients are built on channels rim manages (discovery, balancing);
        // the generated `connect` helper would also clash with the logic
        // service's Connect method.
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
