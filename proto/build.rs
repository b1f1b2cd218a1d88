//! Generates the gRPC code and a descriptor set (for server reflection) from `resticoperator/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("agent_descriptor.bin"))
        .compile_protos(&["resticoperator/agent/v1/agent.proto"], &["."])?;
    Ok(())
}
