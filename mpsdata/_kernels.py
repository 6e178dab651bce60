"""CPU kernels of the engine: batched TT-SVD and contraction, compiled with numba.

Why a kernel of our own: a TT-SVD of a 28x28 image is ~10^5 flops spread over a handful of tiny
matrices (2x2 to 14x14). LAPACK and ``torch.linalg`` pay microseconds of call overhead per tiny matrix,
which dominates (``torch.linalg.eigh`` on a batch of 14x14 matrices costs ~12 us per matrix on 2 cores).

Layout trick: images are processed in blocks of ``LANES`` side by side, every per-image array carrying a
trailing lane axis. Each step of the algorithm is then a loop whose innermost index runs over the lanes,
which the compiler turns into SIMD instructions without any reassociation: every lane computes exactly
what a one-image loop would, so results do not depend on batch size or position in the batch.

Algorithm (Oseledets 2011, TT-SVD, left to right): at bond ``k`` the remainder ``C`` is an ``m x n`` matrix;
the truncated SVD comes from the top ``cap`` eigenpairs of the smaller Gram matrix (``C C^T`` or ``C^T C``),
on all lanes at once (``_eigh_top_lanes``): Householder tridiagonalisation without accumulating the
transform (``_tred2_lanes``), the top eigenvalues by bisection (float32) or all by implicit QL (float64,
``_tql2_lanes``), one twisted-factorisation solve per kept eigenvalue, Gram-Schmidt, and the reflectors
applied to the kept vectors only. One image at a time, ``tql2`` with vectors is a chain of dependent square
roots and divisions (~5 us for 14x14); across lanes and for the top few vectors only, the same problem costs
~1.3 us per image in float32. Cyclic Jacobi on lanes measured slower than lockstep QL. Matrices larger than
``_LAPACK_MIN`` go to LAPACK, as do the rare lanes whose twisted vectors come out dependent (clusters).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

LANES = 64  # images side by side; measured best of 16/32/64/128 for encode and decode on 28x28
_LAPACK_MIN = 128  # up to here the lane solver beats per-matrix LAPACK (3.6-12x, benchmarks/eig_sizes.py)
_JIT: dict[str, Any] = {"nogil": True, "error_model": "numpy", "cache": True}


@numba.njit(**_JIT)
def _tred2_lanes(Z, D, E, H, n, t):
    """Householder tridiagonalisation (EISPACK ``tred2``) of ``Z[:n, :n, l]`` on every lane at once.

    Lanes innermost, with ``tred2``'s zero-column branch replaced by masks (a zero column, or one below
    ``eps**2`` of the matrix, which should be scaled to norm about one, gives the identity step, as the
    branch does); divisions by ``h`` are multiplications by its inverse. On return ``D[:n, l]`` is the
    diagonal and ``E[i, l]`` the coupling of ``i - 1`` and ``i`` (``E[0] = 0``). The transform is not
    accumulated: reflector ``i`` (``1 <= i < n``) is ``I - u u^T / h`` with ``u = Z[i, :i, l]`` and
    ``H[i, l] = 1 / h`` (0 for the identity step), and an eigenvector ``y`` of the tridiagonal matrix maps
    to ``P_{n-1} ... P_1 y`` (``_reflect``). ``t`` is ``(6, L)`` scratch.
    """
    L = Z.shape[2]
    zero = D.dtype.type(0.0)
    one = D.dtype.type(1.0)
    half = D.dtype.type(0.5)
    negligible = np.finfo(D.dtype).eps ** 2
    sc, hv, hinv, fv, gv, inv = t[0], t[1], t[2], t[3], t[4], t[5]
    for j in range(n):
        for lane in range(L):
            D[j, lane] = Z[j, n - 1, lane]
    for i in range(n - 1, 0, -1):
        for lane in range(L):
            sc[lane] = zero
            hv[lane] = zero
        for k in range(i):
            for lane in range(L):
                sc[lane] += abs(D[k, lane])
        for lane in range(L):
            # A column below rounding level of the (unit-scaled) matrix is dropped: no reflection, as for a
            # zero column. Reflections built from ~1e-38 values lose orthogonality in float32.
            big = sc[lane] > negligible
            inv[lane] = sc[lane] if big else one
            hinv[lane] = one if big else zero
        for k in range(i):
            for lane in range(L):
                x = D[k, lane] / inv[lane] * hinv[lane]
                D[k, lane] = x
                hv[lane] += x * x
        for lane in range(L):
            f = D[i - 1, lane]
            h = hv[lane]
            g = np.sqrt(h)
            g = -g if f > zero else g
            E[i, lane] = sc[lane] * g
            h = h - f * g
            hv[lane] = h
            hinv[lane] = one / h if h != zero else zero
            D[i - 1, lane] = f - g
        for j in range(i):
            for lane in range(L):
                E[j, lane] = zero
        for j in range(i):
            for lane in range(L):
                f = D[j, lane]
                fv[lane] = f
                Z[i, j, lane] = f
                gv[lane] = E[j, lane] + Z[j, j, lane] * f
            for k in range(j + 1, i):
                for lane in range(L):
                    z = Z[j, k, lane]
                    gv[lane] += z * D[k, lane]
                    E[k, lane] += z * fv[lane]
            for lane in range(L):
                E[j, lane] = gv[lane]
        for lane in range(L):
            fv[lane] = zero
        for j in range(i):
            for lane in range(L):
                x = E[j, lane] * hinv[lane]
                E[j, lane] = x
                fv[lane] += x * D[j, lane]
        for lane in range(L):
            gv[lane] = fv[lane] * hinv[lane] * half  # hh
        for j in range(i):
            for lane in range(L):
                E[j, lane] -= gv[lane] * D[j, lane]
        for j in range(i):
            for lane in range(L):
                fv[lane] = D[j, lane]
                sc[lane] = E[j, lane]
            for k in range(j, i):
                for lane in range(L):
                    Z[j, k, lane] -= fv[lane] * E[k, lane] + sc[lane] * D[k, lane]
            for lane in range(L):
                D[j, lane] = Z[j, i - 1, lane]
                Z[j, i, lane] = zero
        for lane in range(L):
            D[i, lane] = hv[lane]
    for j in range(n):
        for lane in range(L):
            h = D[j, lane]
            H[j, lane] = one / h if j > 0 and h != zero else zero
            D[j, lane] = Z[j, j, lane]
    for lane in range(L):
        E[0, lane] = zero


@numba.njit(**_JIT)
def _tql2_lanes(d, e, n, eps, work, act):
    """Implicit QL (EISPACK ``tql2``) on the tridiagonal ``d[:n, l]``, ``e[:n, l]`` of every lane at once.

    The scalar ``tql2`` is one long chain of dependent square roots and divisions, so its speed is set by
    latency; here every step runs over all lanes, and the lanes hide each other's latency. Lanes move in
    lockstep: a lane whose leading coupling has converged sits the step out (masked), and the chase runs
    over the whole trailing matrix instead of stopping where ``tql2`` would split it (a rotation across a
    zero coupling is exact, and couplings ``tql2`` would neglect are set to zero first). Eigenvalues only:
    on return ``d[:n, l]`` holds them, unsorted; ``e`` is destroyed. ``work`` is ``(11, L)`` scratch,
    ``act`` ``(L,)`` booleans. The matrix should be scaled to norm about one (no hypot here).
    """
    L = d.shape[1]
    one = d.dtype.type(1.0)
    zero = d.dtype.type(0.0)
    f, tst1, hv, pv, cv, sv, c2v, c3v, s2v, el1v, dl1v = (
        work[0], work[1], work[2], work[3], work[4], work[5], work[6], work[7], work[8], work[9], work[10]
    )  # fmt: skip
    for i in range(1, n):
        for lane in range(L):
            e[i - 1, lane] = e[i, lane]
    for lane in range(L):
        e[n - 1, lane] = zero
        f[lane] = zero
        tst1[lane] = zero
    for low in range(n):
        for lane in range(L):
            tst1[lane] = max(tst1[lane], abs(d[low, lane]) + abs(e[low, lane]))
        for _ in range(60):
            count = 0
            for lane in range(L):
                a = abs(e[low, lane]) > eps * tst1[lane]
                act[lane] = a
                count += a
            if count == 0:
                break
            for i in range(low + 1, n - 1):
                for lane in range(L):
                    if abs(e[i, lane]) <= eps * tst1[lane]:
                        e[i, lane] = zero
            for lane in range(L):  # shift from the leading 2x2 block
                a = act[lane]
                el = e[low, lane] if a else one
                g = d[low, lane]
                p = (d[low + 1, lane] - g) / (el + el)
                ap = abs(p)  # hypot(p, 1) without overflow: p is huge when a zero diagonal meets a tiny coupling
                q = one / ap if ap > one else ap
                r = np.sqrt(q * q + one)
                r = ap * r if ap > one else r
                r = -r if p < zero else r
                dl = el / (p + r)
                dl1 = el * (p + r)
                h = g - dl if a else zero
                hv[lane] = h
                d[low, lane] = dl if a else g
                d[low + 1, lane] = dl1 if a else d[low + 1, lane]
                dl1v[lane] = dl1
                f[lane] += h
            for i in range(low + 2, n):
                for lane in range(L):
                    d[i, lane] -= hv[lane]
            for lane in range(L):
                pv[lane] = d[n - 1, lane]
                cv[lane] = one
                c2v[lane] = one
                c3v[lane] = one
                sv[lane] = zero
                s2v[lane] = zero
                el1v[lane] = e[low + 1, lane]
            for i in range(n - 2, low - 1, -1):
                for lane in range(L):
                    a = act[lane]
                    c = cv[lane]
                    s = sv[lane]
                    p = pv[lane]
                    ei = e[i, lane]
                    di = d[i, lane]
                    c3v[lane] = c2v[lane]
                    c2v[lane] = c
                    s2v[lane] = s
                    g = c * ei
                    h = c * p
                    r = np.sqrt(p * p + ei * ei)
                    rinv = one / r if r > zero else zero
                    e[i + 1, lane] = s * r if a else e[i + 1, lane]
                    s = ei * rinv if a else zero
                    c = p * rinv if r > zero else one
                    c = c if a else one
                    pv[lane] = c * di - s * g
                    d[i + 1, lane] = h + s * (c * g + s * di) if a else d[i + 1, lane]
                    cv[lane] = c
                    sv[lane] = s
            for lane in range(L):
                if act[lane]:
                    p = -sv[lane] * s2v[lane] * c3v[lane] * el1v[lane] * e[low, lane] / dl1v[lane]
                    e[low, lane] = sv[lane] * p
                    d[low, lane] = cv[lane] * p
        for lane in range(L):
            d[low, lane] += f[lane]
            e[low, lane] = zero


@numba.njit(**_JIT)
def _tridiagonal_lanes(G, n, Z, T, work):
    """Scale every lane of ``G[:n, :n]`` by a power of two to norm about one (exact), copy it to ``Z`` and
    tridiagonalise it there (``_tred2_lanes``: diagonal ``T[:n]``, couplings ``T[n:2n]``, reflector
    factors ``T[2n:3n]``). ``work[11]`` gets the scale, ``work[12]`` its inverse."""
    L = G.shape[2]
    scale, unscale = work[11], work[12]
    for lane in range(L):
        big = 0.0
        for p in range(n):
            big = max(big, abs(G[p, p, lane]))
        sc = 2.0 ** -np.ceil(np.log2(big)) if big > 0 else 1.0
        scale[lane] = sc
        unscale[lane] = 1.0 / sc
    for p in range(n):
        for q in range(n):
            for lane in range(L):
                Z[p, q, lane] = G[p, q, lane] * scale[lane]
    _tred2_lanes(Z, T[:n], T[n : 2 * n], T[2 * n : 3 * n], n, work[:6])


@numba.njit(**_JIT)
def _eigenvalues_lanes(T, n, eps, work, act):
    """All eigenvalues of the tridiagonal matrices of ``T`` (from ``_tridiagonal_lanes``, still scaled)
    into ``T[3n:4n]``, unsorted; ``T[4n:5n]`` is scratch."""
    L = T.shape[1]
    for i in range(n):
        for lane in range(L):
            T[3 * n + i, lane] = T[i, lane]
            T[4 * n + i, lane] = T[n + i, lane]
    _tql2_lanes(T[3 * n : 4 * n], T[4 * n : 5 * n], n, eps, work[:11], act)


@numba.njit(**_JIT)
def _couplings_squared(T, n):
    """``T[4n + i] = T[n + i + 1] ** 2``: the squared couplings that Sturm counts and twisted solves use."""
    L = T.shape[1]
    for i in range(n - 1):
        for lane in range(L):
            T[4 * n + i, lane] = T[n + i + 1, lane] * T[n + i + 1, lane]


@numba.njit(**_JIT)
def _bisect_top(T, n, first, cap, work, out):
    """Eigenvalues ``first`` to ``cap - 1`` (counted from the top) of every lane's tridiagonal matrix by
    bisection, descending, in ``out[first:cap]`` (``out[first - 1]`` must hold the one above).

    Each step halves every interval with one Sturm count (the signs of the ``L D L^T`` pivots of
    ``T - x I``): ``n`` dependent divisions. The asked eigenvalues of all lanes step together, so that
    their independent chains hide the division latency; for a few top eigenvalues in float32 this is
    cheaper than QL for all of them. Starts from the Gershgorin interval cut to ``[0, trace]`` (these are
    Gram matrices) and takes ``24 + log2(n)`` steps, to below ``eps`` times the top eigenvalue. Needs
    ``_couplings_squared``; uses ``T[5n:10n]`` and ``work[:3]``.
    """
    L = T.shape[1]
    D, E, b2 = T[:n], T[n : 2 * n], T[4 * n : 5 * n]
    lo, hi, mid = T[5 * n : 6 * n], T[6 * n : 7 * n], T[7 * n : 8 * n]
    q, count = T[8 * n : 9 * n], T[9 * n : 10 * n]
    floor, top = work[0], work[1]
    steps = 24  # from [0, trace] (at most n times the top eigenvalue) to below eps times it
    m = n
    while m > 1:
        m >>= 1
        steps += 1
    f = T.dtype.type  # constants in the matrix's dtype: a float64 constant would widen float32 arithmetic
    eps = f(np.finfo(T.dtype).eps)
    pivmin = eps * eps  # the matrices are scaled to norm about one (typed constants: 1.2-1.4x faster)
    one, zero, half = f(1.0), f(0.0), f(0.5)
    for lane in range(L):
        floor[lane] = np.inf
        top[lane] = -np.inf
    for i in range(n):
        for lane in range(L):
            radius = abs(E[i, lane]) + (abs(E[i + 1, lane]) if i + 1 < n else zero)
            floor[lane] = min(floor[lane], D[i, lane] - radius)
            top[lane] = max(top[lane], D[i, lane] + radius)
    trace = work[2]
    for lane in range(L):
        trace[lane] = zero
    for i in range(n):
        for lane in range(L):
            trace[lane] += D[i, lane]
    for lane in range(L):
        # Gram matrices are positive semidefinite: every eigenvalue lies in [0, trace], up to rounding, and
        # for images the trace is close to the top eigenvalue. A value below the floor is at rounding level.
        top[lane] = min(top[lane], trace[lane] * (one + f(4 * n) * eps))
        floor[lane] = max(floor[lane], -f(4 * n) * eps * top[lane])
    for a in range(first, cap):
        for lane in range(L):
            lo[a, lane] = floor[lane]
            hi[a, lane] = top[lane]
    for _ in range(steps):
        for a in range(first, cap):
            for lane in range(L):
                x = half * (lo[a, lane] + hi[a, lane])
                mid[a, lane] = x
                p = D[0, lane] - x
                p = p if abs(p) >= pivmin else -pivmin
                q[a, lane] = p
                count[a, lane] = one if p < zero else zero
        for i in range(1, n):
            for a in range(first, cap):
                for lane in range(L):
                    p = (D[i, lane] - mid[a, lane]) - b2[i - 1, lane] / q[a, lane]
                    p = p if abs(p) >= pivmin else -pivmin
                    q[a, lane] = p
                    count[a, lane] += one if p < zero else zero
        for a in range(first, cap):
            below = f(n - a)  # eigenvalue n - 1 - a (ascending) lies below x when at least n - a of them do
            for lane in range(L):
                if count[a, lane] >= below:
                    hi[a, lane] = mid[a, lane]
                else:
                    lo[a, lane] = mid[a, lane]
    for a in range(first, cap):
        for lane in range(L):
            x = half * (lo[a, lane] + hi[a, lane])
            out[a, lane] = min(x, out[a - 1, lane]) if a > 0 else x  # equal values may round apart


@numba.njit(**_JIT)
def _top_of(w, n, cap, out):
    """The ``cap`` largest of every lane's ``w[:n]`` into ``out[:cap]``, descending (``w`` is consumed)."""
    L = w.shape[1]
    for lane in range(L):
        for a in range(cap):
            best = -np.inf
            at = 0
            for p in range(n):
                if w[p, lane] > best:
                    best = w[p, lane]
                    at = p
            w[at, lane] = -np.inf
            out[a, lane] = best


