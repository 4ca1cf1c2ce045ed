"""The Triton kernels of block-sparse attention (forward, dQ, dK/dV) and their device helpers; the launchers,
CSR lists and autograd wrapper are in :mod:`longshard.kernels.block_sparse.triton` (see its docstring for the
scheme). Defined only where Triton is installed."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _rows(start, M: tl.constexpr, SHARE: tl.constexpr):
        """Rows of a stacked tile: SHARE heads x M positions from ``start`` -> (head in the set, position)."""
        i = tl.arange(0, SHARE * M)
        return i // M, start + i % M

    @triton.jit
    def _query_program(H, S, GROUP, KV_H, BLOCK: tl.constexpr, SHARE: tl.constexpr, BLOCK_M: tl.constexpr):
        """Where a forward / dQ program works: its query block, first row, batch (64-bit), stacked head set,
        first head, its KV head's first row, and the tile's (head in the set, position) rows."""
        qb = tl.program_id(0) // (BLOCK // BLOCK_M)
        start_m = qb * BLOCK + (tl.program_id(0) % (BLOCK // BLOCK_M)) * BLOCK_M
        bp = tl.program_id(1)  # batch x stacked head set
        HP = H // SHARE
        b = (bp // HP).to(tl.int64)
        hp = bp % HP
        first = hp * SHARE
        kv_row = (b * KV_H + first // GROUP) * S
        local, pos = _rows(start_m, BLOCK_M, SHARE)
        return qb, start_m, b, hp, first, kv_row, local, pos

    @triton.jit
    def _keep_tile(pos_m, offs_n, S, shift, win, sink, dq_doc, dk_doc, sel, kb, HAS_WIN: tl.constexpr,
                   HAS_DOC: tl.constexpr, HAS_SEL: tl.constexpr):
        # causal with query positions ``shift`` ahead of the keys (0: the same frame; >= S: all visible)
        keep = (offs_n[None, :] <= pos_m[:, None] + shift) & (offs_n[None, :] < S) & (pos_m[:, None] < S)
        if HAS_SEL:  # per-row block selection (NSA): the row keeps key block kb only if it selected it
            hit = tl.max((sel == kb).to(tl.int32), 1) > 0
            keep = keep & hit[:, None]
        if HAS_WIN:
            near = (pos_m[:, None] - offs_n[None, :]) < win[:, None]
            keep = keep & ((win[:, None] <= 0) | near | (offs_n[None, :] < sink[:, None]))
        if HAS_DOC:
            keep = keep & (dq_doc[:, None] == dk_doc[None, :])
        return keep

    @triton.jit
    def _row_meta(WIN, SINK, DOC_B, head, pos, m_ok, HAS_WIN: tl.constexpr, HAS_DOC: tl.constexpr):
        """Per-row window, sink and document id (``DOC_B`` = this batch row's document ids)."""
        win = head
        sink = head
        if HAS_WIN:
            win = tl.load(WIN + head)
            sink = tl.load(SINK + head)
        doc = pos
        if HAS_DOC:
            doc = tl.load(DOC_B + pos, mask=m_ok, other=-1)
        return win, sink, doc

    @triton.jit
    def _row_selection(SEL_G, pos, m_ok, N_SEL: tl.constexpr, HAS_SEL: tl.constexpr):
        """(rows, N_SEL) selected key blocks of each row (-1 = none), or a dummy when not selecting;
        ``SEL_G`` = the selections of this (batch, KV group)."""
        sel = pos
        if HAS_SEL:
            sel = tl.load(SEL_G + (pos * N_SEL)[:, None] + tl.arange(0, N_SEL)[None, :], mask=m_ok[:, None],
                          other=-1)
        return sel

    @triton.jit
    def _load_rows(PTR, row_off, offs_d, mask, F32: tl.constexpr):
        x = tl.load(PTR + row_off[:, None] + offs_d[None, :], mask=mask, other=0.0)
        if F32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _load_kv(K_H, V_H, DOC_B, BIAS_H, start, S, D, offs_d, d_ok, BLOCK_N: tl.constexpr, HAS_DOC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, F32: tl.constexpr):
        """BLOCK_N keys from position ``start`` of one KV head (``K_H``/``V_H``/``BIAS_H`` point at its first
        row): (k, v, positions, document ids, per-key logit bias)."""
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = _load_rows(K_H, offs_n * D, offs_d, kv_mask, F32)
        v = _load_rows(V_H, offs_n * D, offs_d, kv_mask, F32)
        dk_doc = offs_n
        if HAS_DOC:
            dk_doc = tl.load(DOC_B + offs_n, mask=n_ok, other=-2)
        kbias = offs_n
        if HAS_BIAS:
            kbias = tl.load(BIAS_H + offs_n, mask=n_ok, other=0.0)
        return k, v, offs_n, dk_doc, kbias

    @triton.jit
    def _logits(q, k, kbias, qk_scale, F32: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Scores in log2 units: q.k * scale (+ the key's bias) times log2(e)."""
        s = _mm(q, tl.trans(k), F32) * qk_scale
        if HAS_BIAS:
            s = s + kbias[None, :] * 1.4426950408889634
        return s

    @triton.jit
    def _query_tile(Q_S, DO_S, LSE_S, DELTA_S, local, pos, S, D, offs_d, d_ok, F32: tl.constexpr):
        """A backward query tile of one head set (pointers at its first row): q, dO, LSE (log2 units),
        delta, the row mask and the (rows, D) load mask."""
        m_ok = pos < S
        row_off = (local * S + pos) * D
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = _load_rows(Q_S, row_off, offs_d, qd_mask, F32)
        do = _load_rows(DO_S, row_off, offs_d, qd_mask, F32)
        lse = tl.load(LSE_S + local * S + pos, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA_S + local * S + pos, mask=m_ok, other=0.0)
        return q, do, lse, delta, m_ok, qd_mask

    @triton.jit
    def _mm(a, b, F32: tl.constexpr):
        if F32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a.to(b.dtype), b)

    # Offsets: each program moves its pointers to its own (batch, head set) or (batch, KV head) with
    # 64-bit scalars, so ((b * H + h) * S + pos) * D may pass 2^31; what is added per row after that
    # stays within one head set (SHARE x S x D elements, 32-bit).

    @triton.jit
    def _bs_fwd(
        Q, K, V, OUT, LSE, IDX, CNT, WIN, SINK, DOCQ, DOCK, SEL, BIAS,
        si_b, si_h, si_q, sc_b, sc_h,
        H, S, D, GROUP, KV_H, Q_SHIFT, qk_scale,
        BLOCK: tl.constexpr, SHARE: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WIN: tl.constexpr,
        HAS_DOC: tl.constexpr, F32: tl.constexpr, N_SEL: tl.constexpr, HAS_SEL: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # one program per BLOCK_M query rows of a query block (x SHARE stacked heads); the kept key
        # blocks of that query block are walked in sub-tiles of BLOCK_N keys
        qb, start_m, b, hp, first, kv_row, local, pos = _query_program(H, S, GROUP, KV_H, BLOCK, SHARE, BLOCK_M)
        head = first + local
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = pos < S
        d_ok = offs_d < D
        row_base = (b * H + first) * S  # 64-bit
        row_off = (local * S + pos) * D
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = _load_rows(Q + row_base * D, row_off, offs_d, qd_mask, F32)
        win, sink, dq_doc = _row_meta(WIN, SINK, DOCQ + b * S, head, pos, m_ok, HAS_WIN, HAS_DOC)
        sel = _row_selection(SEL + kv_row * N_SEL, pos, m_ok, N_SEL, HAS_SEL)
        m_i = tl.full([SHARE * BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([SHARE * BLOCK_M], tl.float32)
        acc = tl.zeros([SHARE * BLOCK_M, BLOCK_D], tl.float32)
        cnt = tl.load(CNT + b * sc_b + hp * sc_h + qb)
        for t in range(0, cnt * (BLOCK // BLOCK_N)):  # kept blocks, each in key sub-tiles of BLOCK_N
            kb = tl.load(IDX + b * si_b + hp * si_h + qb * si_q + t // (BLOCK // BLOCK_N))
            start_n = kb * BLOCK + (t % (BLOCK // BLOCK_N)) * BLOCK_N
            if start_n < start_m + BLOCK_M + Q_SHIFT:  # else every key is after every row (causal)
                k, v, offs_n, dk_doc, kbias = _load_kv(K + kv_row * D, V + kv_row * D, DOCK + b * S, BIAS + kv_row,
                                                       start_n, S, D, offs_d, d_ok, BLOCK_N, HAS_DOC, HAS_BIAS, F32)
                keep = _keep_tile(pos, offs_n, S, Q_SHIFT, win, sink, dq_doc, dk_doc, sel, kb, HAS_WIN, HAS_DOC,
                                  HAS_SEL)
                s = tl.where(keep, _logits(q, k, kbias, qk_scale, F32, HAS_BIAS), float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _mm(p, v, F32)
                m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
        tl.store(OUT + row_base * D + row_off[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=qd_mask)
        tl.store(LSE + row_base + local * S + pos, lse, mask=m_ok)

    @triton.jit
    def _bs_bwd_dq(
        Q, K, V, DO, LSE, DELTA, DQ, IDX, CNT, WIN, SINK, DOCQ, DOCK, SEL, BIAS,
        si_b, si_h, si_q, sc_b, sc_h,
        H, S, D, GROUP, KV_H, Q_SHIFT, qk_scale, scale,
        BLOCK: tl.constexpr, SHARE: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WIN: tl.constexpr,
        HAS_DOC: tl.constexpr, F32: tl.constexpr, N_SEL: tl.constexpr, HAS_SEL: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        qb, start_m, b, hp, first, kv_row, local, pos = _query_program(H, S, GROUP, KV_H, BLOCK, SHARE, BLOCK_M)
        head = first + local
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        row_base = (b * H + first) * S
        q, do, lse, delta, m_ok, qd_mask = _query_tile(Q + row_base * D, DO + row_base * D, LSE + row_base,
                                                       DELTA + row_base, local, pos, S, D, offs_d, d_ok, F32)
        win, sink, dq_doc = _row_meta(WIN, SINK, DOCQ + b * S, head, pos, m_ok, HAS_WIN, HAS_DOC)
        sel = _row_selection(SEL + kv_row * N_SEL, pos, m_ok, N_SEL, HAS_SEL)
        dq = tl.zeros([SHARE * BLOCK_M, BLOCK_D], tl.float32)
        cnt = tl.load(CNT + b * sc_b + hp * sc_h + qb)
        for t in range(0, cnt * (BLOCK // BLOCK_N)):
            kb = tl.load(IDX + b * si_b + hp * si_h + qb * si_q + t // (BLOCK // BLOCK_N))
            start_n = kb * BLOCK + (t % (BLOCK // BLOCK_N)) * BLOCK_N
            if start_n < start_m + BLOCK_M + Q_SHIFT:
                k, v, offs_n, dk_doc, kbias = _load_kv(K + kv_row * D, V + kv_row * D, DOCK + b * S, BIAS + kv_row,
                                                       start_n, S, D, offs_d, d_ok, BLOCK_N, HAS_DOC, HAS_BIAS, F32)
                keep = _keep_tile(pos, offs_n, S, Q_SHIFT, win, sink, dq_doc, dk_doc, sel, kb, HAS_WIN, HAS_DOC,
                                  HAS_SEL)
                p = tl.where(keep, tl.exp2(_logits(q, k, kbias, qk_scale, F32, HAS_BIAS) - lse[:, None]), 0.0)
                ds = p * (_mm(do, tl.trans(v), F32) - delta[:, None])
                dq += _mm(ds, k, F32)
        tl.store(DQ + row_base * D + ((local * S + pos) * D)[:, None] + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)

    @triton.jit
    def _bs_bwd_dkdv(
        Q, K, V, DO, LSE, DELTA, DK, DV, DBIAS, IDXT, CNTT, WIN, SINK, DOCQ, DOCK, SEL, BIAS,
        si_b, si_h, si_k, sc_b, sc_h,
        H, S, D, GROUP, KV_H, N_QB, Q_SHIFT, qk_scale, scale,
        BLOCK: tl.constexpr, SHARE: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WIN: tl.constexpr,
        HAS_DOC: tl.constexpr, F32: tl.constexpr, N_SEL: tl.constexpr, HAS_SEL: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # one program per BLOCK_N keys of a key block (BLOCK // BLOCK_N programs per block); the query
        # blocks that read it are walked in sub-tiles of BLOCK_M rows (x SHARE stacked heads)
        kb = tl.program_id(0) // (BLOCK // BLOCK_N)
        start_n = kb * BLOCK + (tl.program_id(0) % (BLOCK // BLOCK_N)) * BLOCK_N
        bg = tl.program_id(1).to(tl.int64)  # batch x KV head
        b = bg // KV_H
        g = bg % KV_H
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        k, v, offs_n, dk_doc, kbias = _load_kv(K + bg * S * D, V + bg * S * D, DOCK + b * S, BIAS + bg * S, start_n,
                                               S, D, offs_d, d_ok, BLOCK_N, HAS_DOC, HAS_BIAS, F32)
        kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dbias = tl.zeros([BLOCK_N], tl.float32)  # d loss / d bias_j = sum over the rows reading j of dS
        cnt = tl.load(CNTT + b * sc_b + g * sc_h + kb)
        for t in range(0, cnt * (BLOCK // BLOCK_M)):  # (query block, head set) entries, BLOCK_M rows each
            c = tl.load(IDXT + b * si_b + g * si_h + kb * si_k + t // (BLOCK // BLOCK_M))
            first = g * GROUP + (c // N_QB) * SHARE
            row_base = (b * H + first) * S
            start_m = (c % N_QB) * BLOCK + (t % (BLOCK // BLOCK_M)) * BLOCK_M
            if start_m + BLOCK_M + Q_SHIFT > start_n:  # else every row is before every key: nothing to add
                local, pos = _rows(start_m, BLOCK_M, SHARE)
                q, do, lse, delta, m_ok, qd_mask = _query_tile(Q + row_base * D, DO + row_base * D, LSE + row_base,
                                                               DELTA + row_base, local, pos, S, D, offs_d, d_ok,
                                                               F32)
                win, sink, dq_doc = _row_meta(WIN, SINK, DOCQ + b * S, first + local, pos, m_ok, HAS_WIN, HAS_DOC)
                sel = _row_selection(SEL + bg * S * N_SEL, pos, m_ok, N_SEL, HAS_SEL)
                keep = _keep_tile(pos, offs_n, S, Q_SHIFT, win, sink, dq_doc, dk_doc, sel, kb, HAS_WIN, HAS_DOC,
                                  HAS_SEL)
                p = tl.where(keep, tl.exp2(_logits(q, k, kbias, qk_scale, F32, HAS_BIAS) - lse[:, None]), 0.0)
                ds = p * (_mm(do, tl.trans(v), F32) - delta[:, None])
                dv += _mm(tl.trans(p), do, F32)
                dk += _mm(tl.trans(ds), q, F32)
                if HAS_BIAS:
                    dbias += tl.sum(ds, 0)
        tl.store(DK + bg * S * D + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + bg * S * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)
        if HAS_BIAS:
            tl.store(DBIAS + bg * S + offs_n, dbias, mask=offs_n < S)
