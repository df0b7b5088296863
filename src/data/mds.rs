//! Reading mosaicml-streaming MDS datasets (`index.json` version 2 and its shards), as the
//! reference's data preparation writes them.
//!
//! A shard is `num_samples: u32`, `num_samples + 1` absolute `u32` sample offsets, the
//! shard's JSON config, then the samples. A sample is a `u32` byte length for every
//! variable-size column, then each column's bytes in column order. Compressed shards hold
//! the same bytes compressed as a whole (`zip_data`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Index {
    version: u32,
    shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ShardInfo {
    pub column_encodings: Vec<String>,
    pub column_names: Vec<String>,
    pub column_sizes: Vec<Option<usize>>,
    pub compression: Option<String>,
    pub format: String,
    pub raw_data: FileInfo,
    pub samples: usize,
    pub zip_data: Option<FileInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileInfo {
    pub basename: String,
    pub bytes: u64,
}

/// One column value, decoded as the MDS encoding says.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Bytes(Vec<u8>),
    Int(i64),
    Float(f64),
    Json(serde_json::Value),
    /// `jpeg`/`png`/`jpg`/`pil` columns: the encoded image file, decoded by the user.
    Image(Vec<u8>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) | Value::Image(b) => Some(b),
            _ => None,
        }
    }
}

pub type Sample = BTreeMap<String, Value>;

/// An MDS dataset directory. Training draws samples in a random order over all shards, so
/// a sample must not cost a shard: raw shards are memory-mapped on first use (the page
/// cache holds them once for every reader, and a sample reads only its own bytes), and
/// compressed ones are kept decompressed, the most recently used first, up to
/// [`DECOMPRESSED_BYTES`].
pub struct MdsDataset {
    dir: PathBuf,
    shards: Vec<ShardInfo>,
    /// Index of the first sample of each shard, plus the total at the end.
    starts: Vec<usize>,
    mapped: Vec<OnceLock<memmap2::Mmap>>,
    decompressed: Mutex<Vec<(usize, Arc<Vec<u8>>)>>,
}

/// Decompressed shards kept in memory: 16 shards at the writer's 256 MiB limit. Raw shards
/// are not counted; the page cache holds them.
pub const DECOMPRESSED_BYTES: usize = 4 << 30;

/// A shard's bytes: mapped, or decompressed and shared with the cache.
enum ShardBytes<'a> {
    Mapped(&'a [u8]),
    Decompressed(Arc<Vec<u8>>),
}

impl std::ops::Deref for ShardBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ShardBytes::Mapped(bytes) => bytes,
            ShardBytes::Decompressed(bytes) => bytes,
        }
    }
}

