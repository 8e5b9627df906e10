"""A plain numpy PLENA interpreter: the baseline a user would otherwise write.

Used by ``benchmarks/executors.py`` (column "numpy") and ``tests/test_numpy_baseline.py``; not
part of the ``plena`` package. It is deliberately the straightforward design: a Python loop
over the decoded instructions, a dict from opcode to handler method, Python ints for the
scalar registers and numpy arrays for the memories:

* VRAM: ``float32[rows, VLEN]`` holding bf16-rounded values, grown on demand (reads of rows
  never written return 0, like the reference's zero-initialised memory);
* MRAM: ``float32[tiles, MLEN, MLEN]`` (unrounded MX-decoded values, spec §2.5);
* HBM: a ``uint8`` array holding the preload, grown on writes; reads past it return 0;
* FP SRAM ``float32[1024]`` of bf16 values, INT SRAM Python ints, fp registers bf16-valued
  ``np.float32`` scalars, the four systolic accumulators ``float32`` arrays.

Numerics follow the spec (``../shared/spec/plena-isa-semantics.md``) as a careful user would:
f32 arithmetic then bf16 rounding (``ml_dtypes`` cast; the plena VRAM cast only for rows that
hold a NaN, whose payload rounding differs), f32 matmuls with numpy (OpenBLAS) accumulated per
instruction, exp evaluated in float64 and rounded to f32 (spec §8), V_RED_SUM in libtorch's
8-lane summation order (:func:`torch_sum`), MX decode / encode with
:func:`plena.numerics.mx_decode_np` / :func:`plena.numerics.mx_encode_np`.

Known differences from ``plena.emu_jax`` (see ``tests/test_numpy_baseline.py``):

* Subnormals: numpy keeps f32 subnormals, and so does the emulator (``plena.numerics.ieee``),
  except inside one matmul's dot (XLA's), see docs/emulator.md.
* Matmul partial sums use OpenBLAS's summation order, the emulator XLA's; the spec (§8) notes
  both are nearly always exact for MX x bf16 products, but a rare 1-ulp bf16 difference after
  M_*_WO is possible.
* The loop instruction budget (MAX_LOOP_INSTRUCTIONS) is checked at each C_LOOP_END, so a
  violation is reported at that C_LOOP_END's pc rather than at the first instruction past the
  budget.
* Only MX HBM formats are implemented (the emulator rejects others too).

Usage::

    m = NumpyMachine(cfg, hbm=..., fpsram=..., intsram=..., vram=..., hbm_size=...)
    stats = m.run(words, max_steps=None, time_limit_s=None)
    m.vram_bits()   # flat uint16 bf16 bits, like RunResult.dumps().vram
"""

from __future__ import annotations

import dataclasses
import time

import ml_dtypes
import numpy as np

from plena.config import PlenaConfig
from plena.isa.encoding import decode_program
from plena.isa.opcodes import BY_MNEMONIC
from plena.numerics import MxFormat, f32_to_bf16_bits_np, mx_decode_np, mx_encode_np

M32 = 0xFFFFFFFF
_BF16 = ml_dtypes.bfloat16
_OP = {m: s.code for m, s in BY_MNEMONIC.items()}
_F32_0 = np.float32(0.0)
_QUARTER = np.float32(0.25)


class NumpyExecError(RuntimeError):
    """A condition under which the reference panics (spec §4.7), at ``pc``."""

    def __init__(self, pc: int, rule: str):
        super().__init__(f"pc {pc}: {rule}")
        self.pc, self.rule = pc, rule


@dataclasses.dataclass
class RunStats:
    steps: int  # instructions executed
    run_s: float  # wall time of the instruction loop
    finished: bool  # False when stopped by max_steps / time_limit_s
    static_instructions: int

    @property
    def instr_per_s(self) -> float:
        return self.steps / self.run_s if self.run_s > 0 else float("inf")


# ---------------------------------------------------------------------------------------------
# numerics helpers
# ---------------------------------------------------------------------------------------------

