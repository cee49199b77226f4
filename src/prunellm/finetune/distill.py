"""Distillation at little more than the cost of plain training: the teacher runs once per training window.

Before training, :func:`build_teacher_cache` runs the teacher over every training example (no grad, in batches,
on the training device) and keeps, for each labelled position, the teacher's ``k`` most likely tokens at
temperature ``T`` (their log-probabilities and ids) and the log of the probability mass outside them. The cache is
keyed by the example's index (an ``example_index`` column the collator passes through), so shuffling, epochs and
resumed runs all read the same rows, and it lives on the CPU: ``positions × k × (2 or 4 + 4)`` bytes plus 4 per
position.

:func:`sparse_kl` is the KL of top-k distillation over the ``k`` tokens plus one "rest" bucket::

    KL = Σ_{i ∈ top-k} p_i (log p_i − log q_i) + p_rest (log p_rest − log q_rest)

with ``q_rest = 1 − Σ_{i ∈ top-k} q_i`` computed as a logsumexp over the student's other logits. With ``k`` equal to
the vocabulary the rest bucket is empty and it equals the full KL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..errors import PrunellmError
from ..options import DistillOptions
from .data import IGNORE_INDEX, PadCollator

log = logging.getLogger(__name__)

EXAMPLE_INDEX = "example_index"  # the column that keys a training example's rows of the teacher cache


@dataclass
class TeacherTargets:
    """The teacher's top-k distribution at temperature T for N labelled positions (or the rows of a cache)."""

    log_probs: torch.Tensor  # (N, k) log p_i of the top-k tokens, float16 or float32
    indices: torch.Tensor  # (N, k) their token ids, int32
    log_rest: torch.Tensor  # (N,) log(1 − Σ top-k p_i), −inf where no mass is left (k = vocabulary), float32

    def to(self, device: Any) -> "TeacherTargets":
        return TeacherTargets(*(t.to(device, non_blocking=True) for t in (self.log_probs, self.indices, self.log_rest)))


def teacher_targets(logits: torch.Tensor, top_k: int, temperature: float, dtype: torch.dtype = torch.float32) -> TeacherTargets:
    """Top-k log-probabilities at ``temperature`` and the log of the remaining mass, from (N, V) teacher logits."""
    log_p = F.log_softmax(logits.float() / temperature, -1)  # (N, V)
    k = min(top_k, log_p.shape[-1])
    values, indices = log_p.topk(k, -1)  # (N, k)
    if k == log_p.shape[-1]:
        log_rest = torch.full(values.shape[:1], float("-inf"), device=values.device)
    else:  # a logsumexp over the other tokens: exact even where Σ top-k p is within rounding of 1
        log_rest = log_p.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return TeacherTargets(values.to(dtype), indices.to(torch.int32), log_rest)


def sparse_kl(student_logits: torch.Tensor, targets: TeacherTargets, temperature: float) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ student) on the top-k tokens plus the rest bucket, at ``temperature``.

    Args:
        student_logits: (N, V) the student's logits at the same N labelled positions as ``targets``.
        targets: the teacher's top-k log-probabilities, token ids and log rest mass at ``temperature``.
        temperature: the softmax temperature of both sides (the caller multiplies by T²).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, -1)  # (N, V)
    indices = targets.indices.long()
    log_p = targets.log_probs.float()  # (N, k)
    kl = (log_p.exp() * (log_p - log_q.gather(-1, indices))).sum()
    if indices.shape[-1] < log_q.shape[-1]:  # the rest bucket; empty when k is the whole vocabulary
        log_q_rest = log_q.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (N,) log(1 − Σ top-k q_i)
        p_rest = targets.log_rest.exp()
        # where the teacher left no mass outside its top-k, the bucket adds 0 (not 0·(−inf))
        kl = kl + torch.where(p_rest > 0, p_rest * (targets.log_rest - log_q_rest), torch.zeros_like(p_rest)).sum()
    return kl


