//! Building blocks written with basic tensor ops only, so that every weight receives a gradient.
//!
//! candle's fused `rms_norm`, `layer_norm`, `rope` and `softmax_last_dim` have no backward (CUDA.md); these
//! versions are slower but differentiable. Also the parameter store: weights live as `Var`s in a candle `VarMap`,
//! created either from a checkpoint (`ParamMode::Load`) or from a seeded init (`ParamMode::Init`).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use candle_core::{DType, Device, Module, Shape, Tensor, Var, D};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::{ModelError, Result};

/// How a parameter is initialised when it is created rather than loaded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InitKind {
    /// N(0, std²).
    Normal(f64),
    /// All ones (norm weights).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// Where parameters come from.
#[derive(Debug, Clone)]
pub(crate) enum ParamMode {
    /// Every name must already be in the store (filled from safetensors); `origin` names the checkpoint.
    Load { origin: String },
    /// Created with a seeded init; the seed is mixed with the parameter name so order does not matter.
    Init { seed: u64 },
}

/// A prefix-scoped view of the parameter store (the VarBuilder idea, with seeded init and clear errors).
#[derive(Clone)]
pub(crate) struct Params<'a> {
    pub store: &'a VarMap,
    pub prefix: String,
    pub mode: &'a ParamMode,
    pub dtype: DType,
    pub device: &'a Device,
}

impl<'a> Params<'a> {
    /// Sub-scope `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The parameter `name` with `shape`, loaded or created.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: InitKind) -> Result<Tensor> {
        let shape = shape.into();
        let full = self.full(name);
        let mut data = self.store.data().lock().expect("varmap lock");
        if let Some(v) = data.get(&full) {
            if v.shape() != &shape {
                return Err(ModelError::Checkpoint {
                    path: self.origin(),
                    msg: format!(
                        "tensor `{full}` has shape {:?}, config expects {:?}",
                        v.shape(),
                        shape
                    ),
                });
            }
            return Ok(v.as_tensor().clone());
        }
        match self.mode {
            ParamMode::Load { origin } => Err(ModelError::Checkpoint {
                path: origin.clone(),
                msg: format!("missing tensor `{full}` (shape {shape:?})"),
            }),
            ParamMode::Init { seed } => {
                let mut h = DefaultHasher::new();
                full.hash(&mut h);
                let n = shape.elem_count();
                let vals: Vec<f32> = match init {
                    InitKind::Ones => vec![1.0; n],
                    InitKind::Zeros => vec![0.0; n],
                    InitKind::Normal(std) => normal_values(seed ^ h.finish(), n, std as f32),
                };
                let t = Tensor::from_vec(vals, shape, self.device)?.to_dtype(self.dtype)?;
                let var = Var::from_tensor(&t)?;
                let out = var.as_tensor().clone();
                data.insert(full, var);
                Ok(out)
            }
        }
    }

    fn origin(&self) -> String {
        match self.mode {
            ParamMode::Load { origin } => origin.clone(),
            ParamMode::Init { .. } => "<init>".into(),
        }
    }
}

/// Values per ChaCha stream in a random init: tensors up to this size (every toy-model tensor: the largest is
/// 69,120) draw one stream, as they always did; larger ones draw one stream per chunk of this size.
const INIT_CHUNK: usize = 1 << 20;

/// `n` values from Normal(0, `std`), determined by `seed` alone. A random Janus-Pro-1B (≈ 2·10⁹ values) took
/// ≈ 20 s to initialise on one core of the GPU machine, before every benchmark step; chunks of a large tensor
/// draw from their own streams (`set_stream`) on rayon's threads, so the values do not depend on the thread
/// count.
fn normal_values(seed: u64, n: usize, std: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let d = Normal::new(0.0f32, std).expect("valid std");
    if n <= INIT_CHUNK {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        return (0..n).map(|_| d.sample(&mut rng)).collect();
    }
    let mut out = vec![0f32; n];
    out.par_chunks_mut(INIT_CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64 + 1);
            for x in chunk {
                *x = d.sample(&mut rng);
            }
        });
    out
}

