-- Soak variant of pool.lua: columns 1-7 as pool.lua, 8 = kind tag, 9 = X-Forwarded-For value.
-- Writes per-kind status-class counts, latency percentiles and refused valid codes to $OUT.
local pool_file = os.getenv("POOL_FILE")
local nthreads = tonumber(os.getenv("NTHREADS") or "1")
local out_file = os.getenv("OUT")
local KINDS = {"verify", "settings", "login", "qr", "search", "pwok", "pwbad", "codebad"}
local threads, counter = {}, 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local function split(line)
  local fields = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do table.insert(fields, field) end
  return fields
end

function init(args)
  reqs = {}
  local i = 0
  for line in io.lines(pool_file) do
    if i % nthreads == tid then
      local f = split(line)
      local codes = {}
      for c in (f[7] or ""):gmatch("[^,]+") do table.insert(codes, c) end
      f.codes = codes
      table.insert(reqs, f)
    end
    i = i + 1
  end
  idx, wrapped, refused = 0, 0, 0
  for _, k in ipairs(KINDS) do
    for c = 1, 5 do _G["c_" .. k .. "_" .. c] = 0 end
  end
  s_other = ""
  pending = {}
end

function request()
  idx = idx + 1
  if idx > #reqs then idx = 1; wrapped = wrapped + 1 end
  local f = reqs[idx]
  last_kind = f[8]  -- one connection per thread: one request outstanding at a time
  local body = f[4]
  if f[6] ~= nil and f[6] ~= "" then
    local k = math.floor(os.time() / 30) - tonumber(f[6]) + 1
    body = body:gsub("code=CODE$", "code=" .. (f.codes[k] or "000000"))
  end
  local headers = {}
  if f[3] ~= "" then headers["Cookie"] = f[3] end
  if f[5] == "1" then headers["HX-Request"] = "true" end
  if f[9] and f[9] ~= "" then headers["X-Forwarded-For"] = f[9] end
  if f[1] == "POST" then headers["Content-Type"] = "application/x-www-form-urlencoded" end
  if body == "" then body = nil end
  return wrk.format(f[1], f[2], headers, body)
end

function response(status, headers, body)
  local kind = last_kind or "login"
  local cls = math.floor(status / 100)
  if cls < 1 or cls > 5 then cls = 5 end
  local name = "c_" .. kind .. "_" .. cls
  _G[name] = (_G[name] or 0) + 1
  if kind == "verify" then
    local location = headers["Location"] or headers["location"] or ""
    if status ~= 302 or not location:find("/settings") then
      refused = refused + 1
      if s_other == "" then
        local text = (body or ""):gsub("<[^>]*>", " "):gsub("%s+", " "):gsub("[\\\"]", "'")
        s_other = string.format("%d %s %s", status, location, text:sub(1, 200))
      end
    end
  end
end

function done(summary, latency, requests)
  local f = io.open(out_file, "w")
  local e = summary.errors
  f:write(string.format('{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"socket_errors": %d, "timeouts": %d, "status_errors": %d',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write, e.timeout, e.status))
  local t_wrapped, t_refused, t_first = 0, 0, ""
  for _, th in ipairs(threads) do
    t_wrapped = t_wrapped + th:get("wrapped"); t_refused = t_refused + th:get("refused")
    if t_first == "" then t_first = th:get("s_other") or "" end
  end
  f:write(string.format(', "wrapped": %d, "verify_not_signed_in": %d, "first_verify_miss": "%s", "kinds": {',
    t_wrapped, t_refused, t_first))
  for i, k in ipairs(KINDS) do
    f:write(string.format('%s"%s": [', i > 1 and ", " or "", k))
    for c = 1, 5 do
      local n = 0
      for _, th in ipairs(threads) do n = n + (th:get("c_" .. k .. "_" .. c) or 0) end
      f:write(string.format("%s%d", c > 1 and ", " or "", n))
    end
    f:write("]")
  end
  f:write("}}\n")
  f:close()
end
