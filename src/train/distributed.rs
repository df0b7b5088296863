//! Data parallelism (DDP): every rank computes its share of a step's micro-batches
//! (micro-batch `m` goes to rank `m mod world`), then the ranks sum their gradients and
//! agree on the step's status (loss, failures, Ctrl-C, skipped samples), so that every rank
//! takes the same clipped AdamW step and the replicas stay equal.
//!
//! A [`Collective`] is the engine that sums: [`Threads`] for several devices in one process
//! (`--device cpu,cpu`, `cuda:0,cuda:1`), or between processes on one or many machines
//! (`mpirun -np N microdit train …`, feature `mpi`): MPI for CPU replicas, NCCL for GPUs
//! (rank 0 draws NCCL's group id, MPI hands it out). Gradients travel as flat f32 buckets
//! in parameter order (the parameters are numbered alike on every rank), through host
//! memory except on NCCL. `Threads` adds in rank order; MPI's sum of two ranks is the same
//! addition, so two ranks give the same bits on either engine.

use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

#[cfg(feature = "cuda")]
use crate::backend::nccl::NcclComm;
use crate::backend::{AutodiffBackend, MicroditBackend};

/// Sums buffers elementwise over all ranks; every rank gets the sum.
pub trait Collective {
    fn sum_f32(&self, rank: usize, values: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, rank: usize, values: &mut [f64]) -> Result<()>;

    /// The NCCL group that sums gradient buffers on the GPU, if this engine is one.
    #[cfg(feature = "cuda")]
    fn nccl(&self) -> Option<&NcclComm> {
        None
    }
}

/// A group shared between threads serves each of them.
impl<C: Collective + ?Sized> Collective for Arc<C> {
    fn sum_f32(&self, rank: usize, values: &mut [f32]) -> Result<()> {
        (**self).sum_f32(rank, values)
    }

    fn sum_f64(&self, rank: usize, values: &mut [f64]) -> Result<()> {
        (**self).sum_f64(rank, values)
    }
}

/// One rank of a data-parallel group: `index` of `world` (it stays on the thread that
/// trains it).
#[derive(Clone)]
pub struct Rank {
    pub index: usize,
    pub world: usize,
    collective: Option<Rc<dyn Collective>>,
}

impl std::fmt::Debug for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.index, self.world)
    }
}

impl Rank {
    /// The only rank: sums are the identity.
    pub fn sole() -> Self {
        Self {
            index: 0,
            world: 1,
            collective: None,
        }
    }

    pub fn new(index: usize, world: usize, collective: impl Collective + 'static) -> Self {
        Self {
            index,
            world,
            collective: Some(Rc::new(collective)),
        }
    }

    /// Rank 0 logs, previews and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.index == 0
    }

    /// Whether this rank computes micro-batch `m` of a step.
    pub fn owns(&self, micro_batch: usize) -> bool {
        micro_batch % self.world == self.index
    }

    /// `values` summed over all ranks.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>> {
        let mut out = values.to_vec();
        if let Some(c) = &self.collective {
            c.sum_f64(self.index, &mut out)?;
        }
        Ok(out)
    }

    /// The gradients summed over all ranks, bucket by bucket (at most [`BUCKET_BYTES`]
    /// of extra memory at a time): on the GPU when the engine is NCCL, through host memory
    /// otherwise. A parameter that no rank has a gradient for stays without one (so AdamW
    /// leaves it alone, as on one device); one that only some ranks have counts zeros for
    /// the others.
    pub fn all_reduce_gradients<B: AutodiffBackend, M: Module<B>>(
        &self,
        model: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        let capacity = BUCKET_BYTES / std::mem::size_of::<f32>();
        self.all_reduce_gradients_in_buckets(model, grads, capacity)
    }

    fn all_reduce_gradients_in_buckets<B: AutodiffBackend, M: Module<B>>(
        &self,
        model: &M,
        grads: GradientsParams,
        capacity: usize,
    ) -> Result<GradientsParams> {
        let Some(collective) = &self.collective else {
            return Ok(grads);
        };
        let mut taken = TakeGradients::<B> {
            grads,
            entries: Vec::new(),
        };
        model.visit(&mut taken);
        let mut entries = taken.entries;
        let held: Vec<f64> = entries
            .iter()
            .map(|e| e.grad.is_some() as u8 as f64)
            .collect();
        let held = self.sum(&held)?;
        let mut summed: Vec<&mut Entry<B>> = entries
            .iter_mut()
            .zip(&held)
            .filter_map(|(e, &h)| (h > 0.0).then_some(e))
            .collect();
        let sizes: Vec<usize> = summed.iter().map(|e| e.numel).collect();
        for bucket in buckets(&sizes, capacity) {
            let part = &mut summed[bucket];
            let flat = Tensor::cat(part.iter_mut().map(|e| e.take_or_zeros()).collect(), 0);
            let flat = sum_flat::<B::InnerBackend>(collective.as_ref(), self.index, flat)?;
            let sizes: Vec<usize> = part.iter().map(|e| e.numel).collect();
            for (e, grad) in part.iter_mut().zip(flat.split_with_sizes(sizes, 0)) {
                e.grad = Some(grad);
            }
        }
        let mut put = PutGradients::<B> {
            grads: taken.grads,
            entries: entries.into_iter(),
        };
        model.visit(&mut put);
        Ok(put.grads)
    }
}

