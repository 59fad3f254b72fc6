"""Compiled one-pass encode and decode of ``alloc{bytes}`` (used when ``embcomp._jit`` is on).

The numpy path of :class:`~embcomp.quantizers.AllocQuantizer` makes a dozen passes
over a block (gather the scalar columns, look their levels up, one batched product and
argmin per shape of k-means group, the norm code, then the bit packing); these kernels
do one row at a time, all of it, and write the packed bytes straight into the output.

Bit-identical to the numpy path, by construction:

- scalar codes repeat :class:`~embcomp.quantizers._levels.LevelIndex` (lloyd and float
  levels) or the uniform rounding operation by operation, in float32;
- k-means groups: the score of centroid ``k`` is ``|c_k|^2 + sum_j x_j (-2 c_jk)``
  accumulated in ``j`` order by fused multiply-adds (:func:`~embcomp._jit.fma32`, one
  float32 rounding per step), and the lowest index wins ties. The numpy
  path gets its argmin from a BLAS product, whose summation order is its own, and
  recomputes these exact scores wherever the BLAS scores leave two centroids within
  their rounding error of each other (see ``_Batch.encode``);
- sums over a row (the norm code's squared norms) follow numpy's pairwise summation
  (:func:`pairwise_sum`), which ``ndarray.sum(axis=1)`` uses for float32 rows.

``tests/test_alloc.py`` runs its checks on both paths and compares their bytes.
"""

from __future__ import annotations

import numpy as np

from .._jit import fma32, inline_kernel, kernel, prefer_wide_vectors

_U = np.uint32
_EXP = np.uint32(0x7F800000)  # exponent bits of float32: all set means inf or NaN
_ROUNDER = np.float32(2.0**23)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@inline_kernel
def _leaf_sum(a, lo, n):  # type: ignore[no-untyped-def]
    """numpy's pairwise summation of ``a[lo:lo + n]`` for ``n <= 128`` (see below)."""
    if n < 8:
        res = _ZERO
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    end = n - n % 8
    while i < end:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@inline_kernel
def pairwise_sum(a, lo, n, stack, values):  # type: ignore[no-untyped-def]
    """float32 sum of ``a[lo:lo + n]`` in the order of numpy's ``pairwise_sum``.

    numpy (``loops_utils.h``): below 8 values a plain loop; up to 128, eight running
    sums over strides of 8, combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)), then the
    rest one by one; above 128, the sums of the two halves (the first a multiple of 8
    long), computed the same way, added. The recursion runs on an explicit stack
    (numba cannot cache recursive functions): ``stack`` int64 (2, >= 128) and
    ``values`` float32 (>= 64) are scratch.
    """
    if n <= 128:
        return _leaf_sum(a, lo, n)
    top = 0
    stack[0, 0] = lo
    stack[1, 0] = n
    depth = 0
    while top >= 0:
        first = stack[0, top]
        count = stack[1, top]
        top -= 1
        if count < 0:  # both halves done: add them, left + right
            depth -= 1
            values[depth - 1] = values[depth - 1] + values[depth]
        elif count <= 128:
            values[depth] = _leaf_sum(a, first, count)
            depth += 1
        else:
            half = count // 2
            half -= half % 8
            stack[0, top + 1] = 0
            stack[1, top + 1] = -1
            stack[0, top + 2] = first + half
            stack[1, top + 2] = count - half
            stack[0, top + 3] = first
            stack[1, top + 3] = half
            top += 3
    return values[0]


@kernel
def row_sums(A):  # type: ignore[no-untyped-def]
    """``A.sum(axis=1)`` of a C-contiguous float32 (n, m) array, by :func:`pairwise_sum`."""
    n, m = A.shape
    out = np.empty(n, dtype=np.float32)
    flat = A.ravel()
    stack = np.empty((2, 128), dtype=np.int64)
    values = np.empty(64, dtype=np.float32)
    for i in range(n):
        out[i] = _ZERO + pairwise_sum(flat, i * m, m, stack, values)
    return out


