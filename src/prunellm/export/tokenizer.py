"""The GGUF tokenizer block, built from a saved model's Hugging Face tokenizer (byte-level BPE only).

llama.cpp re-implements tokenization from metadata: the token list (byte-level encoded, as in
``tokenizer.json``), token types, BPE merges, special-token ids, whether a BOS token is prepended, and the
name of its pre-tokenizer regex (``tokenizer.ggml.pre``). The pre-tokenizer is identified from the
``tokenizer.json`` pre-tokenizer description; an unknown one is refused rather than guessed, since a wrong
regex splits text differently and silently changes every prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gguf import GGUFWriter, TokenType
from transformers import PreTrainedTokenizerBase

from ..errors import PrunellmError

# llama.cpp pre-tokenizer name -> the tokenizers pre-tokenizer description that behaves the same
# (each entry: the sequence of (type, distinguishing setting) pairs, as _signature() produces them)
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
}


def _signature(pre: dict | None) -> tuple:
    """(type, setting) per pre-tokenizer step: ByteLevel -> use_regex, Digits -> individual_digits, Split -> regex."""
    if pre is None:
        return ()
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    signature = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            signature.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Digits":
            signature.append((kind, bool(step.get("individual_digits", False))))
        elif kind == "Split":
            signature.append((kind, (step.get("pattern") or {}).get("Regex")))
        else:
            signature.append((kind, None))
    return tuple(signature)


@dataclass(frozen=True)
class GgufVocab:
    """Everything llama.cpp needs to tokenize like the Hugging Face tokenizer."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    chat_template: str | None


def gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> GgufVocab:
    """Read the byte-level BPE tokenizer of a saved model into GGUF form, padded to the embedding's rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PrunellmError(f"the model's tokenizer ({type(tokenizer).__name__}) has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")
    state = json.loads(backend.to_str())
    model = state["model"]
    signature = _signature(state.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or not any(kind == "ByteLevel" for kind, _ in signature):
        raise PrunellmError(
            f"the model's tokenizer is {model.get('type')} without byte-level pre-tokenization (SentencePiece style): "
            "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM) only"
        )
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise PrunellmError(
            f"the model's tokenizer pre-tokenizer {signature} has no known llama.cpp equivalent "
            f"(known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}): add it to PRE_TOKENIZERS in prunellm/export/tokenizer.py"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if by_id and max(by_id) >= vocab_size:
        raise PrunellmError(f"the tokenizer has ids up to {max(by_id)} but the embedding only {vocab_size} rows")
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # embedding rows without a token (vocab padded to a multiple)
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {
        name: getattr(tokenizer, f"{name}_token_id")
        for name in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{name}_token_id", None) is not None
    }
    # what transformers does when the caller adds special tokens (its default): a prepended BOS or not
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return GgufVocab(pre, tokens, [int(t) for t in types], merges, special, add_bos, template)


def write_vocab(writer: GGUFWriter, vocab: GgufVocab) -> None:
    """Add the tokenizer metadata to a GGUF writer."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, index in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
