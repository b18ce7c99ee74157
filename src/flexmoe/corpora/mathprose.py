"""Generated textbook-style explanations of arithmetic: the kind of maths a broad public pool holds.

The ``math`` owner holds worked problems (``Problem:`` / ``Solution:`` / ``Answer: <number>``); the
public pool instead holds worded explanations of the same ideas, each illustrated by examples woven into
the prose, as a textbook or a help page would write them. Same kind of text, different style: no
document here has a ``Problem:``, ``Solution`` or ``Answer:`` line. All numbers are computed exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction

from flexmoe.corpora._rand import Rand, until_budget
from flexmoe.corpora.math import format_number

OPENERS = (
    "In this section we look at {topic}.",
    "This lesson explains {topic}.",
    "A short guide to {topic}.",
    "Notes on {topic}, with examples.",
)
CLOSERS = (
    "With a little practice the method becomes quick and reliable.",
    "It is worth checking every result with a rough estimate first.",
    "The same idea works for larger numbers, only with more digits to keep track of.",
    "Try a few examples of your own to see the pattern.",
    "Mistakes usually come from skipping a step, so write each one down.",
)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return abs(a)


def _addition(r: Rand) -> list[str]:
    a, b = r.between(120, 9800), r.between(120, 9800)
    ones = a % 10 + b % 10
    carry = (
        f"The ones digits {a % 10} and {b % 10} make {ones}, so we write {ones % 10} and carry 1 to the tens."
        if ones >= 10
        else f"The ones digits {a % 10} and {b % 10} make {ones}, which needs no carrying."
    )
    return [
        "Adding whole numbers works one place value at a time, starting from the ones. When a column adds up "
        "to ten or more, the extra ten is carried into the next column to the left.",
        f"For instance, to add {a} and {b} we line the numbers up on the right. {carry} Continuing column "
        f"by column, the total comes to {a + b}.",
        f"A quick check: {a} is close to {round(a, -2)} and {b} is close to {round(b, -2)}, and "
        f"{round(a, -2)} + {round(b, -2)} = {round(a, -2) + round(b, -2)}, which is near {a + b}.",
    ]


def _multiplication(r: Rand) -> list[str]:
    a, b = r.between(13, 99), r.between(13, 99)
    tens, ones = b - b % 10, b % 10
    return [
        "Multiplication is repeated addition, and the distributive law lets us break a hard product into "
        "easier pieces: a number times a sum equals the sum of the separate products.",
        f"Consider {a} times {b}. Splitting {b} into {tens} and {ones}, we find {a} × {tens} = {a * tens} "
        f"and {a} × {ones} = {a * ones}. Adding the two partial products gives {a * b}.",
        f"Because multiplication is commutative, {b} × {a} is also {a * b}; the order of the factors never "
        "changes the product.",
    ]


def _division(r: Rand) -> list[str]:
    d, q, rem = r.between(3, 12), r.between(11, 90), 0
    rem = r.below(d)
    n = d * q + rem
    tail = (
        f"so {d} divides {n} exactly."
        if rem == 0
        else f"with {rem} left over, which we call the remainder. We can write {n} = {d} × {q} + {rem}."
    )
    return [
        "Division asks how many times one number fits into another. The number being divided is the "
        "dividend, the number we divide by is the divisor, and the result is the quotient.",
        f"If {n} counters are shared equally among {d} groups, each group receives {q} counters, {tail}",
        "The remainder is always smaller than the divisor; if it were not, every group could take one more.",
    ]


def _fractions(r: Rand) -> list[str]:
    b, d = r.between(2, 9), r.between(2, 9)
    a, c = r.between(1, b - 1) if b > 2 else 1, r.between(1, d - 1) if d > 2 else 1
    lcm = b * d // _gcd(b, d)
    total = Fraction(a, b) + Fraction(c, d)
    return [
        "Two fractions can be added directly only when they have the same denominator. Otherwise we first "
        "rewrite them over a common denominator, usually the least common multiple of the two.",
        f"Take {a}/{b} and {c}/{d}. The least common multiple of {b} and {d} is {lcm}, so {a}/{b} becomes "
        f"{a * lcm // b}/{lcm} and {c}/{d} becomes {c * lcm // d}/{lcm}. Their sum is "
        f"{a * lcm // b + c * lcm // d}/{lcm}, which in lowest terms is {format_number(total)}"
        + (" written as a decimal." if "." in format_number(total) else "."),
        "Multiplying fractions is simpler still: multiply the numerators together and the denominators "
        f"together, so {a}/{b} of {c}/{d} is {format_number(Fraction(a * c, b * d))}.",
    ]


def _percent(r: Rand) -> list[str]:
    p, n = r.pick((5, 10, 15, 20, 25, 30, 40, 50, 75)), r.between(2, 80) * 10
    part = Fraction(p * n, 100)
    return [
        "Per cent means per hundred, so a percentage is a fraction with denominator 100. To find a "
        "percentage of an amount, multiply the amount by the percentage and divide by 100.",
        f"For example, {p}% of {n} is {p} × {n} / 100 = {format_number(part)}. An increase of {p}% takes "
        f"{n} to {format_number(n + part)}, and a decrease of {p}% takes it to {format_number(n - part)}.",
        f"Going the other way, {format_number(part)} out of {n} is {p} per cent, since "
        f"{format_number(part)} / {n} × 100 = {p}.",
    ]


def _equations(r: Rand) -> list[str]:
    a, x, b = r.between(2, 9), r.between(-9, 15), r.between(1, 30)
    c = a * x + b
    return [
        "An equation says that two expressions are equal. To solve it we do the same thing to both sides, "
        "undoing each operation in turn until the unknown stands alone.",
        f"In the equation {a}x + {b} = {c}, the unknown x is multiplied by {a} and then {b} is added. "
        f"Taking {b} from both sides leaves {a}x = {c - b}, and dividing both sides by {a} shows that "
        f"x is {x}.",
        f"Substituting back is a good habit: {a} × {x} + {b} is indeed {c}.",
    ]


def _area(r: Rand) -> list[str]:
    w, h = r.between(3, 40), r.between(3, 40)
    return [
        "The perimeter of a shape is the distance around its edge, while its area measures the surface "
        "it covers. For a rectangle the area is the length times the width.",
        f"A rectangle {w} metres long and {h} metres wide has an area of {w * h} square metres and a "
        f"perimeter of 2 × ({w} + {h}) = {2 * (w + h)} metres.",
        "Areas are counted in square units because they measure how many unit squares fit inside.",
    ]


def _mean(r: Rand) -> list[str]:
    xs = [r.between(2, 60) for _ in range(r.between(4, 7))]
    mean = Fraction(sum(xs), len(xs))
    listed = ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"
    return [
        "The mean of a list of numbers, often simply called the average, is their sum divided by how many "
        "numbers there are. The median is the middle value once the list is sorted.",
        f"The numbers {listed} add up to {sum(xs)}. There are {len(xs)} of them, so their mean is "
        f"{sum(xs)} / {len(xs)} = {format_number(mean)}.",
        "A single very large or very small value can pull the mean a long way, which is why the median is "
        "sometimes preferred.",
    ]


def _factors(r: Rand) -> list[str]:
    a, b = r.between(2, 12) * r.between(2, 9), r.between(2, 12) * r.between(2, 9)
    g = _gcd(a, b)
    return [
        "A prime number has exactly two factors, one and itself. Every whole number greater than one can be "
        "written as a product of primes in just one way, apart from the order of the factors.",
        f"The greatest common divisor of {a} and {b} is {g}, and their least common multiple is "
        f"{a * b // g}. The product of the two, {a * b}, always equals the divisor times the multiple.",
        "Common divisors are what we cancel when we simplify a fraction.",
    ]


TOPICS: tuple[tuple[str, Callable[[Rand], list[str]]], ...] = (
    ("adding whole numbers", _addition),
    ("multiplying with the distributive law", _multiplication),
    ("division and remainders", _division),
    ("adding and multiplying fractions", _fractions),
    ("percentages", _percent),
    ("solving linear equations", _equations),
    ("area and perimeter", _area),
    ("averages", _mean),
    ("factors, primes and common divisors", _factors),
)


def document(r: Rand) -> str:
    """One explanation: a title, an opener, two or three illustrated paragraphs and a closing remark."""
    topic, body = r.pick(TOPICS)
    paragraphs = body(r)
    if r.chance(0.5):  # a second worked illustration of the same idea, as textbooks often give
        extra = body(r)[1]
        paragraphs.insert(2, "Another example: " + extra[0].lower() + extra[1:])
    opener = r.pick(OPENERS).format(topic=topic)
    return f"{topic[:1].upper()}{topic[1:]}\n\n{opener} " + "\n\n".join(paragraphs) + f" {r.pick(CLOSERS)}\n"


def generate(seed: int, budget: int) -> Iterator[str]:
    """Distinct explanations until about ``budget`` bytes of UTF-8 text."""

    def docs() -> Iterator[str]:
        r = Rand(seed)
        while True:
            yield document(r)

    return until_budget(docs(), budget)
