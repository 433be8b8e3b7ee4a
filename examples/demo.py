"""A few chat prompts through tierserve's offline API, answered in one batch."""

import time

from tierserve import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a KV cache is in a transformer.",
    "Give me three tips for writing clear Python code.",
]


def main() -> None:
    started = time.perf_counter()
    llm = LLM("smollm2")
    print(f"model loaded in {time.perf_counter() - started:.1f} s")
    params = SamplingParams(temperature=0.0, max_tokens=96)
    started = time.perf_counter()
    outputs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    elapsed = time.perf_counter() - started
    for prompt, output in zip(PROMPTS, outputs):
        print(f"\n### {prompt}\n{output.outputs[0].text.strip()}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(PROMPTS)} answers, {tokens} tokens in {elapsed:.2f} s: "
          f"{tokens / elapsed:.1f} output tokens/s")


if __name__ == "__main__":
    main()