def bf16_round(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 -> f32 with the VRAM cast (RNE; NaN payloads as the reference rounds them)."""
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore"):
        r = x.astype(_BF16).astype(np.float32)
    if np.isnan(r).any():  # rare: the reference rounds NaN payloads (ml_dtypes quiets them)
        bits = f32_to_bf16_bits_np(x).astype(np.uint32) << 16
        r = bits.view(np.float32)
    return r


def bf16_reg(x) -> np.float32:
    """FP-register rounding (``half::bf16::from_f32``: RNE, NaN -> quiet NaN)."""
    b = int(np.float32(x).view(np.uint32))
    if (b & 0x7FFFFFFF) > 0x7F800000:
        out = (b >> 16) | 0x0040
    else:
        out = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return np.uint32(out << 16).view(np.float32)


def _exp_f32(x: np.ndarray) -> np.ndarray:
    """exp(clamp(x, -88, 88)) evaluated in float64, rounded once to f32 (spec §8)."""
    with np.errstate(all="ignore"):
        return np.exp(np.clip(x, -88.0, 88.0).astype(np.float64)).astype(np.float32)


def _multi_row_sum(rows: list, zero: np.ndarray) -> np.ndarray:
    """libtorch ``multi_row_sum`` (4-level cascade) over equal-shaped f32 arrays."""
    size = len(rows)
    level_power = max(4, (0 if size <= 1 else (size - 1).bit_length()) // 4)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = [zero.copy() for _ in range(4)]
    i = 0
    while i + level_step <= size:
        for _ in range(level_step):
            acc[0] = acc[0] + rows[i]
            i += 1
        for j in range(1, 4):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = zero.copy()
            if i & (level_mask << (j * level_power)):
                break
    while i < size:
        acc[0] = acc[0] + rows[i]
        i += 1
    for j in range(1, 4):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(items: list, zero: np.ndarray) -> np.ndarray:
    """libtorch ``row_sum`` with 4-way ILP over equal-shaped items (vectors or scalars)."""
    n = len(items)
    n_ilp = n // 4
    if n_ilp:
        groups = [np.stack(items[4 * r:4 * r + 4]) for r in range(n_ilp)]
        partial = _multi_row_sum(groups, np.zeros_like(groups[0]))
        parts = [partial[k] for k in range(4)]
    else:
        parts = [zero] * 4
    for i in range(n_ilp * 4, n):
        parts[0] = parts[0] + items[i]
    return ((parts[0] + parts[1]) + parts[2]) + parts[3]


def torch_sum(x: np.ndarray) -> np.float32:
    """Sum of a 1-D f32 row in libtorch's CPU order (spec §8: 8-lane vectors, 4-way ILP)."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if n < 8:
        return np.float32(_row_sum([x[i] for i in range(n)], _F32_0))
    nvec = n // 8
    if nvec % 4 == 0 and nvec // 4 < 16:  # common case (VLEN <= 508): plain vector adds
        v = x[:nvec * 8].reshape(nvec // 4, 4, 8)
        acc = np.zeros((4, 8), np.float32)
        for g in v:
            acc = acc + g
        vacc = ((acc[0] + acc[1]) + acc[2]) + acc[3]
    else:
        vacc = _row_sum([x[8 * k:8 * k + 8] for k in range(nvec)], np.zeros(8, np.float32))
    final = _F32_0
    for k in range(nvec * 8, n):
        final = np.float32(final + x[k])
    for lane in range(8):
        final = np.float32(final + vacc[lane])
    return final


class LoadedProgram(list):
    """A decoded program as Python tuples (what :meth:`NumpyMachine.load` returns)."""


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------

class NumpyMachine:
    """Machine state plus one handler per opcode; :meth:`run` executes a program."""

    def __init__(self, cfg: PlenaConfig, *, hbm=None, fpsram=None, intsram=None, vram=None,
                 hbm_size: int | None = None):
        self.cfg = cfg
        self.mlen, self.vlen, self.blen, self.hlen = cfg.mlen, cfg.vlen, cfg.blen, cfg.hlen
        self.ba = cfg.broadcast_amount
        self.depth = cfg.vector_sram_size
        self.tiles = cfg.matrix_sram_size // cfg.mlen
        self.capacity = int(hbm_size if hbm_size is not None else cfg.hbm_size)
        for f in (cfg.precision.hbm_m_weight_type, cfg.precision.hbm_m_kv_type,
                  cfg.precision.hbm_v_act_type, cfg.precision.hbm_v_kv_type):
            if not isinstance(f, MxFormat):
                raise NotImplementedError(f"numpy baseline: HBM format {f} (only MX)")
        self.gp = [0] * 16
        self.fp = [_F32_0] * 8
        self.a = [0] * 16
        self.scale = 0
        self.stride = 1
        self.vmask = 0
        self.fpsram = np.zeros(1024, np.float32)
        if fpsram is not None:
            fb = np.asarray(fpsram, np.uint16).reshape(-1)
            self.fpsram[: len(fb)] = (fb.astype(np.uint32) << 16).view(np.float32)
        self.intsram = [0] * 1024
        if intsram is not None:
            for i, v in enumerate(np.asarray(intsram, np.uint32).reshape(-1).tolist()):
                self.intsram[i] = v
        rows = 1024
        pre = None
        if vram is not None:
            vb = np.asarray(vram, np.uint16).reshape(-1)
            n_rows = -(-len(vb) // self.vlen)
            pre = np.zeros(n_rows * self.vlen, np.uint32)
            pre[: len(vb)] = vb
            rows = max(rows, n_rows)
        self.vram = np.zeros((rows, self.vlen), np.float32)
        self.vram_touched = 0  # rows: highest row read or written + 1
        if pre is not None:
            n_rows = len(pre) // self.vlen
            self.vram[:n_rows] = (pre << 16).view(np.float32).reshape(n_rows, self.vlen)
            self.vram_touched = n_rows
        self.mram = np.zeros((self.tiles, self.mlen, self.mlen), np.float32)
        self.mram_touched = 0  # tiles
        h = np.zeros(0, np.uint8) if hbm is None else np.frombuffer(bytes(hbm), np.uint8) \
            if isinstance(hbm, (bytes, bytearray)) else np.asarray(hbm, np.uint8).reshape(-1)
        if len(h) > self.capacity:
            raise ValueError(f"HBM preload ({len(h)} bytes) is larger than HBM ({self.capacity} bytes)")
        self.hbm = h.copy()
        self.hbm_touched = len(h)  # bytes: highest byte read or written + 1
        self.m_accum = np.zeros((self.blen, self.blen), np.float32)
        self.v_accum = np.zeros(self.blen, np.float32)
        self.hm_accum = np.zeros((self.ba, self.mlen, self.mlen), np.float32)
        self.hv_accum = np.zeros((self.ba, self.mlen), np.float32)
        self.loops: list = []  # [start_pc, reg, step at which the current iteration started]
        self.steps = 0
        self.pc = 0
        heads = self.vlen // self.hlen
        self._head_of = np.repeat(np.arange(heads), self.hlen)
        self.handlers = {code: getattr(self, "op_" + name) for name, code in _OP.items()
                         if hasattr(self, "op_" + name)}

    # -- memory helpers ----------------------------------------------------------------------

    def _err(self, rule: str):
        raise NumpyExecError(self.pc, rule)

    def _vrow(self, addr: int) -> int:
        if addr % self.vlen:
            self._err("VRAM address not a multiple of VLEN")
        row = addr // self.vlen
        if row >= self.depth:
            self._err("VRAM row beyond VECTOR_SRAM_SIZE")
        return row

    def _grow_vram(self, rows: int) -> None:
        if rows > self.vram.shape[0]:
            new = np.zeros((max(rows, 2 * self.vram.shape[0]), self.vlen), np.float32)
            new[: self.vram.shape[0]] = self.vram
            self.vram = new

    def read_rows(self, row: int, n: int = 1) -> np.ndarray:
        """``n`` consecutive VRAM rows (f32 values; unwritten rows read 0)."""
        end = row + n
        if end > self.vram_touched:
            self.vram_touched = end
        if end <= self.vram.shape[0]:
            return self.vram[row:end]
        out = np.zeros((n, self.vlen), np.float32)
        have = max(0, self.vram.shape[0] - row)
        out[:have] = self.vram[row:row + have]
        return out

    def read_row(self, addr: int) -> np.ndarray:
        return self.read_rows(self._vrow(addr))[0]

    def write_rows(self, row: int, values: np.ndarray) -> None:
        """Store f32 rows after bf16 rounding."""
        values = bf16_round(values).reshape(-1, self.vlen)
        end = row + values.shape[0]
        self._grow_vram(end)
        self.vram_touched = max(self.vram_touched, end)
        self.vram[row:end] = values

    def _tile(self, m_addr: int) -> int:
        t2 = self.mlen * self.mlen
        if m_addr % t2:
            self._err("MRAM address not a multiple of MLEN*MLEN")
        t = m_addr // t2
        if t >= self.tiles:
            self._err("MRAM tile beyond MATRIX_SRAM_SIZE/MLEN")
        self.mram_touched = max(self.mram_touched, t + 1)
        return t

    def hbm_read(self, idx: np.ndarray) -> np.ndarray:
        """Bytes at the (int64) addresses ``idx``; past the image (or capacity) they read 0."""
        n = len(self.hbm)
        if idx.size:
            self.hbm_touched = max(self.hbm_touched, min(int(idx.max()) + 1, self.capacity))
        inside = idx < n
        return np.where(inside, self.hbm[np.minimum(idx, max(n - 1, 0))] if n else 0, 0).astype(np.uint8)

    def hbm_write(self, idx: np.ndarray, data: np.ndarray) -> None:
        if idx.size == 0:
            return
        top = int(idx.max()) + 1
        if top > self.capacity:
            self._err("HBM write beyond HBM capacity")
        if top > len(self.hbm):
            new = np.zeros(max(top, 2 * len(self.hbm)), np.uint8)
            new[: len(self.hbm)] = self.hbm
            self.hbm = new
        self.hbm_touched = max(self.hbm_touched, top)
        self.hbm[idx] = data

    def _fpidx(self, r: int) -> int:
        if r > 7:
            self._err("fp register index must be 0..7")
        return r

    def _masked(self, result: np.ndarray, a: np.ndarray, rmask: int) -> np.ndarray:
        """Masked vector op: heads whose V_MASK bit is clear keep ``a``."""
        if not rmask:
            return result
        bits = np.array([(self.vmask >> (h % 32)) & 1 for h in range(self.vlen // self.hlen)], bool)
        keep = np.ones(self.vlen, bool)
        keep[: len(self._head_of)] = ~bits[self._head_of]
        return np.where(keep, a, result)

    # -- run ---------------------------------------------------------------------------------

    @staticmethod
    def load(program) -> "LoadedProgram":
        """Words or a DecodedProgram -> list of (opcode, rd, rs1, rs2, rs3, funct1, imm18, imm22)."""
        prog = decode_program(program) if not hasattr(program, "opcode") else program
        return LoadedProgram(zip(prog.opcode.tolist(), prog.rd.tolist(), prog.rs1.tolist(), prog.rs2.tolist(),
                        prog.rs3.tolist(), prog.funct1.tolist(), prog.imm18.tolist(), prog.imm22.tolist()))

    def run(self, program, *, max_steps: int | None = None, time_limit_s: float | None = None) -> RunStats:
        """Execute from the current pc (0 at first) until the program's end, ``max_steps``
        instructions in all, or ``time_limit_s`` seconds. ``program``: words, a DecodedProgram
        or the list of :meth:`load` (decoding is then not part of ``run_s``)."""
        instrs = program if isinstance(program, LoadedProgram) else self.load(program)
        n = len(instrs)
        handlers = self.handlers
        limit = max_steps if max_steps is not None else 1 << 62
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s if time_limit_s is not None else None
        pc, steps = self.pc, self.steps
        finished = True
        with np.errstate(all="ignore"):
            while pc < n:
                if steps >= limit:
                    finished = False
                    break
                if deadline is not None and steps & 1023 == 0 and time.perf_counter() > deadline:
                    finished = False
                    break
                op, rd, rs1, rs2, rs3, f1, i18, i22 = instrs[pc]
                h = handlers.get(op)
                self.pc, self.steps = pc, steps
                steps += 1
                if h is None:
                    self._err("invalid opcode (0x00, 0x31, 0x33 and 0x38-0x3F are not executable)")
                nxt = h(rd, rs1, rs2, rs3, f1, i18, i22)
                pc = pc + 1 if nxt is None else nxt
        self.pc, self.steps = pc, steps
        return RunStats(steps=steps, run_s=time.perf_counter() - t0, finished=finished, static_instructions=n)

    # -- dumps -------------------------------------------------------------------------------

    def vram_bits(self, rows: int | None = None) -> np.ndarray:
        """Flat uint16 bf16 bits of VRAM rows ``[0, rows)`` (default: the touched rows)."""
        rows = self.vram_touched if rows is None else rows
        v = self.read_rows(0, rows) if rows else np.zeros((0, self.vlen), np.float32)
        return (v.view(np.uint32) >> 16).astype(np.uint16).reshape(-1)

    def mram_bits(self) -> np.ndarray:
        return f32_to_bf16_bits_np(self.mram.reshape(-1))

    def fpsram_bits(self) -> np.ndarray:
        return (self.fpsram.view(np.uint32) >> 16).astype(np.uint16)

    def intsram_words(self) -> np.ndarray:
        return np.asarray(self.intsram, np.uint32)

    def touched_bytes(self) -> int:
        """VRAM rows x VLEN x 2 + MRAM tiles x MLEN^2 x 2 + HBM bytes, of what the run touched."""
        return (self.vram_touched * self.vlen * 2 + self.mram_touched * self.mlen * self.mlen * 2
                + self.hbm_touched)

    # -- matrix ------------------------------------------------------------------------------

    def _mm_tile(self, m_addr: int):
        t2 = self.mlen * self.mlen
        off = m_addr % t2
        if off % self.mlen:
            self._err("M_MM matrix offset not a multiple of MLEN")
        c0 = off // self.mlen
        if c0 % self.blen:
            self._err("matrix column block (offset/MLEN) not a multiple of BLEN")
        return self.mram[self._tile(m_addr - off)], c0

    def op_M_MM(self, rd, rs1, rs2, rs3, f1, i18, i22):
        t, c0 = self._mm_tile(self.gp[rs1])
        x = self.read_rows(self._vrow(self.gp[rs2]), self.blen)
        self.m_accum = self.m_accum + x @ t[:, c0:c0 + self.blen]

    def op_M_TMM(self, rd, rs1, rs2, rs3, f1, i18, i22):
        t, c0 = self._mm_tile(self.gp[rs2])
        x = self.read_rows(self._vrow(self.gp[rs1]), self.blen)
        self.m_accum = self.m_accum + x @ t[c0:c0 + self.blen, :].T

    def _wo_target(self, v_addr: int):
        col = v_addr % self.mlen
        if col % self.blen:
            self._err("write-out column not a multiple of BLEN")
        return v_addr - col, col

    def op_M_MM_WO(self, rd, rs1, rs2, rs3, f1, i18, i22):
        base, col = self._wo_target((self.gp[rd] + i18) & M32)
        s = 1 if rs1 == 0 else self.gp[rs1]
        for i in range(self.blen):
            row = self._vrow((base + i * self.mlen * s) & M32)
            r = self.read_rows(row).copy()
            r[0, col:col + self.blen] = self.m_accum[i]
            self.write_rows(row, r)
        self.m_accum = np.zeros_like(self.m_accum)

    def op_M_MV(self, rd, rs1, rs2, rs3, f1, i18, i22):
        m_addr = self.gp[rs1]
        off = m_addr % (self.mlen * self.mlen)
        if off % self.blen or off >= self.mlen:
            self._err("M_MV matrix offset not a multiple of BLEN or not below MLEN")
        t = self.mram[self._tile(m_addr - off)]
        x = self.read_row(self.gp[rs2])
        self.v_accum = self.v_accum + x @ t[:, off:off + self.blen]

    def op_M_TMV(self, rd, rs1, rs2, rs3, f1, i18, i22):
        t = self.mram[self._tile(self.gp[rs1])]
        x = self.read_row(self.gp[rs2])
        self.v_accum = self.v_accum + x @ t[: self.blen, :].T

    def op_M_MV_WO(self, rd, rs1, rs2, rs3, f1, i18, i22):
        base, col = self._wo_target((self.gp[rd] + i18) & M32)
        row = self._vrow(base)
        r = self.read_rows(row).copy()
        r[0, col:col + self.blen] = self.v_accum
        self.write_rows(row, r)
        self.v_accum = np.zeros_like(self.v_accum)

    def _batched_check(self):
        if self.ba * self.hlen != self.mlen:
            self._err("batched-head op needs BROADCAST_AMOUNT * HLEN == MLEN")

    def _head_slice(self, m_addr: int, period: int):
        """(tile, h0) of a batched op: row/column block must be 0, h0 a multiple of HLEN."""
        r = m_addr % period
        blk, h0 = r - r % self.mlen, r % self.mlen
        if blk % self.blen:
            self._err("matrix column block (offset/MLEN) not a multiple of BLEN")
        if h0 % self.hlen:
            self._err("batched-head offset not a multiple of HLEN")
        t = self._tile(m_addr - r)
        if blk != 0 or h0 + self.hlen > self.mlen:
            self._err("batched op with a non-zero row/column block (libtorch shape error)")
        return self.mram[t], h0

    def op_M_BMM(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._batched_check()
        t, h0 = self._head_slice(self.gp[rs1], self.mlen * self.blen)
        x = self.read_rows(self._vrow(self.gp[rs2]), self.mlen).reshape(self.mlen, self.hlen, self.ba)
        m = t[h0:h0 + self.hlen, :]
        prod = np.einsum("idg,dj->gij", x, m, optimize=True).astype(np.float32)
        self.hm_accum = self.hm_accum + prod * _QUARTER

    def op_M_BTMM(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._batched_check()
        t, h0 = self._head_slice(self.gp[rs1], self.mlen * self.mlen)
        x = self.read_rows(self._vrow(self.gp[rs2]), self.mlen).reshape(self.mlen, self.ba, self.hlen)
        k = t[:, h0:h0 + self.hlen]  # [j, d]
        prod = np.matmul(x.transpose(1, 0, 2), k.T)  # [g, i, j]
        self.hm_accum = self.hm_accum + prod * _QUARTER

    def op_M_BMM_WO(self, rd, rs1, rs2, rs3, f1, i18, i22):
        v_addr = (self.gp[rd] + i18) & M32
        if v_addr % self.mlen:
            self._err("batched write-out VRAM address not a multiple of MLEN")
        row = self._vrow(v_addr)
        if row + self.ba * self.mlen > self.depth:
            self._err("VRAM row beyond VECTOR_SRAM_SIZE")
        self.write_rows(row, self.hm_accum.reshape(self.ba * self.mlen, self.mlen))
        self.hm_accum = np.zeros_like(self.hm_accum)

    def op_M_BTMV(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._batched_check()
        t, h0 = self._head_slice((self.gp[rs1] + self.gp[rd]) & M32, self.mlen * self.mlen)
        x = self.read_row(self.gp[rs2]).reshape(self.ba, self.hlen)
        self.hv_accum = self.hv_accum + (x @ t[:, h0:h0 + self.hlen].T) * _QUARTER

    def op_M_BMV(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._err("M_BMV always panics in the reference (hv_accum shape-broadcast bug)")

    def op_M_BMV_WO(self, rd, rs1, rs2, rs3, f1, i18, i22):
        v_addr = (self.gp[rd] + i18) & M32
        if v_addr % self.mlen:
            self._err("batched write-out VRAM address not a multiple of MLEN")
        self.write_rows(self._vrow(v_addr), self.hv_accum)
        self.hv_accum = np.zeros_like(self.hv_accum)

    # -- vector ------------------------------------------------------------------------------

    def _vv(self, rd, rs1, rs2, rs3, fn):
        a = self.read_row(self.gp[rs1])
        b = self.read_row(self.gp[rs2])
        self.write_rows(self._vrow(self.gp[rd]), self._masked(fn(a, b), a, rs3))

    def _vf(self, rd, rs1, rs2, rs3, fn):
        a = self.read_row(self.gp[rs1])
        s = self.fp[self._fpidx(rs2)]
        self.write_rows(self._vrow(self.gp[rd]), self._masked(fn(a, s), a, rs3))

    def op_V_ADD_VV(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vv(rd, rs1, rs2, rs3, np.add)

    def op_V_SUB_VV(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vv(rd, rs1, rs2, rs3, np.subtract)

    def op_V_MUL_VV(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vv(rd, rs1, rs2, rs3, np.multiply)

    def op_V_ADD_VF(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vf(rd, rs1, rs2, rs3, np.add)

    def op_V_SUB_VF(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vf(rd, rs1, rs2, rs3, (lambda a, s: s - a) if f1 else np.subtract)

    def op_V_MUL_VF(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vf(rd, rs1, rs2, rs3, np.multiply)

    def op_V_MAX_VF(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vf(rd, rs1, rs2, rs3, np.maximum)  # NaN in a or s propagates, as clamp_min does

    def op_V_MIN_VF(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._vf(rd, rs1, rs2, rs3, np.minimum)

    def op_V_EXP_V(self, rd, rs1, rs2, rs3, f1, i18, i22):
        a = self.read_row(self.gp[rs1])
        # masked-off heads get clamp(a, -88, 88), not a (spec §4.0)
        out = self._masked(_exp_f32(a), np.clip(a, np.float32(-88), np.float32(88)), rs3)
        self.write_rows(self._vrow(self.gp[rd]), out)

    def op_V_RECI_V(self, rd, rs1, rs2, rs3, f1, i18, i22):
        a = self.read_row(self.gp[rs1])
        self.write_rows(self._vrow(self.gp[rd]), self._masked(np.float32(1.0) / a, a, rs3))

    def op_V_SHFT_V(self, rd, rs1, rs2, rs3, f1, i18, i22):
        a = self.read_row(self.gp[rs1])
        n = self.gp[rs2]
        out = np.zeros(self.vlen, np.float32)
        if n < self.vlen:
            out[n:] = a[: self.vlen - n]
        self.write_rows(self._vrow(self.gp[rd]), out)

    def op_V_RED_SUM(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if rd == 0:
            return
        self._fpidx(rd)
        a = self.read_row(self.gp[rs1])
        if rs3:  # the reference's bug: masked heads are replaced by their sum, then all summed
            a = a.copy()
            for h in range(self.vlen // self.hlen):
                if (self.vmask >> (h % 32)) & 1:
                    seg = slice(h * self.hlen, (h + 1) * self.hlen)
                    a[seg] = torch_sum(a[seg])
        self.fp[rd] = bf16_reg(np.float32(self.fp[rd] + torch_sum(a)))

    def op_V_RED_MAX(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if rd == 0:
            return
        self._fpidx(rd)
        m = np.max(self.read_row(self.gp[rs1]))  # NaN propagates (torch max)
        acc = self.fp[rd]
        if np.isnan(m):
            r = acc  # Rust f32::max ignores a NaN operand
        elif np.isnan(acc):
            r = m
        else:
            r = max(m, acc)
        self.fp[rd] = bf16_reg(r)

    def op_V_TOPK(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if rs3 not in (0, 1):
            self._err("V_TOPK policy must be 0 or 1")
        e, k = (32, 4) if rs3 == 0 else (128, 8)
        row = self._vrow(self.gp[rs1])
        logits = self.read_rows(row, -(-e // self.vlen)).reshape(-1)[:e].astype(np.float32)
        logits = np.where(np.isnan(logits), np.float32(-np.inf), logits)
        # descending by IEEE totalOrder, ties by the lower index
        key = logits.view(np.int32).astype(np.int64)
        key = np.where(key < 0, -(key & 0x7FFFFFFF) - 1, key)
        order = np.lexsort((np.arange(e), -key))[:k]
        sel = logits[order]
        mx = sel[0]
        with np.errstate(all="ignore"):
            w = np.exp((sel - mx).astype(np.float64)).astype(np.float32)
            den = _F32_0
            for v in w:
                den = np.float32(den + v)
            ok = np.isfinite(den) and den > 0
            weights = bf16_round(w / den) if ok else np.zeros(k, np.float32)
        fb, ib = self.gp[rd], self.gp[rs2]
        if fb + k > 1024:
            self._err("FP SRAM index out of range (>= 1024)")
        if ib + k > 1024:
            self._err("INT SRAM index out of range (>= 1024)")
        for j in range(k):
            self.intsram[ib + j] = int(order[j])
        self.fpsram[fb:fb + k] = np.array([bf16_reg(x) for x in weights], np.float32)

    # -- scalar FP ---------------------------------------------------------------------------

    def _s2(self, rd, rs1, rs2, fn):
        if rd == 0:
            return
        a, b = self.fp[self._fpidx(rs1)], self.fp[self._fpidx(rs2)]
        self.fp[self._fpidx(rd)] = bf16_reg(fn(a, b))

    def op_S_ADD_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._s2(rd, rs1, rs2, lambda a, b: np.float32(a + b))

    def op_S_SUB_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._s2(rd, rs1, rs2, lambda a, b: np.float32(a - b))

    def op_S_MUL_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._s2(rd, rs1, rs2, lambda a, b: np.float32(a * b))

    def op_S_MAX_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self._s2(rd, rs1, rs2, lambda a, b: b if (np.isnan(a) or b > a) else a)

    def op_S_EXP_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if rd:
            self.fp[self._fpidx(rd)] = bf16_reg(_exp_f32(np.float32(self.fp[self._fpidx(rs1)])))

    def op_S_RECI_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if rd:
            self.fp[self._fpidx(rd)] = bf16_reg(np.float32(1.0) / self.fp[self._fpidx(rs1)])

    def op_S_SQRT_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if rd:
            self.fp[self._fpidx(rd)] = bf16_reg(np.sqrt(self.fp[self._fpidx(rs1)]))

    def _sram_idx(self, i: int, what: str) -> int:
        if i >= 1024:
            self._err(f"{what} SRAM index out of range (>= 1024)")
        return i

    def op_S_LD_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.fp[self._fpidx(rd)] = self.fpsram[self._sram_idx((self.gp[rs1] + i18) & M32, "FP")]

    def op_S_ST_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.fpsram[self._sram_idx((self.gp[rs1] + i18) & M32, "FP")] = self.fp[self._fpidx(rd)]

    def op_S_MAP_V_FP(self, rd, rs1, rs2, rs3, f1, i18, i22):
        base = (self.gp[rs1] + i18) & M32
        if base + self.vlen > 1024:
            self._err("FP SRAM index out of range (>= 1024)")
        self.write_rows(self._vrow(self.gp[rd]), self.fpsram[base:base + self.vlen])

    # -- scalar INT --------------------------------------------------------------------------

    def op_S_ADD_INT(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.gp[rd] = (self.gp[rs1] + self.gp[rs2]) & M32

    def op_S_ADDI_INT(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.gp[rd] = (self.gp[rs1] + i18) & M32

    def op_S_SUB_INT(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.gp[rd] = (self.gp[rs1] - self.gp[rs2]) & M32

    def op_S_MUL_INT(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.gp[rd] = (self.gp[rs1] * self.gp[rs2]) & M32

    def op_S_LUI_INT(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.gp[rd] = (i22 << 12) & M32

    def op_S_LD_INT(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.gp[rd] = self.intsram[self._sram_idx((self.gp[rs1] + i18) & M32, "INT")]

    def op_S_ST_INT(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.intsram[self._sram_idx((self.gp[rs1] + i18) & M32, "INT")] = self.gp[rd]

    # -- HBM ---------------------------------------------------------------------------------

    def _rows_from_hbm(self, fmt: MxFormat, rs1, rs2, rs3, rows: int, length: int) -> np.ndarray:
        """MX-decode ``rows`` HBM rows of ``length`` elements (spec §4.5) -> f32[rows, length]."""
        ratio = fmt.element_scale_ratio
        off = self.gp[rs1]
        e0 = self.a[rs2] + off
        s0 = self.a[rs2] + self.scale + off // ratio
        s = self.stride if rs3 == 1 else length
        i = np.arange(rows, dtype=np.int64)
        elem_idx = (e0 + ((i * s) & M32))[:, None] + np.arange(length)
        sc_start = s0 + np.floor(i.astype(np.float32) * (np.float32(s) / np.float32(ratio))).astype(np.int64)
        nsc = length // fmt.block
        sc_idx = sc_start[:, None] + np.arange(nsc)
        # a row's scale bytes are fetched as one piece clipped at its 64-byte block
        sc = np.where(sc_idx // 64 == (sc_start // 64)[:, None], self.hbm_read(sc_idx), 0)
        return mx_decode_np(self.hbm_read(elem_idx), sc, fmt)

    def op_H_PREFETCH_M(self, rd, rs1, rs2, rs3, f1, i18, i22):
        fmt = self.cfg.precision.hbm_m_type(f1)
        rows = self.cfg.hbm_m_prefetch_amount
        t0 = self._tile(self.gp[rd])
        ntiles = rows // self.mlen
        if t0 + ntiles > self.tiles:
            self._err("MRAM tile beyond MATRIX_SRAM_SIZE/MLEN")
        vals = self._rows_from_hbm(fmt, rs1, rs2, rs3, rows, self.mlen)
        self.mram[t0:t0 + ntiles] = vals.reshape(ntiles, self.mlen, self.mlen)
        self.mram_touched = max(self.mram_touched, t0 + ntiles)

    def op_H_PREFETCH_V(self, rd, rs1, rs2, rs3, f1, i18, i22):
        fmt = self.cfg.precision.hbm_v_type(f1)
        rows = self.cfg.hbm_v_prefetch_amount
        row = self._vrow(self.gp[rd])
        vals = self._rows_from_hbm(fmt, rs1, rs2, rs3, rows, self.vlen)
        keep = max(0, min(rows, self.depth - row))  # rows past the VRAM depth are dropped
        self.write_rows(row, vals[:keep])

    def op_H_STORE_V(self, rd, rs1, rs2, rs3, f1, i18, i22):
        fmt = self.cfg.precision.hbm_v_type(f1)
        rows, length = self.cfg.hbm_v_writeback_amount, self.vlen
        ratio = fmt.element_scale_ratio
        off = self.gp[rs1]
        e0 = self.a[rs2] + off
        s0 = self.a[rs2] + self.scale + off // ratio
        s = self.stride if rs3 == 1 else length
        sstep = np.float32(s) / np.float32(ratio)
        for i in range(rows):
            x = self.read_row((self.gp[rd] + i * self.vlen) & M32)
            codes, scales = mx_encode_np(x, fmt)
            ea = e0 + ((i * s) & M32)
            sa = s0 + int(np.floor(np.float32(i) * sstep))
            self.hbm_write(np.arange(ea, ea + length, dtype=np.int64), codes)
            self.hbm_write(np.arange(sa, sa + len(scales), dtype=np.int64), scales)

    # -- control -----------------------------------------------------------------------------

    def op_C_SET_ADDR_REG(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.a[rd] = (self.gp[rs1] << 32) | self.gp[rs2]

    def op_C_SET_SCALE_REG(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.scale = self.gp[rd]

    def op_C_SET_STRIDE_REG(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.stride = self.gp[rd]

    def op_C_SET_V_MASK_REG(self, rd, rs1, rs2, rs3, f1, i18, i22):
        self.vmask = self.gp[rd]

    def op_C_LOOP_START(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if i22 == 0:
            self._err("C_LOOP_START iteration count must be greater than 0")
        self.gp[rd] = i22
        self.loops.append([self.pc, rd, self.steps + 1])

    def op_C_LOOP_END(self, rd, rs1, rs2, rs3, f1, i18, i22):
        for j in range(len(self.loops) - 1, -1, -1):
            if self.loops[j][1] == rd:
                break
        else:
            self._err("C_LOOP_END without a matching active loop")
        budget = self.cfg.max_loop_instructions
        if any(self.steps + 1 - e[2] > budget for e in self.loops):
            self._err("loop iteration exceeded MAX_LOOP_INSTRUCTIONS")
        entry = self.loops[j]
        v = self.gp[rd]
        if v > 1:
            self.gp[rd] = v - 1
            entry[2] = self.steps + 1
            return entry[0] + 1
        self.gp[rd] = 0
        del self.loops[j]
        return None

    def op_C_BREAK(self, rd, rs1, rs2, rs3, f1, i18, i22):
        if not self.loops:
            self._err("C_BREAK: no active loop to break out of")
        entry = self.loops.pop()
        self.gp[entry[1]] = 0


def run_numpy(words, cfg: PlenaConfig, *, hbm=None, fpsram=None, intsram=None, vram=None,
              hbm_size: int | None = None, max_steps: int | None = None,
              time_limit_s: float | None = None) -> tuple[NumpyMachine, RunStats]:
    """Build a :class:`NumpyMachine` from the preloads (the formats of ``plena.emu_jax.api.run``)
    and run ``words``; returns ``(machine, stats)``."""
    m = NumpyMachine(cfg, hbm=hbm, fpsram=fpsram, intsram=intsram, vram=vram, hbm_size=hbm_size)
    return m, m.run(words, max_steps=max_steps, time_limit_s=time_limit_s)