impl MdsDataset {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("index.json");
        let text = std::fs::read_to_string(&index_path).with_context(|| {
            format!(
                "{}: no MDS index (is this a dataset directory?)",
                index_path.display()
            )
        })?;
        let index: Index = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an MDS index", index_path.display()))?;
        ensure!(
            index.version == 2,
            "{}: MDS index version {} (only 2 is known)",
            index_path.display(),
            index.version
        );
        for s in &index.shards {
            ensure!(
                s.format == "mds",
                "{}: shard {} is in format {:?}, not mds",
                index_path.display(),
                s.raw_data.basename,
                s.format
            );
            ensure!(
                s.column_names.len() == s.column_encodings.len()
                    && s.column_sizes.len() == s.column_names.len(),
                "{}: shard {} has inconsistent column lists",
                index_path.display(),
                s.raw_data.basename
            );
        }
        let mut starts = vec![0];
        for s in &index.shards {
            starts.push(starts.last().unwrap() + s.samples);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            starts,
            mapped: (0..index.shards.len()).map(|_| OnceLock::new()).collect(),
            decompressed: Mutex::new(Vec::new()),
            shards: index.shards,
        })
    }

    pub fn len(&self) -> usize {
        *self.starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn shards(&self) -> &[ShardInfo] {
        &self.shards
    }

    pub fn column_names(&self) -> &[String] {
        self.shards
            .first()
            .map(|s| s.column_names.as_slice())
            .unwrap_or(&[])
    }

    /// The decoded sample at global index `i`.
    pub fn get(&self, i: usize) -> Result<Sample> {
        ensure!(
            i < self.len(),
            "sample {i} out of range: the dataset has {}",
            self.len()
        );
        let shard = self.starts.partition_point(|&s| s <= i) - 1;
        let data = self.shard_bytes(shard)?;
        let info = &self.shards[shard];
        let path = self.dir.join(&info.raw_data.basename);
        decode_sample(&data, i - self.starts[shard], info)
            .with_context(|| format!("{}: sample {}", path.display(), i - self.starts[shard]))
    }

    fn shard_bytes(&self, shard: usize) -> Result<ShardBytes<'_>> {
        let info = &self.shards[shard];
        let raw_path = self.dir.join(&info.raw_data.basename);
        match (&info.zip_data, &info.compression) {
            (Some(zip), Some(codec)) if !raw_path.exists() => {
                let path = self.dir.join(&zip.basename);
                self.decompressed_shard(shard, &path, codec)
                    .map(ShardBytes::Decompressed)
            }
            _ => {
                if let Some(map) = self.mapped[shard].get() {
                    return Ok(ShardBytes::Mapped(map));
                }
                let map = map_shard(&raw_path, info.raw_data.bytes)?;
                Ok(ShardBytes::Mapped(self.mapped[shard].get_or_init(|| map)))
            }
        }
    }

    /// A compressed shard's bytes, from the cache or decompressed into it (evicting the
    /// least recently used beyond [`DECOMPRESSED_BYTES`]).
    fn decompressed_shard(&self, shard: usize, path: &Path, codec: &str) -> Result<Arc<Vec<u8>>> {
        let mut cache = self.decompressed.lock().unwrap();
        if let Some(k) = cache.iter().position(|(s, _)| *s == shard) {
            let entry = cache.remove(k);
            cache.push(entry.clone());
            return Ok(entry.1);
        }
        let packed = std::fs::read(path)
            .with_context(|| format!("{}: missing or unreadable shard", path.display()))?;
        let data = decompress(codec, &packed)
            .with_context(|| format!("{}: corrupt {codec} shard", path.display()))?;
        check_length(path, data.len() as u64, self.shards[shard].raw_data.bytes)?;
        let data = Arc::new(data);
        cache.push((shard, data.clone()));
        while cache.len() > 1
            && cache.iter().map(|(_, d)| d.len()).sum::<usize>() > DECOMPRESSED_BYTES
        {
            cache.remove(0);
        }
        Ok(data)
    }
}

/// Maps a raw shard. Shards are written whole and renamed into place (`MdsWriter`), and
/// never modified after, which is what mapping a file relies on.
fn map_shard(path: &Path, expected: u64) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("{}: missing or unreadable shard", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("{}: unreadable shard", path.display()))?
        .len();
    check_length(path, len, expected)?;
    // SAFETY: the file is only read, and shards are immutable once written (above).
    unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("{}: cannot map the shard", path.display()))
}

fn check_length(path: &Path, len: u64, expected: u64) -> Result<()> {
    ensure!(
        len == expected,
        "{}: shard is {len} bytes, the index says {expected} (truncated or replaced?)",
        path.display()
    );
    Ok(())
}

/// `zstd`, `gz` (optionally with a `:level` suffix, as the index records them).
fn decompress(codec: &str, packed: &[u8]) -> Result<Vec<u8>> {
    let name = codec.split(':').next().unwrap_or(codec);
    let mut out = Vec::new();
    match name {
        "zstd" => out = zstd::decode_all(packed)?,
        "gz" => {
            flate2::read::GzDecoder::new(packed).read_to_end(&mut out)?;
        }
        other => bail!("compression {other:?} is not supported (zstd and gz are)"),
    }
    Ok(out)
}

fn u32_at(data: &[u8], pos: usize) -> Result<u32> {
    let bytes = data
        .get(pos..pos + 4)
        .context("shard ends inside its header")?;
    Ok(u32::from_le_bytes(bytes.try_into().unwrap()))
}

fn decode_sample(data: &[u8], index: usize, info: &ShardInfo) -> Result<Sample> {
    let n = u32_at(data, 0)? as usize;
    ensure!(
        n == info.samples,
        "shard holds {n} samples, the index says {}",
        info.samples
    );
    let (start, end) = (
        u32_at(data, 4 + 4 * index)? as usize,
        u32_at(data, 8 + 4 * index)? as usize,
    );
    let sample = data
        .get(start..end)
        .with_context(|| format!("sample bytes {start}..{end} lie outside the shard"))?;
    let variable = info.column_sizes.iter().filter(|s| s.is_none()).count();
    let mut sizes = (0..variable).map(|k| u32_at(sample, 4 * k).map(|s| s as usize));
    let mut pos = 4 * variable;
    let mut out = Sample::new();
    for ((name, encoding), size) in info
        .column_names
        .iter()
        .zip(&info.column_encodings)
        .zip(&info.column_sizes)
    {
        let len = match size {
            Some(s) => *s,
            None => sizes.next().expect("one size per variable column")?,
        };
        let bytes = sample
            .get(pos..pos + len)
            .with_context(|| format!("column {name} runs past the sample"))?;
        out.insert(
            name.clone(),
            decode(encoding, bytes).with_context(|| format!("column {name} ({encoding})"))?,
        );
        pos += len;
    }
    Ok(out)
}

