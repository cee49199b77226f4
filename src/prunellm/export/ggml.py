"""llama.cpp's own quantization kernels (ggml's ``ggml_quantize_chunk``), called in the library that PyPI's
``xllamacpp`` wheel carries, and llama-quantize's choice of type per tensor for its K-quant mixes.

No kernel is written here: the bytes come from ggml, the same code ``llama-quantize`` runs; what is written here is
which type each tensor gets (:func:`mix_types`, llama.cpp's ``llama_tensor_get_type`` for the mixes below), so an
export of ``--outtype q4_k_m`` is the file ``llama-quantize model-f32.gguf q4_k_m`` would make from the f32 export
(no importance matrix).
"""

from __future__ import annotations

import ctypes
import functools
import importlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import PrunellmError

# outtype -> (the type of most weight matrices, the type of attn_v and ffn_down in the layers given more bits)
K_MIXES: dict[str, tuple[T, T]] = {"q4_k_m": (T.Q4_K, T.Q6_K), "q5_k_m": (T.Q5_K, T.Q6_K), "q6_k": (T.Q6_K, T.Q6_K)}
# a type whose block does not divide a tensor's rows becomes this one (llama.cpp's tensor_type_fallback), else F16
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def block_size(kind: T) -> int:
    """Weights per quant block of ``kind`` (the row length must be a multiple of it)."""
    return GGML_QUANT_SIZES[kind][0]


def more_bits(index: int, count: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the tensors of a kind, and every third between."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def fitting(kind: T, row: int) -> T:
    """``kind`` where its block divides ``row``, else llama.cpp's fallback type, else F16."""
    if row % block_size(kind) == 0:
        return kind
    kind = FALLBACK.get(kind, T.F16)
    return kind if row % block_size(kind) == 0 else T.F16


def mix_types(shapes: dict[str, tuple[int, ...]], outtype: str, tied: bool) -> dict[str, T]:
    """The type llama-quantize gives each tensor of a GGUF (names in file order, numpy shapes: the row is the last
    dimension) for the K-quant mix ``outtype``: vectors stay F32; the output head (or the token embedding it is tied
    to) Q6_K, Q8_0 where its rows are not a multiple of 256; ``attn_v`` and ``ffn_down`` the mix's larger type in
    the layers :func:`more_bits` picks; every other matrix the mix's type; then :func:`fitting` per row length."""
    base, larger = K_MIXES[outtype]
    counts = {kind: sum(name.endswith(f".{kind}.weight") for name in shapes) for kind in ("attn_v", "ffn_down")}
    seen = dict.fromkeys(counts, 0)
    out: dict[str, T] = {}
    for name, shape in shapes.items():
        if len(shape) < 2:
            out[name] = T.F32
            continue
        row = shape[-1]
        kind = base
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            kind = T.Q8_0 if row % block_size(base) else T.Q6_K
        else:
            for tensor in counts:
                if name.endswith(f".{tensor}.weight"):
                    kind = larger if more_bits(seen[tensor], counts[tensor]) else base
                    seen[tensor] += 1
        out[name] = fitting(kind, row)
    return out


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    try:
        module = importlib.import_module("xllamacpp.xllamacpp")
    except ImportError as exc:
        raise PrunellmError(
            "--outtype q4_k_m/q5_k_m/q6_k quantizes with llama.cpp's own kernels from the PyPI package xllamacpp: "
            "pip install 'prunellm[serve]', or use --outtype q8_0 or f16"
        ) from exc
    library = ctypes.CDLL(module.__file__)
    try:
        quantize = library.ggml_quantize_chunk
    except AttributeError as exc:
        raise PrunellmError(f"the installed xllamacpp ({module.__file__}) exports no ggml_quantize_chunk: "
                            "pip install -U xllamacpp, or use --outtype q8_0 or f16") from exc  # fmt: skip
    quantize.restype = ctypes.c_size_t
    quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    library.ggml_quantize_init.argtypes = [ctypes.c_int]
    return library


def check_available() -> None:
    """Raise the one-line error of a missing quantizer before anything is written."""
    _library()


def quantize(data: np.ndarray, kind: T) -> np.ndarray:
    """``data`` (…, row) as ``kind``'s blocks, by ggml: uint8 (…, row / block × block bytes), as gguf-py lays them out."""
    library = _library()
    rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    block, size = GGML_QUANT_SIZES[kind]
    out = np.empty((*data.shape[:-1], data.shape[-1] // block * size), np.uint8)
    library.ggml_quantize_init(int(kind))
    written = library.ggml_quantize_chunk(int(kind), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes of {kind.name}, {out.nbytes} expected")
    return out
