"""Generation smoke test: greedy decoding from a Korean prompt produces new, decodable tokens with finite logits."""
from __future__ import annotations

import time
from dataclasses import dataclass

DEFAULT_PROMPT = "오늘 날씨가 좋아서"
DEFAULT_NEW_TOKENS = 4   # proves it runs and decodes; each token is one more forward pass of the model


@dataclass(frozen=True)
class Generation:
    prompt: str
    prompt_tokens: int
    new_token_ids: tuple[int, ...]
    text: str                 # decoded new tokens
    decodable: bool
    logits_finite: bool
    stopped_at_eos: bool
    seconds: float

    @property
    def new_tokens(self) -> int:
        return len(self.new_token_ids)


def greedy_generate(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = DEFAULT_NEW_TOKENS,
                    use_cache: bool = True, threads: int | None = None) -> Generation:
    """Greedy loop (argmax of the last position) so every step's logits are checked for NaN/inf.

    With ``use_cache`` (default) the prompt is run once and each step feeds only the new token with the model's
    key/value cache, as ``generate()`` does; without it every step re-runs the whole sequence. Runs under
    ``torch.inference_mode()`` with ``threads`` (default: :func:`kolora_probe.env.facts.usable_threads`).
    """
    import torch

    from kolora_probe.env.facts import torch_threads, usable_threads

    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens; the tokenizer drops this text")
    eos = tokenizer.eos_token_id
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    device = next(model.parameters()).device
    new: list[int] = []
    finite = True
    stopped = False
    cache = None
    t0 = time.perf_counter()
    with torch_threads(threads or usable_threads()), torch.inference_mode():
        for _ in range(max_new_tokens):
            if len(ids) + len(new) >= n_pos:
                break
            step = [new[-1]] if cache is not None else ids + new
            out = model(input_ids=torch.tensor([step], dtype=torch.long, device=device), cache=cache,
                        use_cache=use_cache)
            cache = getattr(out, "cache", None) if use_cache else None  # transformers 5 names it `cache`
            logits = out.logits[0, -1].float()
            if not bool(torch.isfinite(logits).all()):
                finite = False
                break
            nxt = int(logits.argmax())
            new.append(nxt)
            if eos is not None and nxt == eos:
                stopped = True
                break
    seconds = time.perf_counter() - t0
    try:
        text = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        decodable = isinstance(text, str) and "\ufffd" not in text
    except Exception:  # noqa: BLE001 - an undecodable id is the finding
        text, decodable = "", False
    return Generation(prompt, len(ids), tuple(new), text, decodable, finite, stopped, seconds)
