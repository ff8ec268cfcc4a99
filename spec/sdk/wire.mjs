// The official clients against a gateway whose upstreams answer at the edges
// of the wire formats (spec/sdk/wire_server.lua, run by
// spec/gateway_wire_spec.lua). One line per check, as spec/sdk/harness.mjs.
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { check, expect, rejects } from './harness.mjs';

const { url, key, limited } = JSON.parse(process.env.GATEWAY);
const oai = () => new OpenAI({ apiKey: key, baseURL: url + '/v1', maxRetries: 0 });
const ant = () => new Anthropic({ apiKey: key, baseURL: url, maxRetries: 0 });
const last = async () => (await fetch(url + '/__test/last')).json();
const near = (a, b) => a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) < 1e-6);

// the SDK asks for base64 when its caller names no encoding, and decodes what comes back as
// base64: floats from a server that ignored the ask were decoded as garbage, without an error
await check('openai: embeddings from an upstream that ignores encoding_format reach the SDK as its vectors', async () => {
  const r = await oai().embeddings.create({ model: 'embed-compat', input: ['tides', 'moon'] });
  expect((await last()).embeddings.encoding_format === 'base64', 'the SDK asked for base64');
  expect(near(r.data[0].embedding, [0.5, -0.25, 0.125, 1]) && near(r.data[1].embedding, [0.5, -0.25, 0.25, 1]),
    `vectors ${JSON.stringify(r.data.map((d) => d.embedding))}`);
  const f = await oai().embeddings.create({ model: 'embed-compat', input: 'tides', encoding_format: 'float' });
  expect(near(f.data[0].embedding, [0.5, -0.25, 0.125, 1]), `floats ${JSON.stringify(f.data[0].embedding)}`);
});

// Message.stop_details and container are `| null` in the SDK's types, never absent (the
// stream helper copies message_delta's): code testing `stop_details !== null` for a
// refusal read every answer translated from OpenAI's as one
await check('anthropic: an answer translated from OpenAI has stop_details and container null, streamed or not', async () => {
  const req = { model: 'openai/gpt-4o-mini', max_tokens: 100, messages: [{ role: 'user', content: 'hi' }] };
  const tools = [{ name: 'get_weather', input_schema: { type: 'object', properties: { city: { type: 'string' } } } }];
  for (const [how, m] of [['whole', await ant().messages.create(req)],
    ['streamed', await ant().messages.stream(req).finalMessage()],
    ['streamed with tools', await ant().messages.stream({ ...req, tools }).finalMessage()]]) {
    expect(m.content[0].text === 'ok' && m.stop_reason === 'end_turn', `${how}: ${JSON.stringify(m)}`);
    expect(m.stop_details === null && m.container === null, `${how}: stop_details ${m.stop_details} container ${m.container}`);
  }
});

// "at most one tool call" is tool_choice.disable_parallel_tool_use in Anthropic's API and
// parallel_tool_calls = false in OpenAI's: it was dropped, even on the way to Anthropic itself
await check('one tool call at most: disable_parallel_tool_use and parallel_tool_calls reach the provider, either way', async () => {
  const msgs = [{ role: 'user', content: 'hi' }];
  const atools = [{ name: 'get_weather', input_schema: { type: 'object', properties: { city: { type: 'string' } } } }];
  const otools = [{ type: 'function', function: { name: 'get_weather', parameters: atools[0].input_schema } }];
  for (const tc of [{ type: 'auto', disable_parallel_tool_use: true }, { type: 'tool', name: 'get_weather', disable_parallel_tool_use: true }]) {
    await ant().messages.create({ model: 'anthropic/claude-sonnet-4-5-20250929', max_tokens: 50, messages: msgs, tools: atools, tool_choice: tc });
    const sent = (await last()).anthropic.tool_choice;
    expect(sent?.type === tc.type && sent.disable_parallel_tool_use === true, `to Anthropic ${JSON.stringify(sent)}`);
    await ant().messages.create({ model: 'openai/gpt-4o-mini', max_tokens: 50, messages: msgs, tools: atools, tool_choice: tc });
    const o = (await last()).openai;
    expect(o.parallel_tool_calls === false, `to OpenAI ${JSON.stringify(o)}`);
  }
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: msgs, tools: otools,
    parallel_tool_calls: false });
  const sent = (await last()).anthropic.tool_choice;
  expect(sent?.type === 'auto' && sent.disable_parallel_tool_use === true, `from OpenAI ${JSON.stringify(sent)}`);
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: msgs, tools: otools,
    tool_choice: 'none', parallel_tool_calls: false });
  const none = (await last()).anthropic.tool_choice;
  expect(none?.type === 'none' && none.disable_parallel_tool_use === undefined, `tool_choice none ${JSON.stringify(none)}`);
});

