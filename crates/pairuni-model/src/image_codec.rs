//! Glue between `Janus` and the two image tokenizers: which one a checkpoint uses, and how each is built, saved
//! and copied. The tokenizers themselves live in `vq.rs` and `patch_codebook.rs`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use pairuni_data::RgbImage;

use crate::error::{ModelError, Result};
use crate::image_tokenizer::ImageTokenizer;
use crate::janus::VQ_PREFIX;
use crate::janus_config::{ImageTokenizerKind, JanusConfig};
use crate::patch_codebook::{PatchCodebook, PatchCodebookConfig, FILE_NAME};
use crate::vq::{JanusVq, JanusVqConfig};

/// The image tokenizer a checkpoint generates with.
#[derive(Debug, Clone)]
pub enum ImageCodec {
    /// Janus' VQ-VAE (weights under `model.vqmodel.*`, frozen, kept in f32).
    Vq(Box<JanusVq>),
    /// The toy patch codebook.
    Patch(PatchCodebook),
}

impl ImageCodec {
    /// As the shared trait.
    pub fn as_dyn(&self) -> &dyn ImageTokenizer {
        match self {
            Self::Vq(v) => v.as_ref(),
            Self::Patch(p) => p,
        }
    }
}

fn codec_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint {
        path: path.display().to_string(),
        msg: format!("image tokenizer: {e}"),
    }
}

/// The VQ config for `cfg` (transformers sets num_patches from the vision config; we use the generation grid).
pub fn vq_config(cfg: &JanusConfig) -> JanusVqConfig {
    let q = &cfg.vq_config;
    JanusVqConfig {
        embed_dim: q.embed_dim,
        num_embeddings: q.num_embeddings,
        double_latent: q.double_latent,
        latent_channels: q.latent_channels,
        in_channels: q.in_channels,
        base_channels: q.base_channels,
        channel_multiplier: q.channel_multiplier.clone(),
        num_res_blocks: q.num_res_blocks,
        out_channels: q.out_channels,
        num_patches: cfg.gen_grid(),
    }
}

/// Builds the VQ from the `model.vqmodel.*` tensors of `varmap`, or None when the checkpoint has none.
pub(crate) fn vq_from_varmap(
    cfg: &JanusConfig,
    varmap: &VarMap,
    device: &Device,
    origin: &Path,
) -> Result<Option<ImageCodec>> {
    let tensors: HashMap<String, Tensor> = {
        let data = varmap.data().lock().expect("varmap lock");
        data.iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(VQ_PREFIX)
                    .map(|rest| (rest.to_string(), v.as_tensor().detach()))
            })
            .collect()
    };
    if tensors.is_empty() {
        return Ok(None);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let vq = JanusVq::new(&vq_config(cfg), vb).map_err(|e| codec_err(origin, e))?;
    Ok(Some(ImageCodec::Vq(Box::new(vq))))
}

/// The image tokenizer of checkpoint `dir`.
pub(crate) fn load_image_tokenizer(
    cfg: &JanusConfig,
    dir: &Path,
    varmap: &VarMap,
    device: &Device,
) -> Result<Option<ImageCodec>> {
    match cfg.pairuni.image_tokenizer {
        ImageTokenizerKind::PatchCodebook => {
            let path = dir.join(FILE_NAME);
            if !path.exists() {
                return Err(codec_err(
                    &path,
                    "config says patch_codebook but the file is missing",
                ));
            }
            let pc = PatchCodebook::load(&path, device).map_err(|e| codec_err(&path, e))?;
            check_size(cfg, pc.codebook_size(), &path)?;
            Ok(Some(ImageCodec::Patch(pc)))
        }
        ImageTokenizerKind::JanusVq => vq_from_varmap(cfg, varmap, device, dir),
    }
}

fn check_size(cfg: &JanusConfig, k: usize, path: &Path) -> Result<()> {
    if k != cfg.vq_config.num_embeddings {
        return Err(codec_err(
            path,
            format!(
                "codebook has {k} codes but vq_config.num_embeddings (gen vocabulary) is {}",
                cfg.vq_config.num_embeddings
            ),
        ));
    }
    Ok(())
}

/// Learns the toy patch codebook from world images (K = vq_config.num_embeddings at most).
pub(crate) fn fit_patch_codebook(
    cfg: &JanusConfig,
    images: &[RgbImage],
    seed: u64,
    device: &Device,
) -> Result<ImageCodec> {
    let pc_cfg = PatchCodebookConfig {
        k: cfg.vq_config.num_embeddings,
        patch_size: cfg.gen_patch_size(),
        seed,
        ..PatchCodebookConfig::default()
    };
    let pc = PatchCodebook::train(images, &pc_cfg, device)
        .map_err(|e| ModelError::input(format!("learning the patch codebook: {e}")))?;
    if pc.image_size() != cfg.gen_image_size() {
        return Err(ModelError::input(format!(
            "codebook images are {}px but the config generates {}px images",
            pc.image_size(),
            cfg.gen_image_size()
        )));
    }
    Ok(ImageCodec::Patch(pc))
}

/// Writes the tokenizer's own files into `dir` (the VQ's weights already travel in model.safetensors).
pub(crate) fn save_image_tokenizer(codec: &ImageCodec, dir: &Path) -> Result<()> {
    match codec {
        ImageCodec::Vq(_) => Ok(()),
        ImageCodec::Patch(pc) => {
            let path = dir.join(FILE_NAME);
            pc.save(&path).map_err(|e| codec_err(&path, e))
        }
    }
}
