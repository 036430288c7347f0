//! The Canny edge detector as OpenCV's `cv2.Canny(image, low, high)` computes it (3×3 Sobel
//! with replicated borders, L1 gradient magnitude, on colour images the channel with the
//! largest magnitude), the preprocessor of the canny ControlNets (`--control canny:photo.png`).
//!
//! ```text
//! dx, dy = sobel3x3(image)                      # per channel; keep the strongest channel
//! m      = |dx| + |dy|
//! keep m > low that is a local maximum across the edge (4 directions, 22.5° sectors)
//! edges  = kept pixels 8-connected to one with m > high
//! ```

use image::RgbImage;

/// Edges of `img` (white on black, RGB) with hysteresis thresholds `low` and `high` on the
/// L1 gradient magnitude (OpenCV floors them and swaps them when `low > high`).
pub fn canny(img: &RgbImage, low: f64, high: f64) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (mut low, mut high) = (low.floor() as i32, high.floor() as i32);
    if low > high {
        std::mem::swap(&mut low, &mut high);
    }
    let (dx, dy, mag) = gradients(img);
    // Magnitudes with a zero border, so that neighbours outside the image never win.
    let (pw, ph) = (w + 2, h + 2);
    let mut padded = vec![0i32; pw * ph];
    for y in 0..h {
        padded[(y + 1) * pw + 1..(y + 1) * pw + 1 + w].copy_from_slice(&mag[y * w..(y + 1) * w]);
    }
    let at = |x: isize, y: isize| padded[(y + 1) as usize * pw + (x + 1) as usize];

    // 0: candidate (a local maximum above `low`), 1: not an edge, 2: edge.
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    const SHIFT: u32 = 15;
    let tg22 = (0.414_213_562_373_095_f64 * f64::from(1 << SHIFT) + 0.5) as i64;
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xi, yi) = (x as isize, y as isize);
            let (gx, gy) = (i64::from(dx[i]), i64::from(dy[i]));
            let ax = gx.abs();
            let ay = gy.abs() << SHIFT;
            let tg22x = ax * tg22;
            let maximum = if ay < tg22x {
                // Edge across x: compare left and right.
                m > at(xi - 1, yi) && m >= at(xi + 1, yi)
            } else if ay > tg22x + (ax << (SHIFT + 1)) {
                // Edge across y: compare above and below.
                m > at(xi, yi - 1) && m >= at(xi, yi + 1)
            } else {
                let s: isize = if (gx ^ gy) < 0 { -1 } else { 1 };
                m > at(xi - s, yi - 1) && m > at(xi + s, yi + 1)
            };
            if !maximum {
                continue;
            }
            map[i] = 0;
            if m > high {
                map[i] = 2;
                stack.push((x, y));
            }
        }
    }
    // Hysteresis: every candidate 8-connected to an edge becomes one.
    while let Some((x, y)) = stack.pop() {
        for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
            for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                let j = ny * w + nx;
                if map[j] == 0 {
                    map[j] = 2;
                    stack.push((nx, ny));
                }
            }
        }
    }
    let mut out = RgbImage::new(w as u32, h as u32);
    for (p, &v) in out.pixels_mut().zip(&map) {
        let c = if v == 2 { 255 } else { 0 };
        *p = image::Rgb([c, c, c]);
    }
    out
}

/// Per pixel: the Sobel derivatives of the channel with the largest `|dx| + |dy|` (the first
/// such channel) and that magnitude.
fn gradients(img: &RgbImage) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    // Replicated border.
    let px = |x: isize, y: isize, c: usize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        i32::from(raw[(y * w + x) * 3 + c])
    };
    let n = w * h;
    let (mut dx, mut dy, mut mag) = (vec![0i32; n], vec![0i32; n], vec![0i32; n]);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            for c in 0..3 {
                let p = |ox: isize, oy: isize| px(x + ox, y + oy, c);
                let gx = (p(1, -1) + 2 * p(1, 0) + p(1, 1)) - (p(-1, -1) + 2 * p(-1, 0) + p(-1, 1));
                let gy = (p(-1, 1) + 2 * p(0, 1) + p(1, 1)) - (p(-1, -1) + 2 * p(0, -1) + p(1, -1));
                let m = gx.abs() + gy.abs();
                if c == 0 || m > mag[i] {
                    (dx[i], dy[i], mag[i]) = (gx, gy, m);
                }
            }
        }
    }
    (dx, dy, mag)
}
