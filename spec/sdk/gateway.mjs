// The official OpenAI and Anthropic clients against the gateway (started by
// spec/gateway_sdk_spec.lua from spec/sdk/gateway_server.lua). One line per
// check: "ok <name>" or "not ok <name> -- <why>". GATEWAY is its JSON line.
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { check, expect, rejects } from './harness.mjs';

const { url, keys } = JSON.parse(process.env.GATEWAY);
const REPLY = 'one two three four five six';
const msgs = [{ role: 'user', content: 'Say hello' }];

const upstream = async () => (await fetch(url + '/__test/upstream')).json();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const oai = (key = keys.good, retries = 0) => new OpenAI({ apiKey: key, baseURL: url + '/v1', maxRetries: retries });
const ant = (key = keys.good, retries = 0) => new Anthropic({ apiKey: key, baseURL: url, maxRetries: retries });

await check('openai: chat through the gateway', async () => {
  const r = await oai().chat.completions.create({ model: 'chat-fast', messages: msgs });
  expect(r.choices[0].message.content === REPLY, `content ${r.choices[0].message.content}`);
  expect(r.usage.completion_tokens === 6, `usage ${JSON.stringify(r.usage)}`);
});

await check('openai: the stream helper accumulates the final completion', async () => {
  const final = await oai().chat.completions.stream({ model: 'chat-fast', messages: msgs }).finalChatCompletion();
  expect(final.choices[0].message.content === REPLY, `content ${final.choices[0].message.content}`);
  expect(final.choices[0].finish_reason === 'stop', 'finish_reason');
});

await check('openai: embeddings.create through the gateway (base64 by default, decoded by the SDK)', async () => {
  const r = await oai().embeddings.create({ model: 'text-embedding-3-small', input: ['tides', 'moon'], dimensions: 8 });
  expect(r.data.length === 2 && r.data[1].index === 1, `data ${JSON.stringify(r.data)}`);
  const v = r.data[0].embedding;
  expect(Array.isArray(v) && v.length === 8 && v.every((x) => typeof x === 'number'), `vector ${JSON.stringify(v)}`);
  const norm = Math.sqrt(v.reduce((a, x) => a + x * x, 0));
  expect(Math.abs(norm - 1) < 1e-3, `norm ${norm}`);
  expect(r.usage.prompt_tokens > 0, `usage ${JSON.stringify(r.usage)}`);
  const f = await oai().embeddings.create({ model: 'text-embedding-3-small', input: 'tides', dimensions: 8,
    encoding_format: 'float' });
  expect(f.data[0].embedding.every((x, i) => Math.abs(x - v[i]) < 1e-5), 'float and base64 agree');
});

// the mock's vectors were 8 numbers whatever the model: a vector store sized for the model's
// 1,536 (or a client checking the length) never met its real size in a test
await check('openai: embeddings are the model\'s own size, or the dimensions asked (base64 decoded by the SDK)', async () => {
  const r = await oai().embeddings.create({ model: 'text-embedding-3-small', input: ['tides', 'moon'] });
  const f = await oai().embeddings.create({ model: 'text-embedding-3-small', input: ['tides', 'moon'], encoding_format: 'float' });
  for (const i of [0, 1]) {
    const v = r.data[i].embedding;
    expect(v.length === 1536 && f.data[i].embedding.length === 1536, `lengths ${v.length} ${f.data[i].embedding.length}`);
    expect(v.every((x, j) => Math.abs(x - f.data[i].embedding[j]) < 1e-6), 'base64 and float agree');
    const norm = Math.sqrt(v.reduce((a, x) => a + x * x, 0));
    expect(Math.abs(norm - 1) < 1e-3, `norm ${norm}`);
  }
  const large = await oai().embeddings.create({ model: 'text-embedding-3-large', input: 'tides' });
  expect(large.data[0].embedding.length === 3072, `3-large: ${large.data[0].embedding.length}`);
  const short = await oai().embeddings.create({ model: 'text-embedding-3-small', input: 'tides', dimensions: 256 });
  expect(short.data[0].embedding.length === 256, `dimensions 256: ${short.data[0].embedding.length}`);
  const past = await rejects(oai().embeddings.create({ model: 'text-embedding-3-small', input: 'tides', dimensions: 2000 }),
    OpenAI.BadRequestError, 'dimensions past the model\'s size');
  expect(past.param === 'dimensions', `param ${past.param}: ${past.message}`);
  const ada = await rejects(oai().embeddings.create({ model: 'text-embedding-ada-002', input: 'tides', dimensions: 256 }),
    OpenAI.BadRequestError, 'ada-002 with dimensions');
  expect(/does not support specifying dimensions/.test(ada.message), ada.message);
});

