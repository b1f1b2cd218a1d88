//! Directory trees for backup tests: one with the things restores get wrong (modes, mtimes,
//! symlinks, empty files, nested directories), and a comparison that checks all of them.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, lchown, symlink};
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};

/// Files with distinct contents, modes and mtimes, an empty file, a subdirectory and a symlink
/// (about 3 MB).
pub fn make_tree(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("sub"))?;
    std::fs::write(root.join("big.bin"), pseudo_random(3_000_000, 1))?;
    std::fs::write(root.join("empty"), b"")?;
    std::fs::write(root.join("sub/script.sh"), b"#!/bin/sh\necho hi\n")?;
    std::fs::set_permissions(root.join("sub/script.sh"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::write(root.join("sub/private"), b"secret")?;
    std::fs::set_permissions(root.join("sub/private"), std::fs::Permissions::from_mode(0o600))?;
    symlink("sub/script.sh", root.join("link"))?;
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(root.join("big.bin"))?
        .set_modified(old)?;
    Ok(())
}

/// [`make_tree`] and what restores get wrong more rarely: files owned by other users (the
/// symlink too), a hard link, and a 64 MiB sparse file with 6 bytes in its middle. Run as root.
pub fn make_full_tree(root: &Path) -> Result<()> {
    make_tree(root)?;
    std::fs::hard_link(root.join("sub/private"), root.join("private-link"))?;
    let sparse = std::fs::File::create(root.join("sparse.img"))?;
    sparse.set_len(64 << 20)?;
    sparse.write_all_at(b"middle", 32 << 20)?;
    lchown(root.join("sub/script.sh"), Some(1234), Some(5678))?;
    lchown(root.join("link"), Some(1234), Some(5678))?;
    Ok(())
}

/// [`assert_trees_equal`], and the same owners, the same hard links (which paths share an
/// inode) and sparse files that stayed sparse (no more than 1 MiB allocated where the source
/// has less).
pub fn assert_trees_identical(a: &Path, b: &Path) -> Result<()> {
    assert_trees_equal(a, b)?;
    let (ta, tb) = (metadata_of(a)?, metadata_of(b)?);
    let links = |t: &BTreeMap<String, std::fs::Metadata>| -> Vec<Vec<String>> {
        let mut by_inode: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (k, m) in t.iter().filter(|(_, m)| m.is_file() && m.nlink() > 1) {
            by_inode.entry(m.ino()).or_default().push(k.clone());
        }
        let mut groups: Vec<Vec<String>> = by_inode.into_values().collect();
        groups.sort();
        groups
    };
    ensure!(
        links(&ta) == links(&tb),
        "hard links {:?} vs {:?}",
        links(&ta),
        links(&tb)
    );
    for (k, ma) in &ta {
        let mb = &tb[k];
        ensure!(
            (ma.uid(), ma.gid()) == (mb.uid(), mb.gid()),
            "{k}: owner {}:{} vs {}:{}",
            ma.uid(),
            ma.gid(),
            mb.uid(),
            mb.gid()
        );
        let allocated = |m: &std::fs::Metadata| m.blocks() * 512;
        if ma.is_file() && allocated(ma) < 1 << 20 {
            ensure!(
                allocated(mb) <= 1 << 20,
                "{k}: {} bytes allocated, the source has {}: not sparse",
                allocated(mb),
                allocated(ma)
            );
        }
    }
    Ok(())
}

/// Every path below `root` (relative) with its metadata, symlinks not followed.
fn metadata_of(root: &Path) -> Result<BTreeMap<String, std::fs::Metadata>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, std::fs::Metadata>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            out.insert(path.strip_prefix(root)?.display().to_string(), meta.clone());
            if meta.is_dir() {
                walk(root, &path, out)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// Incompressible bytes, different for each seed, without a random-number crate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// What [`assert_trees_equal`] compares of one path: mode, mtime, content or link target.
type Entry = (u32, i64, Vec<u8>);

/// Compares content, mode, mtime and symlink targets of two trees.
pub fn assert_trees_equal(a: &Path, b: &Path) -> Result<()> {
    // Mode, mtime (not of directories) and content, or a symlink's target.
    let summary = |root: &Path| -> Result<BTreeMap<String, Entry>> {
        let mut out = BTreeMap::new();
        for (rel, meta) in metadata_of(root)? {
            let path = root.join(&rel);
            let content = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)?.into_os_string().into_encoded_bytes()
            } else if meta.is_file() {
                std::fs::read(&path)?
            } else {
                Vec::new()
            };
            let mtime = if meta.is_dir() { 0 } else { meta.mtime() };
            out.insert(rel, (meta.mode(), mtime, content));
        }
        Ok(out)
    };
    let (ta, tb) = (summary(a)?, summary(b)?);
    ensure!(
        ta.keys().eq(tb.keys()),
        "different files: {:?} vs {:?}",
        ta.keys(),
        tb.keys()
    );
    for (k, va) in &ta {
        let vb = &tb[k];
        ensure!(va.0 == vb.0, "{k}: mode {:o} vs {:o}", va.0, vb.0);
        ensure!(va.1 == vb.1, "{k}: mtime {} vs {}", va.1, vb.1);
        ensure!(va.2 == vb.2, "{k}: content differs");
    }
    Ok(())
}
