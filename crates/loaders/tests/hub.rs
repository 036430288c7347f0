//! Hub id resolution against a fake Hugging Face cache. One test function: it sets process-wide
//! environment variables.

use std::path::PathBuf;

use diffuse_core::Error;
use diffuse_loaders::{hub_cache_dir, resolve_model};

fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!("diffuse-hub-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn resolves_local_folders_and_cached_hub_ids() {
    let home = temp_dir();
    let main = "0123456789abcdef0123456789abcdef01234567";
    let other = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = home.join("hub/models--owner--name");
    for (commit, content) in [(main, "main"), (other, "other")] {
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(
            snap.join("model_index.json"),
            format!("{{\"rev\": \"{content}\"}}"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), format!("{main}\n")).unwrap();
    std::fs::write(repo.join("refs/fp16"), other).unwrap();

    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HUGGINGFACE_HUB_CACHE");
    std::env::set_var("HF_HOME", &home);
    assert_eq!(hub_cache_dir(), home.join("hub"));

    // Local folder: as is.
    let local = home.to_str().unwrap();
    assert_eq!(resolve_model(local, None).unwrap(), home);

    // Hub id: refs/main -> snapshot.
    let p = resolve_model("owner/name", None).unwrap();
    assert_eq!(p, repo.join("snapshots").join(main));
    assert!(p.join("model_index.json").is_file());
    assert_eq!(
        resolve_model("owner/name", Some("fp16")).unwrap(),
        repo.join("snapshots").join(other)
    );
    assert_eq!(
        resolve_model("owner/name", Some(other)).unwrap(),
        repo.join("snapshots").join(other)
    );

    // Not cached: the message says what to download and where the cache is.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let msg = match resolve_model("someone/missing-model", None) {
        Err(Error::Invalid(m)) => m,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(
        msg.contains("huggingface-cli download someone/missing-model"),
        "{msg}"
    );
    assert!(
        msg.contains(&home.join("hub").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    std::env::remove_var("HF_HUB_OFFLINE");

    // A revision that is not cached.
    let msg = match resolve_model("owner/name", Some("v2")) {
        Err(Error::Invalid(m)) => m,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(msg.contains("--revision v2"), "{msg}");

    // A revision cannot reach outside refs/: an absolute path (here a file elsewhere that holds a
    // cached commit) or `..` is refused, not followed.
    let outside = home.join("outside-ref");
    std::fs::write(&outside, main).unwrap();
    for rev in [outside.to_str().unwrap(), "../refs/main", "a/../../main"] {
        let msg = match resolve_model("owner/name", Some(rev)) {
            Err(Error::Invalid(m)) => m,
            other => panic!("revision {rev}: expected an error, got {other:?}"),
        };
        assert!(msg.contains("invalid revision"), "{msg}");
    }
    // A ref file whose content is not a commit hash is not joined into a path: a folder two
    // levels up that looks like a snapshot must not be returned.
    std::fs::create_dir_all(home.join("hub/escaped")).unwrap();
    std::fs::write(repo.join("refs/evil"), "../../escaped").unwrap();
    let msg = match resolve_model("owner/name", Some("evil")) {
        Err(Error::Invalid(m)) => m,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(msg.contains("not a 40-hex commit hash"), "{msg}");

    // Neither a folder nor a hub id.
    assert!(resolve_model("./no/such/folder/x", None).is_err());

    // HF_HUB_CACHE wins over HF_HOME.
    std::env::set_var("HF_HUB_CACHE", home.join("hub"));
    std::env::set_var("HF_HOME", home.join("elsewhere"));
    assert_eq!(
        resolve_model("owner/name", None).unwrap(),
        repo.join("snapshots").join(main)
    );
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HF_HOME");
    std::fs::remove_dir_all(home).unwrap();
}