_I32 = np.int32
_F32 = np.float32
_LOW31 = np.int32(0x7FFFFFFF)
_SIGN = np.int32(31)
# Rows per pass of encode_alloc: each k-means unit scores a chunk of rows in one call.
_CHUNK = 64


@kernel
def _key(bits):  # type: ignore[no-untyped-def]
    """int32 whose order is that of the float32 with these int32 ``bits`` (not NaN;
    -0.0 just below +0.0): all bits but the sign flipped for negative floats. Applied
    to a key, it gives back the bits.

    Every step is cast back to int32: numba widens integer arithmetic to int64, and
    the casts let LLVM narrow it again, so loops over keys run eight floats wide.
    """
    return _I32(bits ^ _I32(_I32(bits >> _SIGN) & _LOW31))


@inline_kernel
def _keep4(out, c, s0, s1, s2, s3, b0, b1, b2, b3):  # type: ignore[no-untyped-def]
    """Store the four rows' scores of centroid ``c`` and fold their keys into the minimums."""
    out[0, c] = s0
    out[1, c] = s1
    out[2, c] = s2
    out[3, c] = s3
    return (
        _I32(min(b0, _key(np.float32(s0).view(np.int32)))),
        _I32(min(b1, _key(np.float32(s1).view(np.int32)))),
        _I32(min(b2, _key(np.float32(s2).view(np.int32)))),
        _I32(min(b3, _key(np.float32(s3).view(np.int32)))),
    )


@inline_kernel
def _last4(base, w, A, j, step, out, k, x0, x1, x2, x3):  # type: ignore[no-untyped-def]
    """The last pass of :func:`_nearest_rows`: ``out[r] = base[w * r] + step`` (1 to 4)
    products of row ``r``'s values ``xr = (xr0, xr1, xr2, xr3)``; returns each row's
    lowest-score key. Inlined at two call sites, one per ``base`` (|c|^2 shared by the
    rows, ``w = 0``, or the rows' own scores in ``out``, ``w = 1``), so each loop reads
    one known array and vectorizes."""
    # (float32 already in compiled callers; the casts serve the pure-Python reference)
    x00, x01, x02, x03 = _F32(x0[0]), _F32(x0[1]), _F32(x0[2]), _F32(x0[3])
    x10, x11, x12, x13 = _F32(x1[0]), _F32(x1[1]), _F32(x1[2]), _F32(x1[3])
    x20, x21, x22, x23 = _F32(x2[0]), _F32(x2[1]), _F32(x2[2]), _F32(x2[3])
    x30, x31, x32, x33 = _F32(x3[0]), _F32(x3[1]), _F32(x3[2]), _F32(x3[3])
    b0 = b1 = b2 = b3 = _LOW31
    if step == 1:
        for c in range(k):
            a0 = A[j, c]
            s0 = fma32(x00, a0, base[0, c])
            s1 = fma32(x10, a0, base[w, c])
            s2 = fma32(x20, a0, base[2 * w, c])
            s3 = fma32(x30, a0, base[3 * w, c])
            b0, b1, b2, b3 = _keep4(out, c, s0, s1, s2, s3, b0, b1, b2, b3)
    elif step == 2:
        for c in range(k):
            a0, a1 = A[j, c], A[j + 1, c]
            s0 = fma32(x01, a1, fma32(x00, a0, base[0, c]))
            s1 = fma32(x11, a1, fma32(x10, a0, base[w, c]))
            s2 = fma32(x21, a1, fma32(x20, a0, base[2 * w, c]))
            s3 = fma32(x31, a1, fma32(x30, a0, base[3 * w, c]))
            b0, b1, b2, b3 = _keep4(out, c, s0, s1, s2, s3, b0, b1, b2, b3)
    elif step == 3:
        for c in range(k):
            a0, a1, a2 = A[j, c], A[j + 1, c], A[j + 2, c]
            s0 = fma32(x02, a2, fma32(x01, a1, fma32(x00, a0, base[0, c])))
            s1 = fma32(x12, a2, fma32(x11, a1, fma32(x10, a0, base[w, c])))
            s2 = fma32(x22, a2, fma32(x21, a1, fma32(x20, a0, base[2 * w, c])))
            s3 = fma32(x32, a2, fma32(x31, a1, fma32(x30, a0, base[3 * w, c])))
            b0, b1, b2, b3 = _keep4(out, c, s0, s1, s2, s3, b0, b1, b2, b3)
    else:
        for c in range(k):
            a0, a1, a2, a3 = A[j, c], A[j + 1, c], A[j + 2, c], A[j + 3, c]
            s0 = fma32(x01, a1, fma32(x00, a0, base[0, c]))
            s1 = fma32(x11, a1, fma32(x10, a0, base[w, c]))
            s2 = fma32(x21, a1, fma32(x20, a0, base[2 * w, c]))
            s3 = fma32(x31, a1, fma32(x30, a0, base[3 * w, c]))
            s0 = fma32(x03, a3, fma32(x02, a2, s0))
            s1 = fma32(x13, a3, fma32(x12, a2, s1))
            s2 = fma32(x23, a3, fma32(x22, a2, s2))
            s3 = fma32(x33, a3, fma32(x32, a2, s3))
            b0, b1, b2, b3 = _keep4(out, c, s0, s1, s2, s3, b0, b1, b2, b3)
    return b0, b1, b2, b3