@numba.njit(**_JIT)
def _top_values(T, n, cap, work, act, out):
    """The top ``cap`` eigenvalues of the tridiagonal matrices of ``T`` (scaled), descending, in ``out``,
    and the squared couplings in ``T[4n:5n]``. Float32: bisection for those values only; float64: QL for
    all of them, cheaper than bisection with twice the steps."""
    eps = np.finfo(T.dtype).eps
    if eps > 1e-10:
        _couplings_squared(T, n)
        _bisect_top(T, n, 0, cap, work, out)
    else:
        _eigenvalues_lanes(T, n, eps, work, act)
        _top_of(T[3 * n : 4 * n], n, cap, out)
        _couplings_squared(T, n)


@numba.njit(**_JIT)
def _lapack_lane(G, n, cap, lane, Vs, sv, total, rq):
    """Top ``cap`` eigenpairs of one lane by LAPACK (large matrices, and lanes the fast path cannot do)."""
    w, v = np.linalg.eigh(np.ascontiguousarray(G[:n, :n, lane]))
    total[lane] = 0.0
    for p in range(n):
        total[lane] += G[p, p, lane]
    for a in range(cap):
        sv[a, lane] = max(w[n - 1 - a], 0.0)
        rq[a, lane] = w[n - 1 - a]
        for p in range(n):
            Vs[p, a, lane] = v[p, n - 1 - a]


