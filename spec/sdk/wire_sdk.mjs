// The official clients against the strict mock and a gateway in front of it
// (spec/sdk/wire_sdk_server.lua, run by spec/wire_sdk_spec.lua): what the
// SDKs' own helpers send. One line per check, as spec/sdk/harness.mjs.
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { betaTool } from '@anthropic-ai/sdk/helpers/beta/json-schema';
import { check, expect, rejects } from './harness.mjs';

const { url, key, mock } = JSON.parse(process.env.GATEWAY);
const oai = (base = url, k = key) => new OpenAI({ apiKey: k, baseURL: base + '/v1', maxRetries: 0 });
const ant = (base = url, k = key) => new Anthropic({ apiKey: k, baseURL: base, maxRetries: 0 });
const msgs = [{ role: 'user', content: 'weather?' }];
const schema = { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] };

// the Anthropic SDK's tool helpers (betaTool, betaZodTool: the tools its toolRunner sends) say
// type "custom": the OpenAI adapter took only a tool without a type for Anthropic's, and sent
// this one as it was, a 400 from OpenAI on every such request routed or fallen back there
await check('anthropic: tools of type custom (the SDK\'s betaTool) are served by OpenAI, whole and streamed', async () => {
  const tools = [{ type: 'custom', name: 'get_weather', description: 'weather', input_schema: schema }];
  const req = { model: 'gpt', max_tokens: 100, messages: msgs, tools, tool_choice: { type: 'any' } };
  for (const [how, m] of [['whole', await ant().messages.create(req)], ['streamed', await ant().messages.stream(req).finalMessage()]]) {
    expect(m.stop_reason === 'tool_use' && m.content[0].type === 'tool_use' && m.content[0].name === 'get_weather' &&
      typeof m.content[0].input.city === 'string', `${how}: ${JSON.stringify(m.content)}`);
  }
});

// the strict mock took any tools: a translation that sent one API's tools to the other passed
// its specs and failed in production
await check('mock: tools in the other API\'s shape are refused, as each API refuses them', async () => {
  const e = await rejects(oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs,
    tools: [{ type: 'custom', name: 'get_weather', input_schema: schema }] }), OpenAI.BadRequestError, 'OpenAI');
  expect(e.param === 'tools[0].custom', `param ${e.param}: ${e.message}`);
  await rejects(oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs,
    tools: [{ name: 'get_weather', input_schema: schema }] }), OpenAI.BadRequestError, 'OpenAI, no type');
  await rejects(ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 10, messages: msgs,
    tools: [{ type: 'function', function: { name: 'get_weather', parameters: schema } }] }), Anthropic.BadRequestError, 'Anthropic');
  // (each API's own still served: a function, a custom tool, a server tool)
  await oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs,
    tools: [{ type: 'function', function: { name: 'get_weather', parameters: schema } }] });
  await ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 10, messages: msgs,
    tools: [{ name: 'a', input_schema: schema }, { type: 'custom', name: 'b', input_schema: schema },
      { type: 'web_search_20250305', name: 'web_search', max_uses: 1 }] });
});

// the SDK's toolRunner keeps its conversation in a message thread (beta message-threads-2026-08-12)
// and sends each turn's new messages only: the mock ignored `thread`, so the second turn was its
// tool_result alone, refused (strict) or answered without the conversation
const runTool = betaTool({ name: 'get_weather', description: 'weather', inputSchema: schema, run: async (i) => `sunny in ${i.city}` });
await check('mock: a message thread holds the conversation (the SDK\'s toolRunner runs its turns)', async () => {
  const sent = [];
  const client = new Anthropic({ apiKey: 'x', baseURL: mock, maxRetries: 0,
    fetch: async (u, init) => { sent.push(JSON.parse(init.body)); return fetch(u, init); } });
  const runner = client.beta.messages.toolRunner({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs,
    tools: [runTool], tool_choice: { type: 'any' }, max_iterations: 3 });
  const turns = [];
  for await (const m of runner) turns.push(m.stop_reason);
  expect(turns.length === 3 && turns.every((r) => r === 'tool_use'), `turns ${JSON.stringify(turns)}`);
  expect(sent[0].thread?.type === 'create' && sent[2].thread?.type === 'continue' && sent[2].messages.length === 1 &&
    sent[2].tools === undefined, `sent ${JSON.stringify(sent.map((b) => [b.thread, b.messages.length]))}`);
  // a thread goes on from an answer once, and from an answer it holds
  const betas = { headers: { 'anthropic-beta': 'message-threads-2026-08-12' } };
  const first = await client.messages.create({ model: 'claude-haiku-4-5', max_tokens: 10, messages: msgs, thread: { type: 'create' } }, betas);
  const next = { model: 'claude-haiku-4-5', max_tokens: 10, messages: [{ role: 'user', content: 'and?' }],
    thread: { type: 'continue', previous_message_id: first.id } };
  await client.messages.create(next, betas);
  const again = await rejects(client.messages.create(next, betas), Anthropic.BadRequestError, 'continued twice');
  expect(again.error?.error?.details?.error_code === 'thread_already_continued', `twice: ${JSON.stringify(again.error)}`);
  const lost = await rejects(client.messages.create({ ...next, thread: { type: 'continue', previous_message_id: 'msg_nope' } }, betas),
    Anthropic.NotFoundError, 'unknown');
  expect(lost.error?.error?.details?.error_code === 'thread_not_found', `unknown: ${JSON.stringify(lost.error)}`);
});

