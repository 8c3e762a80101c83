"""Deterministic generator of the demo's embedded data (docs/demo.md).

In-domain task (the paper's ad moderation, Table 13): an ad text that violates one policy
(exaggerated claims, sexual hint, political content, prohibited product) or none. The ideal
response names the policy, explains why (quoting the offending words) and suggests a compliant
rewrite::

    The ad violates the sexual hint policy. Reason: it uses a sexual hint to draw attention
    with "hot and naughty". Rewrite: "a comfortable yoga mat for everyday use".

SFT demonstrations are of mixed quality, as human-written data is: each part is drawn
independently (``DemoQuality``): a wrong or vague policy, a missing reason or rewrite, a rewrite
that keeps the offending words, verbose filler, or the curt non-answer of the paper's Table 4.

General task (checkable answers): one-digit addition and subtraction, bare or as a word problem,
answered ``"3 + 5 = 8. The answer is 8."``. Its demonstrations are all correct.

Every function is a pure function of its ``random.Random`` (or of nothing): the same seed gives
the same files.
"""

from __future__ import annotations

import dataclasses
import random

PRODUCTS = (
    "face cream", "running shoes", "green tea", "phone case", "yoga mat", "coffee mug", "desk lamp",
    "shampoo", "backpack", "sun hat", "dog food", "wool socks", "bike helmet", "water bottle",
    "scented candle", "hair dryer", "rain jacket", "lip balm", "garden hose", "travel pillow",
    "wall clock", "baby lotion", "tea kettle", "laptop bag",
)
PROHIBITED_ITEMS = ("cheap cigarettes", "diet pills", "fake passports", "hunting rifles", "casino chips",
                    "vape pens")


@dataclasses.dataclass(frozen=True)
class Policy:
    """An ad policy: ad templates as (text, offending words), the reason and a compliant rewrite.
    ``{p}`` is the product (for ``prohibited product``: the prohibited item)."""

    name: str
    ads: tuple[tuple[str, str | None], ...]
    reason: str
    rewrite: str


POLICIES: tuple[Policy, ...] = (
    Policy("exaggerated claims", (
        ("the number 1 {p} in the world", "number 1"),
        ("our {p} is 100% guaranteed to change your life", "100% guaranteed"),
        ("a miracle {p} that works instantly for everyone", "miracle"),
        ("the best {p} ever made, it never fails", "never fails"),
    ), "it makes an absolute claim that cannot be proven", "a well made {p} that many customers enjoy"),
    Policy("sexual hint", (
        ("feel hot and naughty tonight with our {p}", "hot and naughty"),
        ("lonely and thirsty? our {p} is waiting for you", "lonely and thirsty"),
        ("our {p} makes your body look juicy and sexy", "juicy and sexy"),
    ), "it uses a sexual hint to draw attention", "a comfortable {p} for everyday use"),
    Policy("political content", (
        ("vote for the green party and get a free {p}", "vote for the green party"),
        ("our {p} proudly supports the mayor in the election", "the election"),
        ("buy our {p} to fight the new tax law", "the new tax law"),
    ), "it links the product to politics", "a practical {p} for every home"),
    Policy("prohibited product", (
        ("buy {p} online with no questions asked", "{p}"),
        ("get {p} delivered to your door today", "{p}"),
        ("{p} on sale now, order today", "{p}"),
    ), "it promotes a product that may not be sold", "visit our store for everyday goods"),
    Policy("none", (
        ("a simple {p} for daily use at a fair price", None),
        ("our {p} comes in three colors", None),
        ("try our new {p}, made with care", None),
    ), "it describes the {p} plainly", "no change is needed"),
)
POLICY_BY_NAME = {p.name: p for p in POLICIES}

QUESTION_FORMS = (
    "What ad policy does the following text violate? {ad}",
    'Which ad policy does this ad break? "{ad}"',
    "Review this ad for policy problems: {ad}",
)
VAGUE_STATEMENT = "The ad may break a rule."
CURT_ANSWER = "None, just make sure you are not lying about it."
FILLER = ("Ads must follow the rules of the platform at all times.",
          "Thank you for asking about this ad, we hope this helps.",
          "Every ad on the platform is checked with great care by our team.")
ARITHMETIC_FORMS = {
    "+": ("What is {a} + {b}?", "Tom has {a} apples and buys {b} more. How many apples does Tom have now?"),
    "-": ("What is {a} - {b}?", "Tom has {a} apples and gives away {b}. How many apples are left?"),
}


@dataclasses.dataclass(frozen=True)
class AdCase:
    """One ad and its ground truth; ``offending`` is None for a compliant ad."""

    policy: str
    product: str
    ad: str
    offending: str | None


@dataclasses.dataclass(frozen=True)
class DemoQuality:
    """Probabilities of each flaw of a human-written demonstration (drawn independently)."""

    wrong_policy: float = 0.15
    vague_policy: float = 0.15
    reason: float = 0.5  # probability the reason is present
    rewrite: float = 0.45  # probability the rewrite is present
    unsafe_rewrite: float = 0.25  # of the rewrites present: keeps the offending words
    verbose: float = 0.2
    curt: float = 0.08


# --- ad cases ----------------------------------------------------------------------------------

