//! Writes a small MDS dataset (plain or zstd) with every column kind the reference uses, for
//! checking that mosaicml-streaming reads our writer's output:
//! `cargo run --release --example write_mds -- OUT_DIR [zstd]`, then
//! `python3 -c "from streaming.base.format import reader_from_json"`-style readers, or
//! `streaming.StreamingDataset(local=OUT_DIR)`.

use microdit::data::mds::{f16_bytes, MdsWriter};
use microdit::data::Value;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: write_mds OUT_DIR [zstd]"));
    let compression = (args.next().as_deref() == Some("zstd")).then_some(3);
    let columns = [
        ("caption", "str"),
        ("caption_latents", "bytes"),
        ("latents_256", "bytes"),
        ("index", "int"),
    ];
    let mut w = MdsWriter::create(&dir, &columns, compression, 4096)?;
    for i in 0..20 {
        let caption = format!("sample {i}: café ☕");
        let caption_latents: Vec<f32> = (0..77 * 8)
            .map(|k| (k as f32 * 0.01 + i as f32).sin())
            .collect();
        let latents: Vec<f32> = (0..4 * 8 * 8)
            .map(|k| (k as f32 * 0.1 - i as f32).cos())
            .collect();
        w.write(&[
            Value::Str(caption),
            Value::Bytes(f16_bytes(&caption_latents)),
            Value::Bytes(f16_bytes(&latents)),
            Value::Int(i),
        ])?;
    }
    w.finish()
}
