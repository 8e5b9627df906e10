"""A Llama-family decoder compiled into one PLENA program with the frontend ops.

Per layer (``S`` = seq rows, ``D`` = hidden, ``H`` / ``Hkv`` heads, ``d`` = head_dim)::

    h  = rms_norm(x, attn_norm)                       ops_basic.rms_norm
    q, k, v = h @ wq, h @ wk, h @ wv                  ops_basic.linear
    q, k = rope(q), rope(k)   (in place, per head)    ops_ffn.rope
    K, V -> HBM (kv format)                           store_matrix (H_STORE_V)
    a  = causal GQA flash attention(q, K, V)          ops_attention.flash_attention
    x1 = (a @ wo) + x                                 ops_basic.linear, residual_add
    h2 = rms_norm(x1, ffn_norm)
    x2 = ffn(h2) + x1     (W_down(silu(h2 Wg) * h2 Wu)) ops_ffn.ffn, residual_add

then ``y = rms_norm(x_L, final_norm)``. :func:`plena.golden.llama.decoder` computes the same
thing with the same roundings.

Weights are ``[in, out]`` matrices (the transpose of a ``torch.nn.Linear`` weight), placed in
HBM in the weight MX format; the norm weights are (1, D) activation tensors; the input ``X``
(embedded tokens, ``S x D``) is an activation tensor. The RoPE cos / sin tables (positions
``0..S-1``) are **preloaded into VRAM** as bf16 (``meta["vram_preload"]``: pass it to
``program.run(vram=...)``), so that they are not MX-quantised.

Head dims: ``head_dim`` a multiple of MLEN (``n`` column blocks per head; RoPE's rotate-half
is one K-chunked product over the head's ``n`` blocks), or a multiple of HLEN dividing MLEN
(``MLEN / head_dim`` heads per column block; RoPE per column block with the tables tiled
across its heads); attention takes the matching path of
:func:`plena.frontend.ops_attention.flash_attention` (HLEN: M_BTMM, MLEN: M_TMM, others: the
general head-dim path). Restrictions (checked, :class:`BuildError`): that head dim, ``VLEN ==
MLEN``, ``seq`` a multiple of MLEN, hidden, intermediate, ``heads * head_dim`` and
``kv_heads * head_dim`` multiples of MLEN.

Every intermediate gets its own VRAM storage (VRAM is large), so after one run
``meta["intermediates"][name].read(program, result)`` gives its value; names are
``L{i}.attn_norm``, ``L{i}.q``, ``L{i}.k``, ``L{i}.v`` (q and k after RoPE), ``L{i}.attn``,
``L{i}.o_proj``, ``L{i}.resid1``, ``L{i}.ffn_norm``, ``L{i}.ffn``, ``L{i}.resid2`` and
``final_norm`` (the output). Stages: ``L{i}.attn_norm``, ``L{i}.qkv``, ``L{i}.rope``,
``L{i}.kv_store``, ``L{i}.attn``, ``L{i}.o_proj``, ``L{i}.resid1``, ``L{i}.ffn_norm``,
``L{i}.ffn.{gate,up,act,down}``, ``L{i}.resid2``, ``final_norm``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from plena.config import default_config
from plena.frontend import ops_attention as FA
from plena.frontend import ops_basic as FB
from plena.frontend import ops_ffn as FF
from plena.frontend.builder import ProgramBuilder
from plena.frontend.program import BuildError, Program, VramRegion
from plena.golden.ops_ffn import rotate_half_matrix
from plena.numerics.bf16 import f32_to_bf16_bits_np

__all__ = ["LayerParams", "LlamaParams", "PRESETS", "random_params", "preset_params", "from_hf_config",
           "rope_tables", "compile_decoder"]


@dataclasses.dataclass
class LayerParams:
    """One decoder layer: linear weights ``[in, out]`` (f32), norm weights ``(D,)``."""

    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    attn_norm: np.ndarray
    ffn_norm: np.ndarray


@dataclasses.dataclass
class LlamaParams:
    """Weights and shape of a Llama-family decoder (no embedding table / LM head: the input is
    the embedded activations)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: list
    final_norm: np.ndarray
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def num_layers(self) -> int:
        return len(self.layers)


