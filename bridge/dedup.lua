-- The incident state machine: atomic steps on one key's hash.
--
-- KEYS[1]  state hash of the incident key
-- KEYS[2]  set of firing member identities (group_by mode; unused in identity mode)
-- ARGV[1]  operation: decide | decide_many | created | inflight | not_applied | release |
--          settle | recreate
-- ARGV[2]  now (seconds, float)
-- ARGV[3]  token: names the alert occurrence (or action) doing the step
-- ARGV[4]  ttl of the state (seconds)
-- decide:   ARGV[5] status, ARGV[6] severity rank, ARGV[7] update interval, ARGV[8] reopen
--           window, ARGV[9] claim lease, ARGV[10] flap threshold, ARGV[11] flap window,
--           ARGV[12] member identity ("" = identity mode), ARGV[13] content digest of the
--           alert (summary, description, severity), ARGV[14] "1" when the source re-sends
--           snapshots (Alertmanager, Grafana): an unchanged snapshot is not an occurrence
-- decide_many: the decide step for every alert of one message, in order, in one call (one
--           reply per alert, as decide's). KEYS[1] the stats hash (field `alerts` counts the
--           alerts), then per alert its state hash and, in group_by mode, its member set.
--           ARGV[3] unused, ARGV[5..9] update interval, reopen window, claim lease, flap
--           threshold, flap window, ARGV[10] "1" in group_by mode, then per alert: token,
--           status, severity rank, content digest, snapshot flag and, in group_by mode, the
--           member identity
-- created:  ARGV[5] incident id, ARGV[6] display number
-- settle:   ARGV[5] the hold timestamp the settle was scheduled for
-- release:  ARGV[5] "1" to keep a claim whose create may have been applied (held for an
--           operator: `bridge dlq adopt` or `bridge dlq replay`)
--
-- Hash fields (short names keep a tracked key small):
--   ph phase (c creating, o open, r resolved)   gen transition counter
--   tok/dec token and decision of the last transition (makes redelivery idempotent)
--   cl/ca create claim token and time           inf token of a create that may have reached the ITSM
--   id/dn incident id and display number        pid/pdn the previous incident (new-after-window)
--   n/ns occurrences not yet written, since      lu last ITSM update
--   ws/ps severity rank written / peak seen      ra resolved at
--   pr resolve pending while creating           fc/fs flap cycles and window start
--   fl flapping (1)                              hr resolve held while flapping (timestamp)
--   ch content digest last seen               hd claim held after an ambiguous create

local op, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
-- the key being stepped (its state hash, member set, the step's token, the hash's fields);
-- set by load() before every step
local st, members, token, s

local function load(state_key, members_key, step_token)
  st, members, token = state_key, members_key, step_token
  s = {}
  local flat = redis.call('HGETALL', st)
  for i = 1, #flat, 2 do s[flat[i]] = flat[i + 1] end
end

local function num(v, default) return tonumber(v) or default end

-- reply: {decision, gen, id, display, pending_count, pending_since, severity_written,
--         peak_severity, previous_id, previous_display, hold}
local function reply(dec)
  return {dec, num(s.gen, 0), s.id or '', s.dn or '', num(s.n, 0), s.ns or '',
          num(s.ws, 0), num(s.ps, 0), s.pid or '', s.pdn or '', s.hr or ''}
end

