-- wrk2 hook for benchmarks/latency_open_loop.py: send the realistic request mix, count the answers.
--
--   wrk2 -t1 -c64 -d70s -R5000 -U -s wrk2_mix.lua http://127.0.0.1:PORT -- REQUESTS [LOCATIONS]
--
-- REQUESTS: one request a line, "METHOD<TAB>TARGET<TAB>X-Forwarded-For", written by
-- latency_open_loop.py from benchmarks/traffic_mix.py (the Locust suite's mix: whole
-- pulls, clients at real cloud addresses). Each thread sends them in order, round and
-- round, starting at its own place. Requests are formatted once, in init(): the hot
-- path only hands out a prepared string, so the generator's cost stays close to
-- wrk2's own.
--
-- LOCATIONS (optional): every Location the mix may be answered with, one a line. A
-- 307 whose Location is not among them counts as a wrong answer. wrk2 does not tell
-- which request an answer belongs to (several connections share a thread), so the
-- exact per-request check stays with the Locust suite; this one catches redirects to
-- anything the mix cannot produce. Without the file only statuses are counted.
--
-- done() prints one line, "mix-check: {json}": the 200 and 307 answers (the expected
-- ones), all others, the 307s to a wrong Location, and a few examples of the problems.

local requests, count, next_index = {}, 0, 0
local locations = nil
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  for line in io.lines(args[1]) do
    local method, target, forwarded = line:match("^(%u+)\t(%S+)\t(.+)$")
    if method then
      count = count + 1
      requests[count] = wrk.format(method, target, { ["X-Forwarded-For"] = forwarded })
    end
  end
  assert(count > 0, "no requests in " .. args[1])
  if args[2] then
    locations = {}
    for line in io.lines(args[2]) do locations[line] = true end
  end
  -- Threads start at places far apart, so they do not send the same pull in step.
  next_index = ((id - 1) * 7919) % count
  -- Plain numbers and strings: wrk's thread:get() does not copy tables faithfully.
  answers_200, answers_307, answers_other, wrong_location, examples, example_count = 0, 0, 0, 0, "", 0
end

function request()
  next_index = next_index + 1
  if next_index > count then next_index = 1 end
  return requests[next_index]
end

local function remember(problem)
  if example_count < 5 then
    example_count = example_count + 1
    examples = examples .. problem .. "\n"
  end
end

function response(status, headers, body)
  if status == 307 then
    answers_307 = answers_307 + 1
    if locations and not locations[headers["Location"] or ""] then
      wrong_location = wrong_location + 1
      remember("307 to " .. tostring(headers["Location"]))
    end
  elseif status == 200 then
    answers_200 = answers_200 + 1
  else
    answers_other = answers_other + 1
    remember("status " .. status)
  end
end

local function quoted(text)
  return '"' .. text:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function done(summary, latency, requests_stats)
  local totals = { ["200"] = 0, ["307"] = 0, other = 0, wrong_location = 0 }
  local found = {}
  for _, thread in ipairs(threads) do
    totals["200"] = totals["200"] + thread:get("answers_200")
    totals["307"] = totals["307"] + thread:get("answers_307")
    totals.other = totals.other + thread:get("answers_other")
    totals.wrong_location = totals.wrong_location + thread:get("wrong_location")
    for problem in thread:get("examples"):gmatch("[^\n]+") do
      if #found < 5 then table.insert(found, quoted(problem)) end
    end
  end
  io.write(string.format('mix-check: {"200": %d, "307": %d, "other": %d, "wrong_location": %d, "examples": [%s]}\n',
                         totals["200"], totals["307"], totals.other, totals.wrong_location, table.concat(found, ", ")))
end
