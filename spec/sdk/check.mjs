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

process.exit(tally.failed ? 1 : 0);