fn decode(encoding: &str, b: &[u8]) -> Result<Value> {
    let fixed = |n: usize| -> Result<&[u8]> {
        ensure!(b.len() == n, "{} bytes, expected {n}", b.len());
        Ok(b)
    };
    Ok(match encoding {
        "str" => Value::Str(String::from_utf8(b.to_vec()).context("not UTF-8")?),
        "bytes" => Value::Bytes(b.to_vec()),
        "int" | "int64" => Value::Int(i64::from_le_bytes(fixed(8)?.try_into().unwrap())),
        "int8" => Value::Int(i8::from_le_bytes(fixed(1)?.try_into().unwrap()) as i64),
        "int16" => Value::Int(i16::from_le_bytes(fixed(2)?.try_into().unwrap()) as i64),
        "int32" => Value::Int(i32::from_le_bytes(fixed(4)?.try_into().unwrap()) as i64),
        "uint8" => Value::Int(fixed(1)?[0] as i64),
        "uint16" => Value::Int(u16::from_le_bytes(fixed(2)?.try_into().unwrap()) as i64),
        "uint32" => Value::Int(u32::from_le_bytes(fixed(4)?.try_into().unwrap()) as i64),
        "uint64" => Value::Int(u64::from_le_bytes(fixed(8)?.try_into().unwrap()) as i64),
        "float16" => Value::Float(half::f16::from_le_bytes(fixed(2)?.try_into().unwrap()).to_f64()),
        "float32" => Value::Float(f32::from_le_bytes(fixed(4)?.try_into().unwrap()) as f64),
        "float64" => Value::Float(f64::from_le_bytes(fixed(8)?.try_into().unwrap())),
        "str_int" => Value::Int(std::str::from_utf8(b)?.trim().parse()?),
        "str_float" | "str_decimal" => Value::Float(std::str::from_utf8(b)?.trim().parse()?),
        "json" => Value::Json(serde_json::from_slice(b)?),
        "jpeg" | "jpg" | "png" | "pil" => Value::Image(b.to_vec()),
        other => bail!("MDS encoding {other:?} is not supported"),
    })
}

/// Little-endian float16 values (how the reference stores latents and caption embeddings)
/// as f32.
pub fn f16_values(bytes: &[u8]) -> Result<Vec<f32>> {
    ensure!(
        bytes.len().is_multiple_of(2),
        "{} bytes cannot hold float16 values",
        bytes.len()
    );
    Ok(bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect())
}

/// Writes an MDS dataset that mosaicml-streaming reads: shards of at most `size_limit`
/// bytes (before compression), optionally zstd-compressed, and `index.json` written last
/// (atomically), so a directory with an index is always complete.
pub struct MdsWriter {
    dir: PathBuf,
    names: Vec<String>,
    encodings: Vec<String>,
    sizes: Vec<Option<usize>>,
    compression: Option<i32>,
    size_limit: usize,
    pending: Vec<Vec<u8>>,
    pending_bytes: usize,
    shards: Vec<serde_json::Value>,
}

