//! Janus-Pro (and its toy-size twin) in candle: the model every pairuni stage drives.
//!
//! [`JanusConfig`] reads a Hugging Face `config.json`; [`Janus`] holds the weights as trainable candle `Var`s and
//! offers prompting (chat templates, [`tokenizer`]), batched sampling of text answers and CFG image codes with an
//! explicit KV cache ([`llama::KvCache`]), and differentiable teacher-forced log-probs for RL and SFT. The decoder
//! ([`llama`]) and the understanding encoder ([`vision`]) use only basic tensor ops ([`layers`]) so every weight
//! gets a gradient. Images become codes through an [`image_tokenizer::ImageTokenizer`]: Janus' VQ ([`vq`]) for real
//! checkpoints, a k-means patch codebook ([`patch_codebook`]) for the toy world; [`image_codec`] picks one per
//! checkpoint. [`config::ModelConfig`] is the `[model]` section of pairuni's TOML files.

pub mod backward_kernels;
pub mod config;
pub mod conv_kernel;
pub mod decode_attention;
pub mod device;
pub mod draw_kernel;
pub mod error;
pub mod graphs;
pub mod image_codec;
pub mod image_tokenizer;
pub mod janus;
pub mod janus_config;
pub mod kernel_emulator;
pub mod layer_kernels;
pub(crate) mod layers;
pub mod llama;
pub mod norm_kernel;
pub mod nvrtc;
pub mod patch_codebook;
pub mod sampling;
pub mod tokenizer;
mod trained_kernels;
pub mod vision;
pub mod vq;

pub use candle_core::{DType, Device, Tensor, Var};
pub use error::{ModelError, Result};
pub use image_codec::ImageCodec;
pub use janus::{Janus, SharedScoring};
pub use janus_config::{ImageTokenizerKind, JanusConfig, PromptTemplate};
pub use layers::rel_diff;
pub use llama::KvCache;
pub use pairuni_data::RgbImage;
pub use sampling::{
    CfgLogprobPolicy, ImageRollout, ImageSampling, ParamSelection, SamplerSite, TextRollout,
    TextSampling,
};
pub use tokenizer::TextTokenizer;
