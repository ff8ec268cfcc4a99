// The official OpenAI and Anthropic clients against the mock provider
// (spec/sdk_spec.lua starts the mock and runs this). One line per check:
// "ok <name>" or "not ok <name> -- <why>". MOCK_URL is the mock's root URL.
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { check, expect, rejects, tally } from './harness.mjs';

const url = process.env.MOCK_URL;
const KEY = 'sk-spec-sdk-0123456789';
const REPLY = 'one two three four five six';
const msgs = [{ role: 'user', content: 'Say hello' }];


const oai = new OpenAI({ apiKey: KEY, baseURL: url + '/v1', maxRetries: 0 });
const oaiFault = (f) => new OpenAI({ apiKey: KEY, baseURL: url + '/v1', maxRetries: 0,
  defaultHeaders: { 'x-mock-fault': f } });

await check('openai: chat.completions.create parses', async () => {
  const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, max_tokens: 100 });
  expect(r.choices[0].message.content === REPLY, `content ${r.choices[0].message.content}`);
  expect(r.choices[0].message.role === 'assistant', 'role');
  expect(r.choices[0].finish_reason === 'stop', 'finish_reason');
  expect(r.usage.completion_tokens === 6, `usage ${JSON.stringify(r.usage)}`);
});

await check('openai: n and max_tokens (finish_reason length)', async () => {
  const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, max_tokens: 2, n: 2 });
  expect(r.choices.length === 2, 'two choices');
  expect(r.choices[1].finish_reason === 'length', `finish_reason ${r.choices[1].finish_reason}`);
});

// (the API takes n up to 128: the mock answered any, 200,000 choices a 27 MB answer in 3.5 s of its loop)
await check('openai: n past 128 or under 1 is refused as the API refuses it', async () => {
  for (const [n, code] of [[129, 'integer_above_max_value'], [0, 'integer_below_min_value']]) {
    const e = await rejects(oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, n }), OpenAI.BadRequestError, `n ${n}`);
    expect(e.param === 'n' && e.code === code, `n ${n}: ${e.param} ${e.code} ${e.message}`);
  }
  const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, n: 128, max_tokens: 1 });
  expect(r.choices.length === 128, `n 128: ${r.choices.length}`);
});

await check('openai: a raw stream parses chunk by chunk, usage last', async () => {
  const s = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, stream: true,
    stream_options: { include_usage: true } });
  let text = '', usage = null, role = null;
  for await (const chunk of s) {
    if (chunk.choices[0]?.delta?.role) role = chunk.choices[0].delta.role;
    text += chunk.choices[0]?.delta?.content ?? '';
    if (chunk.usage) usage = chunk.usage;
  }
  expect(role === 'assistant', 'role delta first');
  expect(text === REPLY, `text ${text}`);
  expect(usage && usage.completion_tokens === 6, `usage ${JSON.stringify(usage)}`);
});

await check('openai: the stream helper accumulates the final completion', async () => {
  const s = oai.chat.completions.stream({ model: 'gpt-4o-mini', messages: msgs,
    stream_options: { include_usage: true } });
  const final = await s.finalChatCompletion();
  expect(final.choices[0].message.content === REPLY, `content ${final.choices[0].message.content}`);
  expect(final.choices[0].finish_reason === 'stop', 'finish_reason');
});

await check('openai: 429 is RateLimitError', async () => {
  const e = await rejects(oaiFault('429').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs }),
    OpenAI.RateLimitError, '429');
  expect(e.status === 429, 'status');
  expect(e.code === 'rate_limit_exceeded' && e.type === 'requests', `code ${e.code} type ${e.type}`);
  expect(/^req_/.test(e.requestID), `requestID ${e.requestID}`);
});
await check('openai: a wrong key is AuthenticationError', async () => {
  const bad = new OpenAI({ apiKey: 'sk-wrong-0123456789', baseURL: url + '/v1', maxRetries: 0 });
  const e = await rejects(bad.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs }),
    OpenAI.AuthenticationError, '401');
  expect(e.code === 'invalid_api_key', `code ${e.code}`);
});
await check('openai: 500 is InternalServerError', async () => {
  await rejects(oaiFault('500').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs }),
    OpenAI.InternalServerError, '500');
});

