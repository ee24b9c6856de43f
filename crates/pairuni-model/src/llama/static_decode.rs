//! Decoding with every step's shapes and kernel arguments fixed, so that a step can be captured once as a CUDA
//! graph and replayed (`crate::graphs`, docs/GPU.md).
//!
//! A step of [`Llama::forward`] through a preallocated cache differs from the previous one in ways a graph
//! cannot replay: the positions and the write offset are kernel arguments or host uploads, and attention reads
//! a view one key longer. Here everything that changes lives on the device: a step counter, from which each
//! step computes its positions and the column it writes (scatter with device indices); keys are attended over a
//! width rounded up to [`WIDTH_STEP`], the columns not yet written masked out. So steps of one width launch the
//! same kernels with the same arguments, and a rollout of n codes needs about n / `WIDTH_STEP` graphs. When the
//! one-query attention kernel serves the steps ([`crate::decode_attention`]), it reads the number of keys written
//! from the device instead, every step attends over the whole capacity, and one graph serves the rollout
//! ([`Llama::static_width`]).

use std::sync::atomic::Ordering;

use candle_core::{DType, Tensor};

use super::{prefix_in_new_buffer, Kernels, KvCache, Llama, StackedProjections, MASKED};
use crate::error::{ModelError, Result};

/// Granularity of the attention width: coarser means fewer graphs to capture, finer fewer masked keys read
/// (on average half a step's worth per decode step).
pub const WIDTH_STEP: usize = 64;

/// Key columns a static decode of `steps` steps after `past` cached positions holds: whole attention widths. A
/// sampler that preallocates its cache with this capacity lets the static decode take the buffers over.
pub fn static_capacity(past: usize, steps: usize) -> usize {
    (past + steps).div_ceil(WIDTH_STEP) * WIDTH_STEP
}

/// The device state of a static decode: key/value buffers, key mask, step counter and the constants the steps
/// read, all at fixed addresses. Made from a prefilled cache by [`Llama::static_decode`].
pub struct StaticDecode {
    /// Per layer (k, v) [B, kv_heads, capacity, D].
    layers: Vec<(Tensor, Tensor)>,
    /// Additive key mask [B, 1, 1, capacity] (f32): 0 for real keys, `MASKED` for padding and unwritten columns.
    bias: Tensor,
    /// Per row, the position of the first decoded token [B, 1] (u32).
    base_pos: Tensor,
    /// The column of the first decoded token [1] (u32): the prefilled length.
    base_col: Tensor,
    /// Steps taken, on the device [1] (u32); the step body advances it.
    step: Tensor,
    /// 1 [1] (u32), what the counter advances by.
    one: Tensor,
    /// 0 [B, 1, 1, 1] (f32), what unmasks a written column.
    open: Tensor,
    /// Prefilled length (host copy of `base_col`).
    past: usize,
    /// Columns of the buffers.
    capacity: usize,
    /// Steps reserved at creation.
    steps: usize,
    /// Steps taken, on the host (the step widths are chosen here).
    taken: usize,
    /// The largest position any reserved step reaches (checked against the rotary table once).
    max_pos: usize,
    /// The stacked projections the steps multiply with when the fused kernels are on (the cache's own).
    stacked: Option<StackedProjections>,
}

impl StaticDecode {
    /// Key columns the buffers hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Steps reserved at creation: the most this decode takes.
    pub fn reserved_steps(&self) -> usize {
        self.steps
    }

    /// The attention width of the next step: the keys it sees, rounded up to [`WIDTH_STEP`].
    pub fn next_width(&self) -> usize {
        let keys = self.past + self.taken + 1;
        keys.div_ceil(WIDTH_STEP)
            .saturating_mul(WIDTH_STEP)
            .min(self.capacity)
    }

    /// Records on the host that a step ran (its body advanced the device counter).
    pub fn advance(&mut self) {
        self.taken += 1;
    }