@numba.njit(**_JIT)
def _gram_schmidt(Y, a, n, z, work, act):
    """Normalise ``z`` (``(n, L)``), orthogonalise it against ``Y[:a]`` twice and normalise it again.

    ``act[l]`` says whether lane ``l`` lost more than three quarters of its norm in the first pass (or is
    not finite): its vector was mostly in the span of the earlier ones, so what is left is amplified error
    rather than a new direction.
    """
    L = z.shape[1]
    dot, norm2 = work[13], work[14]
    f = z.dtype.type
    zero, one, quarter = f(0.0), f(1.0), f(0.25)
    for rep in range(3):
        if rep:
            for b in range(a):
                for lane in range(L):
                    dot[lane] = zero
                for i in range(n):
                    for lane in range(L):
                        dot[lane] += Y[b, i, lane] * z[i, lane]
                for i in range(n):
                    for lane in range(L):
                        z[i, lane] -= dot[lane] * Y[b, i, lane]
        for lane in range(L):
            norm2[lane] = zero
        for i in range(n):
            for lane in range(L):
                norm2[lane] += z[i, lane] * z[i, lane]
        if rep == 1:
            for lane in range(L):
                act[lane] = not norm2[lane] >= quarter  # NaN counts as lost
        for lane in range(L):
            norm2[lane] = one / np.sqrt(norm2[lane]) if norm2[lane] > zero else zero
        for i in range(n):
            for lane in range(L):
                z[i, lane] *= norm2[lane]


