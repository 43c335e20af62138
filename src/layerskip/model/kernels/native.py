"""Build and load the few-row CPU kernels (fewrow.cpp) as a torch C++ extension.

Decoding multiplies a few rows by every weight matrix, so it is bound by reading the weights; fewrow.cpp reads
each weight once per call whatever the row count and is row-invariant by construction (a row's result never
depends on the other rows, the row count or the thread count). It is compiled on first use (about half a
minute, then cached on disk) because a wheel of prebuilt binaries would tie the package to one torch ABI.

The extension module's functions (all tensors on the CPU; x float32 [R, K], R >= 1; results float32 [R, N]):

- ``linear_f32(x, w, out_features)``: w float32 panels [ceil(N/16), K, 16] (linear.py: float_panels), each
  output one chain of FMAs over k in order.
- ``linear_bf16(x, w, out_features)``: w bfloat16 panels [ceil(N/16), ceil(K/2), 32], k pairs interleaved; x is
  rounded to bfloat16 and each pair is added k + 1 first (vdpbf16ps on the avx512bf16 path, exact float32
  products and FMAs elsewhere: the same results, bfloat16 subnormals aside).
- ``linear_q8_0(x, w_blocks, out_features)``, ``linear_q4_0(...)``, ``linear_q4_1(...)``: w_blocks is uint8
  [ceil(N/16), K/32 * 16 * block_bytes], GGUF's blocks (34, 18, 20 bytes) laid out as panels of 16 features
  (linear.py: block_panels; only the bytes move). K is not passed: it is inferred from the row length and must
  equal x.shape[1]. x is quantized per row to int8 in blocks of 32 (scale max|x|/127, round half to even) and
  the block dot products run in integers.
- ``silu_gate(gate_up)``: SiLU(gate) * up for gate_up float32 [R, 2 I] -> [R, I], elementwise.
- ``attention(q, k, v, start_pos, attendable=None)``: q [B, H, T, D]; k, v [B, Hkv, S, D], views of a cache
  are fine as long as the last dim is contiguous; H a multiple of Hkv. Query t (position start_pos + t)
  sees keys s <= start_pos + t with attendable[b, s] (bool [B, S'], S' >= S), and always its own position.
  Its result depends only on that sequence of keys, not on the masked ones between them: a tree draft's sibling
  masked out of a query leaves it bit-identical to the query alone. Returns [B, H, T, D] float32. A query with
  nothing to attend (only when its position is past S) gets zeros.
- ``isa()``, ``available_isas()``, ``set_isa(name)``: the instruction-set path ("avx512bf16", "avx512", "avx2",
  "scalar"); the best one the CPU has is chosen at import, ``LAYERSKIP_ISA`` forces one.

``LAYERSKIP_NATIVE=0`` disables the extension; ``LAYERSKIP_CACHE`` moves the build directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("fewrow.cpp")
SOURCES = [SOURCE, SOURCE.with_name("layers.cpp"), SOURCE.with_name("fewrow.h")]  # the last one is included
# No -march=native: the build cache may be reused on another CPU; the vector paths carry their own target
# attributes and are chosen at run time. -ffp-contract=off keeps every multiply-add where the source puts it.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi"]
LDFLAGS = ["-fopenmp"]

_module: ModuleType | None = None
_tried = False


def build_root() -> Path:
    """Where compiled extensions are kept: $LAYERSKIP_CACHE/kernels or ~/.cache/layerskip/kernels."""
    base = os.environ.get("LAYERSKIP_CACHE")
    return Path(base) / "kernels" if base else Path.home() / ".cache" / "layerskip" / "kernels"


def extension_name() -> str:
    """A name that changes with the source, the flags, torch and Python, so a stale build is never loaded."""
    import torch

    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES))
    digest.update(" ".join(CFLAGS + LDFLAGS + [torch.__version__, sys.version]).encode())
    return f"layerskip_fewrow_{digest.hexdigest()[:16]}"


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    name = extension_name()
    directory = build_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{name}*.so")):
        print(f"layerskip: compiling the native CPU kernels into {directory} (once, about half a minute)",
              file=sys.stderr)
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the ninja wheel's binary, when the venv's bin is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        except ImportError:
            pass
    try:
        sources = [str(source) for source in SOURCES if source.suffix == ".cpp"]
        return cpp_extension.load(name=name, sources=sources, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                                  build_directory=str(directory), verbose=False)
    finally:
        os.environ["PATH"] = path


def load_native() -> ModuleType | None:
    """The compiled extension, or None (with one warning) when it cannot be built; built once per process."""
    global _module, _tried
    if os.environ.get("LAYERSKIP_NATIVE", "1") == "0":
        return None
    if not _tried:
        _tried = True
        try:
            _module = _build()
        except Exception as error:  # no compiler, no ninja, a build error: today's torch path still works
            lines = str(error).strip().splitlines() or [type(error).__name__]
            reason = next((line.strip() for line in lines if "error:" in line), lines[0])[:300]
            warnings.warn(f"layerskip: native CPU kernels unavailable, using the PyTorch path ({reason})",
                          RuntimeWarning, stacklevel=2)
            _module = None
        if _module is not None and os.environ.get("LAYERSKIP_ISA"):
            try:
                _module.set_isa(os.environ["LAYERSKIP_ISA"])
            except RuntimeError as error:
                warnings.warn(f"layerskip: LAYERSKIP_ISA ignored: {str(error).splitlines()[0]}", RuntimeWarning,
                              stacklevel=2)
    return _module