impl MdsWriter {
    /// `columns`: (name, encoding) in order; `compression`: a zstd level, or none.
    pub fn create(
        dir: &Path,
        columns: &[(&str, &str)],
        compression: Option<i32>,
        size_limit: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let sizes = columns
            .iter()
            .map(|(_, e)| fixed_size(e))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            names: columns.iter().map(|(n, _)| n.to_string()).collect(),
            encodings: columns.iter().map(|(_, e)| e.to_string()).collect(),
            sizes,
            compression,
            size_limit,
            pending: Vec::new(),
            pending_bytes: 0,
            shards: Vec::new(),
        })
    }

    /// Appends a sample: one value per column, in column order.
    pub fn write(&mut self, values: &[Value]) -> Result<()> {
        ensure!(
            values.len() == self.names.len(),
            "{} values for {} columns",
            values.len(),
            self.names.len()
        );
        let mut head = Vec::new();
        let mut body = Vec::new();
        for ((value, encoding), size) in values.iter().zip(&self.encodings).zip(&self.sizes) {
            let bytes = encode(encoding, value)?;
            match size {
                Some(s) => ensure!(
                    bytes.len() == *s,
                    "{encoding} value of {} bytes",
                    bytes.len()
                ),
                None => head.extend((bytes.len() as u32).to_le_bytes()),
            }
            body.extend(bytes);
        }
        head.extend(body);
        if !self.pending.is_empty() && self.pending_bytes + head.len() + 4 > self.size_limit {
            self.flush_shard()?;
        }
        self.pending_bytes += head.len() + 4;
        self.pending.push(head);
        Ok(())
    }

    fn shard_config(&self) -> serde_json::Value {
        serde_json::json!({
            "column_encodings": self.encodings,
            "column_names": self.names,
            "column_sizes": self.sizes,
            "compression": self.compression.map(|l| format!("zstd:{l}")),
            "format": "mds",
            "hashes": [],
            "size_limit": self.size_limit,
            "version": 2,
        })
    }

    fn flush_shard(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let config = serde_json::to_vec(&self.shard_config())?;
        let n = self.pending.len();
        let header = 4 + 4 * (n + 1) + config.len();
        let mut data = Vec::with_capacity(header + self.pending_bytes);
        data.extend((n as u32).to_le_bytes());
        let mut offset = header;
        data.extend((offset as u32).to_le_bytes());
        for s in &self.pending {
            offset += s.len();
            data.extend((offset as u32).to_le_bytes());
        }
        data.extend(&config);
        for s in self.pending.drain(..) {
            data.extend(s);
        }
        self.pending_bytes = 0;
        let raw_name = format!("shard.{:05}.mds", self.shards.len());
        let mut info = self.shard_config();
        info["raw_data"] =
            serde_json::json!({"basename": raw_name, "bytes": data.len(), "hashes": {}});
        info["samples"] = n.into();
        match self.compression {
            Some(level) => {
                let packed = zstd::encode_all(data.as_slice(), level)?;
                let zip_name = format!("{raw_name}.zstd");
                crate::io::write_atomic(&self.dir.join(&zip_name), |f| {
                    std::io::Write::write_all(f, &packed)
                })?;
                info["zip_data"] =
                    serde_json::json!({"basename": zip_name, "bytes": packed.len(), "hashes": {}});
            }
            None => {
                crate::io::write_atomic(&self.dir.join(&raw_name), |f| {
                    std::io::Write::write_all(f, &data)
                })?;
                info["zip_data"] = serde_json::Value::Null;
            }
        }
        self.shards.push(info);
        Ok(())
    }

    /// Writes the last shard and the index.
    pub fn finish(mut self) -> Result<()> {
        self.flush_shard()?;
        let index = serde_json::json!({"shards": self.shards, "version": 2});
        crate::io::write_json(&self.dir.join("index.json"), &index)
    }
}

fn fixed_size(encoding: &str) -> Result<Option<usize>> {
    Ok(match encoding {
        "str" | "bytes" | "json" | "jpeg" | "jpg" | "png" | "pil" | "str_int" | "str_float"
        | "str_decimal" => None,
        "int" | "int64" | "uint64" | "float64" => Some(8),
        "int32" | "uint32" | "float32" => Some(4),
        "int16" | "uint16" | "float16" => Some(2),
        "int8" | "uint8" => Some(1),
        other => bail!("MDS encoding {other:?} is not supported"),
    })
}

fn encode(encoding: &str, value: &Value) -> Result<Vec<u8>> {
    Ok(match (encoding, value) {
        ("str", Value::Str(s)) => s.as_bytes().to_vec(),
        ("bytes", Value::Bytes(b)) => b.clone(),
        ("jpeg" | "jpg" | "png" | "pil", Value::Image(b)) => b.clone(),
        ("json", Value::Json(j)) => serde_json::to_vec(j)?,
        ("int" | "int64", Value::Int(v)) => v.to_le_bytes().to_vec(),
        ("float32", Value::Float(v)) => (*v as f32).to_le_bytes().to_vec(),
        ("float64", Value::Float(v)) => v.to_le_bytes().to_vec(),
        (e, v) => bail!("cannot encode {v:?} as {e}"),
    })
}

/// f32 values as little-endian float16 bytes (the reference's storage for latents).
pub fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect()
}