@numba.njit(**_JIT)
def _complete_lane(Y, a, n, lane, z):
    """A unit vector orthogonal to ``Y[:a]`` for one lane: the standard basis vector with the most weight
    outside their span, orthogonalised twice. For eigenvalues at rounding level, whose eigenvectors
    are any completion of the kept ones."""
    best = -1.0
    pick = 0
    for j in range(n):
        rest = 1.0
        for b in range(a):
            rest -= Y[b, j, lane] * Y[b, j, lane]
        if rest > best:
            best = rest
            pick = j
    for i in range(n):
        z[i, lane] = 1.0 if i == pick else 0.0
    for _ in range(2):
        for b in range(a):
            dot = 0.0
            for i in range(n):
                dot += Y[b, i, lane] * z[i, lane]
            for i in range(n):
                z[i, lane] -= dot * Y[b, i, lane]
        norm2 = 0.0
        for i in range(n):
            norm2 += z[i, lane] * z[i, lane]
        for i in range(n):
            z[i, lane] /= np.sqrt(norm2)


@numba.njit(**_JIT)
def _twisted_vector(T, n, lam, pivmin, pick, work, z):
    """Eigenvector of every lane's tridiagonal matrix for its (accurate) eigenvalue ``lam[l]``, unnormalised.

    One solve with a twisted factorisation of ``T - lam I`` (Dhillon & Parlett 2004): the stationary
    ``L D L^T`` from the top (``Dp``) and ``U D U^T`` from the bottom (``Dm``) meet at the index ``r``
    where ``|gamma_r| = |Dp_r + Dm_r - (d_r - lam)|`` is smallest, the row where the eigenvector is
    large, and ``z_r = 1`` is propagated outwards. Pivots below ``pivmin`` are replaced by ``-pivmin``;
    entries below ``pivmin`` come back as zero, so no subnormal number reaches the steps that follow.
    """
    L = T.shape[1]
    D, E, b2, Dp, Dm = T[:n], T[n : 2 * n], T[4 * n : 5 * n], T[5 * n : 6 * n], T[6 * n : 7 * n]
    best = work[15]
    for lane in range(L):
        x = D[0, lane] - lam[lane]
        Dp[0, lane] = x if abs(x) >= pivmin else -pivmin
        x = D[n - 1, lane] - lam[lane]
        Dm[n - 1, lane] = x if abs(x) >= pivmin else -pivmin
    for i in range(1, n):
        for lane in range(L):
            x = (D[i, lane] - lam[lane]) - b2[i - 1, lane] / Dp[i - 1, lane]
            Dp[i, lane] = x if abs(x) >= pivmin else -pivmin
    for i in range(n - 2, -1, -1):
        for lane in range(L):
            x = (D[i, lane] - lam[lane]) - b2[i, lane] / Dm[i + 1, lane]
            Dm[i, lane] = x if abs(x) >= pivmin else -pivmin
    for lane in range(L):
        best[lane] = np.inf
        pick[lane] = 0
    for i in range(n):
        for lane in range(L):
            g = abs(Dp[i, lane] + Dm[i, lane] - (D[i, lane] - lam[lane]))
            if g < best[lane]:
                best[lane] = g
                pick[lane] = i
    for i in range(n):
        for lane in range(L):
            z[i, lane] = 1.0 if i == pick[lane] else 0.0
    # Entries decay away from the twist, geometrically where couplings are small, and left alone they
    # become subnormal numbers, whose arithmetic costs ~100x on Intel (28x28 encodes ran 1.8x slower than with
    # flush-to-zero on: benchmarks/flush_denormal.py).
    # Below the smallest normal number they are cut to zero. Not at a larger threshold: a tiny entry
    # next to a pivot clamped at pivmin grows back by up to 1 / pivmin (an eigenvector with a zero
    # inside), and tiny / pivmin is still far below rounding of z_r = 1.
    zero = z.dtype.type(0.0)
    tiny = z.dtype.type(np.finfo(z.dtype).tiny)
    for i in range(n - 2, -1, -1):
        for lane in range(L):
            if i < pick[lane]:
                x = -(E[i + 1, lane] * z[i + 1, lane]) / Dp[i, lane]
                z[i, lane] = zero if abs(x) < tiny else x
    for i in range(1, n):
        for lane in range(L):
            if i > pick[lane]:
                x = -(E[i, lane] * z[i - 1, lane]) / Dm[i, lane]
                z[i, lane] = zero if abs(x) < tiny else x
    # Then entries below pivmin (eps**2 of z_r = 1, far below rounding of the unit vector) are cut too, so
    # that their squares and products in the steps that follow stay normal numbers.
    for i in range(n):
        for lane in range(L):
            z[i, lane] = zero if abs(z[i, lane]) < pivmin else z[i, lane]


@numba.njit(**_JIT)
def _reflect(Z, H, v, n, s):
    """Map the tridiagonal eigenvectors ``v`` (``(n, L)``) back to the matrix: ``P_{n-1} ... P_1 v``."""
    L = v.shape[1]
    for i in range(1, n):
        for lane in range(L):
            s[lane] = 0.0
        for j in range(i):
            for lane in range(L):
                s[lane] += Z[i, j, lane] * v[j, lane]
        for lane in range(L):
            s[lane] *= H[i, lane]
        for j in range(i):
            for lane in range(L):
                v[j, lane] -= s[lane] * Z[i, j, lane]


@numba.njit(**_JIT)
def _trace(T, n, unscale, total):
    """Trace of every lane's tridiagonal matrix, summed in float64 and unscaled."""
    L = T.shape[1]
    for lane in range(L):
        total[lane] = 0.0
    for i in range(n):
        for lane in range(L):
            total[lane] += np.float64(T[i, lane])
    for lane in range(L):
        total[lane] *= unscale[lane]


