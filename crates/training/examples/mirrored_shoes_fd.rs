//! What mirrored shoes cost in Fréchet distance on real Fashion-MNIST images: 1,000 training
//! images spread over the set (as `diffuse eval`'s floor takes them) against the 10,000 test
//! images, in the bundled classifier's features, as they are and with every other one (or every
//! other shoe) mirrored. Fashion-MNIST's shoes point left, which is why `diffuse train` does not
//! flip the IDX sets by default.
//!
//! ```sh
//! scripts/fetch-data.sh
//! cargo run --release -p diffuse-training --example mirrored_shoes_fd
//! ```

use std::path::Path;

use candle_core::Device;
use diffuse_training::classifier::Classifier;
use diffuse_training::frechet::{frechet_distance, Gaussian};
use diffuse_training::{Dataset, DatasetKind, DatasetOptions, Split};

/// Sandal, sneaker, ankle boot.
const FOOTWEAR: [u32; 3] = [5, 7, 9];

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dev = Device::Cpu;
    let classifier = Classifier::load(&root.join("models/fashion-mnist-classifier"), &dev)?;
    let dim = classifier.config().feature_dim;
    let load = |split| {
        Dataset::load(&DatasetOptions {
            kind: DatasetKind::FashionMnist,
            path: root.join("data/fashion-mnist"),
            split,
            resolution: 32,
            channels: 1,
            fit: DatasetKind::FashionMnist.default_fit(),
            max_images: None,
        })
    };
    let (train, test) = (load(Split::Train)?, load(Split::Test)?);
    // Features of `indices` of `ds`, each mirrored where `flip` says.
    let features = |ds: &Dataset, indices: &[usize], flip: &[bool]| -> anyhow::Result<Gaussian> {
        let mut all = Vec::with_capacity(indices.len() * dim);
        for (idx, fl) in indices.chunks(500).zip(flip.chunks(500)) {
            let (x, _) = ds.batch(idx, fl, &dev)?;
            all.extend(classifier.classify(&x, 500)?.1);
        }
        Ok(Gaussian::fit(&all, dim)?)
    };
    let test_all: Vec<usize> = (0..test.len()).collect();
    let test_fit = features(&test, &test_all, &vec![false; test.len()])?;

    let n = 1000;
    let picked: Vec<usize> = (0..n).map(|i| i * train.len() / n).collect();
    let labels = train.labels().expect("Fashion-MNIST is labelled");
    let is_shoe = |i: usize| FOOTWEAR.contains(&labels[i]);
    let every_other: Vec<bool> = (0..n).map(|k| k % 2 == 1).collect();
    let mut shoes_seen = 0;
    let every_other_shoe: Vec<bool> = picked
        .iter()
        .map(|&i| {
            shoes_seen += usize::from(is_shoe(i));
            is_shoe(i) && shoes_seen % 2 == 0
        })
        .collect();
    for (label, flip) in [
        ("as they are", vec![false; n]),
        ("every other one mirrored", every_other),
        ("every other shoe mirrored", every_other_shoe),
    ] {
        let fd = frechet_distance(&features(&train, &picked, &flip)?, &test_fit)?;
        println!("FD of {n} training images, {label}: {fd:.2}");
    }
    Ok(())
}
