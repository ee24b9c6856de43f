//! The detector, the world's stand-in for GenEval's Mask2Former: image → coloured shapes with boxes.
//!
//! Pixels are snapped to the nearest palette colour (or background, or "unknown" when nothing is close),
//! 4-connected components are taken per colour and specks are dropped. Each component is then compared with
//! what the renderer would draw: every ideal shape at the renderer's object size, centred in the cell that
//! holds the component (allowing a small shift). The best match gives the shape, and its fit — matched pixels
//! over component ∪ ideal ∪ foreign (non-background) pixels around the ideal — gives the confidence. So a
//! clean render is read exactly with confidence 1, a near-clean one (a few damaged pixels) stays confident,
//! and the ragged, wrongly sized, off-centre or cluttered blobs of a noise image (e.g. an untrained model's
//! patch mosaic) fall below GenEval's 0.3 or are dropped. It never panics on any image.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::render::{object_side, object_start, shape_mask};
use crate::scene::{Cell, Colour, Object, Scene, Shape, BACKGROUND};

/// One detected object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Best-matching shape.
    pub shape: Shape,
    /// Palette colour of the component.
    #[serde(rename = "color")]
    pub colour: Colour,
    /// Bounding box `[x0, y0, x1, y1)` in pixels, end-exclusive.
    pub bbox: [u32; 4],
    /// Number of pixels in the component.
    pub area: u32,
    /// In [0, 1]: 1 for a clean rendered object. It is the fit (matched pixels over component ∪ ideal ∪
    /// foreign pixels near the ideal) of the ideal shape at the renderer's size and place, mapped so that
    /// [`DetectorParams::fit_floor`] gives 0: it falls as the component is too big, too small, ragged,
    /// off-centre or cluttered.
    pub confidence: f32,
}

impl Detection {
    /// Centre of the bounding box in pixels.
    pub fn centre(&self) -> (f32, f32) {
        let [x0, y0, x1, y1] = self.bbox;
        ((x0 + x1) as f32 / 2.0, (y0 + y1) as f32 / 2.0)
    }

    /// The grid cell that holds the box centre on a `width`×`height` canvas.
    pub fn cell(&self, width: u32, height: u32) -> Cell {
        let (cx, cy) = self.centre();
        let col = ((cx * 3.0 / width.max(1) as f32) as u8).min(2);
        let row = ((cy * 3.0 / height.max(1) as f32) as u8).min(2);
        Cell { row, col }
    }
}

/// Detector settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorParams {
    /// A pixel further than this (Euclidean RGB) from every palette colour and the background is ignored.
    pub max_colour_distance: f32,
    /// Components smaller than this fraction of an ideal object's box area are specks and dropped.
    pub min_area_fraction: f32,
    /// How far (fraction of the object side) the fitted box may shift from the cell's rendered object box.
    pub max_shift_fraction: f32,
    /// Fit (see [`Detection::confidence`]) that maps to confidence 0; a perfect fit maps to 1.
    pub fit_floor: f32,
    /// Exponent of the fit-to-confidence map `1 - ((1 - fit) / (1 - fit_floor))^fit_gamma`; above 1 it keeps
    /// slightly damaged objects near 1 while ragged blobs still fall fast.
    pub fit_gamma: f32,
    /// Detections with confidence below this are dropped.
    pub min_confidence: f32,
}

impl Default for DetectorParams {
    fn default() -> Self {
        // Palette entries are ≥ ~80 apart, so half of that keeps classification unambiguous; a triangle
        // covers ~60 % of its box, so 10 % of a box is well below any real object. A shift of 1/8 of the
        // side (1 px at 32 px) tolerates a slightly misplaced object but not one straddling cells. Floor 0.43
        // and exponent 1.5 put GenEval's 0.3 threshold at a fit of 0.55 (over 2000 patch-mosaic noise images
        // a fit ≥ 0.5 came up 0.002 times per image at 32 px, never ≥ 0.25 at 64 px) and its counting 0.9 at
        // a fit of 0.88 (a render with 2 % salted pixels keeps about 0.98 on average); min_confidence only
        // drops hopeless blobs early.
        DetectorParams {
            max_colour_distance: 60.0,
            min_area_fraction: 0.1,
            max_shift_fraction: 0.125,
            fit_floor: 0.43,
            fit_gamma: 1.5,
            min_confidence: 0.05,
        }
    }
}

