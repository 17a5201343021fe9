//! `wick`: the candlewick command line.

mod cli;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use candlewick::api;
use candlewick::config::{Config, DeviceSpec};
use candlewick::engine::generate::{generate, GenerateOptions};
use candlewick::engine::sampler::SamplingParams;
use candlewick::model::Model;
use candlewick::store::{ModelName, Store};

#[derive(Parser)]
#[command(
    name = "wick",
    version,
    about = "An Ollama-compatible LLM server on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a GGUF file or a Hugging Face safetensors directory and generate offline.
    Generate(GenerateArgs),
    /// Serve the Ollama and OpenAI APIs on OLLAMA_HOST (default 127.0.0.1:11434).
    Serve(ServeArgs),
    /// Register a local GGUF file in the model store ($OLLAMA_MODELS) under NAME.
    Import(ImportArgs),
    /// Pull a model from a registry through the server at OLLAMA_HOST.
    Pull(cli::PullArgs),
    /// List the server's models.
    #[command(alias = "ls")]
    List,
    /// Show a model's details, template, parameters, system message or license.
    Show(cli::ShowArgs),
    /// Copy a model under a new name.
    Cp(cli::CpArgs),
    /// Remove models.
    Rm(cli::RmArgs),
    /// Create a model from a Modelfile.
    Create(cli::CreateArgs),
    /// Chat with a model through the server (pulls it first if needed).
    Run(cli::RunArgs),
    /// List the loaded models.
    Ps,
    /// Unload a model.
    Stop(cli::StopArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where models run: cpu, cuda or cuda:N (default: $WICK_DEVICE, else cpu).
    #[arg(long)]
    device: Option<DeviceSpec>,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// Model name, e.g. `smollm2:135m`.
    name: String,
    /// The .gguf file.
    path: PathBuf,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A .gguf file or a directory with config.json, tokenizer.json and *.safetensors.
    path: PathBuf,
    #[arg(long, short)]
    prompt: String,
    /// Feed the prompt as is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens to generate (-1: until a stop or the context is full).
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    num_predict: i64,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Context length (prompt + output).
    #[arg(long, default_value_t = 4096)]
    num_ctx: usize,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, env = "WICK_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
}

fn main() -> ExitCode {
    // Before any other thread exists: it sets environment variables candle reads.
    candlewick::model::init_threads();
    let cli = Cli::parse();
    // `RUST_LOG` when set; otherwise a server logs its requests and the rest only warnings.
    let default = if matches!(cli.command, Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => run_serve(args),
        Command::Import(args) => run_import(args),
        Command::Pull(args) => cli::pull(args).map_err(Into::into),
        Command::List => cli::list().map_err(Into::into),
        Command::Show(args) => cli::show(args).map_err(Into::into),
        Command::Cp(args) => cli::cp(args).map_err(Into::into),
        Command::Rm(args) => cli::rm(args).map_err(Into::into),
        Command::Create(args) => cli::create(args).map_err(Into::into),
        Command::Run(args) => cli::run(args).map_err(Into::into),
        Command::Ps => cli::ps().map_err(Into::into),
        Command::Stop(args) => cli::stop(args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::from_env()?;
    if let Some(device) = args.device {
        config.device = device;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = config.host.clone();
        let listener = tokio::net::TcpListener::bind((addr.host.as_str(), addr.port))
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(models = %config.models_dir.display(), device = %config.device, "model store");
        eprintln!("Listening on {local} (version {})", api::OLLAMA_VERSION);
        let state = api::AppState::new(config)?;
        api::serve(listener, state, shutdown_signal()).await?;
        eprintln!("shut down");
        anyhow::Ok(())
    })
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn run_import(args: ImportArgs) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let name = ModelName::parse(&args.name)?;
    let store = Store::new(&config.models_dir);
    let m = store
        .import_gguf(&name, &args.path)
        .with_context(|| format!("importing {}", args.path.display()))?;
    println!(
        "imported {} as {} ({} bytes, {})",
        args.path.display(),
        m.name.display_short(),
        m.size,
        &m.digest[..12.min(m.digest.len())]
    );
    Ok(())
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let t0 = std::time::Instant::now();
    let model = std::sync::Arc::new(
        Model::load(&args.path, &candlewick::model::open_device(args.device)?)
            .with_context(|| format!("loading {}", args.path.display()))?,
    );
    eprintln!(
        "loaded {} in {:.2}s",
        args.path.display(),
        t0.elapsed().as_secs_f64()
    );

    let prompt = if args.raw {
        args.prompt.clone()
    } else {
        let template = model
            .chat_template
            .as_ref()
            .context("the model has no chat template; use --raw")?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
        template.render(&messages, None, true, &serde_json::Map::new())?
    };
    // Chat templates write their own bos token; raw prompts get one if the model wants it.
    let ids = model
        .tokenizer
        .encode(&prompt, args.raw && model.tokenizer.add_bos())?;
    let opts = GenerateOptions {
        sampling,
        num_predict: usize::try_from(args.num_predict).ok(),
        stop: args.stop,
        num_ctx: args.num_ctx,
        ..GenerateOptions::default()
    };
    let mut stdout = std::io::stdout().lock();
    let out = generate(&model, &ids, &opts, |piece| {
        // A closed stdout (e.g. `| head`) just ends the output early.
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let rate = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt tokens: {}, prefill: {:.1} tokens/s, generated: {} tokens, decode: {:.1} tokens/s, finish: {:?}",
        out.prompt_tokens,
        rate(out.prompt_tokens, out.prefill_time),
        out.tokens.len(),
        rate(out.tokens.len().saturating_sub(1), out.decode_time),
        out.finish
    );
    Ok(())
}