def all_ad_cases() -> list[AdCase]:
    """Every ad the templates can make, in a fixed order."""
    cases = []
    for policy in POLICIES:
        items = PROHIBITED_ITEMS if policy.name == "prohibited product" else PRODUCTS
        for text, offending in policy.ads:
            for item in items:
                cases.append(AdCase(policy.name, item, text.format(p=item),
                                    offending and offending.format(p=item)))
    return cases


def split_ad_cases(seed: int, held_out_fraction: float) -> tuple[list[AdCase], list[AdCase]]:
    """(training ads, held-out ads): a seeded split, stratified by policy."""
    rng = random.Random(seed)
    train, held_out = [], []
    for policy in POLICIES:
        cases = [c for c in all_ad_cases() if c.policy == policy.name]
        rng.shuffle(cases)
        cut = max(1, round(held_out_fraction * len(cases)))
        held_out += cases[:cut]
        train += cases[cut:]
    return train, held_out


def ad_prompt(case: AdCase, form: int) -> str:
    return QUESTION_FORMS[form].format(ad=case.ad)


def sample_ad_prompts(rng: random.Random, cases: list[AdCase], count: int) -> list[tuple[str, AdCase]]:
    """``count`` (prompt, case) pairs, each case drawn uniformly over policies then ads."""
    by_policy = {}
    for case in cases:
        by_policy.setdefault(case.policy, []).append(case)
    out = []
    for _ in range(count):
        case = rng.choice(by_policy[rng.choice(sorted(by_policy))])
        out.append((ad_prompt(case, rng.randrange(len(QUESTION_FORMS))), case))
    return out


# --- responses ---------------------------------------------------------------------------------

def statement(policy: str) -> str:
    return "The ad violates no policy." if policy == "none" else f"The ad violates the {policy} policy."


def reason_sentence(policy: str, case: AdCase) -> str:
    reason = POLICY_BY_NAME[policy].reason.format(p=case.product)
    return f'Reason: {reason} with "{case.offending}".' if case.offending else f"Reason: {reason}."


def rewrite_sentence(policy: str, case: AdCase, unsafe: bool = False) -> str:
    if policy == "none":
        return "Rewrite: no change is needed."
    text = f"{case.ad}, now on sale" if unsafe else POLICY_BY_NAME[policy].rewrite.format(p=case.product)
    return f'Rewrite: "{text}".'


def ideal_response(case: AdCase) -> str:
    """The response a careful moderator writes: right policy, reason, compliant rewrite."""
    return " ".join((statement(case.policy), reason_sentence(case.policy, case), rewrite_sentence(case.policy, case)))


def demonstration(rng: random.Random, case: AdCase, quality: DemoQuality) -> str:
    """A human-written SFT response of mixed quality (module docstring)."""
    if rng.random() < quality.curt:
        return CURT_ANSWER
    draw = rng.random()
    if draw < quality.wrong_policy:
        named = rng.choice([p.name for p in POLICIES if p.name != case.policy])
        sentences = [statement(named)]
    elif draw < quality.wrong_policy + quality.vague_policy:
        named, sentences = case.policy, [VAGUE_STATEMENT]
    else:
        named, sentences = case.policy, [statement(case.policy)]
    if rng.random() < quality.reason:
        sentences.append(reason_sentence(named, case))
    if rng.random() < quality.rewrite:
        unsafe = case.offending is not None and rng.random() < quality.unsafe_rewrite
        sentences.append(rewrite_sentence(named, case, unsafe))
    if rng.random() < quality.verbose:
        sentences += rng.sample(FILLER, 2)
    return " ".join(sentences)


# --- general task ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArithmeticCase:
    question: str
    a: int
    b: int
    op: str

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def response(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer}. The answer is {self.answer}."


def all_arithmetic_cases() -> list[ArithmeticCase]:
    """Every one-digit problem (subtraction without negative results) in every form."""
    return [ArithmeticCase(form.format(a=a, b=b), a, b, op)
            for op, forms in ARITHMETIC_FORMS.items() for form in forms
            for a in range(10) for b in range(10) if op == "+" or a >= b]


def split_arithmetic_cases(seed: int, held_out: int) -> tuple[list[ArithmeticCase], list[ArithmeticCase]]:
    cases = all_arithmetic_cases()
    random.Random(seed).shuffle(cases)
    return cases[held_out:], cases[:held_out]


# --- the corpora ---------------------------------------------------------------------------------

def policy_guide() -> list[str]:
    """Plain-text documents describing each policy, for language-model pretraining."""
    docs = []
    for policy in POLICIES:
        for text, offending in policy.ads:
            example = text.format(p="product")
            verdict = "is allowed" if policy.name == "none" else f"breaks the {policy.name} policy"
            docs.append(f"Policy guide: an ad such as {example} {verdict}, "
                        f"because {policy.reason.format(p='product')}.")
    return docs


def pretraining_documents(rng: random.Random, ads: list[AdCase], arithmetic: list[ArithmeticCase],
                          count: int, quality: DemoQuality) -> list[str]:
    """Raw text: ads with ideal and demonstration-style commentary, the policy guide, sums."""
    guide = policy_guide()
    docs = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.15:
            docs.append(rng.choice(guide))
        elif kind < 0.7:
            case = rng.choice(ads)
            comment = ideal_response(case) if rng.random() < 0.5 else demonstration(rng, case, quality)
            docs.append(f'Ad: "{case.ad}". {comment}')
        else:
            docs.append(" ".join(c.response for c in rng.sample(arithmetic, 3)))
    return docs
