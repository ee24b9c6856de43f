//! The LLaMA decoder of Janus (transformers' `LlamaModel` under `model.language_model`).
//!
//! Unlike candle-transformers' llama, the KV cache is a value: `forward` takes the previous cache by reference and
//! returns the extended one, so one set of weights serves any number of independent rollouts and sampling never
//! mutates the model being trained. Rows of a batch may be left-padded: each call says which new tokens are real,
//! the cache remembers which keys are real, and positions count real tokens only (transformers' `cumsum(mask) − 1`).
//!
//! A cache made by [`Llama::empty_cache`] grows by concatenation, which keeps gradients (teacher forcing runs
//! through it). One made by [`Llama::empty_cache_with_capacity`] keeps every layer's keys and values in buffers
//! sized for the whole rollout and writes each step in place, so a decode step no longer copies the whole cache
//! (docs/GPU.md). The value semantics survive: a cache value only owns the prefix it was returned with, and a
//! second extension of the same value (a fork) first copies that prefix into fresh buffers. Such a cache also
//! keeps its key mask on the device, and forwards through it may take candle's fused (backward-less) kernels:
//! only sampling makes one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::janus_config::TextConfig;
use crate::layers::{
    apply_rope, apply_rope_fused, softmax_last, FusedRotaryTables, InitKind, Linear, Params,
    RmsNorm, Rotary,
};
use crate::trained_kernels;

mod static_decode;
pub use static_decode::{static_capacity, StaticDecode, WIDTH_STEP};

/// The additive mask value of a key that must not be attended to.
const MASKED: f32 = -1e30;

/// Keys and values of every layer for the tokens seen so far, plus which of them are real (not padding).
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer (k, v): [B, kv_heads, T_past, head_dim] when grown, [B, kv_heads, capacity, head_dim] buffers
    /// of which the first T_past positions are this cache's when preallocated. Empty before the first forward.
    layers: Vec<(Tensor, Tensor)>,
    /// Per row, whether each cached key is a real token.
    key_valid: Vec<Vec<bool>>,
    /// Per row, the position the next real token gets.
    next_pos: Vec<u32>,
    /// `Some` for a preallocated cache.
    prealloc: Option<Prealloc>,
    /// A preallocated cache's additive key mask [B, 1, 1, capacity] (f32, 0 or `MASKED`; 0 past the written
    /// positions), kept on the device next to the keys so that a decode step uploads no mask.
    key_bias: Option<Tensor>,
    /// The projections a fused-kernel forward through this cache multiplies with, stacked at its first forward
    /// ([`StackedLayer`]); `None` otherwise.
    stacked: Option<StackedProjections>,
}

/// Bookkeeping of a preallocated cache.
#[derive(Debug, Clone)]
struct Prealloc {
    /// Positions the buffers hold (the size they get when first allocated).
    capacity: usize,
    /// Positions of the buffers written so far, shared by every cache value over the same buffers. A value whose
    /// length is below it has been extended before: writing at its end would overwrite a sibling's keys.
    written: Arc<AtomicUsize>,
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
    /// Positions the preallocated buffers hold (`None` for a cache that grows by concatenation).
    pub fn capacity(&self) -> Option<usize> {
        self.prealloc.as_ref().map(|p| p.capacity)
    }
    /// Drops the autograd history (sampling only needs values).
    pub fn detach(self) -> Self {
        Self {
            layers: self
                .layers
                .into_iter()
                .map(|(k, v)| (k.detach(), v.detach()))
                .collect(),
            key_bias: self.key_bias.map(|b| b.detach()),
            ..self
        }
    }

    /// The cache of a batch whose row i continues row `rows[i]` of this one, so that the rollouts of one prompt
    /// share its prefill (a row may be taken any number of times). Differentiable for a cache that grows by
    /// concatenation; a preallocated one gets buffers of its own, of the same capacity, holding only this
    /// value's prefix (a sibling's later positions are not taken along).
    pub fn select_rows(&self, rows: &[usize]) -> Result<KvCache> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.batch()) {
            return Err(ModelError::input(format!(
                "row {r} selected from a cache of {} rows",
                self.batch()
            )));
        }
        let key_valid = rows.iter().map(|&r| self.key_valid[r].clone()).collect();
        let next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        let Some((first_k, _)) = self.layers.first() else {
            return Ok(KvCache {
                key_valid,
                next_pos,
                layers: Vec::new(),
                key_bias: None,
                ..self.clone()
            });
        };
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), first_k.device())?;
        let past = self.len();
        let (layers, prealloc, key_bias) = match &self.prealloc {
            None => (
                self.layers
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.contiguous()?.index_select(&idx, 0)?,
                            v.contiguous()?.index_select(&idx, 0)?,
                        ))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?,
                None,
                None,
            ),
            Some(pre) => {
                let take = |t: &Tensor, dim: usize| rows_of_prefix(t, &idx, dim, past);
                let layers = self
                    .layers
                    .iter()
                    .map(|(k, v)| Ok((take(k, 2)?, take(v, 2)?)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let bias = self.key_bias.as_ref().map(|b| take(b, 3)).transpose()?;
                let pre = Prealloc {
                    capacity: pre.capacity,
                    written: Arc::new(AtomicUsize::new(past)),
                };
                (layers, Some(pre), bias)
            }
        };
        Ok(KvCache {
            layers,
            key_valid,
            next_pos,
            prealloc,
            key_bias,
            stacked: self.stacked.clone(),
        })
    }

    /// Decides where the `t` new positions of a forward go: how to get buffers that can take them, and the
    /// bookkeeping of the cache value the forward returns. `None` for a cache that grows by concatenation.
    fn plan_append(&self, t: usize) -> Option<(Placement, Prealloc)> {
        let pre = self.prealloc.as_ref()?;
        let past = self.len();
        let total = past + t;
        if self.layers.is_empty() {
            // First forward: buffers are allocated per layer with the keys' dtype; a prompt longer than the
            // reserved room just gets a bigger buffer.
            let capacity = pre.capacity.max(total);
            return Some((
                Placement::Fresh,
                Prealloc {
                    capacity,
                    written: Arc::new(AtomicUsize::new(total)),
                },
            ));
        }
        // Claiming the positions after our prefix succeeds only if nobody has written past it (compare-exchange,
        // so two threads extending one value cannot both write in place).
        let claimed = total <= pre.capacity
            && pre
                .written
                .compare_exchange(past, total, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if !claimed {
            // Grow geometrically so that a rollout longer than announced costs O(log n) copies, not one per
            // step; a fork keeps the size and only stops sharing.
            let capacity = if total > pre.capacity {
                total.max(2 * pre.capacity)
            } else {
                pre.capacity
            };
            return Some((
                Placement::Copy,
                Prealloc {
                    capacity,
                    written: Arc::new(AtomicUsize::new(total)),
                },
            ));
        }
        Some((Placement::InPlace, pre.clone()))
    }
}

