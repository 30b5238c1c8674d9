//! Compiles `proto/` (our own services) with tonic-prost-build. OTLP types come
//! from the `opentelemetry-proto` crate, not from here.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // DataRecord fields: a BTreeMap decodes without hashing, and iterates
        // in name order, which the record conversion's fast path relies on.
        .btree_map(".")
        // Bounds what a request may decode into before prost decodes it.
        .codec_path("crate::ingest::budget::CheckedCodec")
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
