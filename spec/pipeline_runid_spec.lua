-- The run a script without a file checkpoints into (`resil-lua - < x.lua`,
-- `resil-lua -e 'code'`): named by its code, as a file's is by its path.
local helpers = require "spec.helpers"

describe("scripts without a file (stdin, -e)", function()
  it("are runs of their own: another script's steps are not replayed as theirs; the same script resumes", function()
    local db = helpers.tmpname(".db")
    local function piped(result)
      return helpers.run(("%s --store %s --log-level off -"):format(helpers.resil, db),
        ('print(require("resil").step("fetch", function() return %q end))\n'):format(result)).stdout
    end
    local function given(result)
      return helpers.run(("%s --store %s --log-level off -e 'print(require(\"resil\").step(\"fetch\", " ..
        "function() return \"%s\" end))'"):format(helpers.resil, db, result)).stdout
    end
    assert.are.equal("A\n", piped("A"))
    -- (before: "A", script A's paid result, as B's; and C's as D's)
    assert.are.equal("B\n", piped("B"))
    assert.are.equal("C\n", given("C"))
    assert.are.equal("D\n", given("D"))
    -- the same code again is the same run: replayed, as a file run again is
    local r = helpers.run(("%s --store %s --log-level info -"):format(helpers.resil, db),
      'print(require("resil").step("fetch", function() return "B" end))\n')
    assert.are.equal("B\n", r.stdout)
    assert.matches('"msg":"run resumed"', r.stderr)
  end)

  it("from stdin keep their #! line skipped and their line numbers", function()
    local r = helpers.run(helpers.resil .. " - x", "#!/usr/bin/env resil-lua\nprint(arg[1])\nlocal y = = 1\n")
    assert.are.equal(1, r.code)
    assert.matches("stdin:3: unexpected symbol near '='", r.stderr)
    r = helpers.run(helpers.resil .. " - x", "\239\187\191#!/usr/bin/env resil-lua\nprint(arg[1])\n")
    assert.are.equal("x\n", r.stdout, r.stderr)
  end)
end)

describe("an -e run that failed", function()
  it("runs show gives a resume command that works: its code, quoted for the shell, lines and quotes kept", function()
    local db = helpers.tmpname(".db")
    local code = 'local resil = require "resil"\n' ..
      'resil.step("fetch", function() return 1 end)\n' ..
      'print(resil.step("caption", function() assert(os.getenv("FIXED"), "it\'s not fixed") return "ok" end))\n'
    local code_file = helpers.write(helpers.tmpname(".lua"), code)
    local r = helpers.run(('%s --store %s --log-level off -e "$(cat %s)"'):format(helpers.resil, db, code_file))
    assert.are.equal(1, r.code)
    local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db)).stdout
    local id = assert(runs:match("\n(%-e%-%x+)%s+failed"), runs)
    local show = helpers.run(("%s runs show %s --store %s"):format(helpers.resil, id, db)).stdout
    local resume = assert(show:match("\nresume: ([^\n]+)"), show)
    -- (before: "resume: resil-lua --store DB --run -e-... -e", the option without its code)
    assert.matches("^resil%-lua %-%-store ", resume)
    -- run by bash as a user pastes it: the same run, its failed step run again, its first replayed
    local bin = helpers.tmpname("-bin")
    os.execute(("mkdir -p %s && ln -s %s %s/resil-lua"):format(bin, helpers.resil, bin))
    local again = helpers.run(("cd %s && FIXED=1 PATH=%s:$PATH bash -c %s"):format(
      db:match("^(.*)/"), bin, ("'%s --log-level off'"):format(resume:gsub("'", "'\\''"))))
    assert.are.equal("ok\n", again.stdout, again.stderr)
    runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db)).stdout
    assert.matches(id:gsub("%-", "%%-") .. "%s+done%s+2%s", runs)
  end)
end)

describe("-e code with steps, then a script", function()
  it("are two runs: the script's steps are not the -e code's run's", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"),
      'local resil = require "resil"\nprint(resil.step("fetch", function() return "file" end), resil.run.id())\n')
    local r = helpers.run(("%s --store %s --log-level off -e 'local resil = require \"resil\"; " ..
      "print(resil.step(\"fetch\", function() return \"code\" end), resil.run.id())' %s"):format(helpers.resil, db, script))
    assert.are.equal(0, r.code, r.stderr)
    -- (before: "file -e-...": the script's steps went to the -e code's run, still held)
    local code_run, file_run = r.stdout:match("^code\t(%S+)\nfile\t(%S+)\n$")
    assert.matches("^%-e%-%x+$", code_run, nil, false, r.stdout)
    assert.is_truthy(file_run and file_run ~= code_run and not file_run:find("^%-e"), r.stdout)
    local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db)).stdout
    assert.matches(code_run:gsub("%-", "%%-") .. "%s+done%s+1%s", runs)
    assert.matches(file_run:gsub("%-", "%%-") .. "%s+done%s+1%s", runs)
  end)
