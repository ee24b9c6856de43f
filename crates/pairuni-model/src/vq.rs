//! The Janus VQ image tokenizer (VQGAN: conv encoder, nearest-code quantiser, conv decoder) in candle.
//!
//! Mirrors transformers' `JanusVQVAE` and loads its weights under `model.vqmodel.…`. The VQ is frozen in
//! Janus training, so this module uses candle's fused ops freely and keeps no gradient path.
//!
//! Numerics follow transformers exactly, including one asymmetry: `encode` picks the code nearest (squared L2)
//! to the latent among the *raw* codebook rows, while `decode` looks up the *L2-normalised* row.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use crate::conv_kernel;
use pairuni_data::RgbImage;
use serde::{Deserialize, Serialize};

use crate::image_tokenizer::{
    check_image_size, rgb_to_pixels, ImageTokenizer, ImageTokenizerError, Result,
};

/// GroupNorm groups in every VQ norm layer (fixed in the architecture).
const GROUPS: usize = 32;
/// GroupNorm epsilon in every VQ norm layer.
const EPS: f64 = 1e-6;

/// The `vq_config` section of a Hugging Face Janus `config.json` (fields the VQ model needs; others ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JanusVqConfig {
    /// Code vector width (8 in Janus-Pro).
    pub embed_dim: usize,
    /// Codebook size (16384 in Janus-Pro).
    pub num_embeddings: usize,
    /// Encoder emits mean and variance (unsupported; Janus uses false).
    pub double_latent: bool,
    /// Channels between encoder/decoder and the quant convs.
    pub latent_channels: usize,
    /// Image channels in.
    pub in_channels: usize,
    /// Width of the first resolution level.
    pub base_channels: usize,
    /// Width multiplier per resolution level; `len - 1` downsamplings by 2.
    pub channel_multiplier: Vec<usize>,
    /// Residual blocks per encoder level (decoder levels have one more).
    pub num_res_blocks: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Code grid side (transformers sets it to vision image_size / patch_size).
    pub num_patches: usize,
}

impl Default for JanusVqConfig {
    fn default() -> Self {
        // transformers' JanusVQVAEConfig defaults (Janus-Pro), with num_patches = 384 / 16.
        Self {
            embed_dim: 8,
            num_embeddings: 16384,
            double_latent: false,
            latent_channels: 256,
            in_channels: 3,
            base_channels: 128,
            channel_multiplier: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
            out_channels: 3,
            num_patches: 24,
        }
    }
}

impl JanusVqConfig {
    /// Downsampling factor from pixels to codes.
    pub fn downsample(&self) -> usize {
        1 << self.channel_multiplier.len().saturating_sub(1)
    }
    /// Image side in pixels: code grid side × downsampling.
    pub fn image_size(&self) -> usize {
        self.num_patches * self.downsample()
    }
    /// Rejects configurations this implementation cannot run.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ImageTokenizerError::Invalid(format!("vq_config: {m}")));
        if self.double_latent {
            return bad("double_latent = true is not supported (Janus uses false)".into());
        }
        if self.channel_multiplier.is_empty() {
            return bad("channel_multiplier is empty".into());
        }
        for (i, m) in self.channel_multiplier.iter().enumerate() {
            if !(m * self.base_channels).is_multiple_of(GROUPS) || *m == 0 {
                return bad(format!(
                    "channel_multiplier[{i}] × base_channels = {} is not a positive multiple of {GROUPS} (GroupNorm groups)",
                    m * self.base_channels
                ));
            }
        }
        if !self.base_channels.is_multiple_of(GROUPS) {
            return bad(format!(
                "base_channels {} is not a multiple of {GROUPS}",
                self.base_channels
            ));
        }
        if self.embed_dim == 0
            || self.num_embeddings == 0
            || self.num_patches == 0
            || self.num_res_blocks == 0
        {
            return bad(
                "embed_dim, num_embeddings, num_patches and num_res_blocks must be positive".into(),
            );
        }
        Ok(())
    }
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<VqConv> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(VqConv(conv2d(cin, cout, k, cfg, vb)?))
}

/// A VQ convolution: candle's `Conv2d`, run through [`conv_kernel::conv2d`] (the hand-written im2col kernel on
/// a CUDA device when `[model] conv_kernel` is on).
#[derive(Debug, Clone)]
struct VqConv(Conv2d);

impl Module for VqConv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv_kernel::conv2d(x, &self.0)
    }
}