/// How one forward gets buffers for a preallocated cache.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Placement {
    /// No buffers yet: allocate them.
    Fresh,
    /// The buffers are full or shared with a longer sibling: copy this cache's prefix into new ones.
    Copy,
    /// Write after the prefix in the existing buffers.
    InPlace,
}

/// Writes one layer's new keys/values `k`, `v` [B, kv, t, D] after `past` cached positions of a preallocated
/// cache and returns the buffers (for the next cache value) and views of the filled prefix (for attention).
/// slice_set is not recorded by autograd: a preallocated cache is for sampling, where nothing is differentiated.
fn append_prealloc(
    old: Option<&(Tensor, Tensor)>,
    (k, v): (&Tensor, &Tensor),
    past: usize,
    placement: Placement,
    capacity: usize,
) -> candle_core::Result<((Tensor, Tensor), (Tensor, Tensor))> {
    let (b, kvh, t, d) = k.dims4()?;
    let place = |old: Option<&Tensor>, new: &Tensor| -> candle_core::Result<Tensor> {
        let buf = match (placement, old) {
            (Placement::InPlace, Some(o)) => o.clone(),
            (Placement::Copy, Some(o)) => prefix_in_new_buffer(o, 2, past, capacity)?,
            _ => Tensor::zeros((b, kvh, capacity, d), new.dtype(), new.device())?,
        };
        buf.slice_set(&new.contiguous()?, 2, past)?;
        Ok(buf)
    };
    let kb = place(old.map(|o| &o.0), k)?;
    let vb = place(old.map(|o| &o.1), v)?;
    let kview = kb.narrow(2, 0, past + t)?;
    let vview = vb.narrow(2, 0, past + t)?;
    Ok(((kb, vb), (kview, vview)))
}

/// A new buffer like `buf` with `capacity` positions along `dim`: the first `past` of `buf`'s, zeros after them.
/// Not recorded by autograd (preallocated caches only).
fn prefix_in_new_buffer(
    buf: &Tensor,
    dim: usize,
    past: usize,
    capacity: usize,
) -> candle_core::Result<Tensor> {
    let mut shape = buf.dims().to_vec();
    shape[dim] = capacity;
    let out = Tensor::zeros(shape, buf.dtype(), buf.device())?;
    out.slice_set(&buf.narrow(dim, 0, past)?.detach().contiguous()?, dim, 0)?;
    Ok(out)
}

/// A new buffer of `buf`'s rows `rows` (along dim 0, in that order) with the positions from `past` on along `dim`
/// cleared, as [`prefix_in_new_buffer`] leaves them. Taking the rows already copies the whole buffer, so only
/// that tail is written again. Not recorded by autograd.
fn rows_of_prefix(
    buf: &Tensor,
    rows: &Tensor,
    dim: usize,
    past: usize,
) -> candle_core::Result<Tensor> {
    let out = buf.contiguous()?.index_select(rows, 0)?.detach();
    let mut tail = out.dims().to_vec();
    if tail[dim] > past {
        tail[dim] -= past;
        out.slice_set(&Tensor::zeros(tail, buf.dtype(), buf.device())?, dim, past)?;
    }
    Ok(out)
}

/// The key mask buffer [B, 1, 1, capacity] of a preallocated cache once the newest positions (`new_valid`, one
/// row per batch row) follow `past` cached ones; `key_valid` covers all of them. Positions nobody has written
/// yet hold 0, so an all-real step (every image code, most text tokens) writes nothing and uploads nothing.
fn key_bias_buffer(
    old: Option<&Tensor>,
    placement: Placement,
    capacity: usize,
    past: usize,
    new_valid: &[Vec<bool>],
    key_valid: &[Vec<bool>],
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let b = key_valid.len();
    let buf = match (placement, old) {
        (Placement::InPlace, Some(o)) => o.clone(),
        (Placement::Copy, Some(o)) => prefix_in_new_buffer(o, 3, past, capacity)?,
        _ => {
            let mut bias = vec![0f32; b * capacity];
            for (row, kv) in bias.chunks_mut(capacity).zip(key_valid) {
                for (slot, &ok) in row.iter_mut().zip(kv) {
                    if !ok {
                        *slot = MASKED;
                    }
                }
            }
            return Tensor::from_vec(bias, (b, 1, 1, capacity), dev);
        }
    };
    if new_valid.iter().flatten().any(|&ok| !ok) {
        let t = new_valid.first().map_or(0, Vec::len);
        let vals: Vec<f32> = new_valid
            .iter()
            .flatten()
            .map(|&ok| if ok { 0.0 } else { MASKED })
            .collect();
        buf.slice_set(&Tensor::from_vec(vals, (b, 1, 1, t), dev)?, 3, past)?;
    }
    Ok(buf)
}

