-- Ownership: who holds a run, a resil.once key or a budget hold, and whether
-- they are alive. A holder is named by its identity, "host|boot|pid|start|
-- since|nonce": the host name and boot id (one machine, one boot, one pid
-- namespace: pid_space), the pid
-- and the process's start time (field 22 of /proc/<pid>/stat, so a reused
-- pid is another process), when it first needed the name, and a nonce (two
-- hosts embedded in one process are two owners).
--
-- Alive, seen from this process: a holder on this machine is alive while
-- its pid runs with the same start time (checked in /proc, at once), one of
-- this process while its host is open (owners.c); a
-- holder on another machine is alive while its lease in the store, renewed
-- by a heartbeat, has not lapsed. The store backends ask verdict() and keep
-- the leases; this module renews them (one store operation per beat for
-- everything this process holds in that store). The times here are this
-- process's store time; Redis, shared by machines whose clocks may differ,
-- takes a lease as its length and keeps and judges it on the server's clock
-- (store_redis.lua, holders_lib); SQLite, one machine's file, on the local one.
local resil, private = ...
-- (taken now, before any script runs: the heartbeat is handed a store's backend, and a script may
-- replace what the resil table holds)
local background = resil.background
local hash, sleep = resil.hash, resil.sleep
-- the store's time (store.lua, which loads this module before it is made: private.store_now, not
-- resil.store_now, which a script that replaced it had leases written with)
local function store_now() return private.store_now() end

local M = { lease = 30 }

local function read_line(path)
  local f = io.open(path)
  if not f then return nil end
  local line = f:read("l")
  f:close()
  return line
end

