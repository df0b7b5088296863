//! Loading the text tower from a file that also holds a (large) vision tower reads only the
//! text tensors. Alone in its test binary so the process's peak memory is this test's.

mod common;

use std::io::Write;

use microdit::backend::Cpu;
use microdit::text::{ClipTextConfig, ClipTextEncoder};

fn peak_rss() -> u64 {
    microdit::memory::peak().expect("the system reports peak memory")
}

#[test]
fn only_text_tensors_are_read() {
    let dir = common::fixture_sets("clip-text").remove(0);
    let fixture = std::fs::read(dir.join("open_clip_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&fixture).unwrap();

    // Rewrite the fixture's tensors plus a 512 MiB "vision" tensor, streamed to disk so
    // that writing it costs no memory either.
    const VISION_FLOATS: usize = 128 << 20;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in &names {
        let t = st.tensor(name).unwrap();
        let len = t.data().len();
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": t.shape(), "data_offsets": [offset, offset + len]}));
        offset += len;
    }
    header.insert("visual.trunk.huge".into(), serde_json::json!({"dtype": "F32", "shape": [VISION_FLOATS], "data_offsets": [offset, offset + 4 * VISION_FLOATS]}));
    let mut header = serde_json::to_vec(&header).unwrap();
    header.resize(header.len().next_multiple_of(8), b' ');

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("open_clip_model.safetensors");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    for name in &names {
        f.write_all(st.tensor(name).unwrap().data()).unwrap();
    }
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(4 * VISION_FLOATS) >> 20 {
        f.write_all(&zeros).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    drop(st);
    drop(fixture);

    let before = peak_rss();
    let cfg = ClipTextConfig::from_file(&dir.join("open_clip_config.json")).unwrap();
    let encoder = ClipTextEncoder::<Cpu>::load(&cfg, &path, &Default::default()).unwrap();
    let grown = peak_rss().saturating_sub(before);
    drop(encoder);
    assert!(
        grown < 128 << 20,
        "loading the text tower raised peak memory by {} MiB",
        grown >> 20
    );
}