/// Dense layer `y = x Wᵀ + b` (weight [out, in] as in PyTorch).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{p}.weight` [out,in] and, when `bias`, `{p}.bias`.
    pub fn new(p: &Params, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let std = 0.02;
        let weight = p.get((out_dim, in_dim), "weight", InitKind::Normal(std))?;
        let bias = if bias {
            Some(p.get(out_dim, "bias", InitKind::Zeros)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Linear {
    /// The layer through [`crate::trained_kernels::linear`] (one autograd node, the same values), bias added after.
    pub fn forward_trained(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = crate::trained_kernels::linear(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The layer with a training forward's kernels (`trained`) or the plain composition.
    pub fn forward_with(&self, x: &Tensor, trained: bool) -> candle_core::Result<Tensor> {
        if trained {
            self.forward_trained(x)
        } else {
            self.forward(x)
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("rank ≥ 1");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

/// LLaMA RMSNorm, computed in f32 like transformers, result cast back then scaled.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// Loads `{p}.weight`.
    pub fn new(p: &Params, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: p.get(dim, "weight", InitKind::Ones)?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dt)?;
        normed.broadcast_mul(&self.weight)
    }
}

impl RmsNorm {
    /// The norm, through candle's fused kernel when `fused` (one launch, f32 accumulation, one rounding; no
    /// backward: for sampling, where nothing is differentiated), else the differentiable composition.
    pub fn forward_with(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        if fused {
            candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
        } else {
            self.forward(x)
        }
    }
}

/// LayerNorm with affine weight and bias, statistics in f32.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `{p}.weight` and `{p}.bias`.
    pub fn new(p: &Params, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: p.get(dim, "weight", InitKind::Ones)?,
            bias: p.get(dim, "bias", InitKind::Zeros)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dt)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Activations named in Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Act {
    /// Exact (erf) GELU, transformers' "gelu".
    Gelu,
    /// tanh-approximated GELU.
    GeluTanh,
    /// SiLU / swish.
    Silu,
}

impl Act {
    /// Parses a config's activation name.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Self::GeluTanh),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(ModelError::input(format!(
                "unsupported activation `{other}`"
            ))),
        }
    }

    /// Applies the activation.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Silu => x.silu(),
        }
    }
}

/// Softmax over the last dim from basic ops (differentiable).
pub(crate) fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dim from basic ops (differentiable).
pub(crate) fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// max|a − b| / max|b| in f32 (max|a − b| when b is all zeros): how far `a` is from the reference `b`.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let delta = (a - &b)?.abs()?;
    // A maximum may skip NaN (CUDA's fmaxf does); a sum does not: a NaN or an infinity in either is a NaN here.
    if !delta.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok(f32::NAN);
    }
    let d = delta.max_all()?.to_scalar::<f32>()?;
    let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(if m > 0.0 { d / m } else { d })
}

/// `n` deterministic test values spread over [−1, 1) (a multiplicative hash of index + `seed`): varied enough that
/// every element of a comparison is tested, with no zeros in bulk.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 2654435761usize) % 997) as f32 / 498.5 - 1.0)
        .collect()
}

/// [`rel_diff`] of `got` from `want` in a test, which first asserts that `want` is not nearly all zeros (max|want|
/// above `min_scale`): a comparison with zeros proves nothing.
#[cfg(test)]
pub(crate) fn checked_rel_diff(got: &Tensor, want: &Tensor, min_scale: f32) -> f32 {
    let scale = want
        .to_dtype(DType::F32)
        .and_then(|w| w.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap();
    assert!(
        scale > min_scale,
        "a reference of zeros proves nothing (max {scale})"
    );
    rel_diff(got, want).unwrap()
}

/// Rotary tables (cos, sin) of shape [max_pos, head_dim/2], f32.
#[derive(Debug, Clone)]
pub(crate) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    max_pos: usize,
}

impl Rotary {
    /// Tables for `head_dim` and base `theta`.
    pub fn new(head_dim: usize, theta: f64, max_pos: usize, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), device)?;
        let pos = Tensor::arange(0u32, max_pos as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_pos, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            max_pos,
        })
    }

    /// cos/sin for per-row positions `pos` [B, T] (u32) as [B, 1, T, half] in `dtype` (the tests' entry point;
    /// the decoder uses `tables_checked`).
    #[cfg(test)]
    pub fn tables(&self, pos: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let max = pos.max_all()?.to_scalar::<u32>()? as usize;
        self.tables_checked(pos, max, dtype)
    }

    /// cos/sin for per-row positions `pos` [B, T] (u32) as [B, 1, T, half] in `dtype`, given their largest value
    /// `max`: the decoder builds positions on the host, and reading the maximum back from the device would cost a
    /// synchronisation per decode step.
    pub fn tables_checked(
        &self,
        pos: &Tensor,
        max: usize,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t) = pos.dims2()?;
        if max >= self.max_pos {
            return Err(ModelError::input(format!(
                "position {max} exceeds max_position_embeddings {}",
                self.max_pos
            )));
        }
        let flat = pos.flatten_all()?;
        let half = self.cos.dim(1)?;
        let cos = self
            .cos
            .index_select(&flat, 0)?
            .reshape((b, 1, t, half))?
            .to_dtype(dtype)?;
        let sin = self
            .sin
            .index_select(&flat, 0)?
            .reshape((b, 1, t, half))?
            .to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Rotary tables for candle's fused rotary kernel: cos/sin [B, T, half] for keys, and for queries the same
