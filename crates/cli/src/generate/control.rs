//! The ControlNets of a run, from the `--controlnet`/`--control-image`/... flags
//! ([`ControlArgs`]): each loaded with the pipeline's dtype and device, with its control image
//! (a PNG, or `canny:PHOTO` for the Canny edges of a photo) and settings.

use anyhow::{bail, Context, Result};
use diffuse_pipelines::{canny, load_controlnet, ControlNetRequest, ControlNetUnit, LoadOptions};

use super::args::ControlArgs;

/// Canny thresholds of `canny:` control images (those of the canny ControlNets' examples).
const CANNY_LOW: f64 = 100.0;
const CANNY_HIGH: f64 = 200.0;

/// Value `i` of a flag given once for all or once per ControlNet.
fn nth(values: &[f64], i: usize, n: usize, default: f64, flag: &str) -> Result<f64> {
    match values.len() {
        0 => Ok(default),
        1 => Ok(values[0]),
        k if k == n => Ok(values[i]),
        k => bail!(
            "{flag} was given {k} times for {n} ControlNets; give it once or once per ControlNet"
        ),
    }
}

/// Reads a control image: a PNG, or `canny:PHOTO` for the edges of a photo.
fn read_control_image(spec: &str) -> Result<image::RgbImage> {
    let (edges, path) = match spec.strip_prefix("canny:") {
        Some(p) => (true, p),
        None => (false, spec),
    };
    let img = super::read_image(std::path::Path::new(path), "control image")?.to_rgb8();
    Ok(if edges {
        canny(&img, CANNY_LOW, CANNY_HIGH)
    } else {
        img
    })
}

impl ControlArgs {
    /// Whether any ControlNet flag was given.
    pub fn is_empty(&self) -> bool {
        self.controlnets.is_empty()
            && self.control_images.is_empty()
            && self.scales.is_empty()
            && self.guidance_start.is_empty()
            && self.guidance_end.is_empty()
            && !self.guess_mode
    }

    /// Reads every control image (before any model is loaded, so that a bad path fails
    /// fast).
    pub fn read_images(&self) -> Result<Vec<image::RgbImage>> {
        self.control_images
            .iter()
            .map(|s| read_control_image(s))
            .collect()
    }

    /// Loads the ControlNets (with the pipeline's dtype and device) and pairs them with their
    /// `images` (from [`Self::read_images`]); None without --controlnet.
    pub fn request(
        &self,
        images: Vec<image::RgbImage>,
        opts: &LoadOptions,
    ) -> Result<Option<ControlNetRequest>> {
        if self.is_empty() {
            return Ok(None);
        }
        let n = self.controlnets.len();
        if n == 0 {
            bail!("ControlNet settings were given without --controlnet");
        }
        if images.len() != n {
            bail!(
                "{n} --controlnet but {} --control-image: give one control image per ControlNet",
                images.len()
            );
        }
        let mut units = Vec::with_capacity(n);
        for (i, (spec, image)) in self.controlnets.iter().zip(images).enumerate() {
            let dir = diffuse_loaders::resolve_model(spec, None)?;
            let model = load_controlnet(&dir, opts)
                .with_context(|| format!("loading the ControlNet in {}", dir.display()))?;
            let mut unit = ControlNetUnit::new(model, spec.clone(), image);
            unit.scale = nth(&self.scales, i, n, 1.0, "--controlnet-scale")?;
            unit.guidance_start = nth(&self.guidance_start, i, n, 0.0, "--control-guidance-start")?;
            unit.guidance_end = nth(&self.guidance_end, i, n, 1.0, "--control-guidance-end")?;
            units.push(unit);
        }
        Ok(Some(ControlNetRequest {
            units,
            guess_mode: self.guess_mode,
        }))
    }
}
