//! The image tokenizer interface: RGB images ⇄ grids of discrete codes.
//!
//! Janus generates images as a sequence of codes that an image tokenizer turns back into pixels. Two tokenizers
//! implement [`ImageTokenizer`]: the Janus VQ model ([`crate::vq::JanusVq`], real checkpoints) and the toy
//! world's patch codebook ([`crate::patch_codebook::PatchCodebook`]). Codes are in row-major grid order.
//!
//! Pixel tensors use Janus' "model space": `[B, 3, H, W]` f32 with `x = (u8 / 255 - 0.5) / 0.5`, i.e. [-1, 1].

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pairuni_data::RgbImage;

/// Errors of the image tokenizers (VQ model and patch codebook).
#[derive(Debug, thiserror::Error)]
pub enum ImageTokenizerError {
    /// A file could not be read, parsed or written; names the file.
    #[error("{path}: {msg}")]
    File {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An image of the wrong size was given.
    #[error("image is {width}x{height} but this image tokenizer expects {expected}x{expected}")]
    ImageSize {
        /// Width of the given image.
        width: u32,
        /// Height of the given image.
        height: u32,
        /// The side length the tokenizer works at.
        expected: usize,
    },
    /// A code sequence has the wrong length.
    #[error("image {index}: expected {expected} codes, got {got}")]
    CodeCount {
        /// Which image of the batch.
        index: usize,
        /// Codes per image of this tokenizer.
        expected: usize,
        /// Codes given.
        got: usize,
    },
    /// A code is not below the codebook size.
    #[error(
        "image {index}, position {position}: code {code} is out of range (codebook size {size})"
    )]
    CodeOutOfRange {
        /// Which image of the batch.
        index: usize,
        /// Position in the code grid.
        position: usize,
        /// The offending code.
        code: u32,
        /// Codebook size.
        size: usize,
    },
    /// An invalid argument or configuration.
    #[error("{0}")]
    Invalid(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of the image tokenizers.
pub type Result<T> = std::result::Result<T, ImageTokenizerError>;

/// Maps square RGB images of one size to `grid().0 * grid().1` codes and back.
pub trait ImageTokenizer: Send + Sync {
    /// Codes of one image (row-major over the grid).
    fn encode(&self, img: &RgbImage) -> Result<Vec<u32>> {
        let mut out = self.encode_batch(std::slice::from_ref(img))?;
        Ok(out.remove(0))
    }
    /// Codes of several images at once.
    fn encode_batch(&self, imgs: &[RgbImage]) -> Result<Vec<Vec<u32>>>;
    /// Images for code sequences (one `Vec` per image).
    fn decode(&self, codes: &[Vec<u32>]) -> Result<Vec<RgbImage>> {
        if codes.is_empty() {
            return Ok(Vec::new());
        }
        let t = self.codes_to_tensor(codes)?;
        let px = self.decode_tensor(&t)?;
        pixels_to_rgb(&px)
    }
    /// Batched decode on tensors: codes `[B, N]` (u32) → pixels `[B, 3, H, W]` f32 in model space.
    fn decode_tensor(&self, codes: &Tensor) -> Result<Tensor>;
    /// Number of distinct codes.
    fn codebook_size(&self) -> usize;
    /// Code grid (rows, cols).
    fn grid(&self) -> (usize, usize);
    /// Side length in pixels of the square images this tokenizer reads and writes.
    fn image_size(&self) -> usize;
    /// Device the tensor methods run on.
    fn device(&self) -> &Device;
    /// Codes per image.
    fn tokens_per_image(&self) -> usize {
        let (r, c) = self.grid();
        r * c
    }
    /// Checks lengths and ranges and packs codes into a `[B, N]` u32 tensor on [`Self::device`].
    fn codes_to_tensor(&self, codes: &[Vec<u32>]) -> Result<Tensor> {
        check_codes(codes, self.tokens_per_image(), self.codebook_size())?;
        let flat: Vec<u32> = codes.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            flat,
            (codes.len(), self.tokens_per_image()),
            self.device(),
        )?)
    }
}

