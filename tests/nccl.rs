//! NCCL on one GPU (`cargo test --features cuda-tests --test nccl`, run by
//! `bench/gpu_check.sh`): a one-rank group sums buffers to themselves, and a training run
//! whose gradients and status go through it ends bitwise where a run without it does.
//! Several ranks need several GPUs (NCCL refuses two ranks on one), i.e. an
//! `mpirun -np N microdit train … --device cuda` launch.
#![cfg(feature = "cuda-tests")]

mod common;

use std::time::Duration;

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use common::training::{latest_weights, setup};
use microdit::backend::nccl::{unique_id, NcclComm};
use microdit::backend::{test_device, Cuda, MicroditBackend, Trainable};
use microdit::train::config::TrainConfig;
use microdit::train::distributed::Rank;
use microdit::train::trainer::{train, train_as, RunOptions};

fn one_rank_group() -> NcclComm {
    let id = unique_id().expect("NCCL library");
    NcclComm::join(0, 0, 1, &id, Duration::from_secs(60)).expect("one-rank NCCL group")
}

#[test]
fn a_one_rank_group_sums_host_and_device_buffers_to_themselves() {
    let comm = one_rank_group();
    let mut status = [1.5f64, -2.0, 1e300];
    comm.sum_host(&mut status).unwrap();
    assert_eq!(status, [1.5, -2.0, 1e300]);

    let device = test_device();
    let values: Vec<f32> = (0..100_003).map(|i| (i as f32 * 0.37).sin()).collect();
    let buffer = Tensor::<Cuda, 1>::from_floats(values.as_slice(), &device);
    let summed = Cuda::nccl_sum(buffer.into_primitive().tensor(), &comm).unwrap();
    let summed = Tensor::<Cuda, 1>::from_primitive(TensorPrimitive::Float(summed));
    assert_eq!(summed.into_data().into_vec::<f32>().unwrap(), values);
}

#[test]
fn training_through_a_one_rank_nccl_group_equals_training_alone() {
    let s = setup("steps = 3\ncheckpoint_every = 3\n");
    let cfg = TrainConfig::from_file(&s.root.join("stage.toml")).unwrap();
    let opts = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let device = test_device();
    train::<Trainable<Cuda>>(&cfg, &s.root.join("alone"), &opts, &device).unwrap();
    let rank = Rank::new(0, 1, one_rank_group());
    train_as::<Trainable<Cuda>>(&cfg, &s.root.join("nccl"), &opts, &device, rank).unwrap();
    assert_eq!(
        latest_weights(&s.root.join("alone")),
        latest_weights(&s.root.join("nccl"))
    );
}