/// The additive attention mask [B, 1, T, T_all] built on the host: causal, and blind to padded keys.
fn host_mask(
    key_valid: &[Vec<bool>],
    past: usize,
    t: usize,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let total = past + t;
    let mut mask = Vec::with_capacity(key_valid.len() * t * total);
    for kv in key_valid {
        for i in 0..t {
            let qi = past + i;
            for (j, &ok) in kv.iter().enumerate() {
                mask.push(if ok && j <= qi { 0f32 } else { MASKED });
            }
        }
    }
    Tensor::from_vec(mask, (key_valid.len(), 1, t, total), dev)
}

/// Rotary tables for one forward, in the form the chosen kernels take.
enum RopeTables {
    /// cos/sin [B, 1, T, half] for the differentiable composition of basic ops.
    Composed { cos: Tensor, sin: Tensor },
    /// Tables for candle's fused kernel, the attention scale folded into the queries'.
    Fused(FusedRotaryTables),
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
    /// Whether forwards through a preallocated cache (sampling) use candle's fused RMSNorm, rotary and softmax
    /// kernels instead of the differentiable compositions: about 23 launches per layer and decode step instead
    /// of 58 (docs/GPU.md). On by default on accelerators; off on the CPU, where the compositions are what every
    /// recorded toy-world result was sampled with.
    fused_sampling: bool,
    /// Whether those fused-kernel forwards also run q/k/v and gate/up as stacked batched matmuls
    /// ([`StackedLayer`]); on by default, off only to measure what the stacks buy.
    stack_projections: bool,
    /// Whether those fused-kernel forwards run one-query attention as one CUDA kernel
    /// ([`crate::decode_attention`]; it acts on CUDA devices only). On by default on CUDA devices: on an H200 it
    /// passed its check and took the image decode step from 2.86 to 2.50 ms (docs/BENCHMARKS.md, eighteenth
    /// session); `[model] attention_kernel = "off"` turns it off.
    attention_kernel: bool,
    /// Whether those fused-kernel forwards on a GPU run the layer kernels ([`crate::layer_kernels`]). On by
    /// default on CUDA devices, measured like the attention kernel (2.71 → 2.50 ms per image step).
    layer_kernels: bool,
    /// Whether the differentiable forwards' RMSNorm backward runs as one CUDA kernel ([`crate::norm_kernel`];
    /// CUDA devices only). On by default there: on an H200 the train phase took 893 ms without it and 751 ms with
    /// it, and the card's peak memory in use fell from 137.3 to 114.7 GiB (docs/BENCHMARKS.md, eighteenth session).
    norm_kernel: bool,
    /// Whether the differentiable forwards' SiLU · gate and attention softmax backwards run as one CUDA kernel
    /// each ([`crate::backward_kernels`]; CUDA devices only). On by default there: 977 ms without them against
    /// 751 ms with them on an H200.
    backward_kernels: bool,
    /// Whether differentiable forwards (teacher forcing, training) run the fused RMSNorm, rotary and softmax
    /// kernels, and the projections, head splits and attention cores as single autograd nodes, with hand-written
    /// backwards ([`crate::trained_kernels`]) instead of compositions of basic ops. On by default on
    /// accelerators (most of the train phase's ops); off on the CPU, where the compositions are what every
    /// recorded toy-world result was trained with.
    fused_training: bool,
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
            fused_sampling: !p.device.is_cpu(),
            stack_projections: true,
            attention_kernel: p.device.is_cuda(),
            layer_kernels: p.device.is_cuda(),
            norm_kernel: p.device.is_cuda(),
            backward_kernels: p.device.is_cuda(),
            fused_training: !p.device.is_cpu(),
        })
    }

    /// Whether sampling forwards use the fused kernels.
    pub fn fused_sampling(&self) -> bool {
        self.fused_sampling
    }

    /// Chooses the kernels of sampling forwards (see the field); training forwards always compose basic ops.
    pub fn set_fused_sampling(&mut self, on: bool) {
        self.fused_sampling = on;
    }

    /// Whether fused-kernel forwards on a GPU run the layer kernels ([`crate::layer_kernels`]).
    pub fn layer_kernels(&self) -> bool {
        self.layer_kernels
    }

    /// Chooses whether fused-kernel forwards on a GPU run the layer kernels ([`crate::layer_kernels`]).
    pub fn set_layer_kernels(&mut self, on: bool) {
        self.layer_kernels = on;
    }

    /// Whether differentiable forwards run the fused kernels with backwards.
    pub fn fused_training(&self) -> bool {
        self.fused_training
    }

    /// Chooses the kernels of differentiable forwards (see the field).
    pub fn set_fused_training(&mut self, on: bool) {
        self.fused_training = on;
    }

    /// Whether fused-kernel decode steps on a GPU run attention as one kernel.
    pub fn attention_kernel(&self) -> bool {
        self.attention_kernel
    }

    /// Chooses whether fused-kernel decode steps on a GPU run attention as one kernel.
    pub fn set_attention_kernel(&mut self, on: bool) {
        self.attention_kernel = on;
    }

    /// Whether the differentiable forwards' RMSNorm backward runs as one CUDA kernel.
    pub fn norm_kernel(&self) -> bool {
        self.norm_kernel
    }

    /// Turns the RMSNorm backward kernel on or off (it acts on CUDA devices only).
    pub fn set_norm_kernel(&mut self, on: bool) {
        self.norm_kernel = on;
    }

    /// Whether the differentiable forwards' SiLU · gate and softmax backwards run as one CUDA kernel each.
    pub fn backward_kernels(&self) -> bool {
        self.backward_kernels
    }

    /// Turns the SiLU · gate and softmax backward kernels on or off (they act on CUDA devices only).
    pub fn set_backward_kernels(&mut self, on: bool) {
        self.backward_kernels = on;
    }

    /// Whether fused-kernel forwards run the stacked projections.
    pub fn stack_projections(&self) -> bool {
        self.stack_projections
    }

    /// Chooses whether fused-kernel forwards run the stacked projections (caches that have them keep them).
    pub fn set_stack_projections(&mut self, on: bool) {
        self.stack_projections = on;
    }

    /// Token embeddings of `ids` [B, T] (u32) → [B, T, H].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        Ok(e.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// An empty cache for `batch` rows that grows by concatenation (keeps gradients; teacher forcing).
    pub fn empty_cache(&self, batch: usize) -> KvCache {
        KvCache {
            layers: Vec::new(),
            key_valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
            prealloc: None,
            key_bias: None,
            stacked: None,
        }
    }

    /// An empty cache for `batch` rows whose keys and values go into buffers of `capacity` positions, written in
    /// place (sampling: no gradient flows through the cached keys). Exceeding the capacity still works: the
    /// buffers are reallocated at twice the size.
    pub fn empty_cache_with_capacity(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache {
            prealloc: Some(Prealloc {
                capacity: capacity.max(1),
                written: Arc::new(AtomicUsize::new(0)),
            }),
            ..self.empty_cache(batch)
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
        let max_pos = pos.iter().copied().max().unwrap_or(0) as usize;
        let pos = Tensor::from_vec(pos, (b, t), dev)?;
        let plan = cache.plan_append(t);
        // Only sampling goes through a preallocated cache, and nothing there is differentiated.
        let fused = plan.is_some() && self.fused_sampling;
        // Forwards through a growing cache are the differentiable ones (teacher forcing, training).
        let differentiable = plan.is_none() && self.fused_training;
        let rope = self.rope_tables(&pos, max_pos, x.dtype(), fused || differentiable)?;
        let stacked = if fused {
            self.stacked_for(cache.stacked.as_ref())?
        } else {
            None
        };

        let past = cache.len();
        let total = past + t;
        let mut key_valid = cache.key_valid.clone();
        for (kv, row) in key_valid.iter_mut().zip(valid) {
            kv.extend_from_slice(row);
        }
        // A one-token step attends to every real key, so the cache's own key mask serves as it is; longer
        // extensions also need the causal part, built on the host.
        let (mask, key_bias) = match &plan {
            Some((placement, pre)) => {
                let bias = key_bias_buffer(
                    cache.key_bias.as_ref(),
                    *placement,
                    pre.capacity,
                    past,
                    valid,
                    &key_valid,
                    dev,
                )?;
                let mask = if t == 1 {
                    bias.narrow(3, 0, total)?
                } else {
                    host_mask(&key_valid, past, t, dev)?
                };
                (mask, Some(bias))
            }
            None => (host_mask(&key_valid, past, t, dev)?, None),
        };
        // Keys and values are made contiguous before the matmuls, as they always were, on the CPU (sampling stays
        // bit for bit what it was: the CPU gemm's summation order depends on the operands' layout) and for a
        // growing cache (the differentiable path keeps its layout). On an accelerator, attention reads the
        // preallocated buffers through strided views, with no copy of the cache per step.
        let kernels = self.kernels(
            fused,
            differentiable,
            plan.is_none() || prealloc_copies_kv(dev),
        );
        let mut new_layers = Vec::with_capacity(self.layers.len());
        let h = self.run_layers(
            x,
            &rope,
            &mask,
            kernels,
            stacked.as_deref(),
            |li, q, k, v| {
                let past_kv = cache.layers.get(li);
                let (stored, views) = match &plan {
                    Some((placement, pre)) => {
                        append_prealloc(past_kv, (k, v), past, *placement, pre.capacity)?
                    }
                    None => {
                        let (k, v) = match past_kv {
                            Some((pk, pv)) => {
                                (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?)
                            }
                            None => (k.clone(), v.clone()),
                        };
                        ((k.clone(), v.clone()), (k, v))
                    }
                };
                new_layers.push(stored);
                Ok((q.clone(), views.0, views.1))
            },
        )?;
        Ok((
            h,
            KvCache {
                layers: new_layers,
                key_valid,
                next_pos,
                prealloc: plan.map(|(_, pre)| pre),
                key_bias,
                stacked,
            },
        ))
    }

    /// A differentiable forward, without a cache, of rows that each pack several sequences: `pos` [B][T] is each
    /// token's rotary position and `visible(row, i, j)` says whether query `i` attends key `j` (asked for j ≤ i
    /// only). A GRPO group's answers after their shared prompt run as one row this way (each answer token sees the
    /// prompt and its own answer), so the prompt's forward and backward run once, in the same pass as the answers.
    /// Returns the final-normed hidden states [B, T, H].
    pub fn forward_packed(
        &self,
        x: &Tensor,
        pos: &[Vec<u32>],
        visible: impl Fn(usize, usize, usize) -> bool,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if pos.len() != b || pos.iter().any(|r| r.len() != t) {
            return Err(ModelError::input(format!(
                "packed decoder input is [{b}, {t}] but its positions do not match"
            )));
        }
        let dev = x.device();
        let max_pos = pos.iter().flatten().copied().max().unwrap_or(0) as usize;
        let pos_t = Tensor::from_vec(pos.concat(), (b, t), dev)?;
        let rope = self.rope_tables(&pos_t, max_pos, x.dtype(), self.fused_training)?;
        let mut mask = Vec::with_capacity(b * t * t);
        for row in 0..b {
            for i in 0..t {
                mask.extend((0..t).map(|j| {
                    if j <= i && visible(row, i, j) {
                        0f32
                    } else {
                        MASKED
                    }
                }));
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), dev)?;
        // The kernels of `forward` through a growing cache: the differentiable ones.
        let kernels = self.kernels(false, self.fused_training, true);
        self.run_layers(x, &rope, &mask, kernels, None, |_, q, k, v| {
            Ok((q.clone(), k.clone(), v.clone()))
        })
    }

    /// A forward's kernels: `fused` (sampling) or `differentiable` (training) ones or neither, keys and values
    /// copied when `copy_kv`, and this model's hand-written kernel switches; queries and keys rotated by the layers.
    fn kernels(&self, fused: bool, differentiable: bool, copy_kv: bool) -> Kernels<'static> {
        Kernels {
            fused,
            differentiable,
            copy_kv,
            attention_kernel: self.attention_kernel,
            norm_kernel: self.norm_kernel,
            backward_kernels: self.backward_kernels,
            layer_kernels: self.layer_kernels,
            rope_in_store: false,
            live_keys: None,
        }
    }

    /// The decoder layers over `x`, then the final norm. `store(layer, q, k, v)` puts the layer's keys and values
    /// in its cache and returns the queries with all the keys and values to attend over.
    fn run_layers(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
        kernels: Kernels<'_>,
        stacked: Option<&[StackedLayer]>,
        mut store: impl FnMut(
            usize,
            &Tensor,
            &Tensor,
            &Tensor,
        ) -> candle_core::Result<(Tensor, Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (mut h, mut delta) = (x.clone(), None);
        for (li, layer) in self.layers.iter().enumerate() {
            let stacks = stacked.map(|s| &s[li]);
            let out = layer.forward(
                &h,
                delta.as_ref(),
                rope,
                mask,
                kernels,
                stacks,
                |q, k, v| store(li, q, k, v),
            )?;
            (h, delta) = (out.0, Some(out.1));
        }
        Ok(add_norm(&self.norm, &h, delta.as_ref(), kernels)?.1)
    }

    /// The stacked projections of a fused-kernel forward: the cache's own once it has them, else stacked now from
    /// the current weights (`None` when a projection has a bias, which the stacks do not carry).
    fn stacked_for(
        &self,
        existing: Option<&StackedProjections>,
    ) -> Result<Option<StackedProjections>> {
        if let Some(s) = existing {
            return Ok(Some(s.clone()));
        }
        if !self.stack_projections || self.layers.iter().any(Layer::has_bias) {
            return Ok(None);
        }
        let layers = self
            .layers
            .iter()
            .map(Layer::stack)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Arc::from(layers)))
    }
}