// structured output is response_format json_schema in OpenAI's API and output_config.format in
// Anthropic's: across, it was dropped, and the model's prose failed the client's parse()
await check('structured output reaches the other API: response_format json_schema <-> output_config.format', async () => {
  const schema = { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer' } },
    required: ['city', 'days'], additionalProperties: false };
  const msgs = [{ role: 'user', content: 'The forecast, as JSON' }];
  const r = await oai().chat.completions.parse({ model: 'claude-strict', messages: msgs,
    response_format: { type: 'json_schema', json_schema: { name: 'forecast', strict: true, schema } } });
  const p = r.choices[0].message.parsed;
  expect(p?.city === 'Paris' && p.days === 0, `OpenAI client, Anthropic served: parsed ${JSON.stringify(p)}`);
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: msgs,
    response_format: { type: 'json_schema', json_schema: { name: 'forecast', schema } } });
  const sent = (await last()).anthropic.output_config;
  expect(sent?.format?.type === 'json_schema' && sent.format.schema.required.length === 2, `sent ${JSON.stringify(sent)}`);
  const m = await ant().messages.create({ model: 'gpt-strict', max_tokens: 100, messages: msgs,
    output_config: { format: { type: 'json_schema', schema } } });
  const q = JSON.parse(m.content[0].text);
  expect(q.city === 'Paris' && q.days === 0, `Anthropic client, OpenAI served: ${m.content[0].text}`);
});

// a cache breakpoint on a system message's part (prompt caching as LiteLLM's users write it in
// OpenAI's shape): the system prompt was joined into one string and the breakpoint lost
await check('openai: a system message part\'s cache_control reaches Anthropic as a cached system block', async () => {
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: [
    { role: 'system', content: 'Be brief.' },
    { role: 'system', content: [{ type: 'text', text: 'A long document.', cache_control: { type: 'ephemeral' } }] },
    { role: 'user', content: 'hi' }] });
  const system = (await last()).anthropic.system;
  expect(Array.isArray(system) && system.length === 2 && system[0].text === 'Be brief.' && !system[0].cache_control &&
    system[1].text === 'A long document.' && system[1].cache_control?.type === 'ephemeral', `system ${JSON.stringify(system)}`);
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: [
    { role: 'system', content: 'Be brief.' }, { role: 'system', content: [{ type: 'text', text: 'Plain.' }] },
    { role: 'user', content: 'hi' }] });
  const plain = (await last()).anthropic.system;
  expect(plain === 'Be brief.\n\nPlain.', `without a breakpoint ${JSON.stringify(plain)}`);
});

// an answer too large to keep under its Idempotency-Key is served once; its retry is a 409 for
// good, which the SDK (that retries a 409, a lock's timeout) asked twice more
await check('openai: the 409 of an answer not kept under its Idempotency-Key is not retried by the SDK', async () => {
  let sent = 0;
  const counting = new OpenAI({ apiKey: key, baseURL: url + '/v1', maxRetries: 2,
    fetch: (u, init) => { sent++; return fetch(u, init); } });
  const opts = { headers: { 'Idempotency-Key': 'wire-large-' + Date.now() } };
  const body = { model: 'embed-compat', input: ['tides', 'moon', 'sea'], encoding_format: 'float' };
  await counting.embeddings.create(body, opts);
  sent = 0;
  let e;
  try { await counting.embeddings.create(body, opts); } catch (err) { e = err; }
  expect(e instanceof OpenAI.ConflictError && e.code === 'idempotency_answer_not_kept', `error ${e}`);
  expect(sent === 1, `requests ${sent}`);
});

// cache breakpoints on a tool and on a tool result's part, as LiteLLM's users mark them in
// OpenAI's shape: Anthropic got neither (the tools, often the longest part of an agent's prompt,
// were never cached), and OpenAI must get none
await check('openai: cache_control on a tool and a tool result reaches Anthropic, not OpenAI', async () => {
  const req = { messages: [{ role: 'user', content: 'q' },
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function',
      function: { name: 'get_weather', arguments: '{}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: [{ type: 'text', text: '18C', cache_control: { type: 'ephemeral' } }] }],
    tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object' } },
      cache_control: { type: 'ephemeral' } }] };
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', ...req });
  const a = (await last()).anthropic;
  expect(a.tools[0].cache_control?.type === 'ephemeral', `tools ${JSON.stringify(a.tools)}`);
  expect(a.messages[2].content[0].type === 'tool_result' && a.messages[2].content[0].cache_control?.type === 'ephemeral',
    `tool result ${JSON.stringify(a.messages[2])}`);
  await oai().chat.completions.create({ model: 'openai/gpt-4o-mini', ...req });
  const o = (await last()).openai;
  expect(o.tools[0].cache_control === undefined && o.tools[0].function.name === 'get_weather', `to OpenAI ${JSON.stringify(o.tools)}`);
  expect(o.messages[2].content[0].cache_control === undefined, `tool message to OpenAI ${JSON.stringify(o.messages[2])}`);
});

