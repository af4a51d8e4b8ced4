"""Poolformer (arXiv 2510.02206) in pure JAX: RG-LRU recurrences inside recursive SkipBlocks.

Notation (shapes in comments):
  B batch, S sequence length at the current level, D model dim (d_model), R RG-LRU dim (d_rnn),
  N recurrence channels (R/2 complex or R real), F pooling factor of a level, G pooling groups,
  V vocabulary, L stacked layers of one level.
Activations are time-major, (S, B, D), inside the model: the scan runs along the leading axis and
pooling is a reshape of it, so nothing is transposed between layers. `apply` takes and returns
batch-major arrays.

Mixed precision (`apply(..., dtype=jnp.bfloat16)`, `step` and `init_state` likewise): parameters
stay float32 and `compute_params` casts a copy for the forward pass. Matmul inputs and the
activations between layers are then bf16; float32 stays where precision matters: the RG-LRU whole
(its gates, coefficients, scan and state, |a| near 1 over 16,000 steps), every norm's statistics,
the head (logits, softmax and cross-entropy), attention's softmax.

Tiers, bottom-up: scan math -> layers (dense, norms, RG-LRU, attention, pooling) -> blocks
(ResBlock, layer stack, SkipBlock: thesis Figures 3.2-3.4) -> the model (`init`, `apply`,
`init_state`, `step`).
"""
import argparse
import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

SILENCE = 128  # token of x = 0 under both 8-bit encodings; the input at position 0
C = 8.0  # RG-LRU: log a_t = C r_t log sigmoid(Lambda) + ... (Griffin fixes c = 8)
GATE_BLOCKS = 32  # RG-LRU gates are block-diagonal with 32 blocks (8 -> 4 at R = 256)
HEADS = 4  # multi-query attention heads (deepest-level ablation)
ROPE_WAVELENGTH = 32000.0  # rotary embeddings' longest wavelength: the author's models/attention/modules.py
SCAN_CHUNK = None  # scan_associative: steps per chunk; None: 64 on a CPU, 1 (plain) on a GPU or TPU, see scan_chunk
SCAN = "associative"  # the RG-LRU's training scan: associative | fused (scan_fused, a Pallas kernel; not yet timed on a GPU)
FUSED_STEPS, FUSED_LANES = 64, 32  # scan_fused: time steps and channels of one kernel program
REMAT_POLICY = None  # jax.checkpoint policy of every ResBlock; None: save its input only (bench.py tries others)
REMAT = True  # False: no jax.checkpoint at all, every activation kept for the backward pass (bench.py's "none")
SQRT_MAX_GRAD = 200.0  # bound on d sqrt(x)/dx near x = 0 (the author's value)
NORM_EPS = 1e-6
RINGS = {  # ring: (|a| min, |a| max, phase max); |a| ~ sqrt(U[min^2, max^2]), phase ~ U[0, max]
    "small": (0.9, 0.99, math.pi / 10),
    "half": (0.9, 0.99, math.pi),
    "full": (0.9, 0.99, 2 * math.pi),
    "circle": (0.01, 0.99, 2 * math.pi),
    # Not in the thesis: |a| up to 0.9999, memory from ~25 to ~10,000 steps at r = 1/2 (a_t = |a|^(8 r)),
    # so the deepest level (80 samples a step in the CPU recipe) can hold a clip-long state from the start.
    "long": (0.99, 0.9999, math.pi / 10),
}
CHOICES = {
    "ring": tuple(RINGS),
    "norm": ("layer", "rms", "none"),
    "skip": ("short", "long"),
    "placement": ("around", "after"),
    "deepest": ("rglru", "attention"),
    "embedding": ("sinusoidal", "linear", "learned"),
}


@dataclass(frozen=True)
class Config:
    """The thesis baseline (sec. 4.2) unless a field is changed."""

    pooling: tuple[int, ...] = (2, 4, 4, 5)  # F_1..F_n: level k has F_1*..*F_k times fewer tokens
    layers: tuple[int, ...] = (4, 4, 4, 4, 4)  # l_1..l_(n+1): layers before (and after) each pooling; last = deepest
    d_model: int = 128  # D, the model width
    d_rnn: int = 256  # R, the RG-LRU width
    complex_rnn: bool = True  # complex a = sigmoid(Lambda) e^(i theta), else real a = sigmoid(Lambda)
    ring: str = "small"  # initialisation of a: small | half | full | circle (sec. 4.4) | long (not in the thesis, see RINGS)
    norm: str = "layer"  # ResBlock pre-norm: layer | rms | none
    gated: bool = True  # gated ResBlock (Figure 3.4b)
    scale: float | None = None  # init variance of Dense_out and up-pool: None = 1 / branches into the level's stream
    groups: int | None = None  # pooling feature groups G; None = D (one weight per channel and offset)
    skip: str = "short"  # short: skip around the pooling; long: block input added to block output
    placement: str = "around"  # around: l_k layers before and after pooling; after: all 2 l_k after
    deepest: str = "rglru"  # temporal mixing at the deepest level: rglru | attention (4-head MQA)
    embedding: str = "sinusoidal"  # token embedding: sinusoidal | linear | learned
    dropout: float = 0.2  # dropout rate on every ResBlock's output
    vocab: int = 256  # V, token values (8-bit audio: 256)

    def __post_init__(self):
        object.__setattr__(self, "pooling", tuple(int(f) for f in self.pooling))
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if len(self.layers) != len(self.pooling) + 1:
            raise ValueError(f"layers {list(self.layers)} must have len(pooling)+1 = "
                             f"{len(self.pooling) + 1} entries for pooling {list(self.pooling)}")
        if any(f < 1 for f in self.pooling) or any(n < 0 for n in self.layers):
            raise ValueError(f"pooling factors must be >= 1 and layer counts >= 0: "
                             f"pooling {list(self.pooling)}, layers {list(self.layers)}")
        n_gate_out = self.d_rnn // 2 if self.complex_rnn else self.d_rnn
        if self.d_rnn % GATE_BLOCKS or n_gate_out % GATE_BLOCKS or (self.complex_rnn and self.d_rnn % 2):
            raise ValueError(f"d_rnn={self.d_rnn} must split into {GATE_BLOCKS} gate blocks on both sides "
                             f"(a multiple of {2 * GATE_BLOCKS if self.complex_rnn else GATE_BLOCKS})")
        if self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even (cos | sin halves)")
        if self.d_model % self.n_groups:
            raise ValueError(f"groups={self.n_groups} does not divide d_model={self.d_model}")
        if self.deepest == "attention" and self.d_model % HEADS:
            raise ValueError(f"d_model={self.d_model} must be divisible by {HEADS} attention heads")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def n_groups(self):
        return self.d_model if self.groups is None else self.groups

    @property
    def total_pooling(self):
        return math.prod(self.pooling)

    def check_length(self, seq_len):
        if seq_len % self.total_pooling:
            raise ValueError(f"sequence length {seq_len} is not divisible by the pooling product "
                             f"{'*'.join(map(str, self.pooling))} = {self.total_pooling}")

    def level_scale(self, level):
        """Init variance scale of a level: 1 / number of branches added to its residual stream."""
        if self.scale is not None:
            return self.scale
        if level == len(self.pooling):  # deepest: 2 ResBlocks per layer
            return 1.0 / max(2 * self.layers[level], 1)
        return 1.0 / (4 * self.layers[level] + 1)  # 2 l_k layers x 2 ResBlocks + the up-pool


