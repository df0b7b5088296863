//! `microdit serve`: load a model once and serve a web page and a JSON API on this machine
//! (see `crate::serve`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::PipelineArgs;
use crate::backend::MicroditBackend;
use crate::hub::Hub;
use crate::pipeline::SamplingArgs;
use crate::pipeline::TextToImage;
use crate::serve::worker::ModelRecord;
use crate::serve::{serve, Limits, ServerOptions};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The defaults of requests that do not say (each request may change any of them).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// A folder where `microdit train` or `microdit demo` trained a model: its newest
    /// checkpoint (of the last stage) is served, with the parts its pipeline.json names.
    #[arg(long, conflicts_with = "checkpoint")]
    pub run: Option<PathBuf>,
    /// Address to listen on; anything but loopback needs --token.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free one, printed at start).
    #[arg(long, default_value_t = 8188)]
    pub port: u16,
    /// A secret every request must carry (`Authorization: Bearer TOKEN`, or `?token=TOKEN`
    /// for the page).
    #[arg(long, env = "MICRODIT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Jobs that may wait at once; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Images sampled together at most (jobs with the same settings share a batch).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Finished jobs kept (with their images) for clients to fetch.
    #[arg(long, default_value_t = 256)]
    pub keep_jobs: usize,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let mut pipeline_args = args.pipeline.clone();
    if let Some(run) = &args.run {
        pipeline_args.checkpoint = Some(run.display().to_string());
    }
    anyhow::ensure!(
        args.queue > 0 && args.max_batch > 0 && args.keep_jobs > 0,
        "--queue, --max-batch and --keep-jobs must be positive"
    );
    let components = pipeline_args.components()?;
    let parts = components.parts(pipeline_args.dtype)?;
    let default_sampling = args.sampling.over(&components.sampling())?;
    let options = ServerOptions {
        addr: SocketAddr::new(args.host, args.port),
        token: args.token.clone().filter(|t| !t.is_empty()),
        queue: args.queue,
        keep_jobs: args.keep_jobs,
        max_batch: args.max_batch,
    };
    crate::with_backend!(pipeline_args.device, |Bk, device| {
        let pipeline = TextToImage::<Bk>::load(&parts, &Hub::from_env(), &device)
            .context("loading the model")?;
        let example = components.example_prompt.clone().unwrap_or_default();
        start::<Bk>(pipeline, &parts, default_sampling, example, options)
    })
}

fn start<B: MicroditBackend>(
    pipeline: TextToImage<B>,
    parts: &crate::pipeline::load::Parts,
    default_sampling: crate::pipeline::Sampling,
    example_prompt: String,
    options: ServerOptions,
) -> Result<()> {
    let unit = pipeline.to_image.codec.downscale() * pipeline.to_image.dit.patch_size;
    let resolution = pipeline.to_image.resolution();
    let limits = Limits {
        default_sampling,
        example_prompt,
        default_resolution: resolution,
        resolution_multiple: unit,
        max_resolution: 2 * resolution,
        max_steps: crate::pipeline::settings::MAX_STEPS,
        max_images: options.max_batch,
    };
    let record = ModelRecord {
        checkpoint: parts.checkpoint.clone(),
        model: parts.model.clone(),
        vae: pipeline.to_image.codec.name(),
        text_encoder: parts.text_encoder.clone(),
        dtype: parts.dtype,
    };
    serve(pipeline, record, limits, options)
}
