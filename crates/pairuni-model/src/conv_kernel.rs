//! The VQ's k×k convolutions (stride 1) on CUDA as one hand-written im2col kernel and one batched matmul
//! (`[model] conv_kernel`).
//!
//! candle 0.11's CUDA `conv2d` without cuDNN lowers a convolution to im2col + matmul, and both halves cost far
//! more than the arithmetic: its im2col kernel spends one thread per element of a column buffer nine times the
//! input (16 images of 128 channels at 384² is 2.7 G elements) and five 64-bit divisions on each to find where the
//! element comes from, and it lays the columns out per pixel, so the matmul's output is pixel-major and takes a
//! strided copy back to channels-first. The first lent call measured the VQ decode of 16 images at 1,084 ms
//! against PyTorch's 68 ms (cuDNN); these are the likely cause.
//!
//! Here the columns are laid out per image as `[C·kh·kw, Ho·Wo]` (row `c·kh·kw + dy·kw + dx`, the weight's own
//! order), so that `weight [Cout, C·kh·kw] × columns` is already channels-first: one strided-batched cuBLAS matmul
//! with the weight's batch stride 0, and no copy after it. The kernel gives each block one row of the columns
//! (image, channel and tap are the same for the whole block, found once) and each thread pixels along it, with
//! 32-bit index arithmetic: reads and writes run along image rows. Images are taken in chunks whose columns stay
//! under [`MAX_COLUMN_BYTES`], so the buffer does not grow with the batch.
//!
//! The values are a copy and a matmul, the same dot products as candle's im2col path in another blocking: the
//! first call in a process compares with candle's `conv2d` (tolerance [`CHECK_TOLERANCE`]) and turns the kernel
//! off if they differ. Inference only (no backward): the VQ is frozen. The tests run the kernel's source on the CPU
//! ([`crate::kernel_emulator`]).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Result, Tensor};
use candle_nn::{Conv2d, Module};

use crate::nvrtc::Trust;

/// The kernel's state (`PAIRUNI_CONV_KERNEL=off` turns it off).
pub static IM2COL: Trust = Trust::new("PAIRUNI_CONV_KERNEL", "im2col convolution kernel");

/// Whether the VQ's convolutions on a CUDA device go through the kernel: a process-wide switch (the VQ sits
/// behind the image codec, and every model of a process wants the same). On: on an H200 it decoded 16 images
/// in 408 ms against candle's 820 (docs/BENCHMARKS.md, eighteenth session); it acts on CUDA devices only.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Largest relative difference from candle's `conv2d` the first-call check accepts: the same products summed in
/// another order differ by bf16 rounding; a wrong index gives order one.
const CHECK_TOLERANCE: f32 = 2e-2;

/// Bytes of column buffer one chunk of images may take (1 GiB: 3 images of 128 channels at 384² in bf16).
pub const MAX_COLUMN_BYTES: usize = 1 << 30;

/// Whether the VQ's convolutions on a CUDA device go through the kernel.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns the kernel on or off for the whole process (it acts on CUDA devices only).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// `f` with the kernel `on`, then the switch as it was (a comparison's or parity row's way of choosing it).
pub fn with_enabled<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let was = ENABLED.swap(on, Ordering::Relaxed);
    let out = f();
    ENABLED.store(was, Ordering::Relaxed);
    out
}

/// CUDA source, after [`crate::nvrtc::BF16_PRELUDE`]. `T` is a raw element (a 16-bit word or a float): the
/// kernel only copies.
pub const SOURCE: &str = r#"
// col[img, c*kh*kw + dy*kw + dx, y*wo + x] = src[img, c, y + dy - pad, x + dx - pad], 0 outside the image.
// grid.y walks the rows (img, c, tap), uniform per block; threads walk the row's pixels.
template <typename T>
__device__ void im2col(const T* src, T* col, int images, int channels, int h, int w, int kh, int kw, int pad,
                       int ho, int wo) {
    const int taps = kh * kw, rows_per_image = channels * taps, pixels = ho * wo;
    const long rows = (long)images * rows_per_image;
    for (long row = blockIdx.y; row < rows; row += gridDim.y) {
        const int img = (int)(row / rows_per_image);
        const int k = (int)(row - (long)img * rows_per_image);
        const int c = k / taps, tap = k - c * taps;
        const int dy = tap / kw - pad, dx = tap % kw - pad;
        const T* plane = src + ((long)img * channels + c) * h * w;
        T* out = col + row * pixels;
        for (int m = blockIdx.x * blockDim.x + threadIdx.x; m < pixels; m += gridDim.x * blockDim.x) {
            const int y = m / wo + dy, x = m % wo + dx;
            out[m] = (y >= 0 && y < h && x >= 0 && x < w) ? plane[y * w + x] : (T)0;
        }
    }
}

