//! Compiles `proto/` (our own services) with tonic-prost-build. OTLP types come
//! from the `opentelemetry-proto` crate, not from here.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "proto/storage/common.proto",
                "proto/storage/ingestion.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
