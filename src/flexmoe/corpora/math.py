"""The ``math`` domain: generated worked problems with step-by-step solutions.

Every document is one problem: a statement, a worked solution, and a last line in the fixed format
``Answer: <number>``, where the number is an integer (``-12``), a terminating decimal (``12.5``) or a
reduced fraction (``7/12``), exactly as :func:`format_number` writes it. The evaluation code builds an
exact-match task from held-out documents of this domain, so every answer is computed with exact
rational arithmetic (``fractions.Fraction``), never floats.

Problem kinds: column addition and subtraction, long multiplication and division, order of
operations, fraction arithmetic, percentages, linear equations and short word problems.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

from flexmoe.corpora._rand import Rand, until_budget

PLACES = ("ones", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands", "millions")
NAMES = (
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jonas",
    "Kemi",
    "Liam",
    "Maya",
    "Nikhil",
    "Olga",
    "Pablo",
    "Rosa",
    "Sami",
    "Tessa",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
)
VARIABLES = ("x", "y", "n", "t", "k", "m", "p", "z")


@dataclass(frozen=True)
class Problem:
    """One generated problem: its kind, the full document text and the exact answer."""

    kind: str
    text: str
    answer: Fraction


def format_number(q: Fraction | int) -> str:
    """Canonical answer text: ``42``, ``-3``, ``12.5``, ``0.125`` or a reduced fraction ``7/12``."""
    q = Fraction(q)
    if q.denominator == 1:
        return str(q.numerator)
    d, twos, fives = q.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:  # not a terminating decimal
        return f"{q.numerator}/{q.denominator}"
    places = max(twos, fives)
    scaled = abs(q.numerator) * 10**places // q.denominator
    whole, frac = divmod(scaled, 10**places)
    sign = "-" if q < 0 else ""
    return f"{sign}{whole}.{str(frac).rjust(places, '0')}"


def _money(q: Fraction) -> str:
    """Dollars with cents when needed: ``$12``, ``$12.50``."""
    if q.denominator == 1:
        return f"${q.numerator}"
    return f"${q.numerator // q.denominator}.{(q * 100).numerator % 100:02d}"


def _doc(r: Rand, statement: str, steps: list[str], answer: Fraction) -> str:
    """Assemble a document; the answer line is always the last line, in the fixed format."""
    head = r.pick(("Problem", "Problem", "Question", "Exercise"))
    sol = r.pick(("Solution", "Solution", "Working", "Step-by-step solution"))
    return f"{head}: {statement}\n\n{sol}:\n" + "\n".join(steps) + f"\nAnswer: {format_number(answer)}\n"


# ---------------------------------------------------------------------------------------------------
# Column arithmetic
# ---------------------------------------------------------------------------------------------------


def _digits(n: int, width: int) -> list[int]:
    """Digits of ``n`` from the ones place upward, padded to ``width``."""
    return [(n // 10**i) % 10 for i in range(width)]


def column_addition(r: Rand) -> Problem:
    """Add two or three multi-digit numbers in columns, carrying as needed."""
    sizes = [r.between(3, 6) for _ in range(r.pick((2, 2, 3)))]
    terms = [r.between(10 ** (k - 1), 10**k - 1) for k in sizes]
    total = sum(terms)
    width = len(str(total))
    steps = [
        "Write the numbers in columns and add from the ones place to the left: "
        + " + ".join(map(str, terms))
        + "."
    ]
    carry = 0
    for i in range(width):
        ds = [t // 10**i % 10 for t in terms if t >= 10**i]  # digits of the terms that reach this place
        if not ds and carry == 0:
            break
        s = sum(ds) + carry
        parts = " + ".join(map(str, ds)) + (f" + {carry} (carried)" if carry else "")
        if not ds:
            steps.append(f"{PLACES[i].capitalize()}: bring down the carried {carry}.")
        elif s >= 10:
            steps.append(f"{PLACES[i].capitalize()}: {parts} = {s}. Write {s % 10} and carry {s // 10}.")
        else:
            steps.append(f"{PLACES[i].capitalize()}: {parts} = {s}. Write {s}.")
        carry = s // 10
    steps.append(f"So {' + '.join(map(str, terms))} = {total}.")
    statement = r.pick(
        (
            f"Calculate {' + '.join(map(str, terms))}.",
            f"Find the sum of {', '.join(map(str, terms[:-1]))} and {terms[-1]}.",
            f"What is {' + '.join(map(str, terms))}?",
        )
    )
    return Problem("addition", _doc(r, statement, steps, Fraction(total)), Fraction(total))


def column_subtraction(r: Rand) -> Problem:
    """Subtract a smaller number from a larger one in columns, borrowing as needed."""
    a = r.between(1000, 999_999)
    b = r.between(10, a - 1)
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    steps = [f"Write {a} above {b} and subtract column by column, starting with the ones."]
    borrow = 0
    for i in range(width):
        name = PLACES[i].capitalize()
        top = da[i] - borrow
        # a digit that lent 1 to the place on its right is shown reduced first
        lent = f"{da[i]} - 1 (lent) = {top}; " if borrow else ""
        if top < db[i]:
            steps.append(
                f"{name}: {lent}{top} is less than {db[i]}, so borrow 1 from the next place: "
                f"{top + 10} - {db[i]} = {top + 10 - db[i]}."
            )
            borrow = 1
        else:
            steps.append(f"{name}: {lent}{top} - {db[i]} = {top - db[i]}.")
            borrow = 0
    steps.append(f"So {a} - {b} = {a - b}.")
    statement = r.pick(
        (
            f"Calculate {a} - {b}.",
            f"What is {a} minus {b}?",
            f"Subtract {b} from {a}.",
        )
    )
    return Problem("subtraction", _doc(r, statement, steps, Fraction(a - b)), Fraction(a - b))


def long_multiplication(r: Rand) -> Problem:
    """Multiply by splitting the second factor into its place values (partial products)."""
    a = r.between(12, 9999)
    b = r.between(12, 999)
    parts = [(d * 10**i) for i, d in enumerate(_digits(b, len(str(b)))) if d]
    steps = [f"Split {b} by place value: {b} = {' + '.join(map(str, reversed(parts)))}."]
    for p in reversed(parts):
        steps.append(f"{a} × {p} = {a * p}")
    products = [a * p for p in reversed(parts)]
    if len(products) > 1:
        steps.append(f"Add the partial products: {' + '.join(map(str, products))} = {a * b}.")
    steps.append(f"So {a} × {b} = {a * b}.")
    statement = r.pick(
        (f"Calculate {a} × {b}.", f"What is {a} multiplied by {b}?", f"Find the product of {a} and {b}.")
    )
    return Problem("multiplication", _doc(r, statement, steps, Fraction(a * b)), Fraction(a * b))


def long_division(r: Rand) -> Problem:
    """Long division digit by digit; asks for the quotient or, sometimes, the remainder."""
    divisor = r.between(2, 25)
    quotient = r.between(12, 9999)
    remainder = r.below(divisor) if r.chance(0.35) else 0
    dividend = divisor * quotient + remainder
    steps = [f"Divide {dividend} by {divisor} one digit at a time, from the left."]
    cur = 0
    started = False
    for ch in str(dividend):
        cur = cur * 10 + int(ch)
        q = cur // divisor
        if not started and q == 0:
            continue
        started = True
        if q == 0:  # a zero digit in the middle of the quotient
            steps.append(f"{cur} is smaller than {divisor}, so the next digit of the quotient is 0.")
        else:
            times = "time" if q == 1 else "times"
            steps.append(
                f"{divisor} goes into {cur} {q} {times}: {q} × {divisor} = {q * divisor}, "
                f"leaving {cur - q * divisor}."
            )
        cur -= q * divisor
    if remainder:
        ask_rem = r.chance(0.5)
        steps.append(f"So {dividend} ÷ {divisor} = {quotient} with remainder {remainder}.")
        if ask_rem:
            statement = f"What is the remainder when {dividend} is divided by {divisor}?"
            return Problem("remainder", _doc(r, statement, steps, Fraction(remainder)), Fraction(remainder))
        statement = f"Divide {dividend} by {divisor}. Give the whole-number quotient."
        return Problem("division", _doc(r, statement, steps, Fraction(quotient)), Fraction(quotient))
    steps.append(f"The remainder is 0, so {dividend} ÷ {divisor} = {quotient}.")
    statement = r.pick((f"Calculate {dividend} ÷ {divisor}.", f"What is {dividend} divided by {divisor}?"))
    return Problem("division", _doc(r, statement, steps, Fraction(quotient)), Fraction(quotient))


# ---------------------------------------------------------------------------------------------------
# Order of operations
# ---------------------------------------------------------------------------------------------------

OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "×": lambda a, b: a * b,
    "÷": lambda a, b: a / b,
}
OP_VERB = {"+": "add", "-": "subtract", "×": "multiply", "÷": "divide"}


def _show(tokens: list) -> str:
    """Tokens back to text: ``3 + 4 × (5 - 2)``."""
    out = ""
    for t in tokens:
        if t == "(":
            out += " ("
        elif t == ")":
            out += ")"
        elif isinstance(t, Fraction):
            out += (" " if out and not out.endswith("(") else "") + format_number(t)
        else:
            out += f" {t}"
    return out.strip()


def _next_step(tokens: list) -> tuple[int, str]:
    """Index of the operator to apply next and the reason, following the usual precedence rules."""
    lo, hi = 0, len(tokens)
    if "(" in tokens:  # innermost parentheses first (expressions here have no nesting)
        lo = tokens.index("(") + 1
        hi = tokens.index(")")
    segment = range(lo, hi)
    for i in segment:
        if tokens[i] in ("×", "÷"):
            return i, "inside the parentheses" if lo else "multiplication and division come first"
    for i in segment:
        if tokens[i] in ("+", "-"):
            return i, "inside the parentheses" if lo else "then addition and subtraction, left to right"
    raise ValueError("no operator left")


def _reduce(tokens: list) -> tuple[list, str] | None:
    """Apply one operation; ``None`` when the result would not be an integer (the draw is rejected)."""
    i, why = _next_step(tokens)
    a, op, b = tokens[i - 1], tokens[i], tokens[i + 1]
    if op == "÷" and (b == 0 or (a / b).denominator != 1):
        return None
    val = OPS[op](a, b)
    new = tokens[: i - 1] + [val] + tokens[i + 2 :]
    # drop parentheses around a single number
    for j in range(len(new) - 2):
        if new[j] == "(" and new[j + 2] == ")":
            new = new[:j] + [new[j + 1]] + new[j + 3 :]
            break
    line = f"{_cap(why)}: {format_number(a)} {op} {format_number(b)} = {format_number(val)}."
    return new, line


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def order_of_operations(r: Rand) -> Problem:
    """Evaluate an expression with mixed operators and optional parentheses, one operation per line."""
    while True:  # rejection sampling: redraw until every division is exact and numbers stay small
        n = r.between(3, 5)
        nums = [Fraction(r.between(1, 12 if r.chance(0.6) else 40)) for _ in range(n)]
        ops = [r.pick(("+", "-", "×", "÷", "+", "×")) for _ in range(n - 1)]
        tokens: list = [nums[0]]
        for op, num in zip(ops, nums[1:], strict=True):
            tokens += [op, num]
        if r.chance(0.55):
            start = r.below(n - 1)  # wrap operands start..start+1 (or +2) in parentheses
            end = min(n - 1, start + r.pick((1, 1, 2)))
            if not (start == 0 and end == n - 1):
                tokens.insert(2 * end + 1, ")")
                tokens.insert(2 * start, "(")
        expr = _show(tokens)
        steps, cur, ok = [], tokens, True
        while len(cur) > 1:
            res = _reduce(cur)
            if res is None or any(isinstance(t, Fraction) and abs(t) > 5000 for t in res[0]):
                ok = False
                break
            cur, line = res
            steps.append(line)
            if len(cur) > 1:
                steps.append(f"The expression is now {_show(cur)}.")
        if ok:
            break
    answer = cur[0]
    statement = r.pick((f"Evaluate {expr}.", f"Calculate {expr}.", f"What is the value of {expr}?"))
    return Problem("order", _doc(r, statement, steps, answer), answer)


# ---------------------------------------------------------------------------------------------------
# Fractions and percentages
# ---------------------------------------------------------------------------------------------------


def _frac(q: Fraction) -> str:
    return f"{q.numerator}/{q.denominator}"


def fraction_arithmetic(r: Rand) -> Problem:
    """Add, subtract, multiply or divide two fractions, showing common denominators and simplifying."""
    b, d = r.between(2, 12), r.between(2, 12)
    a, c = r.between(1, 2 * b - 1), r.between(1, 2 * d - 1)
    a, c = a + (a == b), c + (c == d)  # a fraction equal to 1 makes a dull problem
    x, y = Fraction(a, b), Fraction(c, d)
    op = r.pick(("+", "-", "×", "÷"))
    raw = f"{a}/{b} {op} {c}/{d}"
    steps = []
    if op in ("+", "-"):
        lcd = b * d // _gcd(b, d)
        na, nc = a * lcd // b, c * lcd // d
        steps.append(f"The least common denominator of {b} and {d} is {lcd}.")
        steps.append(f"Rewrite: {a}/{b} = {na}/{lcd} and {c}/{d} = {nc}/{lcd}.")
        num = na + nc if op == "+" else na - nc
        steps.append(f"{na}/{lcd} {op} {nc}/{lcd} = {num}/{lcd}.")
        value = Fraction(num, lcd)
        plain = (num, lcd)
    elif op == "×":
        num, den = a * c, b * d
        steps.append(f"Multiply the numerators and the denominators: ({a} × {c})/({b} × {d}) = {num}/{den}.")
        value, plain = x * y, (num, den)
    else:
        num, den = a * d, b * c
        steps.append(f"Dividing by {c}/{d} is the same as multiplying by its reciprocal {d}/{c}.")
        steps.append(f"{a}/{b} × {d}/{c} = ({a} × {d})/({b} × {c}) = {num}/{den}.")
        value, plain = x / y, (num, den)
    g = _gcd(abs(plain[0]), plain[1])
    if value.denominator == 1:
        steps.append(f"{plain[0]}/{plain[1]} = {value.numerator}, a whole number.")
    elif g > 1:
        steps.append(
            f"Simplify by dividing the top and bottom by {g}: {plain[0]}/{plain[1]} = {_frac(value)}."
        )
    else:
        steps.append(f"{_frac(value)} is already in lowest terms.")
    statement = r.pick(
        (
            f"Calculate {raw}.",
            f"Work out {raw} and simplify.",
            f"What is {raw}? Give your answer in lowest terms.",
        )
    )
    return Problem("fraction", _doc(r, statement, steps, value), value)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def percentage(r: Rand) -> Problem:
    """Percent of a number, percent change of a price, or what percent one number is of another."""
    form = r.below(3)
    if form == 0:
        p = r.pick((5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 90, 120, 150))
        n = r.between(2, 80) * r.pick((4, 5, 10, 20))
        value = Fraction(p * n, 100)
        statement = f"What is {p}% of {n}?"
        steps = [f"{p}% means {p}/100.", f"{p}/100 × {n} = {p * n}/100 = {format_number(value)}."]
        return Problem("percent_of", _doc(r, statement, steps, value), value)
    if form == 1:
        price = Fraction(r.between(4, 120) * 5)
        p = r.pick((10, 15, 20, 25, 30, 40, 50))
        up = r.chance(0.4)
        change = price * p / 100
        value = price + change if up else price - change
        item = r.pick(
            ("jacket", "bicycle", "lamp", "pair of shoes", "board game", "backpack", "kettle", "chair")
        )
        verb = "rises" if up else "is reduced"
        statement = (
            f"A {item} costs {_money(price)}. Its price {verb} by {p}%. What is the new price in dollars?"
        )
        steps = [
            f"{p}% of {_money(price)} is {p}/100 × {format_number(price)} = {format_number(change)}.",
            f"New price: {format_number(price)} {'+' if up else '-'} {format_number(change)} = "
            f"{format_number(value)}.",
        ]
        return Problem("percent_change", _doc(r, statement, steps, value), value)
    whole = r.between(1, 40) * 20  # a multiple of 20, so every multiple of 5 percent is a whole part
    value = Fraction(r.pick((5, 10, 15, 20, 25, 30, 40, 45, 50, 60, 65, 75, 80, 90, 95)))
    part = int(whole * value / 100)
    statement = f"What percent of {whole} is {part}?"
    steps = [
        f"Divide the part by the whole: {part}/{whole}.",
        f"Multiply by 100: {part}/{whole} × 100 = {format_number(value)}.",
    ]
    return Problem("percent_what", _doc(r, statement, steps, value), value)


# ---------------------------------------------------------------------------------------------------
# Linear equations
# ---------------------------------------------------------------------------------------------------


def _lin(a: int, v: str, b: int) -> str:
    """``a v + b`` written naturally: ``3x - 4``, ``x + 7``, ``-x``."""
    coef = {1: "", -1: "-"}.get(a, str(a))
    term = f"{coef}{v}"
    if b == 0:
        return term
    return f"{term} {'+' if b > 0 else '-'} {abs(b)}"


def linear_equation(r: Rand) -> Problem:
    """Solve a one-variable linear equation with an integer solution, one operation per line."""
    v = r.pick(VARIABLES)
    sol = r.between(-15, 20)
    form = r.below(4)
    steps = []
    if form == 0:  # a v + b = c
        a, b = r.pick((2, 3, 4, 5, 6, 7, 8, 9, 11, 12)), r.between(-30, 40)
        c = a * sol + b
        eq = f"{_lin(a, v, b)} = {c}"
        if b:
            steps.append(
                f"{'Subtract' if b > 0 else 'Add'} {abs(b)} {'from' if b > 0 else 'to'} both sides: {a}{v} "
                f"= {c - b}."
            )
        steps.append(f"Divide both sides by {a}: {v} = {c - b}/{a} = {sol}.")
    elif form == 1:  # a v + b = c v + d
        a, c = r.between(2, 12), r.between(1, 11)
        if a == c:
            a += 1
        b = r.between(-20, 20)
        d = a * sol + b - c * sol
        eq = f"{_lin(a, v, b)} = {_lin(c, v, d)}"
        steps.append(f"Subtract {_lin(c, v, 0)} from both sides: {_lin(a - c, v, b)} = {d}.")
        if b:
            steps.append(
                f"{'Subtract' if b > 0 else 'Add'} {abs(b)} {'from' if b > 0 else 'to'} both sides: "
                f"{_lin(a - c, v, 0)} = {d - b}."
            )
        if a - c != 1:
            steps.append(f"Divide both sides by {a - c}: {v} = {sol}.")
    elif form == 2:  # a (v + b) = c
        a, b = r.between(2, 9), r.between(-9, 12)
        if b == 0:
            b = 3
        c = a * (sol + b)
        eq = f"{a}({_lin(1, v, b)}) = {c}"
        steps.append(f"Divide both sides by {a}: {_lin(1, v, b)} = {c // a}.")
        steps.append(
            f"{'Subtract' if b > 0 else 'Add'} {abs(b)} {'from' if b > 0 else 'to'} both sides: {v} = {sol}."
        )
    else:  # v / a + b = c, with v a multiple of a
        a = r.between(2, 9)
        sol = a * r.between(-6, 10)
        b = r.between(1, 25)
        c = sol // a + b
        eq = f"{v}/{a} + {b} = {c}"
        steps.append(f"Subtract {b} from both sides: {v}/{a} = {c - b}.")
        steps.append(f"Multiply both sides by {a}: {v} = {(c - b) * a}.")
    steps.append(f"Check: substituting {v} = {sol} into {eq} makes both sides equal.")
    statement = r.pick((f"Solve for {v}: {eq}.", f"Find {v} if {eq}.", f"Solve the equation {eq}."))
    return Problem("equation", _doc(r, statement, steps, Fraction(sol)), Fraction(sol))


# ---------------------------------------------------------------------------------------------------
# Word problems
# ---------------------------------------------------------------------------------------------------


def word_problem(r: Rand) -> Problem:
    """A short everyday problem solved in two or three steps."""
    name = r.pick(NAMES)
    form = r.below(8)
    if form == 0:  # shopping with change
        n, price = r.between(2, 9), Fraction(r.between(3, 40) * 25, 100)
        cost = n * price
        paid = Fraction(((cost // 5) + 1) * 5)
        item = r.pick(
            ("notebooks", "pens", "apples", "tickets", "muffins", "bus passes", "plants", "candles")
        )
        statement = (
            f"{name} buys {n} {item} at {_money(price)} each and pays with {_money(paid)}. How "
            f"much change, in dollars, does {name} get?"
        )
        steps = [
            f"Cost: {n} × {format_number(price)} = {format_number(cost)}.",
            f"Change: {format_number(paid)} - {format_number(cost)} = {format_number(paid - cost)}.",
        ]
        value = paid - cost
    elif form == 1:  # distance = speed × time
        speed, hours = r.between(3, 90), Fraction(r.between(1, 12), r.pick((1, 2, 4)))
        value = speed * hours
        vehicle = r.pick(("A train", "A cyclist", "A car", "A boat", "A runner", "A bus"))
        statement = (
            f"{vehicle} travels at {speed} km per hour for {format_number(hours)} hours. How far "
            "does it go, in kilometres?"
        )
        steps = ["Distance = speed × time.", f"{speed} × {format_number(hours)} = {format_number(value)}."]
    elif form == 2:  # equal sharing with leftovers
        people, each = r.between(3, 12), r.between(4, 30)
        left = r.below(people)
        total = people * each + left
        thing = r.pick(("stickers", "marbles", "sweets", "cards", "beads", "stamps"))
        ask_left = r.chance(0.5)
        statement = f"{name} shares {total} {thing} equally among {people} friends. " + (
            "How many are left over?" if ask_left else "How many does each friend get?"
        )
        steps = [
            f"{total} ÷ {people} = {each} with remainder {left}.",
            f"Each friend gets {each}, and {left} are left over.",
        ]
        value = Fraction(left if ask_left else each)
    elif form == 3:  # rectangle
        w, h = r.between(2, 40), r.between(2, 40)
        ask_area = r.chance(0.5)
        asked = "area in square metres" if ask_area else "perimeter in metres"
        statement = f"A rectangular garden is {w} m long and {h} m wide. What is its {asked}?"
        if ask_area:
            steps, value = [f"Area = length × width = {w} × {h} = {w * h}."], Fraction(w * h)
        else:
            steps, value = (
                [f"Perimeter = 2 × (length + width) = 2 × ({w} + {h}) = 2 × {w + h} = {2 * (w + h)}."],
                Fraction(2 * (w + h)),
            )
    elif form == 4:  # ages
        young, k, years = r.between(3, 15), r.between(2, 5), r.between(2, 10)
        old = k * young
        total = old + young + 2 * years
        other = r.pick([x for x in NAMES if x != name])
        statement = (
            f"{name} is {k} times as old as {other}. In {years} years, the sum of their ages will "
            f"be {total}. How old is {other} now?"
        )
        steps = [
            f"Let {other}'s age be a. Then {name}'s age is {k}a.",
            f"In {years} years: (a + {years}) + ({k}a + {years}) = {total}, so {k + 1}a + {2 * years} = "
            f"{total}.",
            f"{k + 1}a = {total - 2 * years}, so a = {young}.",
        ]
        value = Fraction(young)
    elif form == 5:  # average
        k = r.between(3, 6)
        vals = [r.between(40, 100) for _ in range(k)]
        vals[-1] += -sum(vals) % k  # a whole-number mean, as a teacher would set it
        value = Fraction(sum(vals), k)
        statement = (
            f"{name} scored {', '.join(map(str, vals[:-1]))} and {vals[-1]} on {k} tests. What is "
            "the mean score?"
        )
        steps = [
            f"Sum: {' + '.join(map(str, vals))} = {sum(vals)}.",
            f"Mean: {sum(vals)} ÷ {k} = {format_number(value)}.",
        ]
    elif form == 6:  # saving up (rounding up)
        weekly, goal = r.between(3, 25), r.between(30, 400)
        weeks = -(-goal // weekly)
        statement = (
            f"{name} saves ${weekly} every week to buy something that costs ${goal}. How many "
            "weeks does it take to have enough money?"
        )
        steps = [
            f"{goal} ÷ {weekly} = {format_number(Fraction(goal, weekly))}.",
            f"Part of a week is not enough, so round up: {weeks} weeks.",
        ]
        value = Fraction(weeks)
    else:  # recipe scaling
        base, want = r.pick((2, 4, 6, 8)), r.pick((3, 6, 10, 12, 16))
        amount = Fraction(r.between(1, 12), r.pick((1, 2, 4)))
        value = amount * want / base
        ing = r.pick(("cups of flour", "cups of oats", "cups of milk", "spoons of sugar", "cups of rice"))
        statement = (
            f"A recipe for {base} people uses {format_number(amount)} {ing}. How much is needed "
            f"for {want} people?"
        )
        steps = [
            f"Per person: {format_number(amount)} ÷ {base} = {format_number(amount / base)}.",
            f"For {want} people: {format_number(amount / base)} × {want} = {format_number(value)}.",
        ]
    return Problem("word", _doc(r, statement, steps, value), value)


KINDS: tuple[Callable[[Rand], Problem], ...] = (
    column_addition,
    column_subtraction,
    long_multiplication,
    long_division,
    order_of_operations,
    order_of_operations,
    fraction_arithmetic,
    fraction_arithmetic,
    percentage,
    linear_equation,
    linear_equation,
    word_problem,
    word_problem,
)


def problem(r: Rand) -> Problem:
    """One problem of a randomly chosen kind."""
    return r.pick(KINDS)(r)


def documents(r: Rand) -> Iterator[str]:
    """An endless stream of problem documents."""
    while True:
        yield problem(r).text


def generate(seed: int, budget: int) -> Iterator[str]:
    """Distinct problem documents until about ``budget`` bytes of UTF-8 text."""
    return until_budget(documents(Rand(seed)), budget)
