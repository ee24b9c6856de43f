//! The renderer: scenes to hard-edged RGB images, and the geometry both renderer and detector share.

use image::{Rgb, RgbImage};

use crate::scene::{Cell, Scene, Shape, BACKGROUND};

/// Default canvas side in pixels.
pub const DEFAULT_SIZE: u32 = 32;
/// Smallest canvas side for which shapes stay distinguishable and the detector exact.
pub const MIN_SIZE: u32 = 32;

/// Why a scene could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// Canvas side below [`MIN_SIZE`].
    #[error("canvas size {0} px is below the minimum of {MIN_SIZE} px")]
    TooSmall(u32),
}

/// Pixel rectangle `[x0, y0, x1, y1)` (end-exclusive) of cell `cell` on a `size`-pixel canvas.
pub fn cell_rect(size: u32, cell: Cell) -> [u32; 4] {
    let (r, c) = (u32::from(cell.row), u32::from(cell.col));
    [
        c * size / 3,
        r * size / 3,
        (c + 1) * size / 3,
        (r + 1) * size / 3,
    ]
}

/// Side in pixels of every object drawn on a `size`-pixel canvas: 4/5 of the smallest cell, leaving gaps of
/// at least two background pixels between neighbours so same-coloured objects never touch.
pub fn object_side(size: u32) -> u32 {
    (size / 3) * 4 / 5
}

/// Codes per side of the toy image tokenizer's grid; object boxes snap to it (see [`object_rect`]).
pub const LATTICE: u32 = 8;

/// Pixel box `[x0, y0, x1, y1)` of the object drawn in `cell`.
///
/// When the canvas divides into the [`LATTICE`] (32 px → 4 px steps, 64 px → 8 px) and the object side is two
/// steps, the box starts on the lattice step nearest the cell centre that keeps it inside the cell (at most
/// 2 px from centred at 32 px). Every object is then exactly 2×2 image codes with the same four patches
/// wherever it stands: the patch codebook represents every scene exactly and a from-scratch toy model can
/// learn to draw and read shapes within a CPU budget (docs/DESIGN.md, "objects on the code lattice").
/// Otherwise the box is centred in the cell.
pub fn object_rect(size: u32, cell: Cell) -> [u32; 4] {
    let d = object_side(size);
    let x0 = object_start(size, u32::from(cell.col), d);
    let y0 = object_start(size, u32::from(cell.row), d);
    [x0, y0, x0 + d, y0 + d]
}

/// First pixel, along one axis of `size` pixels, of a `side`-pixel object in row or column `index` (0..3):
/// the lattice rule of [`object_rect`], shared with the detector so both agree on where objects stand.
pub fn object_start(size: u32, index: u32, side: u32) -> u32 {
    let (c0, c1) = (index * size / 3, (index + 1) * size / 3);
    let centred = c0 + (c1 - c0).saturating_sub(side) / 2;
    let step = size / LATTICE;
    if !size.is_multiple_of(LATTICE) || side != 2 * step {
        return centred;
    }
    let lo = c0.div_ceil(step) * step;
    (lo..=c1.saturating_sub(side))
        .step_by(step as usize)
        .min_by_key(|&x| (x.abs_diff(centred), x))
        .unwrap_or(centred)
}

/// Whether pixel `(x, y)` of a `w`×`h` box belongs to `shape` drawn to fill that box.
///
/// Every shape touches all four sides of its box, so a rendered object's bounding box is exactly its box and
/// the detector can re-draw the ideal shape inside a component's bounding box and compare pixel by pixel.
pub fn shape_mask(shape: Shape, w: u32, h: u32, x: u32, y: u32) -> bool {
    let (wf, hf, xf, yf) = (w as f32, h as f32, x as f32, y as f32);
    match shape {
        Shape::Square => x < w && y < h,
        Shape::Circle => {
            let dx = (xf + 0.5 - wf / 2.0) / (wf / 2.0);
            let dy = (yf + 0.5 - hf / 2.0) / (hf / 2.0);
            dx * dx + dy * dy <= 1.0
        }
        Shape::Triangle => {
            // Apex up: the half-width grows linearly to w/2 at the bottom edge of the last row; a pixel is in
            // when its span overlaps the row's interval, which keeps the one- or two-pixel apex row.
            let half = (yf + 1.0) / hf * wf / 2.0;
            y < h && xf + 1.0 > wf / 2.0 - half && xf < wf / 2.0 + half
        }
    }
}

