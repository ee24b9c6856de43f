//! ResNet-50 without its classifier head, in candle, loading torchvision's key names from safetensors.
//!
//! The network is torchvision's `resnet50` (v1.5: the stride sits on the 3×3 convolution of each bottleneck);
//! `fc.*` and `*.num_batches_tracked` in the file are ignored. BatchNorm runs in eval mode (running statistics),
//! so a feature does not depend on the other images of its batch. Images are resized to `input_size` and
//! normalised with ImageNet mean/std; the feature is the global-average-pooled last stage, L2-normalised.
//! Convert a torchvision checkpoint as documented in docs/ENCODERS.md.

use super::ImageEncoder;
use crate::error::{PairsError, Result};
use candle_core::{DType, Device, Module, ModuleT, Tensor, D};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, VarBuilder};
use image::RgbImage;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Shape of a bottleneck ResNet: ResNet-50 is `base_width` 64, `layers` [3, 4, 6, 3].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResNetSpec {
    /// Channels after the stem (64 in ResNet-50).
    pub base_width: usize,
    /// Bottleneck blocks per stage.
    pub layers: [usize; 4],
    /// Side the input image is resized to (224 for ImageNet weights).
    pub input_size: u32,
}

impl ResNetSpec {
    /// torchvision's ResNet-50.
    pub fn resnet50() -> Self {
        Self {
            base_width: 64,
            layers: [3, 4, 6, 3],
            input_size: 224,
        }
    }

    /// Feature dimension: base_width × 8 × 4 (2,048 for ResNet-50).
    pub fn dim(&self) -> usize {
        self.base_width * 8 * 4
    }
}

const EXPANSION: usize = 4;
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