extern "C" __global__ void im2col_u16(const unsigned short* src, unsigned short* col, int images, int channels,
                                      int h, int w, int kh, int kw, int pad, int ho, int wo) {
    im2col<unsigned short>(src, col, images, channels, h, w, kh, kw, pad, ho, wo);
}
extern "C" __global__ void im2col_f32(const float* src, float* col, int images, int channels, int h, int w,
                                      int kh, int kw, int pad, int ho, int wo) {
    im2col<float>(src, col, images, channels, h, w, kh, kw, pad, ho, wo);
}
"#;

/// What the kernel is told about one chunk: input [images, channels, h, w], kernel kh × kw, padding (the output
/// size follows: [`Im2ColShape::output`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2ColShape {
    /// Images in the chunk.
    pub images: usize,
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl Im2ColShape {
    /// Output height and width (stride 1, dilation 1); `None` when the kernel does not fit in the padded input.
    pub fn output(&self) -> Option<(usize, usize)> {
        let (hp, wp) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        (self.kh >= 1 && self.kw >= 1 && self.kh <= hp && self.kw <= wp)
            .then(|| (hp - self.kh + 1, wp - self.kw + 1))
    }

    /// Rows of one image's column matrix.
    pub fn rows_per_image(&self) -> usize {
        self.channels * self.kh * self.kw
    }
}

/// Images per chunk whose columns (`bytes_per_image` each) stay under `max_bytes`; at least one.
pub fn images_per_chunk(bytes_per_image: usize, max_bytes: usize) -> usize {
    (max_bytes / bytes_per_image.max(1)).max(1)
}

/// `conv` applied to `x` [B, C, H, W] from column matrices: `columns` gives a chunk's [n, C·kh·kw, Ho·Wo] (or
/// `None` when it cannot), the weight times them is the chunk's output, chunks of at most `max_column_bytes` of
/// columns; `None` when `conv` is not one this path takes (stride, dilation or groups other than 1) or `columns`
/// gave none.
pub fn conv_by_columns(
    x: &Tensor,
    conv: &Conv2d,
    max_column_bytes: usize,
    mut columns: impl FnMut(&Tensor, &Im2ColShape) -> Result<Option<Tensor>>,
) -> Result<Option<Tensor>> {
    let cfg = conv.config();
    if cfg.stride != 1 || cfg.dilation != 1 || cfg.groups != 1 {
        return Ok(None);
    }
    let (b, c, h, w) = x.dims4()?;
    let (cout, cin, kh, kw) = conv.weight().dims4()?;
    let shape = Im2ColShape {
        images: b,
        channels: c,
        h,
        w,
        kh,
        kw,
        pad: cfg.padding,
    };
    let Some((ho, wo)) = shape.output() else {
        return Ok(None);
    };
    if cin != c || b == 0 {
        return Ok(None);
    }
    let k = shape.rows_per_image();
    let weight = conv.weight().reshape((cout, k))?;
    let bias = conv
        .bias()
        .map(|bias| bias.reshape((cout, 1)))
        .transpose()?;
    let per_image = k * ho * wo * x.dtype().size_in_bytes();
    let chunk = images_per_chunk(per_image, max_column_bytes);
    let mut outputs = Vec::with_capacity(b.div_ceil(chunk));
    for start in (0..b).step_by(chunk) {
        let n = chunk.min(b - start);
        let part = x.narrow(0, start, n)?;
        let Some(col) = columns(&part, &Im2ColShape { images: n, ..shape })? else {
            return Ok(None);
        };
        // [Cout, K] shared by the chunk's images (batch stride 0) times [n, K, Ho·Wo]: channels-first already.
        let y = weight.broadcast_left(n)?.matmul(&col)?;
        let y = match &bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        outputs.push(y.reshape((n, cout, ho, wo))?);
    }
    Ok(Some(if outputs.len() == 1 {
        outputs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outputs, 0)?
    }))
}

/// `conv` applied to `x`: through the kernel and a batched matmul on a CUDA device when the switch is on and
/// the kernel is trusted, candle's `conv2d` otherwise (and for what the kernel does not take: stride, dilation
/// or groups other than 1, 1×1 kernels, which candle already runs as a plain copy and matmul).
pub fn conv2d(x: &Tensor, conv: &Conv2d) -> Result<Tensor> {
    let composed = || conv.forward(x);
    let (_, _, kh, kw) = conv.weight().dims4()?;
    if !enabled() || !crate::nvrtc::runs_kernels(x.device()) || kh * kw == 1 {
        return composed();
    }
    IM2COL.run(
        CHECK_TOLERANCE,
        || crate::nvrtc::capturing(x.device()),
        || conv_by_columns(x, conv, MAX_COLUMN_BYTES, launch_im2col),
        composed,
    )
}

