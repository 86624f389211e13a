"""A deliberately naive GSPN, written independently of gspngen: Python floats, one pixel at a time,
straight from the text of DESIGN §4 in image coordinates. Only for tiny shapes."""

import math


def _norm(logits, exists, normalization):
    if normalization == "none":
        return [w if e else 0.0 for w, e in zip(logits, exists)]
    if normalization == "stability":
        a = [1.0 / (1.0 + math.exp(-w)) if e else 0.0 for w, e in zip(logits, exists)]
    else:
        mx = max(w for w, e in zip(logits, exists) if e)
        a = [math.exp(w - mx) if e else 0.0 for w, e in zip(logits, exists)]
    z = sum(a)
    return [v / z for v in a]


def _pixel(direction, t, i, H, W):
    """Image (row, col) of the pixel at step t (in step order), lane i."""
    return {"lr": (i, t), "rl": (i, W - 1 - t), "tb": (t, i), "bt": (H - 1 - t, i)}[direction]


def naive_gspn(spec, x, w, lam, u=None, s=None, m=None):
    """All arguments are nested lists in NCHW order (w: N, D, k, G, H, W). Returns nested lists."""
    N, C, H, W = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    k, r = spec.connection, (spec.connection - 1) // 2
    G = spec.groups(C)
    D = len(spec.directions)
    per_dir = []
    for d, direction in enumerate(spec.directions):
        T, L = (W, H) if direction in ("lr", "rl") else (H, W)
        K = spec.chunk or T
        y = [[[[0.0] * W for _ in range(H)] for _ in range(C)] for _ in range(N)]
        for n in range(N):
            for ch in range(C):
                g = ch // (C // G)
                prev = None
                for t in range(T):
                    cur = [0.0] * L
                    for i in range(L):
                        row, col = _pixel(direction, t, i, H, W)
                        val = lam[n][d][ch][row][col] * x[n][ch][row][col]
                        if t % K != 0:
                            exists = [0 <= i + c - r < L for c in range(k)]
                            logits = [w[n][d][c][g][row][col] for c in range(k)]
                            wn = _norm(logits, exists, spec.normalization)
                            for c in range(k):
                                if exists[c]:
                                    val += wn[c] * prev[i + c - r]
                        cur[i] = val
                        out = val
                        if spec.modulation:
                            out = u[n][d][ch][row][col] * val
                        if spec.skip:
                            out += s[n][d][ch][row][col] * x[n][ch][row][col]
                        y[n][ch][row][col] = out
                    prev = cur
        per_dir.append(y)
    if spec.merge == "stack":
        return [[per_dir[d][n] for d in range(D)] for n in range(N)]
    coef = {"sum": [1.0] * D, "mean": [1.0 / D] * D, "learned": list(m) if m is not None else None}[spec.merge]
    return [[[[sum(coef[d] * per_dir[d][n][ch][row][col] for d in range(D)) for col in range(W)]
              for row in range(H)] for ch in range(C)] for n in range(N)]
