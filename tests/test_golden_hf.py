"""fp32 golden decoder vs the ``transformers`` Llama forward pass (plena.golden.hf).

What is compared: ``plena.golden.llama.decoder`` covers every decoder layer and the final
RMSNorm, starting from the embedded activations -- i.e. ``LlamaModel(inputs_embeds=x)
.last_hidden_state`` (positions 0..S-1, causal). Weights are seeded random (no download), read
from the torch model's state dict by :func:`plena.golden.hf.params_from_hf`.

Tolerance ("float32 noise"): the reference is the same torch model run in float64. Our fp32
golden must be as close to it as torch's own float32 forward is, up to a factor 4 (measured
ratios 1.1-1.9: different but equally valid f32 summation orders), and in absolute terms within
a few float32 ulps of the (unit-scale, RMS-normalised) outputs: rel L2 < 3e-6, max abs < 3e-5.
A real modelling error (a transposed weight, a wrong RoPE base or GQA head map, a missing
residual) gives errors of order 1e-2..1.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from plena.config import default_config  # noqa: E402
from plena.frontend.model import from_hf_config, rope_tables  # noqa: E402
from plena.golden import Policy  # noqa: E402
from plena.golden.hf import (hf_rope_tables, hf_shape, params_from_hf, params_from_state_dict,  # noqa: E402
                             random_hf_llama)
from plena.golden.llama import decoder  # noqa: E402

CFG = default_config()
F32 = Policy.fp32(CFG)
SEQ = 64

TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def config(shape, layers, theta=100000.0):
    return transformers.LlamaConfig(num_hidden_layers=layers, rms_norm_eps=1e-5, vocab_size=32,
                                    rope_theta=theta, **shape)


def rel_l2(a, ref):
    return float(np.linalg.norm(np.float64(a) - ref) / np.linalg.norm(ref))


def torch_forward(model, x):
    """(float32 output, float64 output) of the torch model on inputs_embeds ``x``."""
    m = getattr(model, "model", model)
    with torch.no_grad():
        y32 = m(inputs_embeds=torch.from_numpy(x)[None]).last_hidden_state[0].numpy()
        m64 = type(m)(m.config).double().eval()
        m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        y64 = m64(inputs_embeds=torch.from_numpy(x).double()[None]).last_hidden_state[0].numpy()
    return y32, y64


@pytest.mark.parametrize("shape,layers,std,causal_lm", [
    pytest.param(TINY, 3, 1.0, False, id="tiny-gqa-3layers"),
    pytest.param(TINY, 2, None, True, id="tiny-causal-lm-hf-init"),
    pytest.param(SMOLLM2, 2, 1.0, False, id="smollm2-shape-2layers"),
])
def test_fp32_golden_matches_transformers(shape, layers, std, causal_lm, capsys):
    model = random_hf_llama(config(shape, layers), seed=11, std=std, causal_lm=causal_lm)
    p = params_from_hf(model)
    assert (p.num_layers, p.hidden, p.heads, p.kv_heads, p.head_dim) == (
        layers, shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"])
    assert p.rope_theta == 100000.0 and p.eps == 1e-5
    x = np.random.default_rng(4).standard_normal((SEQ, p.hidden)).astype(np.float32)
    y32, y64 = torch_forward(model, x)
    ours = np.asarray(decoder(p, x, CFG, seq=SEQ, policy=F32)[0])
    assert ours.shape == y64.shape and np.all(np.isfinite(ours))
    torch_err, our_err = rel_l2(y32, y64), rel_l2(ours, y64)
    max_abs = float(np.abs(np.float64(ours) - y64).max())
    with capsys.disabled():
        print(f"\n  rel L2 vs float64 torch: ours {our_err:.3g}, torch f32 {torch_err:.3g}; "
              f"ours vs torch f32 max abs {np.abs(ours - y32).max():.3g}", end="")
    assert our_err <= 4 * torch_err
    assert our_err < 3e-6 and max_abs < 3e-5
    assert rel_l2(ours, y32) < 3e-6


def test_wrong_conversion_is_detected():
    """The tolerance above separates real modelling errors from f32 noise: a one-layer model with
    one transposed weight or the wrong RoPE base is far off."""
    model = random_hf_llama(config(TINY, 1), seed=2, std=1.0)
    x = np.random.default_rng(5).standard_normal((SEQ, 128)).astype(np.float32)
    _, y64 = torch_forward(model, x)
    p = params_from_hf(model)
    bad = params_from_hf(model)
    bad.layers[0].w_up = np.ascontiguousarray(bad.layers[0].w_up[:, ::-1])  # permuted intermediate channels
    assert rel_l2(np.asarray(decoder(bad, x, CFG, seq=SEQ, policy=F32)[0]), y64) > 1e-2
    bad = params_from_hf(model)
    bad.rope_theta = 10000.0
    assert rel_l2(np.asarray(decoder(bad, x, CFG, seq=SEQ, policy=F32)[0]), y64) > 1e-3
    assert rel_l2(np.asarray(decoder(p, x, CFG, seq=SEQ, policy=F32)[0]), y64) < 3e-6


def test_conversion_details():
    c = config(TINY, 2, theta=5000.0)
    s = hf_shape(c)
    assert s == dict(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, layers=2,
                     rope_theta=5000.0, eps=1e-5)
    # the shape-only constructor reads the same RoPE base (transformers 5 keeps it in rope_parameters)
    assert from_hf_config(c).rope_theta == 5000.0
    lm = random_hf_llama(c, seed=1, causal_lm=True)
    sd = lm.state_dict()
    assert any(k.startswith("model.layers.") for k in sd)
    p1 = params_from_state_dict(sd, c, layers=1)
    assert p1.num_layers == 1
    w = sd["model.layers.0.self_attn.k_proj.weight"].numpy()  # torch [out, in]
    np.testing.assert_array_equal(p1.layers[0].wk, w.T)
    assert p1.layers[0].wk.shape == (128, 64)
    np.testing.assert_array_equal(p1.final_norm, sd["model.norm.weight"].numpy())
    # our RoPE tables equal transformers' (which computes the angles in f32) to f32 noise
    cos, sin = hf_rope_tables(lm, SEQ)
    c2, s2 = rope_tables(SEQ, 32, 5000.0)
    np.testing.assert_allclose(cos, c2, atol=1e-5)
    np.testing.assert_allclose(sin, s2, atol=1e-5)
    with pytest.raises(ValueError, match="layers"):
        params_from_state_dict(sd, c, layers=3)
    with pytest.raises(ValueError, match="hidden_act"):
        hf_shape(transformers.LlamaConfig(hidden_act="gelu", **TINY))
    scaled = transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                      **TINY)
    with pytest.raises(ValueError, match="RoPE"):
        hf_shape(scaled)