@inline_kernel
def _first_lowest(out, r, best, k):  # type: ignore[no-untyped-def]
    """Index of the first score in ``out[r, :k]`` equal to the one whose key is ``best``
    (-0.0 equals +0.0, as for np.argmin)."""
    lowest = np.int32(_key(best)).view(np.float32)
    label = _I32(k)
    for c in range(k):
        label = _I32(min(label, _I32(c) if out[r, c] == lowest else _I32(k)))
    return label


@inline_kernel
def _values4(X, i0, i1, i2, i3, cols, at, step):  # type: ignore[no-untyped-def]
    """Values of columns ``cols[at : at + step]`` (step 1 to 4; the last one repeated
    to fill four) of rows i0..i3, as four 4-tuples."""
    c0 = cols[at]
    c1 = cols[at + min(1, step - 1)]
    c2 = cols[at + min(2, step - 1)]
    c3 = cols[at + min(3, step - 1)]
    return (
        (X[i0, c0], X[i0, c1], X[i0, c2], X[i0, c3]),
        (X[i1, c0], X[i1, c1], X[i1, c2], X[i1, c3]),
        (X[i2, c0], X[i2, c1], X[i2, c2], X[i2, c3]),
        (X[i3, c0], X[i3, c1], X[i3, c2], X[i3, c3]),
    )


