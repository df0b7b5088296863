//! Data parallelism (DDP): every rank computes its share of a step's micro-batches
//! (micro-batch `m` goes to rank `m mod world`), then the ranks sum their gradients and
//! agree on the step's status (loss, failures, Ctrl-C, skipped samples), so that every rank
//! takes the same clipped AdamW step and the replicas stay equal.
//!
//! A [`Collective`] is the engine that sums: [`Threads`] for several devices in one process
//! (`--device cpu,cpu`, `cuda:0,cuda:1`), or MPI between processes on one or many machines
//! (`mpirun -np N microdit train …`, feature `mpi`). Gradients travel as one flat f32
//! buffer in parameter order (the parameters are numbered alike on every rank). `Threads`
//! adds in rank order; MPI's sum of two ranks is the same addition, so two ranks give the
//! same bits on either engine.

use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

use crate::backend::AutodiffBackend;
use crate::model::MicroDit;

/// Sums buffers elementwise over all ranks; every rank gets the sum.
pub trait Collective {
    fn sum_f32(&self, rank: usize, values: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, rank: usize, values: &mut [f64]) -> Result<()>;
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

    /// The gradients summed over all ranks. A parameter that no rank has a gradient for
    /// stays without one (so AdamW leaves it alone, as on one device).
    pub fn all_reduce_gradients<B: AutodiffBackend>(
        &self,
        model: &MicroDit<B>,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        let Some(c) = &self.collective else {
            return Ok(grads);
        };
        let mut pack = Pack::<B> {
            grads,
            flat: Vec::new(),
            _b: Default::default(),
        };
        model.visit(&mut pack);
        c.sum_f32(self.index, &mut pack.flat)?;
        let mut unpack = Unpack::<B> {
            grads: pack.grads,
            flat: &pack.flat,
            at: 0,
            _b: Default::default(),
        };
        model.visit(&mut unpack);
        Ok(unpack.grads)
    }
}

/// Flattens every parameter's gradient into `flat`, in module order: one presence flag
/// (1 with a gradient, 0 without), then its values (zeros without).
struct Pack<B: AutodiffBackend> {
    grads: GradientsParams,
    flat: Vec<f32>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let numel = param.shape().num_elements();
        match self.grads.remove::<B::InnerBackend, D>(param.id) {
            Some(grad) => {
                self.flat.push(1.0);
                let values = grad.into_data().convert::<f32>();
                self.flat
                    .extend(values.as_slice::<f32>().expect("f32 after convert"));
            }
            None => {
                self.flat.push(0.0);
                self.flat.extend(std::iter::repeat_n(0.0, numel));
            }
        }
    }
}

/// Registers the summed gradients back, for the parameters some rank had one for.
struct Unpack<'a, B: AutodiffBackend> {
    grads: GradientsParams,
    flat: &'a [f32],
    at: usize,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unpack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.shape();
        let numel = shape.num_elements();
        let present = self.flat[self.at] > 0.0;
        let values = &self.flat[self.at + 1..self.at + 1 + numel];
        self.at += 1 + numel;
        if present {
            let device = param.val().device();
            let grad = Tensor::<B::InnerBackend, D>::from_data(
                TensorData::new(values.to_vec(), shape),
                &device,
            );
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
            let engine = Mpi {
                world: self.world.duplicate(),
                timeout,
            };
            super::Rank::new(self.rank, self.size, engine)
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

    #[test]
    fn a_sole_rank_owns_every_micro_batch() {
        let rank = Rank::sole();
        assert!(rank.is_main() && rank.owns(0) && rank.owns(7));
        assert_eq!(rank.sum(&[2.5]).unwrap(), vec![2.5]);
    }
}
