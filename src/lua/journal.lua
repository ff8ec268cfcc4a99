-- The ledger's journal: paid calls' cost rows and budget settles that the
-- store would not take, kept in files until it does (src/journal.c has the
-- files and their locks).
--
-- A write nobody waits for that the store refused is tried again for a
-- minute (costs.lua, retry_later). A store down for longer (a Redis outage,
-- SQLite's write lock held by another process), or a process that ends with
-- such writes unwritten, lost them: a line in the log, and a paid call in
-- neither the ledger nor its budget. Each is now a line in this process's
-- journal file, in the folder RESIL_JOURNAL (by default .resil/journal,
-- beside the default store), and written to the store when it answers: by
-- this process, tried again from 5 s to once a minute for as long as it
-- runs, or by the next process that opens the same store. Every write kept
-- has a key (a row's id or its own, a settle's ticket), so a line written
-- twice (a process killed between writing it and removing its file) is in
-- the ledger once.
local resil, private = ...
local core = require "resil.core.journal"
local owner = require "resil.owner"
local json = private.json

local FIRST_PAUSE, MOST_PAUSE = 5, 60
local LEFT_OUT_NAMED = 10 -- (lines that are not ledger writes named in the log, a file)

-- (what an operator alerts on: a write kept is a paid call not yet in the ledger or its budget)
local kept_total = resil.metrics.counter("resil_ledger_journal_kept_total",
  "Ledger writes (cost rows, budget settles) the store would not take, kept in the ledger's journal, by kind")
local written_total = resil.metrics.counter("resil_ledger_journal_written_total",
  "Ledger writes from the ledger's journal the store now holds (written, or found there already), by kind")

local M = {}

-- resil.store_config{ journal = folder }, or RESIL_JOURNAL, or .resil/journal
local function folder()
  local d = require("resil.store").config.journal or os.getenv("RESIL_JOURNAL")
  return d ~= nil and d ~= "" and d or ".resil/journal"
end

-- A store's files are named by what it is (its key without a password):
-- readable, then a hash of it, so that two stores whose names read alike
-- never share files.
local stores = {}                                     -- the store, bare -> its journal state
local of_backend = setmetatable({}, { __mode = "k" }) -- backend -> its journal state
-- (the store itself, not how it was asked for: no password, no ?timeout=)
local seq = 0
local function state_of(key, url)
  local bare = key:gsub("//[^/]*@", "//"):gsub("%?.*$", "")
  local st = stores[bare]
  if st then return st end
  st = { url = url, prefix = bare:gsub("^%a+://", ""):gsub("[^%w.-]", "_"):sub(-40) .. "-" ..
           resil.crypto.sha256(bare):sub(1, 16) .. "." }
  stores[bare] = st
  return st
end

local function log_fields(w, path)
  local e = w.e
  if w.k == "once" then return { key = w.t, journal = path } end
  return { provider = e.provider, model = e.model, usd = e.micro_usd and e.micro_usd / 1e6, id = e.dedupe,
           ticket = w.t, journal = path }
end

-- One write, as src/lua/costs.lua and budgets.lua make it -> true (written) | false (there
-- already) | nil, err
local function write_one(backend, w)
  if w.k == "row" then return backend:cost_record(w.e) end
  if w.k == "settle" then return backend:budget_settle(w.t, w.e) end
  -- (a once record: written only while its key is still the holder's, as once.lua's own write)
  local e = w.e
  return backend:once_finish(w.t, e.holder, e.result, e.retention, require("resil.store").now(), e.fingerprint)
end

-- (JSON's numbers come back as floats: a micro-dollar amount must be an integer again, or Redis's
-- INCRBY refuses "1234.0"; the time stays as it was)
local function whole_numbers(e)
  for k, v in pairs(e) do
    if k ~= "at" and math.type(v) == "float" then e[k] = math.tointeger(v) or v end
  end
end

local function is_write(w)
  local e = type(w) == "table" and w.e
  if type(e) == "table" and w.k == "once" then
    return type(w.t) == "string" and type(e.holder) == "string" and type(e.result) == "string"
      and type(e.retention) == "number" and (e.fingerprint == nil or type(e.fingerprint) == "string")
  end
  return type(e) == "table" and (w.k == "row" or w.k == "settle" and type(w.t) == "string")
    and type(e.dedupe) == "string" and type(e.at) == "number" and type(e.day) == "string"
    and (e.micro_usd == nil or math.type(e.micro_usd) == "integer" and e.micro_usd >= 0)
end

-- A file is replayed whole (src/journal.c reads at most 256 MB of one): past this size, the process
-- goes on in a new one. An outage of an hour under a busy gateway kept more in one file than any
-- replay would read, and its writes were never written. (M.file_bytes: a spec's smaller size)
M.file_bytes = 64 * 1024 * 1024

-- the text appended to this process's file for the store (opened on first use) -> its path | nil, err
local function append(st, text)
  if st.live and st.size >= M.file_bytes then
    pcall(st.live.close, st.live)
    st.live = nil
  end
  for _ = 1, 2 do
    if not st.live then
      seq = seq + 1
      local path = ("%s/%s%s-%d.jsonl"):format(folder(), st.prefix, owner.me().tag, seq)
      local f, err = core.open(path)
      if not f then return nil, err end
      st.live, st.path, st.size = f, path, 0
    end
    local ok, done, err = pcall(st.live.append, st.live, text)
    if ok and done then
      st.size = st.size + #text
      return st.path
    end
    -- (the disk full: said by the caller; the file kept for the next write, none of this one in it,
    -- where a new file a write was one more empty file, its descriptor open, for each write refused)
    if ok then return nil, err end
    st.live = nil -- (closed under it: the process is ending and collected it first; a new file)
  end
  return nil, "the journal could not be written"
end

local drain
local ending = false -- (resil_close, the process's end: no task is started any more)

-- Kept: w = { k = "row", e = entry } | { k = "settle", t = ticket, e = entry } | { k = "once", t =
-- key, e = record } for the store whose backend is given, or else the default store (one that could
-- not be opened). A row or settle must have its key (dedupe). -> the file's path | nil, err
function M.keep(backend, w)
  local st = backend and of_backend[backend]
  if not st then
    local S = require "resil.store"
    local url = S.url()
    st = state_of(S.key(url), url)
  end
  if not is_write(w) then return nil, "not a keyed ledger write" end
  local ok, text = pcall(json.encode, w)
  if not ok then return nil, text end
  local path, err = append(st, text .. "\n")
  if not path then return nil, err end
  kept_total:inc({ kind = w.k })
  if ending then return path end
  if not st.syncing and resil.running() then
    -- (one sync for a burst: every write in flight fails at once when a store goes)
    st.syncing = true
    resil.background(function()
      resil.sleep(0.05)
      st.syncing = false
      if st.live then st.live:sync() end
    end)
  end
  if not st.draining then
    st.draining = true
    resil.background(drain, st)
  end
  return path
end

-- The files of the store no process holds, written to it: -> how many writes are left (kept again
-- in this process's file for the next pass)
-- (a pass that raises or whose task is canceled: the file being replayed is let go, for this
-- process's next pass or another's; held, no other process could claim it until this one ended)
local replay_ended = { __close = function(g)
  local r = g.st.replaying
  if r and g.st.replaying_by == g then
    g.st.replaying = nil
    pcall(r.claim.release, r.claim)
  end
end }

local function replay(st)
  local guard <close> = setmetatable({ st = st }, replay_ended)
  st.replaying_by = guard
  local s = private.store_open(st.url)
  if not s then return 1 end
  local backend = private.backend_of[s]
  of_backend[backend] = st
  -- (this process's own file too: closed, its lock let go, so that it is claimed with the others;
  -- what is kept meanwhile goes to a new one)
  if st.live then
    st.live:close()
    st.live = nil
  end
  local left, down = 0, nil
  for _, claim in ipairs(core.claim(folder(), st.prefix)) do
    local path = claim:path()
    local text, err
    if not down then text, err = claim:read() end
    if down then
      claim:release() -- (the store still down: the files after the first are left for the next pass)
      left = left + 1
    elseif not text then
      resil.log.error("a ledger journal could not be read; its writes are not in the ledger yet",
        { journal = path, error = err })
      claim:release()
      left = left + 1
    else
      -- Line by line until the store is down; the rest of the file is then one piece, neither read
      -- line by line nor decoded (a 100,000-line journal held the loop some 0.7 s at each pass of an
      -- outage), and a file none of whose lines was written is left as it is, not copied.
      local rest, at, taken = nil, 1, false
      local progress = { claim = claim, text = text, at = 1 } -- (where it is, for M.ending)
      st.replaying = progress
      local left_out, read = 0, 0
      while at <= #text do
        local nl = text:find("\n", at, true) or #text + 1
        local line = text:sub(at, nl - 1)
        progress.at = at
        read = read + 1
        if read % 1000 == 0 then
          -- (lines that are no writes take no turn of the store's: 20 MB of them held the loop 0.8 s)
          resil.sleep(0)
          if st.replaying ~= progress then return 1 end
        end
        if line ~= "" then
          local ok, w = pcall(json.decode, line)
          if ok and type(w) == "table" and type(w.e) == "table" then whole_numbers(w.e) end
          if not ok or not is_write(w) then
            -- (the last line of a file cut by a power cut, or one written by hand; the first few
            -- named: a file of garbage was a line in the log for each of its lines, 78,000 for 20 MB)
            left_out = left_out + 1
            if left_out <= LEFT_OUT_NAMED then
              resil.log.error("a line of a ledger journal that is not a ledger write was left out",
                { journal = path, line = line:sub(1, 200) })
            end
          else
            -- (a line the backend raises on can never be written: said and left out, not tried forever)
            local called, written, werr = pcall(write_one, backend, w)
            if not called then written, werr = nil, written end
            if st.replaying ~= progress then return 1 end -- (the process ended meanwhile: M.ending kept the rest)
            -- (an error the store returns is the store's, not the line's: down, or a server that
            -- refuses every command, NOAUTH after a password was set, a command it does not know:
            -- the pass stops and the rest is kept; dropped, a process opened without the password
            -- emptied the journal. A line the backend raises on is the line's: said and left out.)
            if written == nil and called then
              down, rest = werr, text:sub(at)
              break
            elseif written == nil then
              local f = log_fields(w, path)
              f.error = tostring(werr)
              resil.log.error("the ledger refused a write from its journal; its cost is not in it", f)
            else
              written_total:inc({ kind = w.k })
            end
            if written == false and w.k == "once" then
              -- (its key taken over, or gone past its retention: the new holder's result counts)
              resil.log.warn("a resil.once record from the ledger's journal was not written: its key is " ..
                "another holder's now, or gone", { key = w.t, journal = path })
            end
            if written and (w.k == "row" or w.k == "settle" and w.e.charged) then
              local units = type(w.e.units) == "string" and select(2, pcall(json.decode, w.e.units)) or nil
              require("resil.costs").observe({ provider = w.e.provider, model = w.e.model,
                usd = (w.e.micro_usd or 0) / 1e6, operation = w.e.operation }, type(units) == "table" and units or nil)
            end
          end
          taken = true
        end
        at = nl + 1
      end
      st.replaying = nil
      st.replaying_by = nil
      if left_out > LEFT_OUT_NAMED then
        resil.log.error("more lines of a ledger journal that are not ledger writes were left out",
          { journal = path, lines = left_out - LEFT_OUT_NAMED })
      end
      local lines = 0
      if rest then
        for _ in rest:gmatch("\n") do lines = lines + 1 end
        if rest:sub(-1) ~= "\n" then lines, rest = lines + 1, rest .. "\n" end
      end
      local now_in = path
      if rest and not taken then
        claim:release() -- (nothing of it written: left as it is)
      elseif rest and append(st, rest) then
        -- (kept again, and synced, before the file goes: a process killed between the two writes them
        -- twice, once in the ledger by their keys, never none)
        st.live:sync()
        claim:done()
        now_in = st.path
      elseif rest then
        claim:release()
      else
        claim:done()
      end
      left = left + lines
      if down then
        resil.log.warn("the store did not take the ledger's journal: it is written to it later",
          { journal = now_in, left = lines, error = tostring(down) })
      else
        resil.log.info("a ledger journal was written to the store", { journal = path })
      end
    end
  end
  if st.live then st.live:sync() end
  return left
end

-- Tried from 5 s to once a minute until nothing is left (one task a store at most)
function drain(st)
  local pause = FIRST_PAUSE
  while true do
    resil.sleep(pause)
    local ok, left = pcall(replay, st)
    if not ok then
      resil.log.error("the ledger's journal could not be replayed", { error = tostring(left) })
      left = 1
    end
    if left == 0 then break end
    pause = math.min(pause * 2, MOST_PAUSE)
  end
  st.draining = false
end

-- A store opened (src/lua/store.lua): its journal files, kept by processes that ended, are written
-- to it at once. Its first pass is a task of its own, which the loop waits for (a background one never ran in a
-- program that drives the host with resil_step and resil_call, and a script could end before it):
-- not the opener's (a gateway request whose client left canceled it, and with it the journal for
-- the rest of the process's life; its first request waited minutes for a large file). What the
-- store still refuses is tried again in the background, which a process does not wait for.
-- resil.once waits for that first pass (M.settled): a restarted process's first once of a key must
-- find the record a dead holder kept, not take the key over and run fn, and pay, again.
local first_ended = { __close = function(g) g.st.first_pass = nil end }
function M.opened(backend, key, url)
  local st = state_of(key, url)
  of_backend[backend] = st
  if st.draining or not core.any(folder(), st.prefix) then return end
  st.draining, st.first_pass = true, true
  resil.spawn(function()
    local ok, left
    do
      local _ <close> = setmetatable({ st = st }, first_ended)
      ok, left = pcall(replay, st)
    end
    if ok and left == 0 then st.draining = false else resil.background(drain, st) end
  end)
end

-- resil.once, before it claims a key (src/lua/once.lua): the store's journal's first pass over,
-- or a minute at most
function M.settled(backend)
  local st = of_backend[backend]
  if not (st and st.first_pass) or ending or not (resil.running() and coroutine.isyieldable()) then return end
  local deadline, pause = resil.now() + 60, 0.001
  while st.first_pass and resil.now() < deadline do
    resil.sleep(pause)
    pause = math.min(pause * 2, 0.05)
  end
end

-- A store a command opens to read it only (costs, runs, budgets: src/lua/store.lua): its journal
-- is not written (a report never waits on a write), and its files are said, so that a report
-- read while writes wait there is not taken for the whole ledger
function M.reading(key, url)
  local st = state_of(key, url)
  if core.any(folder(), st.prefix) then
    resil.log.warn("the ledger's journal holds writes not yet in this store, which this report does not " ..
      "count: the next process that opens the store to write writes them", { journal = folder() })
  end
end

-- No task is started after this: what is kept from here on is synced at M.close. A file being
-- replayed as the process ends (a CLI command, a script that ran a second) keeps only what is left
-- of it: its first part was written again by every process that opened the store, and one whose
-- life was shorter than the file's replay never got past it.
function M.ending()
  ending = true
  for _, st in pairs(stores) do
    local r = st.replaying
    st.replaying = nil
    -- (from the line being written: it may have landed, and is once in the ledger by its key)
    local rest = r and r.text:sub(r.at)
    if rest and (rest == "" or append(st, rest:sub(-1) == "\n" and rest or rest .. "\n")) then
      if st.live then st.live:sync() end
      -- (a claim the state's close collected first raises: its file is left whole, written twice,
      -- once in the ledger; the rows lost at exit are still said, costs.lua's caller goes on)
      pcall(r.claim.done, r.claim)
    end
  end
end

-- The files synced and closed (resil_close, the end of the process)
function M.close()
  for _, st in pairs(stores) do
    if st.live then
      pcall(st.live.close, st.live)
      st.live = nil
    end
  end
end

return M
