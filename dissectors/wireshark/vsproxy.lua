-- vsproxy.lua: a Wireshark/tshark post-dissector for vsock captures (LINKTYPE_VSOCK, 271).
--
--   tshark -X lua_script:dissectors/wireshark/vsproxy.lua -r capture.pcapng
--
-- Wireshark's own vsock dissector (epan/dissectors/packet-vsock.c) decodes the af_vsockmon_hdr
-- and the virtio header, but shows SEQPACKET as "Unknown (2)", leaves the flags undecoded and
-- never hands a payload on. This post-dissector runs after it, on frames where it found a
-- vsockmon header, and adds the protocol "vsproxy":
--   vsproxy.type, vsproxy.op        names (STREAM/SEQPACKET, REQUEST/.../RW/...)
--   vsproxy.flags (+ .eom .eor, or .shutdown_rcv .shutdown_send)
--   vsproxy.src, vsproxy.dst         "cid:port"
--   vsproxy.len                      payload length from the virtio header
--   vsproxy.app                      application protocol the payload was handed to
--   vsproxy.verdict, .rewritten, .rule, .real_peer   from vsproxy's pcapng packet comment
-- and hands RW payloads to Wireshark's HTTP, TLS and HTTP/2 dissectors (chosen by the port
-- preference first, then by the first bytes). Each packet is dissected on its own: a message
-- split over several RW packets is not reassembled.
--
-- Every read of the frame is bounded by its captured length, so short, cut or odd frames only
-- get an expert note. Header layout: Linux include/uapi/linux/vsockmon.h (32 bytes), then
-- struct virtio_vsock_hdr (virtio spec 5.10.6, 44 bytes), all little-endian.

local MON_LEN = 32 -- sizeof(struct af_vsockmon_hdr)
local VIRTIO_LEN = 44 -- sizeof(struct virtio_vsock_hdr)
local TRANSPORT_VIRTIO = 2
local MON_OP_PAYLOAD = 4

local TYPES = { [1] = "STREAM", [2] = "SEQPACKET" }
local OPS = {
    [0] = "INVALID", [1] = "REQUEST", [2] = "RESPONSE", [3] = "RST", [4] = "SHUTDOWN",
    [5] = "RW", [6] = "CREDIT_UPDATE", [7] = "CREDIT_REQUEST",
}
local OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 4, 5, 6, 7
local TYPE_SEQPACKET = 2
-- SEQPACKET RW flags (VIRTIO_VSOCK_SEQ_EOM, VIRTIO_VSOCK_SEQ_EOR)
local SEQ_EOM, SEQ_EOR = 1, 2
-- SHUTDOWN flags (VIRTIO_VSOCK_SHUTDOWN_RCV, VIRTIO_VSOCK_SHUTDOWN_SEND)
local SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2

local vsproxy = Proto("vsproxy", "vsproxy vsock inspector")

local pf = {
    type = ProtoField.string("vsproxy.type", "Socket type"),
    op = ProtoField.string("vsproxy.op", "Operation"),
    src = ProtoField.string("vsproxy.src", "Source (cid:port)"),
    dst = ProtoField.string("vsproxy.dst", "Destination (cid:port)"),
    len = ProtoField.uint32("vsproxy.len", "Payload length", base.DEC),
    flags = ProtoField.uint32("vsproxy.flags", "Flags", base.HEX),
    eom = ProtoField.bool("vsproxy.flags.eom", "End of message (EOM)", 32, nil, SEQ_EOM),
    eor = ProtoField.bool("vsproxy.flags.eor", "End of record (EOR)", 32, nil, SEQ_EOR),
    shut_rcv = ProtoField.bool("vsproxy.flags.shutdown_rcv", "Shutdown receive (RCV)", 32, nil, SHUTDOWN_RCV),
    shut_send = ProtoField.bool("vsproxy.flags.shutdown_send", "Shutdown send (SEND)", 32, nil, SHUTDOWN_SEND),
    app = ProtoField.string("vsproxy.app", "Application protocol"),
    verdict = ProtoField.string("vsproxy.verdict", "Verdict"),
    rewritten = ProtoField.bool("vsproxy.rewritten", "Rewritten by vsproxy"),
    rule = ProtoField.string("vsproxy.rule", "Denying rule"),
    real_peer = ProtoField.string("vsproxy.real_peer", "Real peer (cid:port)"),
}
vsproxy.fields = {
    pf.type, pf.op, pf.src, pf.dst, pf.len, pf.flags, pf.eom, pf.eor, pf.shut_rcv, pf.shut_send,
    pf.app, pf.verdict, pf.rewritten, pf.rule, pf.real_peer,
}