// Usage types server_tool_use, inference_geo, speed and output_tokens_details as never absent
// (`| null`): code that tests `usage.server_tool_use !== null` before reading its counts met
// undefined from the mock, and one pricing by speed or region read nothing
await check('mock: a message\'s usage has the fields the SDK types, whole and streamed', async () => {
  const req = { model: 'claude-haiku-4-5', max_tokens: 2048, messages: msgs };
  const think = { ...req, thinking: { type: 'enabled', budget_tokens: 1024 } };
  for (const [how, m] of [['whole', await ant(mock, 'x').messages.create(req)],
    ['streamed', await ant(mock, 'x').messages.stream(req).finalMessage()]]) {
    const u = m.usage;
    expect(u.server_tool_use === null && u.inference_geo === 'global' && u.speed === 'standard' &&
      u.output_tokens_details === null, `${how}: ${JSON.stringify(u)}`);
  }
  for (const [how, m] of [['whole', await ant(mock, 'x').messages.create(think)],
    ['streamed', await ant(mock, 'x').messages.stream(think).finalMessage()]]) {
    const d = m.usage.output_tokens_details;
    expect(d?.thinking_tokens > 0 && d.thinking_tokens < m.usage.output_tokens, `${how}, thinking: ${JSON.stringify(m.usage)}`);
  }
});

// a blank chunk in a batch, a batch past 2048 inputs, an input past the model's tokens: the API
// refuses the whole batch, and the mock embedded them
await check('mock: embeddings of an empty text, past 2048 inputs or past 8192 tokens are refused, as the API does', async () => {
  const c = oai(mock, 'x');
  const model = 'text-embedding-3-small';
  for (const [what, input] of [['an empty text', ''], ['a blank chunk in a batch', ['tides', '']], ['an empty token list', [[1, 2], []]],
    ['2049 inputs', Array(2049).fill('x')], ['a text past 8192 tokens', 'word '.repeat(7000)]]) {
    const e = await rejects(c.embeddings.create({ model, input }), OpenAI.BadRequestError, what);
    expect(e.type === 'invalid_request_error', `${what}: ${e.message}`);
  }
  const r = await c.embeddings.create({ model, input: Array(2048).fill(' ') });
  expect(r.data.length === 2048, `2048 inputs: ${r.data.length}`);
});

// an encoding_format the API does not have ('binary', 'base64 ') is its 400: the mock answered it
// floats, and a client's decoding passed against the mock
await check('mock: embeddings in an encoding_format other than float or base64 are refused, as the API does', async () => {
  const c = oai(mock, 'x');
  for (const f of ['binary', 'base64 ', 'FLOAT']) {
    const e = await rejects(c.embeddings.create({ model: 'text-embedding-3-small', input: 'tides', encoding_format: f }),
      OpenAI.BadRequestError, f);
    expect(e.param === 'encoding_format' && e.type === 'invalid_request_error', `${f}: ${e.param} ${e.message}`);
  }
  const r = await c.embeddings.create({ model: 'text-embedding-3-small', input: 'tides', encoding_format: 'float' });
  expect(Array.isArray(r.data[0].embedding), 'float');
});

