//! Writes the CRDs of all four kinds to `<dir>/<plural>.backup.resticbackup.io.yaml`, one file
//! per CRD, for each DIR given. Usage: `crdgen [DIR...]` (default `crds` and
//! `charts/restic-operator/crds`, relative to the working directory: the repository's root).

use std::{error::Error, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let mut dirs: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec!["crds".into(), "charts/restic-operator/crds".into()];
    }
    for dir in dirs {
        fs::create_dir_all(&dir)?;
        for crd in restic_operator_api::crds() {
            let path = dir.join(restic_operator_api::crd_file_name(&crd));
            fs::write(&path, restic_operator_api::crd_yaml(&crd)?)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
