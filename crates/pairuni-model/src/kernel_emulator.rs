//! Runs a hand-written CUDA kernel's own source on the CPU, for the tests: the GPU machine is lent rarely and
//! briefly, and a kernel that is wrong there is only turned off by its first-call check, which costs the
//! measurement it was built for. Each kernel module's [`Launch`]es are built by the same code for the GPU and for
//! this emulator, so a test runs exactly what the GPU would be given.
//!
//! The source (prelude and body, as NVRTC compiles it) is compiled by the system's C++ compiler together with
//! `kernel_emulator.hpp`, which implements the part of CUDA the kernels use: threads as coroutines with real
//! barriers and warp shuffles. Each launch checks, beyond the values the test compares:
//! - the argument list against the kernel's signature: the launch's argument types must form a C++ function
//!   pointer the kernel converts to, so a wrong count, width (`int` for `long`) or constness does not compile;
//! - every access against its buffer's bounds (AddressSanitizer; each buffer is an allocation of exactly its size,
//!   a tensor operand from its start offset to its storage's end, as on the GPU);
//! - that every element of every output is written (outputs start as all-ones bytes, a NaN);
//! - that the results do not depend on the order threads and blocks run in (a second run in reverse order must
//!   give the same bytes: a race between two barriers usually does not);
//! - barriers that some threads skip or never reach (an error naming a thread).
//!
//! Values are IEEE f32 throughout, without nvcc's fused multiply-adds, so they match the GPU within a rounding.
//! Compiled programs are cached per source and signature in the system's temporary folder.

use crate::nvrtc::{Arg, Launch, Module};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulator's CUDA: threads, barriers, shuffles, intrinsics and the launch file reader.
const HEADER: &str = include_str!("kernel_emulator.hpp");

/// What a launch left behind.
#[derive(Debug)]
pub struct Emulated {
    /// Each [`Arg::Output`], in order, as a CPU tensor of its dtype and shape.
    pub outputs: Vec<Tensor>,
    /// Each [`Arg::InPlace`] operand's storage from its start offset after the launch, in order (1-D, its dtype).
    pub in_place: Vec<Tensor>,
}

/// Runs `launch` of a kernel of `module` on the CPU, from the module's source, over its tensors' CPU storage; an
/// error says what went wrong (compiler output, a failed check, the emulator's message).
pub fn emulate(module: &Module, launch: &Launch) -> std::result::Result<Emulated, String> {
    run(module, launch, &["forward", "reverse"])
}

/// [`emulate`] in the forward order only, without the race check's second run: for integration tests that run
/// many launches of kernels whose own tests check them for races ([`crate::nvrtc::emulate_on_cpu`]).
pub fn emulate_once(module: &Module, launch: &Launch) -> std::result::Result<Emulated, String> {
    run(module, launch, &["forward"])
}