@numba.njit(**_JIT)
def _rayleigh(T, Y, n, count, unscale, rq):
    """Rayleigh quotients ``y^T T y`` of every lane's unit vectors ``Y[:count]``, summed in float64 and
    unscaled. The trace minus them is the truncation error: the rounding of the kept eigenvalues cancels
    in it (an eigenvalue's error would not cancel against the trace) and the quotients' error is second
    order in the vectors'. Float32 on 4,096 Fashion-MNIST images, hierarchical layout: reported errors
    within 2.1e-5 of the measured ones, against 1.2e-4 from the bisection values
    (``benchmarks/kernel_ab.py 0f9d567 WORKTREE``)."""
    L = T.shape[1]
    D, E = T[:n], T[n : 2 * n]
    for a in range(count):
        for lane in range(L):
            rq[a, lane] = 0.0
        for i in range(n):
            for lane in range(L):
                y = np.float64(Y[a, i, lane])
                rq[a, lane] += np.float64(D[i, lane]) * y * y
        for i in range(n - 1):
            for lane in range(L):
                rq[a, lane] += (
                    2.0 * np.float64(E[i + 1, lane]) * np.float64(Y[a, i, lane]) * np.float64(Y[a, i + 1, lane])
                )
        for lane in range(L):
            rq[a, lane] *= unscale[lane]


@numba.njit(**_JIT)
def _needed(cap, done, use_tol, delta2, values, unscale, total, want):
    """How many eigenpairs every lane needs, from its top ``done`` eigenvalues (``values``, scaled,
    descending): ``cap``, or with ``use_tol`` one more than the smallest rank whose discarded weight by the
    eigenvalues is at most ``delta2[l]`` (the spare pair absorbs the eigenvalues' rounding: the rank is
    decided on Rayleigh quotients). Returns whether the ``done`` values settle every lane."""
    L = want.shape[0]
    settled = True
    for lane in range(L):
        need = cap
        if use_tol:
            kept = 0.0
            for r in range(1, done + 1):
                kept += max(np.float64(values[r - 1, lane]), 0.0) * unscale[lane]
                if total[lane] - kept <= delta2[lane]:
                    need = min(r + 1, cap)
                    break
        want[lane] = need
        settled = settled and (need <= done or done == cap)
    return settled


@numba.njit(**_JIT)
def _eig_scratch(G, cap):
    """Zeroed scratch and outputs of ``_eigh_top_lanes`` and ``_unfolding_tail`` for Gram buffers like ``G``
    ``(n, n, L)`` and up to ``cap`` pairs, as one tuple: ``Z`` ``(n, n, L)`` (reflectors), ``T`` ``(11 n, L)``
    (tridiagonal and twisted-solve rows), ``Y`` ``(cap, n, L)``, ``work`` ``(16, L)``, ``act``/``fail``
    ``(L,)`` booleans, ``pick``/``want`` ``(L,)`` integers, then the outputs ``Vs`` ``(n, cap, L)`` (vectors),
    ``sv`` ``(cap, L)`` (values), ``total`` ``(L,)`` (traces) and ``rq`` ``(cap, L)`` (Rayleigh quotients),
    the last two in float64 because a truncation error is a small difference of them."""
    n, _, L = G.shape
    dtype = G.dtype
    return (
        np.zeros((n, n, L), dtype),
        np.zeros((11 * n, L), dtype),
        np.zeros((cap, n, L), dtype),
        np.zeros((16, L), dtype),
        np.zeros(L, np.bool_),
        np.zeros(L, np.bool_),
        np.zeros(L, np.int64),
        np.zeros(L, np.int64),
        np.zeros((n, cap, L), dtype),
        np.zeros((cap, L), dtype),
        np.zeros(L, np.float64),
        np.zeros((cap, L), np.float64),
    )


@numba.njit(**_JIT)
def _eigh_top_lanes(G, n, cap, use_tol, delta2, scratch):
    """Top ``cap`` eigenpairs of the leading ``n x n`` block of every lane of ``G`` (symmetric, PSD).

    Writes the eigenvalues in descending order to ``sv[:cap, l]`` (clamped at zero), their eigenvectors
    to ``Vs[:n, :cap, l]``, and in float64 the trace to ``total[l]`` and the Rayleigh quotients of the
    vectors to ``rq[:cap, l]``; ``G`` is not changed. With ``use_tol`` a lane needs only the pairs that
    reach its tolerance ``delta2[l]`` (``_needed``, written to ``want[l]``), and in float32 only the
    eigenvalues those need, 8 at a time; pairs from ``want[l]`` on are left undefined (28x28 Fashion-MNIST
    at ``tol=0.1``, float64: 0.65x the time of all 28 pairs, ``benchmarks/kernel_ab.py d9fdc5b WORKTREE``). Up to
    ``_LAPACK_MIN``, on all lanes at once: tridiagonalisation without accumulating the transform, the
    top eigenvalues by bisection (float32) or all of them by QL (float64), then one twisted solve per kept
    eigenvalue, Gram-Schmidt against the earlier vectors (in the tridiagonal basis) and the reflectors
    applied to the kept vectors only, ``O(n^2 cap)`` instead of the ``O(n^3)`` of accumulated rotations.
    A vector that comes out dependent on the earlier ones (a cluster of nearly equal eigenvalues) is
    redone by LAPACK for its lane, unless its eigenvalue is at rounding level: then any completion of the
    kept vectors is as good. ``scratch`` comes from ``_eig_scratch``; every entry read is written first.
    """
    Z, T, Y, work, act, fail, pick, want, Vs, sv, total, rq = scratch
    L = G.shape[2]
    eps = np.finfo(G.dtype).eps
    if n > _LAPACK_MIN:
        for lane in range(L):
            _lapack_lane(G, n, cap, lane, Vs, sv, total, rq)
            want[lane] = cap
        return
    _tridiagonal_lanes(G, n, Z, T, work)
    z = T[7 * n : 8 * n]
    unscale = work[12]
    _trace(T, n, unscale, total)
    if eps > 1e-10:
        # Float32 bisection finds each value on its own: under a tolerance, 8 more at a time until every lane
        # has the ones it needs (of 28 for 28x28 images, ~16 per block of 64 at tol=0.1); else all at once.
        _couplings_squared(T, n)
        done = 0
        while True:
            upto = min(cap, done + 8) if use_tol else cap
            _bisect_top(T, n, done, upto, work, sv)
            done = upto
            if _needed(cap, done, use_tol, delta2, sv, unscale, total, want):
                break
        for a in range(done, cap):
            for lane in range(L):
                sv[a, lane] = 0.0
    else:  # float64: QL gives all the values at once
        _top_values(T, n, cap, work, act, sv)
        _needed(cap, cap, use_tol, delta2, sv, unscale, total, want)
    count = 0
    for lane in range(L):
        count = max(count, want[lane])
        fail[lane] = False
    pivmin = G.dtype.type(eps * eps)  # the matrices are scaled to norm about one
    for a in range(count):
        lam = sv[a]
        _twisted_vector(T, n, lam, pivmin, pick, work, z)
        _gram_schmidt(Y, a, n, z, work, act)
        for lane in range(L):
            if act[lane] and a < want[lane]:  # a pair the lane does not need never sends it to LAPACK
                if lam[lane] <= 4 * n * eps * max(sv[0, lane], 0.0):
                    _complete_lane(Y, a, n, lane, z)
                else:
                    fail[lane] = True
        for i in range(n):
            for lane in range(L):
                Y[a, i, lane] = z[i, lane]
    _rayleigh(T, Y, n, count, unscale, rq)
    for a in range(count):
        _reflect(Z, T[2 * n : 3 * n], Y[a], n, work[13])
        for p in range(n):
            for lane in range(L):
                Vs[p, a, lane] = Y[a, p, lane]
    for a in range(cap):
        for lane in range(L):
            sv[a, lane] = max(sv[a, lane] * unscale[lane], 0.0)
    for lane in range(L):
        if fail[lane]:
            _lapack_lane(G, n, cap, lane, Vs, sv, total, rq)