fn conv(
    vb: &VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Conv2d> {
    let w = vb.get((cout, cin, k, k), "weight")?;
    Ok(Conv2d::new(
        w,
        None,
        Conv2dConfig {
            padding,
            stride,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        },
    ))
}

fn bn(vb: &VarBuilder, c: usize) -> candle_core::Result<BatchNorm> {
    BatchNorm::new(
        c,
        vb.get(c, "running_mean")?,
        vb.get(c, "running_var")?,
        vb.get(c, "weight")?,
        vb.get(c, "bias")?,
        1e-5,
    )
}

struct Bottleneck {
    c1: Conv2d,
    b1: BatchNorm,
    c2: Conv2d,
    b2: BatchNorm,
    c3: Conv2d,
    b3: BatchNorm,
    down: Option<(Conv2d, BatchNorm)>,
}

impl Bottleneck {
    fn load(vb: VarBuilder, cin: usize, width: usize, stride: usize) -> candle_core::Result<Self> {
        let cout = width * EXPANSION;
        let down = if stride != 1 || cin != cout {
            Some((
                conv(&vb.pp("downsample.0"), cin, cout, 1, stride, 0)?,
                bn(&vb.pp("downsample.1"), cout)?,
            ))
        } else {
            None
        };
        Ok(Self {
            c1: conv(&vb.pp("conv1"), cin, width, 1, 1, 0)?,
            b1: bn(&vb.pp("bn1"), width)?,
            c2: conv(&vb.pp("conv2"), width, width, 3, stride, 1)?,
            b2: bn(&vb.pp("bn2"), width)?,
            c3: conv(&vb.pp("conv3"), width, cout, 1, 1, 0)?,
            b3: bn(&vb.pp("bn3"), cout)?,
            down,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.b1.forward_t(&self.c1.forward(x)?, false)?.relu()?;
        let y = self.b2.forward_t(&self.c2.forward(&y)?, false)?.relu()?;
        let y = self.b3.forward_t(&self.c3.forward(&y)?, false)?;
        let skip = match &self.down {
            Some((c, b)) => b.forward_t(&c.forward(x)?, false)?,
            None => x.clone(),
        };
        (y + skip)?.relu()
    }
}

/// The headless ResNet.
pub struct ResNet {
    stem: Conv2d,
    stem_bn: BatchNorm,
    blocks: Vec<Bottleneck>,
    spec: ResNetSpec,
    device: Device,
    weights_id: String,
}

impl ResNet {
    /// Loads `spec`'s network from a safetensors file with torchvision key names.
    pub fn load(path: &Path, spec: ResNetSpec) -> Result<Self> {
        let werr = |message: String| PairsError::Weights {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| PairsError::io(path, e))?;
        let weights_id = hex::encode(&Sha256::digest(&bytes)[..8]);
        let device = Device::Cpu;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| werr(e.to_string()))?;
        // torchvision stores f32; converting here also accepts f16/bf16 exports.
        let tensors = tensors
            .into_iter()
            .filter(|(k, _)| !k.starts_with("fc.") && !k.ends_with("num_batches_tracked"))
            .map(|(k, t)| t.to_dtype(DType::F32).map(|t| (k, t)))
            .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()
            .map_err(|e| werr(e.to_string()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let build = || -> candle_core::Result<(Conv2d, BatchNorm, Vec<Bottleneck>)> {
            let stem = conv(&vb.pp("conv1"), 3, spec.base_width, 7, 2, 3)?;
            let stem_bn = bn(&vb.pp("bn1"), spec.base_width)?;
            let mut blocks = vec![];
            let mut cin = spec.base_width;
            for (stage, &n) in spec.layers.iter().enumerate() {
                let width = spec.base_width << stage;
                for b in 0..n {
                    let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                    blocks.push(Bottleneck::load(
                        vb.pp(format!("layer{}.{b}", stage + 1)),
                        cin,
                        width,
                        stride,
                    )?);
                    cin = width * EXPANSION;
                }
            }
            Ok((stem, stem_bn, blocks))
        };
        let (stem, stem_bn, blocks) = build().map_err(|e| werr(e.to_string()))?;
        Ok(Self {
            stem,
            stem_bn,
            blocks,
            spec,
            device,
            weights_id,
        })
    }

    /// Pooled features (before normalisation) of an NCHW batch.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self
            .stem_bn
            .forward_t(&self.stem.forward(x)?, false)?
            .relu()?;
        // Zero padding equals torchvision's −∞ padding here: inputs are post-ReLU (≥ 0) and every 3×3 window
        // holds at least one real pixel.
        let x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        let mut x = x;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        x.mean(D::Minus1)?.mean(D::Minus1)
    }

    /// Resizes and normalises images into an NCHW f32 tensor.
    pub fn preprocess(&self, images: &[RgbImage]) -> candle_core::Result<Tensor> {
        let s = self.spec.input_size;
        let mut data = Vec::with_capacity(images.len() * 3 * (s * s) as usize);
        for img in images {
            let img = if img.width() == s && img.height() == s {
                img.clone()
            } else {
                image::imageops::resize(img, s, s, image::imageops::FilterType::Triangle)
            };
            for c in 0..3 {
                data.extend(
                    img.pixels()
                        .map(|p| (p[c] as f32 / 255.0 - MEAN[c]) / STD[c]),
                );
            }
        }
        Tensor::from_vec(
            data,
            (images.len(), 3, s as usize, s as usize),
            &self.device,
        )
    }
}

impl ImageEncoder for ResNet {
    fn id(&self) -> String {
        format!(
            "resnet-w{}-{:?}-{}px-{}",
            self.spec.base_width, self.spec.layers, self.spec.input_size, self.weights_id
        )
    }

    fn dim(&self) -> usize {
        self.spec.dim()
    }

    fn encode_batch(&self, images: &[RgbImage]) -> Result<Vec<f32>> {
        if images.is_empty() {
            return Ok(vec![]);
        }
        let x = self.preprocess(images)?;
        let f = self.forward(&x)?;
        let norm = f.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(f.broadcast_div(&norm)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Loads ResNet-50 from `weights`.
pub fn resnet50(weights: &Path) -> Result<ResNet> {
    ResNet::load(weights, ResNetSpec::resnet50())
}

/// Every tensor name (and shape) a torchvision bottleneck ResNet of `spec` has, classifier included.
pub fn torchvision_keys(spec: &ResNetSpec) -> Vec<(String, Vec<usize>)> {
    let mut keys = vec![];
    let bn_keys = |prefix: &str, c: usize, keys: &mut Vec<(String, Vec<usize>)>| {
        for n in ["weight", "bias", "running_mean", "running_var"] {
            keys.push((format!("{prefix}.{n}"), vec![c]));
        }
        keys.push((format!("{prefix}.num_batches_tracked"), vec![]));
    };
    let w = spec.base_width;
    keys.push(("conv1.weight".into(), vec![w, 3, 7, 7]));
    bn_keys("bn1", w, &mut keys);
    let mut cin = w;
    for (stage, &n) in spec.layers.iter().enumerate() {
        let width = w << stage;
        for b in 0..n {
            let p = format!("layer{}.{b}", stage + 1);
            keys.push((format!("{p}.conv1.weight"), vec![width, cin, 1, 1]));
            bn_keys(&format!("{p}.bn1"), width, &mut keys);
            keys.push((format!("{p}.conv2.weight"), vec![width, width, 3, 3]));
            bn_keys(&format!("{p}.bn2"), width, &mut keys);
            keys.push((
                format!("{p}.conv3.weight"),
                vec![width * EXPANSION, width, 1, 1],
            ));
            bn_keys(&format!("{p}.bn3"), width * EXPANSION, &mut keys);
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            if stride != 1 || cin != width * EXPANSION {
                keys.push((
                    format!("{p}.downsample.0.weight"),
                    vec![width * EXPANSION, cin, 1, 1],
                ));
                bn_keys(&format!("{p}.downsample.1"), width * EXPANSION, &mut keys);
            }
            cin = width * EXPANSION;
        }
    }
    keys.push(("fc.weight".into(), vec![1000, cin]));
    keys.push(("fc.bias".into(), vec![1000]));
    keys
}

/// Writes a random-weight checkpoint with torchvision's key names (tests, and a smoke test of the loader).
///
/// Running statistics are non-trivial (mean ≠ 0, var ≠ 1) so a loader that ignored them would be caught.
pub fn write_random_checkpoint(path: &Path, spec: &ResNetSpec, seed: u64) -> Result<PathBuf> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keys = torchvision_keys(spec);
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>, bool)> = vec![];
    for (name, shape) in keys {
        if name.ends_with("num_batches_tracked") {
            buffers.push((name, shape, 7i64.to_le_bytes().to_vec(), true));
            continue;
        }
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                if name.ends_with("running_var") {
                    rng.random_range(0.5f32..2.0)
                } else if name.ends_with("running_mean") || name.ends_with(".bias") {
                    rng.random_range(-0.2f32..0.2)
                } else if name.ends_with(".weight") && shape.len() == 1 {
                    rng.random_range(0.8f32..1.2)
                } else {
                    rng.random_range(-1.0f32..1.0) * (3.0 / fan_in as f32).sqrt()
                }
            })
            .collect();
        buffers.push((
            name,
            shape,
            vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            false,
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, bytes, is_i64)| {
            let dt = if *is_i64 {
                safetensors::Dtype::I64
            } else {
                safetensors::Dtype::F32
            };
            (
                name.clone(),
                safetensors::tensor::TensorView::new(dt, shape.clone(), bytes)
                    .expect("consistent sizes"),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).map_err(|e| PairsError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, out).map_err(|e| PairsError::io(path, e))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ResNetSpec {
        ResNetSpec {
            base_width: 4,
            layers: [1, 2, 1, 1],
            input_size: 32,
        }
    }

    fn images() -> Vec<RgbImage> {
        (0..3u8)
            .map(|k| {
                RgbImage::from_fn(20, 20, |x, y| {
                    image::Rgb([(x as u8 * 12).wrapping_add(k * 80), (y as u8) * 11, k * 60])
                })
            })
            .collect()
    }

    #[test]
    fn resnet50_key_list_matches_torchvision() {
        let keys = torchvision_keys(&ResNetSpec::resnet50());
        // torchvision's resnet50 state_dict has 320 entries (161 params incl. fc, 106 running stats, 53 counters).
        assert_eq!(keys.len(), 320);
        let params: usize = keys
            .iter()
            .filter(|(k, _)| !k.contains("running") && !k.contains("num_batches"))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(params, 25_557_032, "torchvision resnet50 parameter count");
        assert!(keys
            .iter()
            .any(|(k, s)| k == "layer4.0.downsample.0.weight" && s == &vec![2048, 1024, 1, 1]));
    }

    #[test]
    fn tiny_resnet_loads_torchvision_names_and_gives_unit_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_random_checkpoint(&dir.path().join("w.safetensors"), &tiny(), 1).unwrap();
        let net = ResNet::load(&path, tiny()).unwrap();
        assert_eq!(net.dim(), 128);
        let f = net.encode_batch(&images()).unwrap();
        assert_eq!(f.len(), 3 * 128);
        for row in f.chunks(128) {
            let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-4, "norm {n}");
        }
        assert_ne!(
            &f[..128],
            &f[128..256],
            "different images, different features"
        );
    }

    #[test]
    fn batchnorm_runs_in_eval_mode() {
        // Eval-mode BN uses running statistics, so an image's feature must not depend on its batch-mates.
        let dir = tempfile::tempdir().unwrap();
        let path = write_random_checkpoint(&dir.path().join("w.safetensors"), &tiny(), 2).unwrap();
        let net = ResNet::load(&path, tiny()).unwrap();
        let imgs = images();
        let alone = net.encode_batch(&imgs[..1]).unwrap();
        let batched = net.encode_batch(&imgs).unwrap();
        for (a, b) in alone.iter().zip(&batched[..128]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // And the running statistics are used: other statistics, other features.
        let path2 =
            write_random_checkpoint(&dir.path().join("w2.safetensors"), &tiny(), 3).unwrap();
        let other = ResNet::load(&path2, tiny())
            .unwrap()
            .encode_batch(&imgs[..1])
            .unwrap();
        assert_ne!(alone, other);
    }

    #[test]
    fn missing_tensor_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_random_checkpoint(&dir.path().join("w.safetensors"), &tiny(), 1).unwrap();
        // The tiny checkpoint lacks the deeper stages' blocks a [1, 2, 2, 1] network needs.
        let spec = ResNetSpec {
            layers: [1, 2, 2, 1],
            ..tiny()
        };
        let e = ResNet::load(&path, spec)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains("layer3.1"), "{e}");
    }
}
