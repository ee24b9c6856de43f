//! The LLaMA decoder of Janus (transformers' `LlamaModel` under `model.language_model`).
//!
//! Unlike candle-transformers' llama, the KV cache is a value: `forward` takes the previous cache by reference and
//! returns the extended one, so one set of weights serves any number of independent rollouts and sampling never
//! mutates the model being trained. Rows of a batch may be left-padded: each call says which new tokens are real,
//! the cache remembers which keys are real, and positions count real tokens only (transformers' `cumsum(mask) − 1`).

use candle_core::{DType, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::janus_config::TextConfig;
use crate::layers::{apply_rope, softmax_last, InitKind, Linear, Params, RmsNorm, Rotary};

/// Keys and values of every layer for the tokens seen so far, plus which of them are real (not padding).
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer (k, v), each [B, kv_heads, T_past, head_dim].
    layers: Vec<(Tensor, Tensor)>,
    /// Per row, whether each cached key is a real token.
    key_valid: Vec<Vec<bool>>,
    /// Per row, the position the next real token gets.
    next_pos: Vec<u32>,
}

impl KvCache {
    /// Tokens cached per row (real and padding).
    pub fn len(&self) -> usize {
        self.key_valid.first().map_or(0, |r| r.len())
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.key_valid.len()
    }
    /// Drops the autograd history (sampling only needs values).
    pub fn detach(self) -> Self {
        Self {
            layers: self
                .layers
                .into_iter()
                .map(|(k, v)| (k.detach(), v.detach()))
                .collect(),
            ..self
        }
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

/// The decoder stack: token embedding, layers, final norm (lm_head lives in `Janus`).
pub struct Llama {
    pub(crate) embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rotary: Rotary,
    cfg: TextConfig,
}

impl Llama {
    /// Loads or creates `model.language_model.*` under `p`.
    pub(crate) fn new(cfg: &TextConfig, p: &Params) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let embed_tokens =
            p.pp("embed_tokens")
                .get((cfg.vocab_size, h), "weight", InitKind::Normal(0.02))?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let lp = p.pp("layers").pp(i);
            let ap = lp.pp("self_attn");
            let mp = lp.pp("mlp");
            layers.push(Layer {
                attn: Attention {
                    q: Linear::new(&ap.pp("q_proj"), h, nh * hd, cfg.attention_bias)?,
                    k: Linear::new(&ap.pp("k_proj"), h, nkv * hd, cfg.attention_bias)?,
                    v: Linear::new(&ap.pp("v_proj"), h, nkv * hd, cfg.attention_bias)?,
                    o: Linear::new(&ap.pp("o_proj"), nh * hd, h, cfg.attention_bias)?,
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                },
                mlp: Mlp {
                    gate: Linear::new(&mp.pp("gate_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
                    up: Linear::new(&mp.pp("up_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
                    down: Linear::new(&mp.pp("down_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
                },
                input_norm: RmsNorm::new(&lp.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
                post_norm: RmsNorm::new(&lp.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
            });
        }
        let norm = RmsNorm::new(&p.pp("norm"), h, cfg.rms_norm_eps)?;
        let rotary = Rotary::new(hd, cfg.rope_theta(), cfg.max_position_embeddings, p.device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            rotary,
            cfg: cfg.clone(),
        })
    }

    /// Token embeddings of `ids` [B, T] (u32) → [B, T, H].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        Ok(e.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// An empty cache for `batch` rows.
    pub fn empty_cache(&self, batch: usize) -> KvCache {
        KvCache {
            layers: Vec::new(),
            key_valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// Runs new tokens `x` [B, T, H] (embeddings) after `cache`; `valid[b][t]` says which are real.
    /// Returns the final-normed hidden states [B, T, H] and the extended cache.
    pub fn forward(
        &self,
        x: &Tensor,
        valid: &[Vec<bool>],
        cache: &KvCache,
    ) -> Result<(Tensor, KvCache)> {
        let (b, t, _) = x.dims3()?;
        if valid.len() != b || valid.iter().any(|r| r.len() != t) || cache.batch() != b {
            return Err(ModelError::input(format!(
                "decoder input is [{b}, {t}] but validity mask / cache rows do not match"
            )));
        }
        let dev = x.device();
        // Positions: real tokens count up from the row's next position; padding reuses it (it is masked anyway).
        let mut next_pos = cache.next_pos.clone();
        let mut pos = Vec::with_capacity(b * t);
        for (row, np) in valid.iter().zip(next_pos.iter_mut()) {
            for &v in row {
                pos.push(*np);
                if v {
                    *np += 1;
                }
            }
        }
        let pos = Tensor::from_vec(pos, (b, t), dev)?;
        let (cos, sin) = self.rotary.tables(&pos, x.dtype())?;

        let past = cache.len();
        let total = past + t;
        let mut key_valid = cache.key_valid.clone();
        for (kv, row) in key_valid.iter_mut().zip(valid) {
            kv.extend_from_slice(row);
        }
        let mut mask = Vec::with_capacity(b * t * total);
        for kv in &key_valid {
            for i in 0..t {
                let qi = past + i;
                for (j, &ok) in kv.iter().enumerate() {
                    mask.push(if ok && j <= qi { 0f32 } else { -1e30 });
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, total), dev)?;

        let mut h = x.clone();
        let mut new_layers = Vec::with_capacity(self.layers.len());
        for (li, layer) in self.layers.iter().enumerate() {
            let past_kv = cache.layers.get(li);
            let normed = layer.input_norm.forward(&h)?;
            let (attn_out, kv) = layer.attn.forward(&normed, &cos, &sin, &mask, past_kv)?;
            h = (h + attn_out)?;
            let normed = layer.post_norm.forward(&h)?;
            let m = &layer.mlp;
            let act = (m.gate.forward(&normed)?.silu()? * m.up.forward(&normed)?)?;
            h = (h + m.down.forward(&act)?)?;
            new_layers.push(kv);
        }
        let h = self.norm.forward(&h)?;
        Ok((
            h,
            KvCache {
                layers: new_layers,
                key_valid,
                next_pos,
            },
        ))
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?, self.heads)?;
        let k = split(self.k.forward(x)?, self.kv_heads)?;
        let v = split(self.v.forward(x)?, self.kv_heads)?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let rep = self.heads / self.kv_heads;
        let expand = |y: &Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                return Ok(y.clone());
            }
            let (b, kvh, tk, d) = y.dims4()?;
            y.unsqueeze(2)?
                .expand((b, kvh, rep, tk, d))?
                .reshape((b, kvh * rep, tk, d))
        };
        let (ke, ve) = (expand(&k)?, expand(&v)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&ke.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
        let probs = softmax_last(&scores.broadcast_add(mask)?)?.to_dtype(x.dtype())?;
        let out = probs.matmul(&ve.contiguous()?)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        Ok((self.o.forward(&out)?, (k, v)))
    }
}

/// Last position's slice of hidden states [B, T, H] → [B, H].
pub(crate) fn last_position(h: &Tensor) -> Result<Tensor> {
    let t = h.dim(1)?;
    Ok(h.narrow(1, t - 1, 1)?.squeeze(1)?)
}