local function save(fields)
  local args = {}
  for k, v in pairs(fields) do
    if v == false then
      redis.call('HDEL', st, k)
      s[k] = nil
    else
      s[k] = tostring(v)
      args[#args + 1] = k
      args[#args + 1] = s[k]
    end
  end
  if #args > 0 then redis.call('HSET', st, unpack(args)) end
  redis.call('EXPIRE', st, ttl)
end

-- A transition is a decision that makes the bridge act on the ITSM. It bumps gen (actions
-- carry gen and skip themselves once stale) and remembers the token, so the same alert
-- delivered again (worker killed before the action was queued) yields the same decision.
local function transition(dec, fields)
  fields.gen = num(s.gen, 0) + 1
  fields.tok = token
  fields.dec = dec
  save(fields)
  return reply(dec)
end

-- decide: one alert's step on the loaded key (the state machine of an occurrence)
local function decide(status, sev, interval, window, lease, flap_n, flap_win, member, digest,
                      snapshot)
  if s.tok == token then return reply(s.dec) end

  -- group_by mode: the incident stays firing while any member fires
  local others_firing = false
  if member ~= '' then
    if status == 'firing' then
      redis.call('SADD', members, member)
    elseif status == 'resolved' then
      redis.call('SREM', members, member)
      others_firing = redis.call('SCARD', members) > 0
    end
    redis.call('EXPIRE', members, ttl)
  end

  local ph = s.ph
  if status == 'acknowledged' then
    -- The source says a person is on it; nothing to change in the ITSM.
    if ph then save({}) end
    return reply(ph and 'count_only' or 'ignore_orphan')
  end

  if not ph then
    -- none + firing: claim before create, so no other worker can create too
    if status ~= 'firing' then return reply('ignore_orphan') end
    return transition('create', {ph = 'c', cl = token, ca = now, n = 0, ws = sev, ps = sev,
                                 ch = digest})
  end

  if ph == 'c' then
    if status == 'firing' then
      if now - num(s.ca, now) > lease and not s.hd then
        -- the creator went silent for longer than its lease: take the claim over
        return transition('takeover', {cl = token, ca = now, ps = math.max(num(s.ps, 0), sev)})
      end
      -- never a second create: count it, it is written once the incident exists
      local fields = {n = num(s.n, 0) + 1, ps = math.max(num(s.ps, 0), sev)}
      if not s.ns then fields.ns = now end
      save(fields)
      return reply('wait_for_creator')
    end
    if others_firing then save({}) return reply('count_only') end
    -- resolved while creating: applied by the creator once the incident exists
    save({pr = 1})
    return reply('pending_resolve')
  end

  if ph == 'o' then
    if status == 'firing' then
      if snapshot and s.ch == digest and not s.hr then
        -- the same snapshot again (a repeat interval, an HA peer's copy): nothing changed,
        -- nothing to write, not even a count
        save({})
        return reply('skip_unchanged')
      end
      local n, peak = num(s.n, 0) + 1, math.max(num(s.ps, 0), sev)
      local fields = {n = n, ps = peak, ch = digest}
      if n == 1 then fields.ns = now end
      if s.hr then fields.hr = false end -- a relapse while flapping cancels the held resolve
      local since = s.ns or tostring(now)
      if peak > num(s.ws, 0) then
        -- severity rose: write now, whatever the interval
        local written = num(s.ws, 0)
        fields.lu, fields.n, fields.ns, fields.ws = now, 0, false, peak
        local r = transition('coalesced_update', fields)
        r[5], r[6], r[7] = n, since, written
        return r
      end
      if now - num(s.lu, 0) >= interval then
        -- at most one coalesced update per interval carries the occurrences since the last
        fields.lu, fields.n, fields.ns = now, 0, false
        local r = transition('coalesced_update', fields)
        r[5], r[6] = n, since
        return r
      end
      save(fields)
      return reply('count_only')
    end
    if others_firing then save({}) return reply('count_only') end
    if s.fl == '1' then
      -- flapping: hold the resolve; a settle step applies it if no relapse follows
      if s.hr then return reply('count_only') end
      return transition('hold_resolve', {hr = now})
    end
    return transition('resolve', {ph = 'r', ra = now, n = 0, ns = false})
  end

  if ph == 'r' then
    if status ~= 'firing' then return reply('ignore_duplicate') end
    if now - num(s.ra, 0) <= window then
      local fs, fc = num(s.fs, 0), num(s.fc, 0)
      if now - fs > flap_win then fs, fc = now, 0 end
      fc = fc + 1
      local fields = {ph = 'o', fs = fs, fc = fc, n = 0, ns = false, lu = now,
                      ps = sev, ws = math.max(num(s.ws, 0), sev), ch = digest}
      if fc >= flap_n and s.fl ~= '1' then
        -- many resolve/relapse cycles: reopen once, note it, and stop churning
        fields.fl = 1
        return transition('flapping', fields)
      end
      return transition('reopen', fields)
    end
    -- past the reopen window: a new incident, linked to the previous one
    return transition('new_after_window', {
      ph = 'c', cl = token, ca = now, n = 0, ns = false, ws = sev, ps = sev, ch = digest,
      pid = s.id or false, pdn = s.dn or false, id = false, dn = false,
      fl = false, fc = false, fs = false, hr = false, ra = false, pr = false, lu = false})
  end
  return reply('ignore_orphan')
end

if op == 'decide_many' then
  -- every alert of one message in one call, in order; KEYS[1] is the stats hash whose field
  -- `alerts` counts them
  local interval, window, lease = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local flap_n, flap_win, grouped = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10] == '1'
  local stride, nkeys = grouped and 6 or 5, grouped and 2 or 1
  local count = (#ARGV - 10) / stride
  local out = {}
  for i = 0, count - 1 do
    local a, k = 10 + i * stride, 2 + i * nkeys
    load(KEYS[k], grouped and KEYS[k + 1] or nil, ARGV[a + 1])
    out[i + 1] = decide(ARGV[a + 2], tonumber(ARGV[a + 3]), interval, window, lease, flap_n,
                        flap_win, grouped and ARGV[a + 6] or '', ARGV[a + 4], ARGV[a + 5] == '1')
  end
  redis.call('HINCRBY', KEYS[1], 'alerts', count)
  return out
end

load(KEYS[1], KEYS[2], ARGV[3])

if op == 'decide' then
  return decide(ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
                tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12], ARGV[13],
                ARGV[14] == '1')

elseif op == 'created' then
  -- the create succeeded. Whoever holds the claim now, this incident exists and must be
  -- recorded (the caller holds the key's action lock, so no other create ran meanwhile).
  if s.ph ~= 'c' then return reply('stale') end
  local resolve_now = s.pr == '1'
  save({ph = resolve_now and 'r' or 'o', id = ARGV[5], dn = ARGV[6], cl = false, ca = false,
        inf = false, hd = false, pr = false, lu = now, ra = resolve_now and now or false})
  return reply(resolve_now and 'resolve' or 'open')

elseif op == 'inflight' then
  -- mark a create as possibly applied before sending it; a second attempt must reconcile
  if not s.ph then
    -- the state was lost (Redis flushed or restarted empty) after the decision: this
    -- action re-claims the key rather than dropping the alert
    save({ph = 'c', cl = token, ca = now, inf = token, n = 0})
    return reply('reclaimed')
  end
  if s.ph ~= 'c' or s.cl ~= token then return reply('stale') end
  local earlier = s.inf
  save({inf = token})
  return reply(earlier and 'reconcile' or 'first')

elseif op == 'not_applied' then
  -- the ITSM said for certain the create was not applied (a transient refusal): the next
  -- attempt need not reconcile
  if s.ph == 'c' and s.inf == token then save({inf = false}) end
  return reply('cleared')

elseif op == 'release' then
  -- a create was given up (dead-lettered): forget the claim so the next alert may create,
  -- unless the create may have landed where nobody can look: then the claim is held and
  -- later alerts only count, until an operator adopts the incident or replays the create
  if s.ph == 'c' and s.cl == token then
    if ARGV[5] == '1' and s.inf then
      save({hd = 1})
      return reply('held')
    end
    redis.call('DEL', st, members)
    return {'released', 0, '', '', 0, '', 0, 0, '', '', ''}
  end
  return reply('stale')

elseif op == 'settle' then
  -- the held resolve of a flapping incident is applied if nothing relapsed since
  if s.ph == 'o' and s.hr == ARGV[5] then
    return transition('resolve', {ph = 'r', ra = now, fl = false, fc = false, fs = false,
                                  hr = false, n = 0, ns = false})
  end
  return reply('stale')

elseif op == 'recreate' then
  -- a person closed the incident: the relapse becomes a new incident, linked to the old one
  if s.ph ~= 'o' then return reply('stale') end
  return transition('new_after_window', {
    ph = 'c', cl = token, ca = now, pid = s.id or false, pdn = s.dn or false,
    id = false, dn = false, fl = false, fc = false, fs = false, hr = false, ra = false})
end

return redis.error_reply('unknown operation ' .. tostring(op))
