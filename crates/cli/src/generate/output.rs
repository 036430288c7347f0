//! Where generated images go: file names and formats checked before any work, images written
//! atomically (PNG, or JPEG by the `.jpg`/`.jpeg` extension, both with the infotext).

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::DynamicImage;

/// The output paths of images `mine` of a job for `--output out` (a file, or an existing
/// folder), none of which may exist unless `force`. `images` lists every image of the job in
/// order as (its task's seed, its index in the task): in a folder they are
/// `diffuse-<seed>-<index>.png`; a file name gets `-<n>` (numbered through the job) before its
/// extension when the job has several. (One of several ranks checks only its own files: the
/// others may already have written theirs.)
pub fn output_paths(
    out: &Path,
    images: &[(u64, usize)],
    mine: Range<usize>,
    force: bool,
) -> Result<Vec<PathBuf>> {
    check_image_output(out)?;
    let n = images.len();
    let paths: Vec<PathBuf> = if out.is_dir() {
        images
            .iter()
            .map(|(seed, i)| out.join(format!("diffuse-{seed}-{i}.png")))
            .collect()
    } else if n == 1 {
        vec![out.to_path_buf()]
    } else {
        let stem = out.file_stem().unwrap_or_default().to_string_lossy();
        let ext = out
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| "png".into());
        (0..n)
            .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
            .collect()
    };
    let paths = paths
        .get(mine.clone())
        .with_context(|| format!("images {mine:?} of {n}"))?
        .to_vec();
    for p in &paths {
        if p.exists() && !force {
            bail!("{} exists; pass --force to overwrite it", p.display());
        }
    }
    Ok(paths)
}

/// An image output: its folder must exist, and a file name must have an extension diffuse
/// writes images in (checked before the slow model load).
pub fn check_image_output(out: &Path) -> Result<()> {
    check_output_parent(out)?;
    match out.is_dir() {
        true => Ok(()),
        false => Format::of(out).map(|_| ()),
    }
}

/// The folder the output goes into must exist (checked before the slow model load).
pub fn check_output_parent(out: &Path) -> Result<()> {
    if out.is_dir() {
        return Ok(());
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "output folder {} does not exist; create it first",
            parent.display()
        );
    }
    Ok(())
}

/// Writes every image with its infotext, each to its path.
pub fn save_all(
    images: &[DynamicImage],
    paths: &[PathBuf],
    infotexts: &[String],
    force: bool,
) -> Result<()> {
    if images.len() != paths.len() || infotexts.len() != paths.len() {
        bail!(
            "the pipeline returned {} images ({} infotexts), {} were expected",
            images.len(),
            infotexts.len(),
            paths.len()
        );
    }
    for ((img, path), infotext) in images.iter().zip(paths).zip(infotexts) {
        write_image(img, path, infotext, force)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The image formats `--output` writes, by the file's extension.
enum Format {
    Png,
    Jpeg,
}

impl Format {
    fn of(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            None | Some("png") => Ok(Self::Png),
            Some("jpg" | "jpeg") => Ok(Self::Jpeg),
            Some(other) => bail!(
                "{}: diffuse writes .png (with the generation parameters in a text chunk) or \
                 .jpg/.jpeg (in EXIF), not .{other}",
                path.display()
            ),
        }
    }
}

/// Writes the image with its infotext (PNG `parameters` chunk, or JPEG EXIF `UserComment`, by
/// the path's extension) to a temp file, then renames it into place, so an interrupted run
/// never leaves a partial image behind.
pub fn write_image(img: &DynamicImage, path: &Path, infotext: &str, force: bool) -> Result<()> {
    let bytes = match Format::of(path)? {
        Format::Png => diffuse_pipelines::png_info::encode_png(img, Some(infotext))?,
        Format::Jpeg => diffuse_pipelines::png_info::encode_jpeg(img, Some(infotext))?,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output.png".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        if path.exists() && !force {
            bail!(
                "{} appeared meanwhile; pass --force to overwrite it",
                path.display()
            );
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving the image to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
