//! A fleet on one machine: three `wick serve` processes, each in its own network namespace
//! with its own address (veth pairs on a bridge in a fourth, "hub" namespace), sharing one
//! model directory, behind a real nginx doing least-connections. They pull one model at
//! once from the loopback test registry (it is downloaded once), serve a concurrent load
//! through nginx, one is killed mid-stream and the load goes on on the others with only
//! its streams failing, and it rejoins after a restart.
//!
//! Every address is one this test creates inside namespaces it creates (10.213.0.0/24 on
//! the hub's bridge); nothing else is reached. It needs root, `ip` (iproute2) and nginx
//! (scripts/test-deps.sh installs both), and skips with a message only when the kernel or
//! sandbox refuses to make network namespaces.

use crate::api_common;
use crate::common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::api_common::store_dir;
use crate::common::registry::TestRegistry;
use axum::body::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

const NODES: usize = 3;
const PORT: u16 = 11434;
const NGINX_PORT: u16 = 18080;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn node_ip(i: usize) -> String {
    format!("10.213.0.{}", 10 + i)
}

/// The namespaces, the nginx and the wick processes; all removed when dropped.
struct Fleet {
    hub: String,
    nodes: Vec<String>,
    wicks: Vec<Option<Child>>,
    nginx: Option<Child>,
    models: PathBuf,
    dir: PathBuf,
}

impl Fleet {
    /// The hub with its bridge and one namespace per node; `Err` when namespaces are refused.
    fn create(models: PathBuf, dir: PathBuf) -> Result<Fleet, String> {
        let tag = std::process::id() % 100_000;
        let hub = format!("wkf{tag}-hub");
        ip(&["netns", "add", &hub])?;
        let mut fleet = Fleet {
            hub: hub.clone(),
            nodes: Vec::new(),
            wicks: Vec::new(),
            nginx: None,
            models,
            dir,
        };
        let setup = |f: &mut Fleet| -> Result<(), String> {
            ip(&["-n", &hub, "link", "set", "lo", "up"])?;
            ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &hub, "addr", "add", "10.213.0.1/24", "dev", "br0"])?;
            ip(&["-n", &hub, "link", "set", "br0", "up"])?;
            for i in 0..NODES {
                let ns = format!("wkf{tag}-n{i}");
                ip(&["netns", "add", &ns])?;
                f.nodes.push(ns.clone());
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                let hub_end = format!("vh{i}");
                ip(&[
                    "-n", &hub, "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ])?;
                ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0"])?;
                ip(&["-n", &hub, "link", "set", &hub_end, "up"])?;
                let addr = format!("{}/24", node_ip(i));
                ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            }
            Ok(())
        };
        setup(&mut fleet)?;
        fleet.wicks = (0..NODES).map(|_| None).collect();
        Ok(fleet)
    }

