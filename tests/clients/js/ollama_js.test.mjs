// ollama-js, the client LobeChat's Ollama provider is built on, against `wick serve`
// (started by tests/api_js.rs with OLLAMA_HOST set and SmolLM2 as smollm2:135m). The calls
// and options are the ones LobeChat makes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Ollama } from "ollama";

const host = `http://${process.env.OLLAMA_HOST}`;
const MODEL = "smollm2:135m";
const ollama = new Ollama({ host });
const question = [{ role: "user", content: "What is the capital of Germany?" }];

test("list shows the model with its details", async () => {
  const { models } = await ollama.list();
  const m = models.find((m) => m.name === MODEL);
  assert.ok(m, JSON.stringify(models));
  assert.equal(m.details.format, "gguf");
  assert.ok(m.size > 50_000_000);
  assert.match(m.digest, /^[0-9a-f]{64}$/);
});

test("chat stream with LobeChat's options answers Berlin", async () => {
  const stream = await ollama.chat({
    model: MODEL,
    messages: question,
    // LobeChat sends these four, always.
    options: { temperature: 0, top_p: 1, presence_penalty: 0, frequency_penalty: 0 },
    stream: true,
  });
  let text = "";
  let last;
  for await (const part of stream) {
    assert.equal(part.message.role, "assistant");
    text += part.message.content;
    last = part;
  }
  assert.match(text, /Berlin/);
  assert.equal(last.done, true);
  assert.equal(last.done_reason, "stop");
  assert.ok(last.eval_count > 0 && last.prompt_eval_count > 0);
});

test("a missing model is a 404 LobeChat recognises", async () => {
  await assert.rejects(
    ollama.chat({ model: "nosuch:1b", messages: question, stream: true }),
    (err) => {
      assert.equal(err.status_code, 404);
      // LobeChat's check for "offer to download this model".
      assert.match(err.error, /model "nosuch:1b" not found, try pulling it first/);
      return true;
    },
  );
});

test("tool results without a name are accepted", async () => {
  const reply = await ollama.chat({
    model: MODEL,
    messages: [
      { role: "user", content: "What's the weather in Paris?" },
      {
        role: "assistant",
        content: "",
        tool_calls: [{ function: { name: "weather", arguments: { city: "Paris" } } }],
      },
      { role: "tool", content: '{"sky": "sunny", "celsius": 24}' },
    ],
    options: { temperature: 0, num_predict: 16 },
    stream: false,
  });
  assert.equal(reply.message.role, "assistant");
  assert.equal(reply.done, true);
  assert.ok(reply.message.content.length > 0);
});

test("abort mid-stream cancels the generation on the server", async () => {
  const stream = await ollama.chat({
    model: MODEL,
    messages: [{ role: "user", content: "Count from 1 to 1000, one number per line." }],
    options: { temperature: 0, num_predict: 2000 },
    stream: true,
  });
  let parts = 0;
  await assert.rejects(
    (async () => {
      for await (const part of stream) {
        parts += 1;
        if (parts === 3) stream.abort();
      }
    })(),
    (err) => err.name === "AbortError",
  );
  assert.equal(parts, 3);
  // The sequence is gone from the engine within moments.
  let running = null;
  for (let i = 0; i < 50; i++) {
    const metrics = await (await fetch(`${host}/metrics`)).text();
    const line = metrics.split("\n").find((l) => l.startsWith(`wick_running_sequences{model="${MODEL}"}`));
    running = line && Number(line.split(" ").pop());
    if (running === 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(running, 0);
});

test("generate, show and ps", async () => {
  const g = await ollama.generate({
    model: MODEL,
    prompt: "Say hello.",
    options: { temperature: 0, num_predict: 8 },
  });
  assert.equal(g.done, true);
  assert.ok(g.response.length > 0);
  assert.ok(Array.isArray(g.context));
  const show = await ollama.show({ model: MODEL });
  assert.equal(show.details.format, "gguf");
  assert.ok(show.model_info["general.architecture"]);
  const ps = await ollama.ps();
  assert.ok(ps.models.some((m) => m.name === MODEL));
});

test("format with a JSON schema gives an object that matches it", async () => {
  const schema = {
    type: "object",
    properties: {
      city: { type: "string", maxLength: 20 },
      country: { type: "string", enum: ["Germany", "France", "Italy"] },
    },
    required: ["city", "country"],
  };
  for (const temperature of [0, 1]) {
    const reply = await ollama.chat({
      model: MODEL,
      messages: question,
      format: schema,
      options: { temperature, seed: 5 },
      stream: false,
    });
    const obj = JSON.parse(reply.message.content);
    assert.deepEqual(Object.keys(obj).sort(), ["city", "country"], reply.message.content);
    assert.ok(typeof obj.city === "string" && obj.city.length <= 20, reply.message.content);
    assert.ok(schema.properties.country.enum.includes(obj.country), reply.message.content);
  }
});

test("logprobs stream with each token's alternatives", async () => {
  const stream = await ollama.chat({
    model: MODEL,
    messages: question,
    options: { temperature: 0, num_predict: 16 },
    logprobs: true,
    top_logprobs: 2,
    stream: true,
  });
  let text = "";
  const entries = [];
  for await (const part of stream) {
    text += part.message.content;
    entries.push(...(part.logprobs ?? []));
  }
  assert.ok(entries.length > 0);
  const spelled = Buffer.concat(entries.map((e) => Buffer.from(e.bytes))).toString("utf8");
  assert.equal(spelled, text);
  for (const e of entries) {
    assert.equal(e.top_logprobs.length, 2);
    assert.ok(e.logprob <= 0);
    // Greedy: the chosen token is the best alternative.
    assert.ok(Math.abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6);
  }
});
