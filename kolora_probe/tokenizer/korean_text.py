"""The Korean sample text used by the tokenizer and agreement checks, and Hangul helpers.

The sample ships with kolora-probe (``kolora_probe/data/korean_sample.txt``); a plan may point
``[checks].korean_sample`` at another UTF-8 file with one sentence per line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PACKAGED_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "korean_sample.txt"


class KoreanSampleError(ValueError):
    """The Korean sample could not be used; the message is one actionable line."""


@dataclass(frozen=True)
class KoreanSample:
    path: Path
    lines: tuple[str, ...]

    @property
    def characters(self) -> int:
        return sum(len(line) for line in self.lines)

    @property
    def hangul_ratio(self) -> float:
        return hangul_ratio("".join(self.lines))


def is_hangul(ch: str) -> bool:
    """True for Hangul syllables and jamo (precomposed or compatibility)."""
    o = ord(ch)
    return (0xAC00 <= o <= 0xD7A3) or (0x1100 <= o <= 0x11FF) or (0x3130 <= o <= 0x318F) or (0xA960 <= o <= 0xA97F) \
        or (0xD7B0 <= o <= 0xD7FF)


def hangul_count(text: str) -> int:
    return sum(1 for ch in text if is_hangul(ch))


def hangul_ratio(text: str) -> float:
    """Share of the non-space characters of ``text`` that are Hangul (0.0 for empty text)."""
    chars = [ch for ch in text if not ch.isspace()]
    return hangul_count("".join(chars)) / len(chars) if chars else 0.0


def load_korean_sample(path: str | Path | None = None, min_hangul_ratio: float = 0.3) -> KoreanSample:
    """Read the sample (``path`` or the packaged one): non-empty stripped lines, checked to be mostly Korean."""
    p = Path(path).expanduser() if path else PACKAGED_SAMPLE
    where = f"[checks].korean_sample = {str(p)!r}" if path else f"packaged sample {p}"
    if not p.is_file():
        raise KoreanSampleError(f"{where}: file not found; point [checks].korean_sample at a UTF-8 text file "
                                f"with one Korean sentence per line (or remove it to use the packaged sample)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KoreanSampleError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    lines = tuple(line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip())
    if not lines:
        raise KoreanSampleError(f"{where}: has no non-empty lines; add Korean sentences, one per line")
    ratio = hangul_ratio("".join(lines))
    if ratio < min_hangul_ratio:
        raise KoreanSampleError(f"{where}: only {ratio:.0%} of its characters are Hangul (need >= "
                                f"{min_hangul_ratio:.0%}); use a Korean text file")
    return KoreanSample(p, lines)