// a stream whose request carries tools: the SDK's helper builds the tool call (the model's own
// API and the other one), and its arguments keep their empty list
const weather = { name: 'get_weather', description: 'the weather in a city',
  parameters: { type: 'object', properties: { city: { type: 'string' }, tags: { type: 'array', items: { type: 'string' } } },
    required: [] } };
for (const model of ['chat-tools', 'claude-tools']) {
  await check(`openai: a stream with tools (${model}) ends with the tool call and its text`, async () => {
    const final = await oai().chat.completions.stream({ model, messages: msgs,
      tools: [{ type: 'function', function: weather }] }).finalChatCompletion();
    const m = final.choices[0].message;
    expect(final.choices[0].finish_reason === 'tool_calls', `finish_reason ${final.choices[0].finish_reason}`);
    expect(m.content === 'Checking.', `content ${m.content}`);
    expect(m.tool_calls?.length === 1 && m.tool_calls[0].function.name === 'get_weather', `calls ${JSON.stringify(m.tool_calls)}`);
    const args = JSON.parse(m.tool_calls[0].function.arguments);
    expect(args.city === 'Paris' && Array.isArray(args.tags) && args.tags.length === 0, `arguments ${JSON.stringify(args)}`);
  });
  await check(`anthropic: a stream with tools (${model}) ends with the tool_use block and its text`, async () => {
    const final = await ant().messages.stream({ model, max_tokens: 100, messages: msgs,
      tools: [{ name: weather.name, description: weather.description, input_schema: weather.parameters }] }).finalMessage();
    expect(final.stop_reason === 'tool_use', `stop_reason ${final.stop_reason}`);
    expect(final.content.length === 2 && final.content[0].text === 'Checking.', `content ${JSON.stringify(final.content)}`);
    const use = final.content[1];
    expect(use.type === 'tool_use' && use.name === 'get_weather' && use.input.city === 'Paris' &&
      Array.isArray(use.input.tags), `tool_use ${JSON.stringify(use)}`);
    expect(final.usage.output_tokens === 7, `usage ${JSON.stringify(final.usage)}`);
  });
}

await check('anthropic: messages through the gateway', async () => {
  const r = await ant().messages.create({ model: 'claude-sonnet-4-5-20250929', max_tokens: 100, messages: msgs });
  expect(r.content[0].text === REPLY, `text ${r.content[0].text}`);
  expect(r.stop_reason === 'end_turn', `stop_reason ${r.stop_reason}`);
});

await check('anthropic: the stream helper accumulates the final message', async () => {
  const final = await ant().messages.stream({ model: 'claude-sonnet-4-5-20250929', max_tokens: 100,
    messages: msgs }).finalMessage();
  expect(final.content[0].text === REPLY, `text ${final.content[0].text}`);
  expect(final.stop_reason === 'end_turn', `stop_reason ${final.stop_reason}`);
});

await check('anthropic: a 529 on the primary falls back (the SDK sees a normal answer)', async () => {
  const before = await upstream();
  const { data, response } = await ant().messages.create({ model: 'claude-busy', max_tokens: 100, messages: msgs })
    .withResponse();
  expect(data.content[0].text === REPLY, `text ${data.content[0].text}`);
  expect(response.headers.get('x-resil-provider') === 'openai', `provider ${response.headers.get('x-resil-provider')}`);
  expect((await upstream()).down > before.down, 'the overloaded upstream was tried first');
});

