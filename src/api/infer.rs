//! The one internal generation request both dialects translate into, and the path from it
//! to a stream of text: resolve the model, load it, render the prompt, tokenize, submit to
//! the engine, and pump the engine's blocking stream into an async channel. Dropping the
//! receiver cancels the sequence.

use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::config::KeepAlive;
use crate::engine::sampler::SamplingParams;
use crate::engine::{
    Candidate, EngineError, Event, FinishReason, Grammar, ImageSpan, Reasoning, Request, Summary,
    TokenLogprobs, MAX_TOP_LOGPROBS,
};
use crate::model::{
    AnyModel, Error as ModelError, Model, Piece, ReplyFormat, ReplyParser, ToolCall, ToolSyntax,
};
use crate::store::{LocalModel, ModelName, MEDIA_SYSTEM};

use super::error::ApiError;
use super::images;
use super::metrics::Metrics;
use super::structured::{self, ToolChoice};
use super::{AppState, Drain};
use crate::engine::manager::InUse;
use crate::model::vision::ImageEmbeds as EncodedImage;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A conversation (OpenAI-style message objects) rendered with the chat template.
    Chat {
        messages: Vec<Value>,
        tools: Option<Vec<Value>>,
    },
    /// A single prompt: templated as one user turn unless `raw`.
    Generate {
        prompt: String,
        /// Text after the gap (fill-in-the-middle); needs the model's FIM tokens.
        suffix: Option<String>,
        system: Option<String>,
        raw: bool,
        /// Tokens from a previous response's `context`, put before the prompt.
        context: Vec<u32>,
    },
}

impl Input {
    /// No prompt at all: Ollama's "just load (or unload) the model".
    fn is_empty(&self) -> bool {
        match self {
            Input::Chat { messages, .. } => messages.is_empty(),
            Input::Generate {
                prompt, context, ..
            } => prompt.is_empty() && context.is_empty(),
        }
    }
}

/// The internal request.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// The model as the client spelled it (echoed back in responses).
    pub model: String,
    pub input: Input,
    /// The images of the input, in the order of their [`super::images::MARKER`]s in it.
    pub images: Vec<Vec<u8>>,
    pub options: Options,
    pub keep_alive: Option<KeepAlive>,
    /// `think`: `None` leaves thinking on for models that think; levels count as `true`.
    pub think: Option<bool>,
    /// Structured output: what the answer must match (see [`super::structured`]). A
    /// thinking model reasons freely first; the constraint applies to the answer.
    pub format: Option<Grammar>,
    /// Whether the model must, may or must not call the offered tools.
    pub tool_choice: ToolChoice,
    /// At most one call (`parallel_tool_calls: false`).
    pub one_call: bool,
    /// Each token's log-probability and this many alternatives ([`Out::Logprob`]).
    pub logprobs: Option<usize>,
}

/// Reads a `keep_alive` field (a duration string, seconds, or null).
pub fn parse_keep_alive(v: Option<&Value>) -> Result<Option<KeepAlive>, ApiError> {
    match v {
        None => Ok(None),
        Some(v) => KeepAlive::from_json(v).map_err(ApiError::BadRequest),
    }
}

/// A tool's result as a `tool` turn of the chat template. `name` (the function called,
/// found by the call's id) goes in both spellings templates read.
pub fn tool_turn(content: String, call_id: &str, name: Option<&String>) -> Value {
    let mut t = serde_json::json!({"role": "tool", "content": content, "tool_call_id": call_id});
    if let Some(name) = name {
        t["name"] = name.clone().into();
        t["tool_name"] = name.clone().into();
    }
    t
}

/// Reads chat's `logprobs` (a bool) and `top_logprobs` (0..=20 alternatives), as Ollama and
/// OpenAI chat spell them: the alternatives to report, or `None` for no logprobs.
pub fn parse_logprobs(
    logprobs: Option<&Value>,
    top_logprobs: Option<&Value>,
) -> Result<Option<usize>, ApiError> {
    let on = match logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::BadRequest("logprobs must be a boolean".into())),
    };
    let top = match top_logprobs {
        None | Some(Value::Null) => 0,
        Some(v) => logprob_count(v, "top_logprobs")?,
    };
    if top > 0 && !on {
        return Err(ApiError::BadRequest(
            "top_logprobs requires logprobs to be true".into(),
        ));
    }
    Ok(on.then_some(top))
}

/// Reads text completions' `logprobs`: a count of alternatives (0 still reports the chosen
/// token's), or null.
pub fn parse_completion_logprobs(logprobs: Option<&Value>) -> Result<Option<usize>, ApiError> {
    match logprobs {
        None | Some(Value::Null) => Ok(None),
        Some(v) => logprob_count(v, "logprobs").map(Some),
    }
}