const ant = new Anthropic({ apiKey: KEY, baseURL: url, maxRetries: 0 });
const antFault = (f) => new Anthropic({ apiKey: KEY, baseURL: url, maxRetries: 0,
  defaultHeaders: { 'x-mock-fault': f } });

await check('anthropic: messages.create parses', async () => {
  const r = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 100, system: 'Be brief.',
    messages: msgs });
  expect(r.type === 'message' && r.role === 'assistant', 'message');
  expect(r.content[0].type === 'text' && r.content[0].text === REPLY, `content ${JSON.stringify(r.content)}`);
  expect(r.stop_reason === 'end_turn', 'stop_reason');
  expect(r.usage.output_tokens === 6, 'usage');
});

await check('anthropic: max_tokens stops with stop_reason max_tokens', async () => {
  const r = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 2, messages: msgs });
  expect(r.stop_reason === 'max_tokens', `stop_reason ${r.stop_reason}`);
});

await check('anthropic: the stream helper accumulates the final message', async () => {
  const s = ant.messages.stream({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs });
  let text = '';
  s.on('text', (t) => { text += t; });
  const final = await s.finalMessage();
  expect(text === REPLY, `text ${text}`);
  expect(final.content[0].text === REPLY, `final ${JSON.stringify(final.content)}`);
  expect(final.stop_reason === 'end_turn', 'stop_reason');
  expect(final.usage.output_tokens === 6, `usage ${JSON.stringify(final.usage)}`);
});

await check('anthropic: an error event after the 200 raises', async () => {
  const s = antFault('error_event').messages.stream({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs });
  await rejects(s.finalMessage(), Anthropic.APIError, 'error event');
});

await check('anthropic: 429 is RateLimitError', async () => {
  await rejects(antFault('429').messages.create({ model: 'claude-haiku-4-5', max_tokens: 10, messages: msgs }),
    Anthropic.RateLimitError, '429');
});
await check('anthropic: a wrong key is AuthenticationError', async () => {
  const bad = new Anthropic({ apiKey: 'sk-wrong-0123456789', baseURL: url, maxRetries: 0 });
  const e = await rejects(bad.messages.create({ model: 'claude-haiku-4-5', max_tokens: 10, messages: msgs }),
    Anthropic.AuthenticationError, '401');
  expect(/^req_/.test(e.requestID), `requestID ${e.requestID}`);
});
await check('anthropic: 529 is InternalServerError (overloaded_error)', async () => {
  const e = await rejects(antFault('529').messages.create({ model: 'claude-haiku-4-5', max_tokens: 10,
    messages: msgs }), Anthropic.InternalServerError, '529');
  expect(e.status === 529, 'status');
  expect(e.error?.error?.type === 'overloaded_error', `body ${JSON.stringify(e.error)}`);
});
await check('anthropic: a request without max_tokens is refused as the API does (400)', async () => {
  await rejects(ant.messages.create({ model: 'claude-haiku-4-5', messages: msgs }), Anthropic.BadRequestError, '400');
});

// what the API answers to what a request asks of its answer's shape: the mock answered its
// plain words to each, so an app's code for them (parse(), a tool loop, logprobs) never ran
const weather = { type: 'object', properties: { city: { type: 'string' }, days: { type: 'integer' },
  units: { type: 'string', enum: ['c', 'f'] }, tags: { type: 'array', items: { type: 'string' } } },
  required: ['city', 'days', 'units', 'tags'], additionalProperties: false };
