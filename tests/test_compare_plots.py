"""``plena compare``: two dump folders of a small frontend program, one with a planted
difference; the text numbers match a direct computation and the PNGs are valid images."""

import json
import shutil

import matplotlib.image as mpimg
import numpy as np

from plena.cli import main as cli_main
from plena.config import default_config
from plena.frontend import ProgramBuilder
from plena.frontend import ops_basic as F
from plena.numerics.bf16 import bf16_bits_to_f32_np
from plena.verify.dumps import write_dump_dir
from plena.verify.plots import compare_dump_folders, vram_tensors_from_dumps

CFG = default_config().replace(mlen=16, vlen=16, hlen=4, broadcast_amount=4, blen=8,
                               hbm_m_prefetch_amount_raw=32, hbm_v_prefetch_amount=4,
                               hbm_v_writeback_amount=8)


def _png_ok(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _linear_then(cfg, second, tmp_path):
    """A linear layer followed by ``second`` (softmax / rms_norm) run on ``cfg``; its program and
    dumps written to folder a, copied to b. Returns (dumps, a, b, tensors metadata)."""
    rng = np.random.default_rng(0)
    b = ProgramBuilder(cfg)
    x = b.hbm_input("x", rng.standard_normal((8, 32)).astype(np.float32), pad_rows=cfg.hbm_v_prefetch_amount)
    w = b.hbm_input("w", rng.standard_normal((32, 32)).astype(np.float32) / 6, use="weight",
                    pad_rows=cfg.hbm_m_prefetch_amount)
    y = F.linear(b, x, w, name="lin")
    second(b, y)
    prog = b.build()
    dumps = prog.run().dumps()
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    prog.write(a_dir)
    write_dump_dir(dumps, a_dir)
    shutil.copytree(a_dir, b_dir)
    return dumps, a_dir, b_dir, json.loads((a_dir / "tensors.json").read_text())["tensors"]


def test_compare_two_dump_folders(tmp_path, capsys):
    _, a_dir, b_dir, meta = _linear_then(CFG, lambda b, y: F.softmax(b, y, name="sm"), tmp_path)
    vram_names = [n for n, t in meta.items() if t["kind"] == "vram"]
    # plant a difference: flip the lowest mantissa bit of element (2, 5) of the linear output
    target = next(n for n in vram_names if n.startswith("lin"))
    addr = meta[target]["address"] + 2 * meta[target]["shape"][1] + 5
    raw = np.fromfile(b_dir / "vram_dump.bin", dtype="<u2")
    before = raw[addr]
    raw[addr] ^= 1
    raw.tofile(b_dir / "vram_dump.bin")
    want = abs(float(bf16_bits_to_f32_np(np.array([before], np.uint16))[0])
               - float(bf16_bits_to_f32_np(np.array([raw[addr]], np.uint16))[0]))

    rep, ta, tb = compare_dump_folders(a_dir, b_dir, a_dir / "tensors.json")
    st = rep[target]
    assert st.same == st.size - 1 and st.max_abs == want
    assert rep.first_divergence.index == (2, 5)
    assert all(rep[n].exact for n in vram_names if n != target)
    assert np.array_equal(ta[target], vram_tensors_from_dumps(a_dir, meta)[target])

    png = tmp_path / "png"
    rc = cli_main(["compare", str(a_dir), str(b_dir), "--png", str(png), "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in out.splitlines() if ln.startswith(target))
    assert float(line.split()[3]) == float(f"{want:.6g}")  # max abs column
    assert "first divergence" in out and "[2, 5]" in out.replace("(2, 5)", "[2, 5]")
    _png_ok(png / "stage_errors.png")
    _png_ok(png / "first_divergence.png")
    blob = json.loads((tmp_path / "c.json").read_text())
    (only,) = blob.values()
    assert [s["name"] for s in only["stages"]] == list(ta)

    # identical folders: exit 0, no heat map
    rc = cli_main(["compare", str(a_dir), str(a_dir), "--png", str(tmp_path / "same")])
    assert rc == 0 and not (tmp_path / "same" / "first_divergence.png").exists()
    _png_ok(tmp_path / "same" / "stage_errors.png")


def test_compare_two_wide_dump_folders(tmp_path, capsys):
    """fp16 VRAM (the u32 f32 container in the emulator; 2-byte fp16 codes in vram_dump.bin):
    ``plena compare --config`` reads the codes, the planted one-bit difference is the first
    divergence, with the error computed from numpy's own fp16 decoding."""
    from test_formats_e2e import WIDE

    from plena.numerics.containers import bits_to_f32_np

    dumps, a_dir, b_dir, meta = _linear_then(WIDE, lambda b, y: F.rms_norm(b, y, name="rms"), tmp_path)
    assert dumps.vram.dtype == np.uint32 and dumps.vram_type is not None
    settings = a_dir / "plena_settings.toml"
    vram_names = [n for n, t in meta.items() if t["kind"] == "vram"]
    # plant: flip the lowest mantissa bit of the fp16 code of element (2, 5) of the linear output
    target = next(n for n in vram_names if n.startswith("lin") and "out" in n)
    cols = meta[target]["shape"][1]
    addr = meta[target]["address"] + 2 * cols + 5
    raw = np.fromfile(b_dir / "vram_dump.bin", dtype="<u2")
    assert raw.size == dumps.vram.size  # 2 bytes per element
    before = raw[addr]
    raw[addr] ^= 1
    raw.tofile(b_dir / "vram_dump.bin")
    f16 = lambda c: float(np.array([c], np.uint16).view(np.float16)[0])  # noqa: E731
    want = abs(f16(before) - f16(raw[addr]))
    assert want > 0

    rep, ta, tb = compare_dump_folders(a_dir, b_dir, a_dir / "tensors.json", cfg=WIDE)
    st = rep[target]
    assert rep.first_divergent_stage.name == target
    assert st.same == st.size - 1 and st.max_abs == want
    fd = rep.first_divergence
    assert (fd.stage, fd.index, fd.actual, fd.reference) == (target, (2, 5), f16(before), f16(raw[addr]))
    assert all(rep[n].exact for n in vram_names if n != target)
    # A's tensors are the run's VRAM (f32 container) values: fp16 values, not all of them bf16
    for n in vram_names:
        t = meta[n]
        rows, c = t["shape"]
        got = np.zeros(rows * c, np.uint32)
        have = dumps.vram[t["address"]: t["address"] + rows * c]
        got[: len(have)] = have
        assert np.array_equal(ta[n].view(np.uint32), bits_to_f32_np(got).reshape(rows, c).view(np.uint32)), n
    assert np.array_equal(ta[target].astype(np.float16).astype(np.float32), ta[target])
    assert not np.array_equal(bf16_bits_to_f32_np((ta[target].view(np.uint32) >> 16).astype(np.uint16)),
                              ta[target])

    png = tmp_path / "png"
    rc = cli_main(["compare", str(a_dir), str(b_dir), "--config", str(settings), "--png", str(png)])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in out.splitlines() if ln.startswith(target))
    assert float(line.split()[3]) == float(f"{want:.6g}")  # max abs column
    assert f"first divergence: {target}[2, 5]: {f16(before)!r}" in out
    _png_ok(png / "stage_errors.png")
    _png_ok(png / "first_divergence.png")
    rc = cli_main(["compare", str(a_dir), str(a_dir), "--settings", str(settings), "--png", str(tmp_path / "s")])
    assert rc == 0 and not (tmp_path / "s" / "first_divergence.png").exists()
