-- Every example in the README runs: each ```lua block as a script through
-- the host, the ```c block compiled against libresil and run.
local helpers = require "spec.helpers"

local readme = helpers.slurp("README.md")

local function cwd()
  local p = io.popen("pwd")
  local cwd = p:read("l")
  p:close()
  return cwd
end

local function blocks(lang)
  local found = {}
  for code in readme:gmatch("```" .. lang .. "\n(.-)```") do found[#found + 1] = code end
  return found
end

-- The `--> text` comments of a block, in order ("..." matches anything; a
-- trailing "(note)" after two spaces is prose; JSON log lines go to stderr).
local function expectations(code)
  local found = {}
  for line in code:gmatch("[^\n]*") do
    local e = line:match("%-%->%s*(.-)%s*$")
    if e and not e:match('^{"ts"') then
      e = e:gsub("%s%s+%(.*%)$", ""):gsub("%s+", " ")
      found[#found + 1] = e
    end
  end
  return found
end

local function line_matches(expected, actual)
  local pattern = "^" .. expected:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"):gsub("%%%.%%%.%%%.", ".-") .. "$"
  return actual:match(pattern) ~= nil
end

-- every expectation appears in the output, in order
local function check_output(code, stdout)
  local lines = {}
  for line in stdout:gmatch("[^\n]+") do lines[#lines + 1] = (line:gsub("%s+", " "):gsub("%s+$", "")) end
  local at = 1
  for _, e in ipairs(expectations(code)) do
    while at <= #lines and not line_matches(e, lines[at]) do at = at + 1 end
    assert(at <= #lines, ("README: expected output %q not printed (got:\n%s)"):format(e, stdout))
    at = at + 1
  end
end

describe("README examples", function()
  local lua_blocks = blocks("lua")
  it("has Lua examples", function() assert.is_true(#lua_blocks >= 6) end)

  for i, code in ipairs(lua_blocks) do
    local title = code:match("^%-%- (spec/%S+)") or code:match("\n%-%- (%S.-)\n") or ("block " .. i)
    it("runs Lua example " .. i .. " (" .. title .. ")", function()
      local r
      if code:match("^%-%- spec/") then -- a spec example: run it with busted inside the host
        -- in a project of its own, twice, as a user runs their specs again: what a first run left
        -- in the folder's store (steps, budgets, the ledger) must not fail the next
        local dir = helpers.tmpname("-project")
        assert(os.execute("mkdir -p " .. dir))
        local path = helpers.write(dir .. "/example_spec.lua", code)
        local resil_bin = helpers.resil:sub(1, 1) == "/" and helpers.resil or cwd() .. "/" .. helpers.resil
        for run = 1, 2 do
          r = helpers.run(("cd %s && %s /usr/bin/busted -o TAP %s"):format(dir, resil_bin, path))
          assert.are.equal(0, r.code, ("run %d: %s%s"):format(run, r.stdout, r.stderr))
        end
        os.execute("rm -rf " .. dir)
      else
        r = helpers.run_script(code, "--store " .. helpers.tmpname(".db"), nil)
      end
      assert.are.equal(0, r.code, r.stdout .. r.stderr)
      if not code:match("^%-%- spec/") then check_output(code, r.stdout) end
    end)
  end

  -- as a user does: install into a prefix, then the README's own commands
  -- (/opt/resil made a temporary prefix), in a folder holding the example as app.c
  it("builds the C embedding example with the README's commands against an installation, and runs it", function()
    local code = assert(blocks("c")[1])
    local commands = assert(readme:match("```\n(make install PREFIX=/opt/resil.-)```"), "the install and build commands")
    local dir = helpers.tmpname("")
    assert(os.execute("mkdir -p " .. dir))
    helpers.write(dir .. "/app.c", code)
    local build, san = os.getenv("RESIL_LIBDIR") or "build", os.getenv("SAN_FLAGS") or ""
    commands = commands:gsub("/opt/resil", dir .. "/prefix")
      :gsub("make install", ("make -s -C %s install BUILD=%s SAN='%s'"):format(cwd(), build, san))
      :gsub("(cc app%.c[^\n]*)", "%1 " .. san)
    local r = helpers.run(("cd %s && unset PKG_CONFIG_PATH RESIL_HOME MAKEFLAGS MFLAGS MAKELEVEL && (\n%s\n) && ./a.out"):format(dir, commands))
    assert.are.equal(0, r.code, commands .. "\n" .. r.stdout .. r.stderr)
    assert.are.equal("slept a minute\n", r.stdout)
    -- the program records the library's ABI (its SONAME), not the development link
    local needed = helpers.run(("readelf -d %s/a.out"):format(dir)).stdout
    assert.matches("%[libresil%.so%.0%]", needed)
    -- linked into the program instead (resil-static): no libresil at run time, the policies by RESIL_HOME
    local static = assert(readme:match("`(cc app%.c %$%(pkg%-config %-%-cflags %-%-libs resil%-static%))`"))
    r = helpers.run(("cd %s && unset MAKEFLAGS && export PKG_CONFIG_PATH=%s/prefix/lib/pkgconfig && %s %s -o static " ..
      "&& RESIL_HOME=%s/prefix/share/resil ./static"):format(dir, dir, static, san, dir))
    assert.are.equal(0, r.code, static .. "\n" .. r.stdout .. r.stderr)
    assert.are.equal("slept a minute\n", r.stdout)
    assert.is_nil(helpers.run(("readelf -d %s/static"):format(dir)).stdout:find("libresil", 1, true))
  end)
end)

-- the demo (the quick start's `make demo`) has its own spec: spec/demo_spec.lua