// a tool_choice naming a tool the request does not carry (a translation that renamed or dropped
// it) is each API's 400, and so are Anthropic tools of one name twice: the mock answered text
await check('mock: a tool_choice naming no tool of the request, or two tools of one name, are refused, as the APIs refuse them', async () => {
  const atools = [{ name: 'get_weather', input_schema: schema }];
  const otools = [{ type: 'function', function: { name: 'get_weather', parameters: schema } }];
  const a = await rejects(ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 50, messages: msgs,
    tools: atools, tool_choice: { type: 'tool', name: 'get_forecast' } }), Anthropic.BadRequestError, 'anthropic unknown tool');
  expect(/get_forecast/.test(a.message), a.message);
  const o = await rejects(oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, tools: otools,
    tool_choice: { type: 'function', function: { name: 'get_forecast' } } }), OpenAI.BadRequestError, 'openai unknown tool');
  expect(/get_forecast/.test(o.message) && o.param === 'tool_choice', `${o.param}: ${o.message}`);
  const d = await rejects(ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 50, messages: msgs,
    tools: [...atools, ...atools] }), Anthropic.BadRequestError, 'anthropic tools of one name twice');
  expect(/unique/.test(d.message), d.message);
  const ok = await ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 50, messages: msgs,
    tools: atools, tool_choice: { type: 'tool', name: 'get_weather' } });
  expect(ok.stop_reason === 'tool_use', JSON.stringify(ok));
});

// the turn after tool calls answers them first: a text before its tool_result blocks, or two
// tool_use blocks of one id, are Anthropic's 400 (its tool-use docs say so), and the mock served them
await check('mock: tool results after a text, or two tool_use blocks of one id, are refused, as Anthropic refuses them', async () => {
  const tools = [{ name: 'get_weather', input_schema: schema }];
  const use = (id) => ({ type: 'tool_use', id, name: 'get_weather', input: { city: 'Paris' } });
  const result = { type: 'tool_result', tool_use_id: 'toolu_01', content: 'sunny' };
  const late = await rejects(ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 50, tools, messages: [
    ...msgs, { role: 'assistant', content: [use('toolu_01')] },
    { role: 'user', content: [{ type: 'text', text: 'here it is' }, result] }] }), Anthropic.BadRequestError, 'text first');
  expect(/immediately after/.test(late.message), late.message);
  const twice = await rejects(ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 50, tools, messages: [
    ...msgs, { role: 'assistant', content: [use('toolu_01'), use('toolu_01')] }, { role: 'user', content: [result] }] }),
    Anthropic.BadRequestError, 'one id twice');
  expect(/unique/.test(twice.message), twice.message);
  await ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 50, tools, messages: [
    ...msgs, { role: 'assistant', content: [use('toolu_01')] },
    { role: 'user', content: [result, { type: 'text', text: 'and more' }] }] });
});

// OpenAI takes four stop sequences, Anthropic more: the mock took any number on its OpenAI route
await check('mock: more than four stop sequences are refused on the OpenAI route, not on Anthropic\'s', async () => {
  const stop = ['a1', 'b2', 'c3', 'd4', 'e5'];
  const e = await rejects(oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, stop }),
    OpenAI.BadRequestError, 'five');
  expect(e.param === 'stop' && e.code === 'array_above_max_length', `${e.param} ${e.code}: ${e.message}`);
  await oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, stop: stop.slice(0, 4) });
  await ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 10, messages: msgs, stop_sequences: stop });
});