/// Runs the launch in the thread orders `orders` (the first, then optionally "reverse"), whose written buffers
/// must agree.
fn run(module: &Module, launch: &Launch, orders: &[&str]) -> std::result::Result<Emulated, String> {
    let program = compile(module.body(), launch)?;
    let dir = tempfile::Builder::new()
        .prefix("pairuni-emulated-launch")
        .tempdir()
        .map_err(|e| format!("temporary folder: {e}"))?;
    let mut lines = Vec::with_capacity(launch.args.len());
    let mut written = Vec::new();
    for (i, arg) in launch.args.iter().enumerate() {
        let path = dir.path().join(format!("arg{i}"));
        let line = match arg {
            Arg::Input(t) | Arg::InPlace(t) => {
                let bytes = storage_bytes(t)?;
                write(&path, &bytes)?;
                if matches!(arg, Arg::InPlace(_)) {
                    written.push((path.clone(), t.dtype(), None));
                }
                buffer_line(&path, bytes.len(), matches!(arg, Arg::InPlace(_)))
            }
            Arg::Output(dtype, shape) => {
                let len = shape.elem_count() * dtype.size_in_bytes();
                write(&path, &vec![0xff; len])?;
                written.push((path.clone(), *dtype, Some(shape.clone())));
                buffer_line(&path, len, true)
            }
            Arg::Null(_) | Arg::NullInput(_) => "null".to_string(),
            Arg::I32(x) => format!("i32 {x}"),
            Arg::I64(x) => format!("i64 {x}"),
            Arg::U32(x) => format!("u32 {x}"),
            Arg::F32(x) => format!("f32 {}", x.to_bits()),
        };
        lines.push(line);
    }
    let mut results = Vec::new();
    for order in orders {
        let (g, b) = (launch.grid, launch.block);
        let header = format!(
            "grid {} {} {} block {} {} {} shared {} order {order}",
            g.0, g.1, g.2, b.0, b.1, b.2, launch.shared_bytes
        );
        let file = dir.path().join(format!("launch.{order}"));
        write(
            &file,
            format!("{header}\n{}\n", lines.join("\n")).as_bytes(),
        )?;
        let out = Command::new(&program)
            .arg(&file)
            .env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
            .output()
            .map_err(|e| format!("running {}: {e}", program.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} ({order} order) failed: {}{}",
                launch.kernel,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let mut buffers = Vec::with_capacity(written.len());
        for (path, _, _) in &written {
            let out_path = PathBuf::from(format!("{}.out", path.display()));
            buffers.push(
                std::fs::read(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?,
            );
        }
        results.push(buffers);
    }
    let reverse = results.get(1).map_or(&[][..], Vec::as_slice);
    for (i, (a, b)) in results[0].iter().zip(reverse).enumerate() {
        if a != b {
            let at = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
            return Err(format!(
                "{}: written buffer {i} differs at byte {at} when threads and blocks run in reverse order (a race)",
                launch.kernel
            ));
        }
    }
    let mut emulated = Emulated {
        outputs: Vec::new(),
        in_place: Vec::new(),
    };
    for ((_, dtype, shape), bytes) in written.iter().zip(results.swap_remove(0)) {
        match shape {
            Some(shape) => {
                let size = dtype.size_in_bytes();
                if let Some(i) = bytes
                    .chunks(size)
                    .position(|c| c.iter().all(|&x| x == 0xff))
                {
                    return Err(format!(
                        "{}: output {} element {i} was never written",
                        launch.kernel,
                        emulated.outputs.len()
                    ));
                }
                emulated.outputs.push(
                    tensor_from_bytes(&bytes, *dtype)?
                        .reshape(shape.clone())
                        .map_err(err)?,
                );
            }
            None => emulated.in_place.push(tensor_from_bytes(&bytes, *dtype)?),
        }
    }
    Ok(emulated)
}

/// `t`'s CPU storage from its start offset, as the bytes a kernel would see.
pub fn storage_bytes(t: &Tensor) -> std::result::Result<Vec<u8>, String> {
    let (storage, layout) = t.storage_and_layout();
    let start = layout.start_offset();
    let Storage::Cpu(cpu) = &*storage else {
        return Err("the emulator runs CPU tensors".into());
    };
    Ok(match cpu {
        CpuStorage::BF16(v) => v[start..]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        CpuStorage::F16(v) => v[start..]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        CpuStorage::F32(v) => v[start..].iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::U32(v) => v[start..].iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => return Err(format!("no kernel takes {:?} buffers", t.dtype())),
    })
}

/// A 1-D CPU tensor of `dtype` from little-endian bytes.
pub fn tensor_from_bytes(bytes: &[u8], dtype: DType) -> std::result::Result<Tensor, String> {
    /// The values of `N`-byte words.
    fn words<const N: usize, T>(bytes: &[u8], value: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| value(c.try_into().expect("chunks of N bytes")))
            .collect()
    }
    let (dev, n) = (&Device::Cpu, bytes.len() / dtype.size_in_bytes());
    let bits16 = u16::from_le_bytes;
    match dtype {
        DType::BF16 => Tensor::from_vec(words(bytes, |b| half::bf16::from_bits(bits16(b))), n, dev),
        DType::F16 => Tensor::from_vec(words(bytes, |b| half::f16::from_bits(bits16(b))), n, dev),
        DType::F32 => Tensor::from_vec(words(bytes, f32::from_le_bytes), n, dev),
        DType::U32 => Tensor::from_vec(words(bytes, u32::from_le_bytes), n, dev),
        d => return Err(format!("no kernel writes {d:?} buffers")),
    }
    .map_err(err)
}

fn err(e: candle_core::Error) -> String {
    e.to_string()
}

fn write(path: &Path, bytes: &[u8]) -> std::result::Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn buffer_line(path: &Path, bytes: usize, writable: bool) -> String {
    format!("buf {} {bytes} {}", path.display(), u8::from(writable))
}

/// The C type a buffer of `dtype` has in the kernels (bf16 and f16 travel as raw 16-bit words).
fn c_type(dtype: DType) -> std::result::Result<&'static str, String> {
    Ok(match dtype {
        DType::BF16 | DType::F16 => "unsigned short",
        DType::F32 => "float",
        DType::U32 => "unsigned int",
        d => return Err(format!("no kernel takes {d:?} buffers")),
    })
}

