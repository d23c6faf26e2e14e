"""Tokenizer–model agreement: mean LM loss of the loaded model on the Korean sample, vs ln(vocab).

A model that predicts uniformly over its vocabulary has loss ln(vocab); a pretrained model with its own
tokenizer is far below that. Random/shuffled weights or a tokenizer whose ids mean something else to the model
stay near (or above) ln(vocab). The check passes when ``mean_loss < max_loss_fraction × ln(vocab)``.

The decision needs far fewer tokens than the whole sample: lines are evaluated in batches, in file order, and
evaluation stops as soon as the running mean ± ``z`` standard errors lies entirely on one side of the threshold
(lines are the sampling units: the ratio estimator's standard error, so correlated tokens of one line are not
counted as independent evidence). At least ``min_lines`` lines are always used. The work is capped by a token
budget that shrinks with the model's size (:func:`default_token_budget`); when the budget or the sample runs out
first, the verdict is the running mean against the threshold, as with the whole sample.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Sequence

from kolora_probe.env.facts import torch_threads, usable_threads

AGREEMENT_FORWARD_FLOPS = 2e12   # forward FLOPs (≈ 2·N per token) the check may spend: 8,000 tokens at 125 M
MIN_TOKEN_BUDGET = 256           # a 7B model still gets a few lines
DEFAULT_Z = 4.0                  # "clearly on one side": the threshold is ≥ 4 standard errors away
DEFAULT_MIN_LINES = 16

Stop = Literal["decided", "budget", "sample"]


class AgreementError(ValueError):
    """The tokenizer's ids cannot be fed to the model; the message is one actionable line."""


@dataclass(frozen=True)
class Agreement:
    mean_loss: float          # mean next-token cross-entropy (nats) over the predicted tokens used
    perplexity: float
    vocab_size: int           # the model's output vocabulary
    ln_vocab: float
    max_loss_fraction: float
    lines: int                # lines in the sample
    predicted_tokens: int     # tokens whose loss was computed (the evidence)
    seconds: float
    lines_used: int = 0
    sample_tokens: int = 0    # predictable tokens in the whole sample (after truncation to max_length)
    std_error: float = float("nan")   # standard error of mean_loss, lines as units (nan below 2 lines)
    z: float | None = None    # interval half-width in standard errors (None: no early stop)
    token_budget: int | None = None
    stopped: Stop = "sample"  # decided: interval clear of the threshold; budget: cap reached; sample: all lines used
    threads: int = 1

    @property
    def threshold(self) -> float:
        return self.max_loss_fraction * self.ln_vocab

    @property
    def passed(self) -> bool:
        return math.isfinite(self.mean_loss) and self.mean_loss < self.threshold

    @property
    def loss_fraction(self) -> float:
        return self.mean_loss / self.ln_vocab

    @property
    def interval(self) -> tuple[float, float]:
        """mean ± z·SE (z = 4 when no early-stop z was used); (nan, nan) when the SE is unknown."""
        z = self.z if self.z is not None else DEFAULT_Z
        return (self.mean_loss - z * self.std_error, self.mean_loss + z * self.std_error)


def model_vocab_size(model) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def default_token_budget(n_params: int) -> int:
    """Tokens the check may evaluate: ``AGREEMENT_FORWARD_FLOPS / (2·N)``, at least ``MIN_TOKEN_BUDGET``."""
    return max(MIN_TOKEN_BUDGET, int(AGREEMENT_FORWARD_FLOPS / (2 * max(n_params, 1))))


def _mean_and_se(line_loss: list[float], line_tokens: list[int]) -> tuple[float, float]:
    """Ratio estimator ΣL/Σn and its standard error with lines as clusters."""
    total_tokens = sum(line_tokens)
    if not total_tokens:
        return float("nan"), float("nan")
    mean = sum(line_loss) / total_tokens
    k = len(line_tokens)
    if k < 2 or not math.isfinite(mean):
        return mean, float("nan")
    resid = sum((L - mean * n) ** 2 for L, n in zip(line_loss, line_tokens))
    return mean, math.sqrt(k / (k - 1) * resid) / total_tokens