fn logprob_count(v: &Value, name: &str) -> Result<usize, ApiError> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= MAX_TOP_LOGPROBS)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{name} must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {v}"
            ))
        })
}

/// A logprob value JSON can carry: an impossible token's -inf reads as -9999 (OpenAI's
/// floor) instead of becoming null.
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    }
}

/// A token's text as logprobs spell it: U+FFFD where it ends inside a character.
fn token_text(c: &Candidate) -> String {
    String::from_utf8_lossy(&c.bytes).into_owned()
}

/// One token's entry in the shape Ollama, OpenAI chat and the Responses API share:
/// `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.
pub fn logprob_json(lp: &TokenLogprobs) -> Value {
    let one = |c: &Candidate| {
        serde_json::json!({
            "token": token_text(c),
            "logprob": finite(c.logprob),
            "bytes": c.bytes,
        })
    };
    let mut v = one(&lp.chosen);
    v["top_logprobs"] = lp.top.iter().map(one).collect();
    v
}

/// Text completions' `logprobs` object for `entries`, whose text starts at character
/// `offset` of the output: `{tokens, token_logprobs, top_logprobs, text_offset}`.
pub fn completion_logprobs_json(entries: &[TokenLogprobs], offset: &mut usize) -> Value {
    let mut tokens = Vec::new();
    let mut values = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for lp in entries {
        let token = token_text(&lp.chosen);
        offsets.push(*offset);
        *offset += token.chars().count();
        tokens.push(token);
        values.push(finite(lp.chosen.logprob));
        let top: Map<String, Value> = lp
            .top
            .iter()
            .map(|c| (token_text(c), finite(c.logprob).into()))
            .collect();
        tops.push(Value::Object(top));
    }
    serde_json::json!({
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// Reads a `think` field: a bool, a level string (`"low"`..`"max"`) or null.
pub fn parse_think(v: Option<&Value>) -> Result<Option<bool>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if ["low", "medium", "high", "max"].contains(&s.as_str()) => {
            Ok(Some(true))
        }
        Some(v) => Err(ApiError::BadRequest(format!(
            "invalid think value: {v} (expected true, false, \"low\", \"medium\", \"high\" or \"max\")"
        ))),
    }
}

/// Generation options; `None` means "not sent" so only what the client set overrides the
/// model's `params` layer and the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub num_predict: Option<i64>,
    pub num_ctx: Option<i64>,
    pub stop: Option<Vec<String>>,
    /// Ours: speculative decoding's draft tokens per step (0 off).
    pub num_draft: Option<i64>,
}

/// Option keys Ollama knows but we do not act on; accepted with their types checked.
const IGNORED_INT: &[&str] = &[
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "num_keep",
    "draft_num_predict",
    "mirostat",
];
const IGNORED_FLOAT: &[&str] = &["typical_p", "tfs_z", "mirostat_tau", "mirostat_eta"];
const IGNORED_BOOL: &[&str] = &[
    "use_mmap",
    "numa",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mlock",
    "embedding_only",
    "penalize_newline",
];

impl Options {
    /// Parses an Ollama `options` object. Unknown keys are ignored and `null` means unset;
    /// a value of the wrong type is an error naming the option and the type it needs.
    pub fn from_map(map: &Map<String, Value>) -> Result<Options, ApiError> {
        let mut o = Options::default();
        for (key, value) in map {
            if value.is_null() {
                continue;
            }
            let float = || {
                value.as_f64().map(|v| v as f32).ok_or(ApiError::BadOption {
                    name: key.clone(),
                    ty: "float32",
                })
            };
            // Integer options accept JSON floats, truncated.
            let int = || {
                value
                    .as_i64()
                    .or_else(|| value.as_f64().map(|f| f as i64))
                    .ok_or(ApiError::BadOption {
                        name: key.clone(),
                        ty: "int",
                    })
            };
            match key.as_str() {
                "temperature" => o.temperature = Some(float()?),
                "top_p" => o.top_p = Some(float()?),
                "min_p" => o.min_p = Some(float()?),
                "repeat_penalty" => o.repeat_penalty = Some(float()?),
                "presence_penalty" => o.presence_penalty = Some(float()?),
                "frequency_penalty" => o.frequency_penalty = Some(float()?),
                "top_k" => o.top_k = Some(int()?),
                "repeat_last_n" => o.repeat_last_n = Some(int()?),
                "seed" => o.seed = Some(int()?),
                "num_predict" => o.num_predict = Some(int()?),
                "num_ctx" => o.num_ctx = Some(int()?),
                "num_draft" => o.num_draft = Some(int()?),
                "stop" => o.stop = Some(string_list(value, key)?),
                // Constraints, read by `structured::ollama_options`.
                k if super::structured::OPTION_KEYS.contains(&k) => {}
                k if IGNORED_INT.contains(&k) => {
                    int()?;
                }
                k if IGNORED_FLOAT.contains(&k) => {
                    float()?;
                }
                k if IGNORED_BOOL.contains(&k) => {
                    value.as_bool().ok_or(ApiError::BadOption {
                        name: key.clone(),
                        ty: "bool",
                    })?;
                }
                k => tracing::debug!(option = k, "invalid option provided"),
            }
        }
        Ok(o)
    }

