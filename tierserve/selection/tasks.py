"""Long-context tasks made here (no dataset hub), seeded, RULER-style, at a target length in
tokens: passkey retrieval, single- and multi-key needle-in-a-haystack, variable tracking.

Haystacks are RULER's repeated filler (passkey, variable tracking) or paragraphs of the Python
documentation CPython ships (``pydoc_data``; the needles). Each sample carries its prompt text
and the expected answer; a scorer says whether a generated text contains all of it.
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


def multikey(tokenizer, target_tokens: int, seed: int) -> TaskSample:
    """RULER's multi-key needle: four city/number needles at random depths, one asked for."""
    rng = random.Random(seed)
    cities = rng.sample(["Zorvath", "Quillmere", "Brantoft", "Elsivar", "Morrowgate",
                         "Tavenholt", "Ostrelle", "Varnhollow"], 4)
    numbers = [str(rng.randrange(1000000, 10000000)) for _ in cities]
    depths = sorted(rng.random() for _ in cities)
    asked = rng.randrange(len(cities))
    paragraphs = _paragraphs()
    start = rng.randrange(len(paragraphs))
    question = (f"\nWhat is the special magic number for {cities[asked]}? The special magic "
                f"number for {cities[asked]} is")

    def build(units: int) -> str:
        body = "\n".join(paragraphs[(start + i) % len(paragraphs)][:600] for i in range(units))
        pieces, last = [], 0
        for city, number, depth in zip(cities, numbers, depths):
            cut = int(len(body) * depth)
            pieces += [body[last:cut], f"\nThe special magic number for {city} is {number}.\n"]
            last = cut
        return ("Read the text and answer the question.\n" + "".join(pieces) + body[last:]
                + question)

    return TaskSample("multikey", _fit(tokenizer, build, target_tokens), numbers[asked],
                      depths[asked])


def vartrack(tokenizer, target_tokens: int, seed: int) -> TaskSample:
    """RULER's variable tracking: a chain of four assignments (``VAR B = VAR A``) from a
    5-digit value, spread through filler; the answer is every variable in the chain."""
    rng = random.Random(seed)
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    names = ["".join(rng.choice(letters) for _ in range(5)) for _ in range(4)]
    value = str(rng.randrange(10000, 100000))
    lines = [f"VAR {names[0]} = {value}. "] + [
        f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, len(names))]
    depths = sorted(rng.random() for _ in lines)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the "
                "text above. Answer: According to the chain(s) of variable assignment in the "
                f"text above, {len(names)} variables are assigned the value {value}, they are:")

    def build(units: int) -> str:
        pieces, last = [], 0
        for line, depth in zip(lines, depths):
            cut = int(units * depth)
            pieces += [FILLER * (cut - last), line]
            last = cut
        return head + "".join(pieces) + FILLER * (units - last) + question

    return TaskSample("vartrack", _fit(tokenizer, build, target_tokens), " ".join(names),
                      depths[0])


TASKS = {"passkey": passkey, "needle": needle, "multikey": multikey, "vartrack": vartrack}


def make_samples(tokenizer, task: str, target_tokens: int, count: int, seed: int = 0
                 ) -> list[TaskSample]:
    """``count`` samples of ``task`` near ``target_tokens`` tokens, seeded."""
    return [TASKS[task](tokenizer, target_tokens, seed * 1000 + i) for i in range(count)]


def correct(sample: TaskSample, generated: str) -> bool:
    """Every word of the answer appears in the generated text (one for the retrieval tasks,
    each variable of the chain for variable tracking)."""
    return all(word in generated for word in sample.answer.split())
