-- --watch where inotify is short: a machine whose fs.inotify.max_user_watches
-- an IDE or a container's neighbours used up (inotify_add_watch: ENOSPC), or
-- whose max_user_instances is reached (inotify_init1: EMFILE). --watch said
-- nothing of the first and never reloaded; of the second it said one line
-- and was off. Both made with an LD_PRELOAD shim; the edit is a real file's.
local helpers = require "spec.helpers"
local resil = require "resil"

local function shim(body)
  local src = helpers.write(helpers.tmpname(".c"), "#define _GNU_SOURCE\n#include <errno.h>\n#include <stdint.h>\n" ..
    body)
  local so = helpers.tmpname(".so")
  assert(os.execute(("cc -shared -fPIC -o %s %s"):format(so, src)), "cc could not build the shim")
  return so
end

local SCRIPT = [[
local resil = require "resil"
local p = resil.policy("p")
print("started " .. p.v)
io.stdout:flush()
local deadline = resil.clock.wall() + 20
while p.v == 1 and resil.clock.wall() < deadline do resil.sleep(0.05) end
print("saw " .. p.v)
]]

-- files: the policy folder at start (p.lua's v = 1); change(dir): what the user does after
local function watch_with(so, files, change)
  local dir = helpers.policy_dir(files or { ["p.lua"] = "return { v = 1 }\n" })
  local pid, out = helpers.start(SCRIPT, ("--watch --policies %s"):format(dir))
  -- (the shim only for the host: helpers.start runs it through sh)
  assert(helpers.wait_until(function() return helpers.slurp(out):match("started") ~= nil end, 10),
    helpers.slurp(out))
  if change then change(dir) else helpers.write(dir .. "/p.lua", "return { v = 2 }\n") end
  local ended = helpers.wait_until(function() return not helpers.alive(pid) end, 25)
  if not ended then os.execute("kill -KILL " .. pid) end
  return helpers.slurp(out), dir
end

describe("--watch without inotify watches to spare", function()
  local resil_bin = helpers.resil
  after_each(function() helpers.resil = resil_bin end)

  it("checks a deep module's file every second when its folder cannot be watched (ENOSPC), and says so", function()
    -- (the folders two below a policy folder are walked at start; a module deeper is watched as
    -- it loads: its watch refused, the file went unwatched and unsaid, and its edits reloaded nothing)
    local so = shim("#include <string.h>\nint inotify_add_watch(int fd, const char *p, uint32_t m) { " ..
      "(void)fd; (void)m; if (strstr(p, \"/lib\")) { errno = ENOSPC; return -1; } return 1; }\n")
    helpers.resil = ("ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s"):format(so, resil_bin)
    local dir = helpers.policy_dir({})
    assert(os.execute("mkdir -p " .. dir .. "/team/shared/lib"))
    helpers.write(dir .. "/team/shared/lib/x.lua", "return { v = 1 }\n")
    local pid, out = helpers.start(SCRIPT:gsub('resil.policy%("p"%)', 'resil.policy("team.shared.lib.x")'),
      ("--watch --policies %s"):format(dir))
    assert(helpers.wait_until(function() return helpers.slurp(out):match("started") ~= nil end, 10),
      helpers.slurp(out))
    helpers.write(dir .. "/team/shared/lib/x.lua", "return { v = 2 }\n")
    if not helpers.wait_until(function() return not helpers.alive(pid) end, 25) then os.execute("kill -KILL " .. pid) end
    local text = helpers.slurp(out)
    assert.matches("saw 2", text)
    assert.matches("cannot watch a policy folder[^\n]*/team/shared/lib", text)
  end)

  it("checks the files every second when a folder cannot be watched (ENOSPC), and says so once", function()
    local so = shim("int inotify_add_watch(int fd, const char *p, uint32_t m) { (void)fd; (void)p; (void)m; " ..
      "errno = ENOSPC; return -1; }\n")
    helpers.resil = ("ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s"):format(so, resil_bin)
    local out, dir = watch_with(so)
    assert.matches("saw 2", out) -- (was: "saw 1" after 20 s: never reloaded)
    local warned = 0
    for line in out:gmatch("[^\n]+") do
      if line:find("cannot watch", 1, true) then
        warned = warned + 1
        assert.matches("max_user_watches", line)
        assert.is_truthy(line:find(dir, 1, true) or line:find("policies", 1, true))
      end
    end
    assert.are.equal(1, warned, out)
  end)

  it("checks the files every second when inotify cannot start (EMFILE)", function()
    local so = shim("int inotify_init1(int flags) { (void)flags; errno = EMFILE; return -1; }\n")
    helpers.resil = ("ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s"):format(so, resil_bin)
    local out = watch_with(so)
    assert.matches("saw 2", out) -- (was: "--watch: Too many open files", and never reloaded)
    assert.matches("max_user_instances", out)
  end)

  -- A file made after the start: the poll stat'ed the files it had listed, so a new one (an
  -- override of a shipped policy, a module a policy requires once it exists, one in a folder
  -- made later) was never seen, and the old version served on without a word.
  local REQUIRES_X = { ["p.lua"] = 'local ok, x = pcall(require, "policies.x")\nreturn { v = ok and x.v or 1 }\n' }
  local REQUIRES_SUB = { ["p.lua"] = 'local ok, x = pcall(require, "policies.sub.x")\nreturn { v = ok and x.v or 1 }\n' }
  local function new_file(dir) helpers.write(dir .. "/x.lua", "return { v = 2 }\n") end
  local function new_folder(dir)
    assert(os.execute("mkdir " .. dir .. "/sub"))
    helpers.write(dir .. "/sub/x.lua", "return { v = 2 }\n")
  end
  local SHIMS = {
    ENOSPC = "int inotify_add_watch(int fd, const char *p, uint32_t m) { (void)fd; (void)p; (void)m; " ..
      "errno = ENOSPC; return -1; }\n",
    EMFILE = "int inotify_init1(int flags) { (void)flags; errno = EMFILE; return -1; }\n",
  }
  for _, why in ipairs({ "ENOSPC", "EMFILE" }) do
    it("sees a policy file made after the start when the files are checked every second (" .. why .. ")", function()
      helpers.resil = ("ASAN_OPTIONS=verify_asan_link_order=0 LD_PRELOAD=%s %s"):format(shim(SHIMS[why]), resil_bin)
      local out = watch_with(nil, REQUIRES_X, new_file)
      assert.matches("cannot watch", out)
      assert.matches("saw 2", out) -- (was: "saw 1" after 20 s, the new file never seen)
      out = watch_with(nil, REQUIRES_SUB, new_folder)
      assert.matches("saw 2", out) -- (was: "saw 1": a folder made later was never read)
    end)
  end

  it("(an inotify that works sees a file made after the start, and one in a folder made later)", function()
    assert.matches("saw 2", (watch_with(nil, REQUIRES_X, new_file)))
    assert.matches("saw 2", (watch_with(nil, REQUIRES_SUB, new_folder)))
  end)

  it("(an inotify that works reloads on the edit)", function()
    local out = watch_with(nil)
    assert.matches("saw 2", out)
    assert.is_nil(out:find("cannot watch", 1, true))
  end)
end)