impl Llama {
    /// Rotary tables for positions `pos` [B, T] whose largest value is `max_pos`, for the chosen kernels.
    fn rope_tables(
        &self,
        pos: &Tensor,
        max_pos: usize,
        dtype: DType,
        fused: bool,
    ) -> Result<RopeTables> {
        Ok(if fused {
            let scale = 1.0 / (self.cfg.head_dim() as f64).sqrt();
            RopeTables::Fused(self.rotary.fused_tables(pos, max_pos, dtype, scale)?)
        } else {
            let (cos, sin) = self.rotary.tables_checked(pos, max_pos, dtype)?;
            RopeTables::Composed { cos, sin }
        })
    }
}

/// `norm` of `x` with the forward's kernels: fused (no backward), fused with a backward, or composed.
fn rms_norm(norm: &RmsNorm, x: &Tensor, kernels: Kernels<'_>) -> candle_core::Result<Tensor> {
    if kernels.differentiable && !kernels.fused {
        trained_kernels::rms_norm(x, &norm.weight, norm.eps, kernels.norm_kernel)
    } else {
        norm.forward_with(x, kernels.fused)
    }
}

/// `h + delta` (or `h` without a delta) and `norm` of it with the forward's kernels: one hand-written kernel for
/// both where `layer_kernels` applies ([`crate::layer_kernels`]), else the add and then [`rms_norm`].
fn add_norm(
    norm: &RmsNorm,
    h: &Tensor,
    delta: Option<&Tensor>,
    kernels: Kernels<'_>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Some(delta) = delta else {
        return Ok((h.clone(), rms_norm(norm, h, kernels)?));
    };
    if kernels.layer_kernels() {
        return crate::layer_kernels::add_rms_norm(h, delta, &norm.weight, norm.eps);
    }
    let h = (h + delta)?;
    let normed = rms_norm(norm, &h, kernels)?;
    Ok((h, normed))
}

