//! The architecture config: Hugging Face `config.json` of `JanusForConditionalGeneration`, read as is.
//!
//! Defaults are transformers 5.x's (`JanusConfig`, `JanusVisionConfig`, `JanusVQVAEConfig`, `LlamaConfig`), so a
//! config that omits a field means the same thing here as there. pairuni's own settings (which image tokenizer,
//! which prompt template) live under an extra top-level `"pairuni"` key that transformers ignores.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Which image tokenizer the checkpoint uses for generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImageTokenizerKind {
    /// Janus' VQ-VAE (`model.vqmodel.*` weights in the checkpoint).
    #[default]
    JanusVq,
    /// The toy world's k-means patch codebook (`patch_codebook.safetensors` next to the weights).
    PatchCodebook,
}

/// Which chat template turns questions and prompts into token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptTemplate {
    /// Janus-Pro's `<|User|>: … <|Assistant|>:` format.
    #[default]
    JanusPro,
    /// `<bos> <image>×N question <sep>` / `<bos> prompt <begin_of_image>` for the word-level toy tokenizer.
    Toy,
}

/// pairuni's own keys in config.json (absent in Hugging Face checkpoints: then Janus-Pro defaults apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PairuniExtras {
    /// Image tokenizer used for generation (default janus_vq).
    pub image_tokenizer: ImageTokenizerKind,
    /// Prompt template (default janus_pro).
    pub template: PromptTemplate,
    /// Side of generated images in pixels (default: vq_config.num_patches × 16, i.e. 384 for Janus-Pro).
    pub gen_image_size: Option<usize>,
    /// Side of one generated image code in pixels (default 16 = the VQ downsampling factor).
    pub gen_patch_size: Option<usize>,
}

/// `JanusForConditionalGeneration` config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JanusConfig {
    /// The LLaMA decoder.
    #[serde(default)]
    pub text_config: TextConfig,
    /// The SigLIP-style understanding encoder and its aligner.
    #[serde(default)]
    pub vision_config: VisionConfig,
    /// The VQ image tokenizer, gen embedding, gen aligner and gen head.
    #[serde(default)]
    pub vq_config: VqConfig,
    /// Token id of the image placeholder in understanding prompts (default 100581).
    #[serde(default = "default_image_token_id")]
    pub image_token_id: u32,
    /// Whether lm_head shares the token embedding (default true, transformers' JanusConfig).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Always "janus".
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// pairuni-specific settings.
    #[serde(default)]
    pub pairuni: PairuniExtras,
}

fn default_image_token_id() -> u32 {
    100581
}
fn default_true() -> bool {
    true
}
fn default_model_type() -> String {
    "janus".into()
}

/// rope_parameters of transformers ≥ 5.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// Base of the rotary frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Only "default" is supported.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rope_type() -> String {
    "default".into()
}

/// LlamaConfig (the fields the decoder needs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Text vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); None = num_attention_heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; None = hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    /// Activation of the MLP (only "silu").
    pub hidden_act: String,
    /// Longest sequence the rotary table covers.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Older configs put rope_theta here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 rope settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Bias on q/k/v/o projections.
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Pad token id if the config names one.
    pub pad_token_id: Option<u32>,
    /// Begin-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<serde_json::Value>,
    /// Always "llama".
    pub model_type: String,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            attention_bias: false,
            mlp_bias: false,
            pad_token_id: None,
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::json!(2)),
            model_type: "llama".into(),
        }
    }
}

impl TextConfig {
    /// Key/value heads after defaulting.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Per-head width after defaulting.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// Rotary base after defaulting.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }
    /// First eos id (configs may give a list).
    pub fn eos_id(&self) -> Option<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|v| v.as_u64()).map(|v| v as u32)
            }
            _ => None,
        }
    }
}

/// JanusVisionConfig.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Encoder width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Encoder heads.
    pub num_attention_heads: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// MLP / aligner activation ("gelu" = exact erf GELU).
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// MLP width = hidden_size × mlp_ratio.
    pub mlp_ratio: f64,
    /// Bias on q/k/v.
    pub attention_bias: bool,
    /// Aligner output width (= LM width).
    pub projection_dim: usize,
    /// LayerNorm on q and k (not supported; must be false).
    pub use_qk_norm: bool,
    /// Aligner depth (fc1 + depth−1 hidden layers).
    pub depth: usize,
    /// Image placeholder tokens per image in understanding prompts.
    pub num_image_tokens: usize,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 384,
            patch_size: 16,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            mlp_ratio: 4.0,
            attention_bias: true,
            projection_dim: 2048,
            use_qk_norm: false,
            depth: 2,
            num_image_tokens: 576,
        }
    }
}