    /// The device step counter broadcast to `shape` and made contiguous (scatter indices).
    pub fn step_indices(&self, shape: &[usize]) -> Result<Tensor> {
        let ones = vec![1; shape.len()];
        Ok(self.step.reshape(ones)?.broadcast_as(shape)?.contiguous()?)
    }

    /// The device step counter [1] (u32): the steps taken.
    pub fn counter(&self) -> &Tensor {
        &self.step
    }

    /// Advances the device step counter: the last part of a step body.
    pub fn count_step(&self) -> Result<()> {
        let next = (&self.step + &self.one)?;
        self.step.slice_set(&next, 0, 0)?;
        Ok(())
    }
}

impl Llama {
    /// The attention width of `sd`'s next step, which keys its graph: the whole capacity when the attention
    /// kernel takes the steps (it reads the live keys from the device, so every step is one graph), else
    /// [`StaticDecode::next_width`] (candle's ops read every column of the width).
    pub fn static_width(&self, sd: &StaticDecode) -> usize {
        let kernel_serves = self.fused_sampling
            && self.attention_kernel
            && crate::nvrtc::runs_kernels(sd.bias.device())
            && crate::decode_attention::would_serve(
                self.cfg.head_dim(),
                sd.capacity,
                sd.layers.first().map_or(DType::F32, |(k, _)| k.dtype()),
            );
        static_width_for(sd, kernel_serves)
    }