// OpenAI's reasoning models (o-series, gpt-5) refuse max_tokens and any temperature or top_p but
// the default: an Anthropic client's request falling back to one, or an OpenAI client's naming
// one, was a 400. The mock refuses them as the API does; the gateway sends what they take
await check('mock and gateway: reasoning models take max_completion_tokens and the default sampling only', async () => {
  const e = await rejects(oai(mock, 'x').chat.completions.create({ model: 'o3', messages: msgs, max_tokens: 20 }),
    OpenAI.BadRequestError, 'max_tokens');
  expect(e.param === 'max_tokens' && e.code === 'unsupported_parameter' &&
    e.error.message === "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", e.message);
  const t = await rejects(oai(mock, 'x').chat.completions.create({ model: 'gpt-5-mini', messages: msgs, temperature: 0.2 }),
    OpenAI.BadRequestError, 'temperature');
  expect(t.param === 'temperature' && t.code === 'unsupported_value' &&
    t.error.message === "Unsupported value: 'temperature' does not support 0.2 with this model. Only the default (1) value is supported.", t.message);
  const p = await rejects(oai(mock, 'x').chat.completions.create({ model: 'o4-mini', messages: msgs, top_p: 0.5 }),
    OpenAI.BadRequestError, 'top_p');
  expect(p.param === 'top_p' && p.code === 'unsupported_parameter', p.message);
  // what these models take: the defaults; gpt-5.1 on samples at its default effort (none); a chat model
  await oai(mock, 'x').chat.completions.create({ model: 'o3', messages: msgs, max_completion_tokens: 20, temperature: 1 });
  await oai(mock, 'x').chat.completions.create({ model: 'gpt-5.2', messages: msgs, temperature: 0.2 });
  await rejects(oai(mock, 'x').chat.completions.create({ model: 'gpt-5.2', messages: msgs, temperature: 0.2,
    reasoning_effort: 'high' }), OpenAI.BadRequestError, 'gpt-5.2 at high effort');
  await oai(mock, 'x').chat.completions.create({ model: 'gpt-5-chat-latest', messages: msgs, max_tokens: 20, temperature: 0.2 });
  await oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, max_tokens: 20, temperature: 0.2 });
  const re = await rejects(oai(mock, 'x').chat.completions.create({ model: 'gpt-4.1', messages: msgs, reasoning_effort: 'low' }),
    OpenAI.BadRequestError, 'reasoning_effort to gpt-4.1');
  expect(re.param === 'reasoning_effort' && re.code === 'unsupported_parameter', re.message);
  // through the gateway: a reasoning model's request falling back to a chat model
  await oai().chat.completions.create({ model: 'o3-or-gpt', messages: msgs, max_tokens: 200, reasoning_effort: 'high' });
  // through the gateway: an Anthropic client's request falling back to o3, whole and streamed
  const req = { model: 'claude-or-o3', max_tokens: 500, messages: msgs, temperature: 0.3, top_p: 0.9 };
  for (const [how, m] of [['whole', await ant().messages.create(req)], ['streamed', await ant().messages.stream(req).finalMessage()]]) {
    expect(m.content[0].text.length > 0 && m.stop_reason !== null, `${how}: ${JSON.stringify(m)}`);
  }
  // an OpenAI client's, naming one: its max_tokens renamed, but its own temperature is the API's
  // 400, as from the API itself (left out, the client's sampling was dropped without a word to it)
  const r = await oai().chat.completions.create({ model: 'o3', messages: msgs, max_tokens: 200 });
  expect(r.choices[0].message.content.length > 0, JSON.stringify(r));
  const named = await rejects(oai().chat.completions.create({ model: 'o3', messages: msgs, max_tokens: 200, temperature: 0.2 }),
    OpenAI.BadRequestError, 'temperature to o3, named');
  expect(named.message.includes('temperature'), named.message);
  // its reasoning is output, within max_completion_tokens: too few for it answer nothing, as o3 does
  const c = await oai(mock, 'x').chat.completions.create({ model: 'o3', messages: msgs, max_completion_tokens: 10 });
  expect(c.choices[0].message.content === '' && c.choices[0].finish_reason === 'length' &&
    c.usage.completion_tokens === 10 && c.usage.completion_tokens_details.reasoning_tokens === 10, JSON.stringify(c));
  const h = await oai(mock, 'x').chat.completions.create({ model: 'o3', messages: msgs, reasoning_effort: 'high' });
  const words = h.choices[0].message.content.split(' ').length;
  expect(h.usage.completion_tokens_details.reasoning_tokens === 256 && h.usage.completion_tokens === 256 + words, JSON.stringify(h.usage));
  const g = await oai(mock, 'x').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, max_completion_tokens: 10 });
  expect(g.usage.completion_tokens_details.reasoning_tokens === 0 && g.choices[0].message.content !== '', JSON.stringify(g.usage));
  await oai().chat.completions.create({ model: 'gpt52', messages: msgs, max_tokens: 20, temperature: 0.2, reasoning_effort: 'high' });
  await oai().chat.completions.create({ model: 'gpt52', messages: msgs, max_tokens: 20, temperature: 0.2 });
});

