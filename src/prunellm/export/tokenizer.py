"""The GGUF tokenizer block, built from a saved model's Hugging Face tokenizer.

Two kinds are written: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM: ``tokenizer.ggml.model`` ``gpt2``) and
SentencePiece BPE as Hugging Face converts it (Llama 2, Mistral: BPE with byte fallback over "▁"-for-space text,
written as ``llama`` with token scores, byte tokens and ``add_space_prefix``).

llama.cpp re-implements tokenization from metadata: the token list (byte-level encoded, as in
``tokenizer.json``), token types, BPE merges, special-token ids, whether a BOS token is prepended, and the
name of its pre-tokenizer regex (``tokenizer.ggml.pre``). The pre-tokenizer is identified from the
``tokenizer.json`` pre-tokenizer description; an unknown one is refused rather than guessed, since a wrong
regex splits text differently and silently changes every prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gguf import GGUFWriter, TokenType
from transformers import PreTrainedTokenizerBase

from ..data import leading_special_tokens
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
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
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

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # the pre-tokenizer regex name (byte-level BPE only)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # SentencePiece: higher merges first
    merges: list[str]  # byte-level BPE: the merges in rank order
    special: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_space_prefix: bool | None  # SentencePiece: "▁" in front of the text
    chat_template: str | None


def _merge_list(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _is_sentencepiece(state: dict) -> bool:
    """BPE with byte fallback over "▁"-for-space text: what Hugging Face makes of a Llama 2 / Mistral tokenizer.model."""
    model, pre, normalizer = state["model"], state.get("pre_tokenizer") or {}, state.get("normalizer") or {}
    metaspace = pre.get("type") == "Metaspace" or "▁" in json.dumps(normalizer, ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and metaspace


def _space_prefix(state: dict) -> bool:
    """Whether a "▁" goes in front of the text: Metaspace's prepend_scheme, or the legacy Prepend normalizer.

    Refuses a Metaspace that splits the text at spaces first (llama.cpp merges across them, e.g. "▁▁") and any
    other pre-tokenizer.
    """
    pre, normalizer = state.get("pre_tokenizer") or {}, state.get("normalizer") or {}
    if pre.get("type") == "Metaspace":
        if pre.get("split", True):
            raise PrunellmError(
                "the tokenizer's Metaspace pre-tokenizer splits at spaces (split: true), which llama.cpp's SentencePiece "
                "tokenizer does not: GGUF export takes split: false or the Prepend/Replace normalizer"
            )
        return pre.get("prepend_scheme", "always") != "never"
    if pre:
        raise PrunellmError(
            f"the SentencePiece-style tokenizer has a {pre.get('type')} pre-tokenizer, which llama.cpp's SentencePiece "
            "tokenizer does not run: GGUF export takes Metaspace (split: false) or none (the Prepend/Replace normalizer)"
        )
    steps = normalizer.get("normalizers", [normalizer])
    return any(step.get("type") == "Prepend" and step.get("prepend") == "▁" for step in steps)


def _unlisted_split(token: str, known: set[str], listed: set[tuple[str, str]]) -> tuple[str, str] | None:
    """A split of ``token`` into two tokens that is no merge (llama.cpp would join it, Hugging Face would not)."""
    splits = ((token[:i], token[i:]) for i in range(1, len(token)))
    return next((pair for pair in splits if pair[0] in known and pair[1] in known and pair not in listed), None)


def _sentencepiece_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """Scores that make llama.cpp's merge order Hugging Face's: a token scores minus the rank of its first merge.

    llama.cpp merges the adjacent pair whose joined text is the best-scoring token; Hugging Face merges the
    lowest-ranked listed pair. They agree when every split of a token into two tokens is a listed merge, as in
    tokenizers converted from a SentencePiece model; anything else is refused rather than tokenized differently.
    """
    listed = set(merges)
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    known = set(tokens)
    for token, kind in zip(tokens, types):
        missing = _unlisted_split(token, known, listed) if kind == TokenType.NORMAL else None
        if missing is not None:
            raise PrunellmError(
                f"the tokenizer's BPE merges are not SentencePiece's: '{token}' = '{missing[0]}' + '{missing[1]}' (both tokens) "
                "is no merge, which llama.cpp's SentencePiece tokenizer would join: export needs one converted from a tokenizer.model"
            )
    return [-float(first_rank[token]) if token in first_rank else 0.0 for token in tokens]


def _check_byte_level(state: dict) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level BPE tokenizer, or a one-line refusal."""
    model = state["model"]
    signature = _signature(state.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or not any(kind == "ByteLevel" for kind, _ in signature):
        raise PrunellmError(
            f"the model's tokenizer is {model.get('type')} without byte-level pre-tokenization or SentencePiece-style "
            "byte fallback: GGUF export supports byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) and SentencePiece BPE (Llama 2, Mistral)"
        )
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise PrunellmError(
            f"the model's tokenizer pre-tokenizer {signature} has no known llama.cpp equivalent "
            f"(known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}): add it to PRE_TOKENIZERS in prunellm/export/tokenizer.py"
        )
    return pre


def _token_type(token: str, index: int, tokenizer: PreTrainedTokenizerBase, sentencepiece: bool) -> int:
    added = tokenizer.added_tokens_decoder
    if index == tokenizer.unk_token_id and sentencepiece:
        return TokenType.UNKNOWN
    if index in added:
        return TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED
    if sentencepiece and BYTE_TOKEN.fullmatch(token):  # <0x0A>: what byte fallback emits for a character not in the vocab
        return TokenType.BYTE
    return TokenType.NORMAL


def gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> GgufVocab:
    """Read a byte-level or SentencePiece BPE tokenizer into GGUF form, padded to the embedding's rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PrunellmError(f"the model's tokenizer ({type(tokenizer).__name__}) has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")
    state = json.loads(backend.to_str())
    sentencepiece = _is_sentencepiece(state)
    pre = None if sentencepiece else _check_byte_level(state)
    space_prefix = _space_prefix(state) if sentencepiece else None
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise PrunellmError(f"the tokenizer has ids up to {max(by_id)} but the embedding only {vocab_size} rows")
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # embedding rows without a token (vocab padded to a multiple)
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(_token_type(token, index, tokenizer, sentencepiece))
    merges = _merge_list(state["model"])
    scores = _sentencepiece_scores(tokens, types, merges) if sentencepiece else None
    special = {
        name: getattr(tokenizer, f"{name}_token_id")
        for name in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{name}_token_id", None) is not None
    }
    # what transformers does when the caller adds special tokens (its default): a prepended BOS or not
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and leading_special_tokens(tokenizer)[:1] == [bos]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return GgufVocab(
        model="llama" if sentencepiece else "gpt2",
        pre=pre,
        tokens=tokens,
        types=[int(t) for t in types],
        scores=scores,
        merges=[] if sentencepiece else [" ".join(m) for m in merges],
        special=special,
        add_bos=add_bos,
        add_space_prefix=space_prefix,
        chat_template=template,
    )


def write_vocab(writer: GGUFWriter, vocab: GgufVocab) -> None:
    """Add the tokenizer metadata to a GGUF writer."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
        writer.add_remove_extra_whitespaces(False)  # Hugging Face's conversions keep runs of spaces
    for name, index in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