    /// Turns a prefilled preallocated cache into a static decode of `steps` one-token steps. The cache's buffers
    /// are taken over when they are large enough and nobody has written past its prefix; otherwise its prefix
    /// is copied into new ones.
    pub fn static_decode(&self, cache: KvCache, steps: usize) -> Result<StaticDecode> {
        let past = cache.len();
        let (Some(pre), Some(bias)) = (cache.prealloc.as_ref(), cache.key_bias.as_ref()) else {
            return Err(ModelError::input(
                "a static decode starts from a prefilled preallocated cache",
            ));
        };
        if cache.layers.is_empty() || steps == 0 {
            return Err(ModelError::input(
                "a static decode needs a prefilled cache and at least one step",
            ));
        }
        let b = cache.batch();
        let dev = bias.device().clone();
        let capacity = static_capacity(past, steps);
        let max_pos = cache.next_pos.iter().copied().max().unwrap_or(0) as usize + steps - 1;
        if max_pos >= self.cfg.max_position_embeddings {
            return Err(ModelError::input(format!(
                "a decode of {steps} steps reaches position {max_pos}, beyond max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        // Claiming every column keeps a sibling cache value from writing into these buffers: its next forward
        // fails the claim and copies.
        let owned = pre.capacity >= capacity
            && pre
                .written
                .compare_exchange(past, pre.capacity, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        let (layers, bias) = if owned {
            (cache.layers.clone(), bias.clone())
        } else {
            let widen = |t: &Tensor, dim: usize| prefix_in_new_buffer(t, dim, past, capacity);
            let layers = cache
                .layers
                .iter()
                .map(|(k, v)| Ok((widen(k, 2)?, widen(v, 2)?)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            (layers, widen(bias, 3)?)
        };
        // Columns from the prefix on are masked until a step writes them.
        let tail = bias.dim(3)? - past;
        bias.slice_set(&Tensor::full(MASKED, (b, 1, 1, tail), &dev)?, 3, past)?;
        let base_pos = Tensor::from_vec(cache.next_pos.clone(), (b, 1), &dev)?;
        let stacked = if self.fused_sampling {
            self.stacked_for(cache.stacked.as_ref())?
        } else {
            None
        };
        Ok(StaticDecode {
            layers,
            bias,
            base_pos,
            base_col: Tensor::from_vec(vec![past as u32], 1, &dev)?,
            step: Tensor::zeros(1, DType::U32, &dev)?,
            one: Tensor::ones(1, DType::U32, &dev)?,
            open: Tensor::zeros((b, 1, 1, 1), DType::F32, &dev)?,
            past,
            capacity,
            steps,
            taken: 0,
            max_pos,
            stacked,
        })
    }

    /// One decode step of the static decode `sd` on `x` [B, 1, H] (every row real), attending over `width` key
    /// columns (`sd.next_width()`); returns the final-normed hidden states [B, H]. Reads the step counter but does
    /// not advance it ([`StaticDecode::count_step`] ends a step body), and creates no tensor from host data, so
    /// it can be captured.
    pub fn static_step(&self, x: &Tensor, sd: &StaticDecode, width: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if t != 1 || b != sd.base_pos.dim(0)? {
            return Err(ModelError::input(format!(
                "a static decode step takes [{}, 1, H] embeddings, got [{b}, {t}, H]",
                sd.base_pos.dim(0)?
            )));
        }
        if sd.taken >= sd.steps || width > sd.capacity {
            return Err(ModelError::input(format!(
                "static decode step {} of {} reserved (width {width} of {})",
                sd.taken + 1,
                sd.steps,
                sd.capacity
            )));
        }
        let fused = self.fused_sampling;
        let pos = sd.base_pos.broadcast_add(&sd.step)?;
        let rope = self.rope_tables(&pos, sd.max_pos, x.dtype(), fused)?;
        let col = (&sd.base_col + &sd.step)?.reshape((1, 1, 1, 1))?;
        sd.bias
            .scatter_set(&col.broadcast_as((b, 1, 1, 1))?.contiguous()?, &sd.open, 3)?;
        let mask = sd.bias.narrow(3, 0, width)?;
        let (kvh, d) = (self.cfg.kv_heads(), self.cfg.head_dim());
        let write_at = col.broadcast_as((b, kvh, 1, d))?.contiguous()?;
        let kernels = Kernels {
            // With the layer kernels, one kernel rotates the queries and keys and writes the cache.
            rope_in_store: fused && self.layer_kernels,
            ..self.kernels(fused, false, super::prealloc_copies_kv(x.device()))
        };
        let tables = match (&rope, kernels.rope_in_store) {
            (super::RopeTables::Fused(tb), true) => Some(tb),
            _ => None,
        };
        let col_index = col.flatten_all()?;
        // Keys written once this step's are: all the attention kernel reads of the width (computed only when
        // the kernel may take the step: elsewhere it would be one more launch per step for nothing).
        let live = if fused && self.attention_kernel {
            Some((&col_index + &sd.one)?)
        } else {
            None
        };
        let kernels = Kernels {
            live_keys: live.as_ref(),
            ..kernels
        };
        let stacked = if fused { sd.stacked.as_deref() } else { None };
        let h = self.run_layers(x, &rope, &mask, kernels, stacked, |li, q, k, v| {
            let Some((kb, vb)) = sd.layers.get(li) else {
                candle_core::bail!("the static decode holds {} layer caches", sd.layers.len())
            };
            let q = match tables {
                Some(tb) => crate::layer_kernels::rope_store(
                    (q, k, v),
                    tb,
                    (kb, vb),
                    &col_index,
                    &write_at,
                )?,
                None => {
                    kb.scatter_set(&write_at, k, 2)?;
                    vb.scatter_set(&write_at, v, 2)?;
                    q.clone()
                }
            };
            Ok((q, kb.narrow(2, 0, width)?, vb.narrow(2, 0, width)?))
        })?;
        Ok(h.squeeze(1)?)
    }
}

/// [`Llama::static_width`] given whether the attention kernel takes the steps.
fn static_width_for(sd: &StaticDecode, kernel_serves: bool) -> usize {
    if kernel_serves {
        sd.capacity
    } else {
        sd.next_width()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{decoder, doubled, embeddings, fused_prefill, prefilled};
    use super::*;

    /// Hidden states of decoding `x` [2, T, H] one token at a time after a `prefill`-token prompt, through a
    /// preallocated cache of `capacity` (`forward`) or a static decode made from it.
    fn decode(m: &Llama, x: &Tensor, prefill: usize, capacity: usize, fixed: bool) -> Vec<f32> {
        if fixed {
            return decode_at(m, x, prefill, capacity, StaticDecode::next_width);
        }
        let t = x.dim(1).unwrap();
        let mut cache = prefilled(m, x, prefill, capacity);
        let mut out = Vec::new();
        for i in prefill..t {
            let (h, c) = m
                .forward(&x.narrow(1, i, 1).unwrap(), &vec![vec![true]; 2], &cache)
                .unwrap();
            cache = c;
            out.extend(h.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    }

    /// [`decode`] through a static decode whose steps attend over `width(sd)` key columns.
    fn decode_at(
        m: &Llama,
        x: &Tensor,
        prefill: usize,
        capacity: usize,
        width: impl Fn(&StaticDecode) -> usize,
    ) -> Vec<f32> {
        let t = x.dim(1).unwrap();
        let mut sd = m
            .static_decode(prefilled(m, x, prefill, capacity), t - prefill)
            .unwrap();
        let mut out = Vec::new();
        for i in prefill..t {
            let width = width(&sd);
            let h = m
                .static_step(&x.narrow(1, i, 1).unwrap(), &sd, width)
                .unwrap();
            sd.count_step().unwrap();
            sd.advance();
            out.extend(h.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        out
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn static_steps_equal_the_growing_decode_across_widths() {
        // 70 tokens: widths 64 then 128, so the step shape changes mid-decode.
        for (kv, fused) in [(None, false), (Some(2), false), (None, true)] {
            let mut m = decoder(kv);
            m.set_fused_sampling(fused);
            let x = embeddings(&m, 70);
            let want = decode(&m, &x, 5, 70, false);
            // Capacity 70 < 128: the static decode copies the prefix into wider buffers.
            let copied = decode(&m, &x, 5, 70, true);
            // Capacity 128: it takes the buffers over.
            let taken = decode(&m, &x, 5, 128, true);
            for got in [&copied, &taken] {
                let err = max_rel_diff(got, &want);
                assert!(err < 1e-5, "kv {kv:?} fused {fused}: rel err {err}");
            }
        }
    }

    #[test]
    fn the_layer_kernels_switch_leaves_cpu_static_steps_bit_for_bit() {
        // On the CPU the layer kernels fall back to candle's ops, through the restructured layer (the residual
        // carried beside the stream, the rotation done where the cache is written): the same values exactly.
        for kv in [None, Some(2)] {
            let mut m = decoder(kv);
            m.set_fused_sampling(true);
            let x = embeddings(&m, 70);
            let want = decode(&m, &x, 5, 128, true);
            m.set_layer_kernels(true);
            assert_eq!(decode(&m, &x, 5, 128, true), want, "kv {kv:?}");
            assert_eq!(
                decode(&m, &x, 5, 70, false),
                decode_off(&x, kv),
                "kv {kv:?}"
            );
        }
    }

    /// [`decode`] through `forward` with the layer kernels off, for comparison.
    fn decode_off(x: &Tensor, kv: Option<usize>) -> Vec<f32> {
        let mut m = decoder(kv);
        m.set_fused_sampling(true);
        decode(&m, x, 5, 70, false)
    }

    #[test]
    fn widths_round_up_and_stop_at_the_capacity() {
        let m = decoder(None);
        let x = embeddings(&m, 8);
        let cache = prefilled(&m, &x, 8, 8);
        let mut sd = m.static_decode(cache, 60).unwrap();
        assert_eq!(sd.capacity(), 128);
        assert_eq!(sd.next_width(), 64);
        // 8 prefilled keys: the 56th step writes key 64, the 57th key 65.
        for _ in 0..55 {
            sd.advance();
        }
        assert_eq!(sd.next_width(), 64);
        sd.advance();
        assert_eq!(sd.next_width(), 128);
        for _ in 56..60 {
            sd.advance();
        }
        let err = m
            .static_step(&x.narrow(1, 0, 1).unwrap(), &sd, 128)
            .unwrap_err();
        assert!(err.to_string().contains("61 of 60"), "{err}");
    }

    #[test]
    fn steps_over_the_whole_capacity_equal_steps_over_their_width() {
        // The attention kernel's single graph attends over the whole capacity; should the kernel then turn
        // itself off, candle's ops read every column of it, the unwritten ones masked: the same hidden states.
        for (kv, fused) in [(None, false), (Some(2), true)] {
            let mut m = decoder(kv);
            m.set_fused_sampling(fused);
            let x = embeddings(&m, 70);
            let want = decode(&m, &x, 5, 128, true);
            let got = decode_at(&m, &x, 5, 128, |sd| {
                // On the CPU the kernel never serves, so the model keeps to the rounded widths.
                assert_eq!(m.static_width(sd), sd.next_width());
                let width = static_width_for(sd, true);
                assert_eq!(width, 128);
                width
            });
            let err = max_rel_diff(&got, &want);
            assert!(err < 1e-5, "kv {kv:?} fused {fused}: rel err {err}");
        }
    }

    #[test]
    fn a_sibling_of_the_cache_still_decodes_its_own_branch() {
        let m = decoder(None);
        let x = embeddings(&m, 12);
        let cache = prefilled(&m, &x, 4, 64);
        let sibling = cache.clone();
        let mut sd = m.static_decode(cache, 8).unwrap();
        for i in 4..12 {
            let w = sd.next_width();
            m.static_step(&x.narrow(1, i, 1).unwrap(), &sd, w).unwrap();
            sd.count_step().unwrap();
            sd.advance();
        }
        // The sibling continues with other tokens; the static decode owns the buffers, so it must copy.
        let other = x.narrow(1, 0, 1).unwrap();
        let (got, _) = m
            .forward(&other, &[vec![true], vec![true]], &sibling)
            .unwrap();
        let (_, fresh) = m
            .forward(
                &x.narrow(1, 0, 4).unwrap(),
                &vec![vec![true; 4]; 2],
                &m.empty_cache(2),
            )
            .unwrap();
        let (want, _) = m
            .forward(&other, &[vec![true], vec![true]], &fresh)
            .unwrap();
        let (got, want) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(max_rel_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn bad_starts_are_clear_errors() {
        let m = decoder(None);
        let err = m
            .static_decode(m.empty_cache_with_capacity(2, 8), 4)
            .err()
            .expect("an empty cache has nothing to decode from");
        assert!(err.to_string().contains("prefilled"), "{err}");
        let x = embeddings(&m, 3);
        let (_, grown) = m
            .forward(&x, &vec![vec![true; 3]; 2], &m.empty_cache(2))
            .unwrap();
        assert!(m.static_decode(grown, 4).is_err());
        let pre = prefilled(&m, &x, 3, 8);
        let too_far = m.cfg.max_position_embeddings;
        let err = m
            .static_decode(pre, too_far)
            .err()
            .expect("beyond the table");
        assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    }

    #[test]
    fn static_steps_multiply_with_the_caches_stacks() {
        let (m, x, cache) = fused_prefill(64);
        let step = |sd: &StaticDecode| {
            let h = m
                .static_step(&x.narrow(1, 5, 1).unwrap(), sd, sd.next_width())
                .unwrap();
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let sd = m.static_decode(cache.clone(), 1).unwrap();
        let mut other = m.static_decode(cache, 1).unwrap();
        other.stacked = Some(doubled(sd.stacked.as_ref().expect("the cache's stacks")));
        assert_ne!(step(&sd), step(&other));
    }
}
