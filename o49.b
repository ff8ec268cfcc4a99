resil-lua: cannot open p.lua: No such file or directory