await check('openai: a json_schema response_format is answered with JSON of the schema (parse())', async () => {
  const r = await oai.chat.completions.parse({ model: 'gpt-4o-mini', messages: msgs,
    response_format: { type: 'json_schema', json_schema: { name: 'weather', strict: true, schema: weather } } });
  const p = r.choices[0].message.parsed;
  expect(p && typeof p.city === 'string' && p.days === 0 && p.units === 'c' && Array.isArray(p.tags),
    `parsed ${JSON.stringify(p)}`);
  // (JSON mode: the API refuses a prompt that does not say json)
  const o = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Say hello in JSON' }],
    response_format: { type: 'json_object' } });
  expect(typeof JSON.parse(o.choices[0].message.content) === 'object', `json_object ${o.choices[0].message.content}`);
});
await check('openai: a tool_choice that forces a call is answered with one, whole and streamed', async () => {
  const tools = [{ type: 'function', function: { name: 'get_weather', parameters: weather } }];
  for (const tool_choice of ['required', { type: 'function', function: { name: 'get_weather' } }]) {
    const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, tools, tool_choice });
    const c = r.choices[0];
    expect(c.finish_reason === 'tool_calls' && c.message.content === null, `choice ${JSON.stringify(c)}`);
    expect(c.message.tool_calls?.[0]?.function.name === 'get_weather' &&
      JSON.parse(c.message.tool_calls[0].function.arguments).units === 'c', `calls ${JSON.stringify(c.message.tool_calls)}`);
    const f = (await oai.chat.completions.stream({ model: 'gpt-4o-mini', messages: msgs, tools, tool_choice })
      .finalChatCompletion()).choices[0];
    expect(f.finish_reason === 'tool_calls' && f.message.tool_calls?.[0]?.id === f.message.tool_calls[0].id &&
      JSON.parse(f.message.tool_calls[0].function.arguments).units === 'c', `streamed ${JSON.stringify(f)}`);
  }
  const auto = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, tools });
  expect(auto.choices[0].message.content === REPLY, 'tool_choice auto: the reply');
});
await check('openai: logprobs are answered, whole and streamed', async () => {
  const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, logprobs: true, top_logprobs: 2 });
  const lp = r.choices[0].logprobs?.content;
  expect(lp?.length === 6 && lp.map((t) => t.token).join('') === REPLY && lp[0].top_logprobs.length === 2,
    `logprobs ${JSON.stringify(r.choices[0].logprobs)}`);
  const f = await oai.chat.completions.stream({ model: 'gpt-4o-mini', messages: msgs, logprobs: true }).finalChatCompletion();
  expect(f.choices[0].logprobs?.content?.length === 6, `streamed ${JSON.stringify(f.choices[0].logprobs)}`);
  const none = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs });
  expect(none.choices[0].logprobs === null, 'not asked: null');
});
// (the API takes 0 to 20 alternatives: the mock made any number, 10,000,000 held its loop and memory)
await check('openai: top_logprobs past 20 is refused as the API refuses it', async () => {
  const e = await rejects(oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, logprobs: true, top_logprobs: 21 }),
    OpenAI.BadRequestError, 'top_logprobs 21');
  expect(e.param === 'top_logprobs' && e.code === 'integer_above_max_value', `${e.param} ${e.code} ${e.message}`);
  const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, logprobs: true, top_logprobs: 20 });
  expect(r.choices[0].logprobs.content[0].top_logprobs.length === 20, 'top_logprobs 20');
});
// (the usage of token ids is their count, as the API bills them: the mock billed the ids' JSON
// text, [100000, 100001] as 4 tokens, a spec of a tokenized pipeline's costs got another sum)
await check('openai: embeddings, a list of token ids is one input, its usage that many tokens', async () => {
  const r = await oai.embeddings.create({ model: 'text-embedding-3-small', input: [1, 2, 3] });
  expect(r.data.length === 1 && r.data[0].embedding.length > 0, `data ${r.data.length}`);
  expect(r.usage.prompt_tokens === 3 && r.usage.total_tokens === 3, `usage ${JSON.stringify(r.usage)}`);
  const two = await oai.embeddings.create({ model: 'text-embedding-3-small', input: [[100000, 100001], [4, 5, 6, 7, 8]] });
  expect(two.data.length === 2, `data ${two.data.length}`);
  expect(two.usage.prompt_tokens === 7, `usage ${JSON.stringify(two.usage)}`);
});
// (a model the mock does not know took any dimensions: 3,000,000 held its loop 43 s, then the answer was lost)
await check('openai: embeddings dimensions past 65536 are refused for a model the mock does not know, as its message says', async () => {
  const e = await rejects(oai.embeddings.create({ model: 'my-embedder', input: 'tides', dimensions: 65537 }),
    OpenAI.BadRequestError, 'dimensions 65537');
  expect(e.param === 'dimensions' && /between 1 and 65536/.test(e.message), `${e.param} ${e.message}`);
  const r = await oai.embeddings.create({ model: 'my-embedder', input: 'tides', dimensions: 16 });
  expect(r.data[0].embedding.length === 16, `dimensions 16: ${r.data[0].embedding.length}`);
});
await check('anthropic: a tool_choice that forces a call is answered with a tool_use block, whole and streamed', async () => {
  const tools = [{ name: 'get_weather', input_schema: weather }];
  for (const tool_choice of [{ type: 'any' }, { type: 'tool', name: 'get_weather' }]) {
    const r = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs, tools, tool_choice });
    expect(r.stop_reason === 'tool_use' && r.content[0].type === 'tool_use' && r.content[0].name === 'get_weather' &&
      r.content[0].input.units === 'c' && r.content[0].id.startsWith('toolu_'), `message ${JSON.stringify(r)}`);
    const f = await ant.messages.stream({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs, tools, tool_choice })
      .finalMessage();
    expect(f.stop_reason === 'tool_use' && f.content[0].input?.units === 'c' && Array.isArray(f.content[0].input.tags),
      `streamed ${JSON.stringify(f)}`);
  }
});
// a forced call past max_tokens is cut there, as the APIs cut one (finish_reason length, stop_reason
// max_tokens): the mock answered the whole call and billed its 20 tokens past a max_tokens of 4
await check('openai and anthropic: a forced tool call past max_tokens is cut there, billed at most max_tokens, whole and streamed', async () => {
  const otools = [{ type: 'function', function: { name: 'get_weather', parameters: weather } }];
  const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, tools: otools, tool_choice: 'required',
    max_tokens: 4 });
  const c = r.choices[0];
  expect(c.finish_reason === 'length' && r.usage.completion_tokens === 4 && c.message.tool_calls?.[0]?.function.name === 'get_weather',
    `cut: ${JSON.stringify(r)}`);
  const args = c.message.tool_calls[0].function.arguments;
  let whole = true; try { JSON.parse(args); } catch { whole = false; }
  expect(!whole && args.length > 0, `arguments cut short: ${args}`);
  const f = await oai.chat.completions.stream({ model: 'gpt-4o-mini', messages: msgs, tools: otools, tool_choice: 'required',
    max_tokens: 4, stream_options: { include_usage: true } }).finalChatCompletion();
  expect(f.choices[0].finish_reason === 'length' && f.usage.completion_tokens === 4 &&
    f.choices[0].message.tool_calls[0].function.arguments === args, `streamed: ${JSON.stringify(f)}`);
  const roomy = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, tools: otools, tool_choice: 'required',
    max_tokens: 1000 });
  expect(roomy.choices[0].finish_reason === 'tool_calls', 'within max_tokens: whole');
  const atools = [{ name: 'get_weather', input_schema: weather }];
  const m = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 4, messages: msgs, tools: atools,
    tool_choice: { type: 'any' } });
  expect(m.stop_reason === 'max_tokens' && m.usage.output_tokens === 4 && m.content[0]?.type === 'tool_use' &&
    typeof m.content[0].input === 'object', `cut: ${JSON.stringify(m)}`);
  const sm = await ant.messages.stream({ model: 'claude-haiku-4-5', max_tokens: 4, messages: msgs, tools: atools,
    tool_choice: { type: 'any' } }).finalMessage();
  // (its input as the SDK's partial parse reads the JSON streamed so far)
  expect(sm.stop_reason === 'max_tokens' && sm.usage.output_tokens === 4 && sm.content[0]?.type === 'tool_use' &&
    typeof sm.content[0].input === 'object', `streamed: ${JSON.stringify(sm)}`);
});
await check('anthropic: output_config.format json_schema is answered with JSON of the schema', async () => {
  const r = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs,
    output_config: { format: { type: 'json_schema', schema: weather } } });
  const p = JSON.parse(r.content[0].text);
  expect(typeof p.city === 'string' && p.units === 'c', `text ${r.content[0].text}`);
});

