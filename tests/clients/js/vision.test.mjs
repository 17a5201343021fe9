// Images through ollama-js (what LobeChat's Ollama provider calls), against the `wick
// serve` that tests/vision.rs started (OLLAMA_HOST) with `gemma3-vision`; WICK_TEST_IMAGE
// is a PNG. LobeChat sends base64 strings; Uint8Array is the client's other form.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { Ollama } from 'ollama';

const ollama = new Ollama({ host: `http://${process.env.OLLAMA_HOST}` });
const bytes = readFileSync(process.env.WICK_TEST_IMAGE);
const options = { temperature: 0, num_predict: 8 };

test('show reports vision', async () => {
  const show = await ollama.show({ model: 'gemma3-vision' });
  assert.ok(show.capabilities.includes('vision'), JSON.stringify(show.capabilities));
});

test('base64 and Uint8Array images give the same streamed answer', async () => {
  const answer = async (image) => {
    const stream = await ollama.chat({
      model: 'gemma3-vision',
      messages: [{ role: 'user', content: 'Describe.', images: [image] }],
      options,
      stream: true,
    });
    let text = '';
    let last;
    for await (const part of stream) {
      text += part.message.content;
      last = part;
    }
    assert.ok(last.done);
    assert.ok(last.prompt_eval_count > 16);
    return text;
  };
  const fromBase64 = await answer(bytes.toString('base64'));
  const fromBytes = await answer(new Uint8Array(bytes));
  assert.equal(fromBytes, fromBase64);
});
