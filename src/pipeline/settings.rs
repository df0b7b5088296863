//! Everything that determines a generated image, as one struct: what `generate` takes, what
//! it writes into the PNG's text chunks (one chunk per field, so the image documents
//! itself), and what `--from-png` reads back. Unknown fields and unparsable values are
//! errors, never silent defaults.

use anyhow::{Context, Result};
use serde::de::value::MapDeserializer;
use serde::{Deserialize, Serialize};

use crate::edm::{Churn, Solver};
use crate::model::Precision;
use crate::pipeline::load::Parts;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    pub prompt: String,
    #[serde(with = "text")]
    pub seed: u64,
    #[serde(with = "text")]
    pub steps: usize,
    /// Classifier-free guidance scale (1 = none).
    #[serde(with = "text")]
    pub guidance: f64,
    /// Guide only while the noise level σ is within `[lo, hi]` (Kynkäänniemi et al. 2024).
    #[serde(default, with = "interval", skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<(f64, f64)>,
    pub sampler: Solver,
    #[serde(with = "text")]
    pub s_churn: f64,
    #[serde(with = "text")]
    pub s_min: f64,
    #[serde(with = "text")]
    pub s_max: f64,
    #[serde(with = "text")]
    pub s_noise: f64,
    /// Image side in pixels.
    #[serde(with = "text")]
    pub resolution: usize,
    /// The denoiser's weights: a file, a training run folder, or OWNER/REPO/PATH on the Hub.
    pub checkpoint: String,
    /// Its architecture: a preset or a config file.
    pub model: String,
    /// The latent codec: a VAE directory or Hub repository, or `space-to-depth:F`.
    pub vae: String,
    /// The OpenCLIP text tower: a directory or Hub repository.
    pub text_encoder: String,
    /// The denoiser's precision.
    #[serde(default)]
    pub dtype: Precision,
    /// The program that made the image (written, not checked).
    #[serde(default)]
    pub software: String,
}

impl GenerationSettings {
    /// The models these settings name (an empty `vae`: chosen by the checkpoint).
    pub fn parts(&self) -> Parts {
        Parts {
            checkpoint: self.checkpoint.clone(),
            model: self.model.clone(),
            vae: (!self.vae.is_empty()).then(|| self.vae.clone()),
            text_encoder: self.text_encoder.clone(),
            resolution: self.resolution,
            dtype: self.dtype,
        }
    }

    pub fn churn(&self) -> Churn {
        Churn {
            s_churn: self.s_churn,
            s_min: self.s_min,
            s_max: self.s_max,
            s_noise: self.s_noise,
        }
    }

    /// The PNG text chunks: one per field, its value as text.
    pub fn to_png_text(&self) -> Result<Vec<(String, String)>> {
        let value = serde_json::to_value(self)?;
        let fields = value.as_object().context("settings serialise to a map")?;
        Ok(fields
            .iter()
            .map(|(k, v)| {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                (k.clone(), text)
            })
            .collect())
    }

    /// The settings in a PNG's text chunks (as [`Self::to_png_text`] writes them).
    pub fn from_png_text(chunks: Vec<(String, String)>) -> Result<Self> {
        Self::deserialize(MapDeserializer::<_, serde::de::value::Error>::new(
            chunks.into_iter(),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// A value stored as its `Display` text and parsed back with `FromStr`.
mod text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| D::Error::custom(format!("'{text}': {e}")))
    }
}

/// `Option<(lo, hi)>` as the text `"lo hi"`.
mod interval {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<(f64, f64)>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some((lo, hi)) => s.collect_str(&format!("{lo} {hi}")),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, f64)>, D::Error> {
        let text = String::deserialize(d)?;
        let values: Vec<f64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| D::Error::custom(format!("guidance_interval '{text}': {e}")))?;
        match values.as_slice() {
            [lo, hi] => Ok(Some((*lo, *hi))),
            _ => Err(D::Error::custom(format!(
                "guidance_interval '{text}': expected two numbers"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> GenerationSettings {
        GenerationSettings {
            prompt: "7".into(),
            seed: 3,
            steps: 30,
            guidance: 5.0,
            guidance_interval: Some((0.28, 5.42)),
            sampler: Solver::Euler,
            s_churn: 0.0,
            s_min: 0.0,
            s_max: f64::INFINITY,
            s_noise: 1.0,
            resolution: 512,
            checkpoint: "dit.pt".into(),
            model: "MicroDiT_XL_2".into(),
            vae: "space-to-depth:2".into(),
            text_encoder: "tower".into(),
            dtype: Precision::Bf16,
            software: "microdit".into(),
        }
    }

    #[test]
    fn png_text_round_trips_every_field() {
        let settings = example();
        let text = settings.to_png_text().unwrap();
        assert!(text.contains(&("prompt".into(), "7".into())));
        assert!(text.contains(&("s_max".into(), "inf".into())));
        assert!(text.contains(&("sampler".into(), "euler".into())));
        assert_eq!(GenerationSettings::from_png_text(text).unwrap(), settings);
    }

    #[test]
    fn unknown_and_invalid_values_are_errors() {
        let text = example().to_png_text().unwrap();
        let with = |key: &str, value: &str| {
            let mut t = text.clone();
            t.retain(|(k, _)| k != key);
            t.push((key.into(), value.into()));
            GenerationSettings::from_png_text(t)
                .unwrap_err()
                .to_string()
        };
        assert!(with("sampler", "dpm").contains("unknown variant `dpm`"));
        assert!(with("steps", "many").contains("'many'"));
        assert!(with("guidance_interval", "1").contains("two numbers"));
        assert!(with("colour", "red").contains("unknown field `colour`"));
        let mut missing = text.clone();
        missing.retain(|(k, _)| k != "seed");
        assert!(GenerationSettings::from_png_text(missing)
            .unwrap_err()
            .to_string()
            .contains("missing field `seed`"));
    }
}
