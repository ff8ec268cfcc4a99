-- What spec/readme_spec.lua does not run: the README's option table against
-- the command's --help, and the `resil-lua check` example's output against
-- the command's. (The table had two blank lines in it, which end a Markdown
-- table: every option after --max-instructions showed as loose text, and
-- --sandbox was in --help only; the check example named lines 32 and 33 of
-- a models.lua that had moved them to 34 and 35.)
local helpers = require "spec.helpers"
local R = helpers.resil
local readme = helpers.slurp((os.getenv("RESIL_HOME") or ".") .. "/README.md")

describe("the README, against the command", function()
  it("lists in one option table every option --help lists, and only those", function()
    local tbl = readme:match("\n| option | meaning |\n|%-%-%-|%-%-%-|\n(.-)\n\n")
    assert.is_not_nil(tbl, "no option table")
    local in_readme = {}
    for row in (tbl .. "\n"):gmatch("([^\n]*)\n") do
      assert.matches("^| .* |$", row, "a line in the option table that is not a row")
      for opt in row:match("^| ([^|]*)|"):gmatch("`(%-%-?[%w%-]+)") do in_readme[opt] = true end
    end
    local help = helpers.run(R .. " --help")
    assert.are.equal(0, help.code)
    local in_help = {}
    for line in help.stdout:gmatch("[^\n]+") do
      local opts = line:match("^  (%-[^%s]*,? ?%-?%-?[%w%-]*)")
      if opts then for opt in opts:gmatch("%-%-?[%w%-]+") do in_help[opt] = true end end
    end
    -- (-e, - and -- are in the README's command lines above the table)
    for _, opt in ipairs({ "-e", "--" }) do in_help[opt] = nil end
    local missing, extra = {}, {}
    for opt in pairs(in_help) do if not in_readme[opt] then missing[#missing + 1] = opt end end
    for opt in pairs(in_readme) do if not in_help[opt] then extra[#extra + 1] = opt end end
    table.sort(missing)
    table.sort(extra)
    assert.are.same({}, missing, "in --help, not in the README's table")
    assert.are.same({}, extra, "in the README's table, not in --help")
  end)

  -- (src/metrics.c, utf8.c, watchdog.c, gc_full.c and wal_sync.c were in no line of it)
  it("names every file of src/, src/lua/ and policies/ in its Layout (policies/README.md too)", function()
    local layout = assert(readme:match("\n## Layout\n\n```\n(.-)```"))
    local home = os.getenv("RESIL_HOME") or "."
    local missing = {}
    for f in helpers.run(("cd %s && ls src/*.c src/*.h"):format(home)).stdout:gmatch("[^\n]+") do
      if not layout:find(f, 1, true) then missing[#missing + 1] = f end
    end
    local lua_line = assert(layout:match("src/lua/ (.-)\nsrc/crypto"))
    for f in helpers.run(("cd %s && ls src/lua/*.lua"):format(home)).stdout:gmatch("src/lua/([%w_]+)%.lua") do
      if not lua_line:find("%f[%w_]" .. f .. "%f[^%w_]") then missing[#missing + 1] = "src/lua/" .. f .. ".lua" end
    end
    local policies_line = assert(layout:match("\npolicies/ (.-)\nspec/"))
    for f in helpers.run(("cd %s && ls policies/*.lua"):format(home)).stdout:gmatch("policies/([%w_]+)%.lua") do
      if not policies_line:find("%f[%w_]" .. f .. "%f[^%w_]") then missing[#missing + 1] = "policies/" .. f .. ".lua" end
    end
    assert.are.same({}, missing)
    -- and policies/README.md, each module by its file name
    local list = helpers.slurp(home .. "/policies/README.md")
    for f in helpers.run(("cd %s/policies && ls *.lua providers/*.lua"):format(home)).stdout:gmatch("[^\n]+") do
      if not list:find("`" .. f .. "`", 1, true) then missing[#missing + 1] = "policies/README.md: " .. f end
    end
    assert.are.same({}, missing)
  end)

  it("shows what `resil-lua check` prints for the shipped policies", function()
    local block = readme:match("```\n%$ resil%-lua check\n(.-)```")
    assert.is_not_nil(block)
    local r = helpers.run(("cd %s && %s check"):format(os.getenv("RESIL_HOME") or ".", R))
    assert.are.equal(0, r.code, r.stdout .. r.stderr)
    assert.are.equal(block, r.stdout)
  end)

  it("gives each subcommand the options --help gives it, in the command block", function()
    local block = readme:match("\n## The command\n\n```\n(.-)```")
    assert.is_not_nil(block)
    local function options_by_command(text, prefix)
      local found = {}
      for line in text:gmatch("[^\n]+") do
        local cmd, rest = line:match("^" .. prefix .. "resil%-lua (%l+) (.*)$")
        if cmd then
          local set = {}
          for opt in rest:gmatch("%-%-[%w%-]+") do set[opt] = true end
          found[cmd] = set
        end
      end
      return found
    end
    local help = helpers.run(R .. " --help").stdout
    local in_readme, in_help = options_by_command(block, ""), options_by_command(help, "%s*u?s?a?g?e?:?%s*")
    assert.is_not_nil(in_help.costs, help)
    for cmd, set in pairs(in_help) do
      assert.is_not_nil(in_readme[cmd], "README's command block has no line for " .. cmd)
      for opt in pairs(set) do assert.is_true(in_readme[cmd][opt] == true, cmd .. " " .. opt .. " not in the README") end
    end
    for cmd, set in pairs(in_readme) do
      assert.is_not_nil(in_help[cmd], "--help has no line for " .. cmd)
      for opt in pairs(set) do
        -- (--store URL is every store command's, said once in --help's options)
        if opt ~= "--store" then assert.is_true(in_help[cmd][opt] == true, cmd .. " " .. opt .. " not in --help") end
      end
    end
  end)
end)
