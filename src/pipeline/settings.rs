//! Everything that determines a generated image, in two structs every caller shares:
//! [`Sampling`] (the sampler, its schedule, guidance and noise, with the one
//! [`Sampling::validate`] that `generate`, `serve`, `eval` and `--from-png` all apply) and
//! [`GenerationSettings`] (a prompt, a seed and the models around it). The settings are
//! what `generate` takes, what it writes into the PNG's text chunks (one chunk per field,
//! so the image documents itself), and what `--from-png` reads back. Unknown fields and
//! unparsable values are errors, never silent defaults.

use anyhow::{ensure, Context, Result};
use serde::de::value::MapDeserializer;
use serde::{Deserialize, Serialize};

use crate::edm::{Churn, Sampler};
use crate::model::Precision;
use crate::pipeline::load::Parts;

/// Sampler steps at most, for every caller (a 1,000-step run is already a reference
/// trajectory, not an image anyone waits for).
pub const MAX_STEPS: usize = 1000;
/// Guidance scales at most.
pub const MAX_GUIDANCE: f64 = 50.0;

/// How to sample: the solver on the Karras schedule, classifier-free guidance, and the
/// fresh noise of stochastic sampling. Numbers are JSON numbers (infinity the text `"inf"`)
/// and may be given as their text too, as PNG chunks hold them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Noise levels visited (network evaluations: see [`Sampling::evaluations`]).
    #[serde(with = "text")]
    pub steps: usize,
    /// Classifier-free guidance scale (1 = none).
    #[serde(with = "text")]
    pub guidance: f64,
    /// Guide only while the noise level σ is within `[lo, hi]` (Kynkäänniemi et al. 2024).
    #[serde(default, with = "interval", skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<(f64, f64)>,
    pub sampler: Sampler,
    /// Churn (Heun and Euler only): total extra noise (0 = deterministic) and the σ range
    /// it applies in.
    #[serde(with = "text")]
    pub s_churn: f64,
    #[serde(with = "text")]
    pub s_min: f64,
    #[serde(with = "text")]
    pub s_max: f64,
    /// Scale of the fresh noise (churn's, or the SDE sampler's).
    #[serde(with = "text")]
    pub s_noise: f64,
}