local ex_short = ProtoExpert.new("vsproxy.short", "Frame too short for its headers",
    expert.group.MALFORMED, expert.severity.WARN)
local ex_truncated = ProtoExpert.new("vsproxy.truncated", "Payload shorter than the header's len",
    expert.group.MALFORMED, expert.severity.WARN)
local ex_denied = ProtoExpert.new("vsproxy.denied", "Denied by vsproxy",
    expert.group.SECURITY, expert.severity.NOTE)
local ex_spoofed = ProtoExpert.new("vsproxy.spoofed", "Spoofed source, dropped by vsproxy",
    expert.group.SECURITY, expert.severity.WARN)
vsproxy.experts = { ex_short, ex_truncated, ex_denied, ex_spoofed }

vsproxy.prefs.ports = Pref.string("Port to protocol map", "",
    "Comma-separated PORT=DISSECTOR pairs, e.g. 8000=tls,80=http. A payload whose source or "
    .. "destination vsock port is listed goes to that Wireshark dissector; other payloads are "
    .. "recognised by their first bytes (HTTP/1.x, HTTP/2 preface, TLS records).")

-- Present only on frames Wireshark decoded as "Linux vsock"; the values are read from the tvb.
local f_trans = Field.new("vsock.trans")
local f_comment = Field.new("frame.comment")

-- Parsed port preference: port number -> Dissector. Rebuilt when the preference changes.
local port_map = {}

local function lookup_dissector(name)
    local ok, d = pcall(Dissector.get, name)
    if ok then return d end
    return nil
end

local function parse_port_map(text)
    local map = {}
    for item in string.gmatch(text or "", "[^,%s]+") do
        local port, name = string.match(item, "^(%d+)=([%w_%-%.]+)$")
        local d = port and lookup_dissector(name)
        if d then map[tonumber(port)] = { name = name, dissector = d } end
    end
    return map
end

function vsproxy.prefs_changed()
    port_map = parse_port_map(vsproxy.prefs.ports)
end
port_map = parse_port_map(vsproxy.prefs.ports)

local HTTP_METHODS = {
    "GET ", "POST ", "PUT ", "DELETE ", "HEAD ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE ",
}
local H2_PREFACE = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

local builtin = {}
local function builtin_dissector(name)
    if builtin[name] == nil then builtin[name] = lookup_dissector(name) or false end
    return builtin[name] or nil
end