fn norm(c: usize, vb: VarBuilder) -> Result<GroupNorm> {
    GroupNorm::new(c, vb)
}

/// GroupNorm (`GROUPS` groups, weights named as candle's and PyTorch's) computed by candle's fused layer-norm
/// kernel over each (image, group) row. candle-nn's own GroupNorm runs nine passes over the activations, four of
/// them broadcasts through strided indexing, and at the decoder's 384² × 128-channel layers those passes were
/// most of a VQ decode on the GPU; this is one pass for the statistics, one to normalise, and the channel affine.
/// The kernel's one-pass variance (E[x²] − E[x]² in f32) costs a little precision where a group's mean dwarfs
/// its spread (1.7e-5 relative at a ratio of ~10, far below bf16's rounding). Forward only (the VQ is frozen): no
/// gradient flows through the fused kernel.
#[derive(Debug, Clone)]
struct GroupNorm {
    /// Per-channel scale, shaped [1, C, 1] for broadcasting over [B, C, H·W].
    weight: Tensor,
    /// Per-channel shift, shaped like `weight`.
    bias: Tensor,
}

impl GroupNorm {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(c, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            weight: weight.reshape((1, c, 1))?,
            bias: bias.reshape((1, c, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The kernel indexes with 32-bit ints: keep each call's rows × columns below 2³¹.
        self.forward_in_calls(x, i32::MAX as usize)
    }

    /// The forward, normalising at most `max_elems` activations (whole images) per kernel call.
    fn forward_in_calls(&self, x: &Tensor, max_elems: usize) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let channels = self.weight.dim(1)?;
        if c != channels {
            return Err(ImageTokenizerError::Invalid(format!(
                "GroupNorm over {channels} channels got {c}"
            )));
        }
        let row = c / GROUPS * h * w;
        let per_call = (max_elems / (GROUPS * row)).max(1);
        let ones = Tensor::ones(row, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(row, x.dtype(), x.device())?;
        let mut parts = Vec::new();
        for start in (0..b).step_by(per_call) {
            let n = per_call.min(b - start);
            let rows = x
                .narrow(0, start, n)?
                .contiguous()?
                .reshape((n * GROUPS, row))?;
            parts.push(candle_nn::ops::layer_norm(
                &rows, &ones, &zeros, EPS as f32,
            )?);
        }
        let normed = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 0)?
        };
        Ok(normed
            .reshape((b, c, h * w))?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .reshape((b, c, h, w))?)
    }
}

/// norm → SiLU → conv → norm → SiLU → conv, plus a (1×1 or 3×3) projected shortcut when widths differ.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: VqConv,
    norm2: GroupNorm,
    conv2: VqConv,
    shortcut: Option<VqConv>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if cin == cout {
            None
        } else if vb.contains_tensor("conv_shortcut.weight") {
            Some(conv(cin, cout, 3, 1, 1, vb.pp("conv_shortcut"))?)
        } else {
            Some(conv(cin, cout, 1, 1, 0, vb.pp("nin_shortcut"))?)
        };
        Ok(Self {
            norm1: norm(cin, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: norm(cout, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let r = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((r + h)?)
    }
}

/// Single-head spatial self-attention over all positions, with 1×1-conv projections.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: VqConv,
    k: VqConv,
    v: VqConv,
    proj_out: VqConv,
}

impl AttnBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: norm(c, vb.pp("norm"))?,
            q: conv(c, c, 1, 1, 0, vb.pp("q"))?,
            k: conv(c, c, 1, 1, 0, vb.pp("k"))?,
            v: conv(c, c, 1, 1, 0, vb.pp("v"))?,
            proj_out: conv(c, c, 1, 1, 0, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let q = self
            .q
            .forward(&n)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?; // [B, HW, C]
        let k = self.k.forward(&n)?.reshape((b, c, h * w))?.contiguous()?; // [B, C, HW]
        let v = self.v.forward(&n)?.reshape((b, c, h * w))?.contiguous()?; // [B, C, HW]
        let att = (q.matmul(&k)? * (c as f64).powf(-0.5))?; // [B, HW(query), HW(key)]
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        // out[c, i] = Σ_j v[c, j] att[i, j]
        let out = v
            .matmul(&att.transpose(1, 2)?.contiguous()?)?
            .reshape((b, c, h, w))?;
        Ok((x + self.proj_out.forward(&out)?)?)
    }
}

