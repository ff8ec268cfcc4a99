-- A checkpointing pipeline's trace (--otlp-endpoint): its run's span names
-- the run, as `resil-lua runs show ID` takes it. The collector is a local
-- resil.server; the pipeline a real process.
local resil = require "resil"
local helpers = require "spec.helpers"

-- the spans a pipeline (`source`) exports, run to its end
local function exported(source)
  local bodies = {}
  local collector = resil.server.listen({ port = 0, handler = function(req)
    bodies[#bodies + 1] = req.body
    return { status = 200, body = "{}" }
  end })
  local script = helpers.write(helpers.tmpname(".lua"), source)
  local pidfile = helpers.tmpname(".pid")
  os.execute(("%s --store %s --run traced --log-level off --otlp-endpoint http://127.0.0.1:%d %s > /dev/null 2>&1 " ..
    "& echo $! > %s"):format(helpers.resil, helpers.tmpname(".db"), collector:port(), script, pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  assert(helpers.wait_until(function() return not helpers.alive(pid) end, 20))
  collector:close()
  local spans = {}
  for _, body in ipairs(bodies) do
    for _, s in ipairs(resil.json.decode(body).resourceSpans[1].scopeSpans[1].spans) do spans[s.name] = s end
  end
  return spans
end

describe("a pipeline's exported run span", function()
  it("carries resil.run.id, the run its steps checkpointed into", function()
    local run = exported([[
local resil = require "resil"
resil.step("fetch", function() resil.trace.start("work"):finish() return 1 end)
]]).run
    assert.is_not_nil(run, "no run span")
    local attrs = {}
    for _, a in ipairs(run.attributes) do attrs[a.key] = a.value.stringValue end
    -- (before: only resil.run.status; the run, given up before the span ended, went unnamed)
    assert.are.equal("traced", attrs["resil.run.id"])
    assert.are.equal("done", attrs["resil.run.status"])
  end)
end)

describe("a pipeline that ends with os.exit(code)", function()
  it("exports its spans, the run's with its status, as one that returns does", function()
    local spans = exported([[
local resil = require "resil"
resil.step("fetch", function() resil.trace.start("work"):finish() return 1 end)
os.exit(3)
]])
    -- (before: none; the command posts them after the script returns, and os.exit never returned)
    assert.is_not_nil(spans.work)
    assert.is_not_nil(spans.run)
    local attrs = {}
    for _, a in ipairs(spans.run.attributes) do attrs[a.key] = a.value.stringValue end
    assert.are.equal("failed", attrs["resil.run.status"])
  end)
end)
