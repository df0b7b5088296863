//! `open_clip_config.json`, as open_clip writes it beside Hub weights: one reader for the
//! text tower (`text/clip.rs`) and the CLIP-score vision tower (`eval/clip.rs`). Options
//! that change what a tower computes are checked against the values our towers implement,
//! so an unsupported variant is an error naming the option, never a silently wrong model.

use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The file, every section kept as given; each tower reads (and checks) its own.
#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipConfig {
    pub model_cfg: ModelCfg,
    #[serde(default)]
    pub preprocess_cfg: PreprocessCfg,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelCfg {
    /// The shared embedding size (needed by the vision tower's projection).
    pub embed_dim: Option<usize>,
    /// `x * sigmoid(1.702 x)` instead of GELU, in both towers.
    #[serde(default)]
    pub quick_gelu: bool,
    pub text_cfg: Map<String, Value>,
    pub vision_cfg: Option<Map<String, Value>>,
}

/// open_clip's eval transform settings.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PreprocessCfg {
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub interpolation: Option<String>,
    pub resize_mode: Option<String>,
}

impl OpenClipConfig {
    pub fn read(path: &Path) -> Result<Self> {
        crate::io::read_json(path, "an open_clip config (model_cfg with text_cfg)")
    }
}

/// The text options that change `encode_text` beyond the tower microdit runs, at the
/// values it implements.
const TEXT_DEFAULTS: &[(&str, &str)] = &[
    ("pool_type", "\"argmax\""),
    ("proj_type", "\"linear\""),
    ("proj_bias", "false"),
    ("embed_cls", "false"),
    ("no_causal_mask", "false"),
    ("hf_model_name", "null"),
];
/// Text options that do not change the tower's outputs.
const TEXT_IGNORED: &[&str] = &[
    "ls_init_value",
    "pad_id",
    "hf_tokenizer_name",
    "tokenizer_kwargs",
    "output_tokens",
];

/// Refuses any text option the tower does not implement; `known` are the ones it reads.
pub fn check_text_options(text_cfg: &Map<String, Value>, known: &[&str]) -> Result<()> {
    check_options("text_cfg", text_cfg, TEXT_DEFAULTS, TEXT_IGNORED, known)
}

/// Each of `given` must be one the tower reads (`known`), irrelevant to it (`ignored`),
/// at its implemented value (`defaults`), or an unknown option switched off.
pub fn check_options(
    what: &str,
    given: &Map<String, Value>,
    defaults: &[(&str, &str)],
    ignored: &[&str],
    known: &[&str],
) -> Result<()> {
    for (key, value) in given {
        if known.contains(&key.as_str()) || ignored.contains(&key.as_str()) {
            continue;
        }
        match defaults.iter().find(|(k, _)| k == key) {
            Some((_, default))
                if serde_json::from_str::<Value>(default).ok().as_ref() == Some(value) => {}
            Some(_) => bail!(
                "{what} option {key} = {value} is not supported (only {default_list})",
                default_list = defaults
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            // An option this tower does not know is fine while it is switched off.
            None if value.is_null() || value == &Value::Bool(false) => {}
            None => bail!("{what} option {key} = {value} is not supported"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::ClipTextConfig;

    fn text_config(extra: &str) -> Result<ClipTextConfig> {
        let json = format!(
            r#"{{"model_cfg": {{"quick_gelu": true, "text_cfg": {{"width": 64, "heads": 4,
                "layers": 2{extra}}}}}}}"#
        );
        ClipTextConfig::from_config(&serde_json::from_str(&json)?)
    }

    #[test]
    fn the_text_tower_refuses_options_it_does_not_implement() {
        let cfg = text_config(r#", "pad_id": 0, "embed_cls": false, "xattn": null"#).unwrap();
        assert_eq!((cfg.width, cfg.heads, cfg.context_length), (64, 4, 77));
        assert!(cfg.quick_gelu);
        for (extra, says) in [
            (
                r#", "no_causal_mask": true"#,
                "no_causal_mask = true is not supported",
            ),
            (r#", "pool_type": "first""#, "pool_type"),
            (
                r#", "some_new_option": 3"#,
                "some_new_option = 3 is not supported",
            ),
            (r#", "width": "wide""#, "text_cfg"),
        ] {
            let error = format!("{:#}", text_config(extra).unwrap_err());
            assert!(error.contains(says), "{extra}: {error}");
        }
    }
}
