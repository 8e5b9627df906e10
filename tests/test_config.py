"""Tests for plena/config.py: the settings loader, its validation and the config types."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from plena import config as C
from plena.config import ConfigError, Latency, PlenaConfig, load_config, parse_size
from plena.numerics.formats import BF16, E4M3, E8M0, MXFP8, PLAIN_BF16, FloatType, IntType, MxFormat, PlainFormat

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "plena_settings.toml"
CONFORMANCE = REPO.parent / "shared" / "conformance"


# ----------------------------------------------------------------------------------------------
# helpers: write (mutated) settings documents
# ----------------------------------------------------------------------------------------------


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def _dump(doc: dict, prefix: tuple = ()) -> list[str]:
    """Minimal TOML writer for the nested-table documents used here."""
    lines = []
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append(f"[{'.'.join(prefix)}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        lines += _dump(v, prefix + (k,))
    return lines


def shipped_doc() -> dict:
    with open(SHIPPED, "rb") as fh:
        return tomllib.load(fh)


def write_doc(tmp_path: Path, doc: dict, name: str = "settings.toml") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(_dump(doc)) + "\n")
    return p


def tx(doc: dict) -> dict:
    return doc["TRANSACTIONAL"]


def expect_error(path: Path, key: str, *, match: str | None = None, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert key in msg, msg
    assert info.value.key == key
    assert info.value.path == str(path)
    if match:
        assert re.search(match, msg, re.IGNORECASE), msg
    return info.value


# ----------------------------------------------------------------------------------------------
# the shipped file
# ----------------------------------------------------------------------------------------------


def test_shipped_file_transactional_values():
    cfg = load_config(SHIPPED)
    # spec §1.1, TRANSACTIONAL column
    assert (cfg.mlen, cfg.vlen, cfg.blen, cfg.hlen, cfg.broadcast_amount) == (64, 64, 4, 16, 4)
    assert cfg.hbm_size == 16 * 2**30
    assert cfg.hbm_width == 512
    assert cfg.matrix_sram_size == 4096 and cfg.mram_tiles == 64
    assert cfg.vector_sram_size == 4194304 and cfg.vram_rows == 4194304
    assert cfg.hbm_m_prefetch_amount == cfg.hbm_m_prefetch_amount_raw == 64
    assert cfg.hbm_m_prefetch_tiles == 1
    assert (cfg.hbm_v_prefetch_amount, cfg.hbm_v_writeback_amount) == (4, 4)
    assert cfg.dc_en == 1 and cfg.max_loop_instructions == 100000
    assert cfg.heads == 4 and cfg.batched_consistent
    assert cfg.section == "TRANSACTIONAL" and cfg.source == str(SHIPPED)
    # spec §1.3
    p = cfg.precision
    assert p.matrix_sram_type == PLAIN_BF16 and p.vector_sram_type == PLAIN_BF16
    for fmt in (p.hbm_m_weight_type, p.hbm_m_kv_type, p.hbm_v_act_type, p.hbm_v_kv_type):
        assert fmt == MxFormat(block=8, elem=FloatType(True, 4, 3), scale=FloatType(False, 8, 0))
        assert fmt.element_scale_ratio == 8
    assert p.hbm_v_int_type == PlainFormat(IntType(32))
    assert p.scalar_fp == FloatType(True, 8, 7)
    # spec §1.4 (en / dis)
    expected_lat = {
        "SYSTOLIC_PROCESSING_OVERHEAD": (0, 0), "VECTOR_ADD_CYCLES": (1, 2),
        "VECTOR_MUL_CYCLES": (1, 5), "VECTOR_EXP_CYCLES": (1, 6), "VECTOR_RECI_CYCLES": (2, 7),
        "VECTOR_MAX_CYCLES": (4, 4), "VECTOR_SUM_CYCLES": (8, 20),
        "VECTOR_PREFIX_SCAN_CYCLES": (9, 9), "VECTOR_SHIFT_CYCLES": (1, 1),
        "SCALAR_FP_LONGEST_OPERATE_CYCLES": (4, 4), "SCALAR_FP_BASIC_CYCLES": (1, 1),
        "SCALAR_FP_EXP_CYCLES": (1, 2), "SCALAR_FP_SQRT_CYCLES": (1, 2),
        "SCALAR_FP_RECI_CYCLES": (1, 2), "SCALAR_INT_BASIC_CYCLES": (1, 1),
    }
    assert len(dataclasses.fields(cfg.latency)) == len(expected_lat)
    for name, (en, dis) in expected_lat.items():
        assert cfg.latency.get(name) == Latency(en, dis), name
    assert cfg.latency.vector_add == Latency(1, 2)
    assert cfg.latency.scalar_fp_basic == Latency(1, 1)
    assert cfg.latency.systolic_processing_overhead == Latency(0, 0)


def test_shipped_file_analytic_section():
    cfg = load_config(SHIPPED, section="ANALYTIC")
    assert (cfg.mlen, cfg.vlen, cfg.blen, cfg.hlen, cfg.broadcast_amount) == (2048, 2048, 128, 128, 16)
    assert cfg.hbm_size == 137438953472 and cfg.max_loop_instructions == 10000
    assert (cfg.hbm_v_prefetch_amount, cfg.hbm_v_writeback_amount) == (16, 16)
    assert cfg.section == "ANALYTIC"
    assert cfg != load_config(SHIPPED)


def test_default_config_is_the_shipped_file_and_cached(monkeypatch, tmp_path):
    doc = shipped_doc()
    tx(doc)["CONFIG"]["BLEN"]["value"] = 8
    monkeypatch.setenv(C.ENV_VAR, str(write_doc(tmp_path, doc)))
    d = C.default_config()
    assert d is C.default_config()
    assert d == load_config(SHIPPED) and d.blen == 4
    assert Path(d.source) == SHIPPED


def test_path_resolution(monkeypatch, tmp_path):
    doc = shipped_doc()
    tx(doc)["CONFIG"]["BLEN"]["value"] = 16
    env_file = write_doc(tmp_path, doc, "env.toml")
    monkeypatch.delenv(C.ENV_VAR, raising=False)
    assert C.resolve_config_path() == C.DEFAULT_CONFIG_PATH == SHIPPED
    assert load_config().blen == 4
    monkeypatch.setenv(C.ENV_VAR, str(env_file))
    assert load_config().blen == 16  # env var used when no path is given
    assert load_config(SHIPPED).blen == 4  # an explicit path wins
    monkeypatch.setenv(C.ENV_VAR, str(tmp_path / "nope.toml"))
    expect_error_path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(str(expect_error_path))):
        load_config()


# ----------------------------------------------------------------------------------------------
# the conformance corpus
# ----------------------------------------------------------------------------------------------


def _conformance_cases():
    if not CONFORMANCE.is_dir():
        return []
    return sorted(p.name for p in CONFORMANCE.iterdir() if (p / "plena_settings.toml").is_file())


def _parse_manifest_format(text: str):
    """'Plain(Fp e8m7)', 'Plain(Int32)', 'Mx(block=8, elem=Fp e4m3s, scale=Fp e8m0u)'."""
    def dtype(s):
        m = re.fullmatch(r"Fp e(\d+)m(\d+)([su]?)", s.strip())
        if m:
            return ("Fp", int(m[1]), int(m[2]), {"s": True, "u": False}.get(m[3]))
        m = re.fullmatch(r"Int(\d+)", s.strip())
        assert m, s
        return ("Int", int(m[1]))
    m = re.fullmatch(r"Plain\((.*)\)", text)
    if m:
        return ("Plain", dtype(m[1]))
    m = re.fullmatch(r"Mx\(block=(\d+), elem=(.*), scale=(.*)\)", text)
    assert m, text
    return ("Mx", int(m[1]), dtype(m[2]), dtype(m[3]))


def _matches(dt, parsed) -> bool:
    if parsed[0] == "Int":
        return dt == IntType(parsed[1])
    ok = isinstance(dt, FloatType) and (dt.exponent, dt.mantissa) == parsed[1:3]
    return ok and (parsed[3] is None or dt.sign == parsed[3])


@pytest.mark.parametrize("case", _conformance_cases() or ["<no conformance corpus>"])
def test_conformance_settings_agree_with_manifest(case):
    if not CONFORMANCE.is_dir():
        pytest.skip("../shared/conformance is absent")
    folder = CONFORMANCE / case
    cfg = load_config(folder / "plena_settings.toml")
    hw = json.loads((folder / "manifest.json").read_text())["hardware"]
    assert cfg.config_values() == hw["config"]
    c = hw["config"]
    assert (cfg.mlen, cfg.vlen, cfg.blen, cfg.hlen) == (c["MLEN"], c["VLEN"], c["BLEN"], c["HLEN"])
    assert cfg.broadcast_amount == c["BROADCAST_AMOUNT"]
    assert cfg.hbm_m_prefetch_amount_raw == c["HBM_M_Prefetch_Amount"]
    assert cfg.hbm_m_prefetch_amount >= cfg.mlen and cfg.hbm_m_prefetch_amount % cfg.mlen == 0
    for field, table in C.PRECISION_TABLES:
        fmt = getattr(cfg.precision, field)
        parsed = _parse_manifest_format(hw["precision"][table])
        if parsed[0] == "Plain":
            assert isinstance(fmt, PlainFormat) and _matches(fmt.data, parsed[1]), table
        else:
            assert isinstance(fmt, MxFormat) and fmt.block == parsed[1], table
            assert _matches(fmt.elem, parsed[2]) and _matches(fmt.scale, parsed[3]), table
    assert _matches(cfg.precision.scalar_fp, _parse_manifest_format(f"Plain({hw['precision']['SCALAR_FP']})")[1])


def test_conformance_mlen128_case_raises_prefetch_and_allows_ba_mismatch():
    path = CONFORMANCE / "de_layer_norm" / "plena_settings.toml"
    if not path.is_file():
        pytest.skip("../shared/conformance/de_layer_norm is absent")
    cfg = load_config(path)  # BA*HLEN = 64 != MLEN = 128, still a valid (runnable) machine
    assert cfg.mlen == 128 and cfg.hbm_m_prefetch_amount_raw == 64
    assert cfg.hbm_m_prefetch_amount == 128  # raised to MLEN
    assert not cfg.batched_consistent
    with pytest.raises(ConfigError, match="BROADCAST_AMOUNT"):
        cfg.require_batched("M_BMM")
    expect_error(path, "TRANSACTIONAL.CONFIG.BROADCAST_AMOUNT.value", strict=True)


# ----------------------------------------------------------------------------------------------
# hashing / jax.jit static argument
# ----------------------------------------------------------------------------------------------


def test_config_hashable_and_static_jit_argument(tmp_path):
    import jax
    import jax.numpy as jnp

    a = load_config(SHIPPED)
    copy_path = tmp_path / "copy.toml"
    copy_path.write_bytes(SHIPPED.read_bytes())
    b = load_config(copy_path)
    assert a is not b and a.source != b.source
    assert a == b and hash(a) == hash(b)  # source takes no part
    assert len({a, b}) == 1
    c = a.replace(dc_en=0)
    assert c != a

    traces = []

    def f(cfg: PlenaConfig, x):
        traces.append(cfg)
        return x * cfg.lat("VECTOR_SUM") + jnp.zeros(cfg.vlen)

    jf = jax.jit(f, static_argnums=0)
    x = jnp.float32(1.0)
    assert float(jf(a, x)[0]) == 8.0
    assert float(jf(b, x)[0]) == 8.0
    assert len(traces) == 1  # equal configs share one cache entry
    assert float(jf(c, x)[0]) == 20.0  # dc_lib_dis column: 20
    assert len(traces) == 2


def test_replace_revalidates_and_rederives():
    cfg = load_config(SHIPPED)
    wide = cfg.replace(mlen=128, vlen=128)
    assert wide.hbm_m_prefetch_amount_raw == 64 and wide.hbm_m_prefetch_amount == 128
    assert wide.mram_tiles == 32
    with pytest.raises(ConfigError, match=r"CONFIG\.VLEN\.value"):
        cfg.replace(vlen=32)
    with pytest.raises(ConfigError, match="must be an integer"):
        cfg.replace(blen=True)
    with pytest.raises(ConfigError, match=r"SCALE\.sign"):
        cfg.replace(precision=dataclasses.replace(
            cfg.precision, hbm_v_kv_type=MxFormat(8, E4M3, FloatType(True, 8, 0))))
    with pytest.raises(ValueError):  # derived field cannot be set directly
        cfg.replace(hbm_m_prefetch_amount=128)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(p)
    assert str(p) in str(info.value) and isinstance(info.value, ValueError)


def test_toml_syntax_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(SHIPPED.read_text() + "\n[TRANSACTIONAL.CONFIG.EXTRA\nvalue = 1\n")
    with pytest.raises(ConfigError, match="TOML syntax error") as info:
        load_config(p)
    assert str(p) in str(info.value)


def test_missing_section(tmp_path):
    doc = shipped_doc()
    del doc["TRANSACTIONAL"]
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL", match="missing")
    # ...while another section still loads
    assert load_config(write_doc(tmp_path, doc, "b.toml"), section="ANALYTIC").mlen == 2048


REQUIRED_KEYS = (
    [("CONFIG", k, "value") for _, k, _ in C.CONFIG_KEYS]
    + [("PRECISION", t) for _, t in C.PRECISION_TABLES]
    + [("PRECISION", "SCALAR_FP")]
    + [("LATENCY", t) for _, t in C.LATENCY_TABLES]
    + [("LATENCY", "VECTOR_SUM_CYCLES", "dc_lib_dis"), ("LATENCY", "VECTOR_ADD_CYCLES", "dc_lib_en")]
    + [("PRECISION", "VECTOR_SRAM_TYPE", "format"), ("PRECISION", "HBM_V_INT_TYPE", "DATA_TYPE"),
       ("PRECISION", "MATRIX_SRAM_TYPE", "DATA_TYPE", "exponent"),
       ("PRECISION", "HBM_M_KV_TYPE", "ELEM", "sign"), ("PRECISION", "SCALAR_FP", "mantissa"),
       ("PRECISION", "HBM_V_INT_TYPE", "DATA_TYPE", "width"), ("PRECISION", "SCALAR_FP", "type")]
)


@pytest.mark.parametrize("keys", REQUIRED_KEYS, ids=lambda k: ".".join(k))
def test_missing_required_key(tmp_path, keys):
    doc = shipped_doc()
    node = tx(doc)
    for k in keys[:-1]:
        node = node[k]
    del node[keys[-1]]
    full = ".".join(("TRANSACTIONAL",) + keys)
    if keys[0] == "CONFIG":
        assert full.endswith(".value")
    err = expect_error(write_doc(tmp_path, doc), full)
    # a deleted table is reported at the leaf key that could not be read
    assert err.key.startswith(full)


def test_missing_config_table_names_value_key(tmp_path):
    doc = shipped_doc()
    del tx(doc)["CONFIG"]["MLEN"]
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL.CONFIG.MLEN.value", match="missing")


def test_hbm_width_is_optional(tmp_path):
    doc = shipped_doc()
    del tx(doc)["CONFIG"]["HBM_WIDTH"]
    cfg = load_config(write_doc(tmp_path, doc))
    assert cfg.hbm_width is None
    assert "HBM_WIDTH" not in cfg.config_values()
    assert cfg == load_config(SHIPPED).replace(hbm_width=None)


WRONG_TYPES = [
    (("CONFIG", "MLEN", "value"), "64"),
    (("CONFIG", "MLEN", "value"), 64.0),
    (("CONFIG", "BLEN", "value"), True),
    (("CONFIG", "HBM_SIZE", "value"), [17179869184]),
    (("CONFIG", "DC_EN", "value"), False),
    (("CONFIG", "MAX_LOOP_INSTRUCTIONS", "value"), "100000"),
    (("LATENCY", "VECTOR_ADD_CYCLES", "dc_lib_en"), 1.5),
    (("LATENCY", "SCALAR_INT_BASIC_CYCLES", "dc_lib_dis"), True),
    (("PRECISION", "HBM_M_WEIGHT_TYPE", "ELEM", "sign"), 1),
    (("PRECISION", "VECTOR_SRAM_TYPE", "DATA_TYPE", "exponent"), "8"),
    (("PRECISION", "HBM_M_WEIGHT_TYPE", "block"), 8.0),
    (("PRECISION", "HBM_V_INT_TYPE", "DATA_TYPE", "width"), "32"),
    (("PRECISION", "MATRIX_SRAM_TYPE", "format"), 1),
    (("PRECISION", "SCALAR_FP", "type"), True),
]


@pytest.mark.parametrize("keys,value", WRONG_TYPES, ids=lambda v: ".".join(v) if isinstance(v, tuple) else repr(v))
def test_wrong_type(tmp_path, keys, value):
    doc = shipped_doc()
    node = tx(doc)
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    expect_error(write_doc(tmp_path, doc), ".".join(("TRANSACTIONAL",) + keys), match="must be")


def test_value_not_in_a_table(tmp_path):
    doc = shipped_doc()
    tx(doc)["CONFIG"]["MLEN"] = 64  # MLEN = 64 instead of [..MLEN] value = 64
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL.CONFIG.MLEN.value", match="must be a table")


def test_unknown_type_and_format(tmp_path):
    doc = shipped_doc()
    tx(doc)["PRECISION"]["HBM_V_ACT_TYPE"]["ELEM"]["type"] = "Float"
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL.PRECISION.HBM_V_ACT_TYPE.ELEM.type", match="unknown type")
    doc = shipped_doc()
    tx(doc)["PRECISION"]["VECTOR_SRAM_TYPE"]["format"] = "Block"
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL.PRECISION.VECTOR_SRAM_TYPE.format", match="unknown format")
    doc = shipped_doc()
    tx(doc)["PRECISION"]["SCALAR_FP"]["type"] = "fp"  # tags are case-sensitive
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL.PRECISION.SCALAR_FP.type", match="unknown type")


@pytest.mark.parametrize("part", ["block", "ELEM", "SCALE"])
def test_mx_table_missing_part(tmp_path, part):
    doc = shipped_doc()
    del tx(doc)["PRECISION"]["HBM_M_WEIGHT_TYPE"][part]
    expect_error(write_doc(tmp_path, doc), f"TRANSACTIONAL.PRECISION.HBM_M_WEIGHT_TYPE.{part}", match="missing")


def test_scalar_fp_accepts_plain_table_but_not_mx(tmp_path):
    doc = shipped_doc()
    tx(doc)["PRECISION"]["SCALAR_FP"] = {"format": "Plain",
                                         "DATA_TYPE": {"type": "Fp", "sign": True, "exponent": 8, "mantissa": 7}}
    assert load_config(write_doc(tmp_path, doc)).precision.scalar_fp == BF16
    tx(doc)["PRECISION"]["SCALAR_FP"] = copy.deepcopy(tx(doc)["PRECISION"]["HBM_M_KV_TYPE"])
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL.PRECISION.SCALAR_FP.format", match="Mx")


INCONSISTENT = [
    # (mutations {keys: value}, key named in the error, message pattern)
    ({("CONFIG", "VLEN", "value"): 32}, "CONFIG.VLEN.value", "must equal MLEN"),
    ({("CONFIG", "MLEN", "value"): 48, ("CONFIG", "VLEN", "value"): 48}, "CONFIG.MLEN.value", "power of two"),
    ({("CONFIG", "BLEN", "value"): 6}, "CONFIG.BLEN.value", "power of two"),
    ({("CONFIG", "HLEN", "value"): 12}, "CONFIG.HLEN.value", "power of two"),
    ({("CONFIG", "BLEN", "value"): 128}, "CONFIG.BLEN.value", "must not exceed MLEN"),
    ({("CONFIG", "HBM_SIZE", "value"): 1000}, "CONFIG.HBM_SIZE.value", "multiple of 64"),
    ({("CONFIG", "MLEN", "value"): 0}, "CONFIG.MLEN.value", r"\[1, "),
    ({("CONFIG", "MATRIX_SRAM_SIZE", "value"): -4096}, "CONFIG.MATRIX_SRAM_SIZE.value", r"\[1, "),
    ({("CONFIG", "VECTOR_SRAM_SIZE", "value"): 0}, "CONFIG.VECTOR_SRAM_SIZE.value", r"\[1, "),
    ({("CONFIG", "HBM_M_Prefetch_Amount", "value"): 0}, "CONFIG.HBM_M_Prefetch_Amount.value", r"\[1, "),
    ({("CONFIG", "HBM_V_Writeback_Amount", "value"): -1}, "CONFIG.HBM_V_Writeback_Amount.value", r"\[1, "),
    ({("CONFIG", "MLEN", "value"): 2**32, ("CONFIG", "VLEN", "value"): 2**32}, "CONFIG.MLEN.value", "4294967295"),
    ({("LATENCY", "VECTOR_EXP_CYCLES", "dc_lib_en"): -1}, "LATENCY.VECTOR_EXP_CYCLES.dc_lib_en", r"\[0, "),
    ({("PRECISION", "HBM_V_ACT_TYPE", "SCALE", "sign"): True}, "PRECISION.HBM_V_ACT_TYPE.SCALE.sign", "unsigned"),
    ({("PRECISION", "HBM_M_KV_TYPE", "ELEM", "mantissa"): 28}, "PRECISION.HBM_M_KV_TYPE.ELEM", "1..32"),
    ({("PRECISION", "HBM_V_KV_TYPE", "SCALE", "exponent"): 7}, "PRECISION.HBM_V_KV_TYPE.SCALE", "power of two"),
    ({("PRECISION", "HBM_M_WEIGHT_TYPE", "block"): 0}, "PRECISION.HBM_M_WEIGHT_TYPE.block", r"\[1, "),
    ({("PRECISION", "HBM_M_WEIGHT_TYPE", "block"): 48}, "PRECISION.HBM_M_WEIGHT_TYPE.block", "does not divide"),
    ({("PRECISION", "VECTOR_SRAM_TYPE", "DATA_TYPE", "exponent"): 0},
     "PRECISION.VECTOR_SRAM_TYPE.DATA_TYPE.exponent", r"\[1, "),
    ({("PRECISION", "SCALAR_FP", "mantissa"): 256}, "PRECISION.SCALAR_FP.mantissa", "255"),
]


@pytest.mark.parametrize("mutations,key,pattern", INCONSISTENT, ids=[k for _, k, _ in INCONSISTENT])
def test_inconsistent_machine(tmp_path, mutations, key, pattern):
    doc = shipped_doc()
    for keys, value in mutations.items():
        node = tx(doc)
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    expect_error(write_doc(tmp_path, doc), "TRANSACTIONAL." + key, match=pattern)


def test_broadcast_mismatch_is_lenient_unless_strict(tmp_path):
    doc = shipped_doc()
    tx(doc)["CONFIG"]["BROADCAST_AMOUNT"]["value"] = 2
    p = write_doc(tmp_path, doc)
    cfg = load_config(p)
    assert cfg.broadcast_amount == 2 and not cfg.batched_consistent
    assert "MISMATCH" in cfg.describe()
    expect_error(p, "TRANSACTIONAL.CONFIG.BROADCAST_AMOUNT.value", match="2 \\* 16 != 64", strict=True)
    load_config(SHIPPED, strict=True).require_batched()  # consistent: no error


def test_unknown_keys_and_other_sections_ignored(tmp_path):
    doc = shipped_doc()
    tx(doc)["CONFIG"]["FANCY_NEW_KNOB"] = {"value": "anything"}
    tx(doc)["LATENCY"]["VECTOR_TELEPORT_CYCLES"] = {"dc_lib_en": 1.5}
    tx(doc)["PRECISION"]["HBM_M_WEIGHT_TYPE"]["comment"] = "e4m3 weights"
    tx(doc)["CONFIG"]["MLEN"]["unit"] = "elements"
    doc["ANALYTIC"]["CONFIG"]["MLEN"]["value"] = "not even a number"
    doc["BEHAVIOR"] = {"CONFIG": {"MLEN": {"value": 7}}}
    assert load_config(write_doc(tmp_path, doc)) == load_config(SHIPPED)
    del doc["ANALYTIC"], doc["MODE"]
    assert load_config(write_doc(tmp_path, doc, "b.toml")) == load_config(SHIPPED)


# ----------------------------------------------------------------------------------------------
# H_PREFETCH_M amount rounding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,mlen,expected",
    [(1, 64, 64), (16, 64, 64), (63, 64, 64), (64, 64, 64), (65, 64, 128), (100, 64, 128),
     (128, 64, 128), (129, 64, 192), (64, 128, 128), (200, 16, 208), (16, 16, 16), (4, 16, 16)],
)
def test_prefetch_amount_rounding(tmp_path, raw, mlen, expected):
    doc = shipped_doc()
    tx(doc)["CONFIG"]["HBM_M_Prefetch_Amount"]["value"] = raw
    tx(doc)["CONFIG"]["MLEN"]["value"] = mlen
    tx(doc)["CONFIG"]["VLEN"]["value"] = mlen
    tx(doc)["CONFIG"]["HLEN"]["value"] = mlen // 4
    cfg = load_config(write_doc(tmp_path, doc))
    assert cfg.hbm_m_prefetch_amount_raw == raw
    assert cfg.hbm_m_prefetch_amount == expected
    assert cfg.hbm_m_prefetch_tiles == expected // mlen
    assert cfg.config_values()["HBM_M_Prefetch_Amount"] == raw


# ----------------------------------------------------------------------------------------------
# --hbm-size syntax
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [("64", 64), ("1024", 1024), ("17179869184", 16 * 2**30), ("1K", 1024), ("1k", 1024),
     ("1KB", 1024), ("1KiB", 1024), ("1kib", 1024), ("1ki", 1024), ("3K", 3072),
     ("256M", 256 * 2**20), ("256MiB", 256 * 2**20), ("256mb", 256 * 2**20), ("1G", 2**30),
     ("16GiB", 16 * 2**30), ("2T", 2 * 2**40), ("128B", 128), ("  1G\n", 2**30), (4096, 4096)],
)
def test_parse_size_valid(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text,pattern",
    [("", "invalid size"), ("G", "invalid size"), ("abc", "invalid size"), ("1.5G", "invalid size"),
     ("-64", "invalid size"), ("+64", "invalid size"), ("1 G", "invalid size"), ("1X", "invalid size"),
     ("1KK", "invalid size"), ("1iB", "invalid size"), ("1GiBB", "invalid size"),
     ("0", "positive"), ("7", "multiple of 64"), ("1000", "multiple of 64"), ("1000B", "multiple of 64"),
     (100, "multiple of 64"), (True, "invalid size"), ("99999999T", "64 bits"), (None, "invalid size")],
)
def test_parse_size_invalid(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_size(text)


def test_with_hbm_size_override():
    cfg = load_config(SHIPPED)
    small = cfg.with_hbm_size("256M")
    assert small.hbm_size == 256 * 2**20 and small.hbm_blocks == 4 * 2**20
    assert small != cfg and small.replace(hbm_size=cfg.hbm_size) == cfg
    with pytest.raises(ValueError, match="multiple of 64"):
        cfg.with_hbm_size("100")


# ----------------------------------------------------------------------------------------------
# latency column selection
# ----------------------------------------------------------------------------------------------


def test_latency_column_selection(tmp_path):
    en = load_config(SHIPPED)
    assert en.dc_en == 1
    assert [en.lat(n) for n in ("vector_add", "vector_mul", "vector_exp", "vector_reci", "vector_sum")] == [1, 1, 1, 2, 8]
    doc = shipped_doc()
    tx(doc)["CONFIG"]["DC_EN"]["value"] = 0
    dis = load_config(write_doc(tmp_path, doc))
    assert [dis.lat(n) for n in ("vector_add", "vector_mul", "vector_exp", "vector_reci", "vector_sum")] == [2, 5, 6, 7, 20]
    assert dis == en.replace(dc_en=0)
    assert en.replace(dc_en=7).lat("VECTOR_SUM_CYCLES") == 8  # any non-zero selects dc_lib_en
    assert Latency(3, 9).cycles(1) == 3 and Latency(3, 9).cycles(0) == 9


def test_latency_name_forms():
    cfg = load_config(SHIPPED).replace(dc_en=0)
    assert cfg.lat("VECTOR_RECI_CYCLES") == cfg.lat("VECTOR_RECI") == cfg.lat("vector_reci") == 7
    assert cfg.lat("vector_reci_cycles") == 7
    assert cfg.lat("SYSTOLIC_PROCESSING_OVERHEAD") == 0
    assert cfg.lat("vector_min") == cfg.lat("VECTOR_MAX_CYCLES") == 4  # V_MIN_VF costs VECTOR_MAX
    assert cfg.lat("scalar_fp_exp") == 2 and cfg.lat("SCALAR_INT_BASIC_CYCLES") == 1
    with pytest.raises(KeyError, match="unknown latency"):
        cfg.lat("VECTOR_TELEPORT_CYCLES")


# ----------------------------------------------------------------------------------------------
# describe
# ----------------------------------------------------------------------------------------------


def test_describe_mentions_topology_and_formats():
    text = load_config(SHIPPED).describe()
    for needle in ("MLEN=64", "VLEN=64", "BLEN=4", "HLEN=16", "BROADCAST_AMOUNT=4", "64 tiles",
                   "16 GiB", str(MXFP8), str(PLAIN_BF16), "DC_EN=1", "TRANSACTIONAL"):
        assert needle in text, needle
    assert len(text.splitlines()) < 15
    wide = load_config(SHIPPED).replace(mlen=128, vlen=128)
    assert "file says 64" in wide.describe()  # effective prefetch differs from the file
    assert str(E8M0) in text and str(E4M3) in text