    /// `self` over a request's Ollama `options` map (the /v1 dialects accept one beside
    /// their own fields, which win).
    pub fn over_map(self, map: Option<&Map<String, Value>>) -> Result<Options, ApiError> {
        Ok(match map {
            Some(m) => self.over(Options::from_map(m)?),
            None => self,
        })
    }

    /// `self` with unset fields taken from `base`.
    pub fn over(self, base: Options) -> Options {
        Options {
            temperature: self.temperature.or(base.temperature),
            top_k: self.top_k.or(base.top_k),
            top_p: self.top_p.or(base.top_p),
            min_p: self.min_p.or(base.min_p),
            repeat_penalty: self.repeat_penalty.or(base.repeat_penalty),
            repeat_last_n: self.repeat_last_n.or(base.repeat_last_n),
            presence_penalty: self.presence_penalty.or(base.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(base.frequency_penalty),
            seed: self.seed.or(base.seed),
            num_predict: self.num_predict.or(base.num_predict),
            num_ctx: self.num_ctx.or(base.num_ctx),
            stop: self.stop.or(base.stop),
            num_draft: self.num_draft.or(base.num_draft),
        }
    }

    /// `num_ctx` when it is a usable length.
    fn context_length(&self) -> Option<usize> {
        self.num_ctx
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
    }

    /// The engine request for `prompt` with these options over Ollama's defaults.
    fn to_request(&self, prompt: Vec<u32>) -> Request {
        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self
                .top_k
                .map_or(d.top_k, |k| usize::try_from(k).unwrap_or(0)),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            // Negative seeds mean "random", as Ollama's -1.
            seed: self.seed.and_then(|s| u64::try_from(s).ok()),
        };
        let mut req = Request::new(prompt);
        req.sampling = sampling;
        // -1 (unlimited) and -2 (fill the context) both run to a stop or the context end.
        req.num_predict = self.num_predict.and_then(|n| usize::try_from(n).ok());
        req.num_ctx = self.context_length();
        req.stop = self.stop.clone().unwrap_or_default();
        // Negative turns it off, as 0 does; the engine refuses too large values.
        req.num_draft = self.num_draft.map(|n| usize::try_from(n).unwrap_or(0));
        req
    }
}

/// A string or an array of strings (`stop`).
pub fn string_list(value: &Value, key: &str) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::BadOption {
        name: key.to_string(),
        ty: "[]string",
    };
    match value {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

/// One piece of a generation's output.
#[derive(Debug, Clone)]
pub enum Out {
    /// Answer text.
    Text(String),
    /// Reasoning of a thinking model.
    Thinking(String),
    /// A complete tool call.
    ToolCall(ToolCall),
    /// A generated token's log-probabilities (only when the request asked), sent before
    /// the text the token completes.
    Logprob(TokenLogprobs),
    Done(Finished),
    /// The stream failed after it started.
    Error(String),
}

/// The end of a generation.
#[derive(Debug, Clone)]
pub struct Finished {
    /// `stop` or `length`.
    pub reason: &'static str,
    pub summary: Summary,
    /// Prompt and generated token ids (`context` in `/api/generate`).
    pub context: Vec<u32>,
}

/// What starting a request gave.
pub enum Started {
    /// Empty input: the model was loaded (`done_reason: "load"`).
    Loaded,
    /// Empty input with `keep_alive: 0`: the model was unloaded (`done_reason: "unload"`).
    Unloaded,
    /// Output arrives on the channel and always ends with `Done` or `Error`.
    Stream(mpsc::Receiver<Out>),
}

/// Resolves a client's model name, with the errors Ollama gives.
pub fn resolve(state: &AppState, model: &str) -> Result<LocalModel, ApiError> {
    let name = ModelName::parse(model)?;
    match state.store.resolve(&name) {
        Ok(m) => Ok(m),
        Err(crate::store::StoreError::NotFound(_)) => Err(ApiError::ModelNotFound(model.into())),
        Err(e) => Err(e.into()),
    }
}

/// Starts a request. Everything the request says is checked before a model is loaded (or
/// another evicted) for it; the prompt is rendered and tokenized and its grammar compiled on
/// blocking threads, so a long conversation never stalls the async threads that serve
/// everyone else.
pub async fn start(state: &AppState, req: InferRequest) -> Result<Started, ApiError> {
    let info = resolve(state, &req.model)?;
    refuse_embedding_model(&info, &req)?;
    if req.input.is_empty() {
        if req.keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
            state.models.unload(&info).await;
            return Ok(Started::Unloaded);
        }
        let _in_use = state
            .models
            .acquire(&state.store, &info, req.keep_alive)
            .await?;
        return Ok(Started::Loaded);
    }
    submit(state, &info, req).await
}