@kernel
def _nearest_rows(  # type: ignore[no-untyped-def]
    X, start, rows, tops, safe_bits, cols, first, g, augmented, book, k, out, picked, codes, field
):
    """``codes[r, field]`` = index of the lowest score (the first of equal ones, as
    np.argmin) for rows ``i = start + r`` of X whose ``tops[r]`` (largest |value|, as
    float32 bits) is below ``safe_bits``; scores accumulated in j order by fused
    multiply-adds: ``|c|^2 + sum_j X[i, cols[first + j]] * (-2 c_j)`` for the ``k``
    centroids whose ``augmented[book:]`` holds ``g + 1`` rows of ``k``: ``-2 c_j`` for
    each j, then ``|c|^2``. Below ``safe_bits`` no score can overflow, so none is NaN.

    Four rows at a time: each load of a centroid's weights serves four rows'
    multiply-adds (20-25% faster than a row at a time on the k-means units of
    ``pca,alloc192``, same scores bit for bit). Up to four products join each pass over
    the centroids, keeping each row's order: fma(x3, a3, fma(x2, a2, fma(x1, a1, fma(x0,
    a0, s)))). The last pass also takes the minimum of the scores' int32 ``_key``; one
    more pass finds the first score equal to it. Both are integer minimums, which
    vectorize (a float minimum would need fast-math). One call covers many rows: a call
    per row and unit cost as much as scoring 256 centroids. The loops are bound by
    float throughput: 512-bit vectors where the CPU has them.

    ``out``: float32 (4, k) scratch, the four rows' scores; ``picked``: int64 (rows,)
    scratch, the rows below ``safe_bits``. A last group of fewer than four repeats its
    last row.
    """
    prefer_wide_vectors()
    A = augmented[book : book + (g + 1) * k].reshape((g + 1, k))
    m = 0
    for r in range(rows):
        if tops[r] < safe_bits:
            picked[m] = r
            m += 1
    for b in range(0, m, 4):
        r0 = picked[b]
        r1 = picked[min(b + 1, m - 1)]
        r2 = picked[min(b + 2, m - 1)]
        r3 = picked[min(b + 3, m - 1)]
        i0, i1, i2, i3 = start + r0, start + r1, start + r2, start + r3
        j = 0
        if g > 4:  # scores start at |c|^2, then four products a pass
            for c in range(k):
                v = A[g, c]
                out[0, c] = v
                out[1, c] = v
                out[2, c] = v
                out[3, c] = v
        while g - j > 4:
            x0, x1, x2, x3 = _values4(X, i0, i1, i2, i3, cols, first + j, 4)
            x00, x01, x02, x03 = x0
            x10, x11, x12, x13 = x1
            x20, x21, x22, x23 = x2
            x30, x31, x32, x33 = x3
            for c in range(k):
                a0, a1, a2, a3 = A[j, c], A[j + 1, c], A[j + 2, c], A[j + 3, c]
                s = fma32(x01, a1, fma32(x00, a0, out[0, c]))
                out[0, c] = fma32(x03, a3, fma32(x02, a2, s))
                s = fma32(x11, a1, fma32(x10, a0, out[1, c]))
                out[1, c] = fma32(x13, a3, fma32(x12, a2, s))
                s = fma32(x21, a1, fma32(x20, a0, out[2, c]))
                out[2, c] = fma32(x23, a3, fma32(x22, a2, s))
                s = fma32(x31, a1, fma32(x30, a0, out[3, c]))
                out[3, c] = fma32(x33, a3, fma32(x32, a2, s))
            j += 4
        step = g - j  # 1 to 4
        x0, x1, x2, x3 = _values4(X, i0, i1, i2, i3, cols, first + j, step)
        if j:
            b0, b1, b2, b3 = _last4(out, 1, A, j, step, out, k, x0, x1, x2, x3)
        else:
            b0, b1, b2, b3 = _last4(A[g : g + 1], 0, A, j, step, out, k, x0, x1, x2, x3)
        codes[r0, field] = _first_lowest(out, 0, b0, k)
        codes[r1, field] = _first_lowest(out, 1, b1, k)
        codes[r2, field] = _first_lowest(out, 2, b2, k)
        codes[r3, field] = _first_lowest(out, 3, b3, k)


@kernel
def _nearest_checked(X, i, cols, first, g, augmented, book, k, out):  # type: ignore[no-untyped-def]
    """:func:`_nearest_rows` for one row, one product at a time, keeping the scores,
    with np.argmin's answer for NaN scores (the first NaN): for rows whose values could
    overflow."""
    A = augmented[book : book + (g + 1) * k].reshape((g + 1, k))
    for c in range(k):
        out[c] = A[g, c]
    for j in range(g):
        xj = X[i, cols[first + j]]
        for c in range(k):
            out[c] = fma32(xj, A[j, c], out[c])
    label = 0
    for c in range(k):
        if out[c] != out[c]:
            return c
        if out[c] < out[label]:
            label = c
    return label


