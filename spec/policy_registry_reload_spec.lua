-- A registry a script chose with registry.load / registry.use (the demo's way:
-- examples/models.lua) across policy reloads. A reload loads policies.registry
-- afresh, and it went back to policies/models.lua: the first SIGHUP or --watch
-- save (of any policy file) moved the script's calls to other models, or
-- failed them as unknown aliases, without a word.
local helpers = require "spec.helpers"

describe("a registry chosen by the script, across policy reloads", function()
  it("stays in effect; a reload reads the chosen file again; a broken one keeps the old serving", function()
    local dir = helpers.policy_dir({
      ["models.lua"] = 'return { writer = { use = "openai/gpt-4o-mini-2024-07-18" } }\n',
      ["mine.lua"] = "return { v = 1 }\n",
    })
    local chosen = helpers.write(helpers.tmpname("_models.lua"),
      'return { writer = { use = "openai/gpt-4.1-nano-2025-04-14" } }\n')
    local r = helpers.run_script(([[
      local resil = require "resil"
      local ai = require "policies.ai"
      local registry = require "policies.registry"
      require "policies.mine"
      local m = resil.mock.start({ strict = true })
      ai.configure("openai", { base_url = m.url .. "/v1", api_key = "sk-spec-openai-0123456789" })
      local function model()
        local r, err = ai.chat({ model = "writer", messages = { { role = "user", content = "hi" } } })
        return r and r.requested_model or tostring(err)
      end
      local function write(text) local f = assert(io.open(%q, "w")) f:write(text) f:close() end
      registry.load(%q)
      print(model())
      assert(resil.reload())
      print(model())                                   -- (was: gpt-4o-mini, the folder's models.lua)
      write('return { writer = { use = "openai/gpt-4.1-mini-2025-04-14" } }\n')
      assert(resil.reload())
      print(model())                                   -- the chosen file's edit, applied by the reload
      write('return {\n  writer = { use = "writer" },\n}\n')
      print(resil.reload())                            -- broken: refused with file:line
      print(model())
      registry.use({ writer = { use = "openai/gpt-4o-2024-08-06" } })
      assert(resil.reload())
      print(model())
      registry.use()                                   -- back to the policy folder's models.lua
      assert(resil.reload())
      print(model())
      m:stop()
    ]]):format(chosen, chosen), ("--store %s --policies %s --log-level off"):format(helpers.tmpname(".db"), dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("gpt-4.1-nano-2025-04-14", lines[1])
    assert.are.equal("gpt-4.1-nano-2025-04-14", lines[2])
    assert.are.equal("gpt-4.1-mini-2025-04-14", lines[3])
    assert.matches("^false\treload: [^\n]*_models%.lua:2: model 'writer': alias cycle", lines[4])
    assert.are.equal("gpt-4.1-mini-2025-04-14", lines[5])
    assert.are.equal("gpt-4o-2024-08-06", lines[6])
    assert.are.equal("gpt-4o-mini-2024-07-18", lines[7])
  end)

  it("a chosen file deleted keeps what it held, with a warning; a failed reload keeps the choice before it",
    function()
    local dir = helpers.policy_dir({
      ["models.lua"] = 'return { writer = { use = "openai/gpt-4o-mini-2024-07-18" } }\n',
      ["mine.lua"] = "return { v = 1 }\n",
    })
    local chosen = helpers.write(helpers.tmpname("_models.lua"),
      'return { writer = { use = "openai/gpt-4.1-nano-2025-04-14" } }\n')
    local r = helpers.run_script(([[
      local resil = require "resil"
      local registry = require "policies.registry"
      require "policies.mine"
      local function model() return require("policies.registry").resolve("writer", {}).choices[1].model end
      registry.load(%q)
      os.remove(%q)
      print(resil.reload())
      print(model())
      -- a policy that chooses another registry as it loads, in a reload another file fails
      local f = assert(io.open(%q, "w"))
      f:write('require("policies.registry").use({ writer = { use = "openai/gpt-4o-2024-08-06" } })\nerror("no")\n')
      f:close()
      print(resil.reload())
      print(model())
      f = assert(io.open(%q, "w")) f:write("return { v = 2 }\n") f:close()
      print(resil.reload())
      print(model())
    ]]):format(chosen, chosen, dir .. "/mine.lua", dir .. "/mine.lua"),
      ("--store %s --policies %s"):format(helpers.tmpname(".db"), dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local lines = {}
    for l in r.stdout:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.matches("^true", lines[1])
    assert.are.equal("openai/gpt-4.1-nano-2025-04-14", lines[2])
    assert.matches("registry file is gone", r.stderr)
    assert.matches("^false\treload: [^\n]*mine%.lua:2: no", lines[3])
    assert.are.equal("openai/gpt-4.1-nano-2025-04-14", lines[4])
    assert.matches("^true", lines[5])
    assert.are.equal("openai/gpt-4.1-nano-2025-04-14", lines[6])
  end)
end)

describe("a policy folder's registry saved with a shape it cannot have", function()
  -- (before: "reload: .../policies/registry.lua:530: pol/models.lua: registry keys must be model
  -- names, not 1", the shipped file's line first, as if it had broken the reload)
  it("fails the reload naming the file alone, not policies/registry.lua; the registry before serves", function()
    local dir = helpers.policy_dir({ ["models.lua"] = 'return { writer = { use = "openai/gpt-4o-mini-2024-07-18" } }\n' })
    local r = helpers.run_script(([[
      local resil = require "resil"
      local registry = require "policies.registry"
      for _, text in ipairs({ 'return { { use = "openai/gpt-4o-mini-2024-07-18" } }\n',
                              'return { writer = { use = "openai/gpt-4o-mini-2024-07-18" }, [true] = 1 }\n' }) do
        local f = assert(io.open(%q, "w")) f:write(text) f:close()
        print(resil.reload())
        print(require("policies.registry").resolve("writer").choices[1].model)
      end
    ]]):format(dir .. "/models.lua"), ("--policies %s --log-level off"):format(dir))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    local p = (dir .. "/models.lua"):gsub("%p", "%%%0")
    assert.matches("^false\treload: " .. p .. ": registry keys must be model names, not 1\n" ..
      "openai/gpt%-4o%-mini%-2024%-07%-18\n" ..
      "false\treload: " .. p .. ": registry keys must be model names, not true\n" ..
      "openai/gpt%-4o%-mini%-2024%-07%-18\n$", r.stdout)
  end)
end)
