-- wrk script: replays prepared requests from $POOL_FILE (one per line, tab-separated):
--   method  path  cookie  body  htmx(0/1)  base_step  codes(comma-separated, for base_step, base_step+1, ...)
-- A body may end in code=CODE, where CODE is replaced by the TOTP code of the current 30-second step (only
-- there: a signed CSRF token earlier in the body can contain the letters CODE too; codes were computed by
-- bench/run.py, which knows the seeded secrets). Each wrk thread takes every NTHREADS-th line.
-- A response counts as ok when its status is $EXPECT (and its Location ends with $EXPECT_LOCATION, if set);
-- it counts as an error when status >= 400, a redirect goes back to /login, or a code was refused.
local pool_file = os.getenv("POOL_FILE")
local nthreads = tonumber(os.getenv("NTHREADS") or "1")
local expect = tonumber(os.getenv("EXPECT") or "0")
local expect_location = os.getenv("EXPECT_LOCATION")
local out_file = os.getenv("OUT")

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local function split(line)
  local fields = {}
  for field in (line .. "\t"):gmatch("([^\t]*)\t") do
    table.insert(fields, field)
  end
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
  if #reqs == 0 then  -- fewer lines than threads: share them
    for line in io.lines(pool_file) do
      local f = split(line)
      f.codes = {}
      table.insert(reqs, f)
    end
  end
  idx = 0
  ok, bad, errs, wrapped, s5xx = 0, 0, 0, 0, 0
  first_error = ""
end

function request()
  idx = idx + 1
  if idx > #reqs then
    idx = 1
    wrapped = wrapped + 1
  end
  local f = reqs[idx]
  local body = f[4]
  if f[6] ~= nil and f[6] ~= "" then
    local k = math.floor(os.time() / 30) - tonumber(f[6]) + 1
    local code = f.codes[k] or "000000"
    body = body:gsub("code=CODE$", "code=" .. code)
  end
  local headers = {}
  if f[3] ~= "" then headers["Cookie"] = f[3] end
  if f[5] == "1" then headers["HX-Request"] = "true" end
  if f[1] == "POST" then headers["Content-Type"] = "application/x-www-form-urlencoded" end
  if body == "" then body = nil end
  return wrk.format(f[1], f[2], headers, body)
end

function response(status, headers, body)
  local location = headers["Location"] or headers["location"] or ""
  if status == expect and (expect_location == nil or location:sub(-#expect_location) == expect_location) then
    ok = ok + 1
  else
    bad = bad + 1
  end
  if status >= 500 then s5xx = s5xx + 1 end
  if status >= 400 or location:find("/login$") or location:find("/login%?")
      or (body and body:find("That code is not valid", 1, true)) then
    errs = errs + 1
    if first_error == "" then  -- what the first error looked like, for the report
      local text = (body or ""):gsub("<[^>]*>", " "):gsub("%s+", " "):gsub("[\\\"]", "'")
      first_error = string.format("%d %s %s", status, location, text:sub(1, 300))
    end
  end
end

function done(summary, latency, requests)
  local t_ok, t_bad, t_errs, t_wrapped, t_5xx = 0, 0, 0, 0, 0
  local t_first = ""
  for _, thread in ipairs(threads) do
    if t_first == "" then t_first = thread:get("first_error") or "" end
    t_ok = t_ok + thread:get("ok")
    t_bad = t_bad + thread:get("bad")
    t_errs = t_errs + thread:get("errs")
    t_wrapped = t_wrapped + thread:get("wrapped")
    t_5xx = t_5xx + thread:get("s5xx")
  end
  local e = summary.errors
  local f = io.open(out_file, "w")
  f:write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"ok": %d, "unexpected": %d, "errors": %d, "status_5xx": %d, "pool_wrapped": %d, ' ..
    '"socket_errors": %d, "timeouts": %d, "first_error": "%s"}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, t_ok, t_bad, t_errs, t_5xx, t_wrapped,
    e.connect + e.read + e.write, e.timeout, t_first))
  f:close()
end
