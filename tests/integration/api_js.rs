//! ollama-js (npm `ollama`, what LobeChat's Ollama provider uses), unchanged, against the
//! real `wick` binary with SmolLM2: runs `node --test tests/clients/js` with OLLAMA_HOST set.
//! The package must be installed (`npm ci --prefix tests/clients/js`); a missing one fails
//! the test with that command, never skips it.

use crate::common;

use std::path::Path;
use std::process::Command;

use crate::api_common::{import, store_dir, WickProcess};

const NPM: &str = "scripts/test-deps.sh";

#[test]
fn ollama_js_and_the_lobechat_flow() {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/js");
    assert!(
        js.join("node_modules/ollama/package.json").exists(),
        "ollama-js is not installed; run:\n    {NPM}"
    );
    let dir = store_dir("js");
    import(
        &dir,
        "smollm2:135m",
        &common::test_model(common::SMOLLM2_GGUF),
    );
    let server = WickProcess::start(&dir, &[]);
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "ollama_js.test.mjs"])
        .current_dir(&js)
        .env("OLLAMA_HOST", &server.host)
        .output()
        .expect("running node (is Node.js installed?)");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the ollama-js tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
