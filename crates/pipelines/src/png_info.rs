//! PNG files with AUTOMATIC1111 "infotext": the generation settings in a `parameters` text
//! chunk, which A1111, ComfyUI and image viewers read back. The CLI and the server write their
//! images through [`encode_png`], so the same settings give the same bytes from both. JPEG
//! files ([`encode_jpeg`]) carry the infotext where A1111 writes and reads it in a JPEG: the
//! EXIF `UserComment`.

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

/// JPEG quality of [`encode_jpeg`] (A1111's default `jpeg_quality` is 80; 95 keeps the fine
/// detail of a generated image).
pub const JPEG_QUALITY: u8 = 95;

/// An 8-bit grayscale or RGB image as JPEG bytes ([`JPEG_QUALITY`]), with `parameters` (the
/// infotext) as A1111 saves it in a JPEG: an EXIF `UserComment` of `UNICODE\0` and the text in
/// UTF-16BE (piexif's `UserComment.dump(text, encoding="unicode")`), in an APP1 segment after
/// the JFIF header. A text too long for one segment (about 32,000 characters) is cut.
pub fn encode_jpeg(img: &DynamicImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    if !matches!(
        img,
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_)
    ) {
        return Err(Error::invalid(format!(
            "cannot save a {:?} image as JPEG; only 8-bit gray and RGB",
            img.color()
        )));
    }
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
        .encode_image(img)
        .map_err(|e| Error::invalid(format!("JPEG encoding failed: {e}")))?;
    if let Some(text) = parameters {
        // After SOI and, when the encoder wrote one, the JFIF APP0 segment.
        let at = match bytes.get(2..6) {
            Some([0xFF, 0xE0, hi, lo]) => 4 + u16::from_be_bytes([*hi, *lo]) as usize,
            _ => 2,
        };
        bytes.splice(at..at, exif_user_comment(text));
    }
    Ok(bytes)
}

/// An APP1 segment holding a big-endian TIFF structure with one IFD pointing to an EXIF IFD
/// whose one entry is `UserComment` (`UNICODE\0` + UTF-16BE `text`).
fn exif_user_comment(text: &str) -> Vec<u8> {
    // Segment length (2) + "Exif\0\0" (6) + TIFF header and both IFDs (44) + the comment:
    // at most u16::MAX, so the text stops at the last whole character that fits.
    const FIXED: usize = 2 + 6 + 44;
    let mut comment = b"UNICODE\0".to_vec();
    for ch in text.chars() {
        let mut units = [0u16; 2];
        let units = ch.encode_utf16(&mut units);
        if FIXED + comment.len() + 2 * units.len() > u16::MAX as usize {
            break;
        }
        units.iter().for_each(|u| comment.extend(u.to_be_bytes()));
    }
    let tiff_len = 44 + comment.len();
    let mut seg = vec![0xFF, 0xE1];
    seg.extend(((2 + 6 + tiff_len) as u16).to_be_bytes());
    seg.extend(b"Exif\0\0");
    // TIFF header: big-endian, IFD0 at offset 8.
    seg.extend(b"MM\0\x2A");
    seg.extend(8u32.to_be_bytes());
    // An IFD of one 12-byte entry: count, (tag, type, count, value or offset), next IFD = 0.
    let ifd = |tag: u16, kind: u16, count: u32, value: u32| {
        let mut v = 1u16.to_be_bytes().to_vec();
        v.extend(tag.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(count.to_be_bytes());
        v.extend(value.to_be_bytes());
        v.extend(0u32.to_be_bytes());
        v
    };
    // IFD0 (offset 8, 18 bytes): ExifIFDPointer (LONG) to the EXIF IFD at 26.
    seg.extend(ifd(0x8769, 4, 1, 26));
    // EXIF IFD (offset 26, 18 bytes): UserComment (UNDEFINED) at 44.
    seg.extend(ifd(0x9286, 7, comment.len() as u32, 44));
    seg.extend(comment);
    seg
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

/// The infotext of a PNG (its `parameters` chunk) or a JPEG (its EXIF `UserComment`), as
/// [`encode_png`], [`encode_jpeg`] and A1111 write them; `None` when the image has none.
pub fn read_image_parameters(bytes: &[u8]) -> Result<Option<String>> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => read_parameters(bytes),
        [0xFF, 0xD8, ..] => Ok(jpeg_user_comment(bytes)),
        _ => Err(Error::invalid("not a PNG or JPEG image")),
    }
}