# ---------------------------------------------------------------- scan math
# The RG-LRU recurrence h_t = a_t h_(t-1) + b_t as a composition of affine maps (thesis Theorem 4).


def scan_op(e1, e2):
    """(a1, b1) . (a2, b2) = (a2 a1, a2 b1 + b2): apply e1, then e2."""
    a1, b1 = e1
    a2, b2 = e2
    return a2 * a1, a2 * b1 + b2


def scan_chunk():
    """The blocked scan's default chunk: 64 steps on a CPU (flat from 16 to 250 there; the scan alone
    at 16,000 steps, forward and backward: 99 ms against 142 ms plain, `python bench.py`); the plain
    associative scan (1) on accelerators (an H100's bf16 baseline training step: 416 ms plain against
    498 ms at 64, timed side by side by `bench.py --part train`; a TPU is not measured). The one place
    pf.py asks what it runs on: a speed default that changes no value (test_pf checks every chunk size)."""
    return SCAN_CHUNK or (64 if jax.default_backend() == "cpu" else 1)


def scan_associative(a, b, h0=None, chunk=None):
    """h_t = a_t h_(t-1) + b_t along axis 0, h_(-1) = h0 (or 0). a, b: (S, ...). Training path.

    A two-level (blocked) parallel scan with the one operator scan_op: split S into chunks of
    `chunk` steps (scan_chunk() by default); compose the maps within every chunk, all chunks at once
    (chunk steps); `jax.lax.associative_scan` over the chunk totals gives the state entering each
    chunk (log2(S / chunk) depth); each chunk then applies it. Work O(S), depth chunk + log2(S/chunk).
    chunk=1 is the plain associative scan over S. Why two levels: on a CPU the plain one is memory
    bound on its log2(S) strided passes (`python bench.py` times both, alone and in the training step).
    """
    if h0 is not None:
        b = b.at[0].add(a[0] * h0)
    s = a.shape[0]
    k = min(chunk or scan_chunk(), s)
    pad = [(0, -s % k)] + [(0, 0)] * (a.ndim - 1)  # pad with the identity map (1, 0)
    a, b = (rearrange(jnp.pad(v, pad, constant_values=c), "(n k) ... -> k n ...", k=k)
            for v, c in ((a, 1), (b, 0)))

    def compose(e, e_k):
        e = scan_op(e, e_k)
        return e, e

    identity = (jnp.ones_like(a[0]), jnp.zeros_like(b[0]))
    a_in, b_in = jax.lax.scan(compose, identity, (a, b))[1]  # (k, n, ...): steps 0..j of each chunk
    h_end = jax.lax.associative_scan(scan_op, (a_in[-1], b_in[-1]), axis=0)[1]  # state after chunk n
    h_start = jnp.concatenate([jnp.zeros_like(h_end[:1]), h_end[:-1]])  # state entering chunk n
    h = a_in * h_start + b_in
    return rearrange(h, "k n ... -> (n k) ...")[:s]