/// Which kernels one forward's layers run.
#[derive(Debug, Clone, Copy)]
struct Kernels<'a> {
    /// candle's fused RMSNorm, rotary and softmax kernels (no backward) instead of compositions of basic ops.
    fused: bool,
    /// Without `fused`: the same kernels, the projections and the attention core as ops with a backward
    /// ([`crate::trained_kernels`]) instead of compositions.
    differentiable: bool,
    /// Make keys and values contiguous before the attention matmuls (the CPU's and the growing cache's layout).
    copy_kv: bool,
    /// With `fused`, one-query attention on a GPU runs as one kernel ([`crate::decode_attention`]).
    attention_kernel: bool,
    /// With `differentiable`, the RMSNorm backward on a GPU runs as one kernel ([`crate::norm_kernel`]).
    norm_kernel: bool,
    /// With `differentiable`, the SiLU · gate and softmax backwards on a GPU run as one kernel each
    /// ([`crate::backward_kernels`]).
    backward_kernels: bool,
    /// With `fused`, the layer kernels ([`crate::layer_kernels`]) run on a GPU.
    layer_kernels: bool,
    /// The layers hand their queries and keys to `store` unrotated (a static decode step rotates them as it
    /// writes the cache, [`crate::layer_kernels::rope_store`]).
    rope_in_store: bool,
    /// With `attention_kernel`: the keys written so far ([1] u32 on the device; a static decode's), which the
    /// kernel reads instead of every key of its width, so that a step's launches do not depend on the step.
    live_keys: Option<&'a Tensor>,
}

impl Kernels<'_> {
    /// Whether this forward takes [`crate::layer_kernels`] (sampling forwards with candle's fused kernels).
    fn layer_kernels(self) -> bool {
        self.fused && self.layer_kernels
    }
}

