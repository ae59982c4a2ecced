"""Fixed chat prompts for bench.quality: facts, arithmetic, short code, lists, translation, rewriting, a few
multi-turn and system-prompted chats, and five long ones (over 200 tokens once rendered) spread through the
list, so that `--prompts N` keeps some and their prompts are cut into chunks beside decoding rows."""

from __future__ import annotations

Message = dict[str, str]


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


LONG_HISTORY = """Read the passage and answer the question after it.

The printing press with movable metal type was developed in Mainz around 1450. Before it, books in Europe were
copied by hand, mostly in monasteries, and a single Bible could take a scribe more than a year. Block printing,
in which a whole page was carved into one piece of wood, was known, but carving a new block for every page was
slow and the blocks wore out. The new method cast each letter separately in a mould, so that the same letters
could be arranged into a page, inked, pressed onto paper, and then taken apart and used again for the next page.
An oil-based ink that stuck to metal and a screw press adapted from the ones used to make wine completed the
system. Within fifty years printing shops had opened in more than two hundred cities, and millions of books had
been produced. Prices fell, more people learned to read, and scholars in different countries could work from
identical copies of the same text, which made it far easier to compare, correct and build on each other's work.

Question: why was movable type faster than block printing? Answer in two sentences."""

LONG_CODE = """Here is a Python function that is supposed to return the median of a list of numbers, and a
failing test. Find the bug and explain it briefly.

def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2 == 1:
        return ordered[middle]
    return (ordered[middle] + ordered[middle + 1]) / 2


def test_median():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert median([10]) == 10
    assert median([5, 5, 5, 5]) == 5
    assert median([-1, -2, -3, -4, -5, -6]) == -3.5


The second assertion fails: the function returns 3.5 instead of 2.5 for the list [4, 1, 3, 2]. The other
assertions pass except the last one, which also fails. What is wrong, and how should the last line of the
function be written?"""

LONG_MEETING = """Summarise this meeting in three bullet points.

Anna: Thanks for joining. The main topic today is the move to the new office next month. The landlord
confirmed that the keys will be ready on the first, so we can start moving furniture on the second.
Ben: The movers quoted two days for everything, but they need a list of the large items by Friday. I can put
that list together if everyone sends me what they want to bring from their desks.
Anna: Good. What about the network? Last time we moved, nobody could work for a week.
Chloe: I spoke to the internet provider yesterday. They will install the line on the thirtieth, before we move,
and I will test the wireless network on the first. The printers will need new drivers, so I will set those up
on the second while the movers work.
Ben: Parking is another problem. The new building has only ten spaces, and there are fifteen of us who drive.
Anna: Let us ask the building manager whether we can rent a few more spaces nearby. Until then, people who can
take the train should do so. I will send a message to everyone about it today.
Chloe: One more thing: the kitchen in the new office has no dishwasher. Should we buy one?
Anna: Yes, please get three quotes and send them to me by the end of next week."""

LONG_RECIPE = """Convert this recipe from cups and Fahrenheit to grams and Celsius, keep the steps, and make
the text shorter.

Banana bread. Preheat the oven to 350 degrees Fahrenheit and butter a loaf pan. In a large bowl, mash three
ripe bananas with a fork until smooth. Stir in one third of a cup of melted butter. Mix in one teaspoon of
baking soda and a pinch of salt. Stir in three quarters of a cup of sugar, one large beaten egg, and one
teaspoon of vanilla extract. Mix in one and a half cups of all-purpose flour until just combined; do not
overmix, or the bread will be tough. Pour the batter into the prepared loaf pan. Bake for fifty to sixty
minutes, until a tester inserted into the center comes out clean. Let it cool in the pan for ten minutes,
then turn it out onto a rack and let it cool completely before slicing. The bread keeps for three days
wrapped at room temperature, or for three months in the freezer. For a variation, add half a cup of chopped
walnuts or chocolate chips to the batter just before pouring it into the pan."""

