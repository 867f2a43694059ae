"""Wording of the arithmetic word problems: themes, sentence templates, names, instructions.

Where it sits: :mod:`rlhfspec_workers.data.arithmetic` draws a problem's numbers first, then
renders them with one theme of this module (a start sentence, one sentence per operation, a
question and an instruction). Pure data plus small helpers, no randomness of its own.

Placeholders: ``{name}`` and ``{friend}`` (two different people), ``{n}`` / ``{k}`` (bare
numbers: the start value and the step's operand), ``{N}`` / ``{K}`` (the same numbers as
counted phrases of the theme, e.g. "12 marbles" or "$12"), ``{items}`` (the theme's noun),
``{frac}`` (1/k in words, division only), plus the theme's extra slots (``{box}``,
``{vehicle}``...). Every number in a prompt is at least 2, so nouns are always plural.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Theme:
    """One story world: its noun choices and templates for each part of a problem."""

    name: str
    nouns: tuple[str, ...]
    """Plural nouns counted by the story (``{items}``); ``"$"`` means money, counted as $n;
    ``""`` bare numbers."""
    start: tuple[str, ...]
    gain: tuple[str, ...]
    loss: tuple[str, ...]
    times: tuple[str, ...]
    split: tuple[str, ...]
    question: tuple[str, ...]
    grouped_start: tuple[str, ...] = ()
    """A first multiplication told with the start: ``{n}`` groups of ``{K}``."""
    slots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Extra placeholders of this theme and their choices."""

    def count(self, noun: str, value: int) -> str:
        if noun == "$":
            return f"${value}"
        return f"{value} {noun}" if noun else str(value)

    def kinds(self) -> dict[str, tuple[str, ...]]:
        """Templates by kind: start, +, -, *, /, question, grouped."""
        return {
            "start": self.start, "+": self.gain, "-": self.loss, "*": self.times,
            "/": self.split, "question": self.question, "grouped": self.grouped_start,
        }  # fmt: skip


FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 6: "a sixth"}

NAMES = (
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gabriel", "Hana", "Ivan", "Jada",
    "Kenji", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara",
    "Uma", "Victor", "Wei", "Ximena", "Yusuf", "Zoe", "Liam", "Maya", "Noah", "Olivia",
    "Pablo", "Ruth", "Sofia", "Theo", "Amara", "Bruno", "Carmen", "Dev", "Elif", "Felix",
)  # fmt: skip

INSTRUCTIONS = (
    'Write the final answer after "####".',
    'End your reply with "####" and the answer.',
    'Give the final answer after "####".',
    'Put the final number after "####" at the end.',
)

NUMBERS = Theme(
    name="numbers",
    nouns=("",),
    start=(
        "Think of the number {n}.",
        "Start with {n}.",
        "{name} writes down the number {n}.",
        "Begin with the number {n}.",
    ),
    gain=("Add {k}.", "Add {k} to it.", "Increase it by {k}.", "{name} adds {k}."),
    loss=("Subtract {k}.", "Take away {k}.", "Decrease it by {k}.", "{name} subtracts {k}."),
    times=("Multiply by {k}.", "Multiply it by {k}.", "{name} multiplies it by {k}."),
    split=("Divide by {k}.", "Divide it by {k}.", "{name} divides it by {k}."),
    question=(
        "What number do you get?",
        "What is the result?",
        "What number is it now?",
        "What number does {name} end with?",
    ),
    grouped_start=("Start with {n} times {k}.", "{name} multiplies {n} by {k}."),
)

COLLECTION = Theme(
    name="collection",
    nouns=(
        "marbles",
        "stickers",
        "stamps",
        "seashells",
        "trading cards",
        "beads",
        "buttons",
        "postcards",
        "pebbles",
        "keychains",
        "comic books",
        "coins",
    ),
    start=(
        "{name} has {N}.",
        "{name} owns {N}.",
        "At the start of the week, {name} has {N}.",
        "{name} keeps {N} in a {box}.",
        "{name}'s collection has {N}.",
    ),
    gain=(
        "{name} finds another {K}.",
        "{friend} gives {name} {K}.",
        "{name} buys {K} at a market.",
        "{name} wins {K} in a game.",
        "{name} gets {K} from {friend}.",
    ),
    loss=(
        "{name} gives {K} to {friend}.",
        "{name} loses {K}.",
        "{name} trades away {K}.",
        "{name} sells {K} to {friend}.",
        "{friend} takes {K} from {name}.",
    ),
    times=(
        "{name} ends up with {k} times as many {items} as before.",
        "After a lucky trade, {name} has {k} times as many {items}.",
        "{name}'s collection grows to {k} times its size.",
    ),
    split=(
        "{name} splits the {items} into {k} equal piles and keeps one pile.",
        "{name} keeps only {frac} of the {items} and gives the rest away.",
        "{name} divides the {items} equally among {k} boxes and keeps one box.",
    ),
    question=(
        "How many {items} does {name} have now?",
        "How many {items} does {name} have at the end?",
        "How many {items} are left with {name}?",
    ),
    grouped_start=(
        "{name} has {n} {boxes}, each holding {K}.",
        "{name} buys {n} packs of {items}, and every pack has {k}.",
    ),
    slots={
        "box": ("box", "jar", "shoebox", "tin", "drawer"),
        "boxes": ("bags", "boxes", "jars", "tins"),
    },
)