/// Prepares a request with input, compiles its grammar and submits it to the engine.
async fn submit(
    state: &AppState,
    info: &LocalModel,
    req: InferRequest,
) -> Result<Started, ApiError> {
    let Prepared {
        in_use,
        mut engine_req,
        parser,
        grammar,
        reasoning,
    } = prepare(state, info, req).await?;
    let engine = in_use.loaded().engine.clone();
    if let Some(grammar) = grammar {
        let compiler = engine.clone();
        engine_req.constraint = Some(
            tokio::task::spawn_blocking(move || compiler.compile(&grammar))
                .await
                .map_err(|e| ApiError::Internal(format!("compiling the grammar: {e}")))?
                .map_err(ApiError::Engine)?,
        );
        engine_req.reasoning = reasoning;
    }
    let prompt = engine_req.prompt.clone();
    let stream = match engine.submit(engine_req) {
        Ok(s) => s,
        Err(EngineError::Busy) => {
            state.metrics.rejected_busy.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Busy);
        }
        Err(e) => return Err(ApiError::Engine(e)),
    };
    let (tx, rx) = mpsc::channel(256);
    let (metrics, drain) = (state.metrics.clone(), state.drain.clone());
    tokio::task::spawn_blocking(move || pump(stream, tx, in_use, prompt, parser, metrics, drain));
    Ok(Started::Stream(rx))
}

/// [`start`] for a request with input (the dialects refuse an empty one): its output.
pub async fn start_stream(
    state: &AppState,
    req: InferRequest,
) -> Result<mpsc::Receiver<Out>, ApiError> {
    match start(state, req).await? {
        Started::Stream(rx) => Ok(rx),
        Started::Loaded | Started::Unloaded => {
            Err(ApiError::Internal("no prompt to generate from".into()))
        }
    }
}

/// The prompt's length in tokens as [`start`] would submit it (Anthropic's count_tokens).
pub async fn count_prompt_tokens(state: &AppState, req: InferRequest) -> Result<usize, ApiError> {
    let info = resolve(state, &req.model)?;
    refuse_embedding_model(&info, &req)?;
    Ok(prepare(state, &info, req).await?.engine_req.prompt.len())
}

/// Chat and generate on an embedding model: refused before it loads, as Ollama checks a
/// model's capabilities first (empty input included).
fn refuse_embedding_model(info: &LocalModel, req: &InferRequest) -> Result<(), ApiError> {
    if !info.is_embedding() {
        return Ok(());
    }
    let what = match req.input {
        Input::Chat { .. } => "chat",
        Input::Generate { .. } => "generate",
    };
    Err(ApiError::BadRequest(format!(
        "{:?} does not support {what}",
        req.model
    )))
}

/// The checks that need no loaded model: the model's and the request's options together,
/// as the engine request they make (no prompt yet).
fn check_options(
    state: &AppState,
    info: &LocalModel,
    req: &InferRequest,
) -> Result<Request, ApiError> {
    let base = state
        .store
        .params(info)
        .map(|p| Options::from_map(&p))
        .transpose()?
        .unwrap_or_default();
    let mut engine_req = req.options.clone().over(base).to_request(Vec::new());
    engine_req.logprobs = req.logprobs;
    engine_req
        .sampling
        .validate()
        .map_err(|e| ApiError::Engine(EngineError::Sampling(e)))?;
    Ok(engine_req)
}

/// A request checked, its model loaded, its prompt rendered and tokenized.
struct Prepared {
    /// Keeps the model loaded while the request runs.
    in_use: InUse,
    /// The engine request with its prompt, not yet constrained.
    engine_req: Request,
    parser: ReplyParser,
    /// The whole output's grammar (answer constraint and tool choice), not yet compiled.
    grammar: Option<Grammar>,
    /// A thinking model's free reasoning before the constrained answer.
    reasoning: Option<Reasoning>,
}