// Usage's cache_creation, server_tool_use and service_tier are never absent in the SDK's types:
// code reading the cache writes' breakdown met undefined in an answer translated from OpenAI's
await check('anthropic: an answer translated from OpenAI has the usage fields the SDK types, streamed or not', async () => {
  const req = { model: 'openai/gpt-4o-mini', max_tokens: 100, messages: [{ role: 'user', content: 'hi' }] };
  const tools = [{ name: 'get_weather', input_schema: { type: 'object', properties: { city: { type: 'string' } } } }];
  for (const [how, m] of [['whole', await ant().messages.create(req)],
    ['streamed', await ant().messages.stream(req).finalMessage()],
    ['streamed with tools', await ant().messages.stream({ ...req, tools }).finalMessage()]]) {
    const u = m.usage;
    expect(u.input_tokens === 12 && u.output_tokens === 1 && u.cache_read_input_tokens === 0 &&
      u.cache_creation_input_tokens === 0 && u.cache_creation?.ephemeral_5m_input_tokens === 0 &&
      u.cache_creation.ephemeral_1h_input_tokens === 0 && u.server_tool_use === null && u.service_tier === null,
    `${how}: usage ${JSON.stringify(u)}`);
  }
});

// Anthropic refuses a stop sequence that is empty or only whitespace ("\n" is a common one of
// OpenAI clients): every such request it served, or fell back to, was a 400
await check('openai: a whitespace-only stop sequence is left out for Anthropic, the others kept', async () => {
  const msgs = [{ role: 'user', content: 'Name a city' }];
  const r = await oai().chat.completions.create({ model: 'claude-strict', messages: msgs, stop: ['\n', ' ', 'END'] });
  expect(r.choices[0].message.content === 'Paris', `content ${r.choices[0].message.content}`);
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: msgs, stop: ['\n', 'END'] });
  const sent = (await last()).anthropic.stop_sequences;
  expect(JSON.stringify(sent) === '["END"]', `stop_sequences ${JSON.stringify(sent)}`);
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: msgs, stop: '\n' });
  expect((await last()).anthropic.stop_sequences === undefined, 'a lone newline: none sent');
});

// a compatible upstream's tool-call deltas without index (Gemini's) or type (some vLLM
// versions), relayed as they came: the SDK's stream helper failed ("missing
// choices[0].tool_calls[0].type") or lost the calls; the API's contract has both
await check('openai: tool-call deltas without index or type from a compatible upstream reach the SDK whole', async () => {
  const final = await oai().chat.completions.stream({ model: 'openai/gemini-compat', messages: [{ role: 'user', content: 'hi' }],
    tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object' } } }] }).finalChatCompletion();
  const calls = final.choices[0].message.tool_calls;
  expect(final.choices[0].finish_reason === 'tool_calls' && calls?.length === 2 && calls[0].id === 'call_a' &&
    calls[1].type === 'function' && JSON.parse(calls[1].function.arguments).city === 'Rome', `calls ${JSON.stringify(calls)}`);
});

// an assistant turn that said nothing, sent back as the SDK returned it (a refusal: content
// null, its text in `refusal`), was empty content, which Anthropic refuses but in the last message
await check('openai: an assistant turn without content (a refusal sent back) is served by Anthropic', async () => {
  for (const said of [{ content: null, refusal: "I can't help with that." }, { content: '' }]) {
    const r = await oai().chat.completions.create({ model: 'claude-strict', messages: [
      { role: 'user', content: 'Something bad' }, { role: 'assistant', ...said }, { role: 'user', content: 'A city, then' }] });
    expect(r.choices[0].message.content === 'Paris', `${JSON.stringify(said)}: ${r.choices[0].message.content}`);
  }
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: [
    { role: 'user', content: 'Something bad' }, { role: 'assistant', content: null, refusal: 'No.' }, { role: 'user', content: 'Then?' }] });
  const sent = (await last()).anthropic.messages;
  expect(sent[1].role === 'assistant' && sent[1].content === 'No.', `sent ${JSON.stringify(sent)}`);
});

// a custom tool's call (GPT-5's free-form tools) sent back in the conversation, as the API
// takes it: the gateway refused it as a function call without a function (a 400)
await check('openai: a conversation with a custom tool\'s call is served', async () => {
  const r = await oai().chat.completions.create({ model: 'gpt-strict', messages: [
    { role: 'user', content: 'Run it' },
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'custom', custom: { name: 'code_exec', input: 'print(1)' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: '1' }],
    tools: [{ type: 'custom', custom: { name: 'code_exec', description: 'runs Python' } }] });
  expect(r.choices[0].message.content === 'Paris', `content ${r.choices[0].message.content}`);
});