#: model shapes: smollm2-135m is HuggingFaceTB/SmolLM2-135M's (hidden 576, 9 heads / 3 kv heads
#: of 64, intermediate 1536); "clm-60m" is a clm-60m-*shaped* small Llama (384 / 6 / 2 / 64 /
#: 1024), chosen to fit MLEN 64, not taken from a published checkpoint.
PRESETS = {
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                         rope_theta=100000.0, eps=1e-5),
    "clm-60m": dict(hidden=384, heads=6, kv_heads=2, head_dim=64, intermediate=1024,
                    rope_theta=10000.0, eps=1e-5),
}


def random_params(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, layers: int,
                  seed: int = 0, *, rope_theta: float = 10000.0, eps: float = 1e-5) -> LlamaParams:
    """Seeded random weights: linear weights ``N(0, 1/in)``, norm weights ``1 + 0.1 N(0, 1)``."""
    rng = np.random.default_rng(seed)

    def lin(i, o):
        return (rng.standard_normal((i, o)) / math.sqrt(i)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    qd, kd = heads * head_dim, kv_heads * head_dim
    ls = [LayerParams(wq=lin(hidden, qd), wk=lin(hidden, kd), wv=lin(hidden, kd), wo=lin(qd, hidden),
                      w_gate=lin(hidden, intermediate), w_up=lin(hidden, intermediate),
                      w_down=lin(intermediate, hidden), attn_norm=norm(hidden), ffn_norm=norm(hidden))
          for _ in range(layers)]
    return LlamaParams(hidden, heads, kv_heads, head_dim, intermediate, ls, norm(hidden),
                       float(rope_theta), float(eps))


def preset_params(model: str, layers: int, seed: int = 0) -> LlamaParams:
    """:func:`random_params` with the shape of a :data:`PRESETS` entry."""
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r}: expected one of {sorted(PRESETS)}")
    return random_params(layers=layers, seed=seed, **PRESETS[model])


