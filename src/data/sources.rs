//! Image–caption collections as users have them, listed in a fixed order so that work can
//! be split into parts and resumed:
//! - a folder of images with same-named `.txt` or `.json` captions (searched recursively);
//! - a JSONL or CSV file of `path` + `caption` (paths relative to the file);
//! - webdataset `.tar` shards (a file, or a folder of them): `KEY.jpg` + `KEY.txt`/`KEY.json`,
//!   img2dataset's layout;
//! - an MDS dataset with a `jpg` and a `caption` column (the reference's converted downloads).
//!
//! Listing reads names (and the small caption members of tar shards); images are read one
//! pair at a time by [`ImageCaptionSource::read`], whose errors name the pair so that the
//! caller can skip it and report why.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::mds::MdsDataset;

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// Field names accepted for the image path and the caption in JSONL/CSV/JSON files.
const PATH_FIELDS: [&str; 4] = ["path", "image", "file_name", "file"];
const CAPTION_FIELDS: [&str; 2] = ["caption", "text"];

/// One pair, read.
pub struct Pair {
    pub image: Vec<u8>,
    pub caption: String,
}

enum ImageAt {
    File(PathBuf),
    TarMember {
        archive: usize,
        offset: u64,
        len: u64,
    },
    Missing,
}

enum CaptionAt {
    Text(String),
    /// A `.txt` file (whole text) or a `.json` file (its caption field).
    File(PathBuf),
    Missing,
}

enum Entries {
    Listed(Vec<(String, ImageAt, CaptionAt)>),
    Mds(MdsDataset),
}

pub struct ImageCaptionSource {
    entries: Entries,
    archives: Vec<PathBuf>,
}

impl ImageCaptionSource {
    /// Recognises the kind of collection at `path` (see the module docs).
    pub fn open(path: &Path) -> Result<Self> {
        ensure!(path.exists(), "{}: no such file or folder", path.display());
        let ext = extension(path);
        if path.is_dir() {
            if path.join("index.json").exists() {
                return Ok(Self {
                    entries: Entries::Mds(open_mds(path)?),
                    archives: Vec::new(),
                });
            }
            let tars = files_with(path, &["tar"])?;
            if !tars.is_empty() {
                return list_tars(tars);
            }
            return list_folder(path);
        }
        match ext.as_str() {
            "tar" => list_tars(vec![path.to_path_buf()]),
            "jsonl" => list_table(path, read_jsonl(path)?),
            "csv" => list_table(path, read_csv(path)?),
            _ => bail!(
                "{}: expected a folder, a .tar, a .jsonl or a .csv file",
                path.display()
            ),
        }
    }

    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Listed(e) => e.len(),
            Entries::Mds(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A name for pair `i` in reports: its image's path, `SHARD.tar:KEY`, or `sample N`.
    pub fn key(&self, i: usize) -> String {
        match &self.entries {
            Entries::Listed(e) => e[i].0.clone(),
            Entries::Mds(_) => format!("sample {i}"),
        }
    }

    pub fn read(&self, i: usize) -> Result<Pair> {
        match &self.entries {
            Entries::Listed(e) => {
                let (_, image, caption) = &e[i];
                Ok(Pair {
                    image: self.read_image(image)?,
                    caption: read_caption(caption)?,
                })
            }
            Entries::Mds(d) => {
                let mut sample = d.get(i)?;
                let image = match sample.remove("jpg") {
                    Some(super::Value::Image(b)) => b,
                    _ => bail!("no jpg value"),
                };
                let caption = sample
                    .get("caption")
                    .and_then(|v| v.as_str())
                    .context("no caption value")?;
                Ok(Pair {
                    image,
                    caption: caption.to_string(),
                })
            }
        }
    }

    fn read_image(&self, at: &ImageAt) -> Result<Vec<u8>> {
        match at {
            ImageAt::File(p) => {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            }
            ImageAt::TarMember {
                archive,
                offset,
                len,
            } => {
                let path = &self.archives[*archive];
                let mut file = std::fs::File::open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                file.seek(SeekFrom::Start(*offset))?;
                let mut bytes = vec![0; *len as usize];
                file.read_exact(&mut bytes)
                    .with_context(|| format!("{}: truncated member", path.display()))?;
                Ok(bytes)
            }
            ImageAt::Missing => bail!("no image file with this caption"),
        }
    }
}

fn read_caption(at: &CaptionAt) -> Result<String> {
    match at {
        CaptionAt::Text(t) => Ok(t.clone()),
        CaptionAt::File(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            if extension(p) == "json" {
                caption_from_json(&text).with_context(|| format!("{}", p.display()))
            } else {
                Ok(text.trim().to_string())
            }
        }
        CaptionAt::Missing => bail!("no caption (.txt or .json) beside the image"),
    }
}

fn caption_from_json(text: &str) -> Result<String> {
    let value: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    field(&value, &CAPTION_FIELDS).context("no \"caption\" or \"text\" string field")
}

fn field(value: &serde_json::Value, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| value.get(n).and_then(|v| v.as_str()))
        .map(|s| s.trim().to_string())
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Files under `dir` (recursively) with one of `extensions`, sorted by path.
fn files_with(dir: &Path, extensions: &[&str]) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if extensions.contains(&extension(&path).as_str()) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn list_folder(dir: &Path) -> Result<ImageCaptionSource> {
    let entries = files_with(dir, &IMAGE_EXTENSIONS)?
        .into_iter()
        .map(|image| {
            let caption = ["txt", "json"]
                .iter()
                .map(|e| image.with_extension(e))
                .find(|p| p.exists())
                .map_or(CaptionAt::Missing, CaptionAt::File);
            let key = image
                .strip_prefix(dir)
                .unwrap_or(&image)
                .display()
                .to_string();
            (key, ImageAt::File(image), caption)
        })
        .collect();
    Ok(ImageCaptionSource {
        entries: Entries::Listed(entries),
        archives: Vec::new(),
    })
}

fn list_table(file: &Path, rows: Vec<(String, String)>) -> Result<ImageCaptionSource> {
    let base = file.parent().unwrap_or(Path::new("."));
    let entries = rows
        .into_iter()
        .map(|(path, caption)| {
            let image = base.join(&path);
            (path, ImageAt::File(image), CaptionAt::Text(caption))
        })
        .collect();
    Ok(ImageCaptionSource {
        entries: Entries::Listed(entries),
        archives: Vec::new(),
    })
}

fn read_jsonl(path: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            let at = || format!("{} line {}", path.display(), n + 1);
            let value: serde_json::Value = serde_json::from_str(line).with_context(at)?;
            let image = field(&value, &PATH_FIELDS)
                .with_context(|| format!("{}: no \"path\" field", at()))?;
            let caption = field(&value, &CAPTION_FIELDS)
                .with_context(|| format!("{}: no \"caption\" field", at()))?;
            Ok((image, caption))
        })
        .collect()
}

