//! `microdit serve`: the model loaded once behind a local web page and a JSON API.
//!
//! - `GET /`: the page (`page.html`, plain HTML and JavaScript served by the binary);
//! - `GET /v1/info`: the model, the default settings and the limits;
//! - `POST /v1/jobs`: a prompt and `generate`'s settings (same names) → 202 `{"id": …}`,
//!   429 when the queue is full, 4xx with `{"error": …}` for a bad request;
//! - `GET /v1/jobs/{id}`: its state (`queued`, `running` with the step, `done` with image
//!   URLs, `failed` with the reason, `cancelled`); `GET /v1/jobs/{id}/events`: the same as
//!   server-sent events until it ends; `GET /v1/jobs/{id}/images/{k}.png`; `DELETE
//!   /v1/jobs/{id}` cancels it.
//!
//! One model worker thread (`worker.rs`) serves a bounded queue (`jobs.rs`). With a token,
//! every request must carry it (`Authorization: Bearer …` or `?token=…`); binding to
//! anything but loopback requires one.

pub mod jobs;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde::Serialize;
use serde_json::json;

use crate::backend::MicroditBackend;
use crate::pipeline::{Sampling, TextToImage};
use crate::text::ClipTokenizer;
use jobs::{JobRequest, JobSpec, JobState, Refusal, Store};
use worker::{ModelRecord, Worker};

const PAGE: &str = include_str!("page.html");

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub addr: SocketAddr,
    /// Required on every request when set; required to bind beyond loopback.
    pub token: Option<String>,
    /// Jobs waiting at most (more are refused with 429).
    pub queue: usize,
    /// Finished jobs (and their images) kept for clients to fetch.
    pub keep_jobs: usize,
    /// Images sampled together at most.
    pub max_batch: usize,
}

/// Default settings and what a request may ask for (sampling limits: [`Sampling::validate`]).
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    pub default_sampling: Sampling,
    /// A prompt of the kind the model knows (the page's placeholder).
    pub example_prompt: String,
    pub default_resolution: usize,
    /// Resolutions must be multiples of this (latent downscale × patch size).
    pub resolution_multiple: usize,
    pub max_resolution: usize,
    pub max_steps: usize,
    pub max_images: usize,
}

struct App {
    store: Arc<Store>,
    limits: Limits,
    tokenizer: ClipTokenizer,
    token: Option<String>,
    model: ModelRecord,
}

/// Serves until Ctrl-C.
pub fn serve<B: MicroditBackend>(
    pipeline: TextToImage<B>,
    record: ModelRecord,
    limits: Limits,
    options: ServerOptions,
) -> Result<()> {
    if !options.addr.ip().is_loopback() && options.token.is_none() {
        bail!(
            "serving on {} (beyond this machine) needs a token: pass --token or set MICRODIT_TOKEN",
            options.addr
        );
    }
    let tokenizer = ClipTokenizer::new().with_context_length(pipeline.text.config.context_length);
    let store = Store::new(options.queue, options.keep_jobs);
    let worker = Worker::new(pipeline, record.clone(), store.clone(), options.max_batch);
    let worker = std::thread::Builder::new()
        .name("microdit-model".into())
        .spawn(move || worker.run())?;
    let app = Arc::new(App {
        store: store.clone(),
        limits,
        tokenizer,
        token: options.token.clone(),
        model: record,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(options.addr)
            .await
            .with_context(|| format!("listening on {}", options.addr))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serving {} on http://{addr}/ (queue {}, batches of up to {} images; Ctrl-C stops)",
            app.model.checkpoint, options.queue, options.max_batch
        );
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    });
    store.close();
    let _ = worker.join();
    served
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/v1/info", get(info))
        .route("/v1/jobs", axum::routing::post(submit))
        .route("/v1/jobs/{id}", get(status).delete(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/images/{file}", get(image))
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app)
}