// a tool of a type with its own shape and no name (Anthropic's MCP connector's toolset)
await check('anthropic: an MCP toolset (a tool without a name) reaches Anthropic', async () => {
  const r = await ant().beta.messages.create({ model: 'anthropic/claude-sonnet-4-5-20250929', max_tokens: 100,
    messages: [{ role: 'user', content: 'hi' }], betas: ['mcp-client-2025-11-20'],
    mcp_servers: [{ type: 'url', url: 'https://mcp.example.com/sse', name: 'example' }],
    tools: [{ type: 'mcp_toolset', mcp_server_name: 'example' }] });
  expect(r.content[0].text === 'ok', `content ${JSON.stringify(r.content)}`);
  const sent = (await last()).anthropic.tools;
  expect(sent?.[0]?.type === 'mcp_toolset' && sent[0].mcp_server_name === 'example', `tools ${JSON.stringify(sent)}`);
});

// what the server refuses before any handler runs (a body past max_body, headers past
// max_headers, a request not read in time) was libevent's HTML page, which the SDKs made an
// error of without a type or a message: a 413 in each API's shape now, typed as each types it
await check('the server\'s own refusals (413, 431, 408) reach each SDK as an API error of its type', async () => {
  const big = 'x'.repeat(300000); // (wire_server's max_body is 200,000 bytes)
  const o = await rejects(oai().chat.completions.create({ model: 'openai/gpt-4o-mini',
    messages: [{ role: 'user', content: big }] }), OpenAI.APIError, 'openai 413');
  expect(o.status === 413 && o.type === 'invalid_request_error' && o.code === 'request_too_large' &&
    /larger than this server accepts \(200000 bytes\)/.test(o.message), `openai 413: ${o.type} ${o.code} ${o.message}`);
  const a = await rejects(ant().messages.create({ model: 'anthropic/claude-sonnet-4-5-20250929', max_tokens: 10,
    messages: [{ role: 'user', content: big }] }), Anthropic.ContentTooLargeError, 'anthropic 413');
  expect(a.type === 'request_too_large' && /larger than this server accepts/.test(a.apiMessage),
    `anthropic 413: ${a.type} ${a.apiMessage}`);
  const c = await rejects(ant().messages.countTokens({ model: 'anthropic/claude-sonnet-4-5-20250929',
    messages: [{ role: 'user', content: big }] }), Anthropic.ContentTooLargeError, 'anthropic count_tokens 413');
  expect(c.type === 'request_too_large', `count_tokens 413: ${c.type}`);
  // headers past max_headers: a 431 (libevent's 400 said malformed), an API error to both SDKs
  const h = await rejects(oai().chat.completions.create({ model: 'openai/gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] },
    { headers: { 'x-big': 'a'.repeat(70000) } }), OpenAI.APIError, 'openai headers past max_headers');
  expect(h.status === 431 && h.type === 'invalid_request_error' &&
    /headers are larger than this server accepts \(65536 bytes\)/.test(h.message), `431: ${h.status} ${h.type} ${h.message}`);
  const ah = await rejects(ant().messages.create({ model: 'anthropic/claude-sonnet-4-5-20250929', max_tokens: 10,
    messages: [{ role: 'user', content: 'hi' }] }, { headers: { 'x-big': 'a'.repeat(70000) } }), Anthropic.APIError,
  'anthropic headers past max_headers');
  expect(ah.status === 431 && ah.type === 'invalid_request_error' && /headers are larger/.test(ah.apiMessage),
    `anthropic 431: ${ah.status} ${ah.type} ${ah.apiMessage}`);
  // a body that stalls after its first bytes (wire_server's read_timeout is 2 s)
  const stalling = (u, init) => fetch(u, { ...init, duplex: 'half', body: new ReadableStream({
    start(ctl) { ctl.enqueue(new TextEncoder().encode('{"model":')); } }) });
  const t = await rejects(new Anthropic({ apiKey: key, baseURL: url, maxRetries: 0, fetch: stalling }).messages.create({
    model: 'anthropic/claude-sonnet-4-5-20250929', max_tokens: 10, messages: [{ role: 'user', content: 'hi' }] }),
  Anthropic.RequestTimeoutError, 'anthropic 408');
  expect(t.type === 'invalid_request_error' && /not read in time/.test(t.apiMessage), `408: ${t.type} ${t.apiMessage}`);
  // each with its request id, as every other answer (the SDKs' requestID was undefined on these alone),
  // and Anthropic's in its body too, as the API's error bodies name it
  for (const [name, e] of Object.entries({ o, a, c, h, ah, t })) {
    expect(typeof e.requestID === 'string' && e.requestID.startsWith('req_'), `${name} requestID ${e.requestID}`);
  }
  for (const [name, e] of Object.entries({ a, c, ah, t })) {
    expect(e.error?.request_id === e.requestID, `${name} body request_id ${JSON.stringify(e.error)}`);
  }
});

// an endpoint of either SDK the gateway does not serve (Anthropic's Files API, OpenAI's): a 404 in
// the client's API's shape (the Anthropic SDK's was OpenAI's invalid_request_error, as the path
// alone chose it), and, as every other answer, with its request id (the SDKs' requestID was null)
await check('an endpoint the gateway does not serve is the SDK\'s own 404 (or 405), with its request id', async () => {
  const a = await rejects(ant().beta.files.list(), Anthropic.NotFoundError, 'anthropic files');
  expect(a.type === 'not_found_error' && /no route GET \/v1\/files/.test(a.apiMessage),
    `anthropic 404: ${a.type} ${a.apiMessage}`);
  expect(typeof a.requestID === 'string' && a.requestID.startsWith('req_'), `anthropic requestID ${a.requestID}`);
  const o = await rejects(oai().files.list(), OpenAI.NotFoundError, 'openai files');
  expect(o.type === 'invalid_request_error' && o.code === 'unknown_url', `openai 404: ${o.type} ${o.code}`);
  expect(typeof o.requestID === 'string' && o.requestID.startsWith('req_'), `openai requestID ${o.requestID}`);
  const m = await rejects(oai().get('/chat/completions'), OpenAI.APIError, 'openai GET chat/completions');
  expect(m.status === 405 && m.code === 'method_not_allowed' && typeof m.requestID === 'string',
    `openai 405: ${m.status} ${m.code} ${m.requestID}`);
});

// OpenAI's temperature runs 0..2 and Anthropic's 0..1, and Anthropic's recent models refuse
// temperature and top_p together: an OpenAI client's request served by Anthropic was a 400
// for either. Sent as Anthropic takes them: temperature at most 1, top_p left out beside it
await check('openai: temperature over 1, and temperature with top_p, are served by Anthropic', async () => {
  const msgs = [{ role: 'user', content: 'Name a city' }];
  for (const s of [{ temperature: 1.5 }, { temperature: 0.3, top_p: 0.9 }, { temperature: 2, top_p: 0.5 }]) {
    const r = await oai().chat.completions.create({ model: 'claude-strict', messages: msgs, ...s });
    expect(r.choices[0].message.content === 'Paris', `${JSON.stringify(s)}: ${r.choices[0].message.content}`);
  }
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: msgs, temperature: 1.7, top_p: 0.9 });
  let sent = (await last()).anthropic;
  expect(sent.temperature === 1 && sent.top_p === undefined, `sent ${sent.temperature} ${sent.top_p}`);
  await oai().chat.completions.create({ model: 'anthropic/claude-sonnet-4-5-20250929', messages: msgs, top_p: 0.9 });
  sent = (await last()).anthropic;
  expect(sent.top_p === 0.9 && sent.temperature === undefined, `top_p alone: ${sent.temperature} ${sent.top_p}`);
  // to OpenAI, as the client sent them
  await oai().chat.completions.create({ model: 'openai/gpt-4o-mini', messages: msgs, temperature: 1.7, top_p: 0.9 });
  const o = (await last()).openai;
  expect(o.temperature === 1.7 && o.top_p === 0.9, `to OpenAI ${o.temperature} ${o.top_p}`);
  // an Anthropic client's own request is sent as it is, and refused as Anthropic refuses it
  const e = await rejects(ant().messages.create({ model: 'claude-strict', max_tokens: 20, messages: msgs,
    temperature: 0.5, top_p: 0.9 }), Anthropic.BadRequestError, 'anthropic client, both');
  expect(/cannot both be specified/.test(e.apiMessage), `anthropic client: ${e.apiMessage}`);
});