const UNKNOWN: u8 = 254;
const BG: u8 = 255;

/// Detects objects with default parameters. Sorted top-to-bottom, left-to-right by box corner.
pub fn detect(img: &RgbImage) -> Vec<Detection> {
    detect_with(img, &DetectorParams::default())
}

/// Detects objects with explicit parameters.
pub fn detect_with(img: &RgbImage, params: &DetectorParams) -> Vec<Detection> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Vec::new();
    }
    let labels = classify_pixels(img, params.max_colour_distance);
    let side = object_side(w.min(h)).max(1);
    let masks = ShapeMasks::new(side);
    let min_area = (params.min_area_fraction * (side * side) as f32).max(1.0);
    // Component id per pixel (0 = none) so a fit can tell the component's own pixels from clutter.
    let mut comp = vec![0u32; labels.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    let mut pixels = Vec::new();
    let mut next_id = 0u32;
    for start in 0..labels.len() {
        let label = labels[start];
        if comp[start] != 0 || label == BG || label == UNKNOWN {
            continue;
        }
        next_id += 1;
        // Flood fill with an explicit stack: recursion would overflow on a large noisy image.
        pixels.clear();
        comp[start] = next_id;
        stack.push(start);
        while let Some(p) = stack.pop() {
            pixels.push(p);
            let (x, y) = ((p % w as usize) as u32, (p / w as usize) as u32);
            let mut visit = |q: usize| {
                if comp[q] == 0 && labels[q] == label {
                    comp[q] = next_id;
                    stack.push(q);
                }
            };
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < w {
                visit(p + 1);
            }
            if y > 0 {
                visit(p - w as usize);
            }
            if y + 1 < h {
                visit(p + w as usize);
            }
        }
        if (pixels.len() as f32) < min_area {
            continue;
        }
        let component = Component {
            id: next_id,
            pixels: &pixels,
            comp: &comp,
            labels: &labels,
            width: w,
            height: h,
        };
        let d = classify_component(&component, &masks, params, Colour::ALL[label as usize]);
        if d.confidence >= params.min_confidence {
            out.push(d);
        }
    }
    out.sort_by_key(|d| (d.bbox[1], d.bbox[0]));
    out
}

fn classify_pixels(img: &RgbImage, max_dist: f32) -> Vec<u8> {
    let max_d2 = max_dist * max_dist;
    img.pixels()
        .map(|p| {
            let d2 = |c: [u8; 3]| -> f32 {
                (0..3)
                    .map(|i| (f32::from(p.0[i]) - f32::from(c[i])).powi(2))
                    .sum()
            };
            let mut best = (d2(BACKGROUND), BG);
            for colour in Colour::ALL {
                let d = d2(colour.rgb());
                if d < best.0 {
                    best = (d, colour.index() as u8);
                }
            }
            if best.0 > max_d2 {
                UNKNOWN
            } else {
                best.1
            }
        })
        .collect()
}

/// The ideal rendered mask of each shape at the canvas's object side, row-major.
struct ShapeMasks {
    side: u32,
    masks: [Vec<bool>; 3],
}

impl ShapeMasks {
    fn new(side: u32) -> Self {
        let mask = |shape| {
            (0..side * side)
                .map(|i| shape_mask(shape, side, side, i % side, i / side))
                .collect()
        };
        ShapeMasks {
            side,
            masks: Shape::ALL.map(mask),
        }
    }
}

/// One connected component and the image-wide maps it lives in.
struct Component<'a> {
    id: u32,
    pixels: &'a [usize],
    comp: &'a [u32],
    labels: &'a [u8],
    width: u32,
    height: u32,
}