/// tables times the attention scale 1/√head_dim, which saves the decoder one launch per layer.
#[derive(Debug, Clone)]
pub(crate) struct FusedRotaryTables {
    pub cos_k: Tensor,
    pub sin_k: Tensor,
    pub cos_q: Tensor,
    pub sin_q: Tensor,
}

impl Rotary {
    /// Tables of `fused` kind for positions `pos` [B, T] whose largest value is `max`, in `dtype`; queries get
    /// `q_scale` folded in (computed in f32, rounded to `dtype` once).
    pub fn fused_tables(
        &self,
        pos: &Tensor,
        max: usize,
        dtype: DType,
        q_scale: f64,
    ) -> Result<FusedRotaryTables> {
        let (b, t) = pos.dims2()?;
        let (cos, sin) = self.tables_checked(pos, max, DType::F32)?;
        let half = cos.dim(D::Minus1)?;
        let cos = cos.reshape((b, t, half))?;
        let sin = sin.reshape((b, t, half))?;
        Ok(FusedRotaryTables {
            cos_q: cos.affine(q_scale, 0.0)?.to_dtype(dtype)?,
            sin_q: sin.affine(q_scale, 0.0)?.to_dtype(dtype)?,
            cos_k: cos.to_dtype(dtype)?,
            sin_k: sin.to_dtype(dtype)?,
        })
    }
}

/// [`apply_rope`] through candle's fused kernel (no backward): x [B, H, T, D] contiguous, cos/sin [B, T, D/2].
pub(crate) fn apply_rope_fused(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
}

/// Non-interleaved (rotate-half) rotary embedding of x [B, H, T, D] with cos/sin [B, 1, T, D/2].
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_init_is_one_stream_for_small_tensors_and_thread_count_free_for_large() {
        // Small tensors keep the single stream every recorded toy model was initialised from.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let d = Normal::new(0.0f32, 0.5).unwrap();
        let one: Vec<f32> = (0..1000).map(|_| d.sample(&mut rng)).collect();
        assert_eq!(normal_values(9, 1000, 0.5), one);
        // Large ones: the same values on one thread as on many, chunks that are not copies of each other, and
        // the distribution asked for.
        let n = 2 * INIT_CHUNK + 123;
        let many = normal_values(9, n, 0.5);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| normal_values(9, n, 0.5)), many);
        assert_ne!(many[..64], many[INIT_CHUNK..INIT_CHUNK + 64]);
        assert_ne!(normal_values(10, n, 0.5), many);
        let mean = many.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = many.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 2e-3, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 2e-3, "std {}", var.sqrt());
    }

    #[test]
    fn softmax_and_logsoftmax_agree_with_candle() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [-1.0, 0.5, 10.0]], &dev).unwrap();
        let a = softmax_last(&x).unwrap();
        let b = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let diff = (a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6);
        let l = log_softmax_last(&x).unwrap().exp().unwrap();
        let diff = (l - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let dev = Device::Cpu;
        let r = Rotary::new(8, 10000.0, 16, &dev).unwrap();
        let x = Tensor::arange(0f32, 16.0, &dev)
            .unwrap()
            .reshape((1, 1, 2, 8))
            .unwrap();
        let pos = Tensor::new(&[[0u32, 5]], &dev).unwrap();
        let (c, s) = r.tables(&pos, DType::F32).unwrap();
        let y = apply_rope(&x, &c, &s).unwrap();
        let y0: Vec<f32> = y
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let x0: Vec<f32> = x
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y0, x0);
        let n = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((n(&y) - n(&x)).abs() < 1e-3);
        assert!(r
            .tables(&Tensor::new(&[[16u32]], &dev).unwrap(), DType::F32)
            .is_err());
    }

    #[test]
    fn seeded_init_is_reproducible_and_load_mode_reports_missing() {
        let dev = Device::Cpu;
        let mk = |seed| {
            let vm = VarMap::new();
            let mode = ParamMode::Init { seed };
            let p = Params {
                store: &vm,
                prefix: "a".into(),
                mode: &mode,
                dtype: DType::F32,
                device: &dev,
            };
            p.pp("b")
                .get((2, 3), "w", InitKind::Normal(1.0))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        assert_eq!(mk(1), mk(1));
        assert_ne!(mk(1), mk(2));
        let vm = VarMap::new();
        let mode = ParamMode::Load {
            origin: "ck".into(),
        };
        let p = Params {
            store: &vm,
            prefix: String::new(),
            mode: &mode,
            dtype: DType::F32,
            device: &dev,
        };
        let e = p
            .get(3, "x.weight", InitKind::Ones)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ck") && e.contains("x.weight"), "{e}");
    }
}