impl Layer {
    /// The layer on `h` [B, T, H] under the additive `mask`: `store` takes the new queries [B, heads, T, D], keys
    /// and values [B, kv_heads, T, D] and returns the queries (rotated by then: it rotates them itself when
    /// `kernels.rope_in_store`) with all the keys and values to attend over.
    /// With `stacked`, the q/k/v and gate/up projections each run as one batched matmul over those stacks.
    ///
    /// The residual stream enters as `h` plus the previous layer's MLP output `delta` (none before the first layer)
    /// and leaves the same way, (stream, MLP output), so that each residual add can share a kernel with the norm
    /// after it ([`add_norm`]).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        h: &Tensor,
        delta: Option<&Tensor>,
        rope: &RopeTables,
        mask: &Tensor,
        kernels: Kernels<'_>,
        stacked: Option<&StackedLayer>,
        store: impl FnOnce(&Tensor, &Tensor, &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let (h, normed) = add_norm(&self.input_norm, h, delta, kernels)?;
        let (q, k, v) = self.attn.project(
            &normed,
            rope,
            stacked,
            kernels.differentiable,
            !kernels.rope_in_store,
        )?;
        let (q, ks, vs) = store(&q, &k, &v)?;
        let attn_out = self.attn.attend(&q, &ks, &vs, mask, kernels)?;
        let (h, normed) = add_norm(&self.post_norm, &h, Some(&attn_out), kernels)?;
        let m = &self.mlp;
        let trained = kernels.differentiable;
        let (gate, up) = match stacked {
            Some(s) => {
                let [gate, up] = stacked_matmul(&normed, &s.gate_up)?;
                (gate, up)
            }
            None => (
                m.gate.forward_with(&normed, trained)?,
                m.up.forward_with(&normed, trained)?,
            ),
        };
        let act = if trained {
            // One autograd node, its value through the sampling forwards' kernel when that is on.
            trained_kernels::silu_mul(&gate, &up, kernels.layer_kernels, kernels.backward_kernels)?
        } else {
            crate::layer_kernels::silu_mul(&gate, &up, kernels.layer_kernels())?
        };
        Ok((h, m.down.forward_with(&act, trained)?))
    }

    /// Whether any projection has a bias.
    fn has_bias(&self) -> bool {
        let a = &self.attn;
        [&a.q, &a.k, &a.v, &self.mlp.gate, &self.mlp.up]
            .iter()
            .any(|l| l.bias.is_some())
    }

    /// Copies of this layer's weights stacked for [`stacked_matmul`] (bias-free layers only).
    fn stack(&self) -> candle_core::Result<StackedLayer> {
        let a = &self.attn;
        let stack =
            |ws: &[&Tensor]| -> candle_core::Result<Tensor> { Ok(Tensor::stack(ws, 0)?.detach()) };
        let (qkv, kv_only) = if a.heads == a.kv_heads {
            (stack(&[&a.q.weight, &a.k.weight, &a.v.weight])?, false)
        } else {
            (stack(&[&a.k.weight, &a.v.weight])?, true)
        };
        Ok(StackedLayer {
            qkv,
            kv_only,
            gate_up: stack(&[&self.mlp.gate.weight, &self.mlp.up.weight])?,
        })
    }
}

/// One layer's projections that read the same input, stacked into [n, out, in] copies so that each group runs as
/// a single batched matmul: one launch for q/k/v and one for gate/up instead of five, with three or two times
/// the output tiles to spread over the device's cores (a decode step's matmuls have only as many rows as the
/// batch). Sampling only: the copies are made when a rollout's cache first runs, so they hold the weights of
/// that moment, and no gradient flows through them.
#[derive(Debug)]
struct StackedLayer {
    /// q, k, v [3, heads·D, H]; or k, v [2, kv_heads·D, H] when the heads are grouped (q is then a shape of its
    /// own and keeps its matmul).
    qkv: Tensor,
    /// Whether `qkv` holds only k and v.
    kv_only: bool,
    /// gate, up [2, F, H].
    gate_up: Tensor,
}

/// Every layer's [`StackedLayer`], shared by the cache values of one rollout.
type StackedProjections = Arc<[StackedLayer]>;

/// `x` [B, T, in] times each of the `N` stacked weights `w` [N, out, in] (transposed), as one batched matmul over
/// `x` broadcast (batch stride 0): N contiguous [B, T, out] outputs.
fn stacked_matmul<const N: usize>(x: &Tensor, w: &Tensor) -> candle_core::Result<[Tensor; N]> {
    let (b, t, inner) = x.dims3()?;
    let (n, out, _) = w.dims3()?;
    if n != N {
        candle_core::bail!("{n} stacked weights where {N} were expected");
    }
    let rows = b * t;
    let y = x
        .reshape((1, rows, inner))?
        .broadcast_as((N, rows, inner))?
        .matmul(&w.transpose(1, 2)?)?;
    let mut outs = Vec::with_capacity(N);
    for j in 0..N {
        outs.push(y.get(j)?.reshape((b, t, out))?);
    }
    Ok(outs.try_into().expect("N outputs"))
}

impl Attention {
    /// Queries, keys and values [B, heads, T, D] of `x` [B, T, H], with rotary positions applied (and, with the
    /// fused tables, the queries scaled by 1/√D); without `rotate` (fused tables only), as projected.
    fn project(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        stacked: Option<&StackedLayer>,
        differentiable: bool,
        rotate: bool,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        if let (RopeTables::Fused(tb), true) = (rope, differentiable) {
            // Training: each projection and each head split (with its rotation) is one autograd node.
            let project = |l: &Linear, heads: usize, rope| {
                trained_kernels::heads(&l.forward_trained(x)?, heads, rope)
            };
            return Ok((
                project(&self.q, self.heads, Some((&tb.cos_q, &tb.sin_q)))?,
                project(&self.k, self.kv_heads, Some((&tb.cos_k, &tb.sin_k)))?,
                project(&self.v, self.kv_heads, None)?,
            ));
        }
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = match stacked {
            Some(s) if s.kv_only => {
                let [k, v] = stacked_matmul(x, &s.qkv)?;
                (self.q.forward(x)?, k, v)
            }
            Some(s) => {
                let [q, k, v] = stacked_matmul(x, &s.qkv)?;
                (q, k, v)
            }
            None => (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?),
        };
        let q = split(q, self.heads)?;
        let k = split(k, self.kv_heads)?;
        let v = split(v, self.kv_heads)?;
        match rope {
            RopeTables::Composed { cos, sin } => {
                Ok((apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?, v))
            }
            RopeTables::Fused(_) if !rotate => Ok((q, k, v)),
            RopeTables::Fused(tb) => Ok((
                apply_rope_fused(&q, &tb.cos_q, &tb.sin_q)?,
                apply_rope_fused(&k, &tb.cos_k, &tb.sin_k)?,
                v,
            )),
        }
    }

