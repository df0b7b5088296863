//! The FID Inception-v3 of pytorch-fid (`pytorch_fid.inception.InceptionV3` with
//! `fid_inception_v3()`): the network TensorFlow's original FID used, ported weights
//! `pt_inception-2015-12-05-6726825d.pth`, up to the 2048-d average pool ("pool_3").
//!
//! Every convolution is torchvision's `BasicConv2d`: conv (no bias) → BatchNorm (ε = 1e-3)
//! → ReLU. The network only ever runs in inference, so each BatchNorm is folded into its
//! convolution when the weights are loaded: w·γ/√(var+ε) and β − mean·γ/√(var+ε).
//! The FID variants of the mixed blocks differ from torchvision's: average pools exclude
//! the padding (`count_include_pad=False`) and the last block max-pools.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::adaptive_avg_pool2d;
use burn::tensor::ops::ConvOptions;
use burn_store::TensorSnapshot;
use image::RgbImage;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{conv2d, pool2d, MicroditBackend, Pool, PoolOptions};
use crate::hub::Hub;
use crate::state_dict::read_state_dict;

/// pytorch-fid's weights file, and where `torch.hub` keeps it once pytorch-fid downloaded it.
pub const WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";
pub const WEIGHTS_URL: &str =
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";
/// The network's input side: pytorch-fid resizes every image to it.
pub const INPUT_SIZE: usize = 299;
pub const FEATURES: usize = 2048;
const BN_EPS: f32 = 1e-3;

/// The weights file: `source` as a file, a directory holding it, or a Hub repository;
/// without `source`, torch.hub's cache (`$TORCH_HOME/hub/checkpoints`, default
/// `~/.cache/torch/hub/checkpoints`), where pytorch-fid leaves it.
pub fn weights_path(source: Option<&str>, hub: &Hub) -> Result<PathBuf> {
    match source {
        Some(s) if Path::new(s).is_file() => Ok(PathBuf::from(s)),
        Some(s) => hub.file(s, WEIGHTS_FILE),
        None => {
            let torch_home = std::env::var_os("TORCH_HOME")
                .map(PathBuf::from)
                .or_else(|| dirs::cache_dir().map(|c| c.join("torch")))
                .unwrap_or_else(|| PathBuf::from(".cache/torch"));
            let path = torch_home.join("hub/checkpoints").join(WEIGHTS_FILE);
            ensure!(
                path.is_file(),
                "FID needs pytorch-fid's Inception weights {WEIGHTS_FILE} (95 MB), which are not \
                 at {}: download them from {WEIGHTS_URL} to that path (running pytorch-fid once \
                 does the same), or pass --inception FILE|DIR|HUB_REPO",
                path.display()
            );
            Ok(path)
        }
    }
}

/// The state dict being consumed by name; what is left over at the end is an error.
/// Without a state dict (`None`), identity BatchNorms and He-uniform convolutions, for
/// timing the network.
struct Weights {
    tensors: Option<BTreeMap<String, TensorSnapshot>>,
    rng: ChaCha8Rng,
}

impl Weights {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(tensors) = &mut self.tensors else {
            return Ok(self.random(name, shape));
        };
        let snapshot = tensors
            .remove(name)
            .with_context(|| format!("missing tensor '{name}' {shape:?}"))?;
        ensure!(
            snapshot.shape.to_vec() == shape,
            "tensor '{name}' has shape {:?}, the FID Inception expects {shape:?}",
            snapshot.shape.to_vec()
        );
        let data = snapshot
            .to_data()
            .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))?;
        data.convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{name}: {e:?}"))
    }

    fn random(&mut self, name: &str, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if name.ends_with("running_var") || name.ends_with("bn.weight") {
            return vec![1.0; n];
        }
        if shape.len() == 1 {
            return vec![0.0; n];
        }
        let bound = (6.0 / (n / shape[0]) as f32).sqrt();
        (0..n)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect()
    }

    fn block<'a, B: MicroditBackend>(
        &'a mut self,
        name: &'a str,
        device: &'a B::Device,
    ) -> BlockLoader<'a, B> {
        BlockLoader {
            weights: self,
            block: name,
            device,
        }
    }

    /// Checks that nothing but the classifier (`fc.*`, unused by FID) and BatchNorm step
    /// counters was left unread.
    fn finish(self) -> Result<()> {
        let unused: Vec<&String> = self
            .tensors
            .iter()
            .flat_map(|t| t.keys())
            .filter(|k| !k.starts_with("fc.") && !k.ends_with("num_batches_tracked"))
            .collect();
        ensure!(
            unused.is_empty(),
            "not the FID Inception weights: unexpected tensors {unused:?}"
        );
        Ok(())
    }
}

