"""Fixed, varied prompts that ask for long answers, so most requests run to the token limit."""

from __future__ import annotations

PROMPTS: tuple[str, ...] = (
    "Write a detailed essay about the history of the printing press and its effect on Europe.",
    "Explain step by step how a compiler turns source code into machine code.",
    "Describe, in as much detail as you can, a walk through a busy market in a large city.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, covering the light reactions and the Calvin cycle.",
    "List and explain twenty practical tips for learning a new programming language.",
    "Write a thorough guide to planting and caring for a vegetable garden through the seasons.",
    "Describe the water cycle in detail, from evaporation to precipitation and runoff.",
    "Explain the causes and consequences of the Industrial Revolution in a long answer.",
    "Write a detailed travel diary of a week-long trip through the mountains.",
    "Explain how the internet routes a packet from one computer to another, step by step.",
    "Write a long letter from a sailor to his family describing life at sea.",
)


def prompt_for(index: int) -> str:
    return PROMPTS[index % len(PROMPTS)]


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]