/// The kernel's parameter types and the expressions that read each argument from the launch file.
fn signature(launch: &Launch) -> std::result::Result<(Vec<String>, Vec<String>), String> {
    let mut types = Vec::new();
    let mut reads = Vec::new();
    for (i, arg) in launch.args.iter().enumerate() {
        let ty = match arg {
            Arg::Input(t) => format!("const {}*", c_type(t.dtype())?),
            Arg::NullInput(d) => format!("const {}*", c_type(*d)?),
            Arg::InPlace(t) => format!("{}*", c_type(t.dtype())?),
            Arg::Output(d, _) | Arg::Null(d) => format!("{}*", c_type(*d)?),
            Arg::I32(_) => "int".into(),
            Arg::I64(_) => "long".into(),
            Arg::U32(_) => "unsigned int".into(),
            Arg::F32(_) => "float".into(),
        };
        reads.push(match arg {
            Arg::Input(_)
            | Arg::InPlace(_)
            | Arg::Output(..)
            | Arg::Null(_)
            | Arg::NullInput(_) => {
                format!("a.ptr<{}>({i})", ty.trim_end_matches('*'))
            }
            Arg::I32(_) => format!("a.i32({i})"),
            Arg::I64(_) => format!("a.i64({i})"),
            Arg::U32(_) => format!("a.u32({i})"),
            Arg::F32(_) => format!("a.f32({i})"),
        });
        types.push(ty);
    }
    Ok((types, reads))
}

