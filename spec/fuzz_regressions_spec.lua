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
