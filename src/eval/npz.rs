//! NumPy `.npz` archives of float arrays, as `np.savez_compressed` writes them and `np.load`
//! reads them: a zip of `NAME.npy` members, each a format-1.0 header (a Python dict literal
//! with `descr`, `fortran_order`, `shape`) then the raw little-endian data.
//! See numpy's `lib/format.py`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// A float array, values in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Array {
    pub fn new(name: &str, shape: Vec<usize>, values: Vec<f64>) -> Self {
        Self {
            name: name.to_string(),
            shape,
            values,
        }
    }
}

/// Every array of an `.npz` by name (float16/32/64 arrays; others are an error).
pub fn read(path: &Path) -> Result<BTreeMap<String, Array>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not an .npz (zip) archive", path.display()))?;
    let mut arrays = BTreeMap::new();
    for i in 0..archive.len() {
        let mut member = archive.by_index(i)?;
        let Some(name) = member.name().strip_suffix(".npy").map(String::from) else {
            continue;
        };
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes)?;
        let array = parse_npy(&name, &bytes)
            .with_context(|| format!("{}: array '{name}'", path.display()))?;
        arrays.insert(name, array);
    }
    Ok(arrays)
}

/// Writes `arrays` as float64 members of a deflated zip, through a temporary file renamed
/// into place.
pub fn write(path: &Path, arrays: &[Array]) -> Result<()> {
    crate::io::write_atomic(path, |file| {
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(
                arrays
                    .iter()
                    .any(|a| a.values.len() * 8 > u32::MAX as usize / 2),
            );
        for array in arrays {
            zip.start_file(format!("{}.npy", array.name), options)
                .map_err(std::io::Error::other)?;
            zip.write_all(&npy_bytes(array))?;
        }
        zip.finish().map_err(std::io::Error::other)?;
        Ok(())
    })
}

fn npy_bytes(array: &Array) -> Vec<u8> {
    let shape = match array.shape.as_slice() {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic, version and length take 10 bytes; numpy pads the whole to a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + array.values.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &array.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn parse_npy(name: &str, bytes: &[u8]) -> Result<Array> {
    ensure!(
        bytes.starts_with(MAGIC) && bytes.len() >= 10,
        "not a .npy array"
    );
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            ensure!(bytes.len() >= 12, "truncated .npy header");
            (u32::from_le_bytes(bytes[8..12].try_into()?) as usize, 12)
        }
        v => bail!(".npy format version {v} is not supported"),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + header_len)
            .context("truncated .npy header")?,
    )?;
    let descr = dict_value(header, "descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order")? == "True";
    let shape: Vec<usize> = dict_value(header, "shape")?
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().with_context(|| format!("shape entry '{s}'")))
        .collect::<Result<_>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    let values = decode(descr, data, count)?;
    let values = if fortran && shape.len() > 1 {
        to_c_order(&values, &shape)
    } else {
        values
    };
    Ok(Array {
        name: name.to_string(),
        shape,
        values,
    })
}

/// The raw text of `key`'s value in a Python dict literal (values here hold no commas
/// except inside the shape tuple's parentheses).
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .with_context(|| format!("no '{key}' in the .npy header"))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .trim_start_matches(':')
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .context("malformed .npy header")?;
    Ok(rest[..end].trim())
}

fn decode(descr: &str, data: &[u8], count: usize) -> Result<Vec<f64>> {
    let (little, kind) = match descr.as_bytes().first() {
        Some(b'<') | Some(b'|') | Some(b'=') => (true, &descr[1..]),
        Some(b'>') => (false, &descr[1..]),
        _ => (true, descr),
    };
    let width = match kind {
        "f8" => 8,
        "f4" => 4,
        "f2" => 2,
        _ => bail!("dtype '{descr}' is not a float array"),
    };
    ensure!(
        data.len() >= count * width,
        "the array holds {} bytes, its shape needs {}",
        data.len(),
        count * width
    );
    let values = data[..count * width].chunks_exact(width).map(|c| {
        let mut b = c.to_vec();
        if !little {
            b.reverse();
        }
        match width {
            8 => f64::from_le_bytes(b.try_into().unwrap()),
            4 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            _ => half::f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        }
    });
    Ok(values.collect())
}

fn to_c_order(values: &[f64], shape: &[usize]) -> Vec<f64> {
    let n = values.len();
    let mut out = vec![0.0; n];
    // Fortran index: first axis fastest; walk C order and compute the Fortran offset.
    let mut index = vec![0usize; shape.len()];
    for slot in out.iter_mut() {
        let mut offset = 0;
        let mut stride = 1;
        for (i, &dim) in index.iter().zip(shape) {
            offset += i * stride;
            stride *= dim;
        }
        *slot = values[offset];
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads_the_header_as_numpy_does() {
        let dir = std::env::temp_dir().join(format!("microdit-npz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.npz");
        let arrays = [
            Array::new("mu", vec![3], vec![1.0, -2.5, 3.25]),
            Array::new("sigma", vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
        ];
        write(&path, &arrays).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back["mu"], arrays[0]);
        assert_eq!(back["sigma"], arrays[1]);
        assert_eq!((npy_bytes(&arrays[0]).len() - 3 * 8) % 64, 0);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn reads_fortran_order_and_float32() {
        let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }";
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        // [[1,2,3],[4,5,6]] in Fortran order: 1 4 2 5 3 6.
        for v in [1f32, 4., 2., 5., 3., 6.] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let a = parse_npy("x", &bytes).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.values, vec![1., 2., 3., 4., 5., 6.]);
    }

    #[test]
    fn integer_arrays_and_garbage_are_errors() {
        let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }";
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 8]);
        assert!(parse_npy("x", &bytes).is_err());
        assert!(parse_npy("x", b"hello").is_err());
    }
}
