//! `pairuni bench gpu-step` through the binary on the CPU at tiny shapes. It runs in a process of its own, so
//! the probe's tensor counts (read from candle's global id counter) are not inflated by other tests' tensors.

use std::process::Command;

#[test]
fn fused_sampling_kernels_create_fewer_tensors_per_decode_step() {
    let out = Command::new(env!("CARGO_BIN_EXE_pairuni"))
        .args([
            "bench",
            "gpu-step",
            "--device",
            "cpu",
            "--shapes",
            "tiny",
            "--pairs",
            "1",
            "--group",
            "2",
            "--answer-tokens",
            "2",
            "--no-warmup",
            "--probe-steps",
            "2",
            "--compare-top-p",
            "0.5",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["fused_sampling"], false,
        "the CPU samples with the composed kernels"
    );
    let kernels = &v["image_step_probe"]["sampling_kernels"];
    let count = |k: &str| kernels[k]["tensors_per_step"].as_u64().unwrap();
    let (composed, fused) = (count("composed"), count("fused"));
    // The tiny shapes have 2 layers; candle 0.11 creates 99 tensor values per layer with the composed kernels
    // and 51 with the fused ones (views included), and the head, draw and embedding are shared.
    assert!(fused > 20, "{kernels}");
    assert!(composed >= fused + 2 * 40, "{kernels}");
    // A CUDA device's pool reports its high-water marks; the CPU has none to report, and says so.
    assert!(v["pool_memory"].is_null(), "{}", v["pool_memory"]);
    assert!(v["total"].as_f64().is_some_and(|ms| ms > 0.0));
    // The rollouts again at top-p 0.5, timed.
    let again = &v["top_p_compare"];
    assert_eq!(again["top_p"], 0.5, "{again}");
    assert!(
        again["rollout_image"].as_f64().is_some_and(|ms| ms > 0.0),
        "{again}"
    );
    assert!(
        again["rollout_text"].as_f64().is_some_and(|ms| ms > 0.0),
        "{again}"
    );
}

#[test]
fn a_top_p_outside_the_unit_interval_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_pairuni"))
        .args([
            "bench", "gpu-step", "--device", "cpu", "--shapes", "tiny", "--top-p", "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--top-p must be in (0, 1]"), "{err}");
}
