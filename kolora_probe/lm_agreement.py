"""Tokenizer–model agreement: mean LM loss of the loaded model on the Korean sample, vs ln(vocab).

A model that predicts uniformly over its vocabulary has loss ln(vocab); a pretrained model with its own
tokenizer is far below that. Random/shuffled weights or a tokenizer whose ids mean something else to the model
stay near (or above) ln(vocab). The check passes when ``mean_loss < max_loss_fraction × ln(vocab)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence


class AgreementError(ValueError):
    """The tokenizer's ids cannot be fed to the model; the message is one actionable line."""


@dataclass(frozen=True)
class Agreement:
    mean_loss: float          # mean next-token cross-entropy (nats) over all predicted tokens
    perplexity: float
    vocab_size: int           # the model's output vocabulary
    ln_vocab: float
    max_loss_fraction: float
    lines: int
    predicted_tokens: int
    seconds: float

    @property
    def threshold(self) -> float:
        return self.max_loss_fraction * self.ln_vocab

    @property
    def passed(self) -> bool:
        return math.isfinite(self.mean_loss) and self.mean_loss < self.threshold

    @property
    def loss_fraction(self) -> float:
        return self.mean_loss / self.ln_vocab


def model_vocab_size(model) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def lm_agreement(model, tokenizer, lines: Sequence[str], max_loss_fraction: float = 0.6, batch_size: int = 16,
                 max_length: int | None = None) -> Agreement:
    """Mean LM loss of ``model`` on ``lines`` tokenized by ``tokenizer`` (batched, no grad, CPU/own device)."""
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
    device = next(model.parameters()).device
    total = 0.0
    count = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(enc), batch_size):
            chunk = [ids for ids in enc[start:start + batch_size] if len(ids) >= 2]
            if not chunk:
                continue
            width = max(len(ids) for ids in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):
                inp[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                att[i, :len(ids)] = 1
            inp, att = inp.to(device), att.to(device)
            logits = model(input_ids=inp, attention_mask=att).logits.float()
            targets = inp[:, 1:].masked_fill(att[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     targets.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((targets != -100).sum())
    seconds = time.perf_counter() - t0
    mean = total / count if count else float("nan")
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf")
    return Agreement(mean, ppl, vocab, math.log(vocab), max_loss_fraction, len(enc), count, seconds)