/// The `UserComment` of a JPEG's EXIF segment, found by following the TIFF offsets as EXIF
/// readers do (either byte order): `UNICODE\0` + UTF-16 in the TIFF's byte order, as piexif
/// writes it for A1111, or `ASCII\0\0\0` + text. `None` for a JPEG without one, or one
/// whose segments do not hold together.
fn jpeg_user_comment(jpeg: &[u8]) -> Option<String> {
    let mut at = 2;
    // Segments up to the image data (start of scan).
    while *jpeg.get(at)? == 0xFF && *jpeg.get(at + 1)? != 0xDA {
        let len = u16::from_be_bytes([*jpeg.get(at + 2)?, *jpeg.get(at + 3)?]) as usize;
        let body = jpeg.get(at + 4..at + 2 + len)?;
        if jpeg[at + 1] == 0xE1 && body.starts_with(b"Exif\0\0") {
            return exif_user_comment_text(&body[6..]);
        }
        at += 2 + len;
    }
    None
}

/// [`jpeg_user_comment`] within the TIFF structure of an EXIF segment.
fn exif_user_comment_text(tiff: &[u8]) -> Option<String> {
    let big = match tiff.get(..2)? {
        b"MM" => true,
        b"II" => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<usize> {
        let b = [*tiff.get(at)?, *tiff.get(at + 1)?];
        Some(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        } as usize)
    };
    let u32_at = |at: usize| -> Option<usize> {
        let b: [u8; 4] = tiff.get(at..at + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        } as usize)
    };
    // The (count, value or offset) of the entry `tag` of the IFD at `ifd`.
    let find = |ifd: usize, tag: usize| -> Option<(usize, usize)> {
        (0..u16_at(ifd)?)
            .map(|i| ifd + 2 + 12 * i)
            .find(|&e| u16_at(e) == Some(tag))
            .and_then(|e| Some((u32_at(e + 4)?, u32_at(e + 8)?)))
    };
    let (_, exif_ifd) = find(u32_at(4)?, 0x8769)?;
    let (count, offset) = find(exif_ifd, 0x9286)?;
    let data = tiff.get(offset..offset.checked_add(count)?)?;
    let (code, text) = data.split_at_checked(8)?;
    match code {
        b"UNICODE\0" => {
            let units: Vec<u16> = text
                .chunks_exact(2)
                .map(|u| match big {
                    true => u16::from_be_bytes([u[0], u[1]]),
                    false => u16::from_le_bytes([u[0], u[1]]),
                })
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => Some(
            String::from_utf8_lossy(text)
                .trim_end_matches('\0')
                .to_string(),
        ),
    }
}

/// An infotext split as A1111's `parse_generation_parameters` splits it: `Prompt` (the lines
/// before `Negative prompt:`), `Negative prompt`, then each `Key: value` of the last line
/// (taken as settings when it has at least three), in order, a quoted value unquoted and a
/// `WxH` value as `Key-1` and `Key-2` (`Size-1`, `Size-2`). Values stay text, as A1111's do.
pub fn parse_infotext(text: &str) -> Vec<(String, String)> {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let last = lines.pop().unwrap_or_default();
    let settings = split_settings(last);
    let settings = if settings.len() >= 3 {
        settings
    } else {
        lines.push(last);
        Vec::new()
    };
    let (mut prompt, mut negative) = (Vec::new(), Vec::new());
    for line in lines {
        let line = line.trim();
        match line.strip_prefix("Negative prompt:") {
            Some(rest) => negative.push(rest.trim()),
            None if !negative.is_empty() => negative.push(line),
            None => prompt.push(line),
        }
    }
    let mut out = vec![
        ("Prompt".to_string(), prompt.join("\n")),
        ("Negative prompt".to_string(), negative.join("\n")),
    ];
    for (key, value) in settings {
        let size = value.split_once('x').filter(|(w, h)| {
            [w, h]
                .iter()
                .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        });
        match size {
            Some((w, h)) => {
                out.push((format!("{key}-1"), w.to_string()));
                out.push((format!("{key}-2"), h.to_string()));
            }
            None => out.push((key, value)),
        }
    }
    out
}