MONEY = Theme(
    name="money",
    nouns=("$",),
    start=(
        "{name} has {N}.",
        "{name} has {N} saved up.",
        "{name}'s wallet holds {N}.",
        "{name} starts with {N} in a piggy bank.",
    ),
    gain=(
        "{name} earns {K} {chore}.",
        "{friend} pays {name} back {K}.",
        "{name} gets {K} as a birthday present.",
        "{name} finds {K} on the street.",
    ),
    loss=(
        "{name} spends {K} on {purchase}.",
        "{name} pays {K} for {purchase}.",
        "{name} lends {K} to {friend}.",
        "{name} donates {K} to a food bank.",
    ),
    times=(
        "{name}'s savings become {k} times as large after a good month.",
        "A relative adds enough that {name} has {k} times as much money.",
    ),
    split=(
        "{name} shares the money equally among {k} people, {name} included, and keeps one share.",
        "{name} keeps {frac} of the money and puts the rest in the bank.",
    ),
    question=(
        "How many dollars does {name} have now?",
        "How much money, in dollars, does {name} have left?",
        "How much money does {name} have at the end?",
    ),
    grouped_start=("{name} works {n} days and earns {K} each day.",),
    slots={
        "chore": (
            "for mowing a lawn",
            "for washing dishes",
            "by selling lemonade",
            "for walking a dog",
            "for tutoring",
        ),
        "purchase": ("a book", "lunch", "a new game", "art supplies", "a gift"),
    },
)

SCORE = Theme(
    name="score",
    nouns=("points",),
    start=(
        "{name} has {N} in {game}.",
        "In {game}, {name}'s score is {n}.",
        "{name} starts the last round of {game} with {N}.",
    ),
    gain=(
        "{name} scores {K} more.",
        "{name} earns {K} for a correct answer.",
        "A bonus adds {K} to {name}'s score.",
    ),
    loss=(
        "{name} loses {K}.",
        "A penalty takes away {K}.",
        "{name} drops {K} on a wrong move.",
    ),
    times=(
        "A multiplier card multiplies {name}'s score by {k}.",
        "A combo makes {name}'s score {k} times as high.",
    ),
    split=(
        "A penalty divides {name}'s score by {k}.",
        "A trap cuts {name}'s score to {frac} of what it was.",
    ),
    question=(
        "What is {name}'s score now?",
        "How many points does {name} have at the end?",
        "What is {name}'s final score?",
    ),
    grouped_start=("{name} wins {n} rounds of {game}, each worth {K}.",),
    slots={"game": ("a board game", "a video game", "a quiz", "a card game", "a spelling bee")},
)

PASSENGERS = Theme(
    name="passengers",
    nouns=("passengers", "people"),
    start=(
        "A {vehicle} leaves the station with {N} on board.",
        "There are {N} on a {vehicle}.",
        "{name} drives a {vehicle} that carries {N} at first.",
    ),
    gain=(
        "At the next stop, {K} get on.",
        "Another {K} board the {vehicle}.",
        "At the {place}, {K} more get on.",
    ),
    loss=(
        "At the next stop, {K} get off.",
        "{K} leave the {vehicle} at the {place}.",
        "At the {place}, {k} of the {items} get off.",
    ),
    times=(
        "At the main station, the number of {items} becomes {k} times as large.",
        "After a big event ends, the {vehicle} holds {k} times as many {items} as before.",
    ),
    split=(
        "At the main station, only {frac} of the {items} stay on.",
        "The {items} split into {k} equal groups and only one group stays on the {vehicle}.",
    ),
    question=(
        "How many {items} are on the {vehicle} now?",
        "How many {items} are on the {vehicle} at the end?",
    ),
    grouped_start=("{n} families get on an empty {vehicle}, with {K} in each family.",),
    slots={
        "vehicle": ("bus", "train", "ferry", "tram"),
        "place": ("market", "school", "museum", "airport", "park"),
    },
)

