//! The project's CUDA kernels are compiled at run time by NVRTC (which candle already loads) from sources that
//! need no CUDA header, so that the build stays free of a CUDA toolchain and NVRTC need not find headers on the
//! GPU machine. This module holds what those sources share and the compile-and-load step.

/// Shared device helpers: bf16 travels as raw 16-bit words (`bf16_t`), read and written in f32 (round to nearest
/// even, NaN kept quiet), and warp-wide sums and maxima.
pub const BF16_PRELUDE: &str = r#"
typedef unsigned short bf16_t;

__device__ __forceinline__ float load_val(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float load_val(const bf16_t* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store_val(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_val(bf16_t* p, long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    p[i] = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
"#;

/// The full source of a kernel module: the prelude, then `body`.
pub fn source(body: &str) -> String {
    format!("{BF16_PRELUDE}{body}")
}

/// The PTX of the kernel module prelude + `body`, compiled once per process into `cache` (load a kernel from it
/// with `CudaDevice::get_or_load_custom_func`).
#[cfg(feature = "cuda")]
pub fn ptx(
    cache: &'static std::sync::OnceLock<std::result::Result<String, String>>,
    body: &str,
) -> std::result::Result<&'static str, String> {
    cache
        .get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source(body))
                .map(|p| p.to_src())
                .map_err(|e| format!("NVRTC: {e}"))
        })
        .as_ref()
        .map(String::as_str)
        .map_err(Clone::clone)
}

/// Whether a hand-written kernel may run in this process: it starts unchecked, its first call is checked against
/// candle's ops on the same inputs (by its caller), and a failed check or launch turns it off for the process, as
/// does its environment variable set to `off`.
pub struct Trust {
    state: std::sync::atomic::AtomicU8,
    env: &'static str,
    what: &'static str,
}

const UNCHECKED: u8 = 0;
const TRUSTED: u8 = 1;
const OFF: u8 = 2;

impl Trust {
    /// An unchecked kernel named `what`, turned off by `env=off`.
    pub const fn new(env: &'static str, what: &'static str) -> Self {
        Self {
            state: std::sync::atomic::AtomicU8::new(UNCHECKED),
            env,
            what,
        }
    }

    fn state(&self) -> u8 {
        self.state.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the kernel may run.
    pub fn usable(&self) -> bool {
        self.state() != OFF && std::env::var(self.env).map_or(true, |v| v != "off")
    }

    /// Whether the next call has to be checked.
    pub fn needs_check(&self) -> bool {
        self.state() == UNCHECKED
    }

    /// Records a check: `Ok` trusts the kernel, an error turns it off for the process (with a warning).
    pub fn record(&self, outcome: std::result::Result<(), String>) {
        let state = match outcome {
            Ok(()) => TRUSTED,
            Err(reason) => {
                tracing::warn!(kernel = self.what, %reason, "kernel turned off; candle's ops run instead");
                OFF
            }
        };
        self.state.store(state, std::sync::atomic::Ordering::SeqCst);
    }

    /// `unchecked` (it has not run), `trusted` (its check passed) or `off`.
    pub fn status(&self) -> &'static str {
        match self.state() {
            _ if !self.usable() => "off",
            TRUSTED => "trusted",
            _ => "unchecked",
        }
    }
}
