"""Facts about a tokenizer on the Korean sample: special tokens, lossless round trip, ``<unk>``, tokens/char, Hangul.

All functions are pure measurements; the checks decide. A tokenizer class that mangles Hangul (e.g. transformers
5's ``AutoTokenizer`` resolving KoGPT-2's ``tokenizer.json`` to a byte-level GPT-2 tokenizer that drops Korean)
shows up as lost Hangul in :func:`round_trip`, and :func:`hangul_fix_hint` says what to set in the plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kolora_probe.tokenizer.korean_text import hangul_count

SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
CONFIG_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
FIX = ('set [model].tokenizer_class = "PreTrainedTokenizerFast" and [model].special_tokens (for KoGPT-2: '
       'bos_token = "</s>", eos_token = "</s>", unk_token = "<unk>", pad_token = "<pad>", mask_token = "<mask>")')


@dataclass(frozen=True)
class SpecialToken:
    attr: str              # "eos_token"
    token: str | None      # its string, None when the tokenizer has none
    id: int | None         # its id, None when not in the vocabulary
    in_vocab: bool


@dataclass(frozen=True)
class ConfigIdCheck:
    name: str              # "eos_token_id"
    config_id: int | None
    tokenizer_id: int | None
    config_token: str | None  # the vocabulary token at the config's id
    strict: bool           # eos/pad must match; bos differs by convention in some models (KoGPT-2: config 0 "<s>")

    @property
    def matches(self) -> bool:
        return self.config_id is None or self.config_id == self.tokenizer_id

    @property
    def message(self) -> str:
        return (f"config.{self.name} = {self.config_id} ({self.config_token!r}) but the tokenizer's "
                f"{self.name.removesuffix('_id')} is id {self.tokenizer_id}")


@dataclass(frozen=True)
class RoundTrip:
    lines: int
    mismatches: int
    examples: tuple[tuple[str, str], ...]   # (original, decoded), at most a few
    tokens: int
    characters: int
    unk_count: int
    unk_lines: int
    hangul_in: int
    hangul_out: int

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.characters if self.characters else 0.0

    @property
    def hangul_kept(self) -> float:
        """Share of the sample's Hangul characters that survive encode→decode (1.0 = all)."""
        return self.hangul_out / self.hangul_in if self.hangul_in else 1.0


def vocab_size(tokenizer) -> int:
    return len(tokenizer)


def special_tokens(tokenizer) -> tuple[SpecialToken, ...]:
    vocab = tokenizer.get_vocab()
    out = []
    for attr in SPECIAL_ATTRS:
        tok = getattr(tokenizer, attr, None)
        tok = str(tok) if tok is not None else None
        tid = vocab.get(tok) if tok is not None else None
        out.append(SpecialToken(attr, tok, tid, tid is not None))
    return tuple(out)


def config_id_checks(tokenizer, config) -> tuple[ConfigIdCheck, ...]:
    out = []
    for name in CONFIG_IDS:
        cid = getattr(config, name, None)
        if isinstance(cid, (list, tuple)):
            cid = cid[0] if cid else None
        tid = getattr(tokenizer, name, None)
        ctok = tokenizer.convert_ids_to_tokens(cid) if isinstance(cid, int) and 0 <= cid < len(tokenizer) else None
        out.append(ConfigIdCheck(name, cid, tid, ctok, strict=name != "bos_token_id"))
    return tuple(out)


def round_trip(tokenizer, lines: Sequence[str], max_examples: int = 3) -> RoundTrip:
    """Encode each line without special tokens, decode it, and compare; count ``<unk>`` and Hangul kept."""
    unk = getattr(tokenizer, "unk_token_id", None)
    enc = tokenizer(list(lines), add_special_tokens=False)["input_ids"]
    mismatches, examples = 0, []
    tokens = unk_count = unk_lines = h_in = h_out = 0
    for line, ids in zip(lines, enc):
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        tokens += len(ids)
        n_unk = sum(1 for i in ids if unk is not None and i == unk)
        unk_count += n_unk
        unk_lines += n_unk > 0
        h_in += hangul_count(line)
        h_out += min(hangul_count(text), hangul_count(line))
        if text != line:
            mismatches += 1
            if len(examples) < max_examples:
                examples.append((line, text))
    return RoundTrip(len(lines), mismatches, tuple(examples), tokens, sum(len(x) for x in lines), unk_count,
                     unk_lines, h_in, h_out)


def mangles_hangul(rt: RoundTrip, min_kept: float = 0.99) -> bool:
    return rt.hangul_kept < min_kept


def hangul_fix_hint(requested_class: str, class_name: str, rt: RoundTrip) -> str:
    """One line: which class lost how much Hangul, and the fix."""
    ex = rt.examples[0] if rt.examples else ("", "")
    return (f"tokenizer class {requested_class} (resolved to {class_name}) loses Hangul: only {rt.hangul_kept:.0%} "
            f"of the sample's {rt.hangul_in} Hangul characters survive encode→decode (e.g. {ex[0][:30]!r} → "
            f"{ex[1][:30]!r}); fix: {FIX}")


def describe_examples(rt: RoundTrip) -> str:
    return "; ".join(f"{a[:40]!r} → {b[:40]!r}" for a, b in rt.examples)