/// Checks the options, loads the model, checks the request against it (thinking, tools,
/// tool choice and structured output), renders the template and tokenizes.
async fn prepare(
    state: &AppState,
    info: &LocalModel,
    mut req: InferRequest,
) -> Result<Prepared, ApiError> {
    let mut engine_req = check_options(state, info, &req)?;
    let system_layer = state.store.layer_text(info, MEDIA_SYSTEM);
    let in_use = {
        let _waiting = state.metrics.waiting_for_load();
        state
            .models
            .acquire(&state.store, info, req.keep_alive)
            .await?
    };
    let model = in_use
        .loaded()
        .model
        .generator()
        .cloned()
        .ok_or(ApiError::Engine(EngineError::EmbeddingOnly))?;
    let format = match (&req.input, &model.chat_template) {
        (Input::Generate { raw: true, .. }, _) | (_, None) => ReplyFormat::plain(),
        (_, Some(t)) => ReplyFormat::from_template(t.source()),
    };
    if req.think == Some(true) && !format.thinking {
        return Err(ApiError::BadRequest(format!(
            "\"{}\" does not support thinking",
            req.model
        )));
    }
    if req.tool_choice == ToolChoice::None {
        // "none": the model is not told about the tools and its output is not parsed for
        // calls.
        if let Input::Chat { tools, .. } = &mut req.input {
            *tools = None;
        }
    }
    let tools: Vec<String> = match &req.input {
        Input::Chat { tools: Some(t), .. } => t
            .iter()
            .filter_map(|t| t.pointer("/function/name")?.as_str())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    if !tools.is_empty() && format.tools == ToolSyntax::None {
        let n = &info.name;
        return Err(ApiError::BadRequest(format!(
            "{}/{}/{}:{} does not support tools",
            n.host, n.namespace, n.model, n.tag
        )));
    }
    let offered: &[Value] = match &req.input {
        Input::Chat { tools: Some(t), .. } => t,
        _ => &[],
    };
    let grammar = structured::output_grammar(
        req.format.take(),
        &req.tool_choice,
        req.one_call,
        offered,
        format.tools,
    )?;
    // With a constraint, a thinking model reasons freely inside its `<think>` block and the
    // constraint applies after `</think>`; without that token it answers without thinking.
    let close = model.tokenizer.token_id("</think>");
    let open = model.tokenizer.token_id("<think>");
    let thinking =
        format.thinking && req.think != Some(false) && (grammar.is_none() || close.is_some());
    if !req.images.is_empty() && model.vision.is_none() {
        return Err(ApiError::BadRequest(format!(
            "\"{}\" does not support image input",
            req.model
        )));
    }
    let model_name = req.model.clone();
    let (input, images) = (req.input, req.images);
    let (prompt, in_thinking, spans) = tokio::task::spawn_blocking(move || {
        let images = match &model.vision {
            // Encoding an image is seconds of CPU: this blocking thread's, not the engine's.
            Some(v) => images
                .iter()
                .map(|bytes| v.embed(bytes))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| match e {
                    ModelError::Image(_) => ApiError::BadRequest(e.to_string()),
                    e => ApiError::Internal(format!("encoding an image: {e}")),
                })?,
            None => Vec::new(),
        };
        tokenize(
            &model,
            &model_name,
            input,
            &images,
            system_layer,
            format,
            thinking,
        )
    })
    .await
    .map_err(|e| ApiError::Internal(format!("rendering the prompt failed: {e}")))??;
    engine_req.images = spans;
    let reasoning = match (thinking, close, &grammar) {
        (true, Some(close), Some(_)) => Some(Reasoning {
            open: if in_thinking { None } else { open },
            close,
        }),
        _ => None,
    };
    engine_req.prompt = prompt;
    Ok(Prepared {
        in_use,
        engine_req,
        parser: ReplyParser::new(format, thinking, in_thinking, tools),
        grammar,
        reasoning,
    })
}

/// Starts a streamed request. When its model still has to load, the stream is handed back
/// at once, so the response headers go out before the load (a gateway's first-byte timeout
/// does not fire during a cold start), and the load happens inside the stream: what fails
/// after this point arrives as the stream's `Error` item, as any mid-stream failure does.
/// Bad names and unknown models are still refused before anything is sent. A model that is
/// loaded already starts as [`start`] does.
pub async fn start_streaming(state: &AppState, req: InferRequest) -> Result<Started, ApiError> {
    let info = resolve(state, &req.model)?;
    refuse_embedding_model(&info, &req)?;
    let loaded = state
        .models
        .list()
        .await
        .iter()
        .any(|l| l.info.manifest_path == info.manifest_path);
    // Tools, thinking, output grammars and images are checked against the model's
    // template, vocabulary and vision: such requests load first, so a refusal is still a 400.
    let offers_tools = matches!(&req.input, Input::Chat { tools: Some(t), .. } if !t.is_empty());
    let model_checks =
        offers_tools || req.think == Some(true) || req.format.is_some() || !req.images.is_empty();
    if loaded || req.input.is_empty() || model_checks {
        return start(state, req).await;
    }
    // Bad options are still a 400 before any header goes out.
    check_options(state, &info, &req)?;
    let (tx, rx) = mpsc::channel(256);
    let state = state.clone();
    tokio::spawn(async move {
        match submit(&state, &info, req).await {
            Ok(Started::Stream(mut inner)) => {
                // Dropping `inner` (the client left) cancels the sequence.
                while let Some(out) = inner.recv().await {
                    if tx.send(out).await.is_err() {
                        return;
                    }
                }
            }
            Ok(Started::Loaded | Started::Unloaded) => {
                let _ = tx
                    .send(Out::Error("no prompt to generate from".into()))
                    .await;
            }
            Err(e) => {
                let _ = tx.send(Out::Error(e.to_string())).await;
            }
        }
    });
    Ok(Started::Stream(rx))
}