def scan_sequential(a, b, h0=None):
    """The same recurrence one step at a time: the reference the associative scan is tested against."""
    h0 = jnp.zeros_like(b[0]) if h0 is None else jnp.broadcast_to(h0, b.shape[1:]).astype(b.dtype)

    def body(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return jax.lax.scan(body, h0, (a, b))[1]


def _fused_kernel(*refs, complex_rnn, reverse, carry_in):
    """One program of scan_fused: FUSED_STEPS steps x FUSED_LANES channels of a and b (real, or complex as
    real and imaginary planes). Forward: h = a h + b. Reverse (the backward pass, walking down): out = b + c,
    c = a out. carry_in: start from the chunk's entering state (the next input) and write every step's
    output; else start from 0 and write only the chunk's map: its product of a, and the state it reaches."""
    n = 2 if complex_rnn else 1
    a, b, rest = refs[:n], refs[n:2 * n], refs[2 * n:]
    mul = (lambda x, y: (x[0] * y[0] - x[1] * y[1], x[0] * y[1] + x[1] * y[0])) if complex_rnn else \
        (lambda x, y: (x[0] * y[0],))
    add = lambda x, y: tuple(u + v for u, v in zip(x, y))
    lanes = a[0].shape[1:]
    zero, one = jnp.zeros(lanes, jnp.float32), jnp.ones(lanes, jnp.float32)
    state = tuple(r[0, :] for r in rest[:n]) if carry_in else (zero,) * n
    steps = a[0].shape[0]

    def body(i, carry):
        t = steps - 1 - i if reverse else i
        state, prod = carry
        at, bt = tuple(r[t, :] for r in a), tuple(r[t, :] for r in b)
        out = add(bt, state) if reverse else add(mul(at, state), bt)
        state = mul(at, out) if reverse else out
        if carry_in:
            for r, v in zip(rest[n:], out):
                r[t, :] = v
        return state, (prod if carry_in else mul(at, prod))

    state, prod = jax.lax.fori_loop(0, steps, body, (state, (one, zero)[:n]))
    if not carry_in:
        for r, v in zip(rest, prod + state):  # the chunk's map: h -> prod h + state
            r[0, :] = v


def _fused_pass(a, b, h0, reverse):
    """Along axis 0 of a, b (S, C), complex64 or float32: forward, h_t = a_t h_(t-1) + b_t from h0 (or 0);
    reverse, d_t = b_t + a_(t+1) d_(t+1) from 0 past the end. Three passes: every chunk's map (Pallas,
    all chunks at once: reads a and b), the state entering each chunk (an associative scan over the
    S / FUSED_STEPS chunk maps), every chunk again from its entering state (reads a and b, writes the output)."""
    complex_rnn, (s, c) = jnp.iscomplexobj(a) or jnp.iscomplexobj(b), a.shape
    if complex_rnn:
        a, b = a.astype(jnp.complex64), b.astype(jnp.complex64)
    steps, lanes = FUSED_STEPS, FUSED_LANES
    planes = (lambda x: [jnp.real(x), jnp.imag(x)]) if complex_rnn else (lambda x: [x])
    join = (lambda v: jax.lax.complex(*v)) if complex_rnn else (lambda v: v[0])
    pad = ((0, -s % steps), (0, -c % lanes))  # padded steps are identity maps (a = 1, b = 0)
    a_p = [jnp.pad(v, pad, constant_values=one) for v, one in zip(planes(a), (1.0, 0.0))]
    b_p = [jnp.pad(v, pad) for v in planes(b)]
    n, (sp, cp) = len(a_p), a_p[0].shape
    grid = (sp // steps, cp // lanes)  # program (k, j): the k-th chunk in processing order, channels j
    rows = (lambda k, j: (grid[0] - 1 - k, j)) if reverse else (lambda k, j: (k, j))
    block, one_row = pl.BlockSpec((steps, lanes), rows), pl.BlockSpec((1, lanes), lambda k, j: (k, j))
    def call(carry_in, n_in, n_out, out_spec, rows_out):
        kernel = lambda interpret: pl.pallas_call(
            functools.partial(_fused_kernel, complex_rnn=complex_rnn, reverse=reverse, carry_in=carry_in), grid=grid,
            in_specs=[block] * (2 * n) + [one_row] * n_in, out_specs=[out_spec] * n_out,
            out_shape=[jax.ShapeDtypeStruct((rows_out, cp), jnp.float32)] * n_out, interpret=interpret,
            compiler_params=pallas_triton.CompilerParams(num_warps=max(1, lanes // 32), num_stages=4))
        # Lowered per platform: Triton on a GPU; a CPU interprets the kernel's own program (tests, not speed).
        return lambda *args: jax.lax.platform_dependent(*args, cpu=kernel(True), default=kernel(False))

    maps = call(False, 0, 2 * n, one_row, grid[0])(*a_p, *b_p)  # (chunks, C'): each chunk's map
    total = jax.lax.associative_scan(scan_op, (join(maps[:n]), join(maps[n:])), axis=0)  # chunks 0..k composed
    start = jnp.zeros((1, cp), total[1].dtype) if h0 is None else jnp.pad(h0.reshape(1, c), ((0, 0), (0, cp - c)))
    entering = jnp.concatenate([start, total[0][:-1] * start + total[1][:-1]])  # the state entering chunk k
    return join(call(True, n, n, block, sp)(*a_p, *b_p, *planes(entering)))[:s, :c]


@jax.custom_vjp
def scan_fused(a, b, h0):
    """h_t = a_t h_(t-1) + b_t along axis 0 from h0, as scan_associative, in a fused Pallas kernel: two
    kernel passes read a and b and the second writes h (the backward pass likewise: the transposed
    recurrence d_t = g_t + a_(t+1) d_(t+1) run down the steps). a, b: (S, ...); h0: b's shape without S."""
    s = a.shape[0]
    return _fused_pass(a.reshape(s, -1), b.reshape(s, -1), h0.reshape(-1), False).reshape(b.shape)


def _scan_fused_fwd(a, b, h0):
    h = scan_fused(a, b, h0)
    return h, (a, h, h0)


def _scan_fused_bwd(res, g):
    """JAX's cotangents transpose the linear map (no complex conjugate): d h_t / d b_t = 1, d h_t / d a_t =
    h_(t-1), d h_t / d h_(t-1) = a_t."""
    a, h, h0 = res
    s = a.shape[0]
    d = _fused_pass(a.reshape(s, -1), g.reshape(s, -1), None, True).reshape(g.shape)
    return d * jnp.concatenate([h0[None], h[:-1]]), d, a[0] * d[0]


scan_fused.defvjp(_scan_fused_fwd, _scan_fused_bwd)


def scan(a, b):
    """The RG-LRU's training recurrence from h = 0, in the form pf.SCAN names (the values are the same)."""
    if SCAN not in ("associative", "fused"):
        raise ValueError(f"pf.SCAN = {SCAN!r} is not one of associative, fused")
    return scan_fused(a, b, jnp.zeros_like(b[0])) if SCAN == "fused" else scan_associative(a, b)


@jax.custom_vjp
def sqrt_bounded(x):
    """sqrt(x) whose derivative is capped at SQRT_MAX_GRAD (d sqrt/dx = 1/(2 sqrt x) blows up at |a| -> 1)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    return (g * 0.5 / jnp.sqrt(jnp.maximum(x, 1.0 / (4 * SQRT_MAX_GRAD**2))),)


sqrt_bounded.defvjp(_sqrt_fwd, _sqrt_bwd)


# ---------------------------------------------------------------- layers


def normal_init(key, shape, n_in, scale=1.0):
    """N(0, scale / n_in), truncated at 2 std like LeCun normal (scale 1 is LeCun normal; 0 gives zeros)."""
    std = math.sqrt(scale / n_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def dense_init(key, n_in, n_out, scale=1.0, bias=True):
    w = normal_init(key, (n_in, n_out), n_in, scale)
    return {"w": w, "b": jnp.zeros(n_out)} if bias else {"w": w}


def dense(p, x):
    return x @ p["w"] + p.get("b", 0.0)  # no "b": a bias-free projection


def norm_init(d, kind):
    if kind == "layer":
        return {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
    return {"scale": jnp.ones(d)} if kind == "rms" else {}


def norm(p, x, kind):
    """LayerNorm (eq. 3.2-3.4), RMSNorm (eq. 3.5-3.6) or identity, over the feature axis. Statistics
    in float32 whatever x's dtype; the result has x's dtype."""
    if kind == "none":
        return x
    y = x.astype(jnp.float32)
    if kind == "layer":
        y = y - y.mean(-1, keepdims=True)
    y = y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + NORM_EPS) * p["scale"]
    return (y + p["bias"] if kind == "layer" else y).astype(x.dtype)


def dropout_mask(key, rate, shape):
    """Inverted dropout's keep mask; None (no dropout) when key is None (evaluation) or rate is 0."""
    return None if key is None or rate == 0.0 else jax.random.bernoulli(key, 1.0 - rate, shape)


def dropout(x, rate, keep):
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0.0)


def embedding_init(key, cfg):
    if cfg.embedding == "linear":
        return {"dense": dense_init(key, 1, cfg.d_model)}
    if cfg.embedding == "learned":
        return {"table": jax.random.normal(key, (cfg.vocab, cfg.d_model)) / math.sqrt(cfg.d_model)}
    return {}  # sinusoidal: no parameters


def embedding(p, q, cfg):
    """Token values q (...) -> (..., D): thesis eq. 4.1-4.2 (cosines then sines), or the ablations."""
    if cfg.embedding == "learned":
        return p["table"][q]
    q = q.astype(jnp.float32)
    if cfg.embedding == "linear":
        return dense(p["dense"], q[..., None] / (cfg.vocab - 1))
    half = cfg.d_model // 2
    freqs = 10000.0 ** (-jnp.arange(half) / half)  # j = 0 .. D/2-1
    angles = q[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1)


def block_diagonal_init(key, n_in, n_out):
    """GATE_BLOCKS diagonal blocks of (n_in/32 -> n_out/32) plus a bias, both drawn as the author's
    BlockDiagonalLinear draws them: flax's variance_scaling(1, "fan_in", "truncated_normal") counts
    fan-in over every axis but the last, so W (32, n_in/32, n_out/32) has fan-in n_in (std 1/16 at
    R = 256) and b (32, n_out/32) fan-in 32 (std ~0.18). b is stored flat, (n_out,)."""
    k_w, k_b = jax.random.split(key)
    shape = (GATE_BLOCKS, n_in // GATE_BLOCKS, n_out // GATE_BLOCKS)
    b = normal_init(k_b, (GATE_BLOCKS, n_out // GATE_BLOCKS), GATE_BLOCKS)
    return {"w": normal_init(k_w, shape, n_in), "b": b.reshape(n_out)}


def block_diagonal(p, x):
    """x (..., n_in) -> (..., n_out): GATE_BLOCKS diagonal blocks (n_in/32 -> n_out/32) plus a bias,
    computed as one dense (n_in, n_out) matmul whose off-block entries are zeros. That is 32x the
    blocks' multiply-adds, and still faster than 32 small batched matmuls (an einsum) on both backends:
    the baseline's bf16 training step at 32 x 16,000 on an H200, 366 -> 281 ms; on this 2-core CPU,
    4.87 -> 4.56 s at batch 1 and 412 -> 395 ms for the sc09-espeak preset at batch 4 (`bench.py --part
    train`, the two side by side; bench.py keeps the einsum as variant "gates": "einsum")."""
    h, i, o = p["w"].shape
    w = (p["w"][:, :, None, :] * jnp.eye(h, dtype=p["w"].dtype)[:, None, :, None]).reshape(h * i, h * o)
    return x @ w + p["b"]  # w[(h, i), (k, o)] = W[h, i, o] if h == k else 0


def rglru_init(key, cfg):
    """RG-LRU parameters (thesis sec. 3.4): gates W_a (recurrence) and W_x (input), Lambda, theta."""
    n = cfg.d_rnn // 2 if cfg.complex_rnn else cfg.d_rnn  # N recurrence channels
    k_a, k_x, k_mag, k_phase = jax.random.split(key, 4)
    a_min, a_max, phase_max = RINGS[cfg.ring]
    # |a| = sigmoid(Lambda) ~ sqrt(U[min^2, max^2]): uniform in area over the ring.
    mag = jnp.sqrt(jax.random.uniform(k_mag, (n,), minval=a_min**2, maxval=a_max**2))
    p = {
        "gate_a": block_diagonal_init(k_a, cfg.d_rnn, n),
        "gate_x": block_diagonal_init(k_x, cfg.d_rnn, n),
        "lambda_": jnp.log(mag / (1.0 - mag)),  # logit
    }
    if cfg.complex_rnn:
        p["theta"] = jax.random.uniform(k_phase, (n,), minval=0.0, maxval=phase_max)
    return p


def rglru_coefficients(p, x, complex_rnn):
    """x (..., R) -> (a, b) (..., N) of h_t = a_t h_(t-1) + b_t, b_t = sqrt(1 - |a_t|^2) i_t x_t.

    log a_t = C r_t log sigmoid(Lambda) + i r_t theta. Choice: like the author's code, c scales the
    magnitude only; the thesis writes a^(c r_t), which would also scale the phase by c.
    """
    x = x.astype(jnp.float32)  # the RG-LRU runs in float32 under mixed precision too
    r = jax.nn.sigmoid(block_diagonal(p["gate_a"], x))  # recurrence gate, eq. 3.8
    i = jax.nn.sigmoid(block_diagonal(p["gate_x"], x))  # input gate, eq. 3.9
    log_mag = C * r * jax.nn.log_sigmoid(p["lambda_"])  # log |a_t| < 0
    gated_x = i * x if not complex_rnn else i * jax.lax.complex(*jnp.split(x, 2, -1))  # [re | im] halves
    a = jnp.exp(jax.lax.complex(log_mag, r * p["theta"])) if complex_rnn else jnp.exp(log_mag)
    b = sqrt_bounded(1.0 - jnp.exp(2.0 * log_mag)) * gated_x  # eq. 3.11
    return a, b


def rnn_output(h):
    """Complex (..., N) -> real [Re h | Im h] (..., R); real h unchanged."""
    return jnp.concatenate([h.real, h.imag], -1) if jnp.iscomplexobj(h) else h


def rglru(p, x, complex_rnn):
    """x (S, B, R) -> (S, B, R), parallel over S with pf.scan (float32 inside, the result in x's dtype)."""
    a, b = rglru_coefficients(p, x, complex_rnn)
    return rnn_output(scan(a, b)).astype(x.dtype)


def rglru_step(p, h, x, complex_rnn):
    """One token: x (B, R), state h (B, N) -> (output (B, R), new h)."""
    a, b = rglru_coefficients(p, x, complex_rnn)
    h = a * h + b
    return rnn_output(h).astype(x.dtype), h


def rope(x, pos):
    """Rotary position embedding as the author's code applies it (recurrentgemma's apply_rope): the
    first half of each head's dims is rotated in pairs (i, i + half/2) by pos / ROPE_WAVELENGTH^(2i/half),
    the second half passes unchanged. x (..., Dh) with pos broadcasting against x[..., 0]."""
    x_rope, x_pass = jnp.split(x, 2, -1)
    quarter = x_rope.shape[-1] // 2
    inv_freq = ROPE_WAVELENGTH ** (-2.0 * jnp.arange(quarter) / x_rope.shape[-1])  # (Dh/4,)
    angle = jnp.asarray(pos, jnp.float32)[..., None] * inv_freq
    first, second = jnp.split(x_rope, 2, -1)
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)  # keep x's dtype (bf16)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin, x_pass], -1)


def attention_init(key, d):
    """Multi-query attention (the author's LocalAttentionBlock): HEADS query heads, one shared key and
    one shared value head (dim D/HEADS), all three bias-free; the output projection has a bias."""
    kq, kk, kv, ko = jax.random.split(key, 4)
    dh = d // HEADS
    return {"q": dense_init(kq, d, d, bias=False), "k": dense_init(kk, d, dh, bias=False),
            "v": dense_init(kv, d, dh, bias=False), "o": dense_init(ko, d, d)}


def attention_qkv(p, y, pos):
    """y (..., D) at positions pos -> rotated, scaled queries (..., H, Dh), rotated keys and values (..., Dh)."""
    q = rearrange(dense(p["q"], y), "... (h d) -> ... h d", h=HEADS)  # (..., H, D/H)
    q = rope(q, pos[..., None]) / math.sqrt(q.shape[-1])  # the same rotation for every head
    return q, rope(dense(p["k"], y), pos), dense(p["v"], y)


def attention(p, y):
    """Causal multi-query attention over S with rotary positions 0..S-1: y (S, B, D) -> (S, B, D)."""
    pos = jnp.arange(y.shape[0])[:, None]  # (S, 1): broadcasts over B
    q, k, v = attention_qkv(p, y, pos)  # (S, B, H, Dh), (S, B, Dh), (S, B, Dh)
    s = jnp.einsum("sbhd,tbd->bhst", q, k)
    causal = jnp.tril(jnp.ones((y.shape[0], y.shape[0]), bool))
    s = jnp.where(causal, s, -jnp.inf)
    o = jnp.einsum("bhst,tbd->sbhd", jax.nn.softmax(s.astype(jnp.float32), -1).astype(v.dtype), v)
    return dense(p["o"], rearrange(o, "s b h d -> s b (h d)"))


def attention_step(p, cache, y, pos):
    """One token at position pos: y (B, D); cache k, v (S_max, B, Dh) -> (out (B, D), cache)."""
    q, k, v = attention_qkv(p, y, jnp.broadcast_to(pos, y.shape[:1]))
    ks = jax.lax.dynamic_update_index_in_dim(cache["k"], k, pos, 0)
    vs = jax.lax.dynamic_update_index_in_dim(cache["v"], v, pos, 0)
    s = jnp.einsum("bhd,tbd->bht", q, ks)
    s = jnp.where(jnp.arange(ks.shape[0]) <= pos, s, -jnp.inf)
    o = jnp.einsum("bht,tbd->bhd", jax.nn.softmax(s.astype(jnp.float32), -1).astype(vs.dtype), vs)
    return dense(p["o"], rearrange(o, "b h d -> b (h d)")), {"k": ks, "v": vs}


def pool_init(key, cfg, factor, scale=1.0):
    """Grouped conv kernel, one (D/G x D/G) block per offset and group: F D^2 / G + D parameters.
    n_in = F D/G, the conv kernel's fan-in as flax counts it (the author's layers)."""
    g, dg = cfg.n_groups, cfg.d_model // cfg.n_groups
    return {"w": normal_init(key, (factor, g, dg, dg), factor * dg, scale), "b": jnp.zeros(cfg.d_model)}


def down_pool(p, x):
    """Strided conv, kernel = stride = F: x (S, B, D) -> (S/F, B, D). Output j reads inputs jF..jF+F-1."""
    f, g = p["w"].shape[:2]
    x = rearrange(x, "(s f) b (g i) -> s f b g i", f=f, g=g)
    y = jnp.einsum("sfbgi,fgio->sbgo", x, p["w"])  # sum over the F offsets
    return rearrange(y, "s b g o -> s b (g o)") + p["b"]


def up_pool(p, y):
    """Transposed strided conv: y (S, B, D) -> (S F, B, D), then shifted right by F-1 steps (zeros in
    front), as the author does: fine position t then reads pooled step floor((t-F+1)/F), whose inputs
    end at position t, so the model stays causal (the input is already shifted by one token)."""
    f, g = p["w"].shape[:2]
    x = rearrange(y, "s b (g i) -> s b g i", g=g)
    x = jnp.einsum("sbgi,fgio->sfbgo", x, p["w"])  # (S, F, B, G, D/G)
    x = rearrange(x, "s f b g o -> (s f) b (g o)") + p["b"]
    return jnp.pad(x, ((f - 1, 0), (0, 0), (0, 0)))[: x.shape[0]]


def up_pool_group(p, y):
    """Step version: one pooled token y (B, D) -> its F fine outputs (F, B, D), before the shift."""
    x = rearrange(y, "b (g i) -> b g i", g=p["w"].shape[1])
    return rearrange(jnp.einsum("bgi,fgio->fbgo", x, p["w"]), "f b g o -> f b (g o)") + p["b"]


def down_pool_offset(p, x, offset):
    """Step version: the contribution W_offset x of one fine token x (B, D) to its pooled token."""
    w = p["w"][offset]  # (G, D/G, D/G)
    x = rearrange(x, "b (g i) -> b g i", g=w.shape[0])
    return rearrange(jnp.einsum("bgi,gio->bgo", x, w), "b g o -> b (g o)")


# ---------------------------------------------------------------- blocks


def res_block_init(key, cfg, kind, scale):
    """ResBlock (Figure 3.4): y = Norm(x); x + Dropout(Dense_out(branch(y) [* gelu(Dense_gate(y))]))."""
    d, r = cfg.d_model, cfg.d_rnn
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if kind == "mlp":
        width, branch = 2 * d, {"dense": dense_init(k1, d, 2 * d)}
    elif kind == "attention":  # the author's AttentionBlock: attention, then its own gelu gate
        width, branch = d, {"attention": attention_init(k1, d), "gate": dense_init(k2, d, d)}
    else:
        width = d
        branch = {"dense_in": dense_init(k1, d, r), "rglru": rglru_init(k2, cfg), "dense_out": dense_init(k3, r, d)}
    p = {"norm": norm_init(d, cfg.norm), "branch": branch, "out": dense_init(k4, width, d, scale)}
    if cfg.gated:
        p["gate"] = dense_init(jax.random.fold_in(key, 1), d, width)
    return p


def res_block(p, x, cfg, branch, keep=None):
    """branch(params, y) -> (z, aux): the block's temporal or channel mixing; returns (x + ..., aux).
    keep: the dropout mask (None: no dropout)."""
    y = norm(p["norm"], x, cfg.norm)
    z, aux = branch(p["branch"], y)
    z = z * jax.nn.gelu(dense(p["gate"], y)) if cfg.gated else jax.nn.gelu(z)
    return x + dropout(dense(p["out"], z), cfg.dropout, keep), aux


def mlp_branch(p, y):
    return dense(p["dense"], y), None


def temporal_branch(cfg):
    def branch(p, y):
        if "attention" in p:
            return attention(p["attention"], y) * jax.nn.gelu(dense(p["gate"], y)), None
        return dense(p["dense_out"], rglru(p["rglru"], dense(p["dense_in"], y), cfg.complex_rnn)), None
    return branch


def layer_stack_init(key, cfg, n, scale, attention=False):
    """n Layers (temporal ResBlock then MLP ResBlock), parameters stacked on a leading axis L."""
    if n == 0:
        return None

    def one(k):
        kt, km = jax.random.split(k)
        return {"temporal": res_block_init(kt, cfg, "attention" if attention else "rglru", scale),
                "mlp": res_block_init(km, cfg, "mlp", scale)}

    return jax.vmap(one)(jax.random.split(key, n))


def layer_stack(p, x, cfg, key=None):
    """Apply the stacked Layers in order (a scan over L). Each ResBlock is rematerialised in the
    backward pass: it stores only its input and its dropout mask, drawn outside the remat so the
    random bits are made once per step, not twice."""
    if p is None:
        return x
    remat = (lambda f: jax.checkpoint(f, policy=REMAT_POLICY)) if REMAT else (lambda f: f)

    def block(name, branch):  # named "temporal" or "mlp" in the compiled program (for profiles)
        return remat(jax.named_scope(name)(lambda q, x, keep: res_block(q, x, cfg, branch, keep)[0]))

    temporal, mlp = block("temporal", temporal_branch(cfg)), block("mlp", mlp_branch)

    def body(x, pk):
        q, key = pk
        keep_t, keep_m = (dropout_mask(kd, cfg.dropout, x.shape) for kd in split_key(key, 2))
        return mlp(q["mlp"], temporal(q["temporal"], x, keep_t), keep_m), None

    layers = jax.tree.leaves(p)[0].shape[0]
    return jax.lax.scan(body, x, (p, None if key is None else jax.random.split(key, layers)))[0]


def split_key(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def skip_block_init(key, cfg, level=0):
    """SkipBlock_level (Figure 3.2); the deepest level is a plain layer stack."""
    n_levels = len(cfg.pooling)
    scale = cfg.level_scale(level)
    k_before, k_down, k_inner, k_up, k_after = jax.random.split(key, 5)
    if level == n_levels:
        return {"layers": layer_stack_init(k_before, cfg, cfg.layers[level], scale, cfg.deepest == "attention")}
    f, n = cfg.pooling[level], cfg.layers[level]
    n_before, n_after = (n, n) if cfg.placement == "around" else (0, 2 * n)
    p = {"down_pool": pool_init(k_down, cfg, f), "inner": skip_block_init(k_inner, cfg, level + 1),
         "up_pool": pool_init(k_up, cfg, f, scale)}
    for name, k, m in (("before", k_before, n_before), ("after", k_after, n_after)):
        if m:
            p[name] = layer_stack_init(k, cfg, m, scale)
    return p


def skip_block(p, x, cfg, key=None, level=0):
    """x (S, B, D) -> (S, B, D). Short skip: layers -> skip -> DownPool -> inner -> UpPool -> +skip
    -> layers. Long skip: the block input is added to the block output instead. Each level's ops are
    named "level<k>" in the compiled program, so a profile can say where the time goes (bench.py)."""
    with jax.named_scope(f"level{level}"):
        if "layers" in p:
            return layer_stack(p["layers"], x, cfg, key)
        k1, k2, k3 = split_key(key, 3)
        h = layer_stack(p.get("before"), x, cfg, k1)
        inner = down_pool(p["down_pool"], h)
    inner = skip_block(p["inner"], inner, cfg, k2, level + 1)
    with jax.named_scope(f"level{level}"):
        u = up_pool(p["up_pool"], inner)
        h = layer_stack(p.get("after"), h + u if cfg.skip == "short" else u, cfg, k3)
        return x + h if cfg.skip == "long" else h


# ---------------------------------------------------------------- the model


def init(key, cfg):
    """Poolformer = embedding -> SkipBlock_0 -> LayerNorm -> Dense(D -> V)."""
    k_emb, k_body, k_head = jax.random.split(key, 3)
    p = {"skip_block": skip_block_init(k_body, cfg), "norm": norm_init(cfg.d_model, "layer"),
         "head": dense_init(k_head, cfg.d_model, cfg.vocab)}
    emb = embedding_init(k_emb, cfg)
    return {"embedding": emb, **p} if emb else p


FLOAT32_PARTS = ("rglru", "norm", "head")  # parameters that mixed precision leaves in float32


def compute_params(params, dtype):
    """The copy of the parameters a forward pass computes with: float leaves cast to dtype, except
    those under FLOAT32_PARTS. Gradients flow back through the cast to the float32 originals."""
    if jnp.dtype(dtype) == jnp.float32:
        return params

    def cast(path, leaf):
        keep = any(getattr(k, "key", None) in FLOAT32_PARTS for k in path)
        return leaf if keep or not jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def head(params, h):
    """Final LayerNorm and Dense(D -> V), in float32: logits (..., V) float32."""
    return dense(params["head"], norm(params["norm"], h.astype(jnp.float32), "layer"))


def apply(params, x, cfg, *, key=None, dtype=jnp.float32):
    """x (B, S) int tokens -> logits (B, S, V) float32; logits[:, t] predicts x[:, t] from x[:, :t].
    key: dropout randomness (None = evaluation, no dropout). dtype: the compute dtype (see the
    module docstring; float32 or bfloat16)."""
    cfg.check_length(x.shape[1])
    params = compute_params(params, dtype)
    x = jnp.concatenate([jnp.full((x.shape[0], 1), SILENCE, x.dtype), x[:, :-1]], 1)  # input t = token t-1
    h = embedding(params.get("embedding"), x.T, cfg).astype(dtype)  # (S, B, D)
    h = skip_block(params["skip_block"], h, cfg, key)
    return head(params, h).transpose(1, 0, 2)  # (S, B, V) -> (B, S, V)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the compute dtypes (--dtype)


def nll_sum(params, tokens, mask, cfg, key=None, dtype="float32", inputs=None):
    """The loss: sum of -log p(token) in nats over unmasked positions (mask (B, S)), and the number
    of those positions. Logits, softmax and cross-entropy are float32 whatever the compute dtype.
    inputs: what the model reads in place of the tokens (train.py --input-noise); None = the tokens."""
    tokens = tokens.astype(jnp.int32)
    logits = apply(params, tokens if inputs is None else inputs.astype(jnp.int32), cfg, key=key, dtype=DTYPES[dtype])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]  # (B, S)
    return jnp.sum(ce * mask), jnp.sum(mask)


def count_params(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# ---- recurrent inference: one token at a time, level k runs once every F_1*..*F_k tokens


def layer_stack_state(p, cfg, batch_size, cache_len, dtype):
    if p is None:
        return None
    n = jax.tree.leaves(p)[0].shape[0]
    if "attention" in p["temporal"]["branch"]:
        dh = cfg.d_model // HEADS
        return {"k": jnp.zeros((n, cache_len, batch_size, dh), dtype),
                "v": jnp.zeros((n, cache_len, batch_size, dh), dtype)}
    width = cfg.d_rnn // 2 if cfg.complex_rnn else cfg.d_rnn
    return jnp.zeros((n, batch_size, width), jnp.complex64 if cfg.complex_rnn else jnp.float32)


def layer_stack_step(p, state, x, pos, cfg):
    """One token x (B, D) at this level's position pos through the stacked Layers."""
    if p is None:
        return x, state

    def temporal_branch_step(s):
        def branch(q, y):
            if "attention" in q:
                z, cache = attention_step(q["attention"], s, y, pos)
                return z * jax.nn.gelu(dense(q["gate"], y)), cache
            z, h = rglru_step(q["rglru"], s, dense(q["dense_in"], y), cfg.complex_rnn)
            return dense(q["dense_out"], z), h
        return branch

    def body(x, qs):
        q, s = qs
        x, s = res_block(q["temporal"], x, cfg, temporal_branch_step(s))
        return res_block(q["mlp"], x, cfg, mlp_branch)[0], s

    return jax.lax.scan(body, x, (p, state))


def skip_block_state(p, cfg, batch_size, cache_len, dtype):
    if "layers" in p:
        return {"layers": layer_stack_state(p["layers"], cfg, batch_size, cache_len, dtype)}
    f = p["up_pool"]["w"].shape[0]
    d = cfg.d_model
    return {"before": layer_stack_state(p.get("before"), cfg, batch_size, cache_len, dtype),
            "after": layer_stack_state(p.get("after"), cfg, batch_size, cache_len, dtype),
            "pool_sum": jnp.zeros((batch_size, d), dtype),  # running DownPool sum of the current group
            "up_buffer": jnp.zeros((f, batch_size, d), dtype),  # UpPool outputs of the last complete group
            "inner": skip_block_state(p["inner"], cfg, batch_size, cache_len, dtype)}


def skip_block_step(p, state, x, pos, cfg):
    """One fine token x (B, D) at position pos of this level -> (output (B, D), state).
    The inner level runs (lax.cond) only when pos closes a group of F tokens."""
    if "layers" in p:
        y, s = layer_stack_step(p["layers"], state["layers"], x, pos, cfg)
        return y, {"layers": s}
    f = p["up_pool"]["w"].shape[0]
    offset = pos % f
    h, before = layer_stack_step(p.get("before"), state["before"], x, pos, cfg)
    pool_sum = state["pool_sum"] + down_pool_offset(p["down_pool"], h, offset)

    def run_inner(_):
        y, inner = skip_block_step(p["inner"], state["inner"], pool_sum + p["down_pool"]["b"], pos // f, cfg)
        return up_pool_group(p["up_pool"], y), inner, jnp.zeros_like(pool_sum)

    def wait(_):
        return state["up_buffer"], state["inner"], pool_sum

    up_buffer, inner, pool_sum = jax.lax.cond(offset == f - 1, run_inner, wait, None)
    u = up_buffer[(offset + 1) % f]  # up_pool's shift by F-1: position pos reads fine output pos-F+1
    y, after = layer_stack_step(p.get("after"), state["after"], h + u if cfg.skip == "short" else u, pos, cfg)
    y = x + y if cfg.skip == "long" else y
    return y, {"before": before, "after": after, "pool_sum": pool_sum, "up_buffer": up_buffer, "inner": inner}


def init_state(cfg, batch_size, seq_len=None, dtype=jnp.float32):
    """Recurrent state before the first token. The RG-LRU's state does not depend on the length;
    seq_len (the most tokens that will be stepped) is needed only to size the deepest level's
    attention cache, of seq_len / (F_1*..*F_n) entries, and is ignored without attention. dtype is
    the compute dtype `step` will be called with: pooling buffers and attention caches hold it, the
    RG-LRU's state stays complex64 (float32 if real) under any dtype."""
    cache_len = None
    if cfg.deepest == "attention":
        if seq_len is None:
            raise ValueError("init_state: deepest='attention' needs seq_len, the number of tokens to step, "
                             "to size its key/value cache")
        cfg.check_length(seq_len)
        cache_len = seq_len // cfg.total_pooling
    shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    return {"pos": jnp.zeros((), jnp.int32),
            "skip_block": skip_block_state(shapes["skip_block"], cfg, batch_size, cache_len, dtype)}


def step(params, state, x_prev, cfg, dtype=jnp.float32):
    """x_prev (B,) the previous token (SILENCE at the start) -> (logits (B, V) float32 of the next
    token, state). dtype: the compute dtype, as in `apply` (the state from init_state(..., dtype))."""
    params = compute_params(params, dtype)
    h = embedding(params.get("embedding"), x_prev, cfg).astype(dtype)  # (B, D)
    h, body = skip_block_step(params["skip_block"], state["skip_block"], h, state["pos"], cfg)
    return head(params, h), {"pos": state["pos"] + 1, "skip_block": body}


# ---------------------------------------------------------------- command line


def field_comments(cls):
    """{field: the comment on its line} of a dataclass, read from the class' source with tokenize: the
    comment the code carries is the --help text, so the two cannot drift apart."""
    tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(cls))).readline))
    names, comments, field = {f.name for f in dataclasses.fields(cls)}, {}, None
    for tok, after in zip(tokens, tokens[1:]):
        if tok.type == tokenize.NAME and tok.string in names and tok.start[1] == 4 and after.string == ":":
            field = tok.string  # a field's line: "    name: type = default  # comment"
        elif tok.type == tokenize.COMMENT and field:
            comments[field] = (comments.get(field, "") + " " + tok.string.lstrip("#").strip()).strip()
        elif tok.type == tokenize.NEWLINE:
            field = None
    return comments


def flag_help(comment, default):
    """The --help text of a flag: its field's comment and the default in effect (argparse escapes %)."""
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{comment or ''} (default: {shown})".strip().replace("%", "%%")


def add_config_args(parser, defaults=Config()):
    """One flag per Config field (--pooling 2 4 4 5, --no-gated, --norm rms, ...); its help is the
    field's comment and the default is the one in `defaults` (a dataset preset's value)."""
    comments = field_comments(Config)
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        kw = {"default": default, "help": flag_help(comments.get(f.name), default)}
        if f.type == "bool" or isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs="*", **kw)
        elif f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], **kw)
        else:
            parser.add_argument(flag, type=float if f.name in ("dropout", "scale") else int, **kw)


def config_from_args(args):
    return Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


def print_tree(tree, indent=""):
    """The parameter tree, with the parameter count of every component."""
    for name, sub in tree.items():
        if isinstance(sub, dict):
            print(f"{indent}{name}: {count_params(sub):,}")
            print_tree(sub, indent + "  ")
        else:
            print(f"{indent}{name} {tuple(sub.shape)}: {int(np.prod(sub.shape)):,}")


def parse_args(argv=None):
    """python pf.py's flags -> Config (one error line for an invalid one)."""
    import data  # its Parser: one error line for a bad flag (NumPy only, no files touched)

    parser = data.Parser(description="Print a Poolformer's parameter tree and count.")
    add_config_args(parser)
    try:
        return config_from_args(parser.parse_args(argv))
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    cfg = parse_args()
    print(cfg)
    shapes = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    print_tree(shapes)
    print(f"params: {count_params(shapes)}")