def from_hf_config(hf_config, layers: Optional[int] = None, seed: int = 0) -> LlamaParams:
    """Random weights with the shape of a ``transformers.LlamaConfig`` (any object with its
    attribute names; ``transformers`` itself is not imported)."""
    from plena.golden.hf import hf_rope_theta  # rope_theta moved into rope_parameters in transformers 5

    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return random_params(c.hidden_size, c.num_attention_heads, getattr(c, "num_key_value_heads", None)
                         or c.num_attention_heads, head_dim, c.intermediate_size,
                         layers if layers is not None else c.num_hidden_layers, seed,
                         rope_theta=hf_rope_theta(c), eps=getattr(c, "rms_norm_eps", 1e-5))


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """f32 ``(seq, head_dim)`` cos / sin tables for positions ``0..seq-1`` (Llama rotate-half
    convention: both halves hold the same angles)."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.outer(np.arange(seq, dtype=np.float64), inv)
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _sub_region(m: FB.VramMatrix, j: int) -> VramRegion:
    """Column block ``j`` of ``m`` as a plain region of ``pitch`` rows."""
    return VramRegion(f"{m.name}[blk{j}]", m.addr(0, j), m.pitch, m.vlen)


def _rope_wide(b: ProgramBuilder, m: FB.VramMatrix, j: int, d: int, cos_m: FB.VramMatrix, sin_m: FB.VramMatrix,
               rot_w, mram, rot: FB.VramMatrix, name: str) -> None:
    """RoPE in place on head ``j`` of ``m`` when a head spans ``n = d / MLEN`` column blocks:
    ``rot = x_head @ R`` (R = rotate-half of ``d``, one K-chunked linear over the head's blocks,
    exact), then per block and row ``r = r * sin; x = x * cos; x = x + r`` as
    :func:`plena.frontend.ops_ffn.rope` does."""
    vlen = b.cfg.vlen
    n = d // vlen
    view = FB.VramMatrix(VramRegion(f"{m.name}[head{j}]", m.addr(0, j * n), n * m.pitch, vlen), m.rows, d, m.pitch)
    FB.linear(b, view, rot_w, out=rot, mram=mram, name=f"{name}.rotate_half")
    b.comment(f"{name}: x = x * cos + rotate_half(x) * sin over {n} column blocks")
    regs = [b.gp(f"{name} {what}") for what in ("x", "cos", "sin", "rot")]
    rx, rc, rs, rr = regs
    for c in range(n):
        for reg, addr in zip(regs, (view.addr(0, c), cos_m.addr(0, c), sin_m.addr(0, c), rot.addr(0, c))):
            b.li(reg, addr)
        with b.loop(m.rows, f"{name} rows"):
            b.emit("V_MUL_VV", rr, rr, rs, 0)
            b.emit("V_MUL_VV", rx, rx, rc, 0)
            b.emit("V_ADD_VV", rx, rx, rr, 0)
            for reg in regs:
                b.add_imm(reg, vlen)
    b.free(*regs)


def compile_decoder(params: LlamaParams, cfg=None, *, seq: int, layers: Optional[int] = None,
                    x: Optional[np.ndarray] = None, seed: int = 0) -> tuple[Program, dict]:
    """Emit the decoder (module docstring) for ``seq`` tokens and ``layers`` layers (default: all
    of ``params``). ``x``: the embedded input ``(seq, hidden)`` (default: seeded ``N(0, 1)``).

    Returns ``(program, meta)``; ``meta`` holds ``x`` (f32 input), ``cos`` / ``sin`` (f32 tables),
    ``vram_preload`` (u16 bf16 bits for ``program.run(vram=...)``), ``intermediates`` (name ->
    :class:`~plena.frontend.ops_basic.VramMatrix`), ``output`` (the final VramMatrix),
    ``layers``, ``seq``."""
    cfg = default_config() if cfg is None else cfg
    p = params
    L = p.num_layers if layers is None else int(layers)
    if not 1 <= L <= p.num_layers:
        raise BuildError(f"compile_decoder: layers = {L}, params have {p.num_layers}")
    mlen, vlen = cfg.mlen, cfg.vlen
    d, H, Hkv, D, I = p.head_dim, p.heads, p.kv_heads, p.hidden, p.intermediate
    if vlen != mlen:
        raise BuildError(f"compile_decoder: needs VLEN == MLEN ({vlen}, {mlen})")
    if d % 2 or not (d % mlen == 0 or (mlen % d == 0 and d % cfg.hlen == 0)):
        raise BuildError(f"compile_decoder: head_dim {d} must be even and a multiple of MLEN = {mlen}, or a "
                         f"multiple of HLEN = {cfg.hlen} dividing MLEN")
    if (H * d) % mlen or (Hkv * d) % mlen:
        raise BuildError(f"compile_decoder: heads * head_dim ({H * d}) and kv_heads * head_dim ({Hkv * d}) must "
                         f"be multiples of MLEN = {mlen}")
    if seq < 1 or seq % mlen:
        raise BuildError(f"compile_decoder: seq {seq} must be a positive multiple of MLEN = {mlen}")
    for n, v in (("hidden", D), ("intermediate", I)):
        if v % mlen:
            raise BuildError(f"compile_decoder: {n} {v} is not a multiple of MLEN = {mlen}")
    if H % Hkv:
        raise BuildError(f"compile_decoder: heads {H} not a multiple of kv_heads {Hkv}")
    if x is None:
        x = np.random.default_rng(seed + 7919).standard_normal((seq, D)).astype(np.float32)
    x = np.asarray(x, np.float32)
    if x.shape != (seq, D):
        raise BuildError(f"compile_decoder: x has shape {x.shape}, expected {(seq, D)}")

    b = ProgramBuilder(cfg)
    P = cfg.hbm_m_prefetch_amount
    pv = cfg.hbm_v_prefetch_amount
    kv_pad = math.lcm(P, cfg.hbm_v_writeback_amount, pv)

    # RoPE tables first: at VRAM 0, so the preload image is small
    cos, sin = rope_tables(seq, d, p.rope_theta)
    reps = max(1, mlen // d)  # heads per column block: the tables are tiled across them
    cos_m = FB.vram_matrix(b, "rope.cos", seq, d * reps)
    sin_m = FB.vram_matrix(b, "rope.sin", seq, d * reps)
    if cos_m.pitch != seq:
        raise BuildError(f"compile_decoder: seq {seq} is not a multiple of BLEN / HBM burst sizes")
    image = np.concatenate([cos_m.to_vram_rows(np.tile(cos, (1, reps))),
                            sin_m.to_vram_rows(np.tile(sin, (1, reps)))], axis=0).reshape(-1)
    vram_preload = f32_to_bf16_bits_np(image).astype(np.uint16)
    assert sin_m.end == len(vram_preload)

    xt = b.hbm_input("x.hbm", x, pad_rows=pv)
    wide = d > mlen  # a head spans d / MLEN column blocks
    rot_w = FF.weight_input(b, "rope.R", rotate_half_matrix(d, d)) if wide else FF.rope_weight(b, "rope.R", d)
    mram = b.mram("weights", max(FF.weight_tiles(cfg, k) for k in (D, I, H * d)))
    fp_state = b.fpsram("attn.state", np.zeros(FA.fp_state_words(cfg)))
    rot_scratch = FB.vram_matrix(b, "rope.rot", seq, d, pitch=seq) if wide else b.vram("rope.rot", seq)

    def w(name, a):
        return FF.weight_input(b, name, a)

    def nv(name, a):
        return b.hbm_input(name, np.asarray(a, np.float32).reshape(1, -1), pad_rows=pv)

    inter: dict[str, FB.VramMatrix] = {}
    with b.stage("load_x"):
        cur = FB.as_vram(b, xt, "x")
    inter["x"] = cur
    for li in range(L):
        lp = p.layers[li]
        pre = f"L{li}"
        with b.stage(f"{pre}.attn_norm"):
            h = FB.rms_norm(b, cur, weight=nv(f"{pre}.attn_norm.w", lp.attn_norm), eps=p.eps,
                            name=f"{pre}.attn_norm")
        with b.stage(f"{pre}.qkv"):
            q = FB.linear(b, h, w(f"{pre}.wq", lp.wq), mram=mram, name=f"{pre}.q")
            k = FB.linear(b, h, w(f"{pre}.wk", lp.wk), mram=mram, name=f"{pre}.k")
            v = FB.linear(b, h, w(f"{pre}.wv", lp.wv), mram=mram, name=f"{pre}.v")
        with b.stage(f"{pre}.rope"):
            for m, nh in ((q, H), (k, Hkv)):
                if wide:
                    for j in range(nh):
                        _rope_wide(b, m, j, d, cos_m, sin_m, rot_w, mram, rot_scratch, f"{m.name}.rope{j}")
                    continue
                for j in range(nh * d // mlen):  # column blocks of MLEN / d heads each
                    r = _sub_region(m, j)
                    FF.rope(b, r, cos_m.region, sin_m.region, r, head_dim=d, rot_weight=rot_w, mram=mram,
                            rot=rot_scratch, name=f"{m.name}.rope{j}")
        with b.stage(f"{pre}.kv_store"):
            kt = b.hbm_output(f"{pre}.K", seq, Hkv * d, use="kv", pad_rows=kv_pad)
            vt = b.hbm_output(f"{pre}.V", seq, Hkv * d, use="kv", pad_rows=kv_pad)
            FB.store_matrix(b, k, kt)
            FB.store_matrix(b, v, vt)
        with b.stage(f"{pre}.attn"):
            a = FA.flash_attention(b, q, kt, vt, num_heads=H, num_kv_heads=Hkv, head_dim=d, causal=True,
                                   fp_state=fp_state, name=f"{pre}.attn")
        with b.stage(f"{pre}.o_proj"):
            o = FB.linear(b, a, w(f"{pre}.wo", lp.wo), mram=mram, name=f"{pre}.o")
        with b.stage(f"{pre}.resid1"):
            x1 = FB.residual_add(b, o, cur, name=f"{pre}.resid1")
        with b.stage(f"{pre}.ffn_norm"):
            h2 = FB.rms_norm(b, x1, weight=nv(f"{pre}.ffn_norm.w", lp.ffn_norm), eps=p.eps,
                             name=f"{pre}.ffn_norm")
        f = FB.vram_matrix(b, f"{pre}.ffn.out", seq, D)
        if h2.pitch != seq or f.pitch != seq:
            raise BuildError("compile_decoder: ffn needs pitch == seq")
        FF.ffn(b, h2.region, seq, w(f"{pre}.w_gate", lp.w_gate), w(f"{pre}.w_up", lp.w_up),
               w(f"{pre}.w_down", lp.w_down), f.region, act="silu", mram=mram, name=f"{pre}.ffn")
        with b.stage(f"{pre}.resid2"):
            x2 = FB.residual_add(b, f, x1, name=f"{pre}.resid2")
        inter.update({f"{pre}.attn_norm": h, f"{pre}.q": q, f"{pre}.k": k, f"{pre}.v": v, f"{pre}.attn": a,
                      f"{pre}.o_proj": o, f"{pre}.resid1": x1, f"{pre}.ffn_norm": h2, f"{pre}.ffn": f,
                      f"{pre}.resid2": x2})
        cur = x2
    with b.stage("final_norm"):
        y = FB.rms_norm(b, cur, weight=nv("final_norm.w", p.final_norm), eps=p.eps, name="final_norm")
    inter["final_norm"] = y
    prog = b.build()
    meta = dict(x=x, cos=cos, sin=sin, vram_preload=vram_preload, intermediates=inter, output=y,
                layers=L, seq=seq)
    return prog, meta
