//! The loss curve as a PNG, drawn pixel by pixel (no plotting or font dependency): every
//! logged loss as a faint dot, a moving average as a line, a logarithmic loss axis with
//! gridlines at 1-2-5 values, and numeric tick labels in a tiny built-in digit font.

use std::path::Path;

use diffuse_core::{Error, Result};
use image::{Rgb, RgbImage};

const WIDTH: u32 = 800;
const HEIGHT: u32 = 400;
const LEFT: u32 = 64;
const RIGHT: u32 = 16;
const TOP: u32 = 16;
const BOTTOM: u32 = 32;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const RAW: Rgb<u8> = Rgb([160, 190, 230]);
const SMOOTH: Rgb<u8> = Rgb([20, 60, 160]);

/// Draws `(step, loss)` points (in step order) to a PNG at `path`.
pub fn write_loss_curve(points: &[(u64, f64)], path: &Path) -> Result<()> {
    let pts: Vec<(u64, f64)> = points
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .collect();
    if pts.is_empty() {
        return Err(Error::invalid("no positive finite loss values to plot"));
    }
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, BACKGROUND);
    let (x0, x1) = (
        pts[0].0 as f64,
        pts[pts.len() - 1].0.max(pts[0].0 + 1) as f64,
    );
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    // Log axis, widened a little so that a flat curve still has a visible range.
    let (ly0, ly1) = (lo.log10() - 0.05, hi.log10().max(lo.log10() + 0.1) + 0.05);
    let pw = (WIDTH - LEFT - RIGHT) as f64;
    let ph = (HEIGHT - TOP - BOTTOM) as f64;
    let px = |s: f64| LEFT as f64 + (s - x0) / (x1 - x0) * pw;
    let py = |l: f64| TOP as f64 + (1.0 - (l.log10() - ly0) / (ly1 - ly0)) * ph;

    for v in log_ticks(10f64.powf(ly0), 10f64.powf(ly1)) {
        let y = py(v).round() as i64;
        hline(&mut img, LEFT as i64, (WIDTH - RIGHT) as i64, y, GRID);
        let label = format_tick(v);
        let tw = text_width(&label);
        draw_text(&mut img, LEFT as i64 - 6 - tw, y - 5, &label, AXIS);
    }
    for s in linear_ticks(x0, x1) {
        let x = px(s).round() as i64;
        vline(&mut img, x, TOP as i64, (HEIGHT - BOTTOM) as i64, GRID);
        let label = format!("{}", s as u64);
        let tw = text_width(&label);
        draw_text(
            &mut img,
            x - tw / 2,
            (HEIGHT - BOTTOM) as i64 + 8,
            &label,
            AXIS,
        );
    }
    vline(
        &mut img,
        LEFT as i64,
        TOP as i64,
        (HEIGHT - BOTTOM) as i64,
        AXIS,
    );
    hline(
        &mut img,
        LEFT as i64,
        (WIDTH - RIGHT) as i64,
        (HEIGHT - BOTTOM) as i64,
        AXIS,
    );

    for &(s, l) in &pts {
        put(
            &mut img,
            px(s as f64).round() as i64,
            py(l).round() as i64,
            RAW,
        );
    }
    // Centered moving average over about 1/50 of the run.
    let half = (pts.len() / 100).max(1);
    let mut prev: Option<(i64, i64)> = None;
    for i in 0..pts.len() {
        let win = &pts[i.saturating_sub(half)..(i + half + 1).min(pts.len())];
        let mean = win.iter().map(|p| p.1).sum::<f64>() / win.len() as f64;
        let p = (px(pts[i].0 as f64).round() as i64, py(mean).round() as i64);
        if let Some(q) = prev {
            line(&mut img, q, p, SMOOTH);
        }
        prev = Some(p);
    }
    crate::sample::save_png(&image::DynamicImage::ImageRgb8(img), path)
}

/// 1-2-5 values between `lo` and `hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

/// About five round step numbers in `[lo, hi]`.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
        .max(1.0);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi {
        out.push(v);
        v += step;
    }
    out
}

fn format_tick(v: f64) -> String {
    let decimals = (-v.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn hline(img: &mut RgbImage, x0: i64, x1: i64, y: i64, c: Rgb<u8>) {
    (x0..=x1).for_each(|x| put(img, x, y, c));
}

fn vline(img: &mut RgbImage, x: i64, y0: i64, y1: i64, c: Rgb<u8>) {
    (y0..=y1).for_each(|y| put(img, x, y, c));
}

/// Bresenham's line.
fn line(img: &mut RgbImage, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let dx = (x1 - x0).abs();
    let dy = -(y1 - y0).abs();
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// 3×5 glyphs, one row of 3 bits per entry, drawn at twice their size.
fn glyph(ch: char) -> Option<[u8; 5]> {
    Some(match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        _ => return None,
    })
}

const SCALE: i64 = 2;

fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * 4 * SCALE
}

fn draw_text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch) else { continue };
        let gx = x + i as i64 * 4 * SCALE;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            put(img, gx + col * SCALE + dx, y + r as i64 * SCALE + dy, c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks() {
        assert_eq!(log_ticks(0.03, 0.6), vec![0.05, 0.1, 0.2, 0.5]);
        assert_eq!(
            linear_ticks(0.0, 100.0),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(format_tick(0.05), "0.05");
        assert_eq!(format_tick(2.0), "2");
    }
}
