//! pairuni-toyworld: a small, exactly verifiable multimodal world (see `docs/TOYWORLD.md`).
//!
//! A [`scene::Scene`] is 1–4 coloured shapes on a 3×3 grid. The [`render`] module draws it without
//! anti-aliasing; [`detect`] reads any image back into detections and a scene, exactly on clean renders. The
//! [`text`] module is the world's grammar (questions, GenEval-style prompts, captions, the vocabulary) and
//! parses its own output back, which is what lets the [`oracle`] teacher's completions be verified against the
//! detector. [`descriptor`] is the fixed image feature used for pairing, and [`generate`] writes the training
//! pools and the held-out benchmarks (toy-GenEval, toy-POPE, toy-MCQ) in the real benchmarks' file formats.

pub mod atomic;
pub mod config;
pub mod descriptor;
pub mod detect;
pub mod generate;
pub mod oracle;
pub mod render;
pub mod scene;
pub mod text;

pub use detect::{detect, read_scene, scene_from_detections, Detection};
pub use image::RgbImage;
pub use render::render;
pub use scene::{Cell, Colour, Kind, Object, Relation, Scene, Shape};
