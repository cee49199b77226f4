"""Run an exported GGUF in llama.cpp in this process (PyPI ``xllamacpp``): greedy tokens, tokenization, speed.

Used by the tests (does llama.cpp continue a prompt exactly like transformers?) and the serving benchmark.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrunellmError


@dataclass(frozen=True)
class Completion:
    """Greedy tokens from one request and llama.cpp's own timings of it."""

    tokens: list[int]
    prompt_tokens: int
    prompt_per_second: float
    predicted_tokens: int
    predicted_per_second: float


class LlamaCpp:
    """One llama.cpp server (in process) on one GGUF file, pinned to ``threads`` CPU threads.

    ``exact`` keeps the KV cache and attention in float32 (llama.cpp's defaults are f16) to compare with transformers.
    """

    def __init__(self, gguf_file: str | Path, threads: int = 1, n_ctx: int = 512, n_batch: int = 512, exact: bool = False):
        try:
            import xllamacpp
        except ImportError as exc:
            raise PrunellmError("running llama.cpp needs the PyPI package xllamacpp: pip install 'prunellm[serve]'") from exc
        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_file)
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        if exact:  # llama.cpp keeps K and V in f16 and its CPU flash attention accumulates in f16
            params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        try:
            self.server = xllamacpp.Server(params)
        except RuntimeError as exc:
            raise PrunellmError(f"llama.cpp could not load '{gguf_file}' ({exc}); its log above says why") from exc

    def _post(self, endpoint: str, body: dict) -> dict:
        url = self.server.listening_address.rstrip("/") + endpoint
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def complete(self, prompt: str | list[int], max_tokens: int) -> Completion:
        """Greedy continuation of ``prompt`` (text, or token ids used as they are), exactly ``max_tokens`` long."""
        result = self._post(
            "/completion",
            {
                "prompt": prompt,
                "n_predict": max_tokens,
                "temperature": 0.0,
                "top_k": 1,
                "ignore_eos": True,
                "cache_prompt": False,
                "return_tokens": True,
            },
        )
        timings = result["timings"]
        return Completion(
            tokens=[int(t) for t in result["tokens"]],
            prompt_tokens=int(timings["prompt_n"]),
            prompt_per_second=float(timings["prompt_per_second"]),
            predicted_tokens=int(timings["predicted_n"]),
            predicted_per_second=float(timings["predicted_per_second"]),
        )

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of ``text`` (with a BOS token when the GGUF asks for one)."""
        return [int(t) for t in self._post("/tokenize", {"content": text, "add_special": True})["tokens"]]