// Anthropic takes many stop sequences, OpenAI four: an Anthropic client's request with more,
// falling back to OpenAI, was a 400 there that failed the call. The first four are sent, and the
// gateway ends the answer at a later one it holds, as Anthropic would have
await check('anthropic: more than four stop sequences fall back to OpenAI, its first four sent', async () => {
  const stop_sequences = ['zz1', 'zz2', 'zz3', 'zz4', 'three', 'zz6'];
  const req = { model: 'claude-or-gpt', max_tokens: 50, messages: msgs, stop_sequences };
  for (const [how, m] of [['whole', await ant().messages.create(req)], ['streamed', await ant().messages.stream(req).finalMessage()]]) {
    expect(m.content[0].text === 'one two ' && m.stop_reason === 'stop_sequence' && m.stop_sequence === 'three',
      `${how}: ${JSON.stringify(m)}`);
  }
  // and to a reasoning model, which takes none (o3: a 400 for any), none: the gateway ends it there
  const m = await ant().messages.create({ ...req, model: 'claude-or-o3', max_tokens: 500, stop_sequences: ['two'] });
  expect(m.content[0].text === 'one ' && m.stop_reason === 'stop_sequence' && m.stop_sequence === 'two', JSON.stringify(m));
  const e = await rejects(oai(mock, 'x').chat.completions.create({ model: 'o3', messages: msgs, stop: ['a'] }),
    OpenAI.BadRequestError, 'stop to o3');
  expect(e.param === 'stop' && e.error.message === "Unsupported parameter: 'stop' is not supported with this model.", e.message);
});

// OpenAI's allowed_tools choice (the SDK's ChatCompletionAllowedToolChoice): the mock answered
// text where the API calls one of the tools it allows, and the gateway sent it to Anthropic as it
// was (a 400 there: Anthropic has no such choice; it gets its mode over the allowed tools only)
await check('openai: an allowed_tools choice calls an allowed tool, served by either API', async () => {
  const otools = ['get_weather', 'get_time'].map((name) => ({ type: 'function', function: { name,
    parameters: { type: 'object', properties: { q: { type: 'string' } }, required: ['q'] } } }));
  const tool_choice = { type: 'allowed_tools', allowed_tools: { mode: 'required', tools: [{ type: 'function', function: { name: 'get_time' } }] } };
  for (const [how, c, model] of [['mock', oai(mock, 'x'), 'gpt-4o-mini'], ['gateway to OpenAI', oai(), 'gpt'], ['gateway to Anthropic', oai(), 'claude']]) {
    const r = await c.chat.completions.create({ model, messages: msgs, tools: otools, tool_choice });
    const calls = r.choices[0].message.tool_calls;
    expect(r.choices[0].finish_reason === 'tool_calls' && calls?.length === 1 && calls[0].function.name === 'get_time',
      `${how}: ${JSON.stringify(r.choices[0])}`);
  }
  const auto = await oai().chat.completions.create({ model: 'claude', messages: msgs, tools: otools,
    tool_choice: { type: 'allowed_tools', allowed_tools: { mode: 'auto', tools: [{ type: 'function', function: { name: 'get_time' } }] } } });
  expect(auto.choices[0].finish_reason === 'stop', JSON.stringify(auto.choices[0]));
  // (the strict mock refuses another API's tool_choice on Anthropic's route, as the API does)
  const e = await rejects(ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 20, messages: msgs,
    tools: [{ name: 'get_time', input_schema: { type: 'object' } }], tool_choice }), Anthropic.BadRequestError, 'allowed_tools to Anthropic');
  expect(/tool_choice: Input tag 'allowed_tools'/.test(e.message), e.message);
});

// a fault's should_retry is the x-should-retry header both SDKs read before the status: the
// mock sent it on its Anthropic route only, and an OpenAI client retried what the spec refused
await check('mock: a fault\'s should_retry = false reaches the OpenAI SDK, which does not retry it', async () => {
  const stats = async () => (await (await fetch(mock + '/__mock/stats')).json()).total;
  const before = await stats();
  const c = new OpenAI({ apiKey: 'x', baseURL: mock + '/v1', maxRetries: 2 });
  const e = await rejects(c.chat.completions.create({ model: 'gpt-noretry', messages: msgs }), OpenAI.InternalServerError, '500');
  expect(e.headers.get('x-should-retry') === 'false' && (await stats()) === before + 1, `requests ${(await stats()) - before}`);
});