/// Fit of the ideal `shape` drawn with its top-left corner at `(ox, oy)` to the component: matched
/// component pixels over (component ∪ ideal ∪ foreign pixels in the ideal's window). Foreign means any
/// non-background pixel of another component or of no palette colour, in the ideal box plus a one-pixel ring:
/// a rendered object sits on clean background, a patch of noise does not.
fn fit(c: &Component, masks: &ShapeMasks, shape: usize, ox: i64, oy: i64) -> f32 {
    let s = i64::from(masks.side);
    let (w, h) = (i64::from(c.width), i64::from(c.height));
    let mask = &masks.masks[shape];
    let (mut inter, mut ideal, mut foreign) = (0u32, 0u32, 0u32);
    for y in oy - 1..oy + s + 1 {
        for x in ox - 1..ox + s + 1 {
            let inside = (0..s).contains(&(x - ox)) && (0..s).contains(&(y - oy));
            let want = inside && mask[((y - oy) * s + (x - ox)) as usize];
            ideal += u32::from(want);
            if !(0..w).contains(&x) || !(0..h).contains(&y) {
                continue;
            }
            let p = (y * w + x) as usize;
            if c.comp[p] == c.id {
                inter += u32::from(want);
            } else if c.labels[p] != BG {
                foreign += 1;
            }
        }
    }
    let union = c.pixels.len() as u32 + ideal - inter + foreign;
    if union == 0 {
        0.0
    } else {
        inter as f32 / union as f32
    }
}

fn classify_component(
    c: &Component,
    masks: &ShapeMasks,
    params: &DetectorParams,
    colour: Colour,
) -> Detection {
    let w = c.width as usize;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for &p in c.pixels {
        let (x, y) = (p % w, p / w);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x + 1);
        y1 = y1.max(y + 1);
    }
    // The renderer draws every object at one size where `object_start` puts it in its cell: fit the ideal
    // shapes there, allowing a small shift, in the cell that holds the component's box centre.
    let side = masks.side;
    let (cx2, cy2) = ((x0 + x1) as u32, (y0 + y1) as u32);
    let col = (cx2 * 3 / (2 * c.width)).min(2);
    let row = (cy2 * 3 / (2 * c.height)).min(2);
    let bx = i64::from(object_start(c.width, col, side));
    let by = i64::from(object_start(c.height, row, side));
    let shift = (params.max_shift_fraction * side as f32).round().max(0.0) as i64;
    let mut best = (Shape::Square, -1.0f32);
    for (k, shape) in Shape::ALL.into_iter().enumerate() {
        for dy in -shift..=shift {
            for dx in -shift..=shift {
                let f = fit(c, masks, k, bx + dx, by + dy);
                if f > best.1 {
                    best = (shape, f);
                }
            }
        }
    }
    let floor = params.fit_floor.clamp(0.0, 0.99);
    let miss = ((1.0 - best.1) / (1.0 - floor)).clamp(0.0, 1.0);
    let confidence = (1.0 - miss.powf(params.fit_gamma.max(0.01))).clamp(0.0, 1.0);
    Detection {
        shape: best.0,
        colour,
        bbox: [x0 as u32, y0 as u32, x1 as u32, y1 as u32],
        area: c.pixels.len() as u32,
        confidence,
    }
}

/// Detections below this confidence (GenEval's threshold) are not objects of a scene reading.
pub const SCENE_MIN_CONFIDENCE: f32 = 0.3;

/// Maps detections to a scene: each with confidence ≥ [`SCENE_MIN_CONFIDENCE`] goes to the cell of its box
/// centre; when several share a cell, the most confident one wins (ties: the larger).
pub fn scene_from_detections(detections: &[Detection], width: u32, height: u32) -> Scene {
    let mut best: [Option<&Detection>; 9] = [None; 9];
    for d in detections
        .iter()
        .filter(|d| d.confidence >= SCENE_MIN_CONFIDENCE)
    {
        let slot = &mut best[d.cell(width, height).index()];
        let better = match slot {
            None => true,
            Some(old) => (d.confidence, d.area) > (old.confidence, old.area),
        };
        if better {
            *slot = Some(d);
        }
    }
    let objects = best
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            d.map(|d| Object {
                shape: d.shape,
                colour: d.colour,
                cell: Cell::from_index(i).expect("0..9"),
            })
        })
        .collect();
    Scene::new(objects).expect("one object per cell by construction")
}

