//! A browser calling `wick serve` from a page of another origin, as LobeChat's web app does:
//! headless Chromium (Debian `chromium`) loads a page from `http://lobe.example:PORT` (mapped
//! to loopback) that streams a chat with ollama-js's browser build. Without `OLLAMA_ORIGINS`
//! the server's CORS rules must stop it; with `OLLAMA_ORIGINS=http://lobe.example:*` it must
//! answer. Chromium or ollama-js missing fails the test with the command to install them.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::api_common::{import, store_dir, WickProcess};
use axum::http::header;
use axum::routing::get;

const MODEL: &str = "smollm2:135m";

/// Serves the page and the two modules it imports, on loopback, and passes on what the page
/// reports at `/report`; returns the port.
fn page_server(api: String, report: std::sync::mpsc::Sender<String>) -> u16 {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/js/node_modules");
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    let ollama = read(js.join("ollama/dist/browser.mjs"));
    let fetch = read(js.join("whatwg-fetch/fetch.js"));
    let page = format!(
        r#"<!doctype html><html><head>
<script type="importmap">{{"imports": {{"whatwg-fetch": "/whatwg-fetch.js"}}}}</script>
<script type="module">
import {{ Ollama }} from "/ollama.mjs";
const out = document.getElementById("out");
try {{
  const ollama = new Ollama({{ host: "{api}" }});
  const stream = await ollama.chat({{
    model: "{MODEL}",
    messages: [{{ role: "user", content: "What is the capital of Germany?" }}],
    options: {{ temperature: 0, num_predict: 24 }},
    stream: true,
  }});
  let text = "";
  for await (const part of stream) text += part.message.content;
  out.textContent = "ANSWER: " + text;
}} catch (e) {{
  out.textContent = "FAILED: " + e;
}}
await fetch("/report", {{ method: "POST", body: out.textContent }});
</script></head><body><div id="out">PENDING</div></body></html>"#
    );
    let js_type = || [(header::CONTENT_TYPE, "text/javascript")];
    let app = axum::Router::new()
        .route(
            "/index.html",
            get(move || async move { ([(header::CONTENT_TYPE, "text/html")], page) }),
        )
        .route(
            "/ollama.mjs",
            get(move || async move { (js_type(), ollama) }),
        )
        .route(
            "/whatwg-fetch.js",
            get(move || async move { (js_type(), fetch) }),
        )
        .route(
            "/report",
            axum::routing::post(move |body: String| async move {
                let _ = report.send(body);
            }),
        );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("page server");
        });
    });
    port
}

/// What the page reports after headless Chromium ran it.
fn run_page(server: &WickProcess) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let port = page_server(format!("http://{}", server.host), tx);
    let profile = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chromium-{port}"));
    let mut chromium = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--host-resolver-rules=MAP lobe.example 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://lobe.example:{port}/index.html"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running chromium (install it: apt-get install chromium)");
    let shown = rx.recv_timeout(std::time::Duration::from_secs(90));
    let _ = chromium.kill();
    let _ = chromium.wait();
    let _ = std::fs::remove_dir_all(&profile);
    shown.expect("the page reported within 90 s")
}

#[test]
fn a_page_from_another_origin_needs_ollama_origins() {
    assert!(
        Command::new("chromium").arg("--version").output().is_ok(),
        "Chromium is needed: apt-get install chromium"
    );
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/js/node_modules");
    assert!(
        js.join("ollama/dist/browser.mjs").exists(),
        "ollama-js is not installed; run scripts/test-deps.sh"
    );
    let dir = store_dir("browser");
    import(&dir, MODEL, &common::test_model(common::SMOLLM2_GGUF));

    let strict = WickProcess::start(&dir, &[]);
    let shown = run_page(&strict);
    println!("default origins: {shown}");
    assert!(shown.starts_with("FAILED: "), "CORS must block it: {shown}");
    drop(strict);

    let open = WickProcess::start(&dir, &[("OLLAMA_ORIGINS", "http://lobe.example:*")]);
    let shown = run_page(&open);
    println!("with OLLAMA_ORIGINS: {shown}");
    assert!(shown.starts_with("ANSWER: "), "{shown}");
    assert!(shown.contains("Berlin"), "{shown}");
}