impl VisionConfig {
    /// Patch tokens the encoder produces.
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// JanusVQVAEConfig.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VqConfig {
    /// Width of a code embedding (quantizer and gen embedding).
    pub embed_dim: usize,
    /// Codebook size = gen vocabulary.
    pub num_embeddings: usize,
    /// Whether the encoder doubles its latent channels.
    pub double_latent: bool,
    /// Latent channels of the VQ encoder/decoder.
    pub latent_channels: usize,
    /// Image channels in.
    pub in_channels: usize,
    /// Base channel count of the VQ encoder/decoder.
    pub base_channels: usize,
    /// Channel multipliers per resolution.
    pub channel_multiplier: Vec<usize>,
    /// Residual blocks per resolution.
    pub num_res_blocks: usize,
    /// Patches per side (transformers overwrites it with vision image_size / patch_size).
    pub num_patches: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Width of the gen aligner and gen head hidden layer.
    pub projection_dim: usize,
    /// Gen aligner layers.
    pub num_hidden_layers: usize,
    /// Gen aligner / head activation.
    pub hidden_act: String,
    /// Gen head input width (= LM width).
    pub image_token_embed_dim: usize,
}

impl Default for VqConfig {
    fn default() -> Self {
        Self {
            embed_dim: 8,
            num_embeddings: 16384,
            double_latent: false,
            latent_channels: 256,
            in_channels: 3,
            base_channels: 128,
            channel_multiplier: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            num_patches: 32,
            out_channels: 3,
            projection_dim: 2048,
            num_hidden_layers: 2,
            hidden_act: "gelu".into(),
            image_token_embed_dim: 2048,
        }
    }
}