/// Sentence embeddings of `inputs`, one per input: an embedding model's own (pooled and
/// normalised as its metadata says), or a chat model's mean-pooled final hidden states (not
/// normalised).
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    pub load_duration: Duration,
    pub total_duration: Duration,
}

/// Embeds each input with an embedding model, or with a chat model's final hidden states.
/// The inputs go through the model's engine like prompts (its queue and batching, on the
/// model's device; a chat model's KV blocks), taking one place in the queue together. An input longer than the context is cut to it, or refused
/// when `truncate` is false.
pub async fn embed(
    state: &AppState,
    model: &str,
    inputs: Vec<String>,
    truncate: bool,
    options: Options,
    keep_alive: Option<KeepAlive>,
) -> Result<Embedded, ApiError> {
    let start = Instant::now();
    let info = resolve(state, model)?;
    let in_use = state
        .models
        .acquire(&state.store, &info, keep_alive)
        .await?;
    let load_duration = start.elapsed();
    let model = in_use.loaded().model.clone();
    let num_ctx = options
        .context_length()
        .unwrap_or(state.config.context_length);
    let requests = tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .map(|text| {
                let ids = match &model {
                    // With its special tokens: even "" is `[CLS] [SEP]`.
                    AnyModel::Embedder(e) => e.encode(text)?,
                    AnyModel::Generator(m) => {
                        let ids = m.tokenizer.encode(text, m.tokenizer.add_bos())?;
                        if ids.is_empty() {
                            // An empty string still gets a vector, as in Ollama: embed a
                            // space.
                            m.tokenizer.encode(" ", true)?
                        } else {
                            ids
                        }
                    }
                };
                Ok(Request {
                    num_ctx: Some(num_ctx),
                    truncate,
                    ..Request::embedding(ids)
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizing failed: {e}")))?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let streams = match in_use.loaded().engine.submit_all(requests) {
        Ok(s) => s,
        Err(EngineError::Busy) => {
            state.metrics.rejected_busy.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Busy);
        }
        Err(EngineError::PromptTooLong { .. }) => {
            return Err(ApiError::BadRequest(
                "the input length exceeds the context length".into(),
            ))
        }
        Err(e) => return Err(ApiError::Engine(e)),
    };
    // The streams block: read them on a blocking thread, which cancels them if this request
    // goes away (its receiver is dropped) before they finish.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let drain = state.drain.clone();
    tokio::task::spawn_blocking(move || {
        let _in_use = in_use;
        let result = collect_embeddings(&streams, || tx.is_closed() || drain.is_cut());
        let _ = tx.send(result);
    });
    let mut out = rx
        .await
        .map_err(|_| ApiError::Internal("the embedding was cancelled".into()))??;
    out.load_duration = load_duration;
    out.total_duration = start.elapsed();
    Ok(out)
}

/// Reads each stream's embedding and summary.
fn collect_embeddings(
    streams: &[crate::engine::RequestStream],
    gone: impl Fn() -> bool,
) -> Result<Embedded, ApiError> {
    let mut out = Embedded {
        vectors: Vec::with_capacity(streams.len()),
        prompt_tokens: 0,
        load_duration: Duration::ZERO,
        total_duration: Duration::ZERO,
    };
    for stream in streams {
        let mut vector = None;
        loop {
            if gone() {
                return Err(ApiError::Internal("request canceled".into()));
            }
            match stream.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Embedding(v)) => vector = Some(v),
                Ok(Event::Done(summary)) => {
                    out.prompt_tokens += summary.prompt_eval_count;
                    match (summary.finish, vector.take()) {
                        (FinishReason::Stop, Some(v)) => out.vectors.push(v),
                        _ => {
                            return Err(ApiError::Internal(
                                summary
                                    .error
                                    .unwrap_or_else(|| "the embedding did not finish".into()),
                            ))
                        }
                    }
                    break;
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ApiError::Internal("the engine stopped".into()))
                }
            }
        }
    }
    Ok(out)
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Tokenizes `text`; with `images`, each [`images::MARKER`] in it becomes its image's place:
/// the vision's opening tokens, a row per embedding, the closing tokens.
fn encode_marked(
    model: &Model,
    text: &str,
    add_bos: bool,
    images: &[EncodedImage],
) -> Result<(Vec<u32>, Vec<ImageSpan>), ApiError> {
    let encode = |text: &str, add_bos: bool| {
        model
            .tokenizer
            .encode(text, add_bos)
            .map_err(|e| ApiError::Internal(e.to_string()))
    };
    let Some(vision) = model.vision.as_ref().filter(|_| !images.is_empty()) else {
        return Ok((encode(text, add_bos)?, Vec::new()));
    };
    let pieces: Vec<&str> = text.split(images::MARKER).collect();
    if pieces.len() - 1 != images.len() {
        return Err(ApiError::BadRequest(format!(
            "the prompt has {} places for {} images (U+FFFC in the text, or a template that \
             drops a message's content)",
            pieces.len() - 1,
            images.len()
        )));
    }
    let (mut ids, mut spans) = (encode(pieces[0], add_bos)?, Vec::new());
    for (piece, img) in pieces[1..].iter().zip(images) {
        ids.extend(&vision.open);
        spans.push(ImageSpan {
            start: ids.len(),
            embeds: img.embeds.clone(),
            hash: img.hash,
            bidirectional: img.bidirectional,
            grid: img.grid,
        });
        // The engine writes each row's placeholder id.
        ids.extend(std::iter::repeat_n(0, img.embeds.dims()[0]));
        ids.extend(&vision.close);
        ids.extend(encode(piece, false)?);
    }
    Ok((ids, spans))
}

