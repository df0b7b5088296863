//! The CUDA backend's kernels, checked and timed one by one (docs/BENCHMARKS.md):
//!
//!     cargo build --release --features cuda --example gpu_kernels
//!     PROBE=layouts,speed,adamw target/release/examples/gpu_kernels
//!
//! - `layouts`: matrix products in every operand layout the model produces (transposed,
//!   batched, broadcast, head views) against an f64 product on the host, in f32 and bf16;
//! - `speed`: products of the XL model's sizes and attention, first call and median;
//! - `adamw`: the fused AdamW kernel against burn's operation-by-operation update.
//!
//! `bench/pytorch_kernels.py` times the same products and attention in PyTorch.

mod probe {
    use burn::prelude::*;
    use burn::tensor::{Distribution, FloatDType};
    use microdit::backend::{attention, attention_unfused, matmul, Cuda, CudaDevice};
    use std::time::Instant;

    type B = Cuda;

    fn sync(dev: &CudaDevice) {
        <B as burn::tensor::backend::Backend>::sync(dev).unwrap();
    }

    fn bench<F: FnMut()>(mut f: F, dev: &CudaDevice, n: usize) -> (f64, f64) {
        let t0 = Instant::now();
        f();
        sync(dev);
        let first = t0.elapsed().as_secs_f64();
        for _ in 0..3 {
            f();
        }
        sync(dev);
        let t1 = Instant::now();
        for _ in 0..n {
            f();
        }
        sync(dev);
        (first, t1.elapsed().as_secs_f64() / n as f64)
    }

    fn host(t: Tensor<B, 4>) -> (Vec<usize>, Vec<f64>) {
        let dims = t.dims().to_vec();
        let v: Vec<f32> = t
            .cast(FloatDType::F32)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        (dims, v.into_iter().map(|x| x as f64).collect())
    }

    /// Relative L2 error of `ours` against a host f64 product of the same (rounded) operands.
    fn check(name: &str, a: Tensor<B, 4>, b: Tensor<B, 4>) {
        let ours = host(matmul(a.clone(), b.clone()));
        let (ad, av) = host(a);
        let (bd, bv) = host(b);
        let (m, k, n) = (ad[2], ad[3], bd[3]);
        let (b0, b1) = (ad[0].max(bd[0]), ad[1].max(bd[1]));
        let mut reference = vec![0f64; b0 * b1 * m * n];
        for i0 in 0..b0 {
            for i1 in 0..b1 {
                let ao = ((i0 % ad[0]) * ad[1] + (i1 % ad[1])) * m * k;
                let bo = ((i0 % bd[0]) * bd[1] + (i1 % bd[1])) * k * n;
                let co = (i0 * b1 + i1) * m * n;
                for r in 0..m {
                    for kk in 0..k {
                        let x = av[ao + r * k + kk];
                        for c in 0..n {
                            reference[co + r * n + c] += x * bv[bo + kk * n + c];
                        }
                    }
                }
            }
        }
        let (mut num, mut den) = (0.0, 0.0);
        for (x, r) in ours.1.iter().zip(&reference) {
            num += (x - r).powi(2);
            den += r * r;
        }
        let ok = ours.0 == vec![b0, b1, m, n];
        println!(
            "check {name:<40} rel err {:.2e} shape {:?} {}",
            (num / den).sqrt(),
            ours.0,
            if ok { "" } else { "SHAPE MISMATCH" }
        );
    }

    fn layouts(dev: &CudaDevice) {
        let r = |s: [usize; 4]| Tensor::<B, 4>::random(s, Distribution::Normal(0.0, 1.0), dev);
        for dtype in [FloatDType::F32, FloatDType::BF16] {
            let c = |t: Tensor<B, 4>| t.cast(dtype);
            let d = format!("{dtype:?}");
            check(
                &format!("{d} plain 1x1x37x53 @ 53x29"),
                c(r([1, 1, 37, 53])),
                c(r([1, 1, 53, 29])),
            );
            check(
                &format!("{d} lhs transposed"),
                c(r([1, 1, 53, 37])).swap_dims(2, 3),
                c(r([1, 1, 53, 29])),
            );
            check(
                &format!("{d} rhs transposed"),
                c(r([1, 1, 37, 53])),
                c(r([1, 1, 29, 53])).swap_dims(2, 3),
            );
            check(
                &format!("{d} both transposed"),
                c(r([1, 1, 53, 37])).swap_dims(2, 3),
                c(r([1, 1, 29, 53])).swap_dims(2, 3),
            );
            check(
                &format!("{d} batched 2x3"),
                c(r([2, 3, 37, 53])),
                c(r([2, 3, 53, 29])),
            );
            check(
                &format!("{d} rhs broadcast 2x3 @ 1x1"),
                c(r([2, 3, 37, 53])),
                c(r([1, 1, 53, 29])),
            );
            check(
                &format!("{d} heads swapped (non-collapsible)"),
                c(r([2, 37, 3, 53])).swap_dims(1, 2),
                c(r([2, 53, 3, 29])).swap_dims(1, 2),
            );
            check(
                &format!("{d} k transposed from heads view"),
                c(r([2, 37, 3, 53])).swap_dims(1, 2),
                c(r([2, 29, 3, 53])).swap_dims(1, 2).swap_dims(2, 3),
            );
            check(
                &format!("{d} vector rhs 37x53 @ 53x1"),
                c(r([1, 1, 37, 53])),
                c(r([1, 1, 53, 1])),
            );
        }
    }

