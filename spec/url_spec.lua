-- resil.url: what a handler or a store decodes from a URL, by libevent's decoder
local resil = require "resil"

describe("resil.url", function()
  it("unescape: percent-decodes, a % without two hex digits kept, + a space only when asked", function()
    assert.are.equal("a@b/c", resil.url.unescape("a%40b%2Fc"))
    assert.are.equal("100%zz%4", resil.url.unescape("100%zz%4"))
    assert.are.equal("a+b", resil.url.unescape("a+b"))
    assert.are.equal("a b", resil.url.unescape("a+b", true))
    assert.are.equal("x\0y\0zA", resil.url.unescape("x%00y\0z%41")) -- (a NUL decoded, and one written raw)
    assert.are.equal("caf\xC3\xA9", resil.url.unescape("caf%C3%A9"))
  end)

  it("query: each side decoded, a name without = is \"\", the last of a name wins, empty pairs skipped", function()
    assert.are.same({ limit = "3", after_id = "openai/gpt-4o", flag = "", ["a b"] = "c d", e = "" },
      resil.url.query("limit=2&after_id=openai%2Fgpt-4o&flag&&a+b=c+d&limit=3&e="))
    assert.are.same({}, resil.url.query(""))
    assert.are.same({}, resil.url.query(nil))
    assert.are.same({ k = "v=w" }, resil.url.query("k=v=w"))
  end)
end)