/// The module's source as the host compiler takes it: dynamic shared memory (`extern __shared__ T name[];`)
/// becomes a pointer to the emulator's per-block buffer.
fn host_source(body: &str) -> String {
    let source = crate::nvrtc::source(body);
    let mut out = String::with_capacity(source.len());
    for line in source.lines() {
        let trimmed = line.trim();
        if let Some(decl) = trimmed
            .strip_prefix("extern __shared__ ")
            .and_then(|d| d.strip_suffix("[];"))
        {
            if let Some((ty, name)) = decl.rsplit_once(' ') {
                out.push_str(&format!(
                    "{ty}* {name} = reinterpret_cast<{ty}*>(emu::g_dynamic_shared);\n"
                ));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// How the emulator programs are compiled: IEEE f32 without contracted multiply-adds, under AddressSanitizer.
const COMPILER_FLAGS: [&str; 7] = [
    "-std=c++17",
    "-O1",
    "-g0",
    "-ffp-contract=off",
    "-fsanitize=address",
    "-fno-omit-frame-pointer",
    "-Wno-unknown-pragmas",
];

/// The emulator program for `launch`'s kernel and signature, compiled once and cached.
fn compile(body: &str, launch: &Launch) -> std::result::Result<PathBuf, String> {
    let (types, reads) = signature(launch)?;
    let program = format!(
        "{HEADER}\n{}\nint main(int argc, char** argv) {{\n    if (argc != 2) emu::fail(\"usage: emulator <launch file>\");\n    \
         emu::Args a(argv[1]);\n    void (*kernel)({}) = &{};\n    \
         emu::launch(a.grid, a.block, a.shared, [&] {{ kernel({}); }}, a.reverse);\n    \
         a.write_back();\n    return 0;\n}}\n",
        host_source(body),
        types.join(", "),
        launch.kernel,
        reads.join(", ")
    );
    let cache = std::env::temp_dir().join("pairuni-kernel-emulator");
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    // The flags are part of the key: a program cached under other flags is not reused.
    let key = fnv1a(format!("{}\n{program}", COMPILER_FLAGS.join(" ")).as_bytes());
    let exe = cache.join(format!("{}-{key:016x}", launch.kernel));
    if exe.exists() {
        return Ok(exe);
    }
    // Compiled under a name of this process's own, then renamed: tests compiling the same program at once
    // each finish with a whole file.
    let unique = format!(
        "{}.{}.{:?}",
        exe.display(),
        std::process::id(),
        std::thread::current().id()
    )
    .replace(['(', ')', ' '], "");
    let src = PathBuf::from(format!("{unique}.cpp"));
    let tmp = PathBuf::from(format!("{unique}.tmp"));
    write(&src, program.as_bytes())?;
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&compiler)
        .args(COMPILER_FLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(|e| {
            format!("running the C++ compiler `{compiler}` (set CXX to choose one): {e}")
        })?;
    let _ = std::fs::remove_file(&src);
    if !out.status.success() {
        return Err(format!(
            "compiling {} for the emulator failed:\n{}",
            launch.kernel,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&tmp, &exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    Ok(exe)
}

/// A stable 64-bit hash (FNV-1a) of the program text: the cache key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvrtc::BF16_PRELUDE;

    const TOY_SOURCE: &str = r#"
extern "C" __global__ void block_sums(const float* x, float* out, int n) {
    extern __shared__ float part[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float v = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += part[w];
        out[blockIdx.x] = t;
    }
}
extern "C" __global__ void racy(float* out) {
    __shared__ float s;
    s = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s;
}
extern "C" __global__ void diverges(float* out) {
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1.f;
}
extern "C" __global__ void overruns(const float* x, float* out, int n) {
    out[threadIdx.x] = x[threadIdx.x + n];
}
extern "C" __global__ void skips(float* out) {
    if (threadIdx.x > 0) out[threadIdx.x] = 2.f;
}
"#;

    static TOY: Module = Module::new("emulator_toy", TOY_SOURCE);

    fn input(n: usize) -> Tensor {
        let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.5).collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_prelude_compiles_and_a_reduction_with_shuffles_and_shared_memory_adds_up() {
        assert!(host_source(TOY_SOURCE).starts_with(BF16_PRELUDE.trim_end_matches(' ')));
        let x = input(1000);
        let launch = Launch {
            kernel: "block_sums",
            grid: (3, 1, 1),
            block: (128, 1, 1),
            shared_bytes: 4 * 4,
            args: vec![
                Arg::Input(&x),
                Arg::Output(DType::F32, 3.into()),
                Arg::I32(1000),
            ],
        };
        let out = emulate(&TOY, &launch).unwrap();
        let total: f32 = out.outputs[0].to_vec1::<f32>().unwrap().iter().sum();
        let expected: f32 = x.to_vec1::<f32>().unwrap().iter().sum();
        assert!(
            (total - expected).abs() < 1e-3,
            "{total} against {expected}"
        );
    }

    /// One block of `threads` running `kernel` of the toy module over `args`.
    fn toy(kernel: &'static str, threads: u32, args: Vec<Arg>) -> Result<Emulated, String> {
        emulate(&TOY, &Launch::linear(kernel, 1, threads, args))
    }

    #[test]
    fn launch_arguments_that_do_not_fit_the_signature_do_not_compile() {
        let x = input(64);
        let out = Arg::Output(DType::F32, 1.into());
        let e = toy("block_sums", 32, vec![Arg::Input(&x), out, Arg::I64(64)]).unwrap_err();
        assert!(e.contains("compiling block_sums"), "{e}");
    }

    #[test]
    fn races_divergent_barriers_overruns_and_unwritten_outputs_are_reported() {
        let out = |n: usize| Arg::Output(DType::F32, n.into());
        let e = toy("racy", 64, vec![out(64)]).unwrap_err();
        assert!(e.contains("reverse order"), "{e}");
        let e = toy("diverges", 64, vec![out(64)]).unwrap_err();
        assert!(e.contains("divergent __syncthreads"), "{e}");
        let x = input(64);
        let e = toy("overruns", 32, vec![Arg::Input(&x), out(32), Arg::I32(40)]).unwrap_err();
        assert!(e.contains("heap-buffer-overflow"), "{e}");
        // The same kernel inside its buffer runs.
        let inside = toy("overruns", 32, vec![Arg::Input(&x), out(32), Arg::I32(32)]).unwrap();
        assert_eq!(
            inside.outputs[0].to_vec1::<f32>().unwrap(),
            x.to_vec1::<f32>().unwrap()[32..]
        );
        let e = toy("skips", 32, vec![out(32)]).unwrap_err();
        assert!(e.contains("element 0 was never written"), "{e}");
    }
}
