-- `resil-lua keys` as an operator types it on a bad day: names and lists
-- that make a key other than the one meant, run as the real command.
local helpers = require "spec.helpers"

local function keys(args, db)
  return helpers.run(("%s keys %s --store %s"):format(helpers.resil, args, db))
end

describe("resil-lua keys, hostile arguments", function()
  -- (before: a key could be named key_<12 hex>, another key's id, and `keys revoke` of that id
  -- revoked both: "revoked 2 keys", the key meant and the other one)
  it("a name that has the form of a key's id is refused: a revoke by id revokes that key only", function()
    local db = helpers.tmpname(".db")
    assert.are.equal(0, keys("add --name alpha", db).code)
    local id = keys("list", db).stdout:match("(key_%x+)%s+alpha")
    assert.is_string(id)
    local add = keys("add --name " .. id, db)
    assert.are.equal(1, add.code)
    assert.matches("the form of a key's id", add.stderr, 1, true)
    assert.are.equal(1, keys("add --name KEY_0123456789ab", db).code)
    -- names that only start like one are names
    assert.are.equal(0, keys("add --name key_team", db).code)
    assert.are.equal(0, keys("add --name key_0123456789abc", db).code)
    local rev = keys("revoke " .. id, db)
    assert.are.equal("revoked 1 key\n", rev.stdout)
    local list = keys("list", db).stdout
    assert.matches("key_team%s+active", list)
  end)

  -- (before: `--models "$MODELS"` with MODELS unset made a key that may use no model at all: every
  -- request a 403, `keys list` showing an empty MODELS column)
  it("--models naming no model is refused, not a key that may use none", function()
    local db = helpers.tmpname(".db")
    for _, v in ipairs({ "''", "','", "' , '" }) do
      local add = keys("add --name empty --models " .. v, db)
      assert.are.equal(1, add.code, v)
      assert.matches("%-%-models wants", add.stderr)
    end
    assert.are.equal(0, keys("add --name some --models fast,chat-best", db).code)
    local list = keys("list", db).stdout
    assert.matches("some%s+active.*fast,chat%-best", list)
    assert.is_nil(list:find("empty", 1, true))
  end)

  -- (before: `--models '*'` made a key that may use a model named "*" only, every request refused,
  -- which `keys list` showed as "*", as it shows a key that may use any model)
  it("--models '*' is refused: a key that may use any leaves --models out", function()
    local db = helpers.tmpname(".db")
    for _, v in ipairs({ "'*'", "'fast,*'" }) do
      local add = keys("add --name star --models " .. v, db)
      assert.are.equal(1, add.code, v)
      assert.matches("models: '*' is no model's name: leave models out (--models) for a key that may use any",
        add.stderr, 1, true)
      assert.are.equal("", add.stdout)
    end
    assert.is_nil(keys("list", db).stdout:find("star", 1, true))
  end)

  -- (before: Lua's tonumber read --rpm 0x10 as 16 and 1e3 as 1000: a limit other than the one typed)
  it("--rpm, --tpm and --concurrency take decimal whole numbers only", function()
    local db = helpers.tmpname(".db")
    for _, flag in ipairs({ "--rpm", "--tpm", "--concurrency" }) do
      for _, v in ipairs({ "0x10", "1e3", "16.0", "+5", "0", "-3" }) do
        local add = keys(("add --name n%d %s %s"):format(#v, flag, v), db)
        assert.are.equal(1, add.code, flag .. " " .. v)
        assert.matches(flag .. " wants a positive whole number, not '" .. v .. "'", add.stderr, 1, true)
      end
    end
    assert.are.equal("", keys("list", db).stdout:match("\n(.*)") or "")
    assert.are.equal(0, keys("add --name ok --rpm 600 --tpm 200000 --concurrency 4", db).code)
    assert.matches("ok%s+active%s+%-%s+600%s+200000%s+4", keys("list", db).stdout)
  end)

  -- (before: any length was taken: a name of 100 kB made a key, and every list of keys, the
  -- record the gateway reads and each add rewrites, carried it)
  it("a name longer than 64 characters is refused, saying how long it is", function()
    local db = helpers.tmpname(".db")
    assert.are.equal(0, keys("add --name first", db).code)
    for _, n in ipairs({ 65, 100000 }) do
      local add = keys("add --name " .. ("n"):rep(n), db)
      assert.are.equal(1, add.code, n)
      assert.are.equal(("resil-lua: keys: --name is %d characters long: a key's name is at most 64\n"):format(n),
        add.stderr)
    end
    assert.is_nil(keys("list", db).stdout:find("nn", 1, true))
    assert.are.equal(0, keys("add --name " .. ("n"):rep(64), db).code)
    assert.matches(("n"):rep(64) .. "%s+active", keys("list", db).stdout)
    local ok, err = pcall(require("resil.keys").add, { name = ("n"):rep(65) })
    assert.is_false(ok)
    assert.matches("name must be at most 64 characters, not 65", err)
  end)
end)
