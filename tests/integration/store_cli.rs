//! The `wick` command line as a client of `wick serve` (both the real binary): `create`
//! from a Modelfile whose FROM is a local GGUF (uploaded as a blob), `pull` from the
//! loopback registry, `list`, `show`, `cp`, `rm`, `run` (one prompt, and a chat over stdin
//! that pulls first), `ps` and `stop`, and their errors.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::registry::TestRegistry;
use axum::body::Bytes;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_host() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    format!("127.0.0.1:{port}")
}

fn serve(host: &str, models: &Path) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_wick"))
        .arg("serve")
        .env("OLLAMA_HOST", host)
        .env("OLLAMA_MODELS", models)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting wick serve");
    let start = Instant::now();
    while std::net::TcpStream::connect(host).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "wick serve on {host}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server(child)
}

/// Runs `wick ARGS` against `host`; returns (success, stdout, stderr).
fn wick(host: &str, dir: &Path, args: &[&str]) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(args)
        .env("OLLAMA_HOST", host)
        .current_dir(dir)
        .output()
        .expect("running wick");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn cli_create_pull_list_show_cp_rm() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store-cli");
    let _ = std::fs::remove_dir_all(&root);
    let models = root.join("models");
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let gguf = common::test_model(common::SMOLLM2_GGUF);
    if std::fs::hard_link(&gguf, work.join("smol.gguf")).is_err() {
        std::fs::copy(&gguf, work.join("smol.gguf")).unwrap();
    }
    std::fs::write(
        work.join("Modelfile"),
        "# a test model\nFROM ./smol.gguf\nPARAMETER temperature 0\nPARAMETER stop <|im_end|>\n\
         SYSTEM \"\"\"You are terse.\nVery terse.\"\"\"\nLICENSE MIT\n",
    )
    .unwrap();

    let host = free_host();
    let (ok, _, err) = wick(&host, &work, &["list"]);
    assert!(!ok && err.contains("could not reach the server"), "{err}");

    let _server = serve(&host, &models);
    let (ok, out, err) = wick(&host, &work, &["create", "mine", "-f", "Modelfile"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("copying file sha256:"),
        "the GGUF was uploaded: {out}"
    );
    assert!(
        out.contains("writing manifest") && out.trim_end().ends_with("success"),
        "{out}"
    );

    let (ok, out, err) = wick(&host, &work, &["show", "mine"]);
    assert!(ok, "{err}");
    for want in [
        "architecture        llama",
        "quantization        Q4_1",
        "context length      8192",
        "You are terse.",
        "temperature",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    let (ok, out, _) = wick(&host, &work, &["show", "mine", "--system"]);
    assert!(ok);
    assert_eq!(out, "You are terse.\nVery terse.\n");

    let reg = TestRegistry::start(true);
    let bytes = Bytes::from(std::fs::read(&gguf).unwrap());
    reg.add_model("library/smollm2", "135m", bytes, &[]);
    let name = format!("{}/library/smollm2:135m", reg.host);
    let (ok, out, err) = wick(&host, &work, &["pull", "--insecure", &name]);
    assert!(ok, "{out}\n{err}");
    assert!(out.starts_with("pulling manifest\n"), "{out}");
    assert!(
        out.contains("verifying sha256 digest") && out.trim_end().ends_with("success"),
        "{out}"
    );
    let (ok, _, err) = wick(
        &host,
        &work,
        &["pull", "--insecure", &format!("{}/library/nope", reg.host)],
    );
    assert!(!ok);
    assert!(
        err.contains("pull model manifest: file does not exist"),
        "{err}"
    );

    let (ok, out, err) = wick(&host, &work, &["cp", "mine", "yours:1"]);
    assert!(ok, "{err}");
    assert_eq!(out, "copied 'mine' to 'yours:1'\n");
    let (ok, out, _) = wick(&host, &work, &["list"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("ID") && lines[0].contains("SIZE"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");
    for want in ["mine:latest", "yours:1", &name] {
        let row = lines
            .iter()
            .find(|l| l.starts_with(want))
            .unwrap_or_else(|| panic!("{want} in {out}"));
        assert!(row.contains("98 MB"), "{row}");
    }

    let (ok, out, err) = wick(&host, &work, &["rm", "mine", "yours:1"]);
    assert!(ok, "{err}");
    assert_eq!(out, "deleted 'mine'\ndeleted 'yours:1'\n");
    let (ok, _, err) = wick(&host, &work, &["rm", "mine"]);
    assert!(!ok);
    assert!(err.contains("model 'mine' not found"), "{err}");
    let (_, out, _) = wick(&host, &work, &["list"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains(&name));

    // run chats over stdin (with Ollama's /set parameter), ps shows the loaded model, stop
    // unloads it.
    let chat = |args: &[&str], input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wick"))
            .args(args)
            .env("OLLAMA_HOST", &host)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("wick run");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = chat(
        &["run", &name],
        "/set parameter temperature 0\nWhat is the capital of Germany?\n/bye\n",
    );
    assert!(out.contains("Set parameter 'temperature' to '0'"), "{out}");
    assert!(out.contains("Berlin"), "{out}");
    let (ok, out, _) = wick(&host, &work, &["ps"]);
    assert!(ok);
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with(name.as_str()) && row.contains("100% CPU"),
        "{out}"
    );
    let (ok, _, err) = wick(&host, &work, &["stop", &name]);
    assert!(ok, "{err}");
    let (_, out, _) = wick(&host, &work, &["ps"]);
    assert_eq!(out.lines().count(), 1, "only the header: {out}");

    // run pulls a model the server lacks, then answers the prompt given on the command line.
    let other = format!("{}/library/smollm2:other", reg.host);
    reg.add_model(
        "library/smollm2",
        "other",
        Bytes::from(std::fs::read(&gguf).unwrap()),
        &[],
    );
    let (ok, out, err) = wick(&host, &work, &["run", "--insecure", &other, "Say hello."]);
    assert!(ok, "{err}");
    assert!(
        out.contains("success") && !out.trim().ends_with("success"),
        "{out}"
    );
    let (_, out, _) = wick(&host, &work, &["list"]);
    assert!(out.contains(&other), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}
