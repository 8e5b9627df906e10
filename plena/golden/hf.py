"""Bridge to Hugging Face ``transformers`` Llama models: read a model's shape and weights into
:class:`plena.frontend.model.LlamaParams`, and build a seeded random model (no download).

What our decoder (:func:`plena.golden.llama.decoder`, :func:`plena.frontend.model.compile_decoder`)
covers, in ``transformers`` terms: ``LlamaModel.forward(inputs_embeds=x)`` with positions
``0..S-1`` and a causal mask, i.e. every decoder layer **and** the final ``norm``, returning
``last_hidden_state``; not the token embedding (the input is the embedded activations) and not
the LM head. So ``decoder(params_from_hf(m), x, ...)[0]`` corresponds to
``m.model(inputs_embeds=x).last_hidden_state`` (``m.model`` for a ``LlamaForCausalLM``).

Supported: the plain Llama architecture (RMSNorm, SiLU gated FFN, GQA, default RoPE, no
attention / MLP biases). Anything else raises :class:`ValueError` rather than being silently
approximated. ``torch`` / ``transformers`` are imported only by the functions that need them
(:func:`random_hf_llama`, :func:`hf_rope_tables`); the converters accept any mapping of arrays.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

__all__ = ["hf_shape", "params_from_state_dict", "params_from_hf", "random_hf_llama", "hf_rope_tables"]


def _get(c, name, default=None):
    v = getattr(c, name, None)
    return default if v is None else v


def hf_rope_theta(config) -> float:
    """RoPE base of a Llama config: ``rope_parameters["rope_theta"]`` (transformers >= 5) or
    ``rope_theta`` (older). Rejects RoPE scaling types other than ``default``."""
    rp = _get(config, "rope_parameters") or {}
    rs = _get(config, "rope_scaling") or {}
    for d in (rp, rs):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", None):
            raise ValueError(f"RoPE type {kind!r} is not supported (only the default Llama RoPE)")
    theta = rp.get("rope_theta", _get(config, "rope_theta"))
    return float(10000.0 if theta is None else theta)


def hf_shape(config) -> dict:
    """``{hidden, heads, kv_heads, head_dim, intermediate, layers, rope_theta, eps}`` of a
    ``transformers.LlamaConfig`` (or any object with its attribute names). Raises
    :class:`ValueError` for features our decoder does not model."""
    c = config
    act = _get(c, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r}: only 'silu' (Llama) is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if _get(c, flag, False):
            raise ValueError(f"{flag}=True is not supported")
    heads = int(c.num_attention_heads)
    return dict(hidden=int(c.hidden_size), heads=heads, kv_heads=int(_get(c, "num_key_value_heads", heads)),
                head_dim=int(_get(c, "head_dim", c.hidden_size // heads)),
                intermediate=int(c.intermediate_size), layers=int(c.num_hidden_layers),
                rope_theta=hf_rope_theta(c), eps=float(_get(c, "rms_norm_eps", 1e-6)))


def _np(t) -> np.ndarray:
    """A torch tensor / array-like as a float32 numpy array (copied, off any device)."""
    if hasattr(t, "detach"):
        t = t.detach().to("cpu").float().numpy()
    return np.array(t, dtype=np.float32)


def params_from_state_dict(state_dict: Mapping, config, layers: Optional[int] = None):
    """:class:`~plena.frontend.model.LlamaParams` from a Llama state dict (``LlamaModel`` keys
    ``layers.{i}.self_attn.q_proj.weight`` ..., or ``LlamaForCausalLM`` keys with a ``model.``
    prefix). ``nn.Linear`` weights ``[out, in]`` are transposed to our ``[in, out]``; the
    embedding table and LM head are ignored. ``layers``: keep only the first ``layers``."""
    from plena.frontend.model import LayerParams, LlamaParams

    s = hf_shape(config)
    n = s["layers"] if layers is None else int(layers)
    if not 1 <= n <= s["layers"]:
        raise ValueError(f"layers = {n}, the config has {s['layers']}")
    pre = "model." if any(k.startswith("model.layers.") for k in state_dict) else ""

    def t(key):
        if pre + key not in state_dict:
            raise KeyError(f"state dict has no {pre + key!r}")
        return _np(state_dict[pre + key])

    ls = []
    for i in range(n):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        ls.append(LayerParams(
            wq=t(a + "q_proj.weight").T.copy(), wk=t(a + "k_proj.weight").T.copy(),
            wv=t(a + "v_proj.weight").T.copy(), wo=t(a + "o_proj.weight").T.copy(),
            w_gate=t(m + "gate_proj.weight").T.copy(), w_up=t(m + "up_proj.weight").T.copy(),
            w_down=t(m + "down_proj.weight").T.copy(),
            attn_norm=t(f"layers.{i}.input_layernorm.weight"),
            ffn_norm=t(f"layers.{i}.post_attention_layernorm.weight")))
    p = LlamaParams(s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"], ls,
                    t("norm.weight"), s["rope_theta"], s["eps"])
    want = {"wq": (p.hidden, p.heads * p.head_dim), "wk": (p.hidden, p.kv_heads * p.head_dim),
            "w_down": (p.intermediate, p.hidden)}
    for name, shape in want.items():
        if getattr(ls[0], name).shape != shape:
            raise ValueError(f"{name} has shape {getattr(ls[0], name).shape}, config implies {shape}")
    return p


def params_from_hf(model, layers: Optional[int] = None):
    """:func:`params_from_state_dict` of a ``LlamaModel`` / ``LlamaForCausalLM`` instance."""
    return params_from_state_dict(model.state_dict(), model.config, layers)


def random_hf_llama(config, seed: int = 0, *, causal_lm: bool = False, std: Optional[float] = None):
    """A ``transformers`` Llama model (``LlamaModel``, or ``LlamaForCausalLM`` with
    ``causal_lm``) with seeded random weights, float32, eval mode, eager attention; nothing is
    downloaded. Weights: ``transformers``' own initialisation under ``torch.manual_seed(seed)``,
    unless ``std`` is given: then every linear weight is ``N(0, std^2 / in_features)`` (``std=1``
    keeps activations at unit scale through the layers, a harder test than the tiny default
    init) and every norm weight ``1 + 0.1 N(0, 1)``."""
    import torch
    from transformers import LlamaForCausalLM, LlamaModel

    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(config).float().eval()
    if std is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if name.endswith("norm.weight"):
                    prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g))
                elif prm.ndim == 2:
                    prm.copy_(torch.randn(prm.shape, generator=g) * (std / prm.shape[1] ** 0.5))
    return model


def hf_rope_tables(model, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(seq, head_dim)`` f32 cos / sin tables ``transformers`` itself uses for positions
    ``0..seq-1`` (its rotary module computes the angles in f32; ours,
    :func:`plena.frontend.model.rope_tables`, in f64 -- they agree to ~1e-5 for short sequences)."""
    import torch

    m = getattr(model, "model", model)
    pos = torch.arange(seq)[None]
    dummy = torch.zeros(1, seq, m.config.hidden_size)
    cos, sin = m.rotary_emb(dummy, pos)
    return _np(cos[0]), _np(sin[0])