// OpenAI reads an image's bytes and takes a data URL that names another type (image/jpeg for a
// PNG, as many clients hard-code it); Anthropic refuses the mismatch: served or fallen back to
// there, every such request was a 400
const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==';
await check('openai: a PNG sent as data:image/jpeg is served by Anthropic, its type told by its bytes', async () => {
  const content = [{ type: 'text', text: 'what is this?' }, { type: 'image_url', image_url: { url: 'data:image/jpeg;base64,' + PNG } }];
  const r = await oai().chat.completions.create({ model: 'claude', messages: [{ role: 'user', content }] });
  expect(r.choices[0].message.content.length > 0, JSON.stringify(r.choices[0]));
  const e = await rejects(ant(mock, 'x').messages.create({ model: 'claude-haiku-4-5', max_tokens: 10, messages: [{ role: 'user',
    content: [{ type: 'image', source: { type: 'base64', media_type: 'image/jpeg', data: PNG } }] }] }),
    Anthropic.BadRequestError, 'the mock, a mismatch');
  expect(/does not match the provided media type image\/jpeg/.test(e.message), e.message);
});

// the API bills the prompt up to a cache_control mark as a cache write, then as reads while it
// lives; the mock reported neither, so what caching costs was never met by a spec
await check('mock: a prompt marked with cache_control is written to the cache, then read, whole and streamed', async () => {
  const c = ant(mock, 'x');
  const big = 'You are a careful assistant. '.repeat(200); // (some 1,450 tokens: past the 1,024 Sonnet caches from)
  const req = (system, extra = {}) => ({ model: 'claude-sonnet-4-5', max_tokens: 10, messages: msgs, system, ...extra });
  const marked = [{ type: 'text', text: big + Math.random(), cache_control: { type: 'ephemeral' } }];
  const first = (await c.messages.create(req(marked))).usage;
  const again = (await c.messages.stream(req(marked)).finalMessage()).usage;
  expect(first.cache_creation_input_tokens > 1024 && first.cache_read_input_tokens === 0 &&
    first.cache_creation.ephemeral_5m_input_tokens === first.cache_creation_input_tokens && first.input_tokens < 10,
    `first: ${JSON.stringify(first)}`);
  expect(again.cache_read_input_tokens === first.cache_creation_input_tokens && again.cache_creation_input_tokens === 0 &&
    again.input_tokens === first.input_tokens, `again: ${JSON.stringify(again)}`);
  const hour = (await c.messages.create(req([{ ...marked[0], text: big + Math.random(), cache_control: { type: 'ephemeral', ttl: '1h' } }]))).usage;
  expect(hour.cache_creation.ephemeral_1h_input_tokens === hour.cache_creation_input_tokens && hour.cache_creation_input_tokens > 0,
    `1h: ${JSON.stringify(hour)}`);
  // (automatic caching: a top-level cache_control; a short prompt or none marked is not cached)
  const auto = (await c.messages.create(req(big + Math.random(), { cache_control: { type: 'ephemeral' } }))).usage;
  const short = (await c.messages.create(req([{ type: 'text', text: 'Be brief.', cache_control: { type: 'ephemeral' } }]))).usage;
  const plain = (await c.messages.create(req(big))).usage;
  expect(auto.cache_creation_input_tokens > 1024 && short.cache_creation_input_tokens === 0 && plain.cache_creation_input_tokens === 0 &&
    plain.input_tokens > 1024, `auto ${JSON.stringify(auto)} short ${JSON.stringify(short)} plain ${JSON.stringify(plain)}`);
});