/// resnet → attention → resnet at the lowest resolution.
#[derive(Debug, Clone)]
struct MidBlock {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl MidBlock {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(c, c, vb.pp("block_1"))?,
            attn_1: AttnBlock::new(c, vb.pp("attn_1"))?,
            block_2: ResnetBlock::new(c, c, vb.pp("block_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.block_1.forward(x)?;
        let x = self.attn_1.forward(&x)?;
        self.block_2.forward(&x)
    }
}

/// One resolution level: resnet blocks, each optionally followed by attention, then a resampling conv.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResnetBlock>,
    attns: Vec<AttnBlock>,
    resample: Option<VqConv>,
}

impl Level {
    fn forward_blocks(&self, mut x: Tensor) -> Result<Tensor> {
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x)?;
            if let Some(a) = self.attns.get(i) {
                x = a.forward(&x)?;
            }
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: VqConv,
    down: Vec<Level>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: VqConv,
}

impl Encoder {
    fn new(cfg: &JanusVqConfig, vb: VarBuilder) -> Result<Self> {
        let base = cfg.base_channels;
        let levels = cfg.channel_multiplier.len();
        let conv_in = conv(cfg.in_channels, base, 3, 1, 1, vb.pp("conv_in"))?;
        let mut down = Vec::with_capacity(levels);
        let mut block_in = base;
        for (i, &m) in cfg.channel_multiplier.iter().enumerate() {
            let vbl = vb.pp(format!("down.{i}"));
            let block_out = base * m;
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    vbl.pp(format!("block.{j}")),
                )?);
                block_in = block_out;
                if i == levels - 1 {
                    attns.push(AttnBlock::new(block_in, vbl.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if i != levels - 1 {
                Some(conv(
                    block_in,
                    block_in,
                    3,
                    2,
                    0,
                    vbl.pp("downsample.conv"),
                )?)
            } else {
                None
            };
            down.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(block_in, vb.pp("mid"))?,
            norm_out: norm(block_in, vb.pp("norm_out"))?,
            conv_out: conv(block_in, cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            h = level.forward_blocks(h)?;
            if let Some(d) = &level.resample {
                // Stride-2 conv with zero padding on the right and bottom only (asymmetric, as the reference).
                h = d.forward(&h.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                    D::Minus2,
                    0,
                    1,
                )?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        let h = self.norm_out.forward(&h)?.silu()?;
        Ok(self.conv_out.forward(&h)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: VqConv,
    mid: MidBlock,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: VqConv,
}

impl Decoder {
    fn new(cfg: &JanusVqConfig, vb: VarBuilder) -> Result<Self> {
        let base = cfg.base_channels;
        let levels = cfg.channel_multiplier.len();
        let mut block_in = base * cfg.channel_multiplier[levels - 1];
        let conv_in = conv(cfg.latent_channels, block_in, 3, 1, 1, vb.pp("conv_in"))?;
        let mid = MidBlock::new(block_in, vb.pp("mid"))?;
        // `up.0` is the lowest resolution (last multiplier) and is run first.
        let mut up = Vec::with_capacity(levels);
        for (i, level) in (0..levels).rev().enumerate() {
            let vbl = vb.pp(format!("up.{i}"));
            let block_out = base * cfg.channel_multiplier[level];
            let mut blocks = Vec::new();
            let mut attns = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    vbl.pp(format!("block.{j}")),
                )?);
                block_in = block_out;
                if level == levels - 1 {
                    attns.push(AttnBlock::new(block_in, vbl.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if level != 0 {
                Some(conv(block_in, block_in, 3, 1, 1, vbl.pp("upsample.conv"))?)
            } else {
                None
            };
            up.push(Level {
                blocks,
                attns,
                resample,
            });
        }
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: norm(block_in, vb.pp("norm_out"))?,
            conv_out: conv(block_in, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid.forward(&h)?;
        for level in &self.up {
            h = level.forward_blocks(h)?;
            if let Some(u) = &level.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&h.upsample_nearest2d(hh * 2, ww * 2)?)?;
            }
        }
        let h = self.norm_out.forward(&h)?.silu()?;
        Ok(self.conv_out.forward(&h)?)
    }
}

/// The Janus VQ model: image ⇄ `num_patches²` codes.
#[derive(Debug, Clone)]
pub struct JanusVq {
    cfg: JanusVqConfig,
    encoder: Encoder,
    quant_conv: VqConv,
    /// Raw codebook `[K, D]` in f32 (encode compares against it).
    codebook: Tensor,
    /// Squared norms of the raw rows `[K]` f32.
    codebook_sq: Tensor,
    /// L2-normalised codebook `[K, D]` in the model dtype (decode looks rows up here).
    codebook_unit: Tensor,
    post_quant_conv: VqConv,
    decoder: Decoder,
    device: Device,
    dtype: DType,
}

impl JanusVq {
    /// Builds the model from weights under `vb` (point it at `model.vqmodel`); dtype and device come from `vb`.
    pub fn new(cfg: &JanusVqConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let encoder = Encoder::new(cfg, vb.pp("encoder"))?;
        let quant_conv = conv(
            cfg.latent_channels,
            cfg.embed_dim,
            1,
            1,
            0,
            vb.pp("quant_conv"),
        )?;
        let emb = vb
            .pp("quantize.embedding")
            .get((cfg.num_embeddings, cfg.embed_dim), "weight")?;
        let codebook = emb.to_dtype(DType::F32)?;
        let codebook_sq = codebook.sqr()?.sum(1)?;
        // F.normalize: x / max(‖x‖, 1e-12)
        let norms = codebook
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        let codebook_unit = codebook.broadcast_div(&norms)?.to_dtype(vb.dtype())?;
        let post_quant_conv = conv(
            cfg.embed_dim,
            cfg.latent_channels,
            1,
            1,
            0,
            vb.pp("post_quant_conv"),
        )?;
        let decoder = Decoder::new(cfg, vb.pp("decoder"))?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            quant_conv,
            codebook,
            codebook_sq,
            codebook_unit,
            post_quant_conv,
            decoder,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The configuration this model was built with.
    pub fn config(&self) -> &JanusVqConfig {
        &self.cfg
    }

    /// Pixels `[B, 3, H, W]` (model space) → pre-quantisation latent `[B, embed_dim, h, w]` (after `quant_conv`).
    pub fn encode_latent(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        let h = self.encoder.forward(&x)?;
        Ok(self.quant_conv.forward(&h)?)
    }

    /// Latent `[B, D, h, w]` → codes `[B, h*w]` u32: nearest raw codebook row, computed in f32.
    pub fn quantize(&self, latent: &Tensor) -> Result<Tensor> {
        let (b, d, h, w) = latent.dims4()?;
        if d != self.cfg.embed_dim {
            return Err(ImageTokenizerError::Invalid(format!(
                "latent has {d} channels, codebook vectors have {}",
                self.cfg.embed_dim
            )));
        }
        let z = latent
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, d))?;
        // ‖z‖² + ‖e‖² − 2 z·e, the same expansion the reference uses, so near-ties break the same way.
        let zz = z.sqr()?.sum_keepdim(1)?;
        let ze = z.matmul(&self.codebook.t()?)?;
        let dist = zz
            .broadcast_add(&self.codebook_sq.unsqueeze(0)?)?
            .broadcast_sub(&(ze * 2.0)?)?;
        Ok(dist.argmin(1)?.to_dtype(DType::U32)?.reshape((b, h * w))?)
    }

    /// Pixels `[B, 3, H, W]` (model space) → codes `[B, N]` u32.
    pub fn encode_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size();
        if c != self.cfg.in_channels || h != s || w != s {
            return Err(ImageTokenizerError::Invalid(format!(
                "pixels are {c}x{h}x{w}, the VQ expects {}x{s}x{s}",
                self.cfg.in_channels
            )));
        }
        self.quantize(&self.encode_latent(pixels)?)
    }

    /// Codes `[B, N]` (any integer dtype) → pixels `[B, 3, H, W]` f32 in model space (unclamped).
    pub fn decode_codes(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, n) = codes.dims2()?;
        let g = self.cfg.num_patches;
        if n != g * g {
            return Err(ImageTokenizerError::Invalid(format!(
                "expected {} codes per image, got {n}",
                g * g
            )));
        }
        let idx = codes
            .to_device(&self.device)?
            .to_dtype(DType::U32)?
            .flatten_all()?;
        let max = idx.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.num_embeddings {
            return Err(ImageTokenizerError::Invalid(format!(
                "code {max} is out of range (codebook size {})",
                self.cfg.num_embeddings
            )));
        }
        let q = self.codebook_unit.index_select(&idx, 0)?; // [B*N, D]
        let q = q
            .reshape((b, g, g, self.cfg.embed_dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let h = self.post_quant_conv.forward(&q)?;
        Ok(self.decoder.forward(&h)?.to_dtype(DType::F32)?)
    }
}

impl ImageTokenizer for JanusVq {
    fn encode_batch(&self, imgs: &[RgbImage]) -> Result<Vec<Vec<u32>>> {
        if imgs.is_empty() {
            return Ok(Vec::new());
        }
        for img in imgs {
            check_image_size(img, self.image_size())?;
        }
        let px = rgb_to_pixels(imgs, &self.device)?;
        Ok(self.encode_pixels(&px)?.to_vec2::<u32>()?)
    }

    fn decode_tensor(&self, codes: &Tensor) -> Result<Tensor> {
        self.decode_codes(codes)
    }

    fn codebook_size(&self) -> usize {
        self.cfg.num_embeddings
    }

    fn grid(&self) -> (usize, usize) {
        (self.cfg.num_patches, self.cfg.num_patches)
    }

    fn image_size(&self) -> usize {
        self.cfg.image_size()
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Activations with a per-channel offset and spread, so a norm that skipped the mean or the variance fails.
    fn activations(b: usize, c: usize, hw: usize, dtype: DType) -> Tensor {
        let n = b * c * hw * hw;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let ch = (i / (hw * hw)) % c;
                let x = ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
                3.0 + ch as f32 * 0.25 + x * (1.0 + ch as f32 * 0.1)
            })
            .collect();
        Tensor::from_vec(v, (b, c, hw, hw), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Our norm loaded (by the checkpoint names) with non-trivial affine weights in `dtype`, and candle-nn's with
    /// the same weights in f32.
    fn norms(c: usize, dtype: DType) -> (GroupNorm, candle_nn::GroupNorm) {
        let w = Tensor::arange(0f32, c as f32, &Device::Cpu)
            .unwrap()
            .affine(0.1, 0.5)
            .unwrap();
        let bias = Tensor::arange(0f32, c as f32, &Device::Cpu)
            .unwrap()
            .affine(-0.05, 0.2)
            .unwrap();
        let tensors = std::collections::HashMap::from([
            ("n.weight".to_string(), w.clone()),
            ("n.bias".to_string(), bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
        let ours = GroupNorm::new(c, vb.pp("n")).unwrap();
        let reference = candle_nn::GroupNorm::new(w, bias, c, GROUPS, EPS).unwrap();
        (ours, reference)
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        crate::layers::rel_diff(a, b).unwrap()
    }

    #[test]
    fn group_norm_matches_candle_nn_in_f32_and_bf16() {
        let c = 2 * GROUPS;
        let (ours, reference) = norms(c, DType::F32);
        let x = activations(3, c, 5, DType::F32);
        let want = reference.forward(&x).unwrap();
        let e = rel_err(&ours.forward(&x).unwrap(), &want);
        // The kernel takes the variance as E[x²] − E[x]² in f32 (one pass), which loses a little to cancellation
        // where the mean dwarfs the spread, as here (mean ≈ 3–7, spread ≈ 0.5–1.3).
        assert!(e < 1e-4, "f32 relative error {e}");
        let (ours16, _) = norms(c, DType::BF16);
        let e = rel_err(
            &ours16.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap(),
            &want,
        );
        assert!(e < 2e-2, "bf16 relative error {e}");
    }

    #[test]
    fn group_norm_in_several_calls_equals_one_call() {
        let c = GROUPS;
        let (ours, _) = norms(c, DType::F32);
        let x = activations(5, c, 4, DType::F32);
        let whole = ours.forward(&x).unwrap();
        // Two images per call: three calls, the last with one image.
        let split = ours.forward_in_calls(&x, 2 * c * 16).unwrap();
        assert_eq!(rel_err(&split, &whole), 0.0);
        assert!(ours.forward(&activations(1, c + 1, 4, DType::F32)).is_err());
    }

    /// Timing, not a check: `cargo test --release -p pairuni-model group_norm_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing: prints both norms' time on 16 × 32 × 64² activations"]
    fn group_norm_timing() {
        let c = GROUPS;
        let (ours, reference) = norms(c, DType::F32);
        let x = activations(16, c, 64, DType::F32);
        let time = |f: &dyn Fn() -> Tensor| {
            f();
            let t = std::time::Instant::now();
            for _ in 0..5 {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / 5.0
        };
        let a = time(&|| reference.forward(&x).unwrap());
        let b = time(&|| ours.forward(&x).unwrap());
        println!("candle-nn GroupNorm {a:.1} ms, fused layer-norm GroupNorm {b:.1} ms");
    }
}
