//! Every link in README.md and docs/ resolves inside the repository: markdown links to
//! relative paths, and paths written in backticks under the repository's top folders
//! (`docs/…`, `deploy/…`, `tests/…`, `src/…`, `benches/…`). The contract and the pages it
//! relies on live in docs/ for this reason.

use std::path::{Path, PathBuf};

/// Folders whose backticked paths must exist.
const TOP_FOLDERS: [&str; 5] = ["docs/", "deploy/", "tests/", "src/", "benches/"];
/// Paths the docs name that an operator creates, not the repository: compose's secrets file
/// (from `deploy/env.example`).
const CREATED_BY_THE_OPERATOR: [&str; 1] = ["deploy/.env"];
/// The market's interface documents, copied as the user gave them (their icons never were).
const VERBATIM: &str = "docs/seeds";

fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    let mut folders = vec![root.join("docs")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files
}

/// The targets of `[text](target)` links that are neither URLs nor in-page anchors.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or("").trim();
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            targets.push(target.to_owned());
        }
    }
    targets
}

/// Backticked repository paths: `docs/operations.md`, `deploy/config/` (not patterns).
fn backticked_paths(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| TOP_FOLDERS.iter().any(|f| t.starts_with(f)))
        .filter(|t| !t.contains(|c: char| "{}*<>… ".contains(c)))
        .map(|t| t.trim_end_matches([',', '.', ':']).to_owned())
        .collect()
}

#[test]
fn every_link_in_readme_and_docs_resolves_in_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for file in markdown_files(root) {
        if file.starts_with(root.join(VERBATIM)) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let here = file.parent().unwrap();
        for target in link_targets(&text) {
            if !here.join(&target).exists() {
                broken.push(format!("{}: link ({target})", file.display()));
            }
        }
        for path in backticked_paths(&text) {
            let path = path.split("::").next().unwrap_or(&path);
            if !root.join(path).exists() && !CREATED_BY_THE_OPERATOR.contains(&path) {
                broken.push(format!("{}: `{path}`", file.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links that lead nowhere:\n{}",
        broken.join("\n")
    );
}
