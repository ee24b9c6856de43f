//! The toy world's fixed image descriptor (block-averaged colour planes + colour histogram) as an encoder.

use super::ImageEncoder;
use crate::error::Result;
use image::RgbImage;
use pairuni_toyworld::descriptor::{descriptor, DESCRIPTOR_DIM};
use rayon::prelude::*;

/// The default encoder: `pairuni_toyworld::descriptor`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ToyDescriptor;

impl ImageEncoder for ToyDescriptor {
    fn id(&self) -> String {
        format!("toy-descriptor-v1-{DESCRIPTOR_DIM}")
    }

    fn dim(&self) -> usize {
        DESCRIPTOR_DIM
    }

    fn encode_batch(&self, images: &[RgbImage]) -> Result<Vec<f32>> {
        Ok(images.par_iter().flat_map_iter(descriptor).collect())
    }
}
