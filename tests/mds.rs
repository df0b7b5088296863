//! MDS datasets written by mosaicml-streaming's `MDSWriter`: every `mds-*` fixture set.

mod common;

use microdit::data::mds::f16_values;
use microdit::data::MdsDataset;

#[test]
fn captions_and_arrays_equal_what_was_written() {
    for set in common::fixture_sets("mds") {
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(set.join("expected.json")).unwrap())
                .unwrap();
        let arrays = common::Cases::open(&set.join("expected.safetensors"));
        let ds = MdsDataset::open(&set.join("data")).unwrap();
        let captions = expected["captions"].as_array().unwrap();
        assert_eq!(ds.len(), captions.len(), "{}", set.display());
        for (name, shape) in [
            ("caption_latents", arrays.shape("caption_latents")),
            ("latents_256", arrays.shape("latents_256")),
        ] {
            let per_sample: usize = shape[1..].iter().product();
            let all = arrays.values(name);
            for i in 0..ds.len() {
                let sample = ds.get(i).unwrap();
                assert_eq!(
                    sample["caption"].as_str(),
                    captions[i].as_str(),
                    "{}: caption {i}",
                    set.display()
                );
                let values = f16_values(sample[name].as_bytes().unwrap()).unwrap();
                assert_eq!(
                    values,
                    all[i * per_sample..(i + 1) * per_sample],
                    "{}: {name} of sample {i}",
                    set.display()
                );
            }
        }
    }
}

/// The first `mds` set whose shards are stored uncompressed, more than one of them.
fn uncompressed_set_of_several_shards() -> std::path::PathBuf {
    common::fixture_sets("mds")
        .into_iter()
        .find(|d| d.join("data/shard.00001.mds").is_file())
        .expect("an mds set with two or more uncompressed shards")
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn damaged_datasets_give_errors_that_name_the_file() {
    let plain = uncompressed_set_of_several_shards();
    let tmp = tempfile::tempdir().unwrap();

    let missing_index = tmp.path().join("empty");
    std::fs::create_dir_all(&missing_index).unwrap();
    let e = format!("{:#}", MdsDataset::open(&missing_index).err().unwrap());
    assert!(
        e.contains("index.json") && e.contains("no MDS index"),
        "{e}"
    );

    let truncated = tmp.path().join("truncated");
    copy_dir(&plain.join("data"), &truncated);
    let shard = truncated.join("shard.00001.mds");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let ds = MdsDataset::open(&truncated).unwrap();
    assert!(ds.get(0).is_ok(), "other shards stay readable");
    let first_of_shard_1 = ds.shards()[0].samples;
    let e = format!("{:#}", ds.get(first_of_shard_1).unwrap_err());
    assert!(
        e.contains("shard.00001.mds") && e.contains("truncated"),
        "{e}"
    );

    std::fs::remove_file(&shard).unwrap();
    let e = format!("{:#}", ds.get(first_of_shard_1).unwrap_err());
    assert!(
        e.contains("shard.00001.mds") && e.contains("missing"),
        "{e}"
    );
    let e = format!("{:#}", ds.get(ds.len()).unwrap_err());
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn written_datasets_read_back_and_round_trip_through_the_fixture_contents() {
    use microdit::data::mds::{f16_bytes, MdsWriter};
    use microdit::data::Value;
    let plain = uncompressed_set_of_several_shards();
    let source = MdsDataset::open(&plain.join("data")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (name, compression) in [("plain", None), ("zstd", Some(3))] {
        let dir = tmp.path().join(name);
        let columns = [
            ("caption", "str"),
            ("caption_latents", "bytes"),
            ("latents_256", "bytes"),
            ("index", "int"),
        ];
        let mut w = MdsWriter::create(&dir, &columns, compression, 8 << 10).unwrap();
        for i in 0..source.len() {
            let s = source.get(i).unwrap();
            let latents = f16_values(s["latents_256"].as_bytes().unwrap()).unwrap();
            w.write(&[
                s["caption"].clone(),
                s["caption_latents"].clone(),
                Value::Bytes(f16_bytes(&latents)),
                Value::Int(i as i64),
            ])
            .unwrap();
        }
        w.finish().unwrap();
        let back = MdsDataset::open(&dir).unwrap();
        assert!(back.shards().len() > 1, "size limit splits shards");
        assert_eq!(back.len(), source.len());
        // From both ends in turn, as a shuffled epoch jumps between shards.
        let n = source.len();
        for k in 0..n {
            let i = if k % 2 == 0 { k / 2 } else { n - 1 - k / 2 };
            let (a, b) = (source.get(i).unwrap(), back.get(i).unwrap());
            assert_eq!(a["caption"], b["caption"]);
            assert_eq!(a["caption_latents"], b["caption_latents"]);
            assert_eq!(a["latents_256"], b["latents_256"]);
            assert_eq!(b["index"], Value::Int(i as i64));
        }
    }
}