// a conversation in one API's shape served by the other provider: its tool calls, their results
// and an image are translated (the strict mock refuses the other API's shapes, as the APIs do)
const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk';
await check('anthropic: a tool conversation with an image falls back to OpenAI, translated', async () => {
  const { data, response } = await ant().messages.create({ model: 'claude-busy', max_tokens: 100,
    tools: [{ name: weather.name, description: weather.description, input_schema: weather.parameters }],
    messages: [
      { role: 'user', content: [{ type: 'text', text: 'The weather where this is?' },
        { type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } }] },
      { role: 'assistant', content: [{ type: 'text', text: 'Checking.' },
        { type: 'tool_use', id: 'toolu_1', name: 'get_weather', input: { city: 'Paris' } }] },
      { role: 'user', content: [{ type: 'tool_result', tool_use_id: 'toolu_1', content: '18C' }] }] }).withResponse();
  expect(data.content[0].text === REPLY, `text ${JSON.stringify(data.content)}`);
  expect(response.headers.get('x-resil-provider') === 'openai', `provider ${response.headers.get('x-resil-provider')}`);
});

await check('openai: a tool conversation with an image served by Anthropic, translated', async () => {
  const { data, response } = await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929',
    tools: [{ type: 'function', function: weather }],
    messages: [
      { role: 'user', content: [{ type: 'text', text: 'The weather in both?' },
        { type: 'image_url', image_url: { url: 'data:image/png;base64,' + PNG } }] },
      { role: 'assistant', content: null, tool_calls: [
        { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } },
        { id: 'call_2', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Rome"}' } }] },
      { role: 'tool', tool_call_id: 'call_1', content: '18C' },
      { role: 'tool', tool_call_id: 'call_2', content: '21C' }] }).withResponse();
  expect(data.choices[0].message.content === REPLY, `content ${data.choices[0].message.content}`);
  expect(response.headers.get('x-resil-provider') === 'anthropic', `provider ${response.headers.get('x-resil-provider')}`);
});

// fields of the client's own API reach a provider of that API, and its answer comes back whole
await check('openai: logprobs are sent upstream and come back with the usage details', async () => {
  const r = await oai().chat.completions.create({ model: 'chat-echo', messages: msgs, logprobs: true, top_logprobs: 2 });
  const seen = JSON.parse(r.choices[0].message.content.replace(/^seen /, ''));
  expect(seen.logprobs === true && seen.top_logprobs === 2, `content ${r.choices[0].message.content}`);
  expect(r.choices[0].logprobs?.content?.[0]?.token === 'seen', `logprobs ${JSON.stringify(r.choices[0].logprobs)}`);
  expect(r.usage.prompt_tokens_details?.cached_tokens === 4, `usage ${JSON.stringify(r.usage)}`);
  expect(r.model === 'chat-echo' && r.id.startsWith('chatcmpl-') && r.id !== 'chatcmpl-echo', `id ${r.id} model ${r.model}`);
});

await check('anthropic: thinking is sent upstream and its block comes back with its signature', async () => {
  const r = await ant().messages.create({ model: 'claude-echo', max_tokens: 2048, messages: msgs, top_k: 5,
    thinking: { type: 'enabled', budget_tokens: 1024 } });
  expect(r.content[0].type === 'thinking' && r.content[0].signature === 'sig_abc', `content ${JSON.stringify(r.content)}`);
  const seen = JSON.parse(r.content[1].text.replace(/^seen /, ''));
  expect(seen.thinking?.budget_tokens === 1024 && seen.top_k === 5, `text ${r.content[1].text}`);
  expect(r.usage.output_tokens === 7, `usage ${JSON.stringify(r.usage)}`);
});

await check('anthropic: a stream relays thinking with its signature, then the text', async () => {
  const final = await ant().messages.stream({ model: 'claude-echo', max_tokens: 2048, messages: msgs,
    thinking: { type: 'enabled', budget_tokens: 1024 } }).finalMessage();
  expect(final.content[0].type === 'thinking' && final.content[0].thinking === 'Let me think.' &&
    final.content[0].signature === 'sig_abc', `content ${JSON.stringify(final.content)}`);
  expect(final.content[1].text.startsWith('seen '), `text ${JSON.stringify(final.content[1])}`);
  expect(final.id.startsWith('msg_') && final.id !== 'msg_echo' && final.model === 'claude-echo', `id ${final.id} model ${final.model}`);
  expect(final.usage.output_tokens === 7, `usage ${JSON.stringify(final.usage)}`);
});

