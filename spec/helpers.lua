-- Shared by the specs: run the resil-lua binary (or any command) as a real
-- process and collect what a user would see.
local helpers = {}

helpers.resil = os.getenv("RESIL") or "./resil-lua"

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end
helpers.slurp = slurp

function helpers.tmpname(suffix)
  local name = os.tmpname()
  os.remove(name)
  return name .. (suffix or "")
end

function helpers.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

-- sh command -> {stdout=, stderr=, code=}
function helpers.run(cmd, stdin)
  local out, err = helpers.tmpname(".out"), helpers.tmpname(".err")
  local input = ""
  if stdin then input = " < " .. helpers.write(helpers.tmpname(".in"), stdin) end
  local ok, how, code = os.execute(("%s%s > %s 2> %s"):format(cmd, input, out, err))
  local result = { stdout = slurp(out), stderr = slurp(err), code = how == "exit" and code or 128 + code }
  os.remove(out)
  os.remove(err)
  return result
end

-- Run a script file through the host: args is a string appended to the command line.
function helpers.run_script(source, opts, args)
  local path = helpers.write(helpers.tmpname(".lua"), source)
  local r = helpers.run(("%s %s %s %s"):format(helpers.resil, opts or "", path, args or ""))
  r.path = path
  return r
end

-- Start a script in the background: -> pid, path of its combined output.
function helpers.start(source, opts, args)
  local script = helpers.write(helpers.tmpname(".lua"), source)
  local out = helpers.tmpname(".out")
  local pidfile = helpers.tmpname(".pid")
  os.execute(("%s %s %s %s > %s 2>&1 & echo $! > %s"):format(helpers.resil, opts or "", script, args or "", out,
    pidfile))
  local pid = helpers.slurp(pidfile):match("%d+")
  os.remove(pidfile)
  return pid, out
end

-- Wait (real time, inside the host) until cond() holds; false after `seconds`.
function helpers.wait_until(cond, seconds)
  local resil = require "resil"
  local deadline = resil.clock.wall() + (seconds or 10)
  while resil.clock.wall() < deadline do
    if cond() then return true end
    resil.sleep(0.01)
  end
  return cond() and true or false
end

-- A process that exited but is not reaped yet (a zombie) counts as gone.
function helpers.alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local stat = f:read("a")
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

return helpers
