-- The gateway's metrics as an operator's Prometheus scrapes them, on a bad day:
-- the disk of the workers' metrics folder ($TMPDIR) full. Before, each scrape
-- was a 200 with every worker's figures as they were at their last write: the
-- counters froze while the gateway served, and nothing told (Prometheus' up
-- stayed 1). Now a scrape whose worker cannot write its figures fails (503:
-- up = 0), and the counts are whole again once the disk has room. Real
-- processes: the gateway, a mock provider, curl; a real full filesystem (a
-- tmpfs, where the spec may mount one), else a real write that fails (the
-- workers' files' places taken by folders).
local helpers = require "spec.helpers"

local CHAT = "/v1/chat/completions"
local SERIES = 'resil_gateway_requests_total{route="/v1/chat/completions",status="200"}'

local function value(text, series)
  local v = ("\n" .. text):match("\n" .. series:gsub("%p", "%%%0") .. " (%S+)\n")
  return v and tonumber(v)
end

local function sh(cmd) return helpers.run(cmd) end

-- GET url on a connection of its own -> status, body
local function scrape(url)
  local r = sh(("curl -s --max-time 10 -w '\\n%%{http_code}' %s"):format(url))
  assert(r.code == 0, "curl " .. url .. ": " .. r.stderr)
  local body, status = r.stdout:match("^(.*)\n(%d+)$")
  return tonumber(status), body
end

local function chats(port, n)
  local body = helpers.write(helpers.tmpname(".json"),
    '{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}')
  local r = sh(("for i in $(seq %d); do curl -s -o /dev/null -w '%%{http_code}\\n' --max-time 10 " ..
    "-H 'content-type: application/json' --data @%s http://127.0.0.1:%d%s; done"):format(n, body, port, CHAT))
  local _, ok = r.stdout:gsub("200\n", "")
  assert.are.equal(n, ok, r.stdout .. r.stderr)
end