// a refusal is Anthropic's answer, often with no content at all: one call, relayed, never
// invalid output (tried again, paid again; a 502 that the SDK tried twice more)
await check('anthropic: a refusal with no content is the SDK\'s message, stop_reason refusal, one call', async () => {
  const before = (await upstream()).refusing;
  const r = await ant(keys.good, 2).messages.create({ model: 'claude-refusing', max_tokens: 100, messages: msgs });
  expect(r.stop_reason === 'refusal' && r.content.length === 0, `message ${JSON.stringify(r)}`);
  const final = await ant(keys.good, 2).messages.stream({ model: 'claude-refusing', max_tokens: 100,
    messages: msgs }).finalMessage();
  expect(final.stop_reason === 'refusal' && final.content.length === 0, `streamed ${JSON.stringify(final)}`);
  expect((await upstream()).refusing === before + 2, `upstream calls ${(await upstream()).refusing - before}`);
});

// answers refused as invalid output were billed, and tried again by the gateway: the SDK's own
// retries (two here, as by default) would have paid for six more
await check('openai: invalid output, billed and tried again by the gateway, is not tried again by the SDK', async () => {
  const before = (await upstream()).empty;
  const e = await rejects(oai(keys.good, 2).chat.completions.create({ model: 'chat-empty', messages: msgs }),
    OpenAI.InternalServerError, 'invalid output');
  expect(e.status === 502, `status ${e.status}`);
  expect((await upstream()).empty === before + 3, `upstream calls ${(await upstream()).empty - before}`);
});

await check('openai: an Anthropic refusal with no content is finish_reason content_filter', async () => {
  const r = await oai(keys.good, 2).chat.completions.create({ model: 'claude-refusing', messages: msgs });
  expect(r.choices[0].finish_reason === 'content_filter', `choice ${JSON.stringify(r.choices[0])}`);
  const final = await oai(keys.good, 2).chat.completions.stream({ model: 'claude-refusing', messages: msgs })
    .finalChatCompletion();
  expect(final.choices[0].finish_reason === 'content_filter', `streamed ${JSON.stringify(final.choices[0])}`);
});

// Anthropic's cache reads, in the usage an OpenAI client reads (a cost it works out from them)
await check('openai: an answer from Anthropic tells its cached prompt tokens, streamed or not', async () => {
  const r = await oai().chat.completions.create({ model: 'claude-echo', messages: msgs });
  expect(r.usage.prompt_tokens === 16 && r.usage.prompt_tokens_details?.cached_tokens === 4, `usage ${JSON.stringify(r.usage)}`);
  const final = await oai().chat.completions.stream({ model: 'claude-echo', messages: msgs,
    stream_options: { include_usage: true } }).finalChatCompletion();
  expect(final.usage?.prompt_tokens === 16 && final.usage?.prompt_tokens_details?.cached_tokens === 4,
    `streamed usage ${JSON.stringify(final.usage)}`);
});

await check('anthropic: top_k, thinking and metadata are left out of a fallback to OpenAI', async () => {
  const { data, response } = await ant().messages.create({ model: 'claude-busy', max_tokens: 2048, messages: msgs,
    top_k: 5, metadata: { user_id: 'u1' }, thinking: { type: 'enabled', budget_tokens: 1024 } }).withResponse();
  expect(data.content[0].text === REPLY, `content ${JSON.stringify(data.content)}`);
  expect(response.headers.get('x-resil-provider') === 'openai', `provider ${response.headers.get('x-resil-provider')}`);
});

await check('openai: models.list and models.retrieve (an id with a slash too)', async () => {
  const ids = [];
  for await (const m of oai().models.list()) ids.push(m.id);
  expect(ids.includes('chat-fast') && ids.includes('claude-busy'), `ids ${ids}`);
  const m = await oai().models.retrieve('chat-fast');
  expect(m.id === 'chat-fast' && m.object === 'model', `model ${JSON.stringify(m)}`);
  const err = await rejects(oai().models.retrieve('openai/no-such-model'), OpenAI.NotFoundError, 'an unknown model');
  expect(err.code === 'model_not_found', `code ${err.code}`);
});

await check('anthropic: models.list and models.retrieve in its own shape', async () => {
  const ids = [];
  for await (const m of ant().models.list()) ids.push(m.id);
  expect(ids.includes('claude-echo'), `ids ${ids}`);
  const m = await ant().models.retrieve('claude-echo');
  expect(m.type === 'model' && m.id === 'claude-echo' && typeof m.display_name === 'string', `model ${JSON.stringify(m)}`);
});