BAKERY = Theme(
    name="bakery",
    nouns=("loaves", "muffins", "cupcakes", "cookies", "rolls", "pies", "bagels"),
    start=(
        "A bakery has {N} on its shelves in the morning.",
        "{name} bakes {N}.",
        "{name}'s stall starts the day with {N}.",
    ),
    gain=(
        "{name} bakes another {K}.",
        "A delivery brings {K} more.",
        "{name} takes {K} more out of the oven.",
    ),
    loss=(
        "Customers buy {K}.",
        "{name} sells {K} before noon.",
        "{K} get burnt and are thrown away.",
        "{name} gives {K} to a neighbor.",
    ),
    times=(
        "A big order comes in, so {name} bakes until there are {k} times as many {items}.",
        "By the afternoon the number of {items} is {k} times as large.",
    ),
    split=(
        "{name} packs the {items} equally into {k} boxes and sells all but one box.",
        "{name} keeps {frac} of the {items} and donates the rest.",
    ),
    question=(
        "How many {items} are left?",
        "How many {items} does {name} have now?",
        "How many {items} are on the shelves at the end?",
    ),
    grouped_start=("{name} bakes {n} trays of {items} with {k} on each tray.",),
)

GARDEN = Theme(
    name="garden",
    nouns=("tomatoes", "carrots", "apples", "pears", "eggs", "strawberries", "plums"),
    start=(
        "{name} picks {N} from the garden.",
        "There are {N} in {name}'s basket.",
        "{name} collects {N} on the farm.",
    ),
    gain=(
        "{name} picks {K} more.",
        "A neighbor brings {K}.",
        "{friend} adds {K} to the basket.",
    ),
    loss=(
        "{name} uses {K} in a soup.",
        "{name} gives {K} to {friend}.",
        "Birds take {K}.",
        "{K} turn out to be bad and are thrown away.",
    ),
    times=(
        "The next harvest leaves {name} with {k} times as many {items}.",
        "{friend} brings so many that {name} now has {k} times as many {items}.",
    ),
    split=(
        "{name} splits the {items} equally into {k} baskets and keeps one basket.",
        "{name} keeps {frac} of the {items} and sells the rest.",
    ),
    question=(
        "How many {items} does {name} have now?",
        "How many {items} are in the basket at the end?",
    ),
    grouped_start=("{name} fills {n} baskets with {K} each.",),
)

WATER = Theme(
    name="water",
    nouns=("liters",),
    start=(
        "A tank holds {N} of water.",
        "{name} fills a barrel with {N} of water.",
        "A pool has {N} of water in it.",
    ),
    gain=(
        "{name} pours in {K} more.",
        "Rain adds {K}.",
        "A hose adds another {K}.",
    ),
    loss=(
        "{K} leak out.",
        "{name} uses {K} to water the plants.",
        "{K} evaporate in the sun.",
    ),
    times=(
        "After a storm, there is {k} times as much water.",
        "{name} refills it until it holds {k} times as much water.",
    ),
    split=(
        "The water is shared equally among {k} barrels and only one barrel is kept.",
        "{name} drains all but {frac} of the water.",
    ),
    question=(
        "How many liters of water are there now?",
        "How many liters are left at the end?",
    ),
    grouped_start=("{name} pours {n} buckets of water into an empty tank, {K} per bucket.",),
)

THEMES: tuple[Theme, ...] = (NUMBERS, COLLECTION, MONEY, SCORE, PASSENGERS, BAKERY, GARDEN, WATER)

CONNECTIVES = ("", "Then ", "After that, ", "Later, ", "Next, ")


def connect(connective: str, template: str) -> str:
    """``Then`` + a step's template: a template opening with a word (not a placeholder such as
    ``{name}``) has that word lower-cased; one opening with its own time or place phrase
    ("At the next stop") takes no connective."""
    if not connective or template.split(" ", 1)[0] in ("At", "After", "By", "In"):
        return template
    if not template.startswith("{"):
        template = template[0].lower() + template[1:]
    return connective + template


def template_count() -> int:
    """Distinct sentence templates over all themes (starts, steps, questions)."""
    return sum(len(t) for theme in THEMES for t in theme.kinds().values())