/// Renders and tokenizes the input; also says whether the prompt ends inside an open
/// `<think>` block (templates that start the model's reasoning for it), and where its
/// images are.
fn tokenize(
    model: &Model,
    model_name: &str,
    input: Input,
    images: &[EncodedImage],
    system_layer: Option<String>,
    format: ReplyFormat,
    thinking: bool,
) -> Result<(Vec<u32>, bool, Vec<ImageSpan>), ApiError> {
    let mut extra = Map::new();
    if format.thinking {
        extra.insert("enable_thinking".into(), thinking.into());
    }
    let template = || {
        model
            .chat_template
            .as_ref()
            .ok_or_else(|| ApiError::Template("the model has no chat template".into()))
    };
    let render = |messages: &[Value], tools: Option<&[Value]>| {
        template()?
            .render(messages, tools, true, &extra)
            .map_err(|e| match e {
                ModelError::TemplateRaised(msg) => ApiError::BadRequest(msg),
                e => ApiError::Template(e.to_string()),
            })
    };
    let opens_thinking = |prompt: &str| thinking && prompt.trim_end().ends_with("<think>");
    let encode = |text: &str, add_bos: bool| encode_marked(model, text, add_bos, images);
    match input {
        Input::Chat {
            mut messages,
            tools,
        } => {
            let has_system = messages
                .first()
                .and_then(|m| m.get("role"))
                .and_then(Value::as_str)
                == Some("system");
            if let (Some(system), false) = (system_layer, has_system) {
                messages.insert(0, serde_json::json!({"role": "system", "content": system}));
            }
            // Chat templates write their own BOS.
            let text = render(&messages, tools.as_deref())?;
            let (ids, spans) = encode(&text, false)?;
            Ok((ids, opens_thinking(&text), spans))
        }
        Input::Generate {
            prompt,
            suffix: Some(suffix),
            ..
        } => {
            let t = &model.tokenizer;
            // Qwen2.5-coder's spelling, then StarCoder's (SmolLM2).
            let fim = [
                ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
                ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
            ]
            .into_iter()
            .find(|tags| tags.iter().all(|tag| t.token_id(tag).is_some()));
            let Some([pre, suf, mid]) = fim else {
                return Err(ApiError::BadRequest(format!(
                    "\"{model_name}\" does not support insert"
                )));
            };
            let text = format!("{pre}{prompt}{suf}{suffix}{mid}");
            let (ids, spans) = encode(&text, false)?;
            Ok((ids, false, spans))
        }
        Input::Generate {
            prompt,
            system,
            raw,
            mut context,
            ..
        } => {
            let ((ids, mut spans), in_thinking) = if raw {
                let add_bos = context.is_empty() && model.tokenizer.add_bos();
                (encode(&prompt, add_bos)?, false)
            } else {
                let mut messages = Vec::new();
                if let Some(system) = system.or(system_layer) {
                    messages.push(serde_json::json!({"role": "system", "content": system}));
                }
                messages.push(serde_json::json!({"role": "user", "content": prompt}));
                let text = render(&messages, None)?;
                (encode(&text, false)?, opens_thinking(&text))
            };
            spans.iter_mut().for_each(|s| s.start += context.len());
            context.extend(ids);
            Ok((context, in_thinking, spans))
        }
    }
}