// ModelInfo's fields are typed as never absent: code that kept the models whose lifecycle is
// 'active' kept none of the gateway's
await check('anthropic: a model has every field of the SDK\'s ModelInfo, listed or retrieved', async () => {
  const keys = ['id', 'type', 'display_name', 'created_at', 'capabilities', 'lifecycle', 'deprecated_at',
    'retires_at', 'line', 'max_input_tokens', 'max_tokens'];
  const page = await ant().models.list({ limit: 1000 });
  for (const m of [...page.data, await ant().models.retrieve('claude-echo'),
    await ant().models.retrieve('anthropic/claude-sonnet-4-5-20250929')]) {
    const absent = keys.filter((k) => m[k] === undefined);
    expect(absent.length === 0, `${m.id} has no ${absent}`);
    expect(m.lifecycle === 'active' && m.deprecated_at === null && m.retires_at === null, JSON.stringify(m));
  }
});

await check('anthropic: models.list({limit: 2}) pages by two, each model once, and back with before_id', async () => {
  const all = [];
  for await (const m of ant().models.list({ limit: 1000 })) all.push(m.id);
  const page = await ant().models.list({ limit: 2 });
  expect(page.data.length === 2 && page.has_more === true, `first page ${JSON.stringify(page.data)} has_more ${page.has_more}`);
  const ids = [];
  for await (const m of ant().models.list({ limit: 2 })) ids.push(m.id);
  expect(ids.join() === all.join() && new Set(ids).size === ids.length && ids.length > 4, `paged ${ids} all ${all}`);
  const back = await ant().models.list({ limit: 2, before_id: all[3] });
  expect(back.data.map((m) => m.id).join() === all.slice(1, 3).join() && back.has_more === true,
    `before ${all[3]}: ${back.data.map((m) => m.id)} has_more ${back.has_more}`);
  await rejects(ant().models.list({ limit: 0 }), Anthropic.BadRequestError, 'limit 0');
});

await check('anthropic: a request without max_tokens is BadRequestError, as the API answers it', async () => {
  const err = await rejects(ant().messages.create({ model: 'claude-sonnet-4-5-20250929', messages: msgs }),
    Anthropic.BadRequestError, 'no max_tokens');
  expect(/max_tokens/.test(err.message), `error ${err.message}`);
});

await check('openai: a stream cut after its first delta raises in the SDK', async () => {
  let text = '';
  try {
    const s = await oai().chat.completions.create({ model: 'chat-cut', messages: msgs, stream: true });
    for await (const chunk of s) text += chunk.choices[0]?.delta?.content ?? '';
  } catch (e) {
    expect(e instanceof OpenAI.APIError, `got ${e && e.constructor && e.constructor.name}`);
    expect(text.length > 0 && text !== REPLY, `text before the error: ${text}`);
    return;
  }
  throw new Error(`no error; text ${text}`);
});

await check('anthropic: a stream cut after its first delta raises in the SDK', async () => {
  await rejects(ant().messages.stream({ model: 'claude-cut', max_tokens: 100, messages: msgs }).finalMessage(),
    Anthropic.APIError, 'cut');
});

// a context overflow as the provider said it: apps shorten the conversation on its code or message
for (const model of ['chat-overflow', 'claude-overflow']) {
  await check(`openai: a context overflow (${model}) is BadRequestError, code context_length_exceeded, the provider's message`, async () => {
    const e = await rejects(oai().chat.completions.create({ model, messages: msgs }), OpenAI.BadRequestError, 'overflow');
    expect(e.code === 'context_length_exceeded', `code ${e.code}`);
    expect(/maximum context length|prompt is too long/.test(e.message) && !/HTTP 400/.test(e.message), `message ${e.message}`);
  });
}
await check('openai: the provider\'s param and code reach the SDK (a context overflow\'s param, a model it does not have)', async () => {
  const e = await rejects(oai().chat.completions.create({ model: 'chat-overflow', messages: msgs }), OpenAI.BadRequestError, 'overflow');
  expect(e.param === 'messages', `param ${e.param}`);
  const gone = await rejects(oai().chat.completions.create({ model: 'gpt-gone', messages: msgs }), OpenAI.NotFoundError, '404');
  expect(gone.code === 'model_not_found' && /gpt-gone/.test(gone.message), `code ${gone.code}: ${gone.message}`);
});
await check('anthropic: a context overflow is BadRequestError with the API\'s message', async () => {
  const e = await rejects(ant().messages.create({ model: 'claude-overflow', max_tokens: 10, messages: msgs }),
    Anthropic.BadRequestError, 'overflow');
  expect(e.error?.error?.message === 'prompt is too long: 210000 tokens > 200000 maximum', `body ${JSON.stringify(e.error)}`);
});