// a schema as zod writes z.string().email(), .uuid(), .datetime(), z.number().positive(), .max(n):
// the API answers within its formats and bounds (strict structured output), and the app's zod
// parse of the mock's answer (a text where an email goes, 0 where a positive number does) raised
const booking = { type: 'object', additionalProperties: false,
  required: ['email', 'id', 'when', 'day', 'guests', 'price', 'discount', 'code', 'note', 'rooms'],
  properties: { email: { type: 'string', format: 'email' }, id: { type: 'string', format: 'uuid' },
    when: { type: 'string', format: 'date-time' }, day: { type: 'string', format: 'date' },
    guests: { type: 'integer', exclusiveMinimum: 0, maximum: 12 }, price: { type: 'number', minimum: 10.5 },
    discount: { type: 'number', exclusiveMaximum: 0 }, code: { type: 'string', maxLength: 5 },
    note: { type: 'string', minLength: 40 }, rooms: { type: 'integer', minimum: 2, multipleOf: 3 } } };
const withinBooking = (p) => [
  /^[^@\s]+@[^@\s]+\.[^@\s]+$/.test(p.email) || `email ${p.email}`,
  /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(p.id) || `uuid ${p.id}`,
  (/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$/.test(p.when) && !isNaN(Date.parse(p.when))) || `date-time ${p.when}`,
  /^\d{4}-\d\d-\d\d$/.test(p.day) || `date ${p.day}`,
  (Number.isInteger(p.guests) && p.guests > 0 && p.guests <= 12) || `guests ${p.guests}`,
  (typeof p.price === 'number' && p.price >= 10.5) || `price ${p.price}`,
  (typeof p.discount === 'number' && p.discount < 0) || `discount ${p.discount}`,
  (typeof p.code === 'string' && p.code.length <= 5) || `code ${p.code}`,
  (typeof p.note === 'string' && p.note.length >= 40) || `note ${p.note}`,
  (Number.isInteger(p.rooms) && p.rooms >= 2 && p.rooms % 3 === 0) || `rooms ${p.rooms}`,
].filter((x) => x !== true);
await check('openai and anthropic: a schema\'s formats and bounds are answered within them, whole and streamed', async () => {
  const rf = { type: 'json_schema', json_schema: { name: 'booking', strict: true, schema: booking } };
  const p = (await oai.chat.completions.parse({ model: 'gpt-4o-mini', messages: msgs, response_format: rf })).choices[0].message.parsed;
  let bad = withinBooking(p);
  expect(bad.length === 0, `openai: ${bad.join('; ')}`);
  const f = await oai.chat.completions.stream({ model: 'gpt-4o-mini', messages: msgs, response_format: rf }).finalChatCompletion();
  bad = withinBooking(JSON.parse(f.choices[0].message.content));
  expect(bad.length === 0, `openai streamed: ${bad.join('; ')}`);
  const tools = [{ type: 'function', function: { name: 'book', strict: true, parameters: booking } }];
  const c = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, tools, tool_choice: 'required' });
  bad = withinBooking(JSON.parse(c.choices[0].message.tool_calls[0].function.arguments));
  expect(bad.length === 0, `openai tool call: ${bad.join('; ')}`);
  const a = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 500, messages: msgs,
    output_config: { format: { type: 'json_schema', schema: booking } } });
  bad = withinBooking(JSON.parse(a.content[0].text));
  expect(bad.length === 0, `anthropic: ${bad.join('; ')}`);
  const u = await ant.messages.stream({ model: 'claude-haiku-4-5', max_tokens: 500, messages: msgs,
    tools: [{ name: 'book', input_schema: booking }], tool_choice: { type: 'any' } }).finalMessage();
  bad = withinBooking(u.content.find((b) => b.type === 'tool_use').input);
  expect(bad.length === 0, `anthropic tool_use: ${bad.join('; ')}`);
});