    fn start_wick(&mut self, i: usize) {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.nodes[i],
                env!("CARGO_BIN_EXE_wick"),
                "serve",
            ])
            .env("OLLAMA_HOST", format!("{}:{PORT}", node_ip(i)))
            .env("OLLAMA_MODELS", &self.models)
            .env("WICK_KV_CACHE_BYTES", (64usize << 20).to_string())
            .env("WICK_NUM_THREADS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("starting wick serve in its namespace");
        self.wicks[i] = Some(child);
    }

    /// SIGKILL, as a crash (or a reclaimed instance) ends it.
    fn kill_wick(&mut self, i: usize) {
        if let Some(mut c) = self.wicks[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn start_nginx(&mut self) {
        let upstreams: String = (0..NODES)
            .map(|i| {
                format!(
                    "    server {}:{PORT} max_fails=1 fail_timeout=2s;\n",
                    node_ip(i)
                )
            })
            .collect();
        let d = self.dir.display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             upstream wick {{\n    least_conn;\n{upstreams}  }}\n\
             server {{\n    listen 127.0.0.1:{NGINX_PORT};\n    location / {{\n\
             proxy_pass http://wick;\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
             proxy_connect_timeout 1s;\n      proxy_read_timeout 120s;\n\
             proxy_next_upstream error timeout;\n    }}\n  }}\n}}\n"
        );
        let path = self.dir.join("nginx.conf");
        std::fs::write(&path, conf).expect("writing nginx.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.hub, "nginx", "-e"])
            .arg(self.dir.join("error.log"))
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting nginx (run scripts/test-deps.sh to install it)");
        self.nginx = Some(child);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.wicks.len() {
            self.kill_wick(i);
        }
        if let Some(mut c) = self.nginx.take() {
            // SIGTERM: the master stops its workers too (SIGKILL would leave them running).
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill() only sends a signal, to a child this test started and has
                // not yet waited for (so the pid is still its own).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = c.wait();
        }
        for ns in self.nodes.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Moves the calling thread into a network namespace (threads it starts inherit it).
fn enter_netns(name: &str) {
    let f = File::open(Path::new("/var/run/netns").join(name)).expect("the namespace file");
    // SAFETY: setns() takes a valid open file descriptor of a network namespace, which `f`
    // holds for the duration of the call; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

async fn wait_listening(addr: &str) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{addr} never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A streamed request through `base`: its NDJSON objects, and whether it ended with
/// `done`. Short ones are chats; long ones (over 100 tokens) continue a count raw, so they
/// run their whole `n` tokens.
async fn chat(base: &str, n: i64) -> (Vec<Value>, bool) {
    let (path, body) = if n > 100 {
        (
            "/api/generate",
            json!({"model": model_name(), "raw": true, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
                   "options": {"num_predict": n, "temperature": 0, "stop": []}}),
        )
    } else {
        (
            "/api/chat",
            json!({"model": model_name(),
                   "messages": [{"role": "user", "content": "Count from 1 to 10."}],
                   "options": {"num_predict": n, "temperature": 0}}),
        )
    };
    let resp = match reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status() == 200 => r,
        _ => return (Vec::new(), false),
    };
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => break,
        }
    }
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let done = lines.last().is_some_and(|l| l["done"] == true);
    (lines, done)
}

/// The registry's name of the fleet's model, set once the registry is up.
static MODEL_NAME: OnceLock<String> = OnceLock::new();

fn model_name() -> String {
    MODEL_NAME.get().cloned().unwrap_or_default()
}

