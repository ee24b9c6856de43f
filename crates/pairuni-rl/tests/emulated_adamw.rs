//! The fused AdamW kernel through the optimiser's own call (`AdamW::step`), its source run by the CPU emulator
//! (`pairuni_model::nvrtc::emulate_on_cpu`): over three steps with clipping and weight decay, f32 weights and bf16
//! weights with f32 master copies end bit for bit where the composed update leaves them, and its first-call check
//! passes. The unit test runs the kernel on a launch it builds itself; this runs the launches the optimiser builds
//! and the in-place writes of its state. The check's state is per process: a test binary of its own.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use pairuni_model::config::Toggle;
use pairuni_model::nvrtc::emulate_on_cpu;
use pairuni_rl::config::OptimConfig;
use pairuni_rl::fused_adamw;
use pairuni_rl::optim::AdamW;

/// The weights' bytes before and after three steps of an optimiser with `fused` over an f32 and a bf16 variable.
fn three_steps(fused: Toggle) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let c = OptimConfig {
        lr: 3e-3,
        weight_decay: 0.1,
        max_grad_norm: 0.05,
        fused,
        ..OptimConfig::default()
    };
    // More elements than a block's 256 threads.
    let n = 300;
    let vars: Vec<(String, Var)> = [DType::F32, DType::BF16]
        .into_iter()
        .map(|dtype| {
            let init: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
                .collect();
            let w = Tensor::from_vec(init, n, &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .unwrap();
            (format!("{dtype:?}"), Var::from_tensor(&w).unwrap())
        })
        .collect();
    let bytes = || -> Vec<Vec<u8>> {
        vars.iter()
            .map(|(_, v)| pairuni_model::kernel_emulator::storage_bytes(v.as_tensor()).unwrap())
            .collect()
    };
    let before = bytes();
    let mut opt = AdamW::new(vars.clone(), &c).unwrap();
    for step in 1..=3u64 {
        let mut grads = GradStore::default();
        for (_, var) in &vars {
            let g: Vec<f32> = (0..n)
                .map(|i| (((i as u64 * 13 + step * 7) % 29) as f32 - 14.0) / 50.0)
                .collect();
            let g = Tensor::from_vec(g, n, &Device::Cpu)
                .and_then(|t| t.to_dtype(var.dtype()))
                .unwrap();
            grads.insert(var.as_tensor(), g);
        }
        let info = opt.step(&grads, c.lr).unwrap();
        assert!(
            f64::from(info.grad_norm) > c.max_grad_norm,
            "clipping is exercised"
        );
    }
    (before, bytes())
}

#[test]
fn the_fused_update_through_the_optimiser_equals_the_composed_one() {
    let (before, want) = three_steps(Toggle::Off);
    emulate_on_cpu(true);
    let (_, got) = three_steps(Toggle::On);
    emulate_on_cpu(false);
    assert_eq!(
        fused_adamw::TRUST.status(),
        "trusted",
        "{}",
        fused_adamw::TRUST.report()
    );
    assert_eq!(got, want);
    // The weights moved: equal bytes are not those of a launch that wrote nothing back.
    assert!(got.iter().zip(&before).all(|(a, b)| a != b));
}