/// The `Key: value` items of an infotext's settings line, split at commas outside quotes;
/// a quoted value is unquoted (`\"` and `\\` unescaped). An item without `: ` is skipped.
fn split_settings(line: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let (mut item, mut quoted, mut escaped) = (String::new(), false, false);
    for c in line.chars().chain(std::iter::once(',')) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(std::mem::take(&mut item));
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    items
        .iter()
        .filter_map(|i| i.split_once(':'))
        .filter(|(k, _)| !k.trim().is_empty())
        .map(|(k, v)| {
            let v = v.trim();
            let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
                None => v.to_string(),
            };
            (k.trim().to_string(), v)
        })
        .collect()
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

    /// A1111's own infotext, as its `parse_generation_parameters` splits it.
    #[test]
    fn infotext_parses_as_a1111_parses_it() {
        let text = "a cat, (detailed:1.2)\nby the sea\nNegative prompt: blurry\nugly\n\
                    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, \
                    Size: 512x768, Model: sd15, Lora hashes: \"a: 1, b: \\\"x\\\"\", Batch pos: 1";
        let got = parse_infotext(text);
        let want = [
            ("Prompt", "a cat, (detailed:1.2)\nby the sea"),
            ("Negative prompt", "blurry\nugly"),
            ("Steps", "20"),
            ("Sampler", "DPM++ 2M"),
            ("Schedule type", "Karras"),
            ("CFG scale", "7"),
            ("Seed", "42"),
            ("Size-1", "512"),
            ("Size-2", "768"),
            ("Model", "sd15"),
            ("Lora hashes", "a: 1, b: \"x\""),
            ("Batch pos", "1"),
        ];
        let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, want);
        // A prompt alone (fewer than three settings on its last line) is all prompt.
        assert_eq!(
            parse_infotext("a dog\nSteps: 3"),
            [
                ("Prompt".to_string(), "a dog\nSteps: 3".to_string()),
                ("Negative prompt".to_string(), String::new())
            ]
        );
        assert!(read_image_parameters(b"GIF89a").is_err());
    }

    #[test]
    fn jpeg_keeps_the_infotext_in_exif() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            16,
            8,
            image::Rgb([200, 40, 90]),
        ));
        let text = "a cat, 一只猫 🐈\nNegative prompt: blurry\nSteps: 20, Seed: 42";
        let bytes = encode_jpeg(&img, Some(text)).unwrap();
        assert_eq!(
            image::guess_format(&bytes).unwrap(),
            image::ImageFormat::Jpeg
        );
        assert_eq!(
            read_image_parameters(&bytes).unwrap().as_deref(),
            Some(text)
        );
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (16, 8));
        for (a, b) in back.pixels().zip(img.to_rgb8().pixels()) {
            for c in 0..3 {
                assert!((a[c] as i32 - b[c] as i32).abs() <= 3, "{a:?} vs {b:?}");
            }
        }
        assert_eq!(
            read_image_parameters(&encode_jpeg(&img, None).unwrap()).unwrap(),
            None
        );
        // Gray images too; a text longer than one segment holds stops at a whole character.
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(8, 8, image::Luma([9])));
        let long = "🐈".repeat(20_000);
        let kept = read_image_parameters(&encode_jpeg(&gray, Some(&long)).unwrap())
            .unwrap()
            .unwrap();
        assert!(long.starts_with(&kept) && kept.len() < long.len() && kept.len() > 50_000);
    }
}