// messages.countTokens was a 404: an Anthropic client sizing its prompt (an agent's context
// window, Claude Code's) failed through the gateway. Asked of the model's Anthropic upstream;
// a model OpenAI serves has no count, a 400 saying so
await check('anthropic: countTokens is the upstream\'s count; a model another API serves is a 400 saying so', async () => {
  const req = { model: 'claude-strict', system: 'Be brief.', messages: [{ role: 'user', content: 'Name a city in France, please' }] };
  const c = await ant().messages.countTokens(req);
  const m = await ant().messages.create({ ...req, max_tokens: 20 });
  expect(c.input_tokens > 0 && c.input_tokens === m.usage.input_tokens, `count ${JSON.stringify(c)}, message's ${m.usage.input_tokens}`);
  const withTools = await ant().messages.countTokens({ ...req, tools: [{ name: 'get_weather',
    input_schema: { type: 'object', properties: { city: { type: 'string' } } } }], tool_choice: { type: 'auto' } });
  expect(withTools.input_tokens > 0, `with tools ${JSON.stringify(withTools)}`);
  // what Anthropic refuses in a count (an answer's field) is its 400, relayed
  const bad = await rejects(ant().messages.countTokens({ ...req, max_tokens: 20 }), Anthropic.BadRequestError, 'max_tokens in a count');
  expect(/max_tokens: Extra inputs are not permitted/.test(bad.apiMessage), `max_tokens: ${bad.apiMessage}`);
  const o = await rejects(ant().messages.countTokens({ ...req, model: 'gpt-strict' }), Anthropic.BadRequestError, 'an OpenAI model');
  expect(o.type === 'invalid_request_error' && /served by strictopenai, which has none/.test(o.apiMessage), `openai model: ${o.apiMessage}`);
  const u = await rejects(ant().messages.countTokens({ ...req, model: 'nobody/model' }), Anthropic.NotFoundError, 'an unknown provider');
  expect(u.type === 'not_found_error', `unknown: ${u.type} ${u.apiMessage}`);
});