await check('openai: stop ends the answer before the first stop sequence, finish_reason stop', async () => {
  const r = await oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, stop: ['five', 'three'] });
  expect(r.choices[0].message.content === 'one two ' && r.choices[0].finish_reason === 'stop' &&
    r.usage.completion_tokens === 2, `choice ${JSON.stringify(r.choices[0])} usage ${JSON.stringify(r.usage)}`);
  const f = await oai.chat.completions.stream({ model: 'gpt-4o-mini', messages: msgs, stop: 'four' }).finalChatCompletion();
  expect(f.choices[0].message.content === 'one two three ', `streamed ${f.choices[0].message.content}`);
  const a = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs,
    stop_sequences: ['five', 'three'] });
  expect(a.content[0].text === 'one two ' && a.stop_sequence === 'three', `anthropic ${JSON.stringify(a)}`);
});

await check('anthropic: extended thinking is answered with a thinking block and its signature, whole and streamed', async () => {
  const req = { model: 'claude-haiku-4-5', max_tokens: 2048, messages: msgs, thinking: { type: 'enabled', budget_tokens: 1024 } };
  const r = await ant.messages.create(req);
  expect(r.content.length === 2 && r.content[0].type === 'thinking' && r.content[0].thinking.length > 0 &&
    r.content[0].signature.length > 0 && r.content[1].text === REPLY, `content ${JSON.stringify(r.content)}`);
  expect(r.usage.output_tokens > 6, `usage ${JSON.stringify(r.usage)}`);
  const s = ant.messages.stream(req);
  let thought = '';
  s.on('thinking', (t) => { thought += t; });
  const f = await s.finalMessage();
  expect(thought === r.content[0].thinking && f.content[0].signature === r.content[0].signature &&
    f.content[1].text === REPLY, `streamed ${JSON.stringify(f.content)}`);
  // the next turn sends the block back, signature and all
  const next = await ant.messages.create({ ...req, messages: [...msgs, { role: 'assistant', content: r.content },
    { role: 'user', content: 'And?' }] });
  expect(next.content[1].text === REPLY, `next turn ${JSON.stringify(next.content)}`);
});
await check('anthropic: a thinking budget the API refuses is BadRequestError', async () => {
  for (const [max_tokens, budget_tokens] of [[2048, 512], [1024, 1024]]) {
    await rejects(ant.messages.create({ model: 'claude-haiku-4-5', max_tokens, messages: msgs,
      thinking: { type: 'enabled', budget_tokens } }), Anthropic.BadRequestError, `budget ${budget_tokens} of ${max_tokens}`);
  }
});

