-- The Redis backend (hiredis on libevent): filled in below.
local resil = ...
local R = {}
function R.open(url) return nil, resil.error("store_unavailable", "redis backend not available: " .. url) end
return R
