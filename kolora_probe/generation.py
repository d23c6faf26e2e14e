"""Generation smoke test: greedy decoding from a Korean prompt produces new, decodable tokens with finite logits."""
from __future__ import annotations

import time
from dataclasses import dataclass

DEFAULT_PROMPT = "오늘 날씨가 좋아서"


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


def greedy_generate(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 12) -> Generation:
    """Greedy loop (argmax of the last position) so every step's logits are checked for NaN/inf."""
    import torch

    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens; the tokenizer drops this text")
    eos = tokenizer.eos_token_id
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    device = next(model.parameters()).device
    new: list[int] = []
    finite = True
    stopped = False
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if len(ids) + len(new) >= n_pos:
                break
            inp = torch.tensor([ids + new], dtype=torch.long, device=device)
            logits = model(input_ids=inp).logits[0, -1].float()
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