@kernel
def encode_alloc(  # type: ignore[no-untyped-def]
    X,
    out,
    n_fields,
    s_col,
    s_field,
    uniform,
    lx_start,
    lx_inv_width,
    lx_top,
    lx_offset,
    lx_table,
    lx_thresholds,
    lx_row,
    lx_steps,
    u_low,
    u_inv_step,
    u_top,
    v_field,
    v_size,
    v_col_start,
    v_cols,
    v_book,
    v_k,
    augmented,
    safe,
    deviation,
    v_dev,
    batch_start,
    norm_bits,
    mean,
    scalar_sq,
    norm_thresholds,
    pack_field,
    pack_width,
):
    """Encode rows of X (n, d) float32 into ``out`` (n, budget) uint8; all finite?

    Unit ``codes`` per row: scalar unit ``s`` -> field ``s_field[s]`` from column
    ``s_col[s]``; k-means unit ``v`` -> field ``v_field[v]`` from the ``v_size[v]``
    columns ``v_cols[v_col_start[v]:]`` and its augmented codebook
    ``augmented[v_book[v]:]`` (``v_size + 1`` rows of ``v_k[v]``: ``-2 c^T`` then
    ``|c|^2``; rows whose largest value reaches ``safe`` take the slow path that
    allows for overflow) and ``|c_k - mean|^2`` at ``deviation[v_dev[v]:]``; consecutive k-means
    units ``batch_start[b]:batch_start[b + 1]`` form batch ``b`` of the numpy path, whose
    sums the norm code repeats. The norm code is field ``n_fields - 1``. Fields are packed in
    ``pack_field`` order with widths ``pack_width``, least significant bit first.
    """
    n, d = X.shape
    n_scalar = s_col.shape[0]
    n_vector = v_field.shape[0]
    k_max = 1
    for v in range(n_vector):
        k_max = max(k_max, v_k[v])
    scores = np.empty(k_max, dtype=np.float32)
    scores4 = np.empty((4, k_max), dtype=np.float32)
    picked = np.empty(_CHUNK, dtype=np.int64)
    codes = np.zeros((_CHUNK, n_fields), dtype=np.uint32)
    tops = np.zeros(_CHUNK, dtype=np.uint32)
    squares = np.empty(max(d, 1), dtype=np.float32)
    parts = np.empty(max(n_scalar, 1), dtype=np.float32)
    group = np.empty(max(n_vector, 1), dtype=np.float32)
    stack = np.empty((2, 128), dtype=np.int64)
    values = np.empty(64, dtype=np.float32)
    bad = _U(0)
    safe_bits = np.float32(safe).view(np.uint32)
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        for r in range(rows):
            i = start + r
            # The largest |value| of the row, as bits (their order is the values'
            # order): inf or NaN if it reaches the exponent mask.
            top = _U(0)
            for j in range(d):
                top = _U(max(top, _U(np.float32(X[i, j]).view(np.uint32) & _U(0x7FFFFFFF))))
            tops[r] = top
            if top >= _EXP:  # the caller raises; codes of NaN would index out of bounds
                bad = _U(1)
                continue
            # -- scalar units
            for s in range(n_scalar):
                x = X[i, s_col[s]]
                if uniform:
                    y = (x - u_low[s]) * u_inv_step[s]
                    y = min(max(y, _ZERO), u_top[s])
                    codes[r, s_field[s]] = np.float32(y + _ROUNDER).view(np.uint32) & _U(0xFF)
                else:
                    p = np.floor((x - lx_start[s]) * lx_inv_width[s])
                    p = min(max(p, _ZERO), lx_top[s])
                    c = np.int64(lx_table[np.int64(np.int32(p)) + lx_offset[s]])
                    # Boundaries are sorted, with +inf after the last: the first one
                    # above x ends the count. The first step adds its comparison
                    # without a branch: that branch, taken about half the time at
                    # random, made this part 2.5x slower. Most cells hold one boundary
                    # or none (lx_steps 1); one column whose boundaries crowd into a
                    # cell sets lx_steps for all, and the loop takes the rest.
                    c += np.int64(x >= lx_thresholds[c + lx_row[s]])
                    for _ in range(lx_steps - 1):
                        if x < lx_thresholds[c + lx_row[s]]:
                            break
                        c += 1
                    codes[r, s_field[s]] = c
        # -- k-means units, each over the whole chunk (rows with large values: the
        # careful path, one by one)
        for v in range(n_vector):
            g = v_size[v]
            k = v_k[v]
            book = v_book[v]
            first = v_col_start[v]
            field = v_field[v]
            _nearest_rows(
                X,
                start,
                rows,
                tops,
                safe_bits,
                v_cols,
                first,
                g,
                augmented,
                book,
                k,
                scores4,
                picked,
                codes,
                field,
            )
            for r in range(rows):
                if safe_bits <= tops[r] < _EXP:
                    codes[r, field] = _nearest_checked(
                        X, start + r, v_cols, first, g, augmented, book, k, scores
                    )
        for r in range(rows):
            i = start + r
            if tops[r] >= _EXP:
                for b in range(out.shape[1]):
                    out[i, b] = 0
                continue
            # -- norm code: |x - mean| / |reconstruction - mean|
            if norm_bits:
                for j in range(d):
                    centred = X[i, j] - mean[j]
                    squares[j] = centred * centred
                true = _ZERO + pairwise_sum(squares, 0, d, stack, values)
                coded = _ZERO
                if n_scalar:
                    for s in range(n_scalar):
                        parts[s] = scalar_sq[s, codes[r, s_field[s]]]
                    coded += pairwise_sum(parts, 0, n_scalar, stack, values)
                for b in range(batch_start.shape[0] - 1):
                    first = batch_start[b]
                    size = batch_start[b + 1] - first
                    if size < 8:  # pairwise_sum's plain loop, inline: a call costs more
                        part = _ZERO
                        for v in range(first, first + size):
                            part += deviation[v_dev[v] + codes[r, v_field[v]]]
                        coded += part
                        continue
                    for t in range(size):
                        v = first + t
                        group[t] = deviation[v_dev[v] + codes[r, v_field[v]]]
                    coded += pairwise_sum(group, 0, size, stack, values)
                ratio = _ONE
                if coded > _ZERO:
                    ratio = np.sqrt(np.float32(true / coded))
                code = 0
                if ratio != ratio:  # NaN (from overflow): last, as np.searchsorted puts it
                    code = norm_thresholds.shape[0]
                while code < norm_thresholds.shape[0] and norm_thresholds[code] < ratio:
                    code += 1
                codes[r, n_fields - 1] = code
            # -- bit packing
            buffer = np.uint64(0)
            filled = 0
            position = 0
            for f in range(pack_field.shape[0]):
                width = pack_width[f]
                value = np.uint64(codes[r, pack_field[f]]) & np.uint64((1 << width) - 1)
                buffer |= value << np.uint64(filled)
                filled += width
                while filled >= 8:
                    out[i, position] = np.uint8(buffer & np.uint64(0xFF))
                    buffer >>= np.uint64(8)
                    filled -= 8
                    position += 1
            if filled > 0:
                out[i, position] = np.uint8(buffer & np.uint64(0xFF))
    return bad == 0


