//! Read-only model stores over real HTTP: `WICK_MODELS_READONLY` stores (a model baked into
//! the image) beside a writable `OLLAMA_MODELS` (the NAS), and an `OLLAMA_MODELS` that is a
//! real read-only bind mount. Models of every store are listed once, resolved, shown and
//! served; a pull whose blobs a read-only store holds downloads none of them and copies
//! nothing; pulls, creates, copies and deletes write only `OLLAMA_MODELS`; deleting a baked
//! model, and any write to a read-only `OLLAMA_MODELS`, is a clear 403; and no file of a
//! read-only store changes.

use crate::api_common;
use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::api_common::{config, import, ok_lines, post, pull, sha, store_dir, tags, WickProcess};
use crate::common::registry::TestRegistry;
use axum::body::Bytes;
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of Germany?";

fn gguf_bytes() -> Bytes {
    Bytes::from(std::fs::read(common::test_model(common::SMOLLM2_GGUF)).expect("SmolLM2 GGUF"))
}

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(p);
            } else {
                out.insert(p, (m.len(), m.modified().expect("mtime")));
            }
        }
    }
    out
}

fn names(models: &[Value]) -> Vec<String> {
    let mut n: Vec<String> = models
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default().to_string())
        .collect();
    n.sort();
    n
}

async fn answer(base: &str, model: &str) -> reqwest::Response {
    post(
        base,
        "/api/chat",
        json!({"model": model, "stream": false,
               "messages": [{"role": "user", "content": QUESTION}],
               "options": {"temperature": 0, "num_predict": 20}}),
    )
    .await
}

async fn assert_answers(base: &str, model: &str) {
    let resp = answer(base, model).await;
    assert_eq!(resp.status(), 200, "{model}");
    let v: Value = resp.json().await.expect("chat JSON");
    let text = v["message"]["content"].as_str().unwrap_or_default();
    assert!(text.contains("Berlin"), "{model}: {text}");
}

async fn error_of(resp: reqwest::Response, status: u16) -> String {
    assert_eq!(resp.status(), status);
    let v: Value = resp.json().await.expect("error JSON");
    v["error"].as_str().expect("error text").to_string()
}

#[tokio::test]
async fn baked_models_beside_the_nas_store() {
    let nas = store_dir("ro-nas");
    let baked = store_dir("ro-baked");
    let gguf = common::test_model(common::SMOLLM2_GGUF);
    import(&baked, "baked:latest", &gguf);
    import(&baked, "shadowed:1", &gguf);
    let before = snapshot(&baked);
    let model_blob = format!("sha256-{}", &sha(&gguf_bytes())[7..]);

    let cfg = config(
        nas.clone(),
        &[
            (
                "WICK_MODELS_READONLY",
                &format!("/nonexistent/store:{}", baked.display()),
            ),
            ("WICK_KV_CACHE_BYTES", &(128usize << 20).to_string()),
        ],
    );
    let (addr, _) = api_common::spawn_server(cfg);
    let base = format!("http://{addr}");

    // Listed, shown and served from the baked store; nothing written anywhere.
    assert_eq!(names(&tags(&base).await), ["baked:latest", "shadowed:1"]);
    let show = post(&base, "/api/show", json!({"model": "baked"})).await;
    assert_eq!(show.status(), 200);
    assert_answers(&base, "baked").await;
    assert!(!nas.join("manifests").exists() && !nas.join("blobs").exists());

    // A copy into the NAS store is a manifest there over the baked blobs; the same name in
    // both stores is listed once and resolves to the NAS copy.
    for (src, dst) in [("baked", "mine:1"), ("baked", "shadowed:1")] {
        let resp = post(
            &base,
            "/api/copy",
            json!({"source": src, "destination": dst}),
        )
        .await;
        assert_eq!(resp.status(), 200, "{src} -> {dst}");
    }
    assert!(!nas.join("blobs").exists(), "a copy copies no blob");
    let listed = tags(&base).await;
    assert_eq!(
        names(&listed),
        ["baked:latest", "mine:1", "shadowed:1"],
        "no duplicates"
    );
    assert_answers(&base, "mine:1").await;

    // Deleting the NAS copy uncovers the baked one; deleting a baked model is a 403.
    let del = |model: &'static str| {
        let base = base.clone();
        async move {
            reqwest::Client::new()
                .delete(format!("{base}/api/delete"))
                .json(&json!({"model": model}))
                .send()
                .await
                .expect("delete")
        }
    };
    assert_eq!(del("shadowed:1").await.status(), 200);
    assert_eq!(
        names(&tags(&base).await),
        ["baked:latest", "mine:1", "shadowed:1"]
    );
    let msg = error_of(del("shadowed:1").await, 403).await;
    assert!(
        msg.contains("read-only")
            && msg.contains("WICK_MODELS_READONLY")
            && msg.contains("shadowed:1"),
        "{msg}"
    );
    assert!(error_of(del("baked").await, 403)
        .await
        .contains("baked:latest"));
    // The NAS model over baked blobs deletes cleanly and prunes nothing of the baked store.
    assert_eq!(del("mine:1").await.status(), 200);

    // A pull whose weights the baked store holds downloads only what it lacks, and the
    // weights stay where they are.
    let reg = TestRegistry::start(false);
    reg.add_model(
        "library/smollm2",
        "135m",
        gguf_bytes(),
        &[("params", br#"{"temperature":0}"#)],
    );
    let name = format!("{}/library/smollm2:135m", reg.host);
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    assert_eq!(
        lines.last(),
        Some(&json!({"status": "success"})),
        "{lines:?}"
    );
    let d = sha(&gguf_bytes());
    assert_eq!(reg.served(&d), 0, "the weights were not downloaded");
    let nas_blobs: Vec<String> = std::fs::read_dir(nas.join("blobs"))
        .expect("NAS blobs")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!nas_blobs.contains(&model_blob), "{nas_blobs:?}");
    assert_eq!(
        nas_blobs.len(),
        2,
        "the params layer and the config: {nas_blobs:?}"
    );
    assert_answers(&base, &name).await;

    assert_eq!(snapshot(&baked), before, "the baked store was not written");
    let _ = std::fs::remove_dir_all(&nas);
    let _ = std::fs::remove_dir_all(&baked);
}