/// The detector's reading of an image as a scene.
pub fn read_scene(img: &RgbImage) -> Scene {
    scene_from_detections(&detect(img), img.width(), img.height())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::render;
    use image::Rgb;
    use rand::{Rng, SeedableRng};

    #[test]
    fn clean_render_is_read_back_with_full_confidence() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..300 {
            let scene = Scene::random(&mut rng, 1, 9);
            let img = render(&scene, 32).unwrap();
            let dets = detect(&img);
            assert!(dets.iter().all(|d| d.confidence == 1.0));
            assert_eq!(scene_from_detections(&dets, 32, 32), scene);
        }
    }

    #[test]
    fn noise_never_panics_and_confidence_stays_in_range() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for size in [1u32, 5, 32, 64] {
            for _ in 0..20 {
                let img = RgbImage::from_fn(size, size + 3, |_, _| {
                    Rgb([rng.random(), rng.random(), rng.random()])
                });
                for d in detect(&img) {
                    assert!((0.0..=1.0).contains(&d.confidence));
                }
            }
        }
        assert!(detect(&RgbImage::new(0, 0)).is_empty());
    }

    #[test]
    fn a_damaged_shape_loses_confidence_and_a_speck_is_dropped() {
        let scene = Scene::new(vec![Object {
            shape: Shape::Square,
            colour: Colour::Blue,
            cell: Cell::new(1, 1).unwrap(),
        }])
        .unwrap();
        let mut img = render(&scene, 32).unwrap();
        let [x0, y0, _, _] = crate::render::object_rect(32, Cell::new(1, 1).unwrap());
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0)] {
            img.put_pixel(x0 + dx, y0 + dy, Rgb(BACKGROUND));
        }
        img.put_pixel(0, 0, Rgb(Colour::Red.rgb()));
        let dets = detect(&img);
        assert_eq!(dets.len(), 1);
        assert!(
            dets[0].confidence < 1.0 && dets[0].confidence > 0.5,
            "{}",
            dets[0].confidence
        );
    }

    fn one_square_scene() -> (Scene, RgbImage) {
        let scene = Scene::new(vec![Object {
            shape: Shape::Square,
            colour: Colour::Green,
            cell: Cell::new(1, 1).unwrap(),
        }])
        .unwrap();
        let img = render(&scene, 32).unwrap();
        (scene, img)
    }

    fn fill(img: &mut RgbImage, rect: [u32; 4], colour: Colour) {
        for y in rect[1]..rect[3] {
            for x in rect[0]..rect[2] {
                img.put_pixel(x, y, Rgb(colour.rgb()));
            }
        }
    }

    #[test]
    fn wrong_size_straddling_or_cluttered_blobs_are_not_confident() {
        let blank = || RgbImage::from_pixel(32, 32, Rgb(BACKGROUND));
        // Twice the object side, centred on the middle cell.
        let mut big = blank();
        fill(&mut big, [8, 8, 24, 24], Colour::Red);
        // The right size, but centred on the border between two cells.
        let mut straddling = blank();
        fill(&mut straddling, [7, 12, 15, 20], Colour::Red);
        // Half the object side.
        let mut small = blank();
        fill(&mut small, [13, 13, 17, 17], Colour::Red);
        for (name, img) in [("big", big), ("straddling", straddling), ("small", small)] {
            let dets = detect(&img);
            assert!(dets.iter().all(|d| d.confidence < 0.3), "{name}: {dets:?}");
            assert!(read_scene(&img).is_empty(), "{name}");
        }
        // A clean square in a frame of other colours: it is not on background, so it loses confidence.
        let (scene, mut img) = one_square_scene();
        let [x0, y0, x1, y1] = crate::render::object_rect(32, Cell::new(1, 1).unwrap());
        fill(&mut img, [x0 - 1, y0 - 1, x1 + 1, y0], Colour::Blue);
        fill(&mut img, [x0 - 1, y1, x1 + 1, y1 + 1], Colour::Yellow);
        fill(&mut img, [x0 - 1, y0, x0, y1], Colour::Purple);
        fill(&mut img, [x1, y0, x1 + 1, y1], Colour::Orange);
        let green: Vec<_> = detect(&img)
            .into_iter()
            .filter(|d| d.colour == Colour::Green)
            .collect();
        assert_eq!(green.len(), 1);
        assert!(green[0].confidence < 0.9, "{}", green[0].confidence);
        assert_eq!(scene.len(), 1);
    }

    #[test]
    fn a_one_pixel_shift_keeps_the_reading() {
        let (scene, img) = one_square_scene();
        let shifted = RgbImage::from_fn(32, 32, |x, y| {
            if x == 0 {
                Rgb(BACKGROUND)
            } else {
                *img.get_pixel(x - 1, y)
            }
        });
        let dets = detect(&shifted);
        assert_eq!(dets.len(), 1);
        assert_eq!(dets[0].confidence, 1.0);
        assert_eq!(read_scene(&shifted), scene);
    }
}