impl Default for Sampling {
    /// The reference's sampler: 30 deterministic Heun steps, guidance 5 at every level.
    fn default() -> Self {
        Self {
            steps: 30,
            guidance: 5.0,
            guidance_interval: None,
            sampler: Sampler::Heun,
            s_churn: 0.0,
            s_min: 0.0,
            s_max: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

impl Sampling {
    /// Deterministic Heun with guidance at every noise level.
    pub fn heun(steps: usize, guidance: f64) -> Self {
        Self {
            steps,
            guidance,
            ..Self::default()
        }
    }

    /// The limits every caller applies; the message names the field as its option does.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=MAX_STEPS).contains(&self.steps),
            "steps must be 1 to {MAX_STEPS}"
        );
        ensure!(
            self.guidance.is_finite() && (0.0..=MAX_GUIDANCE).contains(&self.guidance),
            "guidance must be between 0 and {MAX_GUIDANCE}"
        );
        ensure!(
            self.guidance_interval
                .is_none_or(|(lo, hi)| lo >= 0.0 && lo <= hi),
            "guidance_interval must be [lo, hi] with 0 ≤ lo ≤ hi"
        );
        ensure!(
            self.s_churn.is_finite() && self.s_churn >= 0.0,
            "s_churn must be a non-negative number"
        );
        ensure!(
            self.s_churn == 0.0 || self.sampler.churns(),
            "s_churn applies to the heun and euler samplers only"
        );
        ensure!(
            self.s_min >= 0.0 && self.s_min <= self.s_max,
            "s_min must be between 0 and s_max"
        );
        ensure!(
            self.s_noise.is_finite() && self.s_noise > 0.0,
            "s_noise must be positive"
        );
        Ok(())
    }

    /// These settings with some fields replaced, given as JSON values by name (a server
    /// request's or the command line's), then validated.
    pub fn with(&self, changes: serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let mut fields = match serde_json::to_value(self)? {
            serde_json::Value::Object(fields) => fields,
            _ => unreachable!("a struct serialises to a map"),
        };
        fields.extend(changes.into_iter().filter(|(_, v)| !v.is_null()));
        let changed = Self::deserialize(serde_json::Value::Object(fields))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        changed.validate()?;
        Ok(changed)
    }

    pub fn churn(&self) -> Churn {
        Churn {
            s_churn: self.s_churn,
            s_min: self.s_min,
            s_max: self.s_max,
            s_noise: self.s_noise,
        }
    }

    /// Network evaluations per image, not counting guidance's second branch.
    pub fn evaluations(&self) -> usize {
        self.sampler.evaluations(self.steps)
    }

    /// σ within the guidance interval (everywhere without one).
    pub fn guided_at(&self, sigma: f64) -> bool {
        self.guidance_interval
            .is_none_or(|(lo, hi)| (lo..=hi).contains(&sigma))
    }
}

/// The command line's sampling options: each one given replaces the default (the
/// published model's, or a `pipeline.json`'s); the result is validated like any other.
#[derive(Debug, Clone, Default, Serialize, clap::Args)]
pub struct SamplingArgs {
    /// Sampler steps [default: 30, or pipeline.json's].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale, 1 = none [default: 5, or pipeline.json's].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Guide only while the noise level σ is within [LO, HI] (Kynkäänniemi et al. 2024).
    #[arg(long, num_args = 2, value_names = ["LO", "HI"])]
    pub guidance_interval: Option<Vec<f64>>,
    /// heun: EDM's 2nd-order sampler (2 evaluations a step); euler: 1st order;
    /// dpmpp-2m: DPM-Solver++(2M), 2nd order with 1 evaluation a step; dpmpp-2m-sde: its
    /// stochastic form [default: heun].
    #[arg(long, value_enum)]
    pub sampler: Option<Sampler>,
    /// Stochastic Heun/Euler: total churn (0 = deterministic) [default: 0].
    #[arg(long)]
    pub s_churn: Option<f64>,
    /// Churn only at σ ≥ S_MIN [default: 0].
    #[arg(long)]
    pub s_min: Option<f64>,
    /// Churn only at σ ≤ S_MAX [default: inf].
    #[arg(long)]
    pub s_max: Option<f64>,
    /// Scale of the fresh noise (churn or dpmpp-2m-sde) [default: 1].
    #[arg(long)]
    pub s_noise: Option<f64>,
}

impl SamplingArgs {
    /// `defaults` with the options given, validated.
    pub fn over(&self, defaults: &Sampling) -> Result<Sampling> {
        match serde_json::to_value(self)? {
            serde_json::Value::Object(given) => defaults.with(given),
            _ => unreachable!("a struct serialises to a map"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSettings {
    pub prompt: String,
    #[serde(with = "text")]
    pub seed: u64,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// Image side in pixels.
    #[serde(with = "text")]
    pub resolution: usize,
    /// The denoiser's weights: a file, a training run folder (its newest weights; their
    /// exponential average where training kept one), or OWNER/REPO/PATH on the Hub.
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

    /// The settings in a PNG's text chunks (as [`Self::to_png_text`] writes them),
    /// validated.
    pub fn from_png_text(chunks: Vec<(String, String)>) -> Result<Self> {
        let settings = Self::deserialize(MapDeserializer::<_, serde::de::value::Error>::new(
            chunks.into_iter(),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        settings.sampling.validate()?;
        Ok(settings)
    }
}

/// A number written as a JSON number where it is one (`20`, `4.5`; infinity, which JSON
/// lacks, as its text `"inf"`), and read from a number or its text (PNG chunks hold text)
/// through `FromStr` (so `20.5` is no `usize`).
mod text {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt::{self, Display};
    use std::marker::PhantomData;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = value.to_string();
        if let Ok(whole) = text.parse::<u64>() {
            return s.serialize_u64(whole);
        }
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => s.serialize_f64(x),
            _ => s.serialize_str(&text),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        d.deserialize_any(Parsed(PhantomData))
    }

    struct Parsed<T>(PhantomData<T>);

    impl<T: FromStr> Parsed<T>
    where
        T::Err: Display,
    {
        fn parse<E: Error>(text: &str) -> Result<T, E> {
            text.parse()
                .map_err(|e| E::custom(format!("'{text}': {e}")))
        }
    }

    impl<T: FromStr> Visitor<'_> for Parsed<T>
    where
        T::Err: Display,
    {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number, or its text")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<T, E> {
            Self::parse(v)
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
            Self::parse(&v.to_string())
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
            Self::parse(&v.to_string())
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
            Self::parse(&v.to_string())
        }
    }
}

/// `Option<(lo, hi)>` stored as the text `"lo hi"`; read from that text or a pair of
/// numbers `[lo, hi]`.
mod interval {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &Option<(f64, f64)>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some((lo, hi)) => s.collect_str(&format!("{lo} {hi}")),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, f64)>, D::Error> {
        d.deserialize_any(Interval)
    }

    struct Interval;

    fn pair<E: Error>(values: &[f64], given: &str) -> Result<Option<(f64, f64)>, E> {
        match values {
            [lo, hi] => Ok(Some((*lo, *hi))),
            _ => Err(E::custom(format!(
                "guidance_interval '{given}': expected two numbers"
            ))),
        }
    }

    impl<'de> Visitor<'de> for Interval {
        type Value = Option<(f64, f64)>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("two numbers: \"lo hi\" or [lo, hi]")
        }
        fn visit_str<E: Error>(self, text: &str) -> Result<Self::Value, E> {
            let values: Vec<f64> = text
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|e| E::custom(format!("guidance_interval '{text}': {e}")))?;
            pair(&values, text)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut values = Vec::new();
            while let Some(v) = seq.next_element::<f64>()? {
                values.push(v);
            }
            pair(&values, &format!("{values:?}"))
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
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
            sampling: Sampling {
                steps: 30,
                guidance: 5.0,
                guidance_interval: Some((0.28, 5.42)),
                sampler: Sampler::Euler,
                ..Sampling::default()
            },
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
    fn json_gives_numbers_as_numbers() {
        let json = serde_json::to_value(example()).unwrap();
        assert_eq!(json["steps"], serde_json::json!(30));
        assert_eq!(json["seed"], serde_json::json!(3));
        assert_eq!(json["s_churn"], serde_json::json!(0));
        assert_eq!(json["s_max"], serde_json::json!("inf"));
        assert_eq!(json["prompt"], serde_json::json!("7"));
        let back: GenerationSettings = serde_json::from_value(json).unwrap();
        assert_eq!(back, example());
        let half = Sampling {
            guidance: 4.5,
            ..Sampling::default()
        };
        assert_eq!(serde_json::to_value(half).unwrap()["guidance"], 4.5);
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
        assert!(with("steps", "0").contains("steps must be 1 to"));
        let mut dpm = example();
        dpm.sampling.sampler = Sampler::DpmSolver2M;
        dpm.sampling.s_churn = 1.0;
        assert!(
            GenerationSettings::from_png_text(dpm.to_png_text().unwrap())
                .unwrap_err()
                .to_string()
                .contains("s_churn applies to the heun and euler")
        );
        let mut missing = text.clone();
        missing.retain(|(k, _)| k != "seed");
        assert!(GenerationSettings::from_png_text(missing)
            .unwrap_err()
            .to_string()
            .contains("missing field `seed`"));
    }

    #[test]
    fn every_sampler_round_trips_by_its_option_name() {
        for (sampler, name) in [
            (Sampler::Heun, "heun"),
            (Sampler::Euler, "euler"),
            (Sampler::DpmSolver2M, "dpmpp-2m"),
            (Sampler::DpmSolver2MSde, "dpmpp-2m-sde"),
        ] {
            let mut settings = example();
            settings.sampling.sampler = sampler;
            let text = settings.to_png_text().unwrap();
            assert!(text.contains(&("sampler".into(), name.into())), "{text:?}");
            assert_eq!(GenerationSettings::from_png_text(text).unwrap(), settings);
            let parsed = <Sampler as clap::ValueEnum>::from_str(name, false).unwrap();
            assert_eq!(parsed, sampler);
        }
    }

    #[test]
    fn changes_as_json_take_numbers_or_text_and_are_validated() {
        let base = Sampling::default();
        let change = |json: serde_json::Value| {
            base.with(json.as_object().unwrap().clone())
                .map_err(|e| e.to_string())
        };
        let changed = change(serde_json::json!({
            "steps": 20, "guidance": "2.5", "guidance_interval": [0.5, 3], "sampler": "dpmpp-2m",
            "s_max": null,
        }))
        .unwrap();
        assert_eq!(
            changed,
            Sampling {
                steps: 20,
                guidance: 2.5,
                guidance_interval: Some((0.5, 3.0)),
                sampler: Sampler::DpmSolver2M,
                ..base.clone()
            }
        );
        assert!(change(serde_json::json!({"steps": 20.5}))
            .unwrap_err()
            .contains("'20.5'"));
        assert!(change(serde_json::json!({"steps": 0}))
            .unwrap_err()
            .contains("steps must be"));
        assert!(change(serde_json::json!({"colour": 1}))
            .unwrap_err()
            .contains("unknown field"));
        assert!(change(serde_json::json!({"guidance": -1}))
            .unwrap_err()
            .contains("guidance must be"));
        let args = SamplingArgs {
            steps: Some(12),
            s_noise: Some(0.5),
            ..SamplingArgs::default()
        };
        assert_eq!(
            args.over(&base).unwrap(),
            Sampling {
                steps: 12,
                s_noise: 0.5,
                ..base.clone()
            }
        );
        let zero = SamplingArgs {
            steps: Some(0),
            ..SamplingArgs::default()
        };
        assert_eq!(
            zero.over(&base).unwrap_err().to_string(),
            base.with(serde_json::json!({"steps": 0}).as_object().unwrap().clone())
                .unwrap_err()
                .to_string()
        );
    }
}