fn read_csv(path: &Path) -> Result<Vec<(String, String)>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let column = |names: &[&str]| {
        headers
            .iter()
            .position(|h| names.contains(&h.trim()))
            .with_context(|| format!("{}: no {:?} column", path.display(), names[0]))
    };
    let (image, caption) = (column(&PATH_FIELDS)?, column(&CAPTION_FIELDS)?);
    reader
        .records()
        .enumerate()
        .map(|(n, record)| {
            let record = record.with_context(|| format!("{} record {}", path.display(), n + 1))?;
            let get = |i: usize| record.get(i).unwrap_or_default().trim().to_string();
            Ok((get(image), get(caption)))
        })
        .collect()
}

/// webdataset groups a shard's members by key: the member name up to its basename's first dot.
fn split_key(name: &str) -> (&str, &str) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].find('.') {
        Some(dot) => (&name[..base_start + dot], &name[base_start + dot + 1..]),
        None => (name, ""),
    }
}

fn list_tars(archives: Vec<PathBuf>) -> Result<ImageCaptionSource> {
    let mut entries = Vec::new();
    for (a, path) in archives.iter().enumerate() {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut groups: BTreeMap<String, (ImageAt, CaptionAt)> = BTreeMap::new();
        let mut archive = tar::Archive::new(file);
        for member in archive
            .entries()
            .with_context(|| format!("{}: not a tar file", path.display()))?
        {
            let mut member =
                member.with_context(|| format!("{}: corrupt tar member", path.display()))?;
            if !member.header().entry_type().is_file() {
                continue;
            }
            let name = member.path()?.to_string_lossy().into_owned();
            let (key, ext) = split_key(&name);
            let ext = ext.to_ascii_lowercase();
            let group = groups
                .entry(key.to_string())
                .or_insert((ImageAt::Missing, CaptionAt::Missing));
            if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                group.0 = ImageAt::TarMember {
                    archive: a,
                    offset: member.raw_file_position(),
                    len: member.size(),
                };
            } else if ext == "txt" || (ext == "json" && matches!(group.1, CaptionAt::Missing)) {
                let mut text = String::new();
                member
                    .read_to_string(&mut text)
                    .with_context(|| format!("{}: reading {name}", path.display()))?;
                group.1 = if ext == "txt" {
                    CaptionAt::Text(text.trim().to_string())
                } else {
                    caption_from_json(&text).map_or(CaptionAt::Missing, CaptionAt::Text)
                };
            }
        }
        let shard = path.file_name().unwrap_or_default().to_string_lossy();
        entries.extend(
            groups
                .into_iter()
                .map(|(key, (image, caption))| (format!("{shard}:{key}"), image, caption)),
        );
    }
    Ok(ImageCaptionSource {
        entries: Entries::Listed(entries),
        archives,
    })
}

fn open_mds(dir: &Path) -> Result<MdsDataset> {
    let dataset = MdsDataset::open(dir)?;
    for column in ["jpg", "caption"] {
        ensure!(
            dataset.column_names().iter().any(|c| c == column),
            "{}: the MDS dataset has no {column:?} column (it has {:?})",
            dir.display(),
            dataset.column_names()
        );
    }
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    use super::split_key;

    #[test]
    fn webdataset_keys_end_at_the_basenames_first_dot() {
        assert_eq!(split_key("00001.jpg"), ("00001", "jpg"));
        assert_eq!(split_key("dir.v2/000.cap.txt"), ("dir.v2/000", "cap.txt"));
    }
}
