"""The tinyworld tokenizer: word-level over the task's letters and the judge's words.

Built with the ``tokenizers`` library and wrapped as ``transformers.PreTrainedTokenizerFast``
so the loop handles it like any Hugging Face tokenizer (``apply_chat_template``, ``decode``,
``save_pretrained``). Each token is a word, a digit, a punctuation mark or a newline, with
its leading space folded in (``" b"``), so decoding is plain concatenation and gives back
the exact text (``"Score: 3"``, newlines included). Words outside the vocabulary become
``<unk>``; the model only ever sees tinyworld text.
"""

from __future__ import annotations

import re
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from loop.resources import shipped
from plugins.tinyworld import task

PAD, BOS, EOS, UNK = "<pad>", "<s>", "<|end|>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)

# One piece per word / digit / punctuation mark (with an optional leading space), newline,
# or run of spaces. Multi-digit numbers become one token per digit.
PIECE_PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]|\n| +"

# The chat format: <s><|user|>\n...<|end|><|assistant|>\n...<|end|>. A turn ends with the
# eos token, so generation stops at the end of the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('tinyworld chats use the roles system, user and assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

JUDGE_TEMPLATE = shipped("prompts", "tinyworld_judge.j2")

# Words the model may meet besides the judge template's: the task prompt, the judgment
# lines, and a few common words for system prompts.
EXTRA_TEXT = (
    f"{task.PROMPT_PREFIX} "
    + " ".join(task.CHECK_WORDS.values())
    + " ok bad Score Reference You are a helpful assistant Answer the question Sort letters list"
)


def _vocab_words() -> list[str]:
    """Every base piece (without its leading space), in a fixed order."""
    text = EXTRA_TEXT
    if JUDGE_TEMPLATE.is_file():
        text += " " + JUDGE_TEMPLATE.read_text(encoding="utf-8")
    words = set(re.findall(r"[A-Za-z]+", text))
    words |= set(string.ascii_letters) | set(string.digits) | set(string.punctuation)
    return sorted(words)


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` with bos/eos/pad/unk, role tokens and a chat template."""
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    for piece in ("\n", " "):
        vocab[piece] = len(vocab)
    for word in _vocab_words():
        for piece in (word, " " + word):
            vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces carry their own spaces: join them as they are

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