await check('anthropic: an overloaded_error event after the first deltas is the SDK\'s error of that type', async () => {
  const e = await rejects(ant().messages.stream({ model: 'claude-broken', max_tokens: 100, messages: msgs }).finalMessage(),
    Anthropic.APIError, 'error event');
  expect(e.type === 'overloaded_error', `type ${e.type}: ${e.message}`);
});

await check('openai: a bad request is BadRequestError', async () => {
  await rejects(oai().chat.completions.create({ model: 'chat-fast', messages: [] }), OpenAI.BadRequestError, '400');
});

await check('openai: an unknown key is AuthenticationError', async () => {
  await rejects(oai('sk-resil-unknown').chat.completions.create({ model: 'chat-fast', messages: msgs }),
    OpenAI.AuthenticationError, '401');
});

await check('openai: a revoked key is AuthenticationError', async () => {
  await rejects(oai(keys.revoked).chat.completions.create({ model: 'chat-fast', messages: msgs }),
    OpenAI.AuthenticationError, '401');
});

// the Anthropic SDK's error.requestID is the request-id header: the gateway's refusals before a
// call (a key it does not know, the key's own rpm) carried only x-request-id, and it was null
await check('anthropic: a revoked key is AuthenticationError, with its request id', async () => {
  const e = await rejects(ant(keys.revoked).messages.create({ model: 'claude-sonnet-4-5-20250929', max_tokens: 10,
    messages: msgs }), Anthropic.AuthenticationError, '401');
  expect(e.requestID && e.requestID === e.headers.get('x-request-id'), `requestID ${e.requestID}`);
  const s = await rejects(ant('sk-resil-unknown').messages.stream({ model: 'claude-sonnet-4-5-20250929',
    max_tokens: 10, messages: msgs }).finalMessage(), Anthropic.AuthenticationError, '401 streamed');
  expect(s.requestID && s.requestID === s.headers.get('x-request-id'), `streamed: requestID ${s.requestID}`);
});

await check('anthropic: the key\'s rate limit is RateLimitError, with its request id', async () => {
  await ant(keys.slowant).messages.create({ model: 'claude-sonnet-4-5-20250929', max_tokens: 10, messages: msgs });
  const e = await rejects(ant(keys.slowant).messages.create({ model: 'claude-sonnet-4-5-20250929', max_tokens: 10,
    messages: msgs }), Anthropic.RateLimitError, '429');
  expect(e.requestID && e.requestID === e.headers.get('x-request-id'), `requestID ${e.requestID}`);
  expect(Number(e.headers.get('retry-after')) >= 1, 'retry-after');
});

await check('openai: the key\'s rate limit is RateLimitError', async () => {
  await oai(keys.slow).chat.completions.create({ model: 'chat-fast', messages: msgs });
  const e = await rejects(oai(keys.slow).chat.completions.create({ model: 'chat-fast', messages: msgs }),
    OpenAI.RateLimitError, '429');
  expect(Number(e.headers['retry-after'] ?? e.headers.get?.('retry-after')) >= 1, 'retry-after');
  expect(e.headers.get('x-should-retry') !== 'false', 'the key\'s own limit is the SDK\'s to wait for and retry');
});