@kernel
def decode_alloc(  # type: ignore[no-untyped-def]
    packed,
    out,
    n_fields,
    s_col,
    s_field,
    s_table,
    v_field,
    v_size,
    v_col_start,
    v_cols,
    centroids,
    v_centroid,
    norm_bits,
    mean,
    norm_levels,
    pack_field,
    pack_width,
):
    """Decode ``packed`` (n, budget) uint8 into ``out`` (n, d) float32 (see encode_alloc)."""
    n, d = out.shape
    codes = np.zeros(n_fields, dtype=np.uint32)
    for i in range(n):
        buffer = np.uint64(0)
        filled = 0
        position = 0
        for f in range(pack_field.shape[0]):
            width = pack_width[f]
            while filled < width:
                buffer |= np.uint64(packed[i, position]) << np.uint64(filled)
                filled += 8
                position += 1
            codes[pack_field[f]] = np.uint32(buffer & np.uint64((1 << width) - 1))
            buffer >>= np.uint64(width)
            filled -= width
        for j in range(d):
            out[i, j] = mean[j]
        for s in range(s_col.shape[0]):
            out[i, s_col[s]] = s_table[s, codes[s_field[s]]]
        for v in range(v_field.shape[0]):
            g = v_size[v]
            first = v_centroid[v] + np.int64(codes[v_field[v]]) * g
            for j in range(g):
                out[i, v_cols[v_col_start[v] + j]] = centroids[first + j]
        if norm_bits:
            level = norm_levels[codes[n_fields - 1]]
            for j in range(d):
                out[i, j] = (out[i, j] - mean[j]) * level + mean[j]