-- The application protocol of a payload by its first bytes, or nil.
local function sniff(payload)
    local n = payload:len()
    local head = payload:raw(0, math.min(n, #H2_PREFACE))
    if head == H2_PREFACE:sub(1, #head) and n >= 4 then return "http2" end
    if head:sub(1, 5) == "HTTP/" then return "http" end
    for _, m in ipairs(HTTP_METHODS) do
        if head:sub(1, #m) == m then return "http" end
    end
    if n >= 5 then
        local ctype, major, minor = head:byte(1), head:byte(2), head:byte(3)
        if ctype >= 0x14 and ctype <= 0x17 and major == 3 and minor <= 4 then return "tls" end
    end
    return nil
end

-- The Nitro Enclaves boot heartbeat: one byte 0xB7 on port 9000, echoed by the parent.
local NITRO_HEARTBEAT_PORT, NITRO_HEARTBEAT_BYTE = 9000, 0xB7

-- name, Dissector for a payload: the port preference first, then the first bytes. The
-- Dissector is nil for protocols Wireshark has no dissector for (the Nitro heartbeat).
local function choose(payload, src_port, dst_port)
    local by_port = port_map[dst_port] or port_map[src_port]
    if by_port then return by_port.name, by_port.dissector end
    if payload:len() == 1 and payload:range(0, 1):uint() == NITRO_HEARTBEAT_BYTE
        and (dst_port == NITRO_HEARTBEAT_PORT or src_port == NITRO_HEARTBEAT_PORT) then
        return "nitro-heartbeat", nil
    end
    local name = sniff(payload)
    if name then return name, builtin_dissector(name) end
    return nil, nil
end

local function le_uint(tvb, off, size)
    return tvb(off, size):le_uint()
end

-- The verdict vsproxy wrote in the packet comment (vsproxy/switch.py, vsock/core.py).
-- "allowed" unless a comment says otherwise, as `vsproxy read` and its filter judge packets.
-- Returns the Info column prefix.
local function add_verdict(tree)
    local verdict = "allowed"
    for _, fi in ipairs({ f_comment() }) do
        local c = tostring(fi.value)
        if c:sub(1, 6) == "denied" then verdict = "denied" end
        if c:sub(1, 7) == "spoofed" then verdict = "spoofed" end
    end
    tree:add(pf.verdict, verdict):set_generated()
    for _, fi in ipairs({ f_comment() }) do
        local c = tostring(fi.value)
        if c:sub(1, 6) == "denied" then
            local rule = c:match("^denied by ([^;]+)")
            if rule then tree:add(pf.rule, rule):set_generated() end
            tree:add_proto_expert_info(ex_denied, c)
        elseif c:sub(1, 7) == "spoofed" then
            tree:add_proto_expert_info(ex_spoofed, c)
        elseif c:sub(1, 9) == "rewritten" then
            tree:add(pf.rewritten, true):set_generated()
            local peer = c:match("real peer (%d+:%d+)")
            if peer then tree:add(pf.real_peer, peer):set_generated() end
        end
    end
    if verdict ~= "allowed" then return "[" .. verdict .. "] " end
    return ""
end

-- Hands the payload to a Wireshark dissector and puts `info` before what it writes in the
-- Info column; returns the protocol name or nil.
local function hand_off(payload, pinfo, root, tree, src_port, dst_port, info)
    local name, d = choose(payload, src_port, dst_port)
    if not name then return nil end
    tree:add(pf.app, name):set_generated()
    if not d then
        pinfo.cols.info:set(info .. " " .. name)
        return name
    end
    -- An empty column first: TLS and HTTP/2 start their text with ", " after existing text.
    pinfo.cols.info:clear()
    -- A malformed payload makes Dissector.call raise; Wireshark has already marked the frame.
    pcall(d.call, d, payload, pinfo, root)
    if tostring(pinfo.cols.info) == "" then
        pinfo.cols.info:set(info)
    else
        pinfo.cols.info:prepend(info .. " ")
    end
    return name
end

-- Plain arithmetic rather than bit32, which Lua 5.3+ builds of Wireshark may lack.
local function has_bit(value, bit)
    return math.floor(value / bit) % 2 == 1
end

local function flag_names(typ, op, flags)
    local names = {}
    if typ == TYPE_SEQPACKET and op == OP_RW then
        if has_bit(flags, SEQ_EOM) then names[#names + 1] = "EOM" end
        if has_bit(flags, SEQ_EOR) then names[#names + 1] = "EOR" end
    elseif op == OP_SHUTDOWN then
        if has_bit(flags, SHUTDOWN_RCV) then names[#names + 1] = "RCV" end
        if has_bit(flags, SHUTDOWN_SEND) then names[#names + 1] = "SEND" end
    end
    return table.concat(names, " ")
end

local function name_of(names, value, kind)
    return names[value] or string.format("unknown %s (%d)", kind, value)
end

-- A frame with the 44-byte virtio header at MON_LEN.
local function dissect_virtio(tvb, pinfo, root, tree)
    local h = MON_LEN
    local src_cid, dst_cid = le_uint(tvb, h, 4), le_uint(tvb, h + 8, 4)
    -- CIDs are 64-bit on the wire but 32-bit in practice (VMADDR_CID_ANY is 0xFFFFFFFF).
    local src_cid_hi, dst_cid_hi = le_uint(tvb, h + 4, 4), le_uint(tvb, h + 12, 4)
    local src_port, dst_port = le_uint(tvb, h + 16, 4), le_uint(tvb, h + 20, 4)
    local len = le_uint(tvb, h + 24, 4)
    local typ, op = le_uint(tvb, h + 28, 2), le_uint(tvb, h + 30, 2)
    local flags = le_uint(tvb, h + 32, 4)
    local buf_alloc, fwd_cnt = le_uint(tvb, h + 36, 4), le_uint(tvb, h + 40, 4)

    local function cid_text(lo, hi)
        if hi == 0 then return tostring(lo) end
        return string.format("0x%08x%08x", hi, lo)
    end
    local src = cid_text(src_cid, src_cid_hi) .. ":" .. src_port
    local dst = cid_text(dst_cid, dst_cid_hi) .. ":" .. dst_port
    local type_name, op_name = name_of(TYPES, typ, "type"), name_of(OPS, op, "op")

    tree:add(pf.src, tvb(h, 8), src)
    tree:add(pf.dst, tvb(h + 8, 8), dst)
    tree:add(pf.type, tvb(h + 28, 2), type_name)
    tree:add(pf.op, tvb(h + 30, 2), op_name)
    local flags_item = tree:add_le(pf.flags, tvb(h + 32, 4))
    if typ == TYPE_SEQPACKET and op == OP_RW then
        flags_item:add_le(pf.eom, tvb(h + 32, 4))
        flags_item:add_le(pf.eor, tvb(h + 32, 4))
    elseif op == OP_SHUTDOWN then
        flags_item:add_le(pf.shut_rcv, tvb(h + 32, 4))
        flags_item:add_le(pf.shut_send, tvb(h + 32, 4))
    end
    local names = flag_names(typ, op, flags)
    if names ~= "" then flags_item:append_text(" (" .. names .. ")") end
    tree:add_le(pf.len, tvb(h + 24, 4))

    local prefix = add_verdict(tree)
    local summary = type_name .. " " .. op_name
    if names ~= "" then summary = summary .. " " .. names end
    tree:append_text(", " .. summary)
    local info = string.format("%s%s → %s %s", prefix, src, dst, summary)
    if op == OP_RW then info = info .. " Len=" .. len end
    if op == OP_CREDIT_UPDATE or op == OP_CREDIT_REQUEST then
        info = string.format("%s buf_alloc=%d fwd_cnt=%d", info, buf_alloc, fwd_cnt)
    end
    pinfo.cols.info:set(info)

    if op ~= OP_RW or len == 0 then return end
    local start = MON_LEN + VIRTIO_LEN
    local have = math.max(tvb:len() - start, 0)
    if have < len then
        tree:add_proto_expert_info(ex_truncated,
            string.format("Payload truncated: the header says %d bytes, the frame has %d", len, have))
        info = info .. " [truncated]"
        pinfo.cols.info:set(info)
    end
    local n = math.min(have, len)
    if n > 0 then hand_off(tvb(start, n):tvb(), pinfo, root, tree, src_port, dst_port, info) end
end

-- A vsockmon frame whose transport is not virtio (e.g. NO_INFO from VMCI or Hyper-V): only
-- the af_vsockmon_hdr is known; a PAYLOAD frame carries the payload after the transport header.
local function dissect_other(tvb, pinfo, root, tree, trans, trans_len)
    local src_port, dst_port = le_uint(tvb, 16, 4), le_uint(tvb, 20, 4)
    local mon_op = le_uint(tvb, 24, 2)
    tree:add(pf.src, tvb(0, 8), le_uint(tvb, 0, 4) .. ":" .. src_port)
    tree:add(pf.dst, tvb(8, 8), le_uint(tvb, 8, 4) .. ":" .. dst_port)
    tree:append_text(string.format(" (transport %d: no virtio header)", trans))
    local prefix = add_verdict(tree)
    if prefix ~= "" then pinfo.cols.info:prepend(prefix) end
    local start = MON_LEN + trans_len
    if mon_op == MON_OP_PAYLOAD and tvb:len() > start then
        hand_off(tvb(start):tvb(), pinfo, root, tree, src_port, dst_port, tostring(pinfo.cols.info))
    end
end

function vsproxy.dissector(tvb, pinfo, root)
    local trans_fi = f_trans()
    -- vsock.trans sits at offset 26 of the frame when the frame itself is a vsockmon frame.
    if not trans_fi or trans_fi.offset ~= 26 then return end
    local tree = root:add(vsproxy, tvb(0, math.min(tvb:len(), MON_LEN + VIRTIO_LEN)))
    if tvb:len() < MON_LEN then
        tree:add_proto_expert_info(ex_short, "Frame shorter than the 32-byte af_vsockmon_hdr")
        return
    end
    local trans, trans_len = le_uint(tvb, 26, 2), le_uint(tvb, 28, 2)
    if trans ~= TRANSPORT_VIRTIO then
        dissect_other(tvb, pinfo, root, tree, trans, trans_len)
        return
    end
    if trans_len ~= VIRTIO_LEN or tvb:len() < MON_LEN + VIRTIO_LEN then
        tree:add_proto_expert_info(ex_short, string.format(
            "Virtio header: the vsockmon header says %d bytes (44 expected), the frame has %d after it",
            trans_len, tvb:len() - MON_LEN))
        return
    end
    dissect_virtio(tvb, pinfo, root, tree)
end

register_postdissector(vsproxy)
