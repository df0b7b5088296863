//! `microdit info`: the architecture and its parameter count, without allocating weights.

use anyhow::Result;

use super::ModelArgs;
use crate::model::params::param_breakdown;

pub fn run(args: &ModelArgs) -> Result<()> {
    let cfg = args.config()?;
    let parts = param_breakdown(&cfg);
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    let name = args
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| args.preset.clone());
    println!("{name}: {total} parameters ({:.1} M)", total as f64 / 1e6);
    println!(
        "  latents {}x{}x{} -> {} patches of {}x{}; width {}, {} backbone blocks ({} with experts), {} patch-mixer blocks of width {}",
        cfg.in_channels, cfg.input_size, cfg.input_size, cfg.num_tokens(), cfg.patch_size, cfg.patch_size,
        cfg.dim, cfg.depth, cfg.backbone_blocks().iter().filter(|b| b.moe).count(),
        cfg.mixer_blocks().len(), cfg.mixer_width(),
    );
    for (part, n) in &parts {
        println!(
            "  {part:<26} {n:>14}  {:>5.1}%",
            100.0 * *n as f64 / total as f64
        );
    }
    Ok(())
}
