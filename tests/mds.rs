//! MDS datasets written by mosaicml-streaming's `MDSWriter`: every `mds-*` fixture set.

mod common;

use microdit::data::mds::f16_values;
use microdit::data::MdsDataset;

#[test]
fn captions_and_arrays_equal_what_was_written() {
    for set in common::fixture_dirs_with("expected.json") {
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

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn damaged_datasets_give_errors_that_name_the_file() {
    let plain = common::fixture_dirs_with("expected.json")
        .into_iter()
        .find(|d| d.ends_with("mds-plain"))
        .unwrap();
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
