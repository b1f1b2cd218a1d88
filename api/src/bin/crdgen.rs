//! Writes the CRDs of all four kinds to `<dir>/<plural>.backup.resticbackup.io.yaml`, one file
//! per CRD. Usage: `crdgen [DIR]` (default `crds`, relative to the working directory).

use std::{error::Error, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "crds".to_owned()));
    fs::create_dir_all(&dir)?;
    for crd in restic_operator_api::crds() {
        let path = dir.join(restic_operator_api::crd_file_name(&crd));
        fs::write(&path, restic_operator_api::crd_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