// count_tokens asks the provider as a call does: it ran past the key's concurrency, its rpm and an
// open breaker. It takes a permit, has a bucket of its own at the key's rpm (Anthropic limits it
// apart from Messages: counting before each message does not halve the messages' rate), and is
// refused at once while the target's breaker is open
await check('anthropic: countTokens holds a permit, has its own bucket at the key\'s rpm, and meets an open breaker (or falls back)', async () => {
  const lim = new Anthropic({ apiKey: limited, baseURL: url, maxRetries: 0 });
  const req = { model: 'claude-strict', messages: [{ role: 'user', content: 'Name a city' }] };
  // a call held upstream holds the key's one permit
  const holding = lim.messages.create({ model: 'claude-held', max_tokens: 10, messages: req.messages });
  for (let i = 0; i < 200 && !(await last()).held; i++) await new Promise((r) => setTimeout(r, 25));
  expect((await last()).held === true, 'the held call reached its upstream');
  const busy = await rejects(lim.messages.countTokens(req), Anthropic.InternalServerError, 'count past the key\'s concurrency');
  expect(busy.status === 503 && /1 requests at once already/.test(busy.apiMessage), `busy: ${busy.status} ${busy.apiMessage}`);
  await fetch(url + '/__test/release', { method: 'POST' });
  expect((await holding).content[0].text === 'ok', 'the held call');
  // (the permit comes back once its reply is sent: the client may have it first)
  let first;
  for (let i = 0; i < 200; i++) {
    first = await lim.messages.countTokens(req).catch((e) => e);
    if (!(first instanceof Anthropic.InternalServerError)) break;
    await new Promise((r) => setTimeout(r, 25));
  }
  expect(first.input_tokens > 0, `first count: ${first}`);
  const second = await lim.messages.countTokens(req);
  expect(second.input_tokens === first.input_tokens, 'second count');
  const over = await rejects(lim.messages.countTokens(req), Anthropic.RateLimitError, 'a third count in the minute');
  expect(/2 count_tokens requests per minute/.test(over.apiMessage), `429: ${over.apiMessage}`);
  // the key's messages rate is its own: one call of two spent (the held one)
  const m = await lim.messages.create({ ...req, max_tokens: 10 });
  expect(m.content[0].text === 'Paris', `a call after the counts: ${JSON.stringify(m.content)}`);
  // an open breaker: the count is refused at once, the upstream not asked
  for (let i = 0; i < 2; i++) {
    await rejects(ant().messages.create({ model: 'claude-broken', max_tokens: 10, messages: req.messages }),
      Anthropic.APIError, 'a failing call');
  }
  const open = await rejects(ant().messages.countTokens({ ...req, model: 'claude-broken' }), Anthropic.InternalServerError,
    'count behind an open breaker');
  expect(open.status === 503 && /breaker is open/.test(open.apiMessage), `open breaker: ${open.status} ${open.apiMessage}`);
  // a model whose call falls back from that target: the count is asked of the fallback (it was a 503)
  const { data: fb, response: fbr } = await ant().messages.countTokens({ ...req, model: 'claude-fallback' }).withResponse();
  expect(fb.input_tokens > 0 && fbr.headers.get('x-resil-provider') === 'strictanthropic',
    `count with a fallback: ${JSON.stringify(fb)} from ${fbr.headers.get('x-resil-provider')}`);
});