impl JanusConfig {
    /// Parses config.json text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: JanusConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ModelError::Config {
                path: origin.to_string(),
                msg: format!(
                    "field `{}`: {} (line {}, column {})",
                    e.path(),
                    e.inner(),
                    e.inner().line(),
                    e.inner().column()
                ),
            })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Checks the invariants the code relies on.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |msg: String| {
            Err(ModelError::Config {
                path: origin.to_string(),
                msg,
            })
        };
        let t = &self.text_config;
        if t.num_attention_heads == 0
            || t.kv_heads() == 0
            || !t.num_attention_heads.is_multiple_of(t.kv_heads())
        {
            return bad(format!(
                "text_config.num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                t.num_attention_heads,
                t.kv_heads()
            ));
        }
        if !t.head_dim().is_multiple_of(2) {
            return bad("text_config head_dim must be even for rotary embeddings".into());
        }
        if t.hidden_act != "silu" {
            return bad(format!(
                "text_config.hidden_act `{}` unsupported (only silu)",
                t.hidden_act
            ));
        }
        if let Some(r) = &t.rope_parameters {
            if r.rope_type != "default" {
                return bad(format!(
                    "text_config.rope_parameters.rope_type `{}` unsupported",
                    r.rope_type
                ));
            }
        }
        let v = &self.vision_config;
        if v.use_qk_norm {
            return bad("vision_config.use_qk_norm = true is not supported".into());
        }
        if v.num_attention_heads == 0
            || v.patch_size == 0
            || !v.hidden_size.is_multiple_of(v.num_attention_heads)
            || !v.image_size.is_multiple_of(v.patch_size)
        {
            return bad(
                "vision_config: hidden_size must divide by heads and image_size by patch_size"
                    .into(),
            );
        }
        if v.projection_dim != t.hidden_size
            || self.vq_config.image_token_embed_dim != t.hidden_size
        {
            return bad(format!(
                "vision_config.projection_dim ({}) and vq_config.image_token_embed_dim ({}) must equal text hidden_size ({})",
                v.projection_dim, self.vq_config.image_token_embed_dim, t.hidden_size
            ));
        }
        if self.vq_config.num_hidden_layers == 0 || v.depth == 0 {
            return bad("aligner depths must be ≥ 1".into());
        }
        for act in [&v.hidden_act, &self.vq_config.hidden_act] {
            if act != "gelu" && act != "gelu_pytorch_tanh" && act != "silu" {
                return bad(format!("activation `{act}` unsupported"));
            }
        }
        Ok(())
    }

    /// Side of a generated image in pixels.
    pub fn gen_image_size(&self) -> usize {
        self.pairuni
            .gen_image_size
            .unwrap_or(self.gen_grid() * self.gen_patch_size())
    }

    /// Side of one generated code in pixels (the VQ downsampling 2^(levels − 1), 16 for Janus-Pro).
    pub fn gen_patch_size(&self) -> usize {
        self.pairuni
            .gen_patch_size
            .unwrap_or(1 << self.vq_config.channel_multiplier.len().saturating_sub(1))
    }

    /// Codes per side of a generated image.
    pub fn gen_grid(&self) -> usize {
        match self.pairuni.gen_image_size {
            Some(s) => s / self.gen_patch_size(),
            None => self.vision_config.image_size / self.gen_patch_size(),
        }
    }

    /// Codes per generated image (576 for Janus-Pro).
    pub fn image_tokens_per_image(&self) -> usize {
        self.gen_grid() * self.gen_grid()
    }

    /// The toy-world model: about 1.5 M parameters, 32×32 images, 9 understanding and 64 generation tokens.
    ///
    /// The vision encoder sees the image resized to 30 px in 10 px patches, one patch per cell of the world's
    /// 3×3 grid, so one image token holds one object (as a real ViT's 16 px patches hold object parts). With
    /// 64 patches of 4 px a from-scratch model stayed blind to the image through 1,500 SFT steps on 2 cores;
    /// with 9 it starts reading (docs/TRAINING.md). Generation keeps the 8×8 grid of 4 px codes.
    ///
    /// `vocab_size` is the word-level tokenizer's size (specials + words); `codebook_size` the patch codebook's K.
    pub fn toy(vocab_size: usize, codebook_size: usize) -> Self {
        let hidden = 160;
        Self {
            text_config: TextConfig {
                vocab_size,
                hidden_size: hidden,
                intermediate_size: 432,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: Some(2),
                head_dim: None,
                max_position_embeddings: 512,
                rms_norm_eps: 1e-6,
                rope_parameters: Some(RopeParameters {
                    rope_theta: 10000.0,
                    rope_type: "default".into(),
                }),
                bos_token_id: Some(crate::tokenizer::TOY_BOS),
                eos_token_id: Some(serde_json::json!(crate::tokenizer::TOY_EOS)),
                pad_token_id: Some(crate::tokenizer::TOY_PAD),
                ..TextConfig::default()
            },
            vision_config: VisionConfig {
                hidden_size: 96,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                image_size: 30,
                patch_size: 10,
                projection_dim: hidden,
                num_image_tokens: 9,
                ..VisionConfig::default()
            },
            vq_config: VqConfig {
                embed_dim: 16,
                num_embeddings: codebook_size,
                projection_dim: hidden,
                image_token_embed_dim: hidden,
                num_patches: 8,
                ..VqConfig::default()
            },
            image_token_id: crate::tokenizer::TOY_IMAGE,
            tie_word_embeddings: false,
            model_type: "janus".into(),
            pairuni: PairuniExtras {
                image_tokenizer: ImageTokenizerKind::PatchCodebook,
                template: PromptTemplate::Toy,
                gen_image_size: Some(32),
                gen_patch_size: Some(4),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_json_gives_transformers_defaults() {
        let c = JanusConfig::from_json_str("{}", "x").unwrap_err();
        // Defaults mismatch on purpose: LlamaConfig's 4096 width vs the vision projection 2048.
        assert!(c.to_string().contains("projection_dim"), "{c}");
        let c = JanusConfig::from_json_str(
            r#"{"text_config":{"hidden_size":2048,"num_attention_heads":16,"rope_theta":5.0},"vision_config":{}}"#,
            "x",
        )
        .unwrap();
        assert_eq!(c.vision_config.num_patches(), 576);
        assert_eq!(c.image_tokens_per_image(), 576);
        assert_eq!(c.text_config.head_dim(), 128);
        assert_eq!(c.text_config.rope_theta(), 5.0);
        assert_eq!(c.vq_config.num_embeddings, 16384);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.pairuni.template, PromptTemplate::JanusPro);
    }

    #[test]
    fn bad_field_names_path() {
        let e = JanusConfig::from_json_str(r#"{"text_config":{"hidden_size":"big"}}"#, "cfg.json")
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("cfg.json") && s.contains("text_config.hidden_size"),
            "{s}"
        );
    }

    #[test]
    fn toy_roundtrips() {
        let c = JanusConfig::toy(300, 512);
        let s = serde_json::to_string(&c).unwrap();
        let d = JanusConfig::from_json_str(&s, "x").unwrap();
        assert_eq!(c, d);
        // 8×8 generation codes; one understanding token per cell of the world's 3×3 grid.
        assert_eq!(d.image_tokens_per_image(), 64);
        assert_eq!(d.vision_config.num_patches(), 9);
        assert_eq!(d.vision_config.num_image_tokens, 9);
    }
}
