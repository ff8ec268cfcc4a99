-- Loaded by busted before every spec file (.busted names it as its helper).
--
-- busted keeps only the last function a test gives `finally`: a test that
-- called a setup helper registering its cleanup (stop the gateway, the mock)
-- and then its own lost the helper's. The cleanup never ran, and what only
-- it referred to could be collected mid-test: a gateway's server closed by
-- its __gc while the test still sent it requests. Here each test's finally
-- keeps every function, and runs them last first (as defers unwind), each
-- even if one before it raised; the first error fails the test.
local busted = require "busted"

busted.subscribe({ "test", "start" }, function(element)
  local register = element.env and element.env.finally
  if not register then return nil, true end
  local cleanups = {}
  element.env.finally = function(fn)
    cleanups[#cleanups + 1] = fn
    if #cleanups > 1 then return end
    register(function()
      local first
      for i = #cleanups, 1, -1 do
        local ok, err = pcall(cleanups[i])
        if not ok and first == nil then first = err end
      end
      if first ~= nil then error(first, 0) end
    end)
  end
  return nil, true -- (the other subscribers, busted's own output among them, go on)
end)