// the API caches a prompt from a length that is the model's own (4,096 tokens for Haiku 4.5 and
// Opus 4.5 and 4.6, 2,048 for Opus 4.7, 512 for Opus 5): the mock cached from 1,024 for every
// model, so a spec of caching on Haiku 4.5 met writes and reads production never makes
await check('mock: a prompt is cached from its model\'s minimum length', async () => {
  const c = ant(mock, 'x');
  const written = async (model, repeat) => (await c.messages.create({ model, max_tokens: 10, messages: msgs,
    system: [{ type: 'text', text: 'You are a careful assistant. '.repeat(repeat) + Math.random(), cache_control: { type: 'ephemeral' } }] }))
    .usage.cache_creation_input_tokens;
  // (some 7 tokens a repeat)
  for (const [model, under, over] of [['claude-haiku-4-5', 550, 600], ['claude-haiku-4-5-20251001', 550, 600],
    ['claude-opus-4-6', 550, 600], ['claude-opus-4-7', 270, 300], ['claude-3-5-haiku-20241022', 270, 300],
    ['claude-sonnet-4-5', 130, 160], ['claude-sonnet-4-6', 130, 160], ['claude-opus-5', 60, 80]]) {
    const [no, yes] = [await written(model, under), await written(model, over)];
    expect(no === 0 && yes > 0, `${model}: ${under} repeats wrote ${no}, ${over} wrote ${yes}`);
  }
});

// the beta's server-side fallback, as the SDK types it: a model that declines (the mock's
// scenario.refuses) hands over to the first fallback that serves; a `fallback` block at the seam,
// usage.iterations naming each hop's model; without one that serves, a refusal
await check('mock: the beta\'s fallbacks serve a declined request, as the SDK reads it, whole and streamed', async () => {
  const c = ant(mock, 'x');
  const req = { model: 'claude-fable-5-1', max_tokens: 50, messages: msgs, betas: ['server-side-fallback-2026-07-01'],
    fallbacks: [{ model: 'claude-haiku-4-5' }] };
  for (const [how, m] of [['whole', await c.beta.messages.create(req)], ['streamed', await c.beta.messages.stream(req).finalMessage()]]) {
    const [seam, text] = m.content;
    expect(m.model === 'claude-haiku-4-5', `${how}: model ${m.model}`); // (relabeled: the stream's by the SDK, from the seam)
    expect(seam.type === 'fallback' && seam.from.model === 'claude-fable-5-1' && seam.to.model === 'claude-haiku-4-5' &&
      text.type === 'text' && text.text.length > 0 && m.stop_reason === 'end_turn', `${how}: ${JSON.stringify(m.content)}`);
    const its = m.usage.iterations;
    expect(its?.length === 2 && its[0].type === 'message' && its[0].model === 'claude-fable-5-1' &&
      its[1].type === 'fallback_message' && its[1].model === 'claude-haiku-4-5' &&
      m.usage.input_tokens === its[0].input_tokens + its[1].input_tokens, `${how}: ${JSON.stringify(m.usage)}`);
  }
  const r = await c.beta.messages.create({ ...req, fallbacks: undefined });
  expect(r.stop_reason === 'refusal' && r.content.length === 0 && r.stop_details?.type === 'refusal', JSON.stringify(r));
  // (fallbacks without the beta's header are refused, as before)
  await rejects(c.messages.create({ model: 'claude-fable-5-1', max_tokens: 50, messages: msgs, fallbacks: req.fallbacks }),
    Anthropic.BadRequestError, 'fallbacks without the beta');
});

// through the gateway the thread was sent to Anthropic, and the answer's id replaced by the
// gateway's: the next turn continued from an id no provider held (404, thread_not_found, and no
// error details the SDK could recover by), and a turn served by OpenAI lost the conversation
await check('anthropic: the SDK\'s toolRunner runs through the gateway, served by either API', async () => {
  for (const model of ['claude', 'gpt']) {
    const runner = ant().beta.messages.toolRunner({ model, max_tokens: 100, messages: msgs, tools: [runTool],
      tool_choice: { type: 'any' }, max_iterations: 3 });
    const turns = [];
    for await (const m of runner) turns.push(m.stop_reason);
    expect(turns.length === 3 && turns.every((r) => r === 'tool_use'), `${model}: turns ${JSON.stringify(turns)}`);
  }
});

// the same fields in an answer translated from OpenAI's, whole and streamed, with tools or not
await check('anthropic: an answer translated from OpenAI has inference_geo, speed and output_tokens_details null', async () => {
  const req = { model: 'gpt', max_tokens: 100, messages: msgs };
  const tools = [{ name: 'get_weather', input_schema: schema }];
  for (const [how, m] of [['whole', await ant().messages.create(req)], ['streamed', await ant().messages.stream(req).finalMessage()],
    ['streamed with tools', await ant().messages.stream({ ...req, tools }).finalMessage()]]) {
    const u = m.usage;
    expect(u.inference_geo === null && u.speed === null && u.output_tokens_details === null, `${how}: ${JSON.stringify(u)}`);
  }
});

