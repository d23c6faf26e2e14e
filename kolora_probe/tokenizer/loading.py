"""Load the plan's tokenizer with the plan's class and special tokens (never remote code).

KoGPT-2 ships only ``tokenizer.json``; it must be loaded as
``PreTrainedTokenizerFast(tokenizer_file=..., bos_token="</s>", ...)``. ``AutoTokenizer`` (or any other class
name transformers exports) goes through ``from_pretrained`` with the plan's special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kolora_probe.model.source import ModelSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


class TokenizerLoadError(RuntimeError):
    """The tokenizer could not be loaded; the message is one actionable line."""


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Any
    requested_class: str          # the plan's [model].tokenizer_class
    class_name: str               # what was actually instantiated
    special_tokens: Mapping[str, str]
    files: tuple[str, ...]        # tokenizer files found for the model


def load_tokenizer(source: ModelSource, tokenizer_class: str = "AutoTokenizer",
                   special_tokens: Mapping[str, str] | None = None) -> LoadedTokenizer:
    """Instantiate ``tokenizer_class`` for ``source``. Raises TokenizerLoadError with one line."""
    import transformers

    from kolora_probe.model.loading import fetch_file

    special = dict(special_tokens or {})
    found = {name: fetch_file(source, name) for name in TOKENIZER_FILES}
    files = tuple(sorted(n for n, p in found.items() if p is not None))
    where = f"{source.model_id} ({source.path})"
    if not files:
        raise TokenizerLoadError(
            f"no tokenizer files in {where} (looked for {', '.join(TOKENIZER_FILES[:4])} …); fix: copy the model's "
            f"tokenizer.json next to its config.json (tokenizer.save_pretrained(DIR))")
    cls = getattr(transformers, tokenizer_class, None)
    if cls is None:
        raise TokenizerLoadError(f"[model].tokenizer_class = {tokenizer_class!r} is not a transformers class; use "
                                 f"\"PreTrainedTokenizerFast\" (with special_tokens) or \"AutoTokenizer\"")
    try:
        if tokenizer_class == "PreTrainedTokenizerFast":
            tj = found["tokenizer.json"]
            if tj is None:
                raise TokenizerLoadError(
                    f"[model].tokenizer_class = \"PreTrainedTokenizerFast\" needs tokenizer.json, which {where} lacks "
                    f"(has {', '.join(files)}); set [model].tokenizer_class = \"AutoTokenizer\" or add tokenizer.json")
            tok = cls(tokenizer_file=str(tj), **special)
        else:
            tok = cls.from_pretrained(str(source.path), trust_remote_code=False, **special)
    except TokenizerLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line, with the class that failed
        msg = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
        raise TokenizerLoadError(f"{tokenizer_class} could not load the tokenizer of {where}: "
                                 f"{type(exc).__name__}: {msg}; check [model].tokenizer_class and its files") from None
    return LoadedTokenizer(tok, tokenizer_class, type(tok).__name__, special, files)