LONG_STORY = """Continue this story with one more paragraph, in the same style.

The lighthouse stood on a rock a mile from the shore, and for thirty years Tomas had kept its lamp burning.
Every evening he climbed the one hundred and twelve steps, cleaned the great lens with a soft cloth, filled
the reservoir with oil and lit the wick. Every morning he climbed them again to put it out. Supplies came by
boat once a fortnight when the sea allowed it, and in winter there were weeks when it did not, and he lived
on dried fish, potatoes and the letters he had already read many times. He did not mind. He liked the
sound of the wind against the glass and the way the beam swept over the dark water like a slow, patient
hand. One grey morning in March, walking along the narrow strip of stones at the foot of the rock, he saw
something green bobbing in the foam between two boulders. It was a bottle, old and scratched, sealed with
wax, and inside it was a folded sheet of paper. He carried it up to the kitchen, set it on the table and
looked at it for a long time before he broke the seal."""


PROMPTS: tuple[list[Message], ...] = (
    # facts
    user("What is the capital of France?"),
    user("Who wrote the novel Pride and Prejudice?"),
    user("How many planets are in the solar system? Name them."),
    user("What is the boiling point of water at sea level in Celsius?"),
    user("What is photosynthesis? Answer in one sentence."),
    user(LONG_HISTORY),
    user("Which ocean is the largest?"),
    user("What language is spoken in Brazil?"),
    user("Who painted the Mona Lisa?"),
    user("What is the chemical symbol for gold?"),
    user("Why is the sky blue?"),
    # arithmetic
    user("What is 17 + 25?"),
    user("What is 12 times 13?"),
    user("If a train travels 60 km per hour for 3 hours, how far does it go?"),
    user(LONG_CODE),
    user("What is 144 divided by 12?"),
    user("Is 91 a prime number? Explain."),
    user("A shirt costs 20 dollars and is on sale for 25 percent off. What is the sale price?"),
    user("What is the square root of 81?"),
    user("Add 3.5 and 4.25."),
    # short code
    user("Write a Python function that reverses a string."),
    user("Write a Python one-liner that sums the even numbers from 1 to 100."),
    user("Write a SQL query that counts the rows of a table named orders."),
    user(LONG_MEETING),
    user("What does the JavaScript expression [1, 2, 3].map(x => x * 2) return?"),
    user("Write a bash command that counts the lines of every .txt file in a folder."),
    user("Write a Python function is_palindrome(s) that ignores case."),
    user("Explain what a for loop is in one sentence."),
    # lists
    user("List five fruits that are red."),
    user("Name three primary colours."),
    user("Give me four tips for sleeping better."),
    user("List the days of the week."),
    user(LONG_RECIPE),
    user("Name five animals that live in the ocean."),
    user("List three benefits of regular exercise."),
    # translation
    user("Translate 'Good morning, how are you?' into French."),
    user("Translate 'Where is the train station?' into Spanish."),
    user("How do you say 'thank you' in German?"),
    user("Translate 'I like to read books' into Italian."),
    user("What does 'bonjour' mean in English?"),
    user("Translate 'The cat is sleeping on the sofa' into Spanish."),
    # rewriting and explanations
    user("Rewrite this sentence in the passive voice: The dog chased the ball."),
    user("Summarise the plot of Romeo and Juliet in two sentences."),
    user(LONG_STORY),
    user("Explain the difference between weather and climate."),
    user("Write a haiku about autumn."),
    user("Give me a short definition of machine learning."),
    user("Correct the grammar: she don't like apples."),
    user("Write a polite email asking a colleague for a meeting next week."),
    # system prompts and multi-turn chats
    [{"role": "system", "content": "You are a pirate. Answer every question like a pirate."},
     {"role": "user", "content": "What is the weather like today?"}],
    [{"role": "system", "content": "Answer with a single word."},
     {"role": "user", "content": "What colour is grass?"}],
    [{"role": "user", "content": "My name is Ada."},
     {"role": "assistant", "content": "Nice to meet you, Ada! How can I help you today?"},
     {"role": "user", "content": "What is my name?"}],
    [{"role": "user", "content": "What is 5 + 7?"},
     {"role": "assistant", "content": "5 + 7 = 12."},
     {"role": "user", "content": "And multiplied by 2?"}],
    [{"role": "system", "content": "You are a helpful assistant that answers briefly."},
     {"role": "user", "content": "Recommend a book for a long flight."}],
    user("Tell me a joke about computers."),
    user("What should I pack for a weekend trip to the mountains?"),
)