/// Moves the engine's events into the async channel until the end, or until the receiver
/// is gone (the client left), which cancels the sequence.
fn pump(
    stream: crate::engine::RequestStream,
    tx: mpsc::Sender<Out>,
    in_use: InUse,
    mut context: Vec<u32>,
    mut parser: ReplyParser,
    metrics: Arc<Metrics>,
    drain: Arc<Drain>,
) {
    // Held until the output ends so the model is not unloaded under the request.
    let _in_use = in_use;
    let submitted = Instant::now();
    let mut last_token: Option<Instant> = None;
    let mut pieces = Vec::new();
    let send_all = |pieces: &mut Vec<Piece>| {
        pieces.drain(..).all(|p| {
            let out = match p {
                Piece::Content(t) => Out::Text(t),
                Piece::Thinking(t) => Out::Thinking(t),
                Piece::ToolCall(c) => Out::ToolCall(c),
            };
            tx.blocking_send(out).is_ok()
        })
    };
    loop {
        if tx.is_closed() {
            stream.cancel();
            return;
        }
        if drain.is_cut() {
            stream.cancel();
            let _ = tx.blocking_send(Out::Error("the server is shutting down".into()));
            return;
        }
        match stream.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Token { id, text, logprobs }) => {
                let now = Instant::now();
                match last_token {
                    None => metrics.ttft.observe(now - submitted),
                    Some(t) => metrics.inter_token.observe(now - t),
                }
                last_token = Some(now);
                context.push(id);
                if let Some(lp) = logprobs {
                    if tx.blocking_send(Out::Logprob(lp)).is_err() {
                        stream.cancel();
                        return;
                    }
                }
                parser.push(&text, &mut pieces);
            }
            Ok(Event::Text(text)) => parser.push(&text, &mut pieces),
            // Only embedding requests produce these.
            Ok(Event::Embedding(_)) => {}
            Ok(Event::Done(summary)) => {
                let count = |n: usize| n as u64;
                metrics
                    .prompt_tokens
                    .fetch_add(count(summary.prompt_eval_count), Ordering::Relaxed);
                metrics
                    .generated_tokens
                    .fetch_add(count(summary.eval_count), Ordering::Relaxed);
                parser.finish(&mut pieces);
                if !send_all(&mut pieces) {
                    return;
                }
                let out = match summary.finish {
                    FinishReason::Stop => done("stop", summary, context),
                    FinishReason::Length => done("length", summary, context),
                    FinishReason::Cancelled => Out::Error("request canceled".into()),
                    FinishReason::Error => Out::Error(
                        summary
                            .error
                            .clone()
                            .unwrap_or_else(|| "generation failed".into()),
                    ),
                };
                let _ = tx.blocking_send(out);
                return;
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = tx.blocking_send(Out::Error("the engine stopped".into()));
                return;
            }
        }
        if !send_all(&mut pieces) {
            stream.cancel();
            return;
        }
    }
}

fn done(reason: &'static str, summary: Summary, context: Vec<u32>) -> Out {
    Out::Done(Finished {
        reason,
        summary,
        context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_parse_and_merge() {
        let map = json!({"temperature": 0, "top_k": 5.7, "stop": ["x"], "num_gpu": 1, "bogus": {}});
        let o = Options::from_map(map.as_object().unwrap()).unwrap();
        assert_eq!(o.temperature, Some(0.0));
        assert_eq!(o.top_k, Some(5));
        assert_eq!(o.stop, Some(vec!["x".to_string()]));
        let base = Options {
            temperature: Some(0.6),
            top_p: Some(0.5),
            ..Options::default()
        };
        let merged = o.over(base);
        assert_eq!(merged.temperature, Some(0.0));
        assert_eq!(merged.top_p, Some(0.5));
    }

    #[test]
    fn option_type_errors_name_the_option() {
        let map = json!({"temperature": "hot"});
        let err = Options::from_map(map.as_object().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "option \"temperature\" must be of type float32"
        );
        let map = json!({"use_mmap": 3});
        assert!(Options::from_map(map.as_object().unwrap()).is_err());
    }

    #[test]
    fn request_defaults_follow_ollama() {
        let r = Options {
            num_predict: Some(-1),
            seed: Some(-1),
            ..Options::default()
        }
        .to_request(vec![1]);
        assert_eq!(r.num_predict, None);
        assert_eq!(r.sampling.seed, None);
        assert_eq!(r.sampling.temperature, 0.8);
    }
}