// What the other API has no way to say was sent without it and answered 200 as if it were all
// there was: now each SDK's BadRequestError, naming the field
await check('what the other API cannot say is BadRequestError naming it: logprobs for Anthropic, a prefill for OpenAI', async () => {
  const msgs = [{ role: 'user', content: 'hi' }];
  const e = await rejects(oai().chat.completions.create({ model: 'claude-strict', messages: msgs, logprobs: true }),
    OpenAI.BadRequestError, 'logprobs served by Anthropic');
  expect(e.param === 'logprobs' && e.code === 'unsupported_parameter', `param ${e.param} code ${e.code}`);
  const a = await rejects(ant().messages.create({ model: 'gpt-strict', max_tokens: 50,
    messages: [...msgs, { role: 'assistant', content: '{' }] }), Anthropic.BadRequestError, 'a prefill served by OpenAI');
  expect(/prefill/.test(a.message), a.message);
});

// OpenAI takes a conversation with tool calls and no tools (a last turn that sums up); Anthropic's
// API refuses it, and every such turn it served was a 400
await check('openai: a tool conversation\'s last turn without tools is served by Anthropic', async () => {
  const msgs = [{ role: 'user', content: 'Weather in Paris?' },
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function',
      function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: 'sunny' }, { role: 'user', content: 'Sum it up.' }];
  const r = await oai().chat.completions.create({ model: 'claude-strict', messages: msgs });
  expect(r.choices[0].message.content === 'Paris', JSON.stringify(r.choices[0]));
  const s = await oai().chat.completions.stream({ model: 'claude-strict', messages: msgs }).finalChatCompletion();
  expect(s.choices[0].message.content === 'Paris', JSON.stringify(s.choices[0]));
});

// Anthropic's error.details.error_code picks the SDK's class (ImageDimensionsTooLargeError, its
// paths and limit in err.details), which an app catches to resize the image: the gateway relayed
// the message alone, a bare BadRequestError with errorCode null, whole, streamed, counted or replayed
await check('anthropic: an upstream 400\'s details reach the SDK, its class picked by their error_code', async () => {
  const PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk';
  const req = { model: 'claude-images', max_tokens: 20, messages: [{ role: 'user', content: [{ type: 'text', text: 'what is it?' },
    { type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } }] }] };
  const { max_tokens, ...counted } = req;
  for (const [how, call] of [['whole', () => ant().messages.create(req)],
    ['streamed', () => ant().messages.stream(req).finalMessage()],
    ['counted', () => ant().messages.countTokens(counted)],
    ['kept', () => ant().messages.create(req, { headers: { 'Idempotency-Key': 'image-too-large' } })],
    ['replayed', () => ant().messages.create(req, { headers: { 'Idempotency-Key': 'image-too-large' } })]]) {
    const e = await rejects(call(), Anthropic.ImageDimensionsTooLargeError, how);
    expect(e.status === 400 && e.errorCode === 'image_dimensions_too_large' && e.details.max_side_length_pixels === 8000 &&
      e.details.paths[0] === 'messages.0.content.1', `${how}: ${e.errorCode} ${JSON.stringify(e.details)}`);
  }
  const o = await rejects(oai().chat.completions.create({ model: 'claude-images', messages: [{ role: 'user', content: 'hi' }] }),
    OpenAI.BadRequestError, 'an OpenAI client');
  expect(/image dimensions exceed/.test(o.message) && o.error.details === undefined, `openai: ${JSON.stringify(o.error)}`);
});

// an upstream out of credit (a quota: not retried, by the gateway or the SDK) keeps the type
// Anthropic gives its status: a 400 and a 402 typed rate_limit_error were a rate limit to a
// client that reads error.type, backed off on and tried again
await check('anthropic: an upstream out of credit is billing_error (402) or invalid_request_error (400), not a rate limit', async () => {
  for (const [model, cls, type] of [['claude-402', Anthropic.PaymentRequiredError, 'billing_error'],
    ['claude-400-credit', Anthropic.BadRequestError, 'invalid_request_error']]) {
    const e = await rejects(ant().messages.create({ model, max_tokens: 20, messages: [{ role: 'user', content: 'hi' }] }), cls, model);
    expect(e.type === type && e.headers.get('x-should-retry') === 'false',
      `${model}: ${e.type} ${e.headers.get('x-should-retry')} ${e.apiMessage}`);
  }
});

