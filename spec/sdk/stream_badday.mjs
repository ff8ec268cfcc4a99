// The official clients' streams through the gateway on a bad day (started by
// spec/gateway_stream_sdk_spec.lua from spec/sdk/stream_badday_server.lua):
// many at once, a fifth of their clients leaving at each point, a fallback
// before the first delta, an Idempotency-Key. One line per check.
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { check, expect } from './harness.mjs';

const { url, key } = JSON.parse(process.env.GATEWAY);
const state = async () => (await fetch(url + '/__test/state')).json();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const oai = new OpenAI({ apiKey: key, baseURL: url + '/v1', maxRetries: 0 });
const ant = new Anthropic({ apiKey: key, baseURL: url, maxRetries: 0 });
const msgs = [{ role: 'user', content: 'Save it' }];
const TOOL = { openai: [{ type: 'function', function: { name: 'save', parameters: { type: 'object' } } }],
  anthropic: [{ name: 'save', input_schema: { type: 'object' } }] };

// a seeded random (the same run each time)
let seed = 7;
const random = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };

// one stream's client; leave: null (reads to the end), 'before' (aborts before the headers),
// 'first' (after the first delta), 'args' (amid a tool call's arguments, or after 5 deltas),
// 'end' (at the last delta, before [DONE] / message_stop) -> 'done' | 'left' | what went wrong
async function client(api, model, tools, leave) {
  const ctl = new AbortController();
  if (leave === 'before') setTimeout(() => ctl.abort(), random() * 20);
  try {
    const s = api === 'openai'
      ? await oai.chat.completions.create({ model, messages: msgs, stream: true, tools: tools ? TOOL.openai : undefined },
        { signal: ctl.signal })
      : await ant.messages.create({ model, max_tokens: 2000, messages: msgs, stream: true,
        tools: tools ? TOOL.anthropic : undefined }, { signal: ctl.signal });
    let deltas = 0, args = 0, last = null;
    for await (const ev of s) {
      last = ev;
      if (api === 'openai') {
        const d = ev.choices[0]?.delta;
        if (d?.content) deltas++;
        if (d?.tool_calls?.[0]?.function?.arguments) args++;
        if (leave === 'end' && ev.choices[0]?.finish_reason) break;
      } else {
        if (ev.type === 'content_block_delta' && ev.delta.type === 'text_delta') deltas++;
        if (ev.type === 'content_block_delta' && ev.delta.type === 'input_json_delta') args++;
        if (leave === 'end' && ev.type === 'message_delta') break;
      }
      if (leave === 'first' && (deltas > 0 || args > 0)) break;
      if (leave === 'args' && (args >= 3 || deltas >= 5)) break;
    }
    if (leave) return 'left';
    const ended = api === 'openai' ? last && last.choices.length === 0 || last?.choices[0]?.finish_reason
      : last?.type === 'message_stop';
    return ended ? 'done' : `ended without its end: ${JSON.stringify(last)}`;
  } catch (e) {
    if (leave && (e.name === 'AbortError' || e.constructor.name === 'APIUserAbortError')) return 'left';
    return `${e.constructor.name}: ${e.message}`;
  }
}

// the providers' streams all recorded (a row each), the key's budget settled: -> the state
async function settled() {
  let s;
  for (let i = 0; i < 300; i++) {
    s = await state();
    if (s.pending === 0 && s.rows === s.opened) break;
    await sleep(20);
  }
  expect(s.pending === 0, `upstream transfers still open: ${JSON.stringify(s)}`);
  expect(s.rows === s.opened, `${s.rows} ledger rows for ${s.opened} streams the gateway saw start`);
  expect(s.rows <= s.billed, `${s.rows} ledger rows for ${s.billed} streams the providers started`);
  expect(s.holds === 0 && s.reserved === 0, `holds left: ${JSON.stringify(s)}`);
  expect(Math.abs(s.spent - s.total) <= 1e-6, `the budget spent ${s.spent}, the ledger says ${s.total}`);
  return s;
}