/// Chats served with 200 by one node, from its own `/metrics`.
async fn served(i: usize) -> f64 {
    let text = reqwest::get(format!("http://{}:{PORT}/metrics", node_ip(i)))
        .await
        .expect("node metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("wick_requests_total{route=\"/api/chat\",status=\"200\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn running(i: usize) -> f64 {
    let text = reqwest::get(format!("http://{}:{PORT}/metrics", node_ip(i)))
        .await
        .expect("node metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("vllm:num_requests_running "))
        .and_then(|v| v.parse().ok())
        .expect("vllm:num_requests_running")
}

#[test]
fn three_nodes_behind_nginx_pull_serve_fail_over_and_rejoin() {
    let models = store_dir("fleet-models");
    let dir = store_dir("fleet-run");
    let mut fleet = match Fleet::create(models.clone(), dir.clone()) {
        Ok(f) => f,
        Err(why) => {
            eprintln!("SKIPPED: this kernel or sandbox refuses network namespaces ({why})");
            return;
        }
    };
    // The test's own threads live in the hub from here on: the registry, nginx's clients.
    let hub = fleet.hub.clone();
    let (reg, gguf) = std::thread::spawn(move || {
        enter_netns(&hub);
        let reg = TestRegistry::start_at("10.213.0.1", false);
        let gguf = Bytes::from(
            std::fs::read(common::test_model(common::SMOLLM2_GGUF)).expect("SmolLM2 GGUF"),
        );
        reg.add_model(
            "library/smollm2",
            "135m",
            gguf.clone(),
            &[(
                "template",
                b"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
            )],
        );
        (reg, gguf)
    })
    .join()
    .expect("registry thread");
    let _ = MODEL_NAME.set(format!("{}/library/smollm2:135m", reg.host));
    for i in 0..NODES {
        fleet.start_wick(i);
    }
    fleet.start_nginx();
    let hub = fleet.hub.clone();
    let fleet = std::sync::Mutex::new(fleet);

    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&hub);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let lb = format!("http://127.0.0.1:{NGINX_PORT}");
                for i in 0..NODES {
                    wait_listening(&format!("{}:{PORT}", node_ip(i))).await;
                }
                wait_listening(&format!("127.0.0.1:{NGINX_PORT}")).await;

                // All three pull the model into the shared directory at once.
                let pulls = (0..NODES).map(|i| {
                    let body = json!({"model": model_name(), "insecure": true, "stream": false});
                    async move {
                        reqwest::Client::new()
                            .post(format!("http://{}:{PORT}/api/pull", node_ip(i)))
                            .json(&body)
                            .send()
                            .await
                            .expect("pull")
                            .status()
                    }
                });
                for status in futures_util::future::join_all(pulls).await {
                    assert_eq!(status, 200);
                }
                let digest = api_common::sha(&gguf);
                assert_eq!(
                    reg.served(&digest),
                    gguf.len() as u64,
                    "the weights were downloaded once"
                );

                // A concurrent load through nginx reaches every node.
                let load = |n: usize, tokens: i64| {
                    let lb = lb.clone();
                    futures_util::future::join_all((0..n).map(move |_| {
                        let lb = lb.clone();
                        async move { chat(&lb, tokens).await }
                    }))
                };
                for (lines, done) in load(9, 24).await {
                    assert!(done, "{lines:?}");
                }
                for i in 0..NODES {
                    assert!(served(i).await >= 1.0, "node {i} took part");
                }

                // Six long streams; node 1 is killed once all have started.
                let streams: Vec<_> = (0..6)
                    .map(|_| {
                        let lb = lb.clone();
                        tokio::spawn(async move { chat(&lb, 400).await })
                    })
                    .collect();
                let start = Instant::now();
                let mut on_victim;
                loop {
                    let counts = futures_util::future::join_all((0..NODES).map(running)).await;
                    on_victim = counts[1];
                    if counts.iter().sum::<f64>() == 6.0 {
                        break;
                    }
                    assert!(start.elapsed() < Duration::from_secs(60), "{counts:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(on_victim >= 1.0, "least_conn gave node 1 a stream");
                fleet.lock().expect("fleet").kill_wick(1);
                // The load goes on meanwhile, on the other two.
                for (lines, done) in load(6, 16).await {
                    assert!(done, "{lines:?}");
                }
                let mut failed = 0.0;
                for s in streams {
                    let (lines, done) = s.await.expect("stream task");
                    if !done {
                        failed += 1.0;
                    } else {
                        let last = lines.last().expect("final object");
                        assert_eq!(last["eval_count"], 400, "a whole answer: {last}");
                    }
                }
                assert_eq!(failed, on_victim, "only the killed node's streams failed");

                // Node 1 comes back and takes work again.
                fleet.lock().expect("fleet").start_wick(1);
                wait_listening(&format!("{}:{PORT}", node_ip(1))).await;
                tokio::time::sleep(Duration::from_millis(2500)).await; // nginx's fail_timeout
                for (lines, done) in load(9, 16).await {
                    assert!(done, "{lines:?}");
                }
                assert!(served(1).await >= 1.0, "node 1 rejoined");
            });
        });
    });
    drop(fleet);
    let _ = std::fs::remove_dir_all(&models);
    let _ = std::fs::remove_dir_all(&dir);
}
