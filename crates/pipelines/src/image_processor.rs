//! diffusers' `VaeImageProcessor` for images and masks: resize, normalise, binarise, and back.

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Error, Result};
use image::{imageops::FilterType, GrayImage, RgbImage};

/// The image's size rounded down to a multiple of `factor` (`get_default_height_width`);
/// `(height, width)`.
pub fn default_size(width: u32, height: u32, factor: usize) -> Result<(usize, usize)> {
    let (w, h) = (width as usize, height as usize);
    let (h, w) = (h - h % factor, w - w % factor);
    if h == 0 || w == 0 {
        return Err(Error::invalid(format!(
            "image of {width}x{height} is smaller than {factor} pixels on one side"
        )));
    }
    Ok((h, w))
}

/// An RGB image as (1, 3, H, W) in [-1, 1], resized (Lanczos, as diffusers' default) when its
/// size differs.
pub fn preprocess_image(
    img: &RgbImage,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    // Same f32 operations as numpy: pixels / 255, then 2x - 1.
    rgb_tensor(img, height, width, device, |p| {
        2.0 * (p as f32 / 255.0) - 1.0
    })
}

/// A ControlNet's control image as (1, 3, H, W) in [0, 1] (diffusers' control image processor:
/// RGB, resized with Lanczos when its size differs, not normalised).
pub fn preprocess_control_image(
    img: &RgbImage,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    rgb_tensor(img, height, width, device, |p| p as f32 / 255.0)
}

/// A mask (white = repaint) as (1, 1, H, W) in {0, 1}: resized, /255, binarised at 0.5.
pub fn preprocess_mask(
    mask: &GrayImage,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let mask = if (mask.width() as usize, mask.height() as usize) != (width, height) {
        image::imageops::resize(mask, width as u32, height as u32, FilterType::Lanczos3)
    } else {
        mask.clone()
    };
    let data: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&p| if p as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, height, width), device)?)
}

/// `F.interpolate(x, size=(h, w))` with torch's default `nearest` mode:
/// source index `floor(dst * in / out)`.
pub fn interpolate_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    let index = |out: usize, inp: usize, device: &Device| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let idx: Vec<u32> = (0..out)
            .map(|o| ((o as f32 * scale).floor() as usize).min(inp - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(idx, out, device)?)
    };
    let rows = index(h, ih, x.device())?;
    let cols = index(w, iw, x.device())?;
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// Decoded images (N, 3, H, W) in about [-1, 1] → (N, H, W, 3) in [0, 1] and 8-bit RGB images.
pub fn postprocess(decoded: &Tensor) -> Result<(Tensor, Vec<RgbImage>)> {
    let images = ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let rgb = to_rgb_images(&images)?;
    Ok((images, rgb))
}

/// (N, H, W, 3) in [0, 1] → 8-bit RGB images (`round(x * 255)`, as `numpy_to_pil`).
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    to_u8_images(images)
}

/// `(B, H, W, 1)` f32 in `[0, 1]` → 8-bit grayscale images (1-channel `UNet2DModel`s).
pub fn to_gray_images(images: &Tensor) -> Result<Vec<GrayImage>> {
    to_u8_images(images)
}

/// Rounds `(B, H, W, C)` values in `[0, 1]` to 8-bit images of the pixel type `P`.
fn to_u8_images<P: image::Pixel<Subpixel = u8>>(
    images: &Tensor,
) -> Result<Vec<image::ImageBuffer<P, Vec<u8>>>> {
    let (n, h, w, _) = images.dims4()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let px: Vec<u8> = images
            .get(i)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let img = image::ImageBuffer::from_raw(w as u32, h as u32, px)
            .ok_or_else(|| Error::invalid("decoded image has an unexpected size"))?;
        out.push(img);
    }
    Ok(out)
}

/// `img` resized to `height` × `width` as (1, 3, H, W), each 8-bit value mapped by `value`.
fn rgb_tensor(
    img: &RgbImage,
    height: usize,
    width: usize,
    device: &Device,
    value: impl Fn(u8) -> f32,
) -> Result<Tensor> {
    let img = resize_rgb(img, height, width);
    let data: Vec<f32> = img.as_raw().iter().map(|&p| value(p)).collect();
    let t = Tensor::from_vec(data, (1, height, width, 3), device)?;
    Ok(t.permute((0, 3, 1, 2))?.contiguous()?)
}

fn resize_rgb(img: &RgbImage, height: usize, width: usize) -> RgbImage {
    if (img.width() as usize, img.height() as usize) == (width, height) {
        img.clone()
    } else {
        image::imageops::resize(img, width as u32, height as u32, FilterType::Lanczos3)
    }
}