-- /proc/<pid>/stat -> start time (clock ticks since boot), or nil when the
-- process is gone (a zombie is gone: it runs nothing any more)
local function start_of(pid)
  local stat = read_line("/proc/" .. pid .. "/stat")
  if not stat then return nil end
  local rest = stat:match("^.*%)%s(.*)$") -- the command name may hold spaces and parentheses
  if not rest then return nil end
  local fields = {}
  for field in rest:gmatch("%S+") do fields[#fields + 1] = field end
  if fields[1] == "Z" or fields[1] == "X" then return nil end
  return fields[20] -- field 22 of the line; the name was field 2
end

-- The pid namespace pids are read in (through /proc): when its pid 1 started, and the /proc
-- mount. Two containers with the host's name and boot id (host networking) each read the
-- other's pids in their own namespace, where they are other processes or none: a live
-- holder was taken for dead, its run, once key or budget hold taken over. Part of the
-- identity's boot field: a holder in another namespace is judged by its lease.
local function pid_space()
  local proc = ""
  local f = io.open("/proc/self/mountinfo")
  if f then
    for line in f:lines() do
      local id, point = line:match("^(%d+) %d+ %S+ %S+ (%S+)")
      if point == "/proc" then
        proc = id
        break
      end
    end
    f:close()
  end
  return (start_of(1) or "") .. "." .. proc
end

local me

-- -> this process's identity {id=, host=, boot=, pid=, start=, since=}, made on first use
function M.me()
  if me then return me end
  local host = read_line("/proc/sys/kernel/hostname") or os.getenv("HOSTNAME") or "localhost"
  local boot = (read_line("/proc/sys/kernel/random/boot_id") or ""):gsub("-", ""):sub(1, 12)
  if boot ~= "" then boot = boot .. "." .. hash(pid_space()):sub(1, 8) end
  local pid = (read_line("/proc/self/stat") or ""):match("^(%d+)") or "0"
  local start = pid ~= "0" and start_of(pid) or nil
  local since = store_now()
  me = { host = host:gsub("|", "_"), boot = boot, pid = tonumber(pid), start = start or "0", since = since,
         checks = start ~= nil and boot ~= "" } -- without /proc, every holder is judged by its lease
  me.id = ("%s|%s|%d|%s|%.3f|%s"):format(me.host, me.boot, me.pid, me.start, since,
    hash(tostring({}) .. os.clock() .. since):sub(1, 6))
  me.local_prefix = me.checks and (me.host .. "|" .. me.boot .. "|") or ""
  me.tag = hash(me.id) -- short, for names made from it (budget tickets)
  private.owner_opened(me.id)
  return me
end

-- "host|boot|pid|start|since|nonce" -> {host=, boot=, pid=, start=, since=} | nil (a holder
-- recorded without an identity)
function M.parse(id)
  if type(id) ~= "string" then return nil end
  local host, boot, pid, start, since = id:match("^([^|]*)|([^|]*)|(%d+)|(%d+)|([%d.]+)|[^|]*$")
  if not host then return nil end
  return { host = host, boot = boot, pid = tonumber(pid), start = start, since = tonumber(since) }
end

-- The holder seen from here: "me" | "alive" | "dead" (this machine: its pid
-- checked now) | "remote" (another machine: its lease in the store decides)
-- | nil (no identity: the record's own lease decides)
function M.verdict(id)
  local self = M.me()
  if id == self.id then return "me" end
  local o = M.parse(id)
  if not o then return nil end
  if not self.checks or o.host ~= self.host or o.boot ~= self.boot then return "remote" end
  -- (another host of this process: dead once closed, its pid running or not; one this copy of the
  -- library never opened, another copy's, is alive as the process is)
  if o.pid == self.pid and o.start == self.start then return private.owner_state(id) == "closed" and "dead" or "alive" end
  return start_of(o.pid) == o.start and "alive" or "dead"
end

-- {host=, pid=, since=} for people: state(), error messages, `resil-lua runs`
function M.describe(id)
  local o = M.parse(id)
  if not o then return { id = id } end
  return { host = o.host, pid = o.pid, since = o.since }
end

function M.format(id, since)
  local o = M.parse(id)
  if not o then return ("holder %s"):format(tostring(id)) end
  return ("pid %d on host %s since %s UTC"):format(o.pid, o.host,
    os.date("!%Y-%m-%d %H:%M:%S", math.floor(since or o.since)))
end

-- ---------- heartbeats ----------

-- backend -> { [token] = until (store time) }: what this process holds in
-- that store, so the heartbeat runs while there is something to renew;
-- backend -> the end of the lease last written there
local held, beating, written = {}, {}, {}

-- An operation that takes something also writes this process's lease, so
-- that it is there from the first moment; not again while one written less
-- than a third of a lease ago stands (the heartbeat renews it from there).
-- -> the lease's new end, to pass to the operation, or false
function M.lease_due(backend, now)
  local last = written[backend]
  if last and last - now > M.lease * 2 / 3 then return false end
  return now + M.lease
end

-- the operation given lease_due's value succeeded
function M.lease_written(backend, lease_until)
  if lease_until then written[backend] = lease_until end
end

local function beat(backend, tokens)
  while true do
    sleep(M.lease / 3)
    local now = store_now()
    local any = false
    for token, until_t in pairs(tokens) do
      if until_t <= now then tokens[token] = nil else any = true end
    end
    if not any then
      beating[backend] = nil
      return
    end
    -- a failed beat is tried again at the next; one that raises too (the
    -- heartbeat stopping for good would let every lease and record lapse)
    local ok, renewed = pcall(backend.owner_beat, backend, M.me().id, now + M.lease, now, tokens)
    if ok and renewed then
      written[backend] = now + M.lease
    elseif not ok then
      resil.log.error("owner: the heartbeat could not renew this process's lease", { error = tostring(renewed) })
    end
  end
end

-- This process holds `token` in the backend's store until `until_t` (store
-- time; math.huge: until drop): its lease is renewed meanwhile.
function M.keep(backend, token, until_t)
  local tokens = held[backend]
  if not tokens then
    tokens = {}
    held[backend] = tokens
  end
  tokens[token] = until_t or math.huge
  if not beating[backend] then
    beating[backend] = background(beat, backend, tokens)
  end
end

function M.drop(backend, token)
  local tokens = held[backend]
  if tokens then tokens[token] = nil end
end

return M
