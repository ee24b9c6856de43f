//! The understanding encoder: a SigLIP-style ViT (`model.vision_model.*`) and the MLP aligner (`model.aligner.*`).
//!
//! Mirrors transformers' `JanusVisionModel`: conv patch embedding (done here as im2col + matmul, which is the same
//! arithmetic and differentiable), learned position embeddings, pre-norm encoder layers with bidirectional
//! attention, a final LayerNorm, then the aligner maps every patch feature to the LLM width.

use candle_core::{DType, Module, Tensor};

use crate::error::Result;
use crate::janus_config::VisionConfig;
use crate::layers::{softmax_last, Act, InitKind, LayerNorm, Linear, Params};

struct EncoderLayer {
    ln1: LayerNorm,
    ln2: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// The ViT encoder.
pub struct VisionModel {
    patch_w: Tensor,
    patch_b: Tensor,
    pos: Tensor,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    act: Act,
    cfg: VisionConfig,
}

/// MLP `fc1 → (act → hidden_layers[i])*`, used both as the vision aligner and the generation aligner.
pub struct AlignerMlp {
    fc1: Linear,
    hidden: Vec<Linear>,
    act: Act,
}

impl AlignerMlp {
    /// `{p}.fc1` (in → out) and `{p}.hidden_layers.{i}` (out → out) for i < depth − 1.
    pub(crate) fn new(
        p: &Params,
        in_dim: usize,
        out_dim: usize,
        depth: usize,
        act: &str,
    ) -> Result<Self> {
        let fc1 = Linear::new(&p.pp("fc1"), in_dim, out_dim, true)?;
        let hidden = (0..depth.saturating_sub(1))
            .map(|i| Linear::new(&p.pp("hidden_layers").pp(i), out_dim, out_dim, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            fc1,
            hidden,
            act: Act::from_name(act)?,
        })
    }

    /// Applies the MLP on the last dim.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.fc1.forward(x)?;
        for l in &self.hidden {
            h = l.forward(&self.act.apply(&h)?)?;
        }
        Ok(h)
    }
}

impl VisionModel {
    /// Loads or creates `model.vision_model.*` under `p`.
    pub(crate) fn new(cfg: &VisionConfig, p: &Params) -> Result<Self> {
        let e = cfg.hidden_size;
        let ps = cfg.patch_size;
        let c = cfg.num_channels;
        let emb = p.pp("embeddings");
        let patch_w =
            emb.pp("patch_embedding")
                .get((e, c, ps, ps), "weight", InitKind::Normal(0.02))?;
        let patch_b = emb.pp("patch_embedding").get(e, "bias", InitKind::Zeros)?;
        let pos = emb.pp("position_embedding").get(
            (cfg.num_patches(), e),
            "weight",
            InitKind::Normal(0.02),
        )?;
        let mlp = (e as f64 * cfg.mlp_ratio) as usize;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lp = p.pp("encoder").pp("layers").pp(i);
            let ap = lp.pp("self_attn");
            layers.push(EncoderLayer {
                ln1: LayerNorm::new(&lp.pp("layer_norm1"), e, cfg.layer_norm_eps)?,
                ln2: LayerNorm::new(&lp.pp("layer_norm2"), e, cfg.layer_norm_eps)?,
                q: Linear::new(&ap.pp("q_proj"), e, e, cfg.attention_bias)?,
                k: Linear::new(&ap.pp("k_proj"), e, e, cfg.attention_bias)?,
                v: Linear::new(&ap.pp("v_proj"), e, e, cfg.attention_bias)?,
                proj: Linear::new(&ap.pp("projection_layer"), e, e, true)?,
                fc1: Linear::new(&lp.pp("mlp").pp("fc1"), e, mlp, true)?,
                fc2: Linear::new(&lp.pp("mlp").pp("fc2"), mlp, e, true)?,
            });
        }
        let post_ln = LayerNorm::new(&p.pp("post_layernorm"), e, cfg.layer_norm_eps)?;
        Ok(Self {
            patch_w,
            patch_b,
            pos,
            layers,
            post_ln,
            act: Act::from_name(&cfg.hidden_act)?,
            cfg: cfg.clone(),
        })
    }

    /// Patch features after `post_layernorm`: pixels [B, C, S, S] → [B, N, E].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, c, hgt, wid) = pixels.dims4()?;
        let ps = cfg.patch_size;
        if hgt != cfg.image_size || wid != cfg.image_size || c != cfg.num_channels {
            return Err(crate::error::ModelError::input(format!(
                "vision encoder expects [B, {}, {s}, {s}] pixels, got [{b}, {c}, {hgt}, {wid}]",
                cfg.num_channels,
                s = cfg.image_size
            )));
        }
        let g = hgt / ps;
        let pixels = pixels.to_dtype(self.patch_w.dtype())?;
        // im2col in the conv weight's (c, kh, kw) order.
        let cols = pixels
            .reshape((b, c, g, ps, g, ps))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * ps * ps))?;
        let e = cfg.hidden_size;
        let w = self.patch_w.reshape((e, c * ps * ps))?;
        let x = cols
            .matmul(&w.t()?)?
            .broadcast_add(&self.patch_b)?
            .reshape((b, g * g, e))?;
        let mut h = x.broadcast_add(&self.pos)?;
        let heads = cfg.num_attention_heads;
        let hd = e / heads;
        let n = g * g;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let x = l.ln1.forward(&h)?;
            let split = |y: Tensor| -> candle_core::Result<Tensor> {
                y.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = split(l.q.forward(&x)?)?;
            let k = split(l.k.forward(&x)?)?;
            let v = split(l.v.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
            let probs = softmax_last(&scores)?.to_dtype(x.dtype())?;
            let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, e))?;
            h = (h + l.proj.forward(&a)?)?;
            let x = l.ln2.forward(&h)?;
            let m = l.fc2.forward(&self.act.apply(&l.fc1.forward(&x)?)?)?;
            h = (h + m)?;
        }
        Ok(self.post_ln.forward(&h)?)
    }
}
