//! The scheduler modules form layers: no module reaches (through `crate::` or `$crate::` paths,
//! macros included) a module that reaches back to it, and only the crate root may name items of
//! the root (which declares every module, so a child naming `crate::Item` would close a circle).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name -> the crate modules its source names (`"lib"` for root items).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = BTreeMap::new();
    for e in std::fs::read_dir(src).expect("src dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "rs") {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            modules.insert(name, std::fs::read_to_string(&p).expect("read"));
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(name, text)| {
            let mut deps = BTreeSet::new();
            for (pos, _) in text.match_indices("crate::") {
                // Skip `diffuse_crate::`-like identifiers; `$crate::` counts.
                let before = text[..pos].chars().last();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = &text[pos + "crate::".len()..];
                let first: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '{')
                    .collect();
                // `crate::{a, b}` groups: every name inside counts.
                let targets: Vec<String> = if first.starts_with('{') {
                    let close = rest.find('}').unwrap_or(rest.len());
                    rest[1..close]
                        .split(',')
                        .map(|s| s.trim().split("::").next().unwrap_or("").to_string())
                        .collect()
                } else {
                    vec![first]
                };
                for t in targets.into_iter().filter(|t| !t.is_empty()) {
                    let module = if names.contains(&t) { t } else { "lib".into() };
                    if &module != name {
                        deps.insert(module);
                    }
                }
            }
            if name == "lib" {
                // The root declares every module.
                deps.extend(names.iter().filter(|n| *n != "lib").cloned());
            }
            (name.clone(), deps)
        })
        .collect()
}

/// A circle in the graph, if there is one.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(graph, n, &mut vec![], &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn scheduler_modules_have_no_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() > 5, "found only {:?}", graph.keys());
    if let Some(c) = find_circle(&graph) {
        panic!("import circle: {}", c.join(" -> "));
    }
}

#[test]
fn the_circle_finder_finds_circles() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_circle(&g).unwrap(), ["a", "b", "c", "a"]);
}
