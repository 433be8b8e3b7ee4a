"""Long-context tasks made here (no dataset hub), seeded: passkey retrieval and single-key
needle-in-a-haystack, RULER-style, at a target length in tokens.

Haystacks are RULER's repeated filler (passkey) or paragraphs of the Python documentation
CPython ships (``pydoc_data``; needle). Each sample carries its prompt text and the expected
answer; a scorer says whether a generated text contains it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")


@dataclass(slots=True)
class TaskSample:
    """One prompt and the answer a correct model generates."""

    task: str
    prompt: str
    answer: str
    depth: float  # where the needle sits, 0 (start) to 1 (end)


def _fit(tokenizer, build, target_tokens: int) -> str:
    """The longest ``build(n)`` (n haystack units) whose tokens fit ``target_tokens``."""
    low, high = 1, 4
    while len(tokenizer.encode(build(high))) < target_tokens:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if len(tokenizer.encode(build(mid))) <= target_tokens:
            low = mid
        else:
            high = mid
    return build(low)


def passkey(tokenizer, target_tokens: int, seed: int) -> TaskSample:
    """RULER's passkey: a 5-digit key hidden at a random depth in repeated filler."""
    rng = random.Random(seed)
    key = str(rng.randrange(10000, 100000))
    depth = rng.random()
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important information there.\n")
    question = "\nWhat is the pass key? The pass key is"

    def build(units: int) -> str:
        before = int(units * depth)
        return head + FILLER * before + needle + FILLER * (units - before) + question

    return TaskSample("passkey", _fit(tokenizer, build, target_tokens), key, depth)


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return [text.strip() for _, text in sorted(topics.items()) if text.strip()]


def needle(tokenizer, target_tokens: int, seed: int) -> TaskSample:
    """A single key-value needle (a made-up city and a 7-digit number) in documentation text."""
    rng = random.Random(seed)
    cities = ["Zorvath", "Quillmere", "Brantoft", "Elsivar", "Morrowgate", "Tavenholt"]
    city, number = rng.choice(cities), str(rng.randrange(1000000, 10000000))
    depth = rng.random()
    paragraphs = _paragraphs()
    start = rng.randrange(len(paragraphs))
    sentence = f"\nThe special magic number for {city} is {number}.\n"
    question = f"\nWhat is the special magic number for {city}? The special magic number for " \
               f"{city} is"

    def build(units: int) -> str:
        body = "\n".join(paragraphs[(start + i) % len(paragraphs)][:600] for i in range(units))
        cut = int(len(body) * depth)
        return "Read the text and answer the question.\n" + body[:cut] + sentence + \
            body[cut:] + question

    return TaskSample("needle", _fit(tokenizer, build, target_tokens), number, depth)


TASKS = {"passkey": passkey, "needle": needle}


def make_samples(tokenizer, task: str, target_tokens: int, count: int, seed: int = 0
                 ) -> list[TaskSample]:
    """``count`` samples of ``task`` near ``target_tokens`` tokens, seeded."""
    return [TASKS[task](tokenizer, target_tokens, seed * 1000 + i) for i in range(count)]


def correct(sample: TaskSample, generated: str) -> bool:
    return sample.answer in generated
