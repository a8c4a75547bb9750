-- One script that makes every check before its first write, so an event is
-- stored whole or not at all, and published once stored. Ids order all the
-- events of the app: each is after the newest the app issued (the "last"
-- key) and the newest of the channel's stream, which may be ahead if a key
-- was lost or Redis's clock stepped back. Streams are trimmed with XDEL, not
-- MAXLEN, because then Redis keeps the newest id it removed in the stream
-- itself (max-deleted-entry-id), where replay finds it. An id the app gave
-- is kept in the entry, and in a hash of the channel for replay to find it,
-- as long as the entry is in history.
local function newest(key)
  local entry = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  return entry and entry[1] or '0-0'
end
local function before(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if am ~= bm then return #am < #bm or (#am == #bm and am < bm) end
  return #as < #bs or (#as == #bs and as < bs)
end
local time = redis.call('TIME')
local id = time[1] .. string.format('%03d', math.floor(time[2] / 1000)) .. '-0'
local base = redis.call('GET', KEYS[2]) or '0-0'
local channel = newest(KEYS[1])
if before(base, channel) then base = channel end
if not before(base, id) then
  local ms, seq = string.match(base, '(%d+)-(%d+)')
  id = ms .. '-' .. (tonumber(seq) + 1)
end
local given, fields = ARGV[4], {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
if given ~= '' then fields[#fields + 1] = 'i'; fields[#fields + 1] = given end
redis.call('XADD', KEYS[1], id, unpack(fields))
local over = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if over > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', over)) do
    redis.call('XDEL', KEYS[1], entry[1])
    local f = entry[2]
    for j = 1, #f - 1, 2 do
      -- The app's id leaves with its entry, unless a later one took it.
      if f[j] == 'i' and redis.call('HGET', KEYS[4], f[j + 1]) == entry[1] then
        redis.call('HDEL', KEYS[4], f[j + 1])
      end
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if given ~= '' then
  redis.call('HSET', KEYS[4], given, id)
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
redis.call('SET', KEYS[2], id)
redis.call('SET', KEYS[3], id, 'NX')
local published = {o = id}
for j = 1, #fields - 1, 2 do published[fields[j]] = fields[j + 1] end
redis.call('PUBLISH', ARGV[1], cjson.encode(published))
return id
