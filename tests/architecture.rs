//! The module map in docs/ARCHITECTURE.md is the truth about the source tree: every
//! top-level module of `src/` is in exactly one of its layers, and no module imports
//! (`crate::…`) from a layer below its own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Top-level module name → layer index, from the map's table rows (backticked names in
/// the modules column that are modules of `src/`).
fn layers() -> BTreeMap<String, usize> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let mut map = BTreeMap::new();
    let rows = doc
        .lines()
        .skip_while(|l| !l.starts_with("| layer |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    for (layer, row) in rows.enumerate() {
        let modules = row.split('|').nth(2).unwrap_or_default();
        for name in modules.split('`').skip(1).step_by(2) {
            let name = name.trim_end_matches('/');
            let src = root().join("src");
            if src.join(format!("{name}.rs")).exists() || src.join(name).is_dir() {
                map.insert(name.to_string(), layer);
            }
        }
    }
    map
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`None` for `lib.rs` and `main.rs`).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root().join("src")).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

#[test]
fn every_module_is_on_the_map() {
    let map = layers();
    assert!(map.len() > 10, "the map lists only {map:?}");
    let mut files = Vec::new();
    sources(&root().join("src"), &mut files);
    for file in files {
        if let Some(module) = module_of(&file) {
            assert!(
                map.contains_key(&module),
                "src/{module} is not in docs/ARCHITECTURE.md's module map"
            );
        }
    }
}

#[test]
fn imports_point_up_the_map() {
    let map = layers();
    let mut files = Vec::new();
    sources(&root().join("src"), &mut files);
    let mut against = Vec::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for used in code.split("crate::").skip(1) {
            let name: String = used
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if let (Some(&to), Some(&from)) = (map.get(&name), map.get(&module)) {
                if to > from {
                    against.push(format!("{} uses crate::{name}", file.display()));
                }
            }
        }
    }
    assert!(
        against.is_empty(),
        "imports against the layering:\n{}",
        against.join("\n")
    );
}