// the API's error body names its request id (the SDK's ErrorResponse.request_id, string | null, never
// absent): the gateway's said it in its headers only, whichever refusal it was
await check('anthropic: an error\'s body names its request id, as its request-id header does', async () => {
  const req = { model: 'claude-strict', max_tokens: 20, messages: [{ role: 'user', content: 'hi' }] };
  const cases = [
    ['no max_tokens', () => ant().messages.create({ ...req, max_tokens: undefined }), Anthropic.BadRequestError],
    ['an unknown key', () => new Anthropic({ apiKey: 'sk-nope', baseURL: url, maxRetries: 0 }).messages.create(req),
      Anthropic.AuthenticationError],
    ['an unknown model', () => ant().messages.create({ ...req, model: 'nobody/model' }), Anthropic.NotFoundError],
    ['the upstream\'s 400', () => ant().messages.create({ ...req, temperature: 1.5 }), Anthropic.BadRequestError],
    ['a count\'s 400', () => ant().messages.countTokens({ ...req }), Anthropic.BadRequestError],
    ['a path not served', () => ant().messages.batches.list(), Anthropic.NotFoundError],
  ];
  for (const [what, call, cls] of cases) {
    const e = await rejects(call(), cls, what);
    expect(typeof e.requestID === 'string' && e.error.request_id === e.requestID && e.error.type === 'error',
      `${what}: ${e.requestID} ${JSON.stringify(e.error)}`);
  }
});

// a compatible server that ends its tool calls with finish_reason "stop" (Gemini's, some vLLM
// versions): its answer said end_turn to an Anthropic client, whose SDK's toolRunner (and any loop
// on stop_reason, as Anthropic's docs write one) ended there, the calls never run
await check('anthropic: tool calls a compatible server ended with "stop" are stop_reason tool_use, whole and streamed', async () => {
  const req = { model: 'openai/stop-compat', max_tokens: 100, messages: [{ role: 'user', content: 'weather in Paris?' }],
    tools: [{ name: 'get_weather', input_schema: { type: 'object', properties: { city: { type: 'string' } } } }] };
  for (const [how, m] of [['whole', await ant().messages.create(req)], ['streamed', await ant().messages.stream(req).finalMessage()]]) {
    const use = m.content.find((b) => b.type === 'tool_use');
    expect(m.stop_reason === 'tool_use' && use?.input?.city === 'Paris', `${how}: ${m.stop_reason} ${JSON.stringify(m.content)}`);
  }
  // (a text answer of such a server is still end_turn)
  const text = await ant().messages.create({ ...req, model: 'openai/gpt-4o-mini' });
  expect(text.stop_reason === 'end_turn', `text: ${text.stop_reason}`);
});

// a compatible server's tool calls without an id (DeepSeek's through some hosts): the OpenAI SDK's
// stream helper raised "missing choices[0].tool_calls[0].id", and an Anthropic client's tool_use
// had none to answer with a tool_result. Each gets one, unique, the same relayed and recorded
await check('tool calls a compatible server sent without an id get one, for either API\'s client, whole and streamed', async () => {
  const otools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object' } } }];
  const seen = new Set();
  for (const [how, get] of [['whole', () => oai().chat.completions.create({ model: 'openai/noid-compat', messages: [{ role: 'user', content: 'hi' }], tools: otools })],
    ['streamed', () => oai().chat.completions.stream({ model: 'openai/noid-compat', messages: [{ role: 'user', content: 'hi' }], tools: otools }).finalChatCompletion()]]) {
    const calls = (await get()).choices[0].message.tool_calls;
    expect(calls?.length === 2 && calls.every((c) => typeof c.id === 'string' && /^[A-Za-z0-9_-]+$/.test(c.id)),
      `openai ${how}: ${JSON.stringify(calls)}`);
    for (const c of calls) seen.add(c.id);
  }
  const req = { model: 'openai/noid-compat', max_tokens: 100, messages: [{ role: 'user', content: 'weather in Paris and Rome?' }],
    tools: [{ name: 'get_weather', input_schema: { type: 'object', properties: { city: { type: 'string' } } } }] };
  for (const [how, m] of [['whole', await ant().messages.create(req)], ['streamed', await ant().messages.stream(req).finalMessage()]]) {
    const uses = m.content.filter((b) => b.type === 'tool_use');
    expect(uses.length === 2 && uses.every((u) => typeof u.id === 'string' && u.id !== ''), `anthropic ${how}: ${JSON.stringify(m.content)}`);
    for (const u of uses) seen.add(u.id);
    // (its calls answered by their ids, as the next turn of the loop sends them, at Anthropic)
    const next = await ant().messages.create({ ...req, model: 'claude-strict', messages: [...req.messages,
      { role: 'assistant', content: m.content }, { role: 'user', content: uses.map((u) => ({ type: 'tool_result', tool_use_id: u.id, content: 'sunny' })) }] });
    expect(next.content[0].type === 'text', `anthropic ${how}, next turn: ${JSON.stringify(next.content)}`);
  }
  expect(seen.size === 8, `ids not unique: ${[...seen]}`);
});