/// Renders `scene` on a white `size`×`size` canvas, deterministically and without anti-aliasing.
pub fn render(scene: &Scene, size: u32) -> Result<RgbImage, RenderError> {
    if size < MIN_SIZE {
        return Err(RenderError::TooSmall(size));
    }
    let mut img = RgbImage::from_pixel(size, size, Rgb(BACKGROUND));
    for o in scene.objects() {
        let [x0, y0, x1, y1] = object_rect(size, o.cell);
        let (w, h) = (x1 - x0, y1 - y0);
        for y in 0..h {
            for x in 0..w {
                if shape_mask(o.shape, w, h, x, y) {
                    img.put_pixel(x0 + x, y0 + y, Rgb(o.colour.rgb()));
                }
            }
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_touch_all_sides_and_differ() {
        for side in [8u32, 9, 16, 17, 33] {
            let mut masks = Vec::new();
            for shape in Shape::ALL {
                let m: Vec<bool> = (0..side * side)
                    .map(|i| shape_mask(shape, side, side, i % side, i / side))
                    .collect();
                let on = |x: u32, y: u32| m[(y * side + x) as usize];
                assert!((0..side).any(|x| on(x, 0)), "{shape:?} {side} top");
                assert!(
                    (0..side).any(|x| on(x, side - 1)),
                    "{shape:?} {side} bottom"
                );
                assert!((0..side).any(|y| on(0, y)), "{shape:?} {side} left");
                assert!((0..side).any(|y| on(side - 1, y)), "{shape:?} {side} right");
                masks.push(m);
            }
            assert_ne!(masks[0], masks[1]);
            assert_ne!(masks[1], masks[2]);
            assert_ne!(masks[0], masks[2]);
        }
    }

    #[test]
    fn too_small_canvas_is_an_error() {
        assert_eq!(
            render(&Scene::default(), 31),
            Err(RenderError::TooSmall(31))
        );
    }

    #[test]
    fn objects_stay_in_their_cell_and_keep_a_gap() {
        for size in [32u32, 33, 48, 64, 100] {
            for cell in Cell::all() {
                let [x0, y0, x1, y1] = object_rect(size, cell);
                let [cx0, cy0, cx1, cy1] = cell_rect(size, cell);
                assert!(
                    x0 >= cx0 && y0 >= cy0 && x1 <= cx1 && y1 <= cy1,
                    "{size} {cell:?}"
                );
                // Neighbours in the next column / row are at least two background pixels away.
                for (dr, dc) in [(0u8, 1u8), (1, 0)] {
                    if let Some(n) = Cell::new(cell.row + dr, cell.col + dc) {
                        let [nx0, ny0, _, _] = object_rect(size, n);
                        if dc == 1 {
                            assert!(nx0 >= x1 + 2, "{size} {cell:?} → {n:?}");
                        } else {
                            assert!(ny0 >= y1 + 2, "{size} {cell:?} → {n:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn objects_sit_on_the_code_lattice_at_32_and_64_px() {
        for size in [32u32, 64] {
            let step = size / LATTICE;
            assert_eq!(object_side(size), 2 * step, "{size}");
            for cell in Cell::all() {
                let [x0, y0, x1, y1] = object_rect(size, cell);
                let [cx0, cy0, cx1, cy1] = cell_rect(size, cell);
                assert_eq!((x0 % step, y0 % step), (0, 0), "{size} {cell:?}");
                // At most half a lattice step from the centred position.
                let centre_x = (cx0 + cx1) as f32 / 2.0;
                let centre_y = (cy0 + cy1) as f32 / 2.0;
                assert!(((x0 + x1) as f32 / 2.0 - centre_x).abs() <= step as f32 / 2.0);
                assert!(((y0 + y1) as f32 / 2.0 - centre_y).abs() <= step as f32 / 2.0);
            }
        }
    }
}