    /// Attention of `q` [B, heads, T, D] over all keys/values `k`, `v` [B, kv_heads, T_all, D] (possibly views into
    /// a larger buffer) under the additive `mask` [B, 1, T, T_all], through the output projection → [B, T, H].
    /// `copy_kv` makes the keys and values contiguous first (the CPU path's historical layout). `fused` and
    /// `differentiable` take queries already scaled and run candle's softmax kernel in f32, without and with a
    /// backward; a one-query fused step may run as one kernel (`attention_kernel`).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        kernels: Kernels<'_>,
    ) -> Result<Tensor> {
        let Kernels {
            fused,
            differentiable,
            copy_kv,
            attention_kernel,
            ..
        } = kernels;
        if differentiable {
            // Training: the attention core and the output projection are one autograd node each.
            let out = trained_kernels::attention(q, k, v, mask, kernels.backward_kernels)?;
            return Ok(self.o.forward_trained(&out)?);
        }
        let (b, _, t, _) = q.dims4()?;
        let rep = self.heads / self.kv_heads;
        let expand = |y: &Tensor| trained_kernels::repeat_kv(y, rep);
        let composed = || -> candle_core::Result<Tensor> {
            let (ke, ve) = (expand(k)?, expand(v)?);
            let (kt, ve) = if copy_kv {
                (ke.t()?.contiguous()?, ve.contiguous()?)
            } else {
                (ke.t()?, ve)
            };
            let probs = if fused {
                // The scale is in the queries (their rotary tables).
                let scores = q.matmul(&kt)?.to_dtype(DType::F32)?.broadcast_add(mask)?;
                candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?
            } else {
                let scale = 1.0 / (self.head_dim as f64).sqrt();
                let scores = (q.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
                softmax_last(&scores.broadcast_add(mask)?)?.to_dtype(q.dtype())?
            };
            probs.matmul(&ve)
        };
        // A fused-kernel decode step (one query, the scale in it) on a GPU takes the one-launch kernel.
        let kernel_out = if fused && attention_kernel && t == 1 {
            crate::decode_attention::attend(q, k, v, mask, kernels.live_keys, composed)?
        } else {
            None
        };
        let out = match kernel_out {
            Some(out) => out,
            None => composed()?,
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        Ok(self.o.forward(&out)?)
    }
}

/// Whether attention over a preallocated cache copies the keys and values first: on the CPU (where sampling stays
/// bit for bit what it was), unless a test asks for the accelerators' strided views.
fn prealloc_copies_kv(dev: &candle_core::Device) -> bool {
    dev.is_cpu() && !views_forced()
}

/// Whether a test asked for the accelerator's strided-view attention on the CPU.
#[cfg(test)]
fn views_forced() -> bool {
    tests::FORCE_VIEWS.with(|f| f.get())
}

/// Whether a test asked for the accelerator's strided-view attention on the CPU (never outside tests).
#[cfg(not(test))]
fn views_forced() -> bool {
    false
}

/// Last position's slice of hidden states [B, T, H] → [B, H].
pub(crate) fn last_position(h: &Tensor) -> Result<Tensor> {
    let t = h.dim(1)?;
    Ok(h.narrow(1, t - 1, 1)?.squeeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::janus_config::JanusConfig;
    use crate::layers::ParamMode;
    use candle_core::Device;
    use candle_nn::VarMap;
    use std::cell::Cell;

    thread_local! {
        /// Set by a test to run the strided-view attention of accelerators on the CPU.
        pub(super) static FORCE_VIEWS: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn decoder(kv_heads: Option<usize>) -> Llama {
        decoder_in(&VarMap::new(), kv_heads, false)
    }

    /// A toy decoder whose weights live in `store`, where a test can change them as an optimizer would.
    fn decoder_in(store: &VarMap, kv_heads: Option<usize>, bias: bool) -> Llama {
        let mut cfg = JanusConfig::toy(48, 64).text_config;
        cfg.num_key_value_heads = kv_heads;
        cfg.attention_bias = bias;
        let mode = ParamMode::Init { seed: 3 };
        let p = Params {
            store,
            prefix: String::new(),
            mode: &mode,
            dtype: DType::F32,
            device: &Device::Cpu,
        };
        Llama::new(&cfg, &p).unwrap()
    }

    pub(super) fn embeddings(m: &Llama, t: usize) -> Tensor {
        let ids: Vec<u32> = (0..2 * t as u32).map(|i| (i * 7 + 3) % 48).collect();
        m.embed(&Tensor::from_vec(ids, (2, t), &Device::Cpu).unwrap())
            .unwrap()
    }

    /// Prefill 3 tokens, then one at a time; the hidden states of every step, concatenated.
    fn stepwise(m: &Llama, x: &Tensor, mut cache: KvCache) -> (Vec<f32>, KvCache) {
        let t = x.dim(1).unwrap();
        let (h, c) = m
            .forward(&x.narrow(1, 0, 3).unwrap(), &vec![vec![true; 3]; 2], &cache)
            .unwrap();
        cache = c;
        let mut out = vec![h];
        for i in 3..t {
            let (h, c) = m
                .forward(&x.narrow(1, i, 1).unwrap(), &vec![vec![true]; 2], &cache)
                .unwrap();
            cache = c.detach();
            out.push(h);
        }
        let all = Tensor::cat(&out, 1).unwrap().flatten_all().unwrap();
        (all.to_vec1::<f32>().unwrap(), cache)
    }

    #[test]
    fn strided_view_attention_matches_the_contiguous_one() {
        // What an accelerator runs (cuBLAS on views into the buffers), checked on the CPU gemm.
        for kv in [None, Some(2)] {
            let m = decoder(kv);
            let x = embeddings(&m, 9);
            let (copied, _) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
            FORCE_VIEWS.with(|f| f.set(true));
            let (viewed, cache) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
            FORCE_VIEWS.with(|f| f.set(false));
            assert_eq!(cache.len(), 9);
            let err = copied
                .iter()
                .zip(&viewed)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err < 1e-5, "kv heads {kv:?}: max |Δ| {err}");
        }
    }

    #[test]
    fn fused_kernels_over_strided_views_match_the_composed_copies() {
        // What an accelerator runs by default: fused kernels, keys and values read through views of the buffers.
        for kv in [None, Some(2)] {
            let mut m = decoder(kv);
            let x = embeddings(&m, 9);
            let (composed, _) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
            m.set_fused_sampling(true);
            FORCE_VIEWS.with(|f| f.set(true));
            let (fused, _) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
            FORCE_VIEWS.with(|f| f.set(false));
            let scale = composed.iter().fold(0f32, |a, x| a.max(x.abs()));
            let err = composed
                .iter()
                .zip(&fused)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                err <= 1e-5 * scale,
                "kv heads {kv:?}: max |Δ| {err} (scale {scale})"
            );
        }
    }

    #[test]
    fn preallocated_cache_is_bit_identical_to_the_growing_one_on_cpu() {
        let m = decoder(Some(2));
        let x = embeddings(&m, 9);
        let (grown, g) = stepwise(&m, &x, m.empty_cache(2));
        let (pre, p) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 9));
        assert_eq!(grown, pre);
        assert_eq!(g.capacity(), None);
        assert_eq!(p.capacity(), Some(9));
    }

    #[test]
    fn stacked_projections_compute_the_separate_matmuls_bit_for_bit_on_the_cpu() {
        for kv in [None, Some(2)] {
            let mut m = decoder(kv);
            m.set_fused_sampling(true);
            let x = embeddings(&m, 9);
            let (stacked, cache) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
            let stacks = cache.stacked.as_ref().expect("fused forwards stack");
            assert_eq!(stacks.len(), m.layers.len());
            // Grouped heads give q a shape of its own: only k and v are stacked with each other.
            assert_eq!(stacks[0].kv_only, kv.is_some(), "kv heads {kv:?}");
            assert_eq!(
                stacks[0].qkv.dim(0).unwrap(),
                if kv.is_some() { 2 } else { 3 }
            );
            m.set_stack_projections(false);
            let (separate, cache) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
            assert!(cache.stacked.is_none());
            // Each batch of the stacked matmul is the gemm the separate projection runs.
            assert_eq!(stacked, separate, "kv heads {kv:?}");
        }
    }

    #[test]
    fn each_rollout_stacks_the_weights_it_starts_with() {
        let store = VarMap::new();
        let mut m = decoder_in(&store, None, false);
        m.set_fused_sampling(true);
        let x = embeddings(&m, 9);
        let (before, _) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
        // An optimizer step updates the weights in place.
        for (name, var) in store.data().lock().unwrap().iter() {
            if name.ends_with("q_proj.weight") || name.ends_with("up_proj.weight") {
                var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
            }
        }
        let (after, _) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
        m.set_stack_projections(false);
        let (want, _) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 16));
        assert_eq!(after, want);
        assert_ne!(after, before);
    }

    #[test]
    fn projections_with_biases_are_not_stacked() {
        let mut m = decoder_in(&VarMap::new(), None, true);
        m.set_fused_sampling(true);
        let x = embeddings(&m, 5);
        let (_, cache) = stepwise(&m, &x, m.empty_cache_with_capacity(2, 8));
        assert_eq!(cache.len(), 5);
        assert!(cache.stacked.is_none());
    }

    /// The stacks with every weight doubled.
    pub(super) fn doubled(s: &StackedProjections) -> StackedProjections {
        s.iter()
            .map(|l| StackedLayer {
                qkv: (&l.qkv * 2.0).unwrap(),
                kv_only: l.kv_only,
                gate_up: (&l.gate_up * 2.0).unwrap(),
            })
            .collect::<Vec<_>>()
            .into()
    }

    /// A toy decoder with the fused kernels, 6 embedded tokens, and the cache of the first 5 in buffers of
    /// `capacity`.
    pub(super) fn fused_prefill(capacity: usize) -> (Llama, Tensor, KvCache) {
        let mut m = decoder(None);
        m.set_fused_sampling(true);
        let x = embeddings(&m, 6);
        let cache = prefilled(&m, &x, 5, capacity);
        (m, x, cache)
    }

    /// The cache of the first `n` tokens of `x` [2, T, H] (every one real) in buffers of `capacity`.
    pub(super) fn prefilled(m: &Llama, x: &Tensor, n: usize, capacity: usize) -> KvCache {
        let (_, cache) = m
            .forward(
                &x.narrow(1, 0, n).unwrap(),
                &vec![vec![true; n]; 2],
                &m.empty_cache_with_capacity(2, capacity),
            )
            .unwrap();
        cache
    }

    #[test]
    fn forwards_through_a_cache_multiply_with_its_stacks() {
        let (m, x, cache) = fused_prefill(8);
        let step = |c: &KvCache| {
            let (h, _) = m
                .forward(&x.narrow(1, 5, 1).unwrap(), &vec![vec![true]; 2], c)
                .unwrap();
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let mut other = cache.clone();
        other.stacked = Some(doubled(cache.stacked.as_ref().unwrap()));
        assert_ne!(step(&cache), step(&other));
    }
}