// a key's limit frees its next request in less than a second (rpm 120: one each half second):
// Retry-After says 1, its whole seconds, and retry-after-ms, which both SDKs read first, says
// when: they waited a whole second for each retry
await check('openai and anthropic: a key\'s rate limit says retry-after-ms, the wait the SDKs read first', async () => {
  for (const [client, cls] of [[oai(keys.brisk), OpenAI.RateLimitError], [ant(keys.brisk), Anthropic.RateLimitError]]) {
    let e;
    for (let i = 0; i < 400 && !e; i++) {
      try {
        if (client instanceof OpenAI) await client.chat.completions.create({ model: 'chat-fast', messages: msgs });
        else await client.messages.create({ model: 'claude-sonnet-4-5-20250929', max_tokens: 10, messages: msgs });
      } catch (err) { e = err; }
    }
    expect(e instanceof cls, `${cls.name}: got ${e}`);
    const ms = Number(e.headers.get('retry-after-ms'));
    expect(e.headers.get('retry-after') === '1' && ms >= 1 && ms <= 500, `retry-after ${e.headers.get('retry-after')}, retry-after-ms ${e.headers.get('retry-after-ms')}`);
  }
});

// an SDK with its default retries (two), counting the requests it sends the gateway
const counted = (Cls, opts) => {
  const sent = { n: 0 };
  const client = new Cls({ ...opts, maxRetries: 2, fetch: (...a) => { sent.n++; return fetch(...a); } });
  return { client, sent };
};
for (const [api, model, cls, status] of [['openai', 'chat-failing-500', OpenAI.InternalServerError, 500],
  ['openai', 'chat-failing-408', OpenAI.APIError, 408], ['openai', 'chat-failing-reset', OpenAI.InternalServerError, 502],
  ['anthropic', 'claude-failing-529', Anthropic.APIError, 529],
  ['anthropic', 'claude-failing-503', Anthropic.InternalServerError, 500]]) {
  await check(`${api}: a ${model} the gateway tried again and gave up on is not tried again by the SDK`, async () => {
    const before = (await upstream()).failing;
    const { client, sent } = api === 'openai' ? counted(OpenAI, { apiKey: keys.good, baseURL: url + '/v1' })
      : counted(Anthropic, { apiKey: keys.good, baseURL: url });
    const call = api === 'openai' ? client.chat.completions.create({ model, messages: msgs })
      : client.messages.create({ model, max_tokens: 100, messages: msgs });
    const e = await rejects(call, cls, model);
    const calls = (await upstream()).failing - before;
    expect(e.status === status, `status ${e.status}`);
    expect(sent.n === 1, `the SDK sent ${sent.n} requests, the upstream had ${calls}`);
    expect(calls >= 1 && calls <= 8, `the upstream had ${calls}`);
    if (status === 529 || status === 503) expect(Number(e.headers.get('retry-after')) >= 1, 'retry-after kept');
  });
}

await check('openai: an exhausted budget is refused, not retried, no provider called', async () => {
  const before = await upstream();
  const e = await rejects(oai(keys.broke, 2).chat.completions.create({ model: 'chat-fast', messages: msgs,
    max_tokens: 1000 }), OpenAI.RateLimitError, 'budget');
  expect(e.code === 'insufficient_quota', `code ${e.code}`);
  expect((await upstream()).total === before.total, 'a provider was called');
});

await check('openai: an Idempotency-Key replays the first answer, billed once', async () => {
  const before = await upstream();
  const opts = { headers: { 'Idempotency-Key': 'sdk-replay-1' } };
  const a = await oai().chat.completions.create({ model: 'chat-fast', messages: msgs }, opts);
  const b = await oai().chat.completions.create({ model: 'chat-fast', messages: msgs }, opts);
  expect(a.choices[0].message.content === b.choices[0].message.content, 'same answer');
  expect((await upstream()).total === before.total + 1, 'the upstream was called twice');
});

await check('openai: a client that aborts a stream cancels the upstream transfer', async () => {
  const long = oai();
  const ctl = new AbortController();
  const s = await long.chat.completions.create({ model: 'chat-long', messages: msgs, stream: true },
    { signal: ctl.signal });
  try {
    for await (const chunk of s) {
      if (chunk.choices[0]?.delta?.content) { ctl.abort(); }
    }
  } catch (e) { /* the abort */ }
  let pending = -1;
  for (let i = 0; i < 200; i++) {
    pending = (await upstream()).long_pending;
    if (pending === 0) break;
    await sleep(10);
  }
  expect(pending === 0, `the upstream still streams (${pending} open)`);
});
