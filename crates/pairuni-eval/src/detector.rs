//! The object-detector plug-in of the GenEval scorer, and the toy world's detector behind it.
//!
//! GenEval judges images from detections (class, box, confidence) plus a colour per detection (CLIP in the
//! original). [`Detector`] is that interface; [`ToyDetector`] wraps `pairuni_toyworld::detect` (class = shape
//! name, colour = palette name), and a real detector (e.g. Mask2Former served over HTTP) can be another
//! implementation without touching the scorer.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// One detected object, in the terms GenEval's rules use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Class name as it appears in the metadata's `class` fields.
    pub class: String,
    /// Colour name as in the metadata's `color` fields, when the detector knows it.
    pub color: Option<String>,
    /// Box `[x0, y0, x1, y1]` in pixels.
    pub bbox: [f32; 4],
    /// Detection confidence in [0, 1].
    pub confidence: f32,
}

/// Something that finds objects in an image.
pub trait Detector: Sync {
    /// Every detection in `img`, in any order (the scorer sorts by confidence).
    fn detect(&self, img: &RgbImage) -> Vec<Detection>;
}

/// The toy world's detector: exact (confidence 1) on clean renders; its confidence is the fit of a component
/// to the ideal rendered object in its cell, so noise blobs (wrong size, ragged, off-centre, cluttered) fall
/// below GenEval's 0.3 and are ignored by the scorer, and near-clean objects stay above counting's 0.9.
/// Detections below `pairuni_toyworld::detect::DetectorParams::min_confidence` are not reported at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToyDetector;

impl Detector for ToyDetector {
    fn detect(&self, img: &RgbImage) -> Vec<Detection> {
        pairuni_toyworld::detect(img)
            .into_iter()
            .map(|d| Detection {
                class: d.shape.name().to_string(),
                color: Some(d.colour.name().to_string()),
                bbox: d.bbox.map(|v| v as f32),
                confidence: d.confidence,
            })
            .collect()
    }
}

/// A detector from a closure (tests, adapters).
pub struct FnDetector<F>(pub F);

impl<F: Fn(&RgbImage) -> Vec<Detection> + Sync> Detector for FnDetector<F> {
    fn detect(&self, img: &RgbImage) -> Vec<Detection> {
        (self.0)(img)
    }
}