    fn speed(dev: &CudaDevice) {
        let mode = microdit::backend::cublas::mode();
        let shapes: [(usize, usize, usize, usize, bool); 6] = [
            (1, 2048, 1024, 3072, false),
            (1, 8192, 768, 2304, false),
            (1, 8192, 1024, 4096, false),
            (1, 1024, 8192, 3072, true),
            (8, 512, 1024, 4096, false),
            (1, 8192, 4096, 1024, false),
        ];
        for dtype in [FloatDType::BF16, FloatDType::F32] {
            for &(b, m, k, n, t) in &shapes {
                let a: Tensor<B, 3> = if t {
                    Tensor::<B, 3>::random([b, k, m], Distribution::Normal(0.0, 1.0), dev)
                        .cast(dtype)
                        .swap_dims(1, 2)
                } else {
                    Tensor::<B, 3>::random([b, m, k], Distribution::Normal(0.0, 1.0), dev)
                        .cast(dtype)
                };
                let w = Tensor::<B, 3>::random([b, k, n], Distribution::Normal(0.0, 1.0), dev)
                    .cast(dtype);
                let (first, per) = bench(
                    || {
                        let _ = matmul(a.clone(), w.clone());
                    },
                    dev,
                    20,
                );
                let tflops = 2.0 * (b * m * k * n) as f64 / per / 1e12;
                println!("matmul {mode:<10} {dtype:?} b{b} {m}x{k}x{n}{} first {first:.3}s  {:.3} ms  {tflops:.1} TFLOP/s",
                    if t { " (lhsT)" } else { "" }, per * 1e3);
            }
        }
        for (n, dtype) in [
            (256usize, FloatDType::BF16),
            (1024, FloatDType::BF16),
            (256, FloatDType::F32),
        ] {
            let q = Tensor::<B, 4>::random([32, 16, n, 64], Distribution::Normal(0.0, 1.0), dev)
                .cast(dtype);
            let (first, per) = bench(
                || {
                    let _ = attention(q.clone(), q.clone(), q.clone(), false);
                },
                dev,
                10,
            );
            let (first_u, per_u) = bench(
                || {
                    let _ = attention_unfused(q.clone(), q.clone(), q.clone(), false);
                },
                dev,
                10,
            );
            println!("attention {mode} {dtype:?} [32,16,{n},64]: default first {first:.3}s {:.3} ms; unfused first {first_u:.3}s {:.3} ms", per * 1e3, per_u * 1e3);
        }
    }

    fn adamw(dev: &CudaDevice) {
        use microdit::backend::{adamw_step_unfused, AdamWStep, MicroditBackend};
        let r = |s: usize| Tensor::<B, 1>::random([s], Distribution::Normal(0.0, 1.0), dev);
        let n = 1_000_003;
        let (p, g, m) = (r(n), r(n), r(n) * 0.1);
        let v = r(n).abs() * 0.01;
        let step = AdamWStep {
            lr: 1e-2,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.1,
            time: 3,
        };
        let prim = |t: &Tensor<B, 1>| t.clone().into_primitive().tensor();
        let fused = B::adamw_step(prim(&p), prim(&g), prim(&m), prim(&v), &step);
        let plain = adamw_step_unfused::<B>(prim(&p), prim(&g), prim(&m), prim(&v), &step);
        for (k, (a, b)) in fused.into_iter().zip(plain).enumerate() {
            let a: Vec<f32> =
                Tensor::<B, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(a))
                    .into_data()
                    .to_vec()
                    .unwrap();
            let b: Vec<f32> =
                Tensor::<B, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(b))
                    .into_data()
                    .to_vec()
                    .unwrap();
            let max = a
                .iter()
                .zip(&b)
                .map(|(x, y)| ((x - y).abs() / y.abs().max(1e-6)) as f64)
                .fold(0.0, f64::max);
            println!(
                "adamw fused vs unfused output {k}: max relative difference {max:.2e} (n={}, {})",
                a.len(),
                if a.len() == n {
                    "ok"
                } else {
                    "LENGTH MISMATCH"
                }
            );
        }
        let params = r(8 * 1024 * 1024);
        let time = |update: fn(_, _, _, _, &AdamWStep) -> [_; 3]| {
            bench(
                || {
                    let _ = update(
                        prim(&params),
                        prim(&params),
                        prim(&params),
                        prim(&params),
                        &step,
                    );
                },
                dev,
                20,
            )
        };
        let (first, per) = time(B::adamw_step);
        let (first_u, per_u) = time(adamw_step_unfused::<B>);
        println!("adamw 8M params: fused first {first:.3}s {:.3} ms ({:.0} GB/s); unfused first {first_u:.3}s {:.3} ms", per * 1e3, 28.0 * 8.0 * 1024.0 * 1024.0 / per / 1e9, per_u * 1e3);
    }

    pub fn main() {
        microdit::backend::cuda_runtime::configure();
        let dev = CudaDevice::new(0);
        for part in std::env::var("PROBE").unwrap_or_default().split(',') {
            match part {
                "adamw" => adamw(&dev),
                "layouts" => layouts(&dev),
                "speed" => speed(&dev),
                _ => {}
            }
        }
    }
}
fn main() {
    probe::main()
}
