-- Clients of the gateway's HTTP front that leave in ways the SDKs do not:
-- raw sockets (python3) at a real `resil-lua gateway` in front of a real
-- `resil-lua mock`, each a process of its own.
local helpers = require "spec.helpers"
local resil = require "resil"
local json = resil.json

-- a mock (scenario: Lua source) and a gateway routing `fast` to it, without keys -> gateway port, mock port
local function gateway_and_mock(scenario)
  local mock_port, port = helpers.free_ports(2)
  local dir = helpers.tmpname("")
  os.execute("mkdir -p " .. dir)
  helpers.write(dir .. "/mock.lua", "return " .. scenario)
  helpers.write(dir .. "/gw.lua", ([[
    require("policies.ai").configure("openai", { base_url = "http://127.0.0.1:%d/v1", api_key = "sk-test-123456",
      retry = { base = 0.01, cap = 0.02 } })
    return { auth = false, models = { fast = "openai/gpt-4o-mini" } }
  ]]):format(mock_port))
  os.execute(("%s mock %s/mock.lua --port %d > %s/mock.out 2>&1 & echo $! > %s/mock.pid"):format(helpers.resil, dir,
    mock_port, dir, dir))
  os.execute(("%s gateway --listen 127.0.0.1:%d --config %s/gw.lua --store %s/s.db --log-level error > %s/gw.out " ..
    "2>&1 & echo $! > %s/gw.pid"):format(helpers.resil, port, dir, dir, dir, dir))
  local pids = { helpers.slurp(dir .. "/mock.pid"):match("%d+"), helpers.slurp(dir .. "/gw.pid"):match("%d+") }
  finally(function() for _, pid in ipairs(pids) do os.execute("kill " .. pid .. " 2>/dev/null") end end)
  assert(helpers.wait_until(function() return helpers.slurp(dir .. "/gw.out"):find("listening") ~= nil end, 10),
    helpers.slurp(dir .. "/gw.out"))
  assert(helpers.wait_until(function() return helpers.slurp(dir .. "/mock.out"):find("http") ~= nil end, 10))
  return port, mock_port
end

local function get(port, path)
  return helpers.run(("curl -s http://127.0.0.1:%d%s"):format(port, path)).stdout
end

describe("the gateway's HTTP front, clients that leave", function()
  -- (before: the server watched the socket for the client's close with a peek, and stopped
  -- watching at the first byte of a request pipelined behind: a FIN behind bytes libevent had not
  -- read yet went unseen, and the call retried for a client long gone, on its permits)
  it("one that pipelined a large request behind its call and hung up: the call makes no new attempt", function()
    local port, mock_port = gateway_and_mock('{ latency = 1, faults = { { route = "chat", status = 500 } } }')
    local body = json.encode({ model = "fast", messages = { { role = "user", content = "hi" } } })
    local behind = ("x"):rep(20000) -- (more than libevent reads at once: its bytes wait in the socket, the FIN behind them)
    local bytes = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"):format(#body, body)
      .. ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"):format(#behind, behind)
    local file = helpers.write(helpers.tmpname(".bin"), bytes)
    helpers.run(("python3 -c 'import socket, sys, time; s = socket.create_connection((\"127.0.0.1\", %d)); " ..
      "s.sendall(open(sys.argv[1], \"rb\").read()); time.sleep(0.3); s.close()' %s"):format(port, file))
    -- the call gives up for its client once its attempt has failed
    local gave_up = 'resil_retry_gave_up_total{provider="openai",reason="client_left"} 1'
    local metrics
    assert.is_true(helpers.wait_until(function()
      metrics = get(port, "/metrics")
      return metrics:find(gave_up, 1, true) ~= nil or metrics:find('reason="max_retries"', 1, true) ~= nil
    end, 20), metrics)
    assert.matches(gave_up, metrics, 1, true)
    assert.are.equal(1, json.decode(get(mock_port, "/__mock/stats")).routes.chat)
  end)
end)
