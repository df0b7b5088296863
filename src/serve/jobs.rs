//! Jobs: what a client asks for (checked before it is queued), what state a job is in, and
//! the store that holds them, a bounded queue in front of the model worker, and the
//! finished jobs' images (the oldest forgotten beyond a limit).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::pipeline::Sampling;

/// `POST /v1/jobs`: a prompt, a seed, an image count and size, and `generate`'s sampling
/// settings by their option names (`steps`, `sampler`, …); absent settings take the
/// server's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobRequest {
    pub prompt: String,
    #[serde(default)]
    pub seed: u64,
    pub resolution: Option<usize>,
    #[serde(default = "one_image")]
    pub num_images: usize,
    /// Everything else: changes to the default [`Sampling`] (unknown names are refused
    /// when they are applied).
    #[serde(flatten)]
    pub sampling: serde_json::Map<String, serde_json::Value>,
}

fn one_image() -> usize {
    1
}

/// What a job does, every setting decided: the request with the server's defaults in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSpec {
    pub prompt: String,
    pub seed: u64,
    pub resolution: usize,
    pub num_images: usize,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl JobSpec {
    /// Jobs whose batches can run together: the same sampling at the same size.
    pub fn same_batch(&self, other: &Self) -> bool {
        self.sampling == other.sampling && self.resolution == other.resolution
    }
}

/// A job's state, as `GET /v1/jobs/{id}` and its event stream report it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running { step: usize, steps: usize },
    Done { images: Vec<String> },
    Failed { error: String },
    Cancelled,
}

impl JobState {
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Done { .. } | Self::Failed { .. } | Self::Cancelled
        )
    }
}

pub type JobId = String;

pub struct Job {
    pub spec: JobSpec,
    pub state: watch::Sender<JobState>,
    /// PNG files, once done.
    pub images: Vec<Vec<u8>>,
}

/// Why a job was not taken.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    QueueFull(usize),
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<JobId, Job>,
    queue: VecDeque<JobId>,
    /// Finished jobs, oldest first (forgotten beyond `keep_finished`).
    finished: VecDeque<JobId>,
    next_id: u64,
    closed: bool,
}

/// The jobs and the queue, shared by the HTTP handlers and the model worker.
pub struct Store {
    inner: Mutex<Inner>,
    work: Condvar,
    capacity: usize,
    keep_finished: usize,
    /// Distinguishes this server's job ids from another run's.
    salt: u64,
}

impl Store {
    pub fn new(capacity: usize, keep_finished: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            work: Condvar::new(),
            capacity,
            keep_finished,
            salt: rand::random(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job, unless the queue is full.
    pub fn submit(&self, spec: JobSpec) -> Result<JobId, Refusal> {
        let mut inner = self.lock();
        if inner.queue.len() >= self.capacity {
            return Err(Refusal::QueueFull(self.capacity));
        }
        inner.next_id += 1;
        let id = format!("{:08x}{:08x}", self.salt as u32, inner.next_id);
        let (state, _) = watch::channel(JobState::Queued);
        inner.jobs.insert(
            id.clone(),
            Job {
                spec,
                state,
                images: Vec::new(),
            },
        );
        inner.queue.push_back(id.clone());
        self.work.notify_one();
        Ok(id)
    }

    pub fn state(&self, id: &str) -> Option<JobState> {
        self.lock().jobs.get(id).map(|j| j.state.borrow().clone())
    }

    pub fn spec(&self, id: &str) -> Option<JobSpec> {
        self.lock().jobs.get(id).map(|j| j.spec.clone())
    }

    /// The job's position in the queue (0 = next), if queued.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.lock().queue.iter().position(|q| q == id)
    }

    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<JobState>> {
        self.lock().jobs.get(id).map(|j| j.state.subscribe())
    }

    pub fn image(&self, id: &str, k: usize) -> Option<Vec<u8>> {
        self.lock().jobs.get(id)?.images.get(k).cloned()
    }

    /// Cancels a queued job at once, a running one at its next step. `None`: unknown job.
    pub fn cancel(&self, id: &str) -> Option<JobState> {
        let mut inner = self.lock();
        let state = inner.jobs.get(id)?.state.borrow().clone();
        if state.is_final() {
            return Some(state);
        }
        inner.queue.retain(|q| q != id);
        self.finish(&mut inner, id, JobState::Cancelled, Vec::new());
        Some(JobState::Cancelled)
    }

    fn finish(&self, inner: &mut Inner, id: &str, state: JobState, images: Vec<Vec<u8>>) {
        let Some(job) = inner.jobs.get_mut(id) else {
            return;
        };
        if job.state.borrow().is_final() {
            return;
        }
        job.images = images;
        job.state.send_replace(state);
        inner.finished.push_back(id.to_string());
        while inner.finished.len() > self.keep_finished {
            if let Some(old) = inner.finished.pop_front() {
                inner.jobs.remove(&old);
            }
        }
    }

    /// For the worker: waits for the next job, then takes it and the queued jobs that can
    /// share its batch, up to `max_images` images in all; `None` once the store is closed.
    pub fn next_batch(&self, max_images: usize) -> Option<Vec<(JobId, JobSpec)>> {
        let mut inner = self.lock();
        while inner.queue.is_empty() && !inner.closed {
            inner = self.work.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        let first_id = inner.queue.pop_front()?;
        let first = inner.jobs.get(&first_id)?.spec.clone();
        let mut images = first.num_images;
        let mut batch = vec![(first_id, first.clone())];
        let mut k = 0;
        while k < inner.queue.len() {
            let id = inner.queue[k].clone();
            let spec = inner.jobs.get(&id).map(|j| j.spec.clone());
            match spec {
                Some(spec) if spec.same_batch(&first) && images + spec.num_images <= max_images => {
                    images += spec.num_images;
                    inner.queue.remove(k);
                    batch.push((id, spec));
                }
                _ => k += 1,
            }
        }
        for (id, spec) in &batch {
            if let Some(job) = inner.jobs.get(id) {
                job.state.send_replace(JobState::Running {
                    step: 0,
                    steps: spec.sampling.steps,
                });
            }
        }
        Some(batch)
    }

    /// For the worker: a running job's progress; `false` if it was cancelled meanwhile.
    pub fn progress(&self, id: &str, step: usize, steps: usize) -> bool {
        let inner = self.lock();
        let Some(job) = inner.jobs.get(id) else {
            return false;
        };
        if job.state.borrow().is_final() {
            return false;
        }
        job.state.send_replace(JobState::Running { step, steps });
        true
    }

    pub fn complete(&self, id: &str, images: Vec<Vec<u8>>) {
        let urls = (0..images.len())
            .map(|k| format!("/v1/jobs/{id}/images/{k}.png"))
            .collect();
        let mut inner = self.lock();
        self.finish(&mut inner, id, JobState::Done { images: urls }, images);
    }

    pub fn fail(&self, id: &str, error: String) {
        let mut inner = self.lock();
        self.finish(&mut inner, id, JobState::Failed { error }, Vec::new());
    }

    /// Wakes the worker to stop.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    /// (queued jobs, jobs held)
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.queue.len(), inner.jobs.len())
    }
}