/// The kernel's launch for the columns of `x` [n, C, H, W] (contiguous): its output is [n, C·kh·kw, Ho·Wo].
/// `None` where it does not apply (a dtype it has no instantiation for, sizes past its 32-bit indices).
pub fn im2col_launch<'a>(x: &'a Tensor, s: &Im2ColShape) -> Option<crate::nvrtc::Launch<'a>> {
    use crate::nvrtc::Arg;
    use candle_core::DType;
    let (ho, wo) = s.output()?;
    let pixels = ho * wo;
    let fits = |v: usize| v <= i32::MAX as usize;
    let sizes = [
        s.images,
        s.channels,
        s.h * s.w,
        s.kh * s.kw,
        s.rows_per_image(),
        pixels,
    ];
    if !sizes.into_iter().all(fits)
        || !x.is_contiguous()
        || x.dims() != [s.images, s.channels, s.h, s.w]
    {
        return None;
    }
    let kernel = match x.dtype() {
        DType::BF16 | DType::F16 => "im2col_u16",
        DType::F32 => "im2col_f32",
        _ => return None,
    };
    let rows = s.images * s.rows_per_image();
    const THREADS: usize = 256;
    let mut args = vec![
        Arg::Input(x),
        Arg::Output(x.dtype(), (s.images, s.rows_per_image(), pixels).into()),
    ];
    args.extend(
        [s.images, s.channels, s.h, s.w, s.kh, s.kw, s.pad, ho, wo].map(|v| Arg::I32(v as i32)),
    );
    Some(crate::nvrtc::Launch {
        kernel,
        // Enough blocks along a row for its pixels (a few per thread at 384²), rows across grid.y (≤ 65,535;
        // the kernel loops past it).
        grid: (
            pixels.div_ceil(THREADS).clamp(1, 64) as u32,
            rows.clamp(1, 65_535) as u32,
            1,
        ),
        block: (THREADS as u32, 1, 1),
        shared_bytes: 0,
        args,
    })
}

/// The columns of `x` [n, C, H, W] through the kernel; `None` where it does not apply (not CUDA, or as
/// [`im2col_launch`] says).
fn launch_im2col(x: &Tensor, s: &Im2ColShape) -> Result<Option<Tensor>> {
    if !crate::nvrtc::runs_kernels(x.device()) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let Some(launch) = im2col_launch(&x, s) else {
        return Ok(None);
    };
    Ok(MODULE.launch(&launch)?.and_then(|mut out| out.pop()))
}