/// Checks that every sequence has `n` codes below `size`.
pub fn check_codes(codes: &[Vec<u32>], n: usize, size: usize) -> Result<()> {
    for (index, c) in codes.iter().enumerate() {
        if c.len() != n {
            return Err(ImageTokenizerError::CodeCount {
                index,
                expected: n,
                got: c.len(),
            });
        }
        if let Some(position) = c.iter().position(|&x| x as usize >= size) {
            return Err(ImageTokenizerError::CodeOutOfRange {
                index,
                position,
                code: c[position],
                size,
            });
        }
    }
    Ok(())
}

/// Fails unless `img` is `size`×`size`.
pub fn check_image_size(img: &RgbImage, size: usize) -> Result<()> {
    if img.width() as usize != size || img.height() as usize != size {
        return Err(ImageTokenizerError::ImageSize {
            width: img.width(),
            height: img.height(),
            expected: size,
        });
    }
    Ok(())
}

/// One u8 channel value in model space: Janus' `(x * (1/255) - 0.5) / 0.5`, in f32 like the reference.
pub fn u8_to_model(v: u8) -> f32 {
    (v as f32 * (1.0f32 / 255.0) - 0.5) / 0.5
}

/// One model-space value back to u8: `(x + 1) * 127.5`, clamped to [0, 255].
///
/// Rounds to nearest where Janus' postprocess truncates, so that a value that came from a u8 comes back as the
/// same u8 despite float error (the two differ by at most one level).
pub fn model_to_u8(x: f32) -> u8 {
    ((x + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// Images → `[B, 3, H, W]` f32 model-space pixels on `device` (all images must have the same size).
pub fn rgb_to_pixels(imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = imgs
        .first()
        .ok_or_else(|| ImageTokenizerError::Invalid("no images given".into()))?;
    let (w, h) = (first.width() as usize, first.height() as usize);
    let mut data = Vec::with_capacity(imgs.len() * 3 * h * w);
    for img in imgs {
        if img.width() as usize != w || img.height() as usize != h {
            return Err(ImageTokenizerError::ImageSize {
                width: img.width(),
                height: img.height(),
                expected: w,
            });
        }
        let raw = img.as_raw();
        for c in 0..3 {
            data.extend(raw.iter().skip(c).step_by(3).map(|&v| u8_to_model(v)));
        }
    }
    Ok(Tensor::from_vec(data, (imgs.len(), 3, h, w), device)?)
}

/// `[B, 3, H, W]` model-space pixels (any float dtype/device) → images.
pub fn pixels_to_rgb(px: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = px.dims4()?;
    if c != 3 {
        return Err(ImageTokenizerError::Invalid(format!(
            "expected 3 channels, got {c}"
        )));
    }
    // HWC order on the tensor side so each image is one contiguous copy.
    let hwc = px
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v: Vec<u8> = hwc
            .get(i)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(model_to_u8)
            .collect();
        let img = RgbImage::from_raw(w as u32, h as u32, v)
            .ok_or_else(|| ImageTokenizerError::Invalid("pixel buffer size mismatch".into()))?;
        out.push(img);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u8_model_roundtrip_is_exact_for_all_values() {
        for v in 0..=255u8 {
            assert_eq!(model_to_u8(u8_to_model(v)), v);
        }
        assert_eq!(u8_to_model(0), -1.0);
        assert_eq!(u8_to_model(255), 1.0);
        assert_eq!(model_to_u8(3.0), 255);
        assert_eq!(model_to_u8(-7.0), 0);
    }

    #[test]
    fn rgb_pixels_roundtrip_keeps_channel_layout() {
        let mut img = RgbImage::new(3, 2);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 40) as u8, (y * 90) as u8, 200]);
        }
        let t = rgb_to_pixels(std::slice::from_ref(&img), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 3]);
        // channel 0 at (y=0, x=2) is the red value 80
        let v = t
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(v, u8_to_model(80));
        let back = pixels_to_rgb(&t).unwrap();
        assert_eq!(back[0], img);
    }

    #[test]
    fn check_codes_reports_index_and_position() {
        let e = check_codes(&[vec![0, 1], vec![1, 9]], 2, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image 1") && e.contains("position 1") && e.contains("code 9"),
            "{e}"
        );
        let e = check_codes(&[vec![0]], 2, 4).unwrap_err().to_string();
        assert!(e.contains("expected 2 codes, got 1"), "{e}");
    }
}