/// Gradients are summed in buckets of about this size (PyTorch DDP's default), so the
/// flat copy a sum needs is one bucket, not all gradients at once (4.6 GB for XL_2).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Consecutive runs of `sizes` of at most `capacity` elements in all (a size above it
/// alone), in order.
pub fn buckets(sizes: &[usize], capacity: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut filled) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && filled + size > capacity {
            out.push(start..i);
            (start, filled) = (i, 0);
        }
        filled += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// `flat` summed over the ranks: by NCCL on the GPU where the engine is NCCL, otherwise
/// read to host memory, summed by the engine and written back.
fn sum_flat<B: MicroditBackend>(
    collective: &dyn Collective,
    rank: usize,
    flat: Tensor<B, 1>,
) -> Result<Tensor<B, 1>> {
    #[cfg(feature = "cuda")]
    if let Some(comm) = collective.nccl() {
        let summed = B::nccl_sum(flat.into_primitive().tensor(), comm)?;
        return Ok(Tensor::from_primitive(
            burn::tensor::TensorPrimitive::Float(summed),
        ));
    }
    let device = flat.device();
    crate::backend::host_sync::record();
    let mut values = flat
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("gradient buffer: {e:?}"))?;
    collective.sum_f32(rank, &mut values)?;
    let n = values.len();
    Ok(Tensor::from_data(TensorData::new(values, [n]), &device))
}

/// One parameter's gradient, flattened, between taking and putting back.
struct Entry<B: AutodiffBackend> {
    numel: usize,
    device: B::Device,
    grad: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> Entry<B> {
    fn take_or_zeros(&mut self) -> Tensor<B::InnerBackend, 1> {
        self.grad
            .take()
            .unwrap_or_else(|| Tensor::zeros([self.numel], &self.device))
    }
}

/// Takes every parameter's gradient out, flattened, in module order (the same order on
/// every rank).
struct TakeGradients<B: AutodiffBackend> {
    grads: GradientsParams,
    entries: Vec<Entry<B>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TakeGradients<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let numel = param.shape().num_elements();
        let grad = self.grads.remove::<B::InnerBackend, D>(param.id);
        self.entries.push(Entry {
            numel,
            device: param.val().device(),
            grad: grad.map(|g| g.reshape([numel])),
        });
    }
}

/// Registers the summed gradients back in their parameters' shapes.
struct PutGradients<B: AutodiffBackend> {
    grads: GradientsParams,
    entries: std::vec::IntoIter<Entry<B>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for PutGradients<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let entry = self.entries.next().expect("one entry per parameter");
        if let Some(grad) = entry.grad {
            let grad = grad.reshape(param.shape());
            self.grads.register::<B::InnerBackend, D>(param.id, grad);
        }
    }
}

/// Ranks that are threads of one process: each deposits its buffer, then every rank adds
/// the deposits up in rank order.
pub struct Threads {
    world: usize,
    f32_slots: Mutex<Vec<Vec<f32>>>,
    f64_slots: Mutex<Vec<Vec<f64>>>,
    /// Every call passes it twice: after all deposits, and after all have read.
    barrier: Barrier,
}

impl Threads {
    pub fn new(world: usize) -> Arc<Self> {
        Arc::new(Self {
            world,
            f32_slots: Mutex::new(vec![Vec::new(); world]),
            f64_slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world),
        })
    }

    fn sum<T: Copy + std::ops::Add<Output = T>>(
        &self,
        slots: &Mutex<Vec<Vec<T>>>,
        rank: usize,
        values: &mut [T],
    ) -> Result<()> {
        let lock = || slots.lock().unwrap_or_else(|e| e.into_inner());
        lock()[rank] = values.to_vec();
        self.barrier.wait();
        {
            let all = lock();
            anyhow::ensure!(
                all.iter().all(|s| s.len() == values.len()),
                "the ranks' buffers differ in length"
            );
            for (i, v) in values.iter_mut().enumerate() {
                *v = (1..self.world).fold(all[0][i], |acc, r| acc + all[r][i]);
            }
        }
        self.barrier.wait();
        Ok(())
    }
}

