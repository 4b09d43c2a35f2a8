"""The tinyworld task: sort a short list of distinct letters.

A prompt reads ``Sort the letters: d b a c`` and the right answer is ``a b c d``. The task
is tiny on purpose: a few-million-parameter model learns it in a minute on a CPU, answers
can be checked exactly (``verify``), and a graded rubric (``rubric``) gives partial credit,
which is what the seed judge is trained to reproduce (the EFT data of Self-Rewarding
Language Models, Yuan et al. 2024, section 2.2, in miniature).

Splits are disjoint by construction: every letter list falls in one bucket of a hash, and
held-out prompts come from bucket 0 only, training prompts from the others. The verifier
and the rubric are for the evaluator and for building seed data; the loop never sees them.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

LETTERS = "abcdefghijkl"  # the task's alphabet
MIN_LEN, MAX_LEN = 3, 6  # list lengths
PROMPT_PREFIX = "Sort the letters:"
HELDOUT_BUCKETS = 5  # one bucket in five is held out (about 20% of all lists)

_PROMPT_RE = re.compile(r"^\s*Sort the letters:((?: [a-z])+)\s*$")


@dataclass(frozen=True)
class Info:
    """What the verifier needs to know about a prompt (also stored as prompt meta)."""

    letters: tuple[str, ...]

    @property
    def answer(self) -> str:
        return " ".join(sorted(self.letters))


def split_of(letters: tuple[str, ...]) -> str:
    """``"heldout"`` or ``"train"``: a fixed function of the list, so splits never overlap."""
    digest = hashlib.sha256(" ".join(letters).encode()).digest()
    return "heldout" if digest[0] % HELDOUT_BUCKETS == 0 else "train"


def format_prompt(letters: tuple[str, ...]) -> str:
    return f"{PROMPT_PREFIX} {' '.join(letters)}"


def parse_prompt(prompt_text: str) -> Info | None:
    """The letters of a tinyworld prompt, or None if the text is not one."""
    m = _PROMPT_RE.match(prompt_text)
    if m is None:
        return None
    return Info(tuple(m.group(1).split()))


def make_prompt(rng: random.Random, split: str = "train") -> tuple[str, Info]:
    """Draw one prompt of ``split`` ("train" or "heldout") with ``rng``: (text, info)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    while True:  # rejection sampling: about 1 draw in 5 is held out
        n = rng.randint(MIN_LEN, MAX_LEN)
        letters = tuple(rng.sample(LETTERS, n))
        if split_of(letters) == split:
            return format_prompt(letters), Info(letters)


def heldout_set(n: int, seed: int = 1234) -> list[tuple[str, Info]]:
    """A fixed list of ``n`` distinct held-out prompts (the same for every round)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    while len(out) < n:
        text, info = make_prompt(rng, "heldout")
        if text not in seen:
            seen.add(text)
            out.append((text, info))
    return out


def _answer_tokens(answer_text: str) -> list[str]:
    return answer_text.strip().split()


def verify(prompt_text: str, answer_text: str) -> bool:
    """True iff ``answer_text`` is exactly the prompt's letters in alphabetical order.

    Whitespace around the answer is ignored; anything else (extra words, punctuation,
    a missing or repeated letter) makes the answer wrong. An unknown prompt is False.
    """
    info = parse_prompt(prompt_text)
    if info is None:
        return False
    return _answer_tokens(answer_text) == sorted(info.letters)


# The rubric: additive points, like the Self-Rewarding judge prompt (Yuan et al. 2024,
# figure 2), each awarded for one property of the answer. 5 points iff verify() is True.
CHECKS = ("form", "length", "letters", "order", "exact")
CHECK_WORDS = {  # how a judgment names each check (the seed judge learns to write these)
    "form": "Form",
    "length": "Length",
    "letters": "Letters",
    "order": "Order",
    "exact": "Exact",
}


def rubric(prompt_text: str, answer_text: str) -> dict[str, bool]:
    """Which rubric checks an answer passes. Used only to build the seed judge's data.

    - form: a non-empty list of single lowercase letters separated by spaces;
    - length: as many letters as the prompt;
    - letters: the same letters as the prompt (as a multiset);
    - order: alphabetical order (each letter after the one before), given form;
    - exact: the right answer (form, letters and order together).
    """
    info = parse_prompt(prompt_text)
    toks = _answer_tokens(answer_text)
    form = bool(toks) and all(len(t) == 1 and t in LETTERS for t in toks)
    if info is None:
        return {c: False for c in CHECKS}
    length = form and len(toks) == len(info.letters)
    letters = form and sorted(toks) == sorted(info.letters)
    order = form and all(a < b for a, b in zip(toks, toks[1:]))
    exact = toks == sorted(info.letters)
    return {"form": form, "length": length, "letters": letters, "order": order, "exact": exact}


def rubric_score(prompt_text: str, answer_text: str) -> int:
    """The graded score 0..5: one point per passed check."""
    return sum(rubric(prompt_text, answer_text).values())


def judgment_text(prompt_text: str, answer_text: str) -> str:
    """The judgment the seed judge is trained to write: one line of checks, then the score.

    Example: ``Form ok. Length ok. Letters ok. Order bad. Exact bad.\nScore: 3``
    """
    checks = rubric(prompt_text, answer_text)
    words = " ".join(f"{CHECK_WORDS[c]} {'ok' if checks[c] else 'bad'}." for c in CHECKS)
    return f"{words}\nScore: {sum(checks.values())}"


# -- answers, good and bad ---------------------------------------------------------------


HABIT_PREFIX = "Answer:"


def habit_answer(info: Info) -> str:
    """The seed model's bad habit: a chatty ``Answer:`` before the (sorted) letters.

    Seed instruction data shows this answer for most prompts, so the seed model's greedy
    answer is usually wrong (the task asks for the letters only), while the right answer
    keeps a large sampling probability: the room self-rewarding training has to find and
    fix. The habit breaks the rubric's form check, so a judge can see it without solving
    the task, and judging stays reliable while the policy changes.
    """
    return f"{HABIT_PREFIX} {info.answer}"


CORRUPTIONS = ("replace",) * 4 + ("dup",) * 3 + ("drop", "extra") * 2 + (
    "swap", "copy", "reverse", "word")


def corrupt_answer(rng: random.Random, info: Info) -> str:
    """A random wrong (or at least imperfect) answer, for the judge's training data."""
    s = sorted(info.letters)
    # Mostly near misses that stay in order (a letter replaced, repeated, dropped or added):
    # the errors a sampling policy makes most, and the hardest for the judge to spot.
    kind = rng.choice(CORRUPTIONS)
    if kind == "drop":
        del s[rng.randrange(len(s))]
    elif kind == "dup":
        i = rng.randrange(len(s))
        s.insert(i, s[i])
    elif kind == "replace":
        others = [c for c in LETTERS if c not in s]
        s[rng.randrange(len(s))] = rng.choice(others)
        s.sort()
    elif kind == "swap":
        i = rng.randrange(len(s) - 1)
        s[i], s[i + 1] = s[i + 1], s[i]
    elif kind == "copy":
        s = list(info.letters)
    elif kind == "reverse":
        s = s[::-1]
    elif kind == "extra":
        others = [c for c in LETTERS if c not in s]
        s.insert(rng.randrange(len(s) + 1), rng.choice(others))
    else:  # a stray word: breaks the form
        s.insert(rng.randrange(len(s) + 1), rng.choice(("Sort", "letters", "ok", "the")))
    return " ".join(s)