@numba.njit(**_JIT)
def _choose_rank(n, cap, use_tol, delta2, want, total, rq, Vs, sv, ranks_k, eps2_k):
    """Rank of every lane and its truncation error: the trace minus the kept vectors' Rayleigh quotients.

    The rank is ``cap``, or with ``use_tol`` the smallest rank whose discarded weight is at most
    ``delta2[l]``, at most ``want[l]`` (see ``_eigh_top_lanes``); pairs beyond the rank are zeroed.
    """
    L = sv.shape[1]
    for lane in range(L):
        rank = want[lane]
        if use_tol:
            kept = 0.0
            for r in range(1, want[lane] + 1):
                kept += rq[r - 1, lane]
                if total[lane] - kept <= delta2[lane]:
                    rank = r
                    break
        kept = 0.0
        for a in range(rank):
            kept += rq[a, lane]
        ranks_k[lane] = rank
        eps2_k[lane] = max(total[lane] - kept, 0.0)
        for a in range(rank, cap):
            sv[a, lane] = 0.0
            for p in range(n):
                Vs[p, a, lane] = 0.0


@numba.njit(**_JIT)
def _gram_lanes(C, rows, cols, G):
    """Gram matrix of the smaller side of every lane's ``rows x cols`` matrix ``C[:rows * cols]`` (row-major):
    ``C C^T`` into ``G[:rows, :rows]`` if ``rows <= cols``, else ``C^T C`` into ``G[:cols, :cols]``."""
    L = C.shape[1]
    # Vector p of the smaller side is C[p * step + t * stride] for t < length.
    n, length, step, stride = (rows, cols, cols, 1) if rows <= cols else (cols, rows, 1, cols)
    for p in range(n):
        for q in range(p, n):
            for lane in range(L):
                G[p, q, lane] = 0.0
            for t in range(length):
                for lane in range(L):
                    G[p, q, lane] += C[p * step + t * stride, lane] * C[q * step + t * stride, lane]
            for lane in range(L):
                G[q, p, lane] = G[p, q, lane]


@numba.njit(**_JIT)
def _ttsvd_block(X, sites, caps, offs, use_tol, delta2, core, C, C2, G, scratch, ranks, eps2):
    """TT-SVD of one block of images ``X[N, L]``, cores written to ``core[P, L]`` with bonds ``caps``.

    A bond that keeps every row of its unfolding (``cap == m <= ncol``, no ``tol``) needs no SVD: any
    orthonormal basis of the rows is exact, and the identity leaves the remainder as it is.
    """
    N, L = X.shape
    n_sites = sites.shape[0]
    eps = np.finfo(X.dtype).eps
    want, Vs, sv, total, rq = scratch[7:]
    for i in range(N):
        for lane in range(L):
            C[i, lane] = X[i, lane]
    left = 1
    rest = N
    for k in range(n_sites - 1):
        m = left * sites[k]
        ncol = rest // sites[k]
        cap = caps[k]
        off = offs[k]
        if m <= ncol and cap == m and not use_tol:
            for p in range(m):
                for a in range(cap):
                    for lane in range(L):
                        core[off + p * cap + a, lane] = 1.0 if p == a else 0.0
            for lane in range(L):
                ranks[k, lane] = m
                eps2[k, lane] = 0.0
            left = cap
            rest = ncol
            continue
        _gram_lanes(C, m, ncol, G)
        if m <= ncol:
            _eigh_top_lanes(G, m, cap, use_tol, delta2, scratch)
            _choose_rank(m, cap, use_tol, delta2, want, total, rq, Vs, sv, ranks[k], eps2[k])
            for p in range(m):
                for a in range(cap):
                    for lane in range(L):
                        core[off + p * cap + a, lane] = Vs[p, a, lane]
            for a in range(cap):
                for t in range(ncol):
                    for lane in range(L):
                        C2[a * ncol + t, lane] = 0.0
                for p in range(m):
                    for t in range(ncol):
                        for lane in range(L):
                            C2[a * ncol + t, lane] += Vs[p, a, lane] * C[p * ncol + t, lane]
        else:
            _eigh_top_lanes(G, ncol, cap, use_tol, delta2, scratch)
            _choose_rank(ncol, cap, use_tol, delta2, want, total, rq, Vs, sv, ranks[k], eps2[k])
            # sv holds squared singular values. U = C V / sigma and the remainder sigma V^T multiply back to
            # C V V^T whatever sigma's accuracy, so only values below rounding level (which could overflow
            # the division) are dropped.
            for lane in range(L):
                floor = eps * eps * sv[0, lane]
                for a in range(cap):
                    sv[a, lane] = np.sqrt(sv[a, lane]) if sv[a, lane] > floor else 0.0
            for i in range(m):
                for a in range(cap):
                    for lane in range(L):
                        core[off + i * cap + a, lane] = 0.0
                    for t in range(ncol):
                        for lane in range(L):
                            core[off + i * cap + a, lane] += C[i * ncol + t, lane] * Vs[t, a, lane]
                    for lane in range(L):
                        sigma = sv[a, lane]
                        core[off + i * cap + a, lane] = core[off + i * cap + a, lane] / sigma if sigma > 0 else 0.0
            for a in range(cap):
                for t in range(ncol):
                    for lane in range(L):
                        C2[a * ncol + t, lane] = sv[a, lane] * Vs[t, a, lane]
        C, C2 = C2, C
        left = cap
        rest = ncol
    last = offs[n_sites - 1]
    for i in range(left * rest):
        for lane in range(L):
            core[last + i, lane] = C[i, lane]