for (const api of ['openai', 'anthropic']) {
  await check(`${api}: 250 streams at once, a fifth of their clients leaving at each point: a ledger row for each ` +
    'stream the gateway saw a provider start, no hold left', async () => {
    const models = [['chat', false], ['claude', false], ['chat-tools', true], ['claude-tools', true]];
    const points = ['before', 'first', 'args', 'end'];
    const runs = [];
    for (let i = 0; i < 250; i++) {
      const [model, tools] = models[i % models.length];
      const leave = random() < 0.2 ? points[Math.floor(random() * points.length)] : null;
      runs.push(client(api, model, tools, leave));
    }
    const got = await Promise.all(runs);
    const wrong = got.filter((g) => g !== 'done' && g !== 'left');
    expect(wrong.length === 0, `${wrong.length} clients: ${wrong.slice(0, 3).join(' | ')}`);
    expect(got.filter((g) => g === 'left').length > 20, 'too few clients left to say anything');
    await settled();
  });
}

await check('openai: a stream whose primary ends before its first delta is the fallback\'s, whole', async () => {
  const before = (await state()).cut;
  const { data: s, response } = await oai.chat.completions.create({ model: 'chat-cut-first', messages: msgs,
    stream: true }).withResponse();
  let text = '', finish = null;
  for await (const ev of s) {
    text += ev.choices[0]?.delta?.content ?? '';
    finish = ev.choices[0]?.finish_reason ?? finish;
  }
  expect(response.headers.get('x-resil-provider') === 'anthropic', `provider ${response.headers.get('x-resil-provider')}`);
  expect(text.split(' ').filter((w) => w).length === 30 && finish === 'stop', `text ${text}, finish ${finish}`);
  expect((await state()).cut > before, 'the primary was not tried');
  await settled();
});

await check('openai and anthropic: an Idempotency-Key on a stream serves each request whole (streams are not ' +
  'replayed), each one row', async () => {
  const rows = (await state()).rows;
  for (let i = 0; i < 2; i++) {
    const s = await oai.chat.completions.create({ model: 'chat', messages: msgs, stream: true },
      { headers: { 'Idempotency-Key': 'stream-key-1' } });
    let text = '';
    for await (const ev of s) text += ev.choices[0]?.delta?.content ?? '';
    expect(text.split(' ').filter((w) => w).length === 30, `text ${text}`);
    const m = await ant.messages.stream({ model: 'claude', max_tokens: 100, messages: msgs },
      { headers: { 'Idempotency-Key': 'stream-key-2' } }).finalMessage();
    expect(m.content[0].text.split(' ').filter((w) => w).length === 30, `text ${m.content[0].text}`);
  }
  const s = await settled();
  expect(s.rows === rows + 4, `${s.rows - rows} rows for 4 streams`);
});

// every stream a provider breaks after its first delta raises in both SDKs, whichever API the
// provider speaks (relayed or translated); a whole one returns whole, its text complete
await check('openai and anthropic: a stream the provider breaks after its first delta raises, never a ' +
  'silently cut answer; a whole one labelled application/json returns whole', async () => {
  const runs = [];
  for (const api of ['openai', 'anthropic']) {
    for (const model of ['hostile-openai', 'hostile-anthropic']) {
      for (const how of ['stall', 'cut', 'error', 'notjson', 'nomarker', 'json']) {
        runs.push((async () => {
          const messages = [{ role: 'user', content: how }];
          let text = '';
          try {
            if (api === 'openai') {
              const s = await oai.chat.completions.create({ model, messages, stream: true });
              for await (const ev of s) text += ev.choices[0]?.delta?.content ?? '';
              const m = await oai.chat.completions.stream({ model, messages }).finalChatCompletion();
              text += '|' + m.choices[0].message.content;
            } else {
              const s = await ant.messages.create({ model, max_tokens: 100, messages, stream: true });
              for await (const ev of s) if (ev.type === 'content_block_delta') text += ev.delta.text ?? '';
              const m = await ant.messages.stream({ model, max_tokens: 100, messages }).finalMessage();
              text += '|' + m.content[0].text;
            }
          } catch (e) {
            return how === 'json' ? `${api} client of ${model}, json: raised ${e.message}` : null;
          }
          return how === 'json' && text === 'one two|one two' ? null : `${api} client of ${model}, ${how}: returned "${text}"`;
        })());
      }
    }
  }
  const wrong = (await Promise.all(runs)).filter((w) => w);
  expect(wrong.length === 0, wrong.join(' | '));
});