// fast mode and US-only inference are billed at their own prices, which the ledger does not
// know: recorded at the standard price, a key's budget let them spend past it
await check('anthropic: speed fast and inference_geo us are refused (unpriced), the standard ones served', async () => {
  const req = { model: 'claude', max_tokens: 10, messages: msgs };
  for (const extra of [{ speed: 'fast' }, { inference_geo: 'us' }]) {
    const e = await rejects(ant().messages.create({ ...req, ...extra }), Anthropic.BadRequestError, JSON.stringify(extra));
    expect(e.message.includes(Object.keys(extra)[0]), e.message);
  }
  const m = await ant().messages.create({ ...req, speed: 'standard', inference_geo: 'global' });
  expect(m.content[0].type === 'text', JSON.stringify(m));
});

// an answer cut before any text (a reasoning model's max_tokens spent thinking): the API writes
// content [], and an empty text block sent back as the assistant's turn is refused by Anthropic
await check('anthropic: an answer translated from OpenAI without text has content [], not an empty text block', async () => {
  const m = await ant().messages.create({ model: 'claude-or-o3', max_tokens: 30, messages: msgs });
  expect(Array.isArray(m.content) && m.content.length === 0 && m.stop_reason === 'max_tokens', JSON.stringify(m));
});

// with extended thinking, a tool loop whose last call a fallback (OpenAI, which thinks nothing
// back) made was refused by Anthropic at every next turn, once it served again: "a final
// assistant message must start with a thinking block". That turn is sent without thinking
await check('anthropic: a tool loop a fallback served goes on at Anthropic with thinking on', async () => {
  const thinking = { type: 'enabled', budget_tokens: 1024 };
  const tools = [{ name: 'get_weather', input_schema: schema }];
  const first = await ant().messages.create({ model: 'claude-or-gpt', max_tokens: 2000, messages: msgs, thinking, tools,
    tool_choice: { type: 'any' } });
  const use = first.content.find((b) => b.type === 'tool_use');
  expect(use && first.content[0].type !== 'thinking', `the fallback's answer ${JSON.stringify(first.content)}`);
  const loop = [...msgs, { role: 'assistant', content: first.content },
    { role: 'user', content: [{ type: 'tool_result', tool_use_id: use.id, content: 'sunny' }] }];
  for (const [how, call] of [['whole', () => ant().messages.create({ model: 'claude', max_tokens: 2000, messages: loop, thinking, tools })],
    ['streamed', () => ant().messages.stream({ model: 'claude', max_tokens: 2000, messages: loop, thinking, tools }).finalMessage()]]) {
    const m = await call();
    expect(m.stop_reason === 'end_turn' && m.content.some((b) => b.type === 'text'), `${how}: ${JSON.stringify(m.content)}`);
  }
  // (and counted as it is sent: the count was the API's 400)
  const count = await ant().messages.countTokens({ model: 'claude', messages: loop, thinking, tools });
  expect(count.input_tokens > 0, `counted: ${JSON.stringify(count)}`);
  // (a loop whose last turn thought, Anthropic's own, keeps its thinking)
  const own = await ant().messages.create({ model: 'claude', max_tokens: 2000, messages: msgs, thinking, tools });
  expect(own.content[0].type === 'thinking', `thinking on: ${JSON.stringify(own.content)}`);
});

// streamed, its text block was started before any text came: the SDK's message held the empty block
await check('anthropic: a stream translated from OpenAI without text has content [], not an empty text block', async () => {
  const s = ant().messages.stream({ model: 'claude-or-o3', max_tokens: 30, messages: msgs });
  const events = [];
  s.on('streamEvent', (e) => events.push(e.type));
  const m = await s.finalMessage();
  expect(Array.isArray(m.content) && m.content.length === 0 && m.stop_reason === 'max_tokens', JSON.stringify(m));
  expect(events.join(' ') === 'message_start message_delta message_stop', events.join(' '));
  expect(m.usage.output_tokens === 30, JSON.stringify(m.usage));
});
