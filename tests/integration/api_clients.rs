//! The official Python clients (`ollama`, `openai`, `anthropic`) against the real `wick`
//! binary: imports SmolLM2 (and Qwen2.5-coder, the tools model, as WICK_TEST_TOOLS_MODEL)
//! into a scratch store with `wick import`, starts `wick serve` on a free loopback port,
//! and runs `python3 -m pytest tests/clients -q` with OLLAMA_HOST pointing at it and
//! WICK_TEST_REGISTRY at a loopback registry (tests/integration/common/registry.rs) that
//! publishes SmolLM2 as `library/smollm2:135m`, for the pull/copy/delete tests.
//! Missing Python packages fail the test (never skip) and name the pip command.

use crate::common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PIP: &str = "scripts/test-deps.sh";

/// The model with a tool-call syntax (SmolLM2's template has none).
const TOOLS_MODEL: &str = "qwen-coder:0.5b";

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

fn wick() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wick"))
}

#[test]
fn official_python_clients() {
    let check = Command::new("python3")
        .args(["-c", "import ollama, openai, anthropic, pytest"])
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for this test ({e}); then run: {PIP}"));
    assert!(
        check.status.success(),
        "the Python client packages are missing ({}); install them with:\n    {PIP}",
        String::from_utf8_lossy(&check.stderr).trim()
    );

    let store = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api-clients-store");
    let _ = std::fs::remove_dir_all(&store);
    let gguf = common::test_model(common::SMOLLM2_GGUF);
    for (name, file) in [
        ("smollm2:135m", gguf.clone()),
        (TOOLS_MODEL, common::test_model(common::QWEN_GGUF)),
    ] {
        let import = wick()
            .args(["import", name])
            .arg(&file)
            .env("OLLAMA_MODELS", &store)
            .output()
            .expect("running wick import");
        assert!(
            import.status.success(),
            "wick import failed: {}",
            String::from_utf8_lossy(&import.stderr)
        );
    }

    let host = format!("127.0.0.1:{}", free_port());
    let server = Server(
        wick()
            .arg("serve")
            .env("OLLAMA_HOST", &host)
            .env("OLLAMA_MODELS", &store)
            .env("WICK_KV_CACHE_BYTES", (256usize << 20).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting wick serve"),
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(&host).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "wick serve did not listen on {host}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let registry = common::registry::TestRegistry::start(true);
    let bytes = std::fs::read(&gguf).expect("reading the GGUF");
    registry.add_model("library/smollm2", "135m", bytes.into(), &[]);

    let out = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "tests/clients",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OLLAMA_HOST", &host)
        .env("WICK_TEST_TOOLS_MODEL", TOOLS_MODEL)
        .env("WICK_TEST_REGISTRY", &registry.host)
        .output()
        .expect("running pytest");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the Python client tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