end)

-- (found in review, helper R: the code went to the store as it was, an API key configured in it
-- too, and runs show, another process that does not know the secret, printed it)
describe("an -e run whose code holds a secret the process knows (an API key it configured)", function()
  it("keeps no copy of the code in the store and gives no resume line; the run is listed", function()
    local db = helpers.tmpname(".db")
    local r = helpers.run(("%s --store %s --log-level off -e '%s'"):format(helpers.resil, db,
      'local ai = require "policies.ai"\nai.configure("openai", { api_key = "sk-live-abcdef1234567890" })\n' ..
      'local resil = require "resil"\nresil.step("a", function() return 1 end)\nerror("stop")'))
    assert.are.equal(1, r.code)
    local runs = helpers.run(("%s runs --store %s"):format(helpers.resil, db)).stdout
    local id = assert(runs:match("\n(%-e%-%x+)%s+failed"), runs)
    local show = helpers.run(("%s runs show %s --store %s"):format(helpers.resil, id, db)).stdout
    assert.is_nil(show:find("abcdef1234567890", 1, true), show)
    assert.is_nil(show:find("\nresume:", 1, true), show)
    assert.is_nil(helpers.slurp(db):find("abcdef1234567890", 1, true))
  end)
end)

describe("the default run id of a script", function()
  it("differs for argument lists that differ, an empty argument too; the same list is the same run", function()
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), 'local resil = require "resil"\n' ..
      'local n = resil.step("count", function() return #arg end)\n' ..
      'print(resil.run.id(), n, resil.run.resumed())\n')
    local function run(args)
      local r = helpers.run(("%s --store %s --log-level off %s %s"):format(helpers.resil, db, script, args))
      assert.are.equal(0, r.code, r.stderr)
      return r.stdout:match("^(%S+)\t(%d+)\t(%a+)\n$")
    end
    local none, n0, resumed0 = run("")
    local empty, n1, resumed1 = run("''")
    -- (before: one id, the second resumed the first's run and was given its step's result: 0)
    assert.are_not.equal(none, empty)
    assert.are.same({ "0", "false" }, { n0, resumed0 })
    assert.are.same({ "1", "false" }, { n1, resumed1 })
    local two = run("'' ''")
    assert.is_truthy(two ~= none and two ~= empty)
    -- the same lists again: the same runs, resumed
    assert.are.same({ none, "0", "true" }, { run("") })
    assert.are.same({ empty, "1", "true" }, { run("''") })
    assert.are.same({ two, "2", "true" }, { run("'' ''") })
    -- the ids of other lists are those earlier versions gave (a run interrupted before an upgrade
    -- resumes after it)
    local resil = require "resil"
    local path = helpers.run("realpath " .. script).stdout:gsub("\n$", "")
    local name = path:match("([^/]+)%.lua$")
    assert.are.equal(name .. "-" .. resil.hash(path .. "\0"):sub(1, 12), none)
    assert.are.equal(name .. "-" .. resil.hash(path .. "\0\0"):sub(1, 12), two)
    assert.are.equal(name .. "-" .. resil.hash(path .. "\0a\0b"):sub(1, 12), run("a b"))
  end)
end)

describe("an empty run id (--run \"$ID\" with ID unset, resil_options.run_id = \"\")", function()
  it("is refused before the script runs, exit status 1, rather than one run every such command shares", function()
    -- (before: accepted; a second job given it replayed the first's step results as its own, its
    -- argument another video: "captions of a.mp4" for b.mp4)
    local db = helpers.tmpname(".db")
    local script = helpers.write(helpers.tmpname(".lua"), [[
print(require("resil").step("caption", function() return "captions of " .. arg[1] end))
]])
    for _, video in ipairs({ "a.mp4", "b.mp4" }) do
      local r = helpers.run(("%s --store %s --run '' --log-level off %s %s"):format(helpers.resil, db, script, video))
      assert.are.equal(1, r.code, r.stdout)
      assert.are.equal("", r.stdout)
      assert.matches("run id is empty", r.stderr, 1, true)
    end
    local r = helpers.run_script('require("resil").store_config({ run = "" })', "--log-level off")
    assert.are.equal(1, r.code)
    assert.matches("run id is empty", r.stderr, 1, true)
  end)
end)
