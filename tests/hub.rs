//! Resolving weights from local directories and the Hugging Face cache, offline.

use microdit::hub::Hub;

#[test]
fn local_directories_are_used_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let hub = Hub::new(dir.path().join("cache"), true);
    let src = dir.path().to_str().unwrap();
    assert_eq!(
        hub.file(src, "config.json").unwrap(),
        dir.path().join("config.json")
    );
    let e = hub
        .file(src, "diffusion_pytorch_model.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no diffusion_pytorch_model.safetensors"),
        "{e}"
    );
}

#[test]
fn cached_hub_files_resolve_offline_and_missing_ones_say_how_to_get_them() {
    let cache = tempfile::tempdir().unwrap();
    // The layout huggingface_hub writes: refs/main names the snapshot that holds the files.
    let repo = cache.path().join("models--VSehwag24--MicroDiT");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    let snapshot = repo.join("snapshots/abc123/ckpts");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(snapshot.join("dit.pt"), b"x").unwrap();

    let hub = Hub::new(cache.path().to_path_buf(), true);
    assert_eq!(
        hub.file("VSehwag24/MicroDiT", "ckpts/dit.pt").unwrap(),
        snapshot.join("dit.pt")
    );
    let e = hub
        .file(
            "apple/DFN5B-CLIP-ViT-H-14-378",
            "open_clip_model.safetensors",
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("open_clip_model.safetensors of apple/DFN5B-CLIP-ViT-H-14-378"),
        "{e}"
    );
    assert!(
        e.contains(
            "huggingface-cli download apple/DFN5B-CLIP-ViT-H-14-378 open_clip_model.safetensors"
        ),
        "{e}"
    );
}
