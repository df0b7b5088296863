//! Host synchronisations, counted. Each read of a device value by the host waits for the
//! GPU to finish everything queued before it, so a training step should make only those
//! whose figures the trainer logs (each micro-batch's loss, the gradient norm).
//! Every such read microdit makes goes through [`scalar`] or [`record`]; `microdit bench`
//! reports the count per step, and `bench/gpu_check.sh` records it. Waits inside burn or
//! cubecl that microdit does not ask for (autotuning on a first step) are not seen here.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::prelude::*;
use burn::tensor::ElementConversion;

static HOST_SYNCS: AtomicU64 = AtomicU64::new(0);

/// Notes one host synchronisation made outside [`scalar`].
pub fn record() {
    HOST_SYNCS.fetch_add(1, Ordering::Relaxed);
}

/// How many host synchronisations this process has made so far.
pub fn count() -> u64 {
    HOST_SYNCS.load(Ordering::Relaxed)
}

/// A one-element tensor's value on the host (one synchronisation).
pub fn scalar<B: Backend>(value: Tensor<B, 1>) -> f64 {
    record();
    value.into_scalar().elem::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_value_counts_one_synchronisation() {
        let device = Default::default();
        let value = Tensor::<crate::backend::Cpu, 1>::from_floats([2.5], &device);
        let before = count();
        assert_eq!(scalar(value), 2.5);
        // Other tests in this process may read too: at least ours was counted.
        assert!(count() > before);
    }
}