/// A read-only bind mount of a directory, unmounted when dropped.
struct RoMount(PathBuf);

impl RoMount {
    /// `None` (with the reason) when this kernel or sandbox refuses bind mounts.
    fn new(src: &Path, at: &Path) -> Result<RoMount, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let run = |args: &[&str]| {
            let out = std::process::Command::new("mount")
                .args(args)
                .output()
                .map_err(|e| format!("mount: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
            }
        };
        let (s, a) = (src.display().to_string(), at.display().to_string());
        run(&["--bind", &s, &a])?;
        let mount = RoMount(at.to_path_buf());
        run(&["-o", "remount,bind,ro", &a])?;
        Ok(mount)
    }
}

impl Drop for RoMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_read_only_models_dir_serves_and_refuses_writes() {
    let src = store_dir("rodir-src");
    import(
        &src,
        "baked:latest",
        &common::test_model(common::SMOLLM2_GGUF),
    );
    let at = store_dir("rodir-mount");
    let mount = match RoMount::new(&src, &at) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED: cannot make a read-only bind mount here ({why})");
            return;
        }
    };
    assert!(
        std::fs::write(at.join("probe"), b"x").is_err(),
        "the mount is read-only"
    );
    let before = snapshot(&at);
    let wick = WickProcess::start(&at, &[]);
    let base = wick.base.clone();

    assert_eq!(names(&tags(&base).await), ["baked:latest"]);
    assert_answers(&base, "baked").await;

    let reg = TestRegistry::start(false);
    reg.add_model("library/other", "1", gguf_bytes(), &[]);
    let name = format!("{}/library/other:1", reg.host);
    for stream in [true, false] {
        let resp = post(
            &base,
            "/api/pull",
            json!({"model": name, "insecure": true, "stream": stream}),
        )
        .await;
        let msg = error_of(resp, 403).await;
        assert!(
            msg.contains("read-only") && msg.contains("OLLAMA_MODELS"),
            "{msg}"
        );
    }
    assert_eq!(reg.manifest_gets(), 0, "refused before asking the registry");
    let resp = post(
        &base,
        "/api/copy",
        json!({"source": "baked", "destination": "x"}),
    )
    .await;
    assert!(error_of(resp, 403).await.contains("read-only"));
    let resp = post(&base, "/api/create", json!({"model": "y", "from": "baked"})).await;
    assert!(error_of(resp, 403).await.contains("read-only"));
    let resp = reqwest::Client::new()
        .delete(format!("{base}/api/delete"))
        .json(&json!({"model": "baked"}))
        .send()
        .await
        .expect("delete");
    assert!(error_of(resp, 403).await.contains("read-only"));
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/blobs/{}", sha(b"abc")))
        .body("abc")
        .send()
        .await
        .expect("upload");
    assert!(error_of(resp, 403).await.contains("read-only"));
    // Still serving after all that.
    assert_answers(&base, "baked").await;
    let lines = ok_lines(
        post(
            &base,
            "/api/generate",
            json!({"model": "baked", "prompt": "Hi", "options": {"num_predict": 2}}),
        )
        .await,
    )
    .await;
    assert_eq!(lines.last().map(|l| l["done"].clone()), Some(json!(true)));
    drop(wick);
    assert_eq!(snapshot(&at), before);
    drop(mount);
    let _ = std::fs::remove_dir_all(&src);
}
