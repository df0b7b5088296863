//! NCCL, the collective library PyTorch's DDP runs on, for the CUDA backend: sums a
//! data-parallel launch's gradient buckets where they lie, in GPU memory, over NVLink,
//! PCIe or the network (whatever NCCL finds between the ranks).
//!
//! `libnccl.so` is loaded at run time (cudarc's dynamic loading), so building needs no
//! CUDA toolkit. NCCL runs on a stream of microdit's own and is ordered against cubecl's
//! queue from the host: wait for cubecl, start the all-reduce, poll it to completion. That
//! is one host wait per bucket; polling (not blocking) lets a rank that never arrives end
//! the job after the launch's `--timeout`, as the MPI engine does, instead of hanging it.
//!
//! Ranks join with the 128-byte unique id that rank 0 draws ([`unique_id`]) and the launcher
//! passes to all of them (`train::distributed` broadcasts it over MPI).

use std::ffi::{c_void, CStr};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::driver::{result as driver, sys as driver_sys};
use cudarc::nccl::{result as nccl, sys, NcclType};

/// The id every rank of one group joins with.
pub type UniqueId = [u8; 128];

/// Whether `libnccl.so` loads; the error says what to install when it does not.
pub fn check_library() -> Result<()> {
    // SAFETY: only probes whether the shared library can be opened.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    bail!(
        "NCCL (libnccl.so) was not found on the library path: install NVIDIA's NCCL \
         (Debian/Ubuntu: libnccl2 and libnccl-dev; or the nvidia-nccl-cu12/-cu13 wheel, then \
         link its libnccl.so.2 as libnccl.so) and add its folder to LD_LIBRARY_PATH"
    )
}

/// A fresh id for a new group (drawn once, on rank 0).
pub fn unique_id() -> Result<UniqueId> {
    check_library()?;
    let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e.0))?;
    Ok(id.internal.map(|c| c as u8))
}

fn nccl_error(call: &str, code: sys::ncclResult_t) -> anyhow::Error {
    // SAFETY: NCCL returns a static NUL-terminated string for every result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(code)) };
    anyhow::anyhow!("{call} failed: {}", text.to_string_lossy())
}

/// This process's member of an NCCL group, on one GPU.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: driver_sys::CUstream,
    context: driver_sys::CUcontext,
    pub rank: usize,
    pub world: usize,
    /// How long a collective may wait for the other ranks before this process gives up.
    timeout: Duration,
}

impl NcclComm {
    /// Joins group `id` as `rank` of `world` on GPU `device` (blocks until every rank has).
    pub fn join(
        device: usize,
        rank: usize,
        world: usize,
        id: &UniqueId,
        timeout: Duration,
    ) -> Result<Self> {
        check_library()?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let (context, stream) = super::cuda_runtime::own_stream(device)?;
        // SAFETY: NCCL's initialisation with a valid id, on the context made current above.
        unsafe {
            let mut comm = std::ptr::null_mut();
            nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32)
                .map_err(|e| nccl_error("ncclCommInitRank", e.0))?;
            Ok(Self {
                comm,
                stream,
                context,
                rank,
                world,
                timeout,
            })
        }
    }

    /// `buffer` (f32 on this comm's GPU) summed over the group, in place.
    pub fn sum_tensor(&self, buffer: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>> {
        ensure!(
            buffer.dtype == DType::F32,
            "NCCL sums f32 gradient buffers, not {:?}",
            buffer.dtype
        );
        let buffer = into_contiguous(buffer);
        let count = buffer.meta.shape().num_elements();
        let client = buffer.client.clone();
        cubecl::future::block_on(client.sync())
            .map_err(|e| anyhow::anyhow!("CUDA device sync: {e:?}"))?;
        let ptr = client
            .get_resource(buffer.handle.clone())
            .map_err(|e| anyhow::anyhow!("gradient buffer memory: {e:?}"))?
            .resource()
            .ptr;
        // SAFETY: `ptr` is a live, contiguous cubecl allocation of `count` f32, and
        // cubecl's queue has finished writing it (synchronised above).
        unsafe { self.all_reduce(ptr, count, f32::as_nccl_type())? };
        Ok(buffer)
    }

    /// Host `values` summed over the group (a step's status: a few numbers).
    pub fn sum_host<T: NcclType + Copy>(&self, values: &mut [T]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        // SAFETY: a device buffer of exactly `values`' bytes, freed before returning.
        unsafe {
            driver::ctx::set_current(self.context).context("CUDA context")?;
            let bytes = std::mem::size_of_val(values);
            let device = driver::malloc_sync(bytes).context("CUDA allocation")?;
            let summed = driver::memcpy_htod_sync(device, values)
                .context("copy to the GPU")
                .and_then(|()| self.all_reduce(device, values.len(), T::as_nccl_type()))
                .and_then(|()| driver::memcpy_dtoh_sync(values, device).context("copy back"));
            driver::free_sync(device).context("CUDA free")?;
            summed
        }
    }

    /// In-place sum of `count` elements at `ptr`, run to completion.
    ///
    /// # Safety
    /// `ptr` is a device address on this comm's GPU holding `count` elements of `kind`,
    /// not written by anything else until this returns.
    unsafe fn all_reduce(&self, ptr: u64, count: usize, kind: sys::ncclDataType_t) -> Result<()> {
        driver::ctx::set_current(self.context).context("CUDA context")?;
        let ptr = ptr as *mut c_void;
        nccl::all_reduce(
            ptr,
            ptr,
            count,
            kind,
            sys::ncclRedOp_t::ncclSum,
            self.comm,
            self.stream as _,
        )
        .map_err(|e| nccl_error("ncclAllReduce", e.0))?;
        self.wait()
    }

    /// Polls the stream until the collective is done; past the deadline, aborts the
    /// communicator and ends the process (a collective cannot be cancelled, and every
    /// later one would hang too), which makes the launcher stop the other ranks.
    fn wait(&self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: a stream this comm created and never destroys.
            match unsafe { driver_sys::cuStreamQuery(self.stream) } {
                driver_sys::CUresult::CUDA_SUCCESS => return Ok(()),
                driver_sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => bail!("the NCCL all-reduce failed on the GPU: {e:?}"),
            }
            let mut status = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a result to write.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut status) };
            if !matches!(
                status,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                bail!(nccl_error("NCCL (asynchronously)", status));
            }
            if Instant::now() > deadline {
                eprintln!(
                    "error: rank {} of {}: the other ranks did not answer within {} s \
                     (one died or hangs); stopping",
                    self.rank,
                    self.world,
                    self.timeout.as_secs()
                );
                // SAFETY: the communicator is not used again: the process ends.
                let _ = unsafe { nccl::comm_abort(self.comm) };
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: every collective was waited for, so nothing is in flight.
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
            let _ = driver::stream::destroy(self.stream);
        }
    }
}