/// `BasicConv2d` with its BatchNorm folded in.
#[derive(Debug)]
struct BasicConv<B: MicroditBackend> {
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    options: ConvOptions<2>,
}

impl<B: MicroditBackend> BasicConv<B> {
    /// `name.conv.weight` [out, in, kh, kw] and `name.bn.{weight,bias,running_mean,running_var}`.
    fn load(
        w: &mut Weights,
        name: &str,
        [c_in, c_out]: [usize; 2],
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
        device: &B::Device,
    ) -> Result<Self> {
        let shape = [c_out, c_in, kernel[0], kernel[1]];
        let mut weight = w.take(&format!("{name}.conv.weight"), &shape)?;
        let bn = |w: &mut Weights, p: &str| w.take(&format!("{name}.bn.{p}"), &[c_out]);
        let (gamma, beta) = (bn(w, "weight")?, bn(w, "bias")?);
        let (mean, var) = (bn(w, "running_mean")?, bn(w, "running_var")?);
        let per_out = c_in * kernel[0] * kernel[1];
        let mut bias = vec![0.0; c_out];
        for o in 0..c_out {
            let scale = gamma[o] / (var[o] + BN_EPS).sqrt();
            weight[o * per_out..(o + 1) * per_out]
                .iter_mut()
                .for_each(|x| *x *= scale);
            bias[o] = beta[o] - mean[o] * scale;
        }
        Ok(Self {
            weight: Tensor::from_data(TensorData::new(weight, shape), device),
            bias: Tensor::from_data(TensorData::new(bias, [c_out]), device),
            options: ConvOptions::new([stride, stride], padding, [1, 1], 1),
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        relu(conv2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            self.options.clone(),
        ))
    }
}

/// Loads the convolutions of one block: `conv(name, [in, out], kernel, stride, padding)`.
struct BlockLoader<'a, B: MicroditBackend> {
    weights: &'a mut Weights,
    block: &'a str,
    device: &'a B::Device,
}

impl<B: MicroditBackend> BlockLoader<'_, B> {
    fn conv(
        &mut self,
        name: &str,
        channels: [usize; 2],
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
    ) -> Result<BasicConv<B>> {
        let full = format!("{}.{name}", self.block);
        BasicConv::load(
            self.weights,
            &full,
            channels,
            kernel,
            stride,
            padding,
            self.device,
        )
    }

    /// A stem convolution: the block is a single `BasicConv2d`.
    fn single(
        self,
        channels: [usize; 2],
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<BasicConv<B>> {
        let (k, p) = ([k, k], [padding, padding]);
        BasicConv::load(
            self.weights,
            self.block,
            channels,
            k,
            stride,
            p,
            self.device,
        )
    }

    fn square(&mut self, name: &str, channels: [usize; 2], k: usize) -> Result<BasicConv<B>> {
        self.conv(name, channels, [k, k], 1, [k / 2, k / 2])
    }
}

/// A 3×3 pool at stride 1 keeping the size (padding 1).
fn pool_3x3<B: MicroditBackend>(x: Tensor<B, 4>, kind: Pool) -> Tensor<B, 4> {
    let options = PoolOptions {
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        kind,
    };
    pool2d(x, options)
}

/// pytorch-fid's average pools exclude the padding.
fn avg_pool_3x3<B: MicroditBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    pool_3x3(
        x,
        Pool::Average {
            count_padding: false,
        },
    )
}

fn max_pool_3x3_stride_2<B: MicroditBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let options = PoolOptions {
        kernel: [3, 3],
        stride: [2, 2],
        padding: [0, 0],
        kind: Pool::Max,
    };
    pool2d(x, options)
}

/// `FIDInceptionA` (Mixed_5b/c/d).
#[derive(Debug)]
struct InceptionA<B: MicroditBackend> {
    branch1x1: BasicConv<B>,
    branch5x5: [BasicConv<B>; 2],
    branch3x3dbl: [BasicConv<B>; 3],
    branch_pool: BasicConv<B>,
}