await check('openai: models.list and models.retrieve, an unknown model NotFoundError model_not_found', async () => {
  const ids = [];
  for await (const m of oai.models.list()) ids.push(m.id);
  expect(ids.includes('gpt-4o-mini') && new Set(ids).size === ids.length, `ids ${ids}`);
  const m = await oai.models.retrieve('gpt-4o-mini');
  expect(m.id === 'gpt-4o-mini' && m.object === 'model' && typeof m.created === 'number' && m.owned_by, `model ${JSON.stringify(m)}`);
  const e = await rejects(oai.models.retrieve('gpt-nope'), OpenAI.NotFoundError, 'unknown model');
  expect(e.code === 'model_not_found', `code ${e.code}`);
  await rejects(new OpenAI({ apiKey: 'sk-wrong', baseURL: url + '/v1', maxRetries: 0 }).models.list(),
    OpenAI.AuthenticationError, 'a wrong key');
});

await check('anthropic: models.list({limit: 2}) pages by two, each model once, and models.retrieve (an alias too)', async () => {
  const first = await ant.models.list({ limit: 2 });
  expect(first.data.length === 2 && first.has_more === true && first.last_id === first.data[1].id,
    `first page ${JSON.stringify(first)}`);
  const ids = [];
  for await (const m of ant.models.list({ limit: 2 })) ids.push(m.id);
  expect(ids.length > 2 && new Set(ids).size === ids.length && ids[0] === first.data[0].id, `ids ${ids}`);
  const back = await ant.models.list({ limit: 2, before_id: ids[3] });
  expect(back.data.map((m) => m.id).join() === ids.slice(1, 3).join(), `before ${ids[3]}: ${JSON.stringify(back.data)}`);
  const m = await ant.models.retrieve('claude-sonnet-4-5');
  expect(m.type === 'model' && m.id === 'claude-sonnet-4-5-20250929' && m.display_name && m.created_at,
    `model ${JSON.stringify(m)}`);
  await rejects(ant.models.retrieve('claude-nope'), Anthropic.NotFoundError, 'unknown model');
  await rejects(ant.models.list({ limit: 0 }), Anthropic.BadRequestError, 'limit 0');
});