describe("metrics on a bad day: a disk full, a file that cannot be written", function()
  it("gateway --workers 2, its metrics folder's disk full: a scrape fails (503) rather than answer frozen " ..
     "counts; with room again, every count is there", function()
    local tmpdir = helpers.tmpname(".d")
    os.execute("mkdir -p " .. tmpdir)
    -- a real full disk where a tmpfs can be mounted (root); else the files' places taken
    local mounted = os.execute(("mount -t tmpfs -o size=2m tmpfs %s 2>/dev/null"):format(tmpdir)) == true
    finally(function() if mounted then os.execute("umount -l " .. tmpdir) end end)
    local mport, port, metrics_port = helpers.free_ports(3)
    local mpidfile, pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".pid"), helpers.tmpname(".out")
    os.execute(("%s mock --port %d > /dev/null 2>&1 & echo $! > %s"):format(helpers.resil, mport, mpidfile))
    local mpid = helpers.slurp(mpidfile):match("%d+")
    assert.is_true(helpers.wait_listening(mport), "the mock did not start") -- (before the first request: one sent
    -- while it started was refused and tried again, an attempt more than the spec counts)
    local config = helpers.write(helpers.tmpname(".lua"), ([[
      require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456" })
      return { auth = false }
    ]]):format(mport))
    os.execute(("TMPDIR=%s %s gateway --listen 127.0.0.1:%d --workers 2 --config %s --store %s " ..
      "--metrics-addr 127.0.0.1:%d > %s 2>&1 & echo $! > %s"):format(tmpdir, helpers.resil, port, config,
      helpers.tmpname(".db"), metrics_port, log, pidfile))
    local pid = helpers.slurp(pidfile):match("%d+")
    finally(function()
      for _, p in ipairs({ pid, mpid, table.unpack(helpers.workers_of(pid)) }) do
        if helpers.alive(p) then os.execute("kill -KILL " .. p) end
      end
    end)
    assert.is_true(helpers.wait_until(function()
      return sh(("curl -s -o /dev/null http://127.0.0.1:%d/health"):format(mport)).code == 0 and
        select(2, helpers.slurp(log):gsub("listening", "")) >= 2
    end, 10), helpers.slurp(log))
    local urls = { ("http://127.0.0.1:%d/metrics"):format(metrics_port), ("http://127.0.0.1:%d/metrics"):format(port) }
    chats(port, 4)
    assert.is_true(helpers.wait_until(function() return value(select(2, scrape(urls[1])), SERIES) == 4 end, 10))

    local folder = sh("ls -d " .. tmpdir .. "/resil-lua-metrics-*").stdout:match("%S+")
    local full = tmpdir .. "/full"
    if mounted then
      os.execute(("dd if=/dev/zero of=%s bs=64k count=64 > /dev/null 2>&1"):format(full))
    else -- each worker's file a folder: its write (renamed over it) fails
      for name in sh("ls " .. folder).stdout:gmatch("(w%-%d+%-%d+%.prom)") do
        os.execute(("rm -f %s/%s && mkdir -p %s/%s/x"):format(folder, name, folder, name))
      end
    end
    chats(port, 4)
    for _ = 1, 6 do
      for _, url in ipairs(urls) do
        local status, body = scrape(url)
        assert.are.equal(503, status, body)
        assert.matches("could not be written", body, 1, true)
      end
    end
    assert.is_true(helpers.alive(pid), helpers.slurp(log))

    -- room again: the counts the workers made while it was full are all there
    if mounted then os.remove(full)
    else
      for name in sh("ls " .. folder).stdout:gmatch("(w%-%d+%-%d+%.prom)") do
        os.execute(("rm -rf %s/%s"):format(folder, name))
      end
    end
    assert.is_true(helpers.wait_until(function()
      local status, body = scrape(urls[1])
      return status == 200 and value(body, SERIES) == 8
    end, 10), select(2, scrape(urls[1])))
    for _, url in ipairs(urls) do
      local status, body = scrape(url)
      assert.are.equal(200, status, body)
      assert.are.equal(8, value(body, SERIES), body)
    end
  end)

  it("--metrics-file that cannot be written for a while: said once, and once when it is written again " ..
     "(not a line every 15 s)", function()
    local file = helpers.tmpname(".prom")
    -- the file's place taken by a folder once the run has started (its first write was fine), for
    -- 100 s of virtual time: some six 15 s writes fail
    local r = helpers.run_script(([[
      local resil = require "resil"
      os.remove(%q); os.execute("mkdir -p %s/x")
      resil.sleep(100)
      os.execute("rm -rf %s")
      resil.sleep(40)
    ]]):format(file, file, file), ("--virtual-clock --log-level info --metrics-file %s"):format(file))
    assert.are.equal(0, r.code, r.stderr)
    local out = r.stdout .. r.stderr
    local _, failed = out:gsub('"metrics file not written"', "")
    local _, again = out:gsub('"metrics file written again"', "")
    assert.are.equal(1, failed, out)
    assert.are.equal(1, again, out)
    assert.matches("Is a directory", out, 1, true)
    assert.matches(file, out, 1, true) -- (the error names the file)
    assert.matches("# TYPE", helpers.slurp(file)) -- written at the end
  end)

  it("gateway --metrics-addr on the gateway's own --listen address is refused at the start (exit 1), not " ..
     "served there beside the gateway, which answered a share of the clients' requests with 404s", function()
    local config = helpers.write(helpers.tmpname(".lua"), "return { auth = false }")
    for _, case in ipairs({ { "127.0.0.1", "127.0.0.1" }, { "0.0.0.0", "" }, { "127.0.0.1", "0.0.0.0" } }) do
      local port = helpers.free_port()
      local pidfile, log = helpers.tmpname(".pid"), helpers.tmpname(".out")
      os.execute(("%s gateway --listen %s:%d --workers 2 --config %s --store %s --metrics-addr %s:%d > %s 2>&1 & " ..
        "echo $! > %s"):format(helpers.resil, case[1], port, config, helpers.tmpname(".db"), case[2], port, log, pidfile))
      local pid = helpers.slurp(pidfile):match("%d+")
      finally(function()
        for _, p in ipairs({ pid, table.unpack(helpers.workers_of(pid)) }) do
          if helpers.alive(p) then os.execute("kill -KILL " .. p) end
        end
      end)
      assert.is_true(helpers.wait_until(function() return not helpers.alive(pid) end, 10),
        "it started: " .. helpers.slurp(log) .. helpers.run(("for i in $(seq 9); do curl -s -o /dev/null -w " ..
          "'%%{http_code} ' http://127.0.0.1:%d/health; done"):format(port)).stdout)
      assert.matches("is where the gateway listens", helpers.slurp(log), 1, true)
    end
  end)
end)
