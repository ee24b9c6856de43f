//! The image descriptor used for pairing, standing in for ResNet-50 features.
//!
//! Layout: the image is block-averaged onto a 6×6 grid (two blocks per world cell along each axis); each block
//! contributes three values, (255 − mean channel)/255 per RGB channel, so the white background is 0 and only
//! objects carry weight. Then six values: the fraction of pixels nearest each palette colour, times
//! [`HISTOGRAM_WEIGHT`]. The whole vector is L2-normalised (an all-background image gives all zeros). Two
//! images with the same colours in the same places therefore have cosine 1, and the cosine falls as colours or
//! positions differ.

use image::RgbImage;

use crate::scene::{Colour, BACKGROUND};

/// Blocks per side of the layout grid.
pub const GRID: u32 = 6;
/// Length of a descriptor.
pub const DESCRIPTOR_DIM: usize = (GRID * GRID * 3) as usize + 6;
/// Weight of the colour histogram relative to the layout part (the histogram ignores position, so it lets two
/// images with the same colours in different places still look somewhat alike).
pub const HISTOGRAM_WEIGHT: f32 = 4.0;

/// The L2-normalised descriptor of an image (any size; empty images give all zeros).
pub fn descriptor(img: &RgbImage) -> Vec<f32> {
    let mut v = vec![0.0f32; DESCRIPTOR_DIM];
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return v;
    }
    let mut hist = [0u32; 6];
    for by in 0..GRID {
        for bx in 0..GRID {
            let (x0, x1) = (
                bx * w / GRID,
                ((bx + 1) * w / GRID).max(bx * w / GRID + 1).min(w),
            );
            let (y0, y1) = (
                by * h / GRID,
                ((by + 1) * h / GRID).max(by * h / GRID + 1).min(h),
            );
            let mut sum = [0f32; 3];
            let mut n = 0f32;
            for y in y0..y1 {
                for x in x0..x1 {
                    let p = img.get_pixel(x, y).0;
                    for c in 0..3 {
                        sum[c] += f32::from(p[c]);
                    }
                    n += 1.0;
                }
            }
            let base = ((by * GRID + bx) * 3) as usize;
            for c in 0..3 {
                v[base + c] = if n > 0.0 {
                    (255.0 - sum[c] / n) / 255.0
                } else {
                    0.0
                };
            }
        }
    }
    for p in img.pixels() {
        let d2 = |c: [u8; 3]| -> i32 {
            (0..3)
                .map(|i| (i32::from(p.0[i]) - i32::from(c[i])).pow(2))
                .sum()
        };
        let (best, bd) = Colour::ALL
            .iter()
            .map(|c| (c.index(), d2(c.rgb())))
            .min_by_key(|x| x.1)
            .expect("six");
        if bd < d2(BACKGROUND) {
            hist[best] += 1;
        }
    }
    let total = (w * h) as f32;
    for (i, &n) in hist.iter().enumerate() {
        v[(GRID * GRID * 3) as usize + i] = HISTOGRAM_WEIGHT * n as f32 / total;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Cosine similarity of two descriptors (dot product; both are unit length or zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
