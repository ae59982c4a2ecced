"""Prompts whose answers quote their input (edit this code, copy this text with a change), where prompt-lookup
drafting should pay: the speculative benchmark's workload beside bench.prompts' open-ended ones."""

from __future__ import annotations

CODE = '''def moving_average(values, window):
    """The mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = sum(values[:window])
    averages.append(total / window)
    for index in range(window, len(values)):
        total += values[index] - values[index - window]
        averages.append(total / window)
    return averages


def normalise(values):
    """Scale values to the range 0..1."""
    low, high = min(values), max(values)
    if high == low:
        return [0.0 for _ in values]
    return [(value - low) / (high - low) for value in values]
'''

CLASS = '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        if self.items.get(name, 0) < count:
            raise KeyError(f"not enough {name}")
        self.items[name] -= count
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())
'''

TEXT = ("The lighthouse stood on the northern cliff for two hundred years. Every night its keeper climbed the "
        "ninety steps, trimmed the wick and wound the clockwork that turned the lens. Ships passing the reef "
        "counted the flashes, three short and one long, and knew where they were. When the keeper grew old, his "
        "daughter took over the climb, and the light never missed a night, not even in the great storm of 1887.")

RECIPE = ("To make the bread, mix five hundred grams of flour with ten grams of salt and seven grams of yeast. "
          "Add three hundred and fifty millilitres of warm water and knead for ten minutes until the dough is "
          "smooth. Leave it covered for one hour, shape it into a loaf, leave it another forty minutes, then bake "
          "it at two hundred and twenty degrees for thirty five minutes.")

PROMPTS: tuple[str, ...] = (
    f"Rename the function `moving_average` to `rolling_mean` in this code and print the whole code:\n\n{CODE}",
    f"Add a type hint to every parameter of this code and print the whole code:\n\n{CODE}",
    f"Rename the class `Inventory` to `Stock` in this code and print the whole code:\n\n{CLASS}",
    f"Add a docstring to every method of this class and print the whole class:\n\n{CLASS}",
    f"Copy this paragraph exactly, then say in one sentence what it is about:\n\n{TEXT}",
    f"Rewrite this paragraph in the present tense:\n\n{TEXT}",
    f"Copy this recipe as a numbered list of steps, keeping every quantity:\n\n{RECIPE}",
    f"Repeat this recipe word for word, replacing grams with g:\n\n{RECIPE}",
)


def quoting_prompt(index: int) -> str:
    return PROMPTS[index % len(PROMPTS)]