def lm_agreement(model, tokenizer, lines: Sequence[str], max_loss_fraction: float = 0.6, batch_size: int = 16,
                 max_length: int | None = None, *, z: float | None = DEFAULT_Z,
                 min_lines: int = DEFAULT_MIN_LINES, token_budget: int | Literal["auto"] | None = "auto",
                 threads: int | None = None) -> Agreement:
    """Mean LM loss of ``model`` on ``lines`` tokenized by ``tokenizer``, with as few lines as the verdict needs.

    ``z=None`` and ``token_budget=None`` evaluate every line (the exact mean over the whole sample).
    ``token_budget="auto"`` is :func:`default_token_budget` of the model's parameter count. Runs under
    ``torch.inference_mode()`` with ``threads`` (default: :func:`kolora_probe.env.facts.usable_threads`).
    """
    import torch

    vocab = model_vocab_size(model)
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    max_length = min(max_length or 256, n_pos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    enc = [ids[:max_length] for ids in tokenizer(list(lines), add_special_tokens=False)["input_ids"]]
    top = max((max(ids) for ids in enc if ids), default=0)
    if top >= vocab:
        raise AgreementError(f"the tokenizer produces id {top} but the model's vocabulary has {vocab} entries: "
                             f"tokenizer and model do not belong together; load the tokenizer shipped with the model")
    usable = [ids for ids in enc if len(ids) >= 2]
    sample_tokens = sum(len(ids) - 1 for ids in usable)
    if token_budget == "auto":
        token_budget = default_token_budget(sum(p.numel() for p in model.parameters()))
    threshold = max_loss_fraction * math.log(vocab)
    device = next(model.parameters()).device
    threads = threads or usable_threads()
    line_loss: list[float] = []
    line_tokens: list[int] = []
    mean, se = float("nan"), float("nan")
    stopped: Stop = "sample"
    t0 = time.perf_counter()
    with torch_threads(threads), torch.inference_mode():
        start = 0
        while start < len(usable):
            chunk = usable[start:start + batch_size]
            if token_budget is not None:
                room = token_budget - sum(line_tokens)
                if room <= 0:
                    stopped = "budget"
                    break
                fits, used = 0, 0
                for ids in chunk:                      # only what fits the budget (the first line always)
                    if (fits or line_tokens) and used + len(ids) - 1 > room:
                        break
                    fits, used = fits + 1, used + len(ids) - 1
                if not fits:
                    stopped = "budget"
                    break
                chunk = chunk[:fits]
            start += len(chunk)
            width = max(len(ids) for ids in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):
                inp[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                att[i, :len(ids)] = 1
            inp, att = inp.to(device), att.to(device)
            logits = model(input_ids=inp, attention_mask=att).logits
            targets = inp[:, 1:].masked_fill(att[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     targets.reshape(-1), ignore_index=-100, reduction="none")
            line_loss += loss.view(len(chunk), width - 1).sum(dim=1).tolist()
            line_tokens += [len(ids) - 1 for ids in chunk]
            mean, se = _mean_and_se(line_loss, line_tokens)
            if not math.isfinite(mean):
                stopped = "decided"                    # NaN/inf loss: the verdict cannot change
                break
            if z is not None and len(line_tokens) >= min_lines and math.isfinite(se) and (
                    mean + z * se < threshold or mean - z * se >= threshold):
                stopped = "decided"
                break
    seconds = time.perf_counter() - t0
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
    return Agreement(mean, ppl, vocab, math.log(vocab), max_loss_fraction, len(enc), sum(line_tokens), seconds,
                     lines_used=len(line_tokens), sample_tokens=sample_tokens, std_error=se, z=z,
                     token_budget=token_budget, stopped=stopped, threads=threads)
