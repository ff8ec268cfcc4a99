-- Inputs the fuzz targets (fuzz/*_fuzz.c, make fuzz) found to misbehave,
-- as a user of the API would meet them. Each one's bytes are also a seed in
-- fuzz/corpus/<target>/, so make check replays them under the sanitizers.
local resil = require "resil"

describe("provider rate-limit headers with numbers out of range (headers_fuzz)", function()
  before_each(function() resil.clock.virtual() end)
  after_each(function() resil.clock.real() end)

  local n = 0
  local function bucket()
    n = n + 1
    return resil.bucket("fuzz-regression-" .. n, { rate = 10, per = 1, unit = "requests" })
  end

  it("a remaining count of -1e309 (minus infinity) empties the bucket, as 0 would", function()
    local b = bucket()
    b:observe({ ["x-ratelimit-remaining-requests"] = "-1e309" })
    local ok = b:try(1)
    assert.is_falsy(ok)
  end)

  it("a Retry-After of 1e300 seconds pauses the bucket for at most a day", function()
    local b = bucket()
    local paused = b:observe({ ["retry-after"] = "1e300" })
    assert.is_true(paused > 3600 and paused <= 86400)
    assert.is_falsy((b:try(1)))
  end)

  it("a Retry-After of 1e309 (infinity) or nan is not a number of seconds: ignored", function()
    for _, v in ipairs({ "1e309", "nan", "-inf" }) do
      local b = bucket()
      assert.are.equal(0, b:observe({ ["retry-after"] = v }), v)
      assert.is_truthy((b:try(1)), v)
      assert.is_nil(resil.retry_after({ ["retry-after"] = v }), v)
    end
  end)

  it("resil.retry_after says at most a day", function()
    assert.are.equal(86400, resil.retry_after({ ["retry-after"] = "1e300" }))
    assert.are.equal(86400, resil.retry_after({ ["retry-after-ms"] = "1e300" }))
  end)
end)

describe("a response whose first header line is folded (http_fuzz)", function()
  -- libcurl before 8.1.0 (curl/curl#11103) unfolded such a line into the
  -- last header of the handle's previous transfer, already freed: a server
  -- could corrupt the host's memory. Each answer comes from its own server,
  -- so the second request runs on a recycled handle, not a reused connection.
  local function raw_server(bytes)
    return resil.server.listen({ handler = function() return { action = "raw", body = bytes } end })
  end

  it("is read as a response, many times over, without touching the previous one's headers", function()
    for i = 1, 20 do
      local plain = raw_server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nX-Previous: "
        .. ("p"):rep(40 + i) .. "\r\n\r\nok")
      local res = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(plain:port()) })
      plain:close()
      assert.are.equal(200, res.status)
      local folded = raw_server("HTTP/1.1 429 Too Many\r\n\tcontinued: 4\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno")
      local res2, err = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(folded:port()) })
      folded:close()
      if res2 then
        assert.are.equal(429, res2.status)
        assert.are.equal("no", res2.body)
        for name, value in pairs(res2.headers) do
          assert.is_nil(value:find("p", 1, true), name .. " holds the previous response's header")
        end
      else
        assert.are.equal("protocol", err.kind)
      end
    end
  end)
end)

describe("a repeated response header with an empty value (http_fuzz)", function()
  it("adds no empty element to the joined value", function()
    local s = resil.server.listen({ handler = function()
      return { action = "raw", body = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n"
        .. "X-Empty: a\r\nX-Empty:\r\nX-Both:\r\nX-Both:  \r\nX-Late:\r\nX-Late: b\r\nX-List: a\r\nX-List: b\r\n\r\n" }
    end })
    local res = assert(resil.http.request({ url = ("http://127.0.0.1:%d/"):format(s:port()) }))
    s:close()
    assert.are.equal("a", res.headers["x-empty"])
    assert.are.equal("", res.headers["x-both"])
    assert.are.equal("b", res.headers["x-late"])
    assert.are.equal("a, b", res.headers["x-list"])
  end)
end)

describe("a response without a valid status line (http_fuzz)", function()
  it("is a protocol error, not a response with status 0", function()
    local s = resil.server.listen({ handler = function()
      return { action = "raw", body = "HTTP/200\155\7m\r\ndata: a\n\n" }
    end })
    local res, err = resil.http.request({ url = ("http://127.0.0.1:%d/"):format(s:port()) })
    s:close()
    assert.is_nil(res)
    assert.are.equal("protocol", err.kind)
  end)

  -- (found by make check's fuzz smoke, forty-first session: "HTTP/204200" was read as status 4200)
  it("nor one whose status has more than three digits, whole or streamed", function()
    local reply = "HTTP/204200\155\7m\r\ndata: a\":0}'7\n\n\r"
    local s = resil.server.listen({ handler = function() return { action = "raw", body = reply } end })
    local url = ("http://127.0.0.1:%d/"):format(s:port())
    local res, err = resil.http.request({ url = url })
    assert.is_nil(res, res and res.status)
    assert.are.equal("protocol", err.kind)
    local st, serr = resil.http.stream({ url = url })
    if st then
      local ev, rerr = st:read_event()
      st:close()
      assert.is_nil(ev)
      assert.are.equal("protocol", rerr and rerr.kind, "a stream's status " .. tostring(st.status))
    else
      assert.are.equal("protocol", serr.kind)
    end
    s:close()
  end)
end)