@dataclass
class TeacherCache:
    """The teacher's top-k targets of every labelled position of the training examples, on the CPU.

    Rows ``offsets[i]:offsets[i + 1]`` belong to training example ``i``, in the order of its labelled positions
    (those whose next-token label is not −100), which is the order ``logits[:, :-1][mask]`` takes them in a batch.
    """

    targets: TeacherTargets
    offsets: torch.Tensor  # (n_examples + 1,) int64
    top_k: int
    temperature: float
    seconds: float  # the teacher pass that built it

    @property
    def positions(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.targets.log_probs, self.targets.indices, self.targets.log_rest))

    def rows(self, example_index: torch.Tensor) -> TeacherTargets:
        """The targets of a batch's labelled positions, for its examples in batch order."""
        starts, ends = self.offsets[example_index.cpu()], self.offsets[example_index.cpu() + 1]
        rows = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)])
        t = self.targets
        return TeacherTargets(t.log_probs[rows], t.indices[rows], t.log_rest[rows])


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module, examples: Sequence[dict[str, list[int]]], options: DistillOptions, collator: PadCollator,
    batch_size: int, device: Any, autocast: Any = None,
) -> TeacherCache:
    """Run ``teacher`` once over ``examples`` (in batches of ``batch_size`` on ``device``) and keep its top-k targets."""
    import contextlib

    start = time.perf_counter()
    dtype = torch.float16 if options.distill_cache_dtype == "float16" else torch.float32
    _check_fits(examples, min(options.distill_top_k, teacher.config.vocab_size), dtype)
    parts: list[TeacherTargets] = []
    counts: list[int] = []
    for first in range(0, len(examples), batch_size):
        batch = collator(list(examples[first : first + batch_size]))
        mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1) positions with a next-token label
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        targets = teacher_targets(logits[:, :-1][mask.to(device)], options.distill_top_k, options.distill_temperature, dtype)
        parts.append(targets.to("cpu"))
        counts += mask.sum(1).tolist()
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    merged = TeacherTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in ("log_probs", "indices", "log_rest")))
    cache = TeacherCache(merged, offsets, merged.indices.shape[-1], options.distill_temperature, time.perf_counter() - start)
    log.info("teacher cache: %d windows, %d labelled positions × top-%d (%s) = %.1f MB, built in %.1f s",
             len(examples), cache.positions, cache.top_k, options.distill_cache_dtype, cache.nbytes / 2**20, cache.seconds)  # fmt: skip
    return cache


def _check_fits(examples: Sequence[dict[str, list[int]]], k: int, dtype: torch.dtype) -> None:
    """Refuse a cache larger than half of the memory available now (it lives on the CPU for the whole run)."""
    try:
        import psutil
    except ImportError:  # not a dependency: without it the size is only logged
        return
    positions = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    needed = positions * (k * (torch.finfo(dtype).bits // 8 + 4) + 4)
    available = psutil.virtual_memory().available
    if needed > available // 2:
        raise PrunellmError(
            f"the teacher cache would take {needed / 2**30:.1f} GiB ({positions} labelled positions × top-{k}), more than half "
            f"of the {available / 2**30:.1f} GiB available: lower --distill_top_k, use --distill_cache_dtype float16, or "
            "--distill_cache False (the teacher then runs on every batch)"
        )


class DistillTrainer(Trainer):
    """Trainer whose training loss is (1 − α)·NLL + α·T²·KL(teacher ‖ student) over the labelled positions.

    Both terms are summed over the positions whose next-token label is not −100 (padding and, by default,
    prompt tokens never count) and divided like the library's own loss: by ``num_items_in_batch`` (all
    labelled tokens of the accumulated batch) when the Trainer passes it, else by this batch's count.
    The teacher's side comes from ``teacher_cache`` when it is set and the batch carries ``example_index``; else
    from a live teacher forward (its top-k, or the full distribution when ``distill_top_k`` is 0: the exact KL).
    Validation uses the plain LM loss, so validation losses stay comparable with and without distillation.
    """

    def __init__(self, *args, teacher: nn.Module, distill: DistillOptions, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        self.teacher.requires_grad_(False)
        self.distill = distill
        self.teacher_cache: TeacherCache | None = None

    def build_teacher_cache(self, examples: Sequence[dict[str, list[int]]]) -> TeacherCache:
        """Fill ``teacher_cache`` from one teacher pass over the training examples (batches of the micro-batch size)."""
        self.teacher_cache = build_teacher_cache(
            self.teacher, examples, self.distill, self.data_collator, self.args.per_device_train_batch_size, self.args.device,
            self.autocast_smart_context_manager,
        )
        return self.teacher_cache

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        example_index = inputs.pop(EXAMPLE_INDEX, None)  # (B,) keys of the teacher cache
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"][:, 1:]  # (B, T-1): the token each position predicts
        mask = labels != IGNORE_INDEX
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        student = outputs.logits[:, :-1][mask].float()  # (N, V) labelled positions only
        t, alpha, k = self.distill.distill_temperature, self.distill.distill_alpha, self.distill.distill_top_k
        if self.teacher_cache is not None and example_index is not None:
            kl = sparse_kl(student, self.teacher_cache.rows(example_index).to(student.device), t)
        else:
            with torch.no_grad():
                teacher = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1][mask]
            if k:
                kl = sparse_kl(student, teacher_targets(teacher, k, t), t)
            else:  # today's exact full KL
                kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher.float() / t, -1), log_target=True, reduction="sum")
        nll = F.cross_entropy(student, labels[mask], reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        loss = ((1 - alpha) * nll + alpha * kl * t * t) / count
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, outputs) if return_outputs else loss