/// A JSON error with its status.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Every request carries the token when there is one.
async fn authorize(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(token) = &app.token else {
        return next.run(request).await;
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = request.uri().query().unwrap_or("");
    let in_query = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("token="))
        .next();
    let given = bearer.or(in_query).unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        next.run(request).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "this server needs its token: 'Authorization: Bearer TOKEN' or ?token=TOKEN",
        )
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn info(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let (queued, held) = app.store.counts();
    Json(json!({
        "model": {
            "checkpoint": app.model.checkpoint,
            "model": app.model.model,
            "vae": app.model.vae,
            "text_encoder": app.model.text_encoder,
            "dtype": app.model.dtype,
        },
        "limits": app.limits,
        "queued": queued,
        "jobs_held": held,
    }))
}

/// The request with the server's defaults, or why it cannot be served.
fn resolve(app: &App, r: JobRequest) -> Result<JobSpec, String> {
    let l = &app.limits;
    let (ids, truncated) = app.tokenizer.tokenize(&r.prompt);
    if truncated {
        return Err(format!(
            "the prompt is longer than the text tower's {} tokens",
            ids.len()
        ));
    }
    let sampling = l
        .default_sampling
        .with(r.sampling)
        .map_err(|e| e.to_string())?;
    let spec = JobSpec {
        prompt: r.prompt,
        seed: r.seed,
        resolution: r.resolution.unwrap_or(l.default_resolution),
        num_images: r.num_images,
        sampling,
    };
    let unit = l.resolution_multiple;
    let checks = [
        (
            spec.resolution.is_multiple_of(unit)
                && (2 * unit..=l.max_resolution).contains(&spec.resolution),
            format!(
                "resolution must be a multiple of {unit} from {} to {}",
                2 * unit,
                l.max_resolution
            ),
        ),
        (
            (1..=l.max_images).contains(&spec.num_images),
            format!("num_images must be 1 to {}", l.max_images),
        ),
    ];
    match checks.into_iter().find(|(ok, _)| !ok) {
        Some((_, why)) => Err(why),
        None => Ok(spec),
    }
}

async fn submit(
    State(app): State<Arc<App>>,
    request: Result<Json<JobRequest>, JsonRejection>,
) -> Response {
    let request = match request {
        Ok(Json(r)) => r,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let spec = match resolve(&app, request) {
        Ok(spec) => spec,
        Err(why) => return error(StatusCode::UNPROCESSABLE_ENTITY, why),
    };
    match app.store.submit(spec) {
        Ok(id) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "id": id,
                "status_url": format!("/v1/jobs/{id}"),
                "events_url": format!("/v1/jobs/{id}/events"),
            })),
        )
            .into_response(),
        Err(Refusal::QueueFull(n)) => error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("the queue is full ({n} jobs waiting): try again later"),
        ),
    }
}

fn unknown(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no job {id} (finished jobs are kept for a while, then forgotten)"),
    )
}

/// A job's state with its id, settings and queue position.
fn report(app: &App, id: &str, state: &JobState) -> serde_json::Value {
    let mut value = serde_json::to_value(state).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields.insert("id".into(), json!(id));
        fields.insert("settings".into(), json!(app.store.spec(id)));
        if let Some(position) = app.store.position(id) {
            fields.insert("position".into(), json!(position));
        }
    }
    value
}

async fn status(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.store.state(&id) {
        Some(state) => Json(report(&app, &id, &state)).into_response(),
        None => unknown(&id),
    }
}

async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.store.cancel(&id) {
        Some(state) => Json(report(&app, &id, &state)).into_response(),
        None => unknown(&id),
    }
}

