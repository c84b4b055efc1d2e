"""Offline tokenizers for MedBLIP's stand-in models, trained with the ``tokenizers`` library.

No model hub is reachable from the project machines, so the tiny stand-ins of MedBLIP's Q-Former and
frozen LLMs (spec ``methods/medblip.md`` §12.2) get small tokenizers trained on the synthetic EHR texts:

* ``wordpiece`` - BERT-style (lowercasing ``BertNormalizer``, ``BertPreTokenizer``, WordPiece, specials
  ``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``[CLS] $A [SEP]``), about 1000 entries: the Q-Former's tokenizer;
* ``t5`` - T5-like, word level: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2; lowercased; words and single
  punctuation marks are the tokens, a word that follows a space carries SentencePiece's ``▁`` marker, so
  decoding restores the spacing (``"mild cognitive impairment (mci)"``); ``</s>`` is appended to every
  encoded text, like T5's own tokenizer;
* ``gpt2`` - GPT-2-like, word level and case-preserving, the space marker is ``Ġ``; one special token,
  ``<|endoftext|>``, is bos, eos, unk and pad at once; encoding adds no special token.

Each is wrapped in :class:`transformers.PreTrainedTokenizerFast` and saved with ``save_pretrained``, so
``AutoTokenizer.from_pretrained(directory)`` reads it back.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TOKENIZER_VERSION = 1  # bump whenever the recipe below changes, so cached tokenizers are retrained
KINDS = ("wordpiece", "t5", "gpt2")
WORDPIECE_VOCAB = 1000
WORD_VOCAB = 4000  # upper bound for the word-level kinds; the synthetic corpus needs far fewer
MODEL_MAX_LENGTH = 512

WORDPIECE_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
T5_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}  # ids 0, 1, 2 in this order
GPT2_ENDOFTEXT = "<|endoftext|>"
GPT2_SPECIALS = {"bos_token": GPT2_ENDOFTEXT, "eos_token": GPT2_ENDOFTEXT, "unk_token": GPT2_ENDOFTEXT, "pad_token": GPT2_ENDOFTEXT}

_T5_SPACE = "\u2581"  # SentencePiece's word-boundary marker
_GPT2_SPACE = "\u0120"  # GPT-2's byte-level marker for a leading space


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown tokenizer kind '{kind}'. Available: {', '.join(KINDS)}.")


def _word_level(marker: str, lowercase: bool, specials: list[str], unk: str, corpus: Iterable[str]) -> Any:
    """A word-level tokenizer: texts are whitespace-normalised, every space becomes ``marker`` (one is also
    put before the first word), and the pieces are ``marker? word`` or ``marker? punctuation-mark``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=unk))
    steps = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Strip(), normalizers.Replace(Regex(r"\s+"), marker), normalizers.Prepend(marker)]
    tok.normalizer = normalizers.Sequence(steps)
    # after normalisation there is no whitespace left: a piece is a run of word characters or one other
    # character, either optionally preceded by the marker
    pattern = f"{marker}?[^\\W{marker}]+|{marker}?[^\\w{marker}]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Metaspace(replacement=marker, prepend_scheme="always")
    trainer = trainers.WordLevelTrainer(vocab_size=WORD_VOCAB, special_tokens=specials, min_frequency=1)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _train(kind: str, corpus: Iterable[str]) -> Any:
    """Train the ``tokenizers.Tokenizer`` of ``kind`` and wrap it in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = list(WORDPIECE_SPECIALS.values())
        trainer = trainers.WordPieceTrainer(vocab_size=WORDPIECE_VOCAB, special_tokens=specials, min_frequency=1)
        tok.train_from_iterator(corpus, trainer=trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        special_map = WORDPIECE_SPECIALS
    elif kind == "t5":
        tok = _word_level(_T5_SPACE, True, list(T5_SPECIALS.values()), "<unk>", corpus)
        eos_id = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", eos_id)]
        )
        special_map = T5_SPECIALS
    else:
        tok = _word_level(_GPT2_SPACE, False, [GPT2_ENDOFTEXT], GPT2_ENDOFTEXT, corpus)
        special_map = GPT2_SPECIALS
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MODEL_MAX_LENGTH, **special_map)


def build_tokenizer(kind: str, corpus: Iterable[str], out_dir: str | Path) -> Path:
    """Train a tokenizer of ``kind`` (``wordpiece``, ``t5`` or ``gpt2``; see the module docstring) on
    ``corpus`` and save it in the transformers layout under ``out_dir``.

    Args:
        kind: which recipe.
        corpus: the training texts (iterated once).
        out_dir: directory to write (created if missing; existing files are overwritten).

    Returns:
        ``out_dir`` as a Path; ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
    """
    _check_kind(kind)
    fast = _train(kind, corpus)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


@functools.lru_cache(maxsize=1)
def _ehr_corpus() -> tuple[tuple[str, ...], str]:
    """The synthetic EHR corpus and a short digest of it (computed once per process)."""
    from medvlp.datamodules.demo.adni import ehr_corpus

    texts = tuple(ehr_corpus())
    return texts, hashlib.sha256("\n".join(texts).encode()).hexdigest()[:10]


def medblip_tokenizer_dir(kind: str) -> Path:
    """Directory of the offline tokenizer ``kind``, trained once on the synthetic EHR corpus
    (:func:`medvlp.datamodules.demo.adni.ehr_corpus`) and cached under
    ``<cache>/tokenizers/medblip-<kind>-v<TOKENIZER_VERSION>-g<GEN_VERSION>-<corpus digest>`` (the digest
    retrains it whenever the corpus changes)."""
    _check_kind(kind)
    from medvlp.datamodules import demo

    corpus, digest = _ehr_corpus()
    target = demo.cache_dir() / "tokenizers" / f"medblip-{kind}-v{TOKENIZER_VERSION}-g{demo.GEN_VERSION}-{digest}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    build_tokenizer(kind, corpus, tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