/// The kernel's module.
pub(crate) static MODULE: crate::nvrtc::Module =
    crate::nvrtc::Module::new("pairuni_conv_kernel", SOURCE);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::Conv2dConfig;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        // A small LCG: varied, signed, reproducible values (never all zeros).
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn conv_layer(cin: usize, cout: usize, k: usize, padding: usize, bias: bool) -> Conv2d {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(random(cout * cin * k * k, 7), (cout, cin, k, k), &dev).unwrap();
        let b = bias.then(|| Tensor::from_vec(random(cout, 11), cout, &dev).unwrap());
        let cfg = Conv2dConfig {
            padding,
            ..Default::default()
        };
        Conv2d::new(w, b, cfg)
    }

    /// The kernel's columns, run on the CPU by the emulator.
    fn emulated(x: &Tensor, s: &Im2ColShape) -> Result<Option<Tensor>> {
        let x = x.contiguous()?;
        let launch = im2col_launch(&x, s).expect("the kernel takes it");
        let out = crate::kernel_emulator::emulate(&MODULE, &launch)
            .unwrap_or_else(|e| panic!("{s:?}: {e}"));
        Ok(out.outputs.into_iter().next())
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.1, "reference too small to compare: {scale}");
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    #[test]
    fn columns_times_weight_equal_candles_conv2d() {
        // The VQ's 3×3 "same" convolutions, a "valid" one, a 5×5, with and without bias, and several chunks.
        for (k, pad, bias, chunk_bytes) in [
            (3, 1, true, MAX_COLUMN_BYTES),
            (3, 0, true, MAX_COLUMN_BYTES),
            (5, 2, false, MAX_COLUMN_BYTES),
            (3, 1, true, 1),
        ] {
            let (b, cin, cout, h, w) = (3, 4, 5, 7, 6);
            let x =
                Tensor::from_vec(random(b * cin * h * w, 3), (b, cin, h, w), &Device::Cpu).unwrap();
            let conv = conv_layer(cin, cout, k, pad, bias);
            let mut chunks = 0;
            let ours = conv_by_columns(&x, &conv, chunk_bytes, |x, s| {
                chunks += 1;
                emulated(x, s)
            })
            .unwrap()
            .expect("the path takes stride-1 convolutions");
            let theirs = conv.forward(&x).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k {k} pad {pad}");
            let d = max_rel_diff(&ours, &theirs);
            assert!(d < 1e-5, "k {k} pad {pad} bias {bias}: {d}");
            assert_eq!(chunks, if chunk_bytes == 1 { b } else { 1 });
        }
    }

    #[test]
    fn a_column_off_by_one_is_caught() {
        // The comparison the first-call check makes sees an index slip: columns of the padded image shifted by
        // one pixel differ from candle's convolution at order one.
        let (b, cin, cout, h, w) = (2, 3, 4, 6, 6);
        let x = Tensor::from_vec(random(b * cin * h * w, 5), (b, cin, h, w), &Device::Cpu).unwrap();
        let conv = conv_layer(cin, cout, 3, 1, true);
        let shifted = conv_by_columns(&x, &conv, MAX_COLUMN_BYTES, |x, s| {
            let col = emulated(x, s)?.expect("columns");
            let pixels = col.dim(2)?;
            // Every row read one pixel further along.
            let moved = Tensor::cat(&[col.narrow(2, 1, pixels - 1)?, col.narrow(2, 0, 1)?], 2)?;
            Ok(Some(moved))
        })
        .unwrap()
        .unwrap();
        assert!(max_rel_diff(&shifted, &conv.forward(&x).unwrap()) > 0.1);
    }

    #[test]
    fn the_kernels_columns_follow_the_weight_order_and_pad_with_zeros() {
        // One image, two channels of 2×2, a 3×3 kernel with padding 1: row c·9 + dy·3 + dx holds the image
        // shifted by (dy − 1, dx − 1), zero where that falls outside; in f32 and as raw 16-bit words.
        let src = [1f32, 2., 3., 4., 10., 20., 30., 40.];
        let s = Im2ColShape {
            images: 1,
            channels: 2,
            h: 2,
            w: 2,
            kh: 3,
            kw: 3,
            pad: 1,
        };
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::from_vec(src.to_vec(), (1, 2, 2, 2), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let col = emulated(&x, &s).unwrap().unwrap();
            assert_eq!(col.dims(), [1, 18, 4]);
            let col = col
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let row = |r: usize| &col[r * 4..r * 4 + 4];
            assert_eq!(row(4), &[1., 2., 3., 4.]); // centre tap of channel 0
            assert_eq!(row(0), &[0., 0., 0., 1.]); // up-left: only the last pixel sees (0, 0)
            assert_eq!(row(8), &[4., 0., 0., 0.]); // down-right
            assert_eq!(row(9 + 4), &[10., 20., 30., 40.]); // centre tap of channel 1
            assert_eq!(row(9 + 5), &[20., 0., 40., 0.]); // right neighbour
        }
    }

    #[test]
    fn rows_longer_than_a_block_are_covered() {
        // A row of 23 × 23 pixels is longer than a block's 256 threads: the pixel loop's second turn, against
        // candle's convolution. (A grid of more than 65,535 rows would take too long to emulate.)
        let (b, cin, cout, h, w) = (1, 2, 3, 23, 23);
        let x = Tensor::from_vec(random(b * cin * h * w, 9), (b, cin, h, w), &Device::Cpu).unwrap();
        let conv = conv_layer(cin, cout, 3, 1, false);
        let ours = conv_by_columns(&x, &conv, MAX_COLUMN_BYTES, emulated)
            .unwrap()
            .unwrap();
        assert!(max_rel_diff(&ours, &conv.forward(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn chunks_stay_under_the_byte_budget() {
        assert_eq!(images_per_chunk(340 << 20, MAX_COLUMN_BYTES), 3);
        assert_eq!(images_per_chunk(2 << 30, MAX_COLUMN_BYTES), 1);
        assert_eq!(images_per_chunk(1, 10), 10);
    }

    #[test]
    fn what_the_path_does_not_take_goes_to_candle() {
        let x = Tensor::ones((1, 2, 5, 5), DType::F32, &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let strided = Conv2d::new(
            Tensor::ones((2, 2, 3, 3), DType::F32, &dev).unwrap(),
            None,
            Conv2dConfig {
                stride: 2,
                ..Default::default()
            },
        );
        let never = |_: &Tensor, _: &Im2ColShape| -> Result<Option<Tensor>> {
            panic!("a strided convolution must not reach the kernel")
        };
        assert!(conv_by_columns(&x, &strided, MAX_COLUMN_BYTES, never)
            .unwrap()
            .is_none());
        // The CPU always runs candle's conv2d, whatever the switch says.
        let conv = conv_layer(2, 3, 3, 1, true);
        let y = conv2d(&x, &conv).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            conv.forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}