impl<B: MicroditBackend> InceptionA<B> {
    fn load(l: &mut BlockLoader<B>, c: usize, pool_features: usize) -> Result<Self> {
        Ok(Self {
            branch1x1: l.square("branch1x1", [c, 64], 1)?,
            branch5x5: [
                l.square("branch5x5_1", [c, 48], 1)?,
                l.square("branch5x5_2", [48, 64], 5)?,
            ],
            branch3x3dbl: [
                l.square("branch3x3dbl_1", [c, 64], 1)?,
                l.square("branch3x3dbl_2", [64, 96], 3)?,
                l.square("branch3x3dbl_3", [96, 96], 3)?,
            ],
            branch_pool: l.square("branch_pool", [c, pool_features], 1)?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Tensor::cat(
            vec![
                self.branch1x1.forward(x.clone()),
                chain(&self.branch5x5, x.clone()),
                chain(&self.branch3x3dbl, x.clone()),
                self.branch_pool.forward(avg_pool_3x3(x)),
            ],
            1,
        )
    }
}

fn chain<B: MicroditBackend>(convs: &[BasicConv<B>], x: Tensor<B, 4>) -> Tensor<B, 4> {
    convs.iter().fold(x, |x, c| c.forward(x))
}

/// `InceptionB` (Mixed_6a): the grid shrinks to 17×17.
#[derive(Debug)]
struct InceptionB<B: MicroditBackend> {
    branch3x3: BasicConv<B>,
    branch3x3dbl: [BasicConv<B>; 3],
}

impl<B: MicroditBackend> InceptionB<B> {
    fn load(l: &mut BlockLoader<B>, c: usize) -> Result<Self> {
        Ok(Self {
            branch3x3: l.conv("branch3x3", [c, 384], [3, 3], 2, [0, 0])?,
            branch3x3dbl: [
                l.square("branch3x3dbl_1", [c, 64], 1)?,
                l.square("branch3x3dbl_2", [64, 96], 3)?,
                l.conv("branch3x3dbl_3", [96, 96], [3, 3], 2, [0, 0])?,
            ],
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Tensor::cat(
            vec![
                self.branch3x3.forward(x.clone()),
                chain(&self.branch3x3dbl, x.clone()),
                max_pool_3x3_stride_2(x),
            ],
            1,
        )
    }
}

/// `FIDInceptionC` (Mixed_6b–e): factorised 7×7 convolutions (1×7 then 7×1).
#[derive(Debug)]
struct InceptionC<B: MicroditBackend> {
    branch1x1: BasicConv<B>,
    branch7x7: [BasicConv<B>; 3],
    branch7x7dbl: [BasicConv<B>; 5],
    branch_pool: BasicConv<B>,
}

impl<B: MicroditBackend> InceptionC<B> {
    fn load(l: &mut BlockLoader<B>, c: usize, c7: usize) -> Result<Self> {
        let (row, col) = (([1, 7], [0, 3]), ([7, 1], [3, 0]));
        Ok(Self {
            branch1x1: l.square("branch1x1", [c, 192], 1)?,
            branch7x7: [
                l.square("branch7x7_1", [c, c7], 1)?,
                l.conv("branch7x7_2", [c7, c7], row.0, 1, row.1)?,
                l.conv("branch7x7_3", [c7, 192], col.0, 1, col.1)?,
            ],
            branch7x7dbl: [
                l.square("branch7x7dbl_1", [c, c7], 1)?,
                l.conv("branch7x7dbl_2", [c7, c7], col.0, 1, col.1)?,
                l.conv("branch7x7dbl_3", [c7, c7], row.0, 1, row.1)?,
                l.conv("branch7x7dbl_4", [c7, c7], col.0, 1, col.1)?,
                l.conv("branch7x7dbl_5", [c7, 192], row.0, 1, row.1)?,
            ],
            branch_pool: l.square("branch_pool", [c, 192], 1)?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Tensor::cat(
            vec![
                self.branch1x1.forward(x.clone()),
                chain(&self.branch7x7, x.clone()),
                chain(&self.branch7x7dbl, x.clone()),
                self.branch_pool.forward(avg_pool_3x3(x)),
            ],
            1,
        )
    }
}

/// `InceptionD` (Mixed_7a): the grid shrinks to 8×8.
#[derive(Debug)]
struct InceptionD<B: MicroditBackend> {
    branch3x3: [BasicConv<B>; 2],
    branch7x7x3: [BasicConv<B>; 4],
}

impl<B: MicroditBackend> InceptionD<B> {
    fn load(l: &mut BlockLoader<B>, c: usize) -> Result<Self> {
        Ok(Self {
            branch3x3: [
                l.square("branch3x3_1", [c, 192], 1)?,
                l.conv("branch3x3_2", [192, 320], [3, 3], 2, [0, 0])?,
            ],
            branch7x7x3: [
                l.square("branch7x7x3_1", [c, 192], 1)?,
                l.conv("branch7x7x3_2", [192, 192], [1, 7], 1, [0, 3])?,
                l.conv("branch7x7x3_3", [192, 192], [7, 1], 1, [3, 0])?,
                l.conv("branch7x7x3_4", [192, 192], [3, 3], 2, [0, 0])?,
            ],
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Tensor::cat(
            vec![
                chain(&self.branch3x3, x.clone()),
                chain(&self.branch7x7x3, x.clone()),
                max_pool_3x3_stride_2(x),
            ],
            1,
        )
    }
}

/// `FIDInceptionE_1` (Mixed_7b, average pool) and `FIDInceptionE_2` (Mixed_7c, max pool).
#[derive(Debug)]
struct InceptionE<B: MicroditBackend> {
    branch1x1: BasicConv<B>,
    branch3x3_1: BasicConv<B>,
    branch3x3_2: [BasicConv<B>; 2],
    branch3x3dbl_12: [BasicConv<B>; 2],
    branch3x3dbl_3: [BasicConv<B>; 2],
    branch_pool: BasicConv<B>,
    max_pool: bool,
}

impl<B: MicroditBackend> InceptionE<B> {
    fn load(l: &mut BlockLoader<B>, c: usize, max_pool: bool) -> Result<Self> {
        let split = |l: &mut BlockLoader<B>, name: &str, c: usize| -> Result<[BasicConv<B>; 2]> {
            Ok([
                l.conv(&format!("{name}a"), [c, 384], [1, 3], 1, [0, 1])?,
                l.conv(&format!("{name}b"), [c, 384], [3, 1], 1, [1, 0])?,
            ])
        };
        Ok(Self {
            branch1x1: l.square("branch1x1", [c, 320], 1)?,
            branch3x3_1: l.square("branch3x3_1", [c, 384], 1)?,
            branch3x3_2: split(l, "branch3x3_2", 384)?,
            branch3x3dbl_12: [
                l.square("branch3x3dbl_1", [c, 448], 1)?,
                l.square("branch3x3dbl_2", [448, 384], 3)?,
            ],
            branch3x3dbl_3: split(l, "branch3x3dbl_3", 384)?,
            branch_pool: l.square("branch_pool", [c, 192], 1)?,
            max_pool,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let both = |convs: &[BasicConv<B>; 2], x: Tensor<B, 4>| {
            Tensor::cat(vec![convs[0].forward(x.clone()), convs[1].forward(x)], 1)
        };
        let pooled = if self.max_pool {
            pool_3x3(x.clone(), Pool::Max)
        } else {
            avg_pool_3x3(x.clone())
        };
        Tensor::cat(
            vec![
                self.branch1x1.forward(x.clone()),
                both(&self.branch3x3_2, self.branch3x3_1.forward(x.clone())),
                both(&self.branch3x3dbl_3, chain(&self.branch3x3dbl_12, x)),
                self.branch_pool.forward(pooled),
            ],
            1,
        )
    }
}

#[derive(Debug)]
pub struct FidInception<B: MicroditBackend> {
    stem: [BasicConv<B>; 5],
    mixed_5: [InceptionA<B>; 3],
    mixed_6a: InceptionB<B>,
    mixed_6: [InceptionC<B>; 4],
    mixed_7a: InceptionD<B>,
    mixed_7: [InceptionE<B>; 2],
    device: B::Device,
}

impl<B: MicroditBackend> FidInception<B> {
    /// From pytorch-fid's state dict (`.pth`, or `.safetensors` with the same names).
    pub fn load(path: &Path, device: &B::Device) -> Result<Self> {
        let mut w = Weights {
            tensors: Some(read_state_dict(path)?),
            rng: ChaCha8Rng::seed_from_u64(0),
        };
        let net = Self::from_weights(&mut w, device)
            .with_context(|| format!("loading the FID Inception from {}", path.display()))?;
        w.finish()?;
        Ok(net)
    }

    /// The network with random weights (for benchmarks).
    pub fn random(seed: u64, device: &B::Device) -> Self {
        let mut w = Weights {
            tensors: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
        };
        Self::from_weights(&mut w, device).expect("random weights have every tensor")
    }

    fn from_weights(w: &mut Weights, device: &B::Device) -> Result<Self> {
        Ok(Self {
            stem: [
                w.block("Conv2d_1a_3x3", device).single([3, 32], 3, 2, 0)?,
                w.block("Conv2d_2a_3x3", device).single([32, 32], 3, 1, 0)?,
                w.block("Conv2d_2b_3x3", device).single([32, 64], 3, 1, 1)?,
                w.block("Conv2d_3b_1x1", device).single([64, 80], 1, 1, 0)?,
                w.block("Conv2d_4a_3x3", device)
                    .single([80, 192], 3, 1, 0)?,
            ],
            mixed_5: [
                InceptionA::load(&mut w.block("Mixed_5b", device), 192, 32)?,
                InceptionA::load(&mut w.block("Mixed_5c", device), 256, 64)?,
                InceptionA::load(&mut w.block("Mixed_5d", device), 288, 64)?,
            ],
            mixed_6a: InceptionB::load(&mut w.block("Mixed_6a", device), 288)?,
            mixed_6: [
                InceptionC::load(&mut w.block("Mixed_6b", device), 768, 128)?,
                InceptionC::load(&mut w.block("Mixed_6c", device), 768, 160)?,
                InceptionC::load(&mut w.block("Mixed_6d", device), 768, 160)?,
                InceptionC::load(&mut w.block("Mixed_6e", device), 768, 192)?,
            ],
            mixed_7a: InceptionD::load(&mut w.block("Mixed_7a", device), 768)?,
            mixed_7: [
                InceptionE::load(&mut w.block("Mixed_7b", device), 1280, false)?,
                InceptionE::load(&mut w.block("Mixed_7c", device), 2048, true)?,
            ],
            device: device.clone(),
        })
    }

    /// Pool features [N, 2048] of images already resized and scaled ([N, 3, H, W] in
    /// [−1, 1]).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let [s1a, s2a, s2b, s3b, s4a] = &self.stem;
        let x = max_pool_3x3_stride_2(s2b.forward(s2a.forward(s1a.forward(x))));
        let x = max_pool_3x3_stride_2(s4a.forward(s3b.forward(x)));
        let x = self.mixed_5.iter().fold(x, |x, m| m.forward(x));
        let x = self.mixed_6a.forward(x);
        let x = self.mixed_6.iter().fold(x, |x, m| m.forward(x));
        let x = self.mixed_7a.forward(x);
        let x = self.mixed_7.iter().fold(x, |x, m| m.forward(x));
        let n = x.dims()[0];
        adaptive_avg_pool2d(x, [1, 1]).reshape([n, FEATURES])
    }

    /// pytorch-fid's features of RGB images of any size: `ToTensor`, bilinear resize to
    /// 299×299, 2x − 1, the network; one row per image.
    pub fn features(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let plane = 3 * INPUT_SIZE * INPUT_SIZE;
        let mut input = Vec::with_capacity(images.len() * plane);
        for image in images {
            input.extend(fid_input(image)?);
        }
        let x = Tensor::from_data(
            TensorData::new(input, [images.len(), 3, INPUT_SIZE, INPUT_SIZE]),
            &self.device,
        );
        let features: Vec<f32> = self
            .forward(x)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(features.chunks(FEATURES).map(<[f32]>::to_vec).collect())
    }
}

/// One image as pytorch-fid feeds it: [3, 299, 299] planes, `F.interpolate(mode='bilinear',
/// align_corners=False)` of the `ToTensor` values (x/255), then 2x − 1.
pub fn fid_input(image: &RgbImage) -> Result<Vec<f32>> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w == 0 || h == 0 {
        bail!("an empty image");
    }
    let xs = linear_taps(w, INPUT_SIZE);
    let ys = linear_taps(h, INPUT_SIZE);
    let raw = image.as_raw();
    let mut out = vec![0f32; 3 * INPUT_SIZE * INPUT_SIZE];
    for c in 0..3 {
        let pixel = |x: usize, y: usize| raw[(y * w + x) * 3 + c] as f32 / 255.0;
        let plane = &mut out[c * INPUT_SIZE * INPUT_SIZE..(c + 1) * INPUT_SIZE * INPUT_SIZE];
        for (oy, &(y0, y1, hy)) in ys.iter().enumerate() {
            for (ox, &(x0, x1, hx)) in xs.iter().enumerate() {
                let top = pixel(x0, y0) * (1.0 - hx) + pixel(x1, y0) * hx;
                let bottom = pixel(x0, y1) * (1.0 - hx) + pixel(x1, y1) * hx;
                let v = top * (1.0 - hy) + bottom * hy;
                plane[oy * INPUT_SIZE + ox] = 2.0 * v - 1.0;
            }
        }
    }
    Ok(out)
}

/// PyTorch's `upsample_bilinear2d` source taps on the CPU, in f32: source position
/// (i + ½)·in/out − ½ clamped at 0, its floor and the next index (clamped to the edge),
/// and the weight of the second.
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let lambda = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, lambda)
        })
        .collect()
}