async fn events(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let Some(receiver) = app.store.subscribe(&id) else {
        return unknown(&id);
    };
    Sse::new(state_events(app, id, receiver))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Where a job's event stream stands.
struct Watching {
    receiver: tokio::sync::watch::Receiver<JobState>,
    first: bool,
    /// The last progress sent, `(step, steps)`.
    progress: Option<(usize, usize)>,
    /// `done`, held back while the last step is reported first.
    pending: Option<JobState>,
}

impl Watching {
    /// The next state to report, `None` when the job is gone.
    async fn next(&mut self) -> Option<JobState> {
        if let Some(done) = self.pending.take() {
            return Some(done);
        }
        if !std::mem::take(&mut self.first) && self.receiver.changed().await.is_err() {
            return None;
        }
        let state = self.receiver.borrow_and_update().clone();
        // The channel keeps only the newest state, so "done" can overtake the last step's
        // report: a finished job reports its last step first, whatever the timing.
        let state = match (&state, self.progress) {
            (JobState::Done { .. }, Some((step, steps))) if step < steps => {
                self.pending = Some(state);
                JobState::Running { step: steps, steps }
            }
            _ => state,
        };
        if let JobState::Running { step, steps } = state {
            self.progress = Some((step, steps));
        }
        Some(state)
    }
}

impl Watching {
    fn new(receiver: tokio::sync::watch::Receiver<JobState>) -> Self {
        Self {
            receiver,
            first: true,
            progress: None,
            pending: None,
        }
    }
}

/// The job's current state, then each change, ending after a final state. Progress
/// reports may merge (the newest wins), but a job that finishes reports its last step
/// before `done`.
fn state_events(
    app: Arc<App>,
    id: String,
    receiver: tokio::sync::watch::Receiver<JobState>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(Some(Watching::new(receiver)), move |watching| {
        let (app, id) = (app.clone(), id.clone());
        async move {
            let mut watching = watching?;
            let state = watching.next().await?;
            let event = Event::default()
                .event("state")
                .json_data(report(&app, &id, &state))
                .ok()?;
            let next = (!state.is_final()).then_some(watching);
            Some((Ok(event), next))
        }
    })
}

async fn image(State(app): State<Arc<App>>, Path((id, file)): Path<(String, String)>) -> Response {
    let k = file
        .strip_suffix(".png")
        .and_then(|k| k.parse::<usize>().ok());
    let Some(png) = k.and_then(|k| app.store.image(&id, k)) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no image {file} of job {id}"),
        );
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, "image/png".parse().expect("mime"));
    let name = format!("inline; filename=\"microdit-{id}-{file}\"");
    if let Ok(value) = name.parse() {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    (headers, png).into_response()
}

#[cfg(test)]
mod tests {
    use super::{JobState, Watching};

    /// "done" sent right after the last step (the watch channel keeps only the newest): the
    /// last step is still reported, then "done"; a cancelled job reports no step it did
    /// not reach.
    #[tokio::test]
    async fn a_finished_job_reports_its_last_step_before_done() {
        let (sender, receiver) = tokio::sync::watch::channel(JobState::Queued);
        let mut watching = Watching::new(receiver);
        assert_eq!(watching.next().await, Some(JobState::Queued));
        sender.send_replace(JobState::Running { step: 1, steps: 4 });
        assert_eq!(
            watching.next().await,
            Some(JobState::Running { step: 1, steps: 4 })
        );
        sender.send_replace(JobState::Running { step: 4, steps: 4 });
        let done = JobState::Done { images: vec![] };
        sender.send_replace(done.clone());
        assert_eq!(
            watching.next().await,
            Some(JobState::Running { step: 4, steps: 4 })
        );
        assert_eq!(watching.next().await, Some(done));

        let (sender, receiver) =
            tokio::sync::watch::channel(JobState::Running { step: 2, steps: 4 });
        let mut watching = Watching::new(receiver);
        assert_eq!(
            watching.next().await,
            Some(JobState::Running { step: 2, steps: 4 })
        );
        sender.send_replace(JobState::Cancelled);
        assert_eq!(watching.next().await, Some(JobState::Cancelled));
    }
}