// a max_tokens under 1 is each API's 400: the mock answered nothing (an empty text block, a
// completion of no tokens), and a policy that computed 0 passed its spec
await check('openai and anthropic: a max_tokens under 1 is refused as each API refuses it', async () => {
  for (const field of ['max_tokens', 'max_completion_tokens']) {
    const e = await rejects(oai.chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, [field]: 0 }),
      OpenAI.BadRequestError, `openai ${field} 0`);
    expect(e.param === field && e.code === 'integer_below_min_value', `${field}: ${e.param} ${e.code} ${e.message}`);
  }
  const a = await rejects(ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 0, messages: msgs }),
    Anthropic.BadRequestError, 'anthropic max_tokens 0');
  expect(/max_tokens/.test(a.message), a.message);
  const one = await ant.messages.create({ model: 'claude-haiku-4-5', max_tokens: 1, messages: msgs });
  expect(one.stop_reason === 'max_tokens' && one.usage.output_tokens === 1, JSON.stringify(one));
});

// ModelInfo's fields are typed as never absent (null where unknown): code that keeps the models
// whose lifecycle is 'active', or reads max_tokens to size a request, kept none and read undefined
const MODEL_INFO = ['id', 'type', 'display_name', 'created_at', 'capabilities', 'lifecycle', 'deprecated_at',
  'retires_at', 'line', 'max_input_tokens', 'max_tokens'];
await check('anthropic: a model has every field of the SDK\'s ModelInfo, listed or retrieved', async () => {
  const page = await ant.models.list({ limit: 1000 });
  for (const m of [...page.data, await ant.models.retrieve('claude-opus-4-1')]) {
    const absent = MODEL_INFO.filter((k) => m[k] === undefined);
    expect(absent.length === 0, `${m.id} has no ${absent}`);
    expect(m.lifecycle === 'active' && m.deprecated_at === null && m.retires_at === null, `${JSON.stringify(m)}`);
  }
  const opus = await ant.models.retrieve('claude-opus-4-1');
  expect(opus.line === 'opus' && opus.max_tokens === 32000 && opus.max_input_tokens === 200000, JSON.stringify(opus));
  const haiku = await ant.models.retrieve('claude-3-5-haiku-20241022');
  expect(haiku.line === 'haiku' && haiku.max_tokens === 8192, JSON.stringify(haiku));
});

// (a truncated stream was a whole, empty 200: each SDK read it as an answer of nothing)
await check('openai and anthropic: a truncated stream raises, never ends as an answer', async () => {
  const cut = async (iterate, what) => {
    let text = '', threw = null;
    try { text = await iterate(); } catch (e) { threw = e; }
    expect(threw, `${what}: ended without an error, text ${JSON.stringify(text)}`);
  };
  await cut(async () => {
    let t = '';
    for await (const c of await oaiFault('truncate').chat.completions.create({ model: 'gpt-4o-mini', messages: msgs, stream: true }))
      t += c.choices[0]?.delta?.content ?? '';
    return t;
  }, 'openai');
  await cut(async () => {
    const m = await antFault('truncate').messages.stream({ model: 'claude-haiku-4-5', max_tokens: 100, messages: msgs }).finalMessage();
    return m.content;
  }, 'anthropic');
});

process.exit(tally.failed ? 1 : 0);