@numba.njit(**_JIT)
def _contract_block(core, sites, caps, offs, A, B):
    """Contract the cores of one block, left to right; returns the buffer holding ``[N, L]`` values."""
    L = core.shape[1]
    n_sites = sites.shape[0]
    rows = sites[0]
    r = caps[0] if n_sites > 1 else 1
    for i in range(rows * r):
        for lane in range(L):
            A[i, lane] = core[i, lane]
    for k in range(1, n_sites):
        w = sites[k] * (caps[k] if k < n_sites - 1 else 1)
        off = offs[k]
        for i in range(rows):
            for t in range(w):
                for lane in range(L):
                    B[i * w + t, lane] = 0.0
            for a in range(r):
                for t in range(w):
                    for lane in range(L):
                        B[i * w + t, lane] += A[i * r + a, lane] * core[off + a * w + t, lane]
        A, B = B, A
        rows *= sites[k]
        r = w // sites[k]
    return A


def _offsets(sites: np.ndarray, caps: np.ndarray) -> np.ndarray:
    bonds = np.concatenate([[1], caps, [1]]).astype(np.int64)
    sizes = bonds[:-1] * sites * bonds[1:]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _own_tails(sites: np.ndarray, caps: np.ndarray, tol: float) -> np.ndarray:
    """Bonds whose Definition-1 error needs its own unfolding: some earlier bond was truncated."""
    full = np.minimum(np.cumprod(sites[:-1]), np.prod(sites) // np.cumprod(sites[:-1]))
    truncated = (caps < full) | (tol > 0)
    return np.concatenate([[False], np.cumsum(truncated[:-1]) > 0])


def _gram_size(sites: np.ndarray, caps: np.ndarray, own_tail: np.ndarray) -> int:
    total = int(np.prod(sites))
    left, rest, size = 1, total, 1
    for k in range(len(sites) - 1):
        m = left * int(sites[k])
        rest //= int(sites[k])
        size = max(size, min(m, rest))
        left = int(caps[k])
        if own_tail[k]:
            prefix = int(np.prod(sites[: k + 1]))
            size = max(size, min(prefix, total // prefix))
    return size


@numba.njit(**_JIT)
def _unfolding_tail(X, left, rank, G, scratch, out):
    """Discarded weight of the best rank-``rank[l]`` approximation of the ``left x rest`` unfolding of X.

    This is ``eps_k^2`` of paper Definition 1 (squared, summed as in Oseledets 2011), for the bound of
    Theorem 1: the trace of the Gram matrix minus its top ``rank`` eigenvalues (no eigenvectors).
    """
    Z, T, _, work, act = scratch[:5]
    total = scratch[10]
    N, L = X.shape
    right = N // left
    n = min(left, right)
    _gram_lanes(X, left, right, G)
    for lane in range(L):
        total[lane] = 0.0
    for p in range(n):
        for lane in range(L):
            total[lane] += G[p, p, lane]
    if n > _LAPACK_MIN:
        for lane in range(L):
            w = np.linalg.eigvalsh(np.ascontiguousarray(G[:n, :n, lane]))
            kept = 0.0
            for a in range(min(rank[lane], n)):
                kept += max(w[n - 1 - a], 0.0)
            out[lane] = max(total[lane] - kept, 0.0)
        return
    _tridiagonal_lanes(G, n, Z, T, work)
    most = 0
    for lane in range(L):
        most = max(most, min(rank[lane], n))
    top = T[10 * n : 11 * n]
    _top_values(T, n, most, work, act, top)
    unscale = work[12]
    for lane in range(L):
        kept = 0.0
        for a in range(min(rank[lane], n)):
            kept += max(top[a, lane], 0.0)
        out[lane] = max(total[lane] - kept * unscale[lane], 0.0)


@numba.njit(**_JIT)
def _encode_chunk(x, gather, primary, sites, caps, offs, gram, own_tail, tol, terms, lanes, cores, ranks, eps2, tails):
    B = x.shape[0]
    N = gather.shape[0]
    n_bonds = sites.shape[0] - 1
    dtype = cores.dtype
    L = lanes
    cap_max = 1
    for k in range(n_bonds):
        cap_max = max(cap_max, caps[k])
    # Scratch is zeroed once; the kernels write every entry before they read it, so a lane's result never
    # depends on what an earlier block or a neighbouring lane left behind.
    X = np.zeros((N, L), dtype)
    C = np.zeros((N, L), dtype)
    C2 = np.zeros((N, L), dtype)
    G = np.zeros((gram, gram, L), dtype)
    scratch = _eig_scratch(G, cap_max)
    core = np.zeros((offs[-1], L), dtype)
    delta2 = np.zeros(L, dtype)
    block_ranks = np.zeros((n_bonds, L), np.int64)
    block_eps2 = np.zeros((n_bonds, L), dtype)
    block_tails = np.zeros((n_bonds, L), dtype)
    for b0 in range(0, B, L):
        nb = min(L, B - b0)
        for i in range(N):
            src = gather[i]
            for lane in range(nb):
                X[i, lane] = x[b0 + lane, src]
            for lane in range(nb, L):
                X[i, lane] = 0.0
        for term in range(terms):
            if tol > 0 and term == 0:  # every term is held to the image's norm, not to its residual's
                for lane in range(L):
                    norm2 = 0.0
                    for i in range(N):
                        if primary[i]:  # padded copies do not count: tol is relative to the image
                            norm2 += X[i, lane] * X[i, lane]
                    delta2[lane] = tol * tol * norm2 / max(n_bonds, 1)
            _ttsvd_block(X, sites, caps, offs, tol > 0, delta2, core, C, C2, G, scratch, block_ranks, block_eps2)
            left = 1
            for k in range(n_bonds):
                left *= sites[k]
                if own_tail[k]:
                    _unfolding_tail(X, left, block_ranks[k], G, scratch, block_tails[k])
                else:  # every earlier bond kept full rank: the sweep saw the original unfolding
                    for lane in range(L):
                        block_tails[k, lane] = block_eps2[k, lane]
            for lane in range(nb):
                for i in range(offs[-1]):
                    cores[b0 + lane, term, i] = core[i, lane]
                for k in range(n_bonds):
                    ranks[b0 + lane, term, k] = block_ranks[k, lane]
                    eps2[b0 + lane, term, k] = block_eps2[k, lane]
                    tails[b0 + lane, term, k] = block_tails[k, lane]
            if term + 1 < terms:
                approx = _contract_block(core, sites, caps, offs, C, C2)
                for i in range(N):
                    for lane in range(L):
                        X[i, lane] -= approx[i, lane]


@numba.njit(**_JIT)
def _decode_chunk(cores, sites, caps, offs, scatter, lanes, out, quantize):
    B, terms, P = cores.shape
    N = 1
    for k in range(sites.shape[0]):
        N *= sites[k]
    dtype = cores.dtype
    L = lanes
    core = np.empty((P, L), dtype)
    A = np.empty((N, L), dtype)
    Bf = np.empty((N, L), dtype)
    acc = np.empty((N, L), dtype)
    q = np.empty((N if quantize else 0, L), np.uint8)
    for b0 in range(0, B, L):
        nb = min(L, B - b0)
        if terms != 1:
            for i in range(N):
                for lane in range(L):
                    acc[i, lane] = 0.0
        res = acc
        for term in range(terms):
            for i in range(P):
                for lane in range(nb):
                    core[i, lane] = cores[b0 + lane, term, i]
                for lane in range(nb, L):
                    core[i, lane] = 0.0
            values = _contract_block(core, sites, caps, offs, A, Bf)
            if terms == 1:  # read the contraction's buffer: one pass less over N x L values
                res = values
            else:
                for i in range(N):
                    for lane in range(L):
                        acc[i, lane] += values[i, lane]
        # Back to one row per image. Position-major order: each read is one contiguous run of lanes, and
        # the rows being written stay in cache. Quantising first, across lanes, vectorises.
        if quantize:
            for i in range(N):
                for lane in range(L):
                    q[i, lane] = np.uint8(min(max(np.floor(res[i, lane] + 0.5), 0.0), 255.0))  # as _decode_single
            for p in range(scatter.shape[0]):
                src = scatter[p]
                for lane in range(nb):
                    out[b0 + lane, p] = q[src, lane]
        else:
            for p in range(scatter.shape[0]):
                src = scatter[p]
                for lane in range(nb):
                    out[b0 + lane, p] = res[src, lane]


@numba.njit(**_JIT)
def _decode_single(cores, geometry, scatter, out):
    """Contract the MPS of one image (``cores`` ``(groups, terms, P)``) into uint8 ``out`` ``(groups, V)``.

    The per-item path of the datasets: one image has no lanes to vectorise over, so the innermost loops
    run along the cores instead. ``geometry`` packs ``[n, sites..., caps..., offsets...]`` into one array to
    keep the call cheap (numba unboxes every argument on every call).
    """
    if geometry[0] == 2:
        # Two sites: float64, as the batch path's matrix product (``_engine._decode_matrix``), whose summation
        # order BLAS chooses; in float32 the two rounded ~1e-5 apart and split ties (150 values of the 60,000
        # Fashion-MNIST training images). More sites: float32 in the order of the lane kernel, the same bits.
        _decode_single_into(cores, geometry, scatter, out, np.empty((3, _single_size(geometry)), np.float64))
    else:
        _decode_single_into(cores, geometry, scatter, out, np.empty((3, _single_size(geometry)), cores.dtype))


@numba.njit(**_JIT)
def _decode_single_into(cores, geometry, scatter, out, buffers):
    """:func:`_decode_single` with its three contraction buffers (rows of ``buffers``), in their dtype."""
    A, B, acc = buffers[0], buffers[1], buffers[2]
    for g in range(cores.shape[0]):
        _contract_single(cores[g], geometry, A, B, acc)
        for p in range(scatter.shape[0]):
            out[g, p] = min(max(np.floor(acc[scatter[p]] + 0.5), 0.0), 255.0)


@numba.njit(**_JIT)
def _decode_single_planes(cores, geometry, scatter, rows_t, cols, colour, out):
    """One image of transformed planes into uint8 ``out`` ``(H, W, C)``: the per-item twin of the batch decode.

    Contracts each plane in float64 (``cores`` ``(planes, terms, P)``, as :func:`_decode_single`), applies the
    inverse 2-D DCT ``rows^T X cols`` when ``rows_t``/``cols`` are not empty (``rows_t``: the orthonormal DCT matrix
    of H transposed, C-contiguous; ``cols``: that of W; two small BLAS products, 2.5 against 8 us for loops on 28x28),
    then the inverse colour transform ``Y_i = sum_j colour[j, i] X_j`` when ``colour`` (3 x 3) is not empty,
    and rounds half up and clamps to 0..255. Every step is in float64 like the batch path, so the two agree
    except where a value lands within ~1e-12 of a rounding tie (none in the tests: tests/test_transformed_items.py).
    """
    height, width, channels = out.shape
    N = _single_size(geometry)
    A = np.empty(N, np.float64)
    B = np.empty(N, np.float64)
    acc = np.empty(N, np.float64)
    per_group = scatter.shape[0]
    planes = np.empty(channels * height * width, np.float64)
    for g in range(cores.shape[0]):
        _contract_single(cores[g], geometry, A, B, acc)
        for p in range(per_group):
            planes[g * per_group + p] = acc[scatter[p]]
    planes = planes.reshape(channels, height, width)
    if rows_t.shape[0]:
        tmp = np.empty((height, width), np.float64)
        for c in range(channels):
            np.dot(rows_t, planes[c], tmp)
            np.dot(tmp, cols, planes[c])
    if colour.shape[0]:
        mixed = np.zeros((channels, height, width), np.float64)
        for i in range(channels):
            for j in range(channels):
                v = colour[j, i]
                for h in range(height):
                    for w in range(width):
                        mixed[i, h, w] += v * planes[j, h, w]
        planes = mixed
    for c in range(channels):
        for h in range(height):
            for w in range(width):
                out[h, w, c] = min(max(np.floor(planes[c, h, w] + 0.5), 0.0), 255.0)


@numba.njit(**_JIT)
def _single_size(geometry):
    """Values one MPS of ``geometry`` (see :func:`_decode_single`) contracts to."""
    N = 1
    for k in range(geometry[0]):
        N *= geometry[1 + k]
    return N


@numba.njit(**_JIT)
def _contract_single(core_terms, geometry, A, B, acc):
    """Sum the contractions of one MPS's terms (``core_terms`` ``(terms, P)``) into ``acc``, in ``acc``'s dtype."""
    n_sites = geometry[0]
    sites = geometry[1 : 1 + n_sites]
    caps = geometry[1 + n_sites : 2 * n_sites]
    offs = geometry[2 * n_sites :]
    acc[:] = 0.0
    for term in range(core_terms.shape[0]):
        core = core_terms[term]
        rows = sites[0]
        r = caps[0]
        for i in range(rows * r):
            A[i] = core[i]
        for k in range(1, n_sites):
            w = sites[k] * (caps[k] if k < n_sites - 1 else 1)
            off = offs[k]
            for i in range(rows):
                for t in range(w):
                    B[i * w + t] = 0.0
                for a in range(r):
                    v = A[i * r + a]
                    for t in range(w):
                        B[i * w + t] += v * core[off + a * w + t]
            A, B = B, A
            rows *= sites[k]
            r = w // sites[k]
        for i in range(acc.shape[0]):
            acc[i] += A[i]
