//! Scores for a class-conditional generator, measured with a [`Classifier`]: the share of
//! samples classified as the class they were asked for, and the Fréchet distance between
//! generated and real images in the classifier's feature space, next to the same distance
//! between as many real training images and the test set (the floor a perfect generator
//! would reach).

use candle_core::Device;
use diffuse_core::{Error, Result};
use serde::Serialize;

use crate::classifier::{classify_dataset, Classifier};
use crate::dataset::Dataset;
use crate::frechet::{frechet_distance, Gaussian};

/// How often one requested class was recognised, next to how often the classifier recognises
/// the real test images of that class (a generator's samples of a class that real images
/// already confuse, such as Fashion-MNIST's shirts, score near that figure, not near 100%).
#[derive(Clone, Debug, Serialize)]
pub struct ClassScore {
    pub class: String,
    pub correct: usize,
    pub total: usize,
    /// Test images of this class the classifier gets right, and how many there are.
    pub test_correct: usize,
    pub test_total: usize,
}

impl ClassScore {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }

    pub fn test_accuracy(&self) -> f64 {
        self.test_correct as f64 / self.test_total.max(1) as f64
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// The classifier's accuracy on the real test images.
    pub classifier_test_accuracy: f64,
    pub per_class: Vec<ClassScore>,
    /// Correct over all generated samples.
    pub class_accuracy: f64,
    pub generated: usize,
    /// Fréchet distance, generated samples vs the test set.
    pub frechet_generated_test: f64,
    /// Fréchet distance, `generated` real training images vs the test set.
    pub frechet_train_test: f64,
    pub test_images: usize,
}

/// Scores `generated` (labelled with the requested classes) against the real `test` images;
/// `train` supplies the floor, from `generated.len()` images spread evenly over it.
pub fn evaluate(
    classifier: &Classifier,
    generated: &Dataset,
    test: &Dataset,
    train: &Dataset,
    device: &Device,
) -> Result<EvalReport> {
    let requested = generated
        .labels()
        .ok_or_else(|| Error::invalid("the generated images need their requested classes"))?;
    let names = &classifier.config().class_names;
    if let Some(&bad) = requested.iter().find(|&&l| l as usize >= names.len()) {
        return Err(Error::invalid(format!(
            "class {bad} requested, the classifier knows {} classes",
            names.len()
        )));
    }
    let n = generated.len();
    if train.len() < n {
        return Err(Error::invalid(format!(
            "the floor needs {n} training images, the training set has {}",
            train.len()
        )));
    }
    let dim = classifier.config().feature_dim;
    let (pred, gen_features) = classify_dataset(classifier, generated, device)?;
    let mut per_class: Vec<ClassScore> = names
        .iter()
        .map(|c| ClassScore {
            class: c.clone(),
            correct: 0,
            total: 0,
            test_correct: 0,
            test_total: 0,
        })
        .collect();
    for (&want, &got) in requested.iter().zip(&pred) {
        let s = &mut per_class[want as usize];
        s.total += 1;
        s.correct += usize::from(want == got);
    }

    let (test_pred, test_features) = classify_dataset(classifier, test, device)?;
    let test_labels = test
        .labels()
        .ok_or_else(|| Error::invalid("the test images need labels"))?;
    let mut test_correct = 0;
    for (&want, &got) in test_labels.iter().zip(&test_pred) {
        let s = per_class.get_mut(want as usize).ok_or_else(|| {
            Error::invalid(format!(
                "test label {want}, the classifier knows {} classes",
                names.len()
            ))
        })?;
        s.test_total += 1;
        s.test_correct += usize::from(want == got);
        test_correct += usize::from(want == got);
    }
    per_class.retain(|s| s.total > 0);
    let correct: usize = per_class.iter().map(|s| s.correct).sum();
    let test_gauss = Gaussian::fit(&test_features, dim)?;

    let spread: Vec<usize> = (0..n).map(|i| i * train.len() / n).collect();
    let (_, train_features) = classify_dataset(classifier, &train.subset(&spread)?, device)?;

    Ok(EvalReport {
        classifier_test_accuracy: test_correct as f64 / test.len() as f64,
        per_class,
        class_accuracy: correct as f64 / n as f64,
        generated: n,
        frechet_generated_test: frechet_distance(&Gaussian::fit(&gen_features, dim)?, &test_gauss)?,
        frechet_train_test: frechet_distance(&Gaussian::fit(&train_features, dim)?, &test_gauss)?,
        test_images: test.len(),
    })
}
