-- GET /v1/models/{id} as the official SDKs send it (spec/sdk's openai and @anthropic-ai/sdk, run
-- by node), at a real `resil-lua gateway` process with keys: a provider/model id is percent-encoded
-- in one path segment ("openai%2Fgpt-4o-mini"). Skips, saying why, when node or the SDKs are absent.
local helpers = require "spec.helpers"

-- (CommonJS: the SDKs required from spec/sdk's node_modules by their absolute paths)
local SCRIPT = [[
const OpenAI = require(process.env.SDK + '/openai');
const Anthropic = require(process.env.SDK + '/@anthropic-ai/sdk');
const oai = (key) => new OpenAI({ baseURL: process.env.URL + '/v1', apiKey: key, maxRetries: 0 });
const ant = (key) => new Anthropic({ baseURL: process.env.URL, apiKey: key, maxRetries: 0 });
// -> "ok id owned_by", or the error's class and status
const show = (p) => p.then((m) => `ok ${m.id} ${m.owned_by || m.type}`, (e) => `${e.constructor.name} ${e.status}`);
(async () => {
  const [any, fast] = [process.env.KEY_ANY, process.env.KEY_FAST];
  const out = {
    priced: await show(oai(any).models.retrieve('openai/gpt-4o-mini')),
    dated: await show(oai(any).models.retrieve('openai/gpt-4o-mini-2024-07-18')),
    target: await show(oai(any).models.retrieve('openai/my-finetune')),
    unknown: await show(oai(any).models.retrieve('openai/no-such-model')),
    no_provider: await show(oai(any).models.retrieve('nope/gpt-4o-mini')),
    not_allowed: await show(oai(fast).models.retrieve('openai/gpt-4o-mini')),
    alias: await show(oai(fast).models.retrieve('fast')),
    anthropic: await show(ant(any).models.retrieve('anthropic/claude-haiku-4-5-20251001')),
  };
  // the request ids an SDK reads: of a list, a retrieve and a 404, in each API
  const rid = async (p) => { try { const r = await p.withResponse(); return r.response.headers.get('x-request-id') + ' ' + (r.response.headers.get('request-id') || '-'); } catch (e) { return 'error ' + e.requestID; } };
  out.ids = [
    await rid(oai(any).models.list()), await rid(oai(any).models.retrieve('openai/gpt-4o-mini')),
    await rid(oai(any).models.retrieve('openai/no-such-model')), await rid(ant(any).models.list()),
    await rid(ant(any).models.retrieve('anthropic/no-such-model')),
  ];
  console.log(JSON.stringify(out));
})();
]]

describe("GET /v1/models/{id}: a provider/model id from the official SDKs", function()
  local why = helpers.sdk_skip_reason()
  if why then
    it("skipped: " .. why, function() print("# gateway_http_models_spec skipped: " .. why) end)
    return
  end
  local resil = require "resil"
  local got, pid, raw_404

  setup(function()
    local port = helpers.free_port()
    local dir = helpers.tmpname("")
    os.execute("mkdir -p " .. dir)
    local db = dir .. "/s.db"
    -- (no provider is called: a retrieve is the gateway's own answer)
    helpers.write(dir .. "/gw.lua", [[
      return { auth = true, key_cache = 0,
               models = { fast = "openai/gpt-4o-mini", tuned = { model = "openai/my-finetune" } } }
    ]])
    local function key(args)
      local r = helpers.run(("%s keys add %s --store %s"):format(helpers.resil, args, db))
      assert(r.code == 0, r.stderr)
      return r.stdout:match("%S+")
    end
    local any, fast = key("--name any"), key("--name fast-only --models fast")
    os.execute(("%s gateway --listen 127.0.0.1:%d --config %s/gw.lua --store %s --log-level error > %s/gw.out 2>&1 " ..
      "& echo $! > %s/gw.pid"):format(helpers.resil, port, dir, db, dir, dir))
    pid = helpers.slurp(dir .. "/gw.pid"):match("%d+")
    assert(helpers.wait_until(function() return helpers.slurp(dir .. "/gw.out"):find("listening") ~= nil end, 10),
      helpers.slurp(dir .. "/gw.out"))
    local r = helpers.run(("SDK=%s/spec/sdk/node_modules URL=http://127.0.0.1:%d KEY_ANY=%s KEY_FAST=%s node %s"):format(
      os.getenv("PWD"), port, any, fast, helpers.write(helpers.tmpname(".cjs"), SCRIPT)))
    got = assert(resil.json.decode(r.stdout:match("%b{}") or "null"), r.stdout .. r.stderr)
    -- an id whose bytes are not UTF-8 (percent-encoded), and one cut inside a character at its bound
    raw_404 = {}
    for _, id in ipairs({ "openai%2Fgpt%FF%FE", "openai%2F" .. ("%C3%A9"):rep(200) }) do
      raw_404[#raw_404 + 1] = helpers.run(("curl -s 'http://127.0.0.1:%d/v1/models/%s' -H 'Authorization: Bearer %s'")
        :format(port, id, any)).stdout
    end
  end)
  teardown(function() if pid then os.execute("kill " .. pid .. " 2>/dev/null") end end)

  -- (before: a 404 for each, while a chat naming the model was served)
  it("openai: a model the gateway prices is found, dated too", function()
    assert.are.equal("ok openai/gpt-4o-mini openai", got.priced)
    assert.are.equal("ok openai/gpt-4o-mini-2024-07-18 openai", got.dated)
  end)
  it("openai: a model the config sends calls to is found, priced or not", function()
    assert.are.equal("ok openai/my-finetune openai", got.target)
  end)
  it("anthropic: found, in its own shape", function()
    assert.are.equal("ok anthropic/claude-haiku-4-5-20251001 model", got.anthropic)
  end)
  it("a model the gateway does not know, an unknown provider, one the key may not use: NotFoundError", function()
    assert.are.equal("NotFoundError 404", got.unknown)
    assert.are.equal("NotFoundError 404", got.no_provider)
    assert.are.equal("NotFoundError 404", got.not_allowed)
    assert.are.equal("ok fast openai", got.alias)
  end)
  -- (before: none, so an SDK's error.requestID and _request_id were undefined on these routes)
  it("each answer and refusal carries its request id, where each SDK reads it", function()
    local ids = got.ids
    assert.are.equal(5, #ids, resil.json.encode(got))
    assert.matches("^req_%x+ %-$", ids[1])
    assert.matches("^req_%x+ %-$", ids[2])
    assert.matches("^error req_%x+$", ids[3])
    local a, b = ids[4]:match("^(req_%x+) (req_%x+)$")
    assert.is_truthy(a, ids[4])
    assert.are.equal(a, b)
    assert.matches("^error req_%x+$", ids[5])
    local seen = {}
    for _, id in ipairs(ids) do
      local v = id:match("req_%x+")
      assert.is_nil(seen[v], "ids repeat: " .. resil.json.encode(ids))
      seen[v] = true
    end
  end)
  -- (before: its bytes echoed in the message, a body no client could read as UTF-8 JSON)
  it("a 404 for an id that is not UTF-8 is UTF-8 JSON all the same", function()
    for _, body in ipairs(raw_404) do
      assert.is_not_nil(utf8.len(body), body)
      assert.matches("does not exist", resil.json.decode(body).error.message)
    end
  end)
end)

-- (before: every model object said lifecycle "active", retires_at null: a client keeping the
-- active models kept one the registry marks deprecated, whose calls go elsewhere at its sunset)
describe("GET /v1/models/{id}: a model the registry marks deprecated", function()
  -- a gateway serving this registry -> get(id, headers) -> status, decoded body
  local function gateway_with(registry_text)
    local port, dir = helpers.free_port(), helpers.tmpname("")
    assert(os.execute("mkdir -p " .. dir .. "/policies"))
    helpers.write(dir .. "/policies/models.lua", registry_text)
    helpers.write(dir .. "/gw.lua", "return { auth = false }")
    os.execute(("%s gateway --policies %s/policies --listen 127.0.0.1:%d --config %s/gw.lua --store %s/s.db " ..
      "--log-level error > %s/gw.out 2>&1 & echo $! > %s/gw.pid"):format(helpers.resil, dir, port, dir, dir, dir, dir))
    local pid = helpers.slurp(dir .. "/gw.pid"):match("%d+")
    finally(function() os.execute("kill " .. pid .. " 2>/dev/null") end)
    assert(helpers.wait_until(function() return helpers.slurp(dir .. "/gw.out"):find("listening") ~= nil end, 10),
      helpers.slurp(dir .. "/gw.out"))
    return function(id, header)
      local r = helpers.run(("curl -s -w '\n%%{http_code}' 'http://127.0.0.1:%d/v1/models/%s' %s")
        :format(port, id, header or ""))
      local body, status = r.stdout:match("^(.*)\n(%d+)$")
      return tonumber(status), require("resil").json.decode(body)
    end
  end

  it("is deprecated in Anthropic's shape, retiring at its sunset", function()
    local get = gateway_with([[
      return { ["anthropic/claude-3-5-haiku-20241022"] = { deprecated = true, sunset = "2099-02-19",
        replacement = "anthropic/claude-haiku-4-5-20251001" } }
    ]])
    local _, old = get("anthropic%2Fclaude-3-5-haiku-20241022", "-H 'anthropic-version: 2023-06-01'")
    assert.are.same({ "deprecated", "2099-02-19T00:00:00Z" }, { old.lifecycle, old.retires_at })
    local _, new = get("anthropic%2Fclaude-haiku-4-5-20251001", "-H 'anthropic-version: 2023-06-01'")
    assert.are.same({ "active", require("resil").json.null }, { new.lifecycle, new.retires_at })
  end)

  -- (before: found, while a chat naming it is refused: a client that retrieves a model before it
  -- calls it took a retired one for one it could call)
  it("past its sunset with no replacement is a 404 model_retired, as a chat naming it is", function()
    local get = gateway_with([[
      return { ["openai/gpt-4o-2024-05-13"] = { deprecated = true, sunset = "2020-01-01" },
               ["openai/gpt-4o-2024-08-06"] = { deprecated = true, sunset = "2020-01-01",
                 replacement = "openai/gpt-4.1-2025-04-14" } }
    ]])
    for _, header in ipairs({ "", "-H 'anthropic-version: 2023-06-01'" }) do
      local status, body = get("openai%2Fgpt-4o-2024-05-13", header)
      assert.are.equal(404, status)
      assert.matches("passed its sunset", body.error.message)
    end
    local status, body = get("openai%2Fgpt-4o-2024-05-13")
    assert.are.equal("model_retired", body.error.code)
    -- one whose calls go to its replacement is still served
    status = get("openai%2Fgpt-4o-2024-08-06")
    assert.are.equal(200, status)
  end)
end)
