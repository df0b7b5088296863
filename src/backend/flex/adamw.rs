//! AdamW on burn-flex in one pass over memory, split across rayon's pool: the update
//! reads and writes each parameter, gradient and moment once instead of once per
//! operation. Each element goes through burn's `AdamW` operations in their order and in
//! f32, so the result is bit for bit the unfused update's.

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use crate::backend::AdamWStep;

/// Elements per task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 16;

/// `[param, moment_1, moment_2]` after one step, for f32 tensors `[param, grad,
/// moment_1, moment_2]`; buffers held nowhere else are updated in place.
pub fn step(tensors: [FlexTensor; 4], step: &AdamWStep) -> [FlexTensor; 3] {
    let [param, grad, moment_1, moment_2] = tensors.map(|t| t.to_contiguous());
    let n = param.layout().num_elements();
    let [mut param, mut moment_1, mut moment_2] = [param, moment_1, moment_2];
    let grad = &grad.storage::<f32>()[..n];
    let [c1, c2] = step.bias_corrections();
    let scalars = Scalars {
        beta_1: step.beta_1,
        beta_2: step.beta_2,
        c1,
        c2,
        epsilon: step.epsilon,
        decay: step.decay() as f32,
        lr: step.lr as f32,
    };
    let p = &mut param.storage_mut::<f32>()[..n];
    let m = &mut moment_1.storage_mut::<f32>()[..n];
    let v = &mut moment_2.storage_mut::<f32>()[..n];
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| scalars.update(p, m, v, g));
    [param, moment_1, moment_2]
}

struct Scalars {
    beta_1: f32,
    beta_2: f32,
    c1: f32,
    c2: f32,
    epsilon: f32,
    decay: f32,
    lr: f32,
}

impl Scalars {
    /// `m = β₁m + (1−β₁)g`, `v = β₂v + (1−β₂)g²`, `p = decay·p − lr·(m/c₁)/(√(v/c₂) + ε)`.
    fn update(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
            *m = *m * self.beta_1 + g * (1.0 - self.beta_1);
            *v = *v * self.beta_2 + g * g * (1.0 - self.beta_2);
            let delta = (*m / self.c1) / ((*v / self.c2).sqrt() + self.epsilon);
            *p = *p * self.decay - delta * self.lr;
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Tensor, TensorData};

    use crate::backend::{adamw_step_unfused, AdamWStep, MicroditBackend};

    #[test]
    fn one_pass_update_equals_the_unfused_operations_bit_for_bit() {
        let n = 3 * super::CHUNK + 17;
        // Values of both signs, or their magnitudes (the second moment).
        let tensor = |seed: f32, scale: f32, magnitude: bool| {
            let value = |i: usize| (i as f32 * 0.37 + seed).sin() * scale;
            let data: Vec<f32> = (0..n)
                .map(|i| if magnitude { value(i).abs() } else { value(i) })
                .collect();
            Tensor::<Flex, 1>::from_data(TensorData::new(data, [n]), &Default::default())
                .into_primitive()
                .tensor()
        };
        let step = AdamWStep {
            lr: 3e-4,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.1,
            time: 7,
        };
        let inputs = || {
            [
                tensor(0.1, 1.0, false),
                tensor(0.7, 1e-3, false),
                tensor(1.3, 1e-3, false),
                tensor(2.9, 1e-6, true),
            ]
        };
        let [p, g, m, v] = inputs();
        let fused = Flex::adamw_step(p, g, m, v, &step);
        let [p, g, m, v] = inputs();
        let unfused = adamw_step_unfused::<Flex>(p, g, m, v, &step);
        for (a, b) in fused.into_iter().zip(unfused) {
            let [a, b] = [a, b].map(|t| {
                Tensor::<Flex, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(t))
                    .into_data()
            });
            let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
            let differ = a
                .iter()
                .zip(b)
                .position(|(x, y)| x.to_bits() != y.to_bits());
            assert_eq!(differ, None, "first difference at {differ:?}");
        }
    }
}
