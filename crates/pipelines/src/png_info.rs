//! PNG files with AUTOMATIC1111 "infotext": the generation settings in a `parameters` text
//! chunk, which A1111, ComfyUI and image viewers read back. The CLI and the server write their
//! images through [`encode_png`], so the same settings give the same bytes from both.

use diffuse_core::{Error, Result};
use image::DynamicImage;

/// The settings A1111 prints under an image, in its order:
/// `prompt\nNegative prompt: ..\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: m`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InfoText {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// The sampler as the user named it (an A1111 name or a diffusers class).
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// Further `Key: value` pairs appended in order (e.g. `Denoising strength`, `Class`).
    pub extra: Vec<(String, String)>,
}

impl std::fmt::Display for InfoText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.prompt,
            self.negative_prompt,
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.model
        )?;
        for (k, v) in &self.extra {
            write!(f, ", {k}: {v}")?;
        }
        Ok(())
    }
}

/// An 8-bit grayscale or RGB image as PNG bytes, with `parameters` (the infotext) in a text
/// chunk: `tEXt` when it is Latin-1, else UTF-8 `iTXt`.
pub fn encode_png(img: &DynamicImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let (color, raw) = match img {
        DynamicImage::ImageLuma8(g) => (png::ColorType::Grayscale, g.as_raw()),
        DynamicImage::ImageRgb8(rgb) => (png::ColorType::Rgb, rgb.as_raw()),
        other => {
            return Err(Error::invalid(format!(
                "cannot save a {:?} image as PNG; only 8-bit gray and RGB",
                other.color()
            )))
        }
    };
    let png_err = |e: png::EncodingError| Error::invalid(format!("PNG encoding failed: {e}"));
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, img.width(), img.height());
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            if text.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk("parameters".into(), text.to_string())
                    .map_err(png_err)?;
            } else {
                enc.add_itxt_chunk("parameters".into(), text.to_string())
                    .map_err(png_err)?;
            }
        }
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(raw).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    Ok(bytes)
}

/// The `parameters` text of a PNG written by [`encode_png`] (or by A1111), if it has one.
pub fn read_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::invalid(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.text.clone()));
    }
    for t in &info.utf8_text {
        if t.keyword == "parameters" {
            return Ok(Some(t.get_text().map_err(|e| {
                Error::invalid(format!("bad iTXt parameters chunk: {e}"))
            })?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infotext_round_trips_through_png() {
        let info = InfoText {
            prompt: "a cat, (detailed:1.2)".into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            sampler: "Euler a".into(),
            cfg_scale: 7.5,
            seed: 42,
            width: 8,
            height: 4,
            model: "tiny_sd".into(),
            extra: vec![("Denoising strength".into(), "0.6".into())],
        };
        let text = info.to_string();
        assert_eq!(
            text,
            "a cat, (detailed:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, \
             CFG scale: 7.5, Seed: 42, Size: 8x4, Model: tiny_sd, Denoising strength: 0.6"
        );
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(8, 4, |x, y| {
            image::Rgb([x as u8 * 30, y as u8 * 60, 7])
        }));
        let bytes = encode_png(&img, Some(&text)).unwrap();
        assert_eq!(read_parameters(&bytes).unwrap().as_deref(), Some(&*text));
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back.as_raw(), img.to_rgb8().as_raw());
        // Non-Latin-1 text goes into iTXt and still reads back.
        let utf8 = "一只猫";
        let bytes = encode_png(&img, Some(utf8)).unwrap();
        assert_eq!(read_parameters(&bytes).unwrap().as_deref(), Some(utf8));
        assert_eq!(
            read_parameters(&encode_png(&img, None).unwrap()).unwrap(),
            None
        );
    }
}