impl Collective for Threads {
    fn sum_f32(&self, rank: usize, values: &mut [f32]) -> Result<()> {
        self.sum(&self.f32_slots, rank, values)
    }

    fn sum_f64(&self, rank: usize, values: &mut [f64]) -> Result<()> {
        self.sum(&self.f64_slots, rank, values)
    }
}

/// NCCL: gradient buckets summed on the GPU, a step's status through small device buffers.
#[cfg(feature = "cuda")]
impl Collective for NcclComm {
    fn sum_f32(&self, _rank: usize, values: &mut [f32]) -> Result<()> {
        self.sum_host(values)
    }

    fn sum_f64(&self, _rank: usize, values: &mut [f64]) -> Result<()> {
        self.sum_host(values)
    }

    fn nccl(&self) -> Option<&NcclComm> {
        Some(self)
    }
}

#[cfg(feature = "mpi")]
pub use self::mpi_engine::{Mpi, MpiLaunch};

/// The number of processes an MPI launcher (Open MPI's `mpirun`, MPICH/Hydra, Slurm's
/// `srun`) started, read from the environment it sets; `None` when none did.
pub fn launched_processes() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// MPI between processes: the world communicator of `mpirun`/`srun`, sums with
/// MPI_Allreduce, a deadline on every exchange.
#[cfg(feature = "mpi")]
mod mpi_engine {
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result};
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    use super::Collective;

    /// This process's place in an MPI launch; MPI is finalised when it is dropped.
    pub struct MpiLaunch {
        _universe: mpi::environment::Universe,
        pub world: SimpleCommunicator,
        pub rank: usize,
        pub size: usize,
        /// Rank among the processes on this machine (picks the GPU).
        pub local_rank: usize,
    }

    impl MpiLaunch {
        /// `Some` when started by an MPI launcher with more than one process.
        pub fn from_environment() -> Result<Option<Self>> {
            if super::launched_processes().is_none_or(|n| n < 2) {
                return Ok(None);
            }
            let universe = mpi::initialize().context("MPI could not be initialised")?;
            let world = universe.world();
            let local_rank = world.split_shared(world.rank()).rank() as usize;
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            if size < 2 {
                return Ok(None);
            }
            Ok(Some(Self {
                _universe: universe,
                world,
                rank,
                size,
                local_rank,
            }))
        }

        /// This process's rank, summing over the world with `timeout` on every exchange.
        pub fn rank(&self, timeout: Duration) -> super::Rank {
            super::Rank::new(self.rank, self.size, self.engine(timeout))
        }

        fn engine(&self, timeout: Duration) -> Mpi {
            Mpi {
                world: self.world.duplicate(),
                timeout,
            }
        }

        /// This process's rank on GPU `device`, summing over NCCL: rank 0 draws the
        /// group's id and MPI passes it to the others.
        #[cfg(feature = "cuda")]
        pub fn nccl_rank(&self, device: usize, timeout: Duration) -> Result<super::Rank> {
            use crate::backend::nccl;
            let mut id = [0u8; 128];
            let ready = match self.rank {
                0 => nccl::unique_id().map(|drawn| id = drawn),
                _ => nccl::check_library(),
            };
            // Every rank learns whether any cannot start NCCL, so none waits for it to join.
            let mut failed = [ready.is_err() as u8 as f64];
            self.engine(timeout).sum_f64(self.rank, &mut failed)?;
            ready?;
            anyhow::ensure!(
                failed[0] == 0.0,
                "NCCL could not start on {} other rank(s); see their messages",
                failed[0]
            );
            self.world.process_at_rank(0).broadcast_into(&mut id[..]);
            let comm = nccl::NcclComm::join(device, self.rank, self.size, &id, timeout)?;
            Ok(super::Rank::new(self.rank, self.size, comm))
        }
    }

    /// Sums over the MPI world; a rank that does not answer within `timeout` ends this
    /// process with an error (MPI cannot cancel a collective, and waiting longer would
    /// hang the whole job).
    pub struct Mpi {
        pub world: SimpleCommunicator,
        pub timeout: Duration,
    }

    impl Mpi {
        fn all_reduce<T: Equivalence + Copy>(&self, rank: usize, values: &mut [T]) -> Result<()> {
            let send = values.to_vec();
            let deadline = Instant::now() + self.timeout;
            mpi::request::scope(|scope| {
                let mut request = self.world.immediate_all_reduce_into(
                    scope,
                    &send[..],
                    values,
                    SystemOperation::sum(),
                );
                loop {
                    match request.test() {
                        Ok(_) => return,
                        Err(pending) => request = pending,
                    }
                    if Instant::now() > deadline {
                        eprintln!(
                            "error: rank {rank} of {}: the other ranks did not answer within {} s \
                             (one died or hangs); stopping",
                            self.world.size(),
                            self.timeout.as_secs()
                        );
                        self.world.abort(1);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            Ok(())
        }
    }

    impl Collective for Mpi {
        fn sum_f32(&self, rank: usize, values: &mut [f32]) -> Result<()> {
            self.all_reduce(rank, values)
        }

        fn sum_f64(&self, rank: usize, values: &mut [f64]) -> Result<()> {
            self.all_reduce(rank, values)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_sum_in_rank_order_and_every_rank_gets_the_sum() {
        let group = Threads::new(3);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    let group = group.clone();
                    s.spawn(move || {
                        let rank = Rank::new(r, 3, group);
                        let mut v = vec![1e8f32, r as f32, 0.5];
                        if r == 1 {
                            v[0] = 1.0;
                        }
                        rank.collective
                            .as_ref()
                            .unwrap()
                            .sum_f32(r, &mut v)
                            .unwrap();
                        let status = rank.sum(&[r as f64, 1.0]).unwrap();
                        assert_eq!(status, vec![3.0, 3.0]);
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // (1e8 + 1) + 1e8 in f32, in rank order.
        let expected = vec![(1e8f32 + 1.0) + 1e8, 3.0, 1.5];
        for r in results {
            assert_eq!(r, expected);
        }
    }

    use crate::backend::{Cpu, Trainable};
    use burn::nn::{Linear, LinearConfig};

    type B = Trainable<Cpu>;

    #[derive(Module, Debug)]
    struct Three<B: burn::tensor::backend::Backend> {
        used_by_all: Linear<B>,
        used_by_rank_0: Linear<B>,
        unused: Linear<B>,
    }

    /// Rank r's gradients of `sum(model(x))` for x filled with r + 1 (batch 2), where
    /// rank 1 skips the second layer: dW = 2(r + 1) everywhere, db = 2.
    fn gradients(rank: usize, model: &Three<B>) -> GradientsParams {
        let x = Tensor::<B, 2>::full([2, 3], rank as f32 + 1.0, &Default::default());
        let mut loss = model.used_by_all.forward(x.clone()).sum();
        if rank == 0 {
            loss = loss + model.used_by_rank_0.forward(x).sum();
        }
        GradientsParams::from_grads(loss.backward(), model)
    }

    #[test]
    fn gradients_are_summed_in_buckets_and_absent_ones_stay_absent() {
        let group = Threads::new(2);
        let results: Vec<[Option<Vec<f32>>; 3]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|r| {
                    let group = group.clone();
                    s.spawn(move || {
                        let device = Default::default();
                        let layer = || LinearConfig::new(3, 4).init::<B>(&device);
                        let model = Three {
                            used_by_all: layer(),
                            used_by_rank_0: layer(),
                            unused: layer(),
                        };
                        let rank = Rank::new(r, 2, group);
                        // 5 elements a bucket: the 12 weights and 4 biases of a layer
                        // land in different buckets.
                        let mut grads = rank
                            .all_reduce_gradients_in_buckets(&model, gradients(r, &model), 5)
                            .unwrap();
                        [&model.used_by_all, &model.used_by_rank_0, &model.unused].map(|l| {
                            let w = grads.remove::<Cpu, 2>(l.weight.id)?;
                            Some(w.into_data().into_vec::<f32>().unwrap())
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for [all, rank_0, unused] in results {
            assert_eq!(all, Some(vec![2.0 + 4.0; 12]));
            assert_eq!(rank_0, Some(vec![2.0; 12]));
            assert_eq!(unused, None);
        }
    }

    #[test]
    fn buckets_are_consecutive_runs_within_the_capacity() {
        assert!(buckets(&[], 10).is_empty());
        assert_eq!(buckets(&[4, 4, 2, 1], 10), vec![0..3, 3..4]);
        // A parameter larger than a bucket goes alone; nothing is split or dropped.
        assert_eq!(buckets(&[3, 25, 3, 3], 10), vec![0..1, 1..2, 2..4]);
        assert_eq!(buckets(&[25], 10), vec![0..1]);
    }

    #[test]
    fn a_sole_rank_owns_every_micro_batch() {
        let rank = Rank::sole();
        assert!(rank.is_main() && rank.owns(0) && rank.owns(7));
        assert_eq!(rank.sum(&[2.5]).unwrap(), vec![2.5]);
    }
}
